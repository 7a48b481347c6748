"""Full fine-tuning (every parameter trains), sharded with FSDP2 from one process to many nodes.

    torchrun: join the process group ; load on meta → fully_shard per block + root → read own rows
    report held-out loss and eval_metric over greedy answers, with a few samples (before)
    for step in steps:
        take grad_accum_steps global micro-batches; count their labelled tokens N; each rank takes its rows
        for each micro-batch:  loss = Σ my token losses / N · W ;  backward (reduce-scatters into my shards)
        clip the global grad norm ; AdamW step on my shards ; LR schedule step
        log (loss, lr, grad norm, tokens/s, memory) ; every eval_every: held-out loss
        every save_every: sharded checkpoint (model, optimizer, schedule, RNG, data position)
    report held-out loss and eval_metric (after) ; final checkpoint + hf/, gguf/ ; push_to_hub ; before → after table

Launch: ``tune-run full_finetune_distributed --config llama3_1_8b_full --nproc-per-node 8`` (add
``--nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT`` for two nodes), or ``torchrun ...
full_finetune_distributed.py --config ...`` directly. Without torchrun it runs as one plain
process (no FSDP), which is also how the tests check that sharding changes nothing.

``batch_size`` is the GLOBAL micro-batch: W processes each take ``batch_size / W`` of its rows, so
the same config gives the same updates on any number of processes. Every micro-batch's backward
reduce-scatters its gradients, so between micro-batches each rank keeps only its 1/W of them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.models.host_memory import keep_freed_host_memory
from tunesmith.training import sharded_checkpoint
from tunesmith.training.checkpointing import remove_stale_temp_dirs
from tunesmith.training.final_outputs import push_run, run_output_writers
from tunesmith.training.config import check_keyword_args, to_dict, to_yaml
from tunesmith.training.eval_metrics import load_eval_metrics
from tunesmith.training.evaluation import HeldOutReport, evaluate_loss, held_out_report, write_held_out_report
from tunesmith.training.losses import IGNORE_INDEX, loss_class
from tunesmith.training.metrics import metric_logger, peak_memory_gib
from tunesmith.training.options import DataOptions, RunOptions, ShardingOptions
from tunesmith.training.process_group import init_distributed, rank_slice, seed_everything, sum_over_ranks, teardown
from tunesmith.training.schedules import warmup_cosine
from tunesmith.training.setup import build_optimizer, select_dtype, set_attention, sft_batches, to_device
from tunesmith.training.sharding import clip_grad_norm, load_for_training, sharding_options



@dataclass
class Config(ShardingOptions, RunOptions):
    """Options of this recipe (YAML keys and ``key=value`` overrides use these names).

    The options every recipe shares (model, output_dir, batch/schedule, evaluation, checkpoints,
    logging) come from ``RunOptions``, the FSDP2 ones (``compute_dtype``, ``reduce_dtype``,
    ``cpu_offload``, ``reshard_after_forward``) from ``ShardingOptions``, both in training/options.py;
    this recipe adds or re-defaults these.

    Attributes:
        data: Training / held-out data (see ``DataOptions``).
        loss: ``cross_entropy`` or an import path to your own loss class (see training/losses.py).
        loss_args: Keyword arguments for the loss class.
        save_merged: Write the final model in the Hugging Face layout, with its tokenizer (``step_N/hf``).
        batch_size: Examples per GLOBAL micro-batch (a multiple of the process count); each process
            takes its share, so a config gives the same updates on any number of processes.
    """

    data: DataOptions = field(default_factory=DataOptions)
    output_dir: str = "output/full"  # this recipe's default
    batch_size: int = 8  # this recipe's default
    lr: float = 2e-5  # this recipe's default
    loss: str = "cross_entropy"
    loss_args: dict[str, Any] = field(default_factory=dict)
    save_merged: bool = True  # this recipe's default; its folder is hf/

    def validate(self) -> None:
        """Rules across options, checked by ``build_config`` before anything loads (the launch's
        rules, e.g. batch_size vs the process count, are ``ShardingOptions.validate``'s)."""
        self.loss_args = check_keyword_args(loss_class(self.loss), self.loss_args, "loss_args")


def estimate_memory(cfg: Config, world_size: int = 1) -> Any:
    """Expected peak memory per rank on ``world_size`` processes (printed by ``tune-run ... --dry-run``)."""
    from tunesmith.training.memory import estimate_run_memory

    return estimate_run_memory(cfg, world_size=world_size)


def main(cfg: Config) -> dict[str, Any]:
    # ---- setup -------------------------------------------------------------------------------------
    env = init_distributed(cfg.device)
    dtype = select_dtype(cfg.dtype, env.device)
    seed_everything(cfg.seed, env)
    output_dir = Path(cfg.output_dir)
    if env.is_main:
        remove_stale_temp_dirs(output_dir)  # a save that a dead rank never finished
    eval_metrics = load_eval_metrics(cfg.eval_metric)  # before loading anything: a typo fails at once

    base = load_for_training(cfg.model, cfg.tokenizer, cfg.chat_template, dtype, env, **sharding_options(cfg, env))
    model, tokenizer = base.model, base.tokenizer
    model.activation_checkpointing = cfg.activation_checkpointing
    set_attention(model, cfg.attention)
    keep_freed_host_memory(env.device)  # CPU: a step's large buffers stay mapped for the next step (after loading)
    params = list(model.parameters())  # every parameter trains (this rank's shards of them)

    batches, val_batches, val_set = sft_batches(cfg.data, tokenizer, cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * batches.per_epoch // cfg.grad_accum_steps
    optimizer = build_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total_steps)
    loss_fn = loss_class(cfg.loss)(**cfg.loss_args)
    step = (sharded_checkpoint.resume_dcp(output_dir, model, optimizer, scheduler, env, config=to_dict(cfg))[0]
            if cfg.resume else 0)
    logger = metric_logger(cfg, total_steps, start_step=step, main_process=env.is_main)

    def save(at_step: int, final: bool = False) -> Path:
        outputs = run_output_writers(cfg, base, model, merged_folder="hf", env=env) if final else None  # hf/, gguf/
        return sharded_checkpoint.save_dcp_checkpoint(
            output_dir, at_step, model=model, optimizer=optimizer, scheduler=scheduler,
            micro_batches=at_step * cfg.grad_accum_steps, config_yaml=to_yaml(cfg), env=env,
            keep_last=cfg.keep_last, final_writers=outputs)

    def held_out(when: str) -> HeldOutReport:  # each rank evaluates its share; rank 0 reports
        report = held_out_report(model, tokenizer, val_batches, val_set, loss_fn, env.device, eval_metrics, cfg,
                                 when=when, env=env)
        logger.log(step, report.scalars(), advance=False)
        return report

    # ---- before ------------------------------------------------------------------------------------
    before = held_out("before") if step == 0 else None
    losses: list[float] = []
    grad_norms: list[float] = []  # before clipping: shows a wrong gradient scale that AdamW would hide

    # ---- training loop -----------------------------------------------------------------------------
    model.train()
    while step < total_steps:
        logger.start_step()
        micro = [batches[step * cfg.grad_accum_steps + i] for i in range(cfg.grad_accum_steps)]  # global
        num_labelled = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro)  # N for the whole step
        step_loss = 0.0
        for mb in micro:
            mb = to_device(rank_slice(mb, env), env.device)
            hidden = model.hidden_states(mb["tokens"], positions=mb.get("positions"), document_ids=mb.get("document_ids"))
            loss = loss_fn(hidden, mb["labels"], model.logits) / max(1, num_labelled)
            (loss * env.world_size).backward()  # FSDP averages over ranks; × W makes it the sum
            step_loss += loss.item()
        step_loss = sum_over_ranks(step_loss, env)
        grad_norm = clip_grad_norm(params, cfg.max_grad_norm)
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
    push_run(cfg, final_dir, before, after, base.source, merged_folder="hf", env=env)  # push_to_hub=REPO, rank 0
    if env.is_main:
        report_file = write_held_out_report(output_dir, before, after)
        logger.close(artifacts=[report_file])  # not the full model: multi-GB uploads are the user's call
        print(f"sharded checkpoint in {final_dir / 'sharded'}" + (f"; HF model in {final_dir / 'hf'}" if cfg.save_merged else ""))
    teardown(env)
    return {"losses": losses, "grad_norms": grad_norms, "held_out_before": before.scores["loss"] if before else float("nan"),
            "held_out_after": after.scores["loss"], "held_out": (before, after), "checkpoint": final_dir}


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
