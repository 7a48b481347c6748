"""Held-out evaluation: mean token loss on the validation split, and a sample answer to read.

Distributed runs pass their ``env``: each rank evaluates its share of every held-out batch and the
loss sums and label counts are added over ranks, so the set is evaluated once, not once per rank;
the sample answer is generated in lockstep (every rank runs every forward of the sharded model)
and printed by rank 0.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from tunesmith.training.batching import BatchStream
from tunesmith.training.losses import IGNORE_INDEX
from tunesmith.training.process_group import DistEnv, agree_on, eval_slice, main_rank_prints, sum_tensor_over_ranks


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: BatchStream, loss_fn: Any, device: torch.device,
                  max_batches: int = 0, env: DistEnv | None = None) -> float:
    """Mean loss per labelled token over the held-out batches (dropout off; mode restored after).

    Args:
        model: The model (with adapters).
        batches: Held-out micro-batches, unshuffled.
        loss_fn: The training loss (summed over tokens).
        device: Where the model lives.
        max_batches: Evaluate at most this many batches; 0 means all.
        env: A distributed run's process group: each rank takes its share of every batch.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = batches.per_epoch if max_batches <= 0 else min(max_batches, batches.per_epoch)
    for i in range(n):
        batch = batches[i] if env is None else eval_slice(batches[i], env)
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        total += float(loss_fn(model.hidden_states(tokens), labels, model.logits))
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    if env is not None:
        total, count = sum_tensor_over_ranks(torch.tensor([total, count], dtype=torch.float64), env).tolist()
    return total / max(1, count)


def sample_answer(model: torch.nn.Module, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int,
                  env: DistEnv | None = None) -> str:
    """Greedy answer of the model to a chat prompt (for the before/after report).

    With a sharded ``env`` every rank generates in lockstep, continuing with rank 0's token, and
    without the KV cache: FSDP gathers the weights in the compute dtype, which the cache (made in
    the stored dtype) would not match, and gathering every weight for each new token costs more
    than re-reading the short prompt anyway.
    """
    from tunesmith.models.generation import generate

    sharded = env is not None and env.sharded
    was_training = model.training
    model.eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    device = next(model.parameters()).device
    out = generate(model, torch.tensor(prompt, device=device), max_new_tokens=max_new_tokens,
                   temperature=0.0, stop_ids=tokenizer.stop_ids, use_cache=not sharded,
                   agree=(lambda token: agree_on(token, env)) if sharded else None)
    model.train(was_training)
    return tokenizer.decode(out)


def held_out_report(model: torch.nn.Module, tokenizer: Any, batches: BatchStream, dataset: Any, loss_fn: Any,
                    device: torch.device, *, when: str, max_batches: int = 0, max_new_tokens: int = 48,
                    env: DistEnv | None = None) -> float:
    """Print ``held-out loss: X`` and one sample answer, so a user sees at once whether training helped.

    Args:
        env: A distributed run's process group (every rank calls this; rank 0 prints).

    Returns:
        The held-out loss.
    """
    with main_rank_prints(env) if env is not None else nullcontext():
        loss = evaluate_loss(model, batches, loss_fn, device, max_batches=max_batches, env=env)
        print(f"held-out loss: {loss:.4f} ({when} training)", flush=True)
        messages = dataset.prompt_messages(0) if len(dataset) > 0 else []
        if max_new_tokens > 0 and messages:  # plain text (format=text) has no prompt to answer
            question = messages[-1]["content"].replace("\n", " ")
            print(f"sample prompt: {question}", flush=True)
            print(f"sample answer ({when}): {sample_answer(model, tokenizer, messages, max_new_tokens, env)}", flush=True)
    return loss


def report_sample(model: torch.nn.Module, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int,
                  when: str) -> None:
    """Print a chat prompt's last message and the model's greedy answer to it (the before/after sample)."""
    answer = sample_answer(model, tokenizer, messages, max_new_tokens)
    print(f"sample prompt: {messages[-1]['content']}\nsample answer ({when}): {answer}", flush=True)
