"""Preference optimisation (DPO, IPO, SLiC hinge, robust DPO, SimPO, ORPO) on one device.

    load base model + tokenizer ─► LoRA adapters (or train all weights: full=true) ─► tokenize pairs
                                                                  (data.packing: whole pairs per row)
    reference = the same network with adapters disabled (LoRA) | a frozen copy (full)
                | a table computed once per dataset pass (precompute_reference=true)
    report held-out reward accuracy, and eval_metric over greedy answers (before)
    for step in steps:
        for each of grad_accum_steps micro-batches of b pairs:
            chosen + rejected: ONE forward pass over 2b rows → summed response log-probs
            reference log-probs (no grad) ; loss_fn(...) → per-pair losses, rewards
            loss = Σ pair losses / pairs in the step ; loss.backward()
        clip grad norm ; AdamW step ; LR schedule step
        log (loss, reward accuracy, margin, rewards, log-probs, lr, tokens/s) ; eval ; checkpoint
    report held-out reward accuracy, eval_metric (after) ; final checkpoint (PEFT adapter; merged/, gguf/) ; push_to_hub
    print the before → after table

The loss is chosen by name or import path (``loss=ipo``, ``loss=my_losses.MyLoss``) with its own
``loss_args``; every loss takes the same ``PreferenceLogProbs`` (see training/preference_losses.py).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.models import apply_lora
from tunesmith.models.host_memory import keep_freed_host_memory
from tunesmith.training.checkpointing import remove_stale_temp_dirs, resume_latest, save_adapter_checkpoint
from tunesmith.training.final_outputs import push_run, run_output_writers
from tunesmith.training.config import check_keyword_args, to_dict, to_yaml
from tunesmith.training.eval_metrics import load_eval_metrics
from tunesmith.training.evaluation import HeldOutReport, write_held_out_report
from tunesmith.training.metrics import metric_logger, peak_memory_gib
from tunesmith.training.options import LoRAOptions, RunOptions
from tunesmith.training.preference import (
    PreferenceDataOptions,
    build_reference,
    count_pairs,
    evaluate_preferences,
    mean_metrics,
    pair_metrics,
    preference_batches,
    preference_logprobs,
    preference_report,
    save_full_checkpoint,
)
from tunesmith.training.preference_losses import build_preference_loss, preference_loss_class
from tunesmith.training.schedules import warmup_cosine
from tunesmith.training.setup import (
    build_optimizer, load_model_and_tokenizer, select_device, select_dtype, set_attention, to_device,
)


@dataclass
class Config(RunOptions):
    """Options of this recipe (YAML keys and ``key=value`` overrides use these names).

    The options every recipe shares (model, output_dir, batch/schedule, evaluation, checkpoints,
    logging) come from ``RunOptions`` in training/options.py; this recipe adds or re-defaults these.

    Attributes:
        data: Preference pairs (see ``PreferenceDataOptions``).
        lora: Adapter shape and placement (see ``LoRAOptions``); unused when ``full``.
        full: Train all weights instead of LoRA adapters; the reference is then a frozen copy of the
            starting model (or, with ``precompute_reference``, no copy at all).
        precompute_reference: Compute the reference log-probs once per dataset pass before training
            instead of one extra no-grad forward per step.
        loss: ``dpo``, ``robust_dpo``, ``ipo``, ``hinge``, ``simpo``, ``orpo`` or an import path to your class.
        loss_args: Keyword arguments of the loss class (``beta``, ``label_smoothing``, ``gamma``, ...).
    """

    data: PreferenceDataOptions = field(default_factory=PreferenceDataOptions)
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    full: bool = False
    precompute_reference: bool = False
    loss: str = "dpo"
    loss_args: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "output/dpo"  # this recipe's default
    lr: float = 1e-4  # this recipe's default
    sample_max_new_tokens: int = 0  # this recipe's default

    def validate(self) -> None:
        """Rules across options, checked by ``build_config`` before anything loads."""
        self.loss_args = check_keyword_args(preference_loss_class(self.loss), self.loss_args, "loss_args")


def estimate_memory(cfg: Config) -> Any:
    """Expected peak memory of this run, split by kind (printed by ``tune-run ... --dry-run``)."""
    from tunesmith.training.memory import estimate_preference_memory

    return estimate_preference_memory(cfg)


def main(cfg: Config) -> dict[str, Any]:
    # ---- setup -------------------------------------------------------------------------------------
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    remove_stale_temp_dirs(output_dir)
    eval_metrics = load_eval_metrics(cfg.eval_metric)  # before loading anything: a typo fails at once

    base = load_model_and_tokenizer(cfg.model, cfg.tokenizer, dtype, device, cfg.chat_template)
    model, tokenizer = base.model, base.tokenizer
    if cfg.full:
        model.requires_grad_(True)
    else:
        apply_lora(model, cfg.lora.targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   seed=cfg.seed)
    model.activation_checkpointing = cfg.activation_checkpointing
    set_attention(model, cfg.attention)
    keep_freed_host_memory(device)  # CPU: a step's large buffers stay mapped for the next step (after loading)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}

    batches, val_batches, train_set, val_set = preference_batches(cfg.data, tokenizer, cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * batches.per_epoch // cfg.grad_accum_steps
    optimizer = build_optimizer(params.values(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total_steps)
    loss_fn = build_preference_loss(cfg.loss, cfg.loss_args)

    # The reference is fixed at the starting weights, so it is built before any resume loads trained ones.
    reference, train_table, val_table = build_reference(
        model, loss_fn, full=cfg.full, precompute=cfg.precompute_reference, train_set=train_set, val_set=val_set,
        collate=val_batches.collate, batch_size=cfg.batch_size, device=device,
        frozen_copy=lambda: copy.deepcopy(model).eval().requires_grad_(False))
    step = resume_latest(output_dir, params, optimizer, scheduler, config=to_dict(cfg)) if cfg.resume else 0
    logger = metric_logger(cfg, total_steps, start_step=step)

    def save(at_step: int, final: bool = False) -> Path:
        common = dict(model=model, optimizer=optimizer, scheduler=scheduler, micro_batches=at_step * cfg.grad_accum_steps,
                      config_yaml=to_yaml(cfg), keep_last=cfg.keep_last,
                      final_writers=run_output_writers(cfg, base, model) if final else None)  # merged/, gguf/
        if cfg.full:
            return save_full_checkpoint(output_dir, at_step, **common)
        return save_adapter_checkpoint(output_dir, at_step, lora=cfg.lora, base_model=base.source, **common)

    def held_out(when: str) -> HeldOutReport:
        report = preference_report(model, tokenizer, val_batches, val_set, loss_fn, reference, device, eval_metrics, cfg,
                                   when=when, table=val_table)
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
        num_pairs = sum(count_pairs(mb) for mb in micro)  # the step's loss is the mean over all its pairs
        per_pair = []
        for mb in micro:
            mb = to_device(mb, device)
            logps = preference_logprobs(model, mb, reference, train_table)  # chosen + rejected in one pass
            pair_losses, chosen_rewards, rejected_rewards = loss_fn(logps)
            (pair_losses.sum() / num_pairs).backward()
            per_pair.append(pair_metrics(pair_losses, chosen_rewards, rejected_rewards, logps))
        grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        m = mean_metrics(per_pair)
        losses.append(m["loss"])
        grad_norms.append(float(grad_norm))
        tokens_seen = sum(int(mb["lengths"].sum()) for mb in micro)
        logger.log(step, {
            "train/loss": m["loss"], "train/reward_acc": m["reward_acc"], "train/margin": m["margin"],
            "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
            "train/tokens_per_s": logger.tokens_per_second(tokens_seen), "train/peak_mem_gib": peak_memory_gib(device),
            "rewards/chosen": m["reward_chosen"], "rewards/rejected": m["reward_rejected"],
            "logps/policy_chosen": m["logp_chosen"], "logps/policy_rejected": m["logp_rejected"],
            "logps/reference_chosen": m["ref_logp_chosen"], "logps/reference_rejected": m["ref_logp_rejected"],
        })
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            val = evaluate_preferences(model, val_batches, loss_fn, reference, device, table=val_table,
                                       max_batches=cfg.eval_batches)
            logger.log(step, {f"val/{k}": v for k, v in val.items()}, advance=False)
            logger.write(f"step {step}: held-out reward accuracy {100 * val['reward_acc']:.1f}%, margin {val['margin']:.3f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save(step)

    # ---- after -------------------------------------------------------------------------------------
    after = held_out("after")
    final_dir = save(step, final=True)
    push_run(cfg, final_dir, before, after, base.source)  # push_to_hub=REPO
    report_file = write_held_out_report(output_dir, before, after)
    logger.close(artifacts=[report_file] + ([] if cfg.full else [final_dir / "adapter"]))  # not a full model
    what = "model" if cfg.full else "adapter"
    print(f"{what} checkpoint saved to {final_dir}" + (f"; merged model in {final_dir / 'merged'}" if cfg.save_merged else ""))
    return {"losses": losses, "grad_norms": grad_norms, "held_out_before": before.scores if before else {},
            "held_out_after": after.scores, "held_out": (before, after), "checkpoint": final_dir}


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
