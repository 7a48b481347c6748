"""LoRA fine-tuning on one device (GPU or CPU).

    load base model (frozen; NF4 if quantize_base) + tokenizer ─► add LoRA adapters ─► tokenize data
    report held-out loss and eval_metric over greedy answers, with a few samples (before)
    for step in steps:
        take grad_accum_steps micro-batches; count their labelled tokens N
        for each micro-batch:  loss = Σ token losses / N ;  loss.backward()
        clip grad norm ; AdamW step ; LR schedule step
        log (loss, lr, grad norm, tokens/s, memory) ; every eval_every: held-out loss
        every save_every: checkpoint (adapter, optimizer, schedule, RNG, data position)
    report held-out loss and eval_metric (after) ; final checkpoint (+ merged/, gguf/) ; push_to_hub ; before → after table

Copy it out (``tune-run cp lora_single_device my_lora.py``), edit the loop, and run the copy with
``tune-run my_lora.py --config smollm2_135m``. Everything the loop calls is a small library function.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.models import apply_lora
from tunesmith.models.host_memory import keep_freed_host_memory
from tunesmith.training.checkpointing import remove_stale_temp_dirs, resume_latest, save_adapter_checkpoint
from tunesmith.training.final_outputs import push_run, run_output_writers
from tunesmith.training.config import ConfigError, check_keyword_args, to_dict, to_yaml
from tunesmith.training.eval_metrics import load_eval_metrics
from tunesmith.training.evaluation import HeldOutReport, evaluate_loss, held_out_report, write_held_out_report
from tunesmith.training.losses import IGNORE_INDEX, loss_class
from tunesmith.training.metrics import metric_logger, peak_memory_gib
from tunesmith.training.options import DataOptions, LoRAOptions, RunOptions
from tunesmith.training.schedules import warmup_cosine
from tunesmith.training.setup import (
    activation_offloading,
    build_optimizer,
    compile_model_and_loss,
    load_model_and_tokenizer,
    select_device,
    select_dtype,
    set_attention,
    sft_batches,
    to_device,
)


@dataclass
class Config(RunOptions):
    """Options of this recipe (YAML keys and ``key=value`` overrides use these names).

    The options every recipe shares (model, output_dir, batch/schedule, evaluation, checkpoints,
    logging) come from ``RunOptions`` in training/options.py; this recipe adds or re-defaults these.

    Attributes:
        data: Training / held-out data (see ``DataOptions``).
        lora: Adapter shape and placement (see ``LoRAOptions``).
        quantize_base: QLoRA: store the adapted layers' frozen base weights in NF4 (~4.1 bits per
            weight: about 4x less weight memory than bf16; each forward dequantizes, so steps are
            slower, and logits move by the NF4 rounding error). Quantized while loading, layer by layer.

        The memory / speed toolbox (each switch is independent; the loss is unchanged by all of them):

        activation_offloading: CUDA only: keep activations saved for backward in CPU memory
            (``save_on_cpu``); frees GPU memory at the cost of host↔device copies each step.
        compile: ``torch.compile`` the blocks and the loss: faster steps and fewer intermediates,
            after a one-off compilation (tens of seconds; a new sequence length may recompile).
        loss: ``cross_entropy`` (projects only labelled positions to the vocabulary, in chunks, so
            the full fp32 [tokens × vocab] logits never exist) or an import path to your own loss
            class (see training/losses.py).
        loss_args: Keyword arguments for the loss class; ``chunk_size`` for ``cross_entropy``
            (smaller: less memory for logits, slightly slower; 0: one chunk).
    """

    data: DataOptions = field(default_factory=DataOptions)
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    output_dir: str = "output/lora"  # this recipe's default
    quantize_base: bool = False
    activation_offloading: bool = False
    compile: bool = False
    loss: str = "cross_entropy"
    loss_args: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Rules across options, checked by ``build_config`` before anything loads."""
        self.loss_args = check_keyword_args(loss_class(self.loss), self.loss_args, "loss_args")

    def validate_environment(self) -> None:
        on_cpu = self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())
        if self.activation_offloading and on_cpu:
            raise ConfigError("activation_offloading=true needs a CUDA device; on CPU activations are already in "
                              "host memory: set activation_offloading=false")


def estimate_memory(cfg: Config) -> Any:
    """Expected peak memory of this run, split by kind (printed by ``tune-run ... --dry-run``)."""
    from tunesmith.training.memory import estimate_run_memory

    return estimate_run_memory(cfg)


def build_loss(name: str, args: dict[str, Any]) -> Any:
    """``cross_entropy`` → our chunked CE; anything else is imported from its path."""
    return loss_class(name)(**args)


def main(cfg: Config) -> dict[str, Any]:
    # ---- setup -------------------------------------------------------------------------------------
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    remove_stale_temp_dirs(output_dir)
    eval_metrics = load_eval_metrics(cfg.eval_metric)  # before loading anything: a typo fails at once

    nf4_targets = cfg.lora.targets if cfg.quantize_base else []  # QLoRA: quantize while loading
    base = load_model_and_tokenizer(cfg.model, cfg.tokenizer, dtype, device, cfg.chat_template, nf4_targets)
    model, tokenizer = base.model, base.tokenizer
    apply_lora(model, cfg.lora.targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
               quantize_base=cfg.quantize_base, seed=cfg.seed)
    model.activation_checkpointing = cfg.activation_checkpointing
    set_attention(model, cfg.attention)
    keep_freed_host_memory(device)  # CPU: a step's large buffers stay mapped for the next step (after loading)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}  # the adapters

    batches, val_batches, val_set = sft_batches(cfg.data, tokenizer, cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * batches.per_epoch // cfg.grad_accum_steps
    optimizer = build_optimizer(params.values(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total_steps)
    loss_fn = build_loss(cfg.loss, cfg.loss_args)
    if cfg.compile:
        compile_model_and_loss(model, loss_fn)
    offload = activation_offloading(cfg.activation_offloading, device)
    step = resume_latest(output_dir, params, optimizer, scheduler, config=to_dict(cfg)) if cfg.resume else 0
    logger = metric_logger(cfg, total_steps, start_step=step)

    def save(at_step: int, final: bool = False) -> Path:
        return save_adapter_checkpoint(
            output_dir, at_step, model=model, optimizer=optimizer, scheduler=scheduler,
            micro_batches=at_step * cfg.grad_accum_steps, lora=cfg.lora, base_model=base.source,
            config_yaml=to_yaml(cfg), keep_last=cfg.keep_last,
            final_writers=run_output_writers(cfg, base, model) if final else None)  # merged/, gguf/

    def held_out(when: str) -> HeldOutReport:
        report = held_out_report(model, tokenizer, val_batches, val_set, loss_fn, device, eval_metrics, cfg,
                                 when=when)
        logger.log(step, report.scalars(), advance=False)
        return report

    # ---- before ------------------------------------------------------------------------------------
    before = held_out("before") if step == 0 else None
    losses: list[float] = []
    grad_norms: list[float] = []

    # ---- training loop -----------------------------------------------------------------------------
    model.train()
    while step < total_steps:
        logger.start_step()
        micro = [batches[step * cfg.grad_accum_steps + i] for i in range(cfg.grad_accum_steps)]
        num_labelled = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro)  # N for the whole step
        step_loss = 0.0
        for mb in micro:
            mb = to_device(mb, device)
            with offload():  # saved activations go to CPU memory when activation_offloading is on
                hidden = model.hidden_states(mb["tokens"], positions=mb.get("positions"), document_ids=mb.get("document_ids"))
                loss = loss_fn(hidden, mb["labels"], model.logits) / max(1, num_labelled)
            loss.backward()
            step_loss += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(step_loss)
        grad_norms.append(float(grad_norm))

        tokens_seen = sum(int(mb["lengths"].sum()) for mb in micro)
        logger.log(step, {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0],
                          "train/grad_norm": float(grad_norm), "train/tokens_per_s": logger.tokens_per_second(tokens_seen),
                          "train/peak_mem_gib": peak_memory_gib(device)})
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            val_loss = evaluate_loss(model, val_batches, loss_fn, device, max_batches=cfg.eval_batches)
            logger.log(step, {"val/loss": val_loss}, advance=False)
            logger.write(f"step {step}: held-out loss {val_loss:.4f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save(step)

    # ---- after -------------------------------------------------------------------------------------
    after = held_out("after")
    final_dir = save(step, final=True)
    push_run(cfg, final_dir, before, after, base.source)  # push_to_hub=REPO
    report_file = write_held_out_report(output_dir, before, after)
    logger.close(artifacts=[final_dir / "adapter", report_file])
    print(f"adapter saved to {final_dir / 'adapter'}" + (f"; merged model in {final_dir / 'merged'}" if cfg.save_merged else ""))
    return {"losses": losses, "grad_norms": grad_norms, "held_out_before": before.scores["loss"] if before else float("nan"),
            "held_out_after": after.scores["loss"], "held_out": (before, after), "checkpoint": final_dir}


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
