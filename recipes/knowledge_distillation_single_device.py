"""Knowledge distillation on one device: a student learns a frozen teacher's next-token distributions.

    load student (LoRA adapters, NF4 base if quantize_base; or all weights: full=true) + tokenizer
    load teacher (frozen; NF4 if teacher_quantize), refused unless it shares the student's vocabulary
    tokenize data ─► report held-out KL(teacher ‖ student) and loss (before)
    for step in steps:
        take grad_accum_steps micro-batches; count their labelled tokens N
        for each micro-batch:
            h = student.hidden_states(tokens) ; h_T = teacher.hidden_states(tokens)   (no grad)
            kd = Σ divergence(student, teacher) over labelled tokens, chunk by chunk
            ce = Σ cross-entropy over labelled tokens (skipped when kd_ratio = 1)
            loss = ((1 − kd_ratio) · ce + kd_ratio · kd) / N ; loss.backward()
        clip grad norm ; AdamW step ; LR schedule step ; log ; eval ; checkpoint
    report held-out KL and loss (after) ; final checkpoint (PEFT adapter / full model; merged/, gguf/) ; push_to_hub

The divergence is chosen by name or import path (``loss=reverse_kl``, ``loss=my_kd.MyDivergence``);
every one takes the same arguments (training/distillation_losses.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch

from tunesmith.models import apply_lora
from tunesmith.models.host_memory import keep_freed_host_memory
from tunesmith.training.checkpointing import remove_stale_temp_dirs, resume_latest, save_adapter_checkpoint
from tunesmith.training.final_outputs import push_run, run_output_writers
from tunesmith.training.config import MISSING, ConfigError, Range, check_keyword_args, to_dict, to_yaml
from tunesmith.training.distillation import evaluate_distillation, load_teacher, report_distillation
from tunesmith.training.distillation_losses import build_distillation_loss, distillation_loss_class
from tunesmith.training.eval_metrics import load_eval_metrics
from tunesmith.training.evaluation import HeldOutReport, answer_held_out, write_held_out_report
from tunesmith.training.losses import IGNORE_INDEX, CrossEntropyLoss
from tunesmith.training.metrics import metric_logger, peak_memory_gib
from tunesmith.training.options import DataOptions, LoRAOptions, RunOptions, TokenizerSource
from tunesmith.training.preference import save_full_checkpoint
from tunesmith.training.schedules import warmup_cosine
from tunesmith.training.setup import (
    build_optimizer, load_model_and_tokenizer, select_device, select_dtype, set_attention, sft_batches, to_device,
)


@dataclass
class Config(RunOptions):
    """Options of this recipe (YAML keys and ``key=value`` overrides use these names).

    The options every recipe shares come from ``RunOptions`` in training/options.py; ``model`` is
    the student.

    Attributes:
        data: Training / held-out examples (see ``DataOptions``); the loss is taken on their
            labelled (answer) tokens.
        lora: The student's adapters (see ``LoRAOptions``); unused when ``full``.
        teacher: The frozen teacher: a LoRA checkpoint folder (``OUTPUT_DIR/step_N``: the run's base
            with its adapter merged), a local HF folder (e.g. a merged checkpoint), Hub id, ``.gguf`` or
            ``package:MODULE/FILE``; it must share the student's tokenizer.
        teacher_tokenizer: The teacher's tokenizer when its folder has none of its own (default: the
            teacher's, or else the student's; both are checked against the student's).
        teacher_quantize: Store the teacher's linear layers in NF4 (about 4x less memory for it).
        full: Train all the student's weights instead of LoRA adapters.
        quantize_base: QLoRA student: the adapted layers' frozen base weights in NF4.
        loss: ``forward_kl``, ``reverse_kl``, ``jsd`` or an import path to your class.
        loss_args: Keyword arguments of the loss class (``temperature``, ``chunk_size``; ``beta`` for ``jsd``).
        kd_ratio: Weight of the distillation term; the cross-entropy on the data's labels gets
            ``1 − kd_ratio`` (1: pure distillation, no CE pass).
    """

    data: DataOptions = field(default_factory=DataOptions)
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    teacher: str = MISSING  # checked when the run starts: a missing teacher names the command that makes it
    teacher_tokenizer: TokenizerSource | None = None
    teacher_quantize: bool = False
    full: bool = False
    quantize_base: bool = False
    loss: str = "forward_kl"
    loss_args: dict[str, Any] = field(default_factory=dict)
    kd_ratio: Annotated[float, Range(ge=0, le=1)] = 0.5
    output_dir: str = "output/kd"  # this recipe's default

    def validate(self) -> None:
        """Rules across options, checked by ``build_config`` before anything loads."""
        self.loss_args = check_keyword_args(distillation_loss_class(self.loss), self.loss_args, "loss_args")
        if self.full and self.quantize_base:
            raise ConfigError("quantize_base=true freezes the base in NF4; it cannot be combined with full=true")


def estimate_memory(cfg: Config) -> Any:
    """Expected peak memory of this run, split by kind (printed by ``tune-run ... --dry-run``)."""
    from tunesmith.training.memory import estimate_distillation_memory

    return estimate_distillation_memory(cfg)


def main(cfg: Config) -> dict[str, Any]:
    # ---- setup -------------------------------------------------------------------------------------
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    remove_stale_temp_dirs(output_dir)

    nf4_targets = cfg.lora.targets if cfg.quantize_base else []
    base = load_model_and_tokenizer(cfg.model, cfg.tokenizer, dtype, device, cfg.chat_template, nf4_targets)
    model, tokenizer = base.model, base.tokenizer
    if cfg.full:
        model.requires_grad_(True)
    else:
        apply_lora(model, cfg.lora.targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   quantize_base=cfg.quantize_base, seed=cfg.seed)
    model.activation_checkpointing = cfg.activation_checkpointing
    set_attention(model, cfg.attention)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}

    batches, val_batches, val_set = sft_batches(cfg.data, tokenizer, cfg.batch_size, cfg.seed)
    probes = tuple(tokenizer.render_chat(val_set.conversations[i]) for i in range(min(2, len(val_set))))
    teacher = load_teacher(cfg.teacher, cfg.teacher_tokenizer, model, tokenizer, dtype, device, cfg.teacher_quantize, probes)
    set_attention(teacher, cfg.attention)
    keep_freed_host_memory(device)  # CPU: a step's large buffers stay mapped for the next step (after loading)
    total_steps = cfg.max_steps or cfg.epochs * batches.per_epoch // cfg.grad_accum_steps
    optimizer = build_optimizer(params.values(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total_steps)
    kd_loss = build_distillation_loss(cfg.loss, cfg.loss_args)
    eval_metrics = load_eval_metrics(cfg.eval_metric)
    ce_loss = CrossEntropyLoss()
    step = resume_latest(output_dir, params, optimizer, scheduler, config=to_dict(cfg)) if cfg.resume else 0

    def save(at_step: int, final: bool = False) -> Path:
        common = dict(model=model, optimizer=optimizer, scheduler=scheduler, micro_batches=at_step * cfg.grad_accum_steps,
                      config_yaml=to_yaml(cfg), keep_last=cfg.keep_last,
                      final_writers=run_output_writers(cfg, base, model) if final else None)  # merged/, gguf/
        if cfg.full:
            return save_full_checkpoint(output_dir, at_step, **common)
        return save_adapter_checkpoint(output_dir, at_step, lora=cfg.lora, base_model=base.source, **common)

    def held_out(when: str) -> HeldOutReport:  # KL to the teacher, the student's loss, its greedy answers scored
        report = HeldOutReport(when, scores=evaluate_distillation(model, teacher, val_batches, device,
                                                                  max_batches=cfg.eval_batches))
        report_distillation(report.scores, when)
        if cfg.sample_max_new_tokens > 0 and val_set.prompt_messages(0):
            answer_held_out(model, tokenizer, val_set, eval_metrics, report, cfg)
        logger.log(step, report.scalars(), advance=False)
        return report

    # ---- before ------------------------------------------------------------------------------------
    logger = metric_logger(cfg, total_steps, start_step=step)
    before = held_out("before") if step == 0 else None
    losses: list[float] = []

    # ---- training loop -----------------------------------------------------------------------------
    model.train()
    while step < total_steps:
        logger.start_step()
        micro = [batches[step * cfg.grad_accum_steps + i] for i in range(cfg.grad_accum_steps)]
        num_labelled = max(1, sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro))
        step_loss = step_kd = step_ce = 0.0
        for mb in micro:
            mb = to_device(mb, device)
            position_args = dict(positions=mb.get("positions"), document_ids=mb.get("document_ids"))  # packing
            hidden = model.hidden_states(mb["tokens"], **position_args)
            with torch.no_grad():
                teacher_hidden = teacher.hidden_states(mb["tokens"], **position_args)
            kd = kd_loss(hidden, teacher_hidden, mb["labels"], model.logits, teacher.logits)
            ce = ce_loss(hidden, mb["labels"], model.logits) if cfg.kd_ratio < 1 else torch.zeros(())
            loss = ((1 - cfg.kd_ratio) * ce + cfg.kd_ratio * kd) / num_labelled
            loss.backward()
            step_loss += loss.item()
            step_kd += kd.item() / num_labelled
            step_ce += ce.item() / num_labelled
        grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(step_loss)

        tokens_seen = sum(int(mb["lengths"].sum()) for mb in micro)
        logger.log(step, {"train/loss": step_loss, "train/kd_loss": step_kd, "train/ce_loss": step_ce,
                          "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                          "train/tokens_per_s": logger.tokens_per_second(tokens_seen),
                          "train/peak_mem_gib": peak_memory_gib(device)})
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            val = evaluate_distillation(model, teacher, val_batches, device, max_batches=cfg.eval_batches)
            logger.log(step, {f"val/{k}": v for k, v in val.items()}, advance=False)
            logger.write(f"step {step}: held-out KL {val['kl']:.4f}, loss {val['loss']:.4f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save(step)

    # ---- after -------------------------------------------------------------------------------------
    after = held_out("after")
    if before is not None:
        kl_before, kl_after = before.scores["kl"], after.scores["kl"]
        print(f"held-out KL: {kl_before:.4f} before → {kl_after:.4f} after "
              f"({100 * (1 - kl_after / max(1e-12, kl_before)):.0f}% lower)")
    final_dir = save(step, final=True)
    push_run(cfg, final_dir, before, after, base.source)  # push_to_hub=REPO
    report_file = write_held_out_report(output_dir, before, after)
    logger.close(artifacts=[report_file] + ([] if cfg.full else [final_dir / "adapter"]))  # not a full model
    what = "model" if cfg.full else "adapter"
    print(f"{what} checkpoint saved to {final_dir}" + (f"; merged model in {final_dir / 'merged'}" if cfg.save_merged else ""))
    return {"losses": losses, "held_out_before": before.scores if before else {}, "held_out_after": after.scores,
            "held_out": (before, after), "checkpoint": final_dir}


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
