"""LoRA / QLoRA fine-tuning sharded with FSDP2, from one process to many nodes.

    torchrun: join the process group ; meta model + adapters (NF4 shells with quantize_base)
              → fully_shard per block + root → each rank reads only its rows (NF4: quantized as read)
    report held-out loss and a sample answer (before; each rank evaluates its share, rank 0 prints)
    for step in steps:
        take grad_accum_steps global micro-batches; count their labelled tokens N; each rank takes its rows
        for each micro-batch:  loss = Σ my token losses / N ;  (loss · W).backward()  (reduce-scatter)
        clip the global grad norm ; AdamW step on my adapter shards ; LR schedule step
        log (loss, lr, grad norm, tokens/s, memory) ; every eval_every: held-out loss
        every save_every: checkpoint (gathered adapters + optimizer state, the single-device format)
    report held-out loss and a sample answer (after) ; final checkpoint (+ merged/, gguf/, tensor by tensor) ; push_to_hub

The loop is ``lora_single_device``'s; the lines that differ are marked ``# FSDP``. Launch:
``tune-run lora_distributed --config llama3_1_70b --nproc-per-node 8 quantize_base=true`` (add
``--nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT`` for two nodes), ``torchrun ...
lora_distributed.py --config ...``, or without torchrun as one plain process (no FSDP), which
trains exactly like ``lora_single_device``.

Every config of ``lora_single_device`` runs here unchanged. ``batch_size`` is the GLOBAL
micro-batch: W processes each take ``batch_size / W`` of its rows, so a config gives the same
updates on any number of processes; checkpoints resume on any number of processes and in
``lora_single_device``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.models.host_memory import keep_freed_host_memory
from tunesmith.recipes import lora_single_device
from tunesmith.recipes.lora_single_device import build_loss
from tunesmith.training.checkpointing import remove_stale_temp_dirs, resume_latest, save_adapter_checkpoint
from tunesmith.training.final_outputs import push_run, run_output_writers
from tunesmith.training.config import to_dict, to_yaml
from tunesmith.training.eval_metrics import load_eval_metrics
from tunesmith.training.evaluation import HeldOutReport, evaluate_loss, held_out_report, write_held_out_report
from tunesmith.training.losses import IGNORE_INDEX
from tunesmith.training.metrics import metric_logger, peak_memory_gib
from tunesmith.training.options import ShardingOptions
from tunesmith.training.process_group import init_distributed, rank_slice, seed_everything, sum_over_ranks, teardown
from tunesmith.training.schedules import warmup_cosine
from tunesmith.training.setup import (
    activation_offloading,
    build_optimizer,
    compile_model_and_loss,
    select_dtype,
    set_attention,
    sft_batches,
    to_device,
)
from tunesmith.training.sharding import clip_grad_norm, load_for_training, sharding_options


@dataclass
class Config(ShardingOptions, lora_single_device.Config):
    """``lora_single_device``'s options (same names, types and defaults) plus FSDP2's.

    See ``lora_single_device.Config`` for the training options and ``ShardingOptions``
    (training/options.py) for ``compute_dtype``, ``reduce_dtype``, ``cpu_offload`` and
    ``reshard_after_forward``. ``batch_size`` counts the GLOBAL micro-batch (a multiple of the
    number of processes). ``optimizer`` must be ``adamw`` when sharded.
    """


def estimate_memory(cfg: Config, world_size: int = 1) -> Any:
    """Expected peak memory per rank on ``world_size`` processes (printed by ``tune-run ... --dry-run``)."""
    from tunesmith.training.memory import estimate_run_memory

    return estimate_run_memory(cfg, world_size=world_size)


def main(cfg: Config) -> dict[str, Any]:
    # ---- setup -------------------------------------------------------------------------------------
    env = init_distributed(cfg.device)  # FSDP: one process per device; a plain process without torchrun
    dtype = select_dtype(cfg.dtype, env.device)
    seed_everything(cfg.seed, env)
    output_dir = Path(cfg.output_dir)
    if env.is_main:
        remove_stale_temp_dirs(output_dir)
    eval_metrics = load_eval_metrics(cfg.eval_metric)

    # FSDP: meta model + adapters → fully_shard → each rank reads (and NF4-quantizes) only its rows
    base = load_for_training(cfg.model, cfg.tokenizer, cfg.chat_template, dtype, env, lora=cfg.lora,
                             quantize_base=cfg.quantize_base, seed=cfg.seed, **sharding_options(cfg, env))
    model, tokenizer = base.model, base.tokenizer
    model.activation_checkpointing = cfg.activation_checkpointing
    set_attention(model, cfg.attention)
    keep_freed_host_memory(env.device)  # CPU: a step's large buffers stay mapped for the next step (after loading)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}  # the adapters (my shards)

    batches, val_batches, val_set = sft_batches(cfg.data, tokenizer, cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * batches.per_epoch // cfg.grad_accum_steps
    optimizer = build_optimizer(params.values(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total_steps)
    loss_fn = build_loss(cfg.loss, cfg.loss_args)
    if cfg.compile:
        compile_model_and_loss(model, loss_fn)
    offload = activation_offloading(cfg.activation_offloading, env.device)
    step = resume_latest(output_dir, params, optimizer, scheduler, config=to_dict(cfg), env=env) if cfg.resume else 0
    logger = metric_logger(cfg, total_steps, start_step=step, main_process=env.is_main)  # FSDP: rank 0 logs

    def save(at_step: int, final: bool = False) -> Path:  # FSDP: every rank gathers, rank 0 writes
        return save_adapter_checkpoint(
            output_dir, at_step, model=model, optimizer=optimizer, scheduler=scheduler,
            micro_batches=at_step * cfg.grad_accum_steps, lora=cfg.lora, base_model=base.source,
            config_yaml=to_yaml(cfg), keep_last=cfg.keep_last, env=env,
            final_writers=run_output_writers(cfg, base, model, env=env) if final else None)  # merged/, gguf/

    def held_out(when: str) -> HeldOutReport:  # FSDP: each rank evaluates its share; rank 0 reports
        report = held_out_report(model, tokenizer, val_batches, val_set, loss_fn, env.device, eval_metrics, cfg,
                                 when=when, env=env)
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
        num_labelled = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro)  # N for the whole step
        step_loss = 0.0
        for mb in micro:
            mb = to_device(rank_slice(mb, env), env.device)  # FSDP: my rows of the global micro-batch
            with offload():  # saved activations go to CPU memory when activation_offloading is on
                hidden = model.hidden_states(mb["tokens"], positions=mb.get("positions"), document_ids=mb.get("document_ids"))
                loss = loss_fn(hidden, mb["labels"], model.logits) / max(1, num_labelled)
            (loss * env.world_size).backward()  # FSDP: gradients are averaged over ranks; × W makes it the sum
            step_loss += loss.item()
        step_loss = sum_over_ranks(step_loss, env)  # FSDP: the step's loss is the sum of every rank's part
        grad_norm = clip_grad_norm(list(params.values()), cfg.max_grad_norm)  # FSDP: the norm of all shards
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(step_loss)
        grad_norms.append(grad_norm)

        tokens_seen = sum(int(mb["lengths"].sum()) for mb in micro)  # the whole job's tokens
        logger.log(step, {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0],
                          "train/grad_norm": grad_norm, "train/tokens_per_s": logger.tokens_per_second(tokens_seen),
                          "train/peak_mem_gib": peak_memory_gib(env.device)})
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            val_loss = evaluate_loss(model, val_batches, loss_fn, env.device, max_batches=cfg.eval_batches, env=env)
            logger.log(step, {"val/loss": val_loss}, advance=False)
            logger.write(f"step {step}: held-out loss {val_loss:.4f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save(step)

    # ---- after -------------------------------------------------------------------------------------
    after = held_out("after")
    final_dir = save(step, final=True)
    push_run(cfg, final_dir, before, after, base.source, env=env)  # push_to_hub=REPO, from rank 0
    if env.is_main:
        report_file = write_held_out_report(output_dir, before, after)
        logger.close(artifacts=[final_dir / "adapter", report_file])
        print(f"adapter saved to {final_dir / 'adapter'}" + (f"; merged model in {final_dir / 'merged'}" if cfg.save_merged else ""))
    teardown(env)
    return {"losses": losses, "grad_norms": grad_norms, "held_out_before": before.scores["loss"] if before else float("nan"),
            "held_out_after": after.scores["loss"], "held_out": (before, after), "checkpoint": final_dir}


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
