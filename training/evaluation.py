"""Held-out evaluation: mean token loss on the validation split, and a sample answer to read."""

from __future__ import annotations

from typing import Any

import torch

from tunesmith.training.batching import BatchStream
from tunesmith.training.losses import IGNORE_INDEX


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: BatchStream, loss_fn: Any, device: torch.device,
                  max_batches: int = 0) -> float:
    """Mean loss per labelled token over the held-out batches (dropout off; mode restored after).

    Args:
        model: The model (with adapters).
        batches: Held-out micro-batches, unshuffled.
        loss_fn: The training loss (summed over tokens).
        device: Where the model lives.
        max_batches: Evaluate at most this many batches; 0 means all.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = batches.per_epoch if max_batches <= 0 else min(max_batches, batches.per_epoch)
    for i in range(n):
        batch = batches[i]
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        total += float(loss_fn(model.hidden_states(tokens), labels, model.logits))
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(1, count)


def sample_answer(model: torch.nn.Module, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """Greedy answer of the model to a chat prompt (for the before/after report)."""
    from tunesmith.models.generation import generate

    was_training = model.training
    model.eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    device = next(model.parameters()).device
    out = generate(model, torch.tensor(prompt, device=device), max_new_tokens=max_new_tokens,
                   temperature=0.0, stop_ids=tokenizer.stop_ids)
    model.train(was_training)
    return tokenizer.decode(out)


def held_out_report(model: torch.nn.Module, tokenizer: Any, batches: BatchStream, dataset: Any, loss_fn: Any,
                    device: torch.device, *, when: str, max_batches: int = 0, max_new_tokens: int = 48) -> float:
    """Print ``held-out loss: X`` and one sample answer, so a user sees at once whether training helped.

    Returns:
        The held-out loss.
    """
    loss = evaluate_loss(model, batches, loss_fn, device, max_batches=max_batches)
    print(f"held-out loss: {loss:.4f} ({when} training)", flush=True)
    if max_new_tokens > 0 and len(dataset) > 0:
        messages = dataset.prompt_messages(0)
        question = messages[-1]["content"].replace("\n", " ")
        print(f"sample prompt: {question}", flush=True)
        print(f"sample answer ({when}): {sample_answer(model, tokenizer, messages, max_new_tokens)}", flush=True)
    return loss


def report_sample(model: torch.nn.Module, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int,
                  when: str) -> None:
    """Print a chat prompt's last message and the model's greedy answer to it (the before/after sample)."""
    answer = sample_answer(model, tokenizer, messages, max_new_tokens)
    print(f"sample prompt: {messages[-1]['content']}\nsample answer ({when}): {answer}", flush=True)
