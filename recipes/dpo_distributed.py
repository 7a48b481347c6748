"""Preference optimisation (DPO, IPO, SLiC hinge, robust DPO, SimPO, ORPO) sharded with FSDP2.

    torchrun: join the process group ; meta model (+ LoRA adapters, or every weight trains: full=true)
              → fully_shard per block + root → each rank reads only its rows ; tokenize pairs
    reference = the same network with adapters disabled (LoRA) | a frozen copy, sharded too (full)
                | a table computed once per dataset pass, each rank its share (precompute_reference=true)
    report held-out reward accuracy (before; each rank evaluates its share, rank 0 prints)
    for step in steps:
        for each of grad_accum_steps global micro-batches (each rank takes its pairs):
            chosen + rejected: ONE forward pass over my rows → summed response log-probs
            reference log-probs (no grad) ; loss_fn(...) → per-pair losses, rewards
            loss = Σ my pair losses / pairs in the step ; (loss · W).backward()  (reduce-scatter)
        clip the global grad norm ; AdamW step on my shards ; LR schedule step
        log (means over every rank's pairs) ; eval ; checkpoint
    report held-out reward accuracy (after) ; final checkpoint (PEFT adapter; merged/, gguf/) ; push_to_hub

The loop is ``dpo_single_device``'s; the lines that differ are marked ``# FSDP``. Launch like the
other distributed recipes: ``tune-run dpo_distributed --config my_dpo.yaml --nproc-per-node 8``,
``torchrun ... dpo_distributed.py --config ...``, or one plain process without torchrun.

Every config of ``dpo_single_device`` runs here unchanged; ``batch_size`` counts the pairs (rows
with ``data.packing``) of the GLOBAL micro-batch. LoRA checkpoints are gathered into the
single-device format (they resume on any number of processes and in ``dpo_single_device``);
``full=true`` checkpoints are sharded (``torch.distributed.checkpoint``: weights and AdamW state
for every parameter are too big to gather) and resume on any number of processes of this recipe.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.models.host_memory import keep_freed_host_memory
from tunesmith.recipes import dpo_single_device
from tunesmith.training import sharded_checkpoint
from tunesmith.training.checkpointing import remove_stale_temp_dirs, resume_latest, save_adapter_checkpoint
from tunesmith.training.final_outputs import push_run, run_output_writers
from tunesmith.training.config import to_dict, to_yaml
from tunesmith.training.eval_metrics import load_eval_metrics
from tunesmith.training.evaluation import HeldOutReport, write_held_out_report
from tunesmith.training.metrics import metric_logger, peak_memory_gib
from tunesmith.training.options import ShardingOptions
from tunesmith.training.preference import (
    build_reference,
    count_pairs,
    evaluate_preferences,
    mean_metrics,
    pair_metrics,
    pair_slice,
    preference_batches,
    preference_logprobs,
    preference_report,
)
from tunesmith.training.preference_losses import build_preference_loss
from tunesmith.training.process_group import init_distributed, seed_everything, teardown
from tunesmith.training.schedules import warmup_cosine
from tunesmith.training.setup import build_optimizer, select_dtype, set_attention, to_device
from tunesmith.training.sharding import clip_grad_norm, frozen_copy, load_for_training, sharding_options


@dataclass
class Config(ShardingOptions, dpo_single_device.Config):
    """``dpo_single_device``'s options (same names, types and defaults) plus FSDP2's.

    See ``dpo_single_device.Config`` for the training options and ``ShardingOptions``
    (training/options.py) for ``compute_dtype``, ``reduce_dtype``, ``cpu_offload`` and
    ``reshard_after_forward``. ``batch_size`` counts the GLOBAL micro-batch (a multiple of the
    number of processes). ``optimizer`` must be ``adamw`` when sharded.
    """


def estimate_memory(cfg: Config, world_size: int = 1) -> Any:
    """Expected peak memory per rank on ``world_size`` processes (printed by ``tune-run ... --dry-run``)."""
    from tunesmith.training.memory import estimate_preference_memory

    return estimate_preference_memory(cfg, world_size=world_size)


def main(cfg: Config) -> dict[str, Any]:
    # ---- setup -------------------------------------------------------------------------------------
    env = init_distributed(cfg.device)  # FSDP: one process per device; a plain process without torchrun
    dtype = select_dtype(cfg.dtype, env.device)
    seed_everything(cfg.seed, env)
    output_dir = Path(cfg.output_dir)
    if env.is_main:
        remove_stale_temp_dirs(output_dir)
    eval_metrics = load_eval_metrics(cfg.eval_metric)

    # FSDP: meta model (+ adapters) → fully_shard → each rank reads only its rows
    shard = sharding_options(cfg, env)
    base = load_for_training(cfg.model, cfg.tokenizer, cfg.chat_template, dtype, env,
                             lora=None if cfg.full else cfg.lora, seed=cfg.seed, **shard)
    model, tokenizer = base.model, base.tokenizer
    model.activation_checkpointing = cfg.activation_checkpointing
    set_attention(model, cfg.attention)
    keep_freed_host_memory(env.device)  # CPU: a step's large buffers stay mapped for the next step (after loading)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}  # my shards of them

    batches, val_batches, train_set, val_set = preference_batches(cfg.data, tokenizer, cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * batches.per_epoch // cfg.grad_accum_steps
    optimizer = build_optimizer(params.values(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total_steps)
    loss_fn = build_preference_loss(cfg.loss, cfg.loss_args)

    # The reference is fixed at the starting weights, so it is built before any resume loads trained ones.
    # FSDP: a frozen copy is a second sharded load (1/W of it per rank); each rank precomputes its share.
    reference, train_table, val_table = build_reference(
        model, loss_fn, full=cfg.full, precompute=cfg.precompute_reference, train_set=train_set, val_set=val_set,
        collate=val_batches.collate, batch_size=cfg.batch_size, device=env.device,
        frozen_copy=lambda: frozen_copy(model, base.source, dtype, env, **shard), env=env)
    if cfg.resume:
        step = (sharded_checkpoint.resume_dcp(output_dir, model, optimizer, scheduler, env, config=to_dict(cfg))[0]
                if cfg.full else resume_latest(output_dir, params, optimizer, scheduler, config=to_dict(cfg), env=env))
    else:
        step = 0
    logger = metric_logger(cfg, total_steps, start_step=step, main_process=env.is_main)  # FSDP: rank 0 logs

    def save(at_step: int, final: bool = False) -> Path:  # FSDP: full weights sharded (DCP), adapters gathered
        common = dict(model=model, optimizer=optimizer, scheduler=scheduler, micro_batches=at_step * cfg.grad_accum_steps,
                      config_yaml=to_yaml(cfg), keep_last=cfg.keep_last, env=env,
                      final_writers=run_output_writers(cfg, base, model, env=env) if final else None)  # merged/, gguf/
        if cfg.full:
            return sharded_checkpoint.save_dcp_checkpoint(output_dir, at_step, **common)
        return save_adapter_checkpoint(output_dir, at_step, lora=cfg.lora, base_model=base.source, **common)

    def held_out(when: str) -> HeldOutReport:  # FSDP: each rank evaluates its share; rank 0 reports
        report = preference_report(model, tokenizer, val_batches, val_set, loss_fn, reference, env.device, eval_metrics,
                                   cfg, when=when, table=val_table, env=env)
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
        micro = [batches[step * cfg.grad_accum_steps + i] for i in range(cfg.grad_accum_steps)]  # global
        num_pairs = sum(count_pairs(mb) for mb in micro)  # the step's loss is the mean over all its pairs
        per_pair = []
        for mb in micro:
            mb = to_device(pair_slice(mb, env), env.device)  # FSDP: my pairs of the global micro-batch
            logps = preference_logprobs(model, mb, reference, train_table)  # chosen + rejected in one pass
            pair_losses, chosen_rewards, rejected_rewards = loss_fn(logps)
            (pair_losses.sum() / num_pairs * env.world_size).backward()  # FSDP: × W undoes the mean over ranks
            per_pair.append(pair_metrics(pair_losses, chosen_rewards, rejected_rewards, logps))
        grad_norm = clip_grad_norm(list(params.values()), cfg.max_grad_norm)  # FSDP: the norm of all shards
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        m = mean_metrics(per_pair, env)  # FSDP: means over every rank's pairs
        losses.append(m["loss"])
        grad_norms.append(grad_norm)
        tokens_seen = sum(int(mb["lengths"].sum()) for mb in micro)  # the whole job's tokens
        logger.log(step, {
            "train/loss": m["loss"], "train/reward_acc": m["reward_acc"], "train/margin": m["margin"],
            "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
            "train/tokens_per_s": logger.tokens_per_second(tokens_seen), "train/peak_mem_gib": peak_memory_gib(env.device),
            "rewards/chosen": m["reward_chosen"], "rewards/rejected": m["reward_rejected"],
            "logps/policy_chosen": m["logp_chosen"], "logps/policy_rejected": m["logp_rejected"],
            "logps/reference_chosen": m["ref_logp_chosen"], "logps/reference_rejected": m["ref_logp_rejected"],
        })
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            val = evaluate_preferences(model, val_batches, loss_fn, reference, env.device, table=val_table,
                                       max_batches=cfg.eval_batches, env=env)
            logger.log(step, {f"val/{k}": v for k, v in val.items()}, advance=False)
            logger.write(f"step {step}: held-out reward accuracy {100 * val['reward_acc']:.1f}%, margin {val['margin']:.3f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save(step)

    # ---- after -------------------------------------------------------------------------------------
    after = held_out("after")
    final_dir = save(step, final=True)
    push_run(cfg, final_dir, before, after, base.source, env=env)  # push_to_hub=REPO, from rank 0
    if env.is_main:
        report_file = write_held_out_report(output_dir, before, after)
        logger.close(artifacts=[report_file] + ([] if cfg.full else [final_dir / "adapter"]))  # not a full model
        what = "model" if cfg.full else "adapter"
        print(f"{what} checkpoint saved to {final_dir}" + (f"; merged model in {final_dir / 'merged'}" if cfg.save_merged else ""))
    teardown(env)
    return {"losses": losses, "grad_norms": grad_norms, "held_out_before": before.scores if before else {},
            "held_out_after": after.scores, "held_out": (before, after), "checkpoint": final_dir}


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
