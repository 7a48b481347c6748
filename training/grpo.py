"""Pieces of online RL with group sampling (GRPO and friends) that the recipe's loop calls.

    prompt_batches(opts, tokenizer, …)        → a resumable stream of prompt batches, held-out prompts
    sample_groups(model, tokenizer, items, …) → G completions per prompt (batched, KV cache)
    score_groups(reward_fns, groups, …)       → rewards [p, G, k] for k reward functions
    rollout_batch(groups, advantages, pad_id) → prompt + completion rows for the policy update
    completion_logprobs(model, batch)         → log π(o_t) of every completion token [r, t]
    evaluate_rewards / report_rewards         → held-out mean reward of greedy answers
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from tunesmith.training.batching import BatchStream
from tunesmith.training.config import MISSING, PositiveInt
from tunesmith.training.losses import IGNORE_INDEX, token_logprobs
from tunesmith.training.options import DataSource, Fraction


@dataclass
class PromptDataOptions:
    """Where the prompts come from (see ``tunesmith.data.prompts`` for the record layout).

    Attributes:
        train: A local ``.json``/``.jsonl``/``.parquet`` file, a dataset folder, or a Hub dataset id.
        val: Held-out prompts (same forms); when unset, ``val_fraction`` of ``train`` is held out.
        val_fraction: Share of ``train`` held out when ``val`` is unset.
        split: Which split of a Hub dataset repo ``train`` reads.
        val_split: Which split ``val`` reads.
        prompt_field: The records' prompt column (a string or a list of chat messages); every
            other column is passed to the reward functions.
        max_prompt_len: Longest prompt in tokens (a longer one is an error naming its record).
    """

    train: DataSource = MISSING
    val: DataSource | None = None
    val_fraction: Fraction = 0.1
    split: str = "train"
    val_split: str = "validation"
    prompt_field: str = "prompt"
    max_prompt_len: PositiveInt = 512


def prompt_batches(opts: PromptDataOptions, tokenizer: Any, batch_size: int, seed: int) -> tuple[BatchStream, Any]:
    """Read, split and tokenize the prompts.

    Returns:
        ``(train_batches, val_set)``: ``train_batches[i]`` is the i-th batch of the run, a list of
        ``batch_size`` prompt items (reshuffled every epoch, a pure function of ``i``); ``val_set`` a
        ``PromptDataset``.
    """
    from tunesmith.data.prompts import PromptDataset
    from tunesmith.training.setup import read_train_val

    train_records, val_records = read_train_val(opts, seed)

    def build(records: Any, source: str) -> PromptDataset:
        return PromptDataset(records, tokenizer, prompt_field=opts.prompt_field, max_prompt_len=opts.max_prompt_len,
                             source_name=source)

    train_set = build(train_records, opts.train)
    val_set = build(val_records, opts.val or f"{opts.train} (held out)")
    return BatchStream(train_set, batch_size, collate=list, seed=seed), val_set


# ---------------------------------------------------------------------------------------------
# Sampling and scoring
# ---------------------------------------------------------------------------------------------
@dataclass
class Group:
    """The completions sampled for one prompt.

    Attributes:
        item: The prompt item (``prompt_ids``, ``prompt``, ``fields``).
        completions: Token ids of each completion; one that finished ends with its stop token.
        texts: Each completion decoded (special tokens dropped): what reward functions score.
    """

    item: dict
    completions: list[list[int]]
    texts: list[str]


def sample_groups(model: nn.Module, tokenizer: Any, items: Sequence[dict], num_generations: int, *,
                  max_new_tokens: int, temperature: float, top_p: float) -> list[Group]:
    """``num_generations`` completions for every prompt item, one batched decode per prompt.

    Draws come from the global torch RNG, whose state every checkpoint saves, so a resumed run
    samples what the uninterrupted run would have.
    """
    from tunesmith.models.generation import sample_completions

    groups = []
    for item in items:
        completions = sample_completions(model, item["prompt_ids"], num_samples=num_generations,
                                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                         stop_ids=tokenizer.stop_ids)
        groups.append(Group(item, completions, [tokenizer.decode(c) for c in completions]))
    return groups


def score_groups(reward_fns: Sequence[Callable[..., list[float]]], groups: Sequence[Group],
                 field_names: set[str]) -> Tensor:
    """Rewards [p, G, k] of every completion (p prompts, G completions each, k functions).

    All completions of the batch are scored in one call per function; each record's ``fields``
    named in ``field_names`` are repeated once per completion of its group.
    """
    from tunesmith.training.rewards import score

    size = len(groups[0].texts)
    prompts = [g.item["prompt"] for g in groups for _ in g.texts]
    completions = [t for g in groups for t in g.texts]
    fields = {name: [g.item["fields"][name] for g in groups for _ in g.texts] for name in sorted(field_names)}
    return score(reward_fns, prompts, completions, fields).view(len(groups), size, -1)


def rollout_batch(groups: Sequence[Group], advantages: Tensor, pad_id: int) -> dict[str, Tensor]:
    """The completions of ``groups`` as training rows: prompt + completion, right-padded.

    Args:
        groups: p groups of G completions each.
        advantages: [p, G] advantages.
        pad_id: Padding token id (padding carries no label).

    Returns:
        ``tokens`` [r, s] (r = p·G), ``labels`` [r, s] (the next token at completion positions,
        -100 elsewhere: only completion tokens are scored), ``mask`` [r, t] (1.0 on the first
        ``|o_i|`` entries: the layout of every [r, t] log-prob tensor), ``advantages`` [r] and
        ``lengths`` [r] (prompt + completion tokens of each row).
    """
    rows, labels, lengths = [], [], []
    for g in groups:
        prompt = g.item["prompt_ids"]
        for completion in g.completions:
            rows.append(prompt + completion)
            labels.append([IGNORE_INDEX] * (len(prompt) - 1) + completion + [IGNORE_INDEX])
            lengths.append(len(completion))
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (r, y) in enumerate(zip(rows, labels)):
        tokens[i, :len(r)], targets[i, :len(y)] = torch.tensor(r), torch.tensor(y)
    completion_lengths = torch.tensor(lengths)
    mask = (torch.arange(max(1, max(lengths)))[None, :] < completion_lengths[:, None]).float()
    return {"tokens": tokens, "labels": targets, "mask": mask, "advantages": advantages.reshape(-1).float(),
            "lengths": torch.tensor([len(r) for r in rows])}


# ---------------------------------------------------------------------------------------------
# Log-probabilities
# ---------------------------------------------------------------------------------------------
def completion_logprobs(model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 1024) -> Tensor:
    """log π(o_t | q, o_<t) of every completion token of a ``rollout_batch``, laid out as ``mask`` [r, t] (0 on padding)."""
    flat = token_logprobs(model.hidden_states(batch["tokens"]), batch["labels"], model.logits, chunk_size)
    mask = batch["mask"] > 0
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)


# ---------------------------------------------------------------------------------------------
# Held-out evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_rewards(model: nn.Module, tokenizer: Any, val_set: Any, reward_fns: Sequence[Callable[..., list[float]]],
                     weights: Tensor, names: Sequence[str], *, max_prompts: int, max_new_tokens: int,
                     eval_metrics: dict[str, Callable[..., list[float]]] | None = None) -> dict[str, Any]:
    """Mean reward of the greedy answer to each held-out prompt, in total and per function.

    Args:
        max_prompts: Evaluate the first this many prompts (0: all).
        eval_metrics: More scores of the same answers (``eval_metric``; the same contract as a reward).

    Returns:
        ``{"reward": weighted total, "<name>": each function's (and eval metric's) mean, "samples":
        [(prompt, answer), …] for every prompt}``.
    """
    items = [val_set[i] for i in range(len(val_set) if max_prompts <= 0 else min(max_prompts, len(val_set)))]
    groups = sample_groups(model, tokenizer, items, 1, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0)
    rewards = score_groups(reward_fns, groups, val_set.field_names)[:, 0]  # [p, k]
    out: dict[str, Any] = {"reward": float((rewards @ weights).mean())}
    out.update({name: float(rewards[:, j].mean()) for j, name in enumerate(names)})
    if eval_metrics:
        scores = score_groups(list(eval_metrics.values()), groups, val_set.field_names)[:, 0]
        out.update({name: float(scores[:, j].mean()) for j, name in enumerate(eval_metrics)})
    out["samples"] = [(item["messages"][-1]["content"], group.texts[0]) for item, group in zip(items, groups)]
    return out


def report_rewards(metrics: dict[str, Any], when: str, show_samples: int) -> None:
    """Print ``held-out reward: X`` (and every other score's mean) and the first ``show_samples`` greedy answers."""
    parts = ", ".join(f"{name} {value:.3f}" for name, value in metrics.items() if name not in ("reward", "samples"))
    print(f"held-out reward: {metrics['reward']:.3f} ({when} training); {parts}", flush=True)
    for prompt, answer in metrics["samples"][:show_samples]:
        print(f"sample prompt: {prompt}\nsample answer ({when}): {answer}", flush=True)
