"""Pieces of preference training (DPO and friends) that recipes call: data, log-probs, reference, eval.

    preference_batches(opts, tokenizer, …)    → train / held-out streams of concatenated pairs
    sequence_logprobs(hidden, labels, head)   → Σ log p(response tokens) per row, and token counts
    policy_logprobs(model, batch)             → one forward pass over chosen + rejected rows
    Reference(model, frozen_copy=…)           → reference log-probs: adapters off, a frozen copy,
                                                or a table precomputed once per dataset pass
    preference_logprobs(model, batch, ref)    → PreferenceLogProbs for the loss
    pair_metrics / evaluate_preferences       → rewards, margin, reward accuracy, log-probs
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tunesmith.training.batching import BatchStream
from tunesmith.training.config import MISSING
from tunesmith.training.losses import IGNORE_INDEX
from tunesmith.training.options import DataSource, Fraction, SeqLen
from tunesmith.training.preference_losses import PreferenceLogProbs


@dataclass
class PreferenceDataOptions:
    """Where the preference pairs come from (see ``tunesmith.data.preference`` for the layouts).

    Attributes:
        train: A local ``.json``/``.jsonl`` file, a dataset folder, or a Hub dataset repo id.
        val: Held-out pairs (same forms); when unset, ``val_fraction`` of ``train`` is held out.
        val_fraction: Share of ``train`` held out when ``val`` is unset.
        split: Which split of a Hub dataset repo ``train`` reads (UltraFeedback: ``train_prefs``).
        val_split: Which split ``val`` reads (UltraFeedback: ``test_prefs``).
        max_seq_len: Each side (prompt + answer) is cut to this many tokens; a pair whose final answer
            starts beyond it is dropped (counted in a warning at startup, see tunesmith.data.preference).
    """

    train: DataSource = MISSING
    val: DataSource | None = None
    val_fraction: Fraction = 0.1
    split: str = "train"
    val_split: str = "validation"
    max_seq_len: SeqLen = 512


def preference_batches(
    opts: PreferenceDataOptions, tokenizer: Any, batch_size: int, seed: int
) -> tuple[BatchStream, BatchStream, Any, Any]:
    """Read, split and tokenize preference pairs; batch them as concatenated chosen+rejected rows.

    Returns:
        ``(train_batches, val_batches, train_set, val_set)``; the sets are ``PreferenceDataset``s.
    """
    from tunesmith.data import load_records, split_records
    from tunesmith.data.preference import PreferenceDataset, preference_collate
    from tunesmith.training.setup import resolve_source

    train_records = load_records(resolve_source(opts.train), split=opts.split)
    if opts.val:
        val_records = load_records(resolve_source(opts.val), split=opts.val_split)
    else:
        train_records, val_records = split_records(train_records, opts.val_fraction, seed)
    train_set = PreferenceDataset(train_records, tokenizer, max_seq_len=opts.max_seq_len, source_name=opts.train)
    val_set = PreferenceDataset(val_records, tokenizer, max_seq_len=opts.max_seq_len,
                                source_name=opts.val or f"{opts.train} (held out)")
    collate = partial(preference_collate, pad_id=tokenizer.pad_id)
    train_batches = BatchStream(train_set, batch_size, collate, seed=seed, name=opts.train)
    val_batches = BatchStream(val_set, batch_size, collate, shuffle=False, drop_last=False, name=opts.val or "held-out pairs")
    return train_batches, val_batches, train_set, val_set


# ---------------------------------------------------------------------------------------------
# Log-probabilities
# ---------------------------------------------------------------------------------------------
def sequence_logprobs(hidden: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each row's labelled tokens, and how many there are.

    Only labelled positions are projected to the vocabulary (prompt and padding never are).

    Args:
        hidden: Final hidden states [r, s, d].
        labels: Shifted targets [r, s], -100 where not scored.
        head: ``model.logits`` ([..., d] → [..., v]).

    Returns:
        ``(logps [r] fp32, counts [r] fp32)``.
    """
    keep = labels != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]  # row of each labelled position, [n]
    token_logps = -F.cross_entropy(head(hidden[keep]).float(), labels[keep], reduction="none")  # [n]
    logps = torch.zeros(labels.shape[0], device=hidden.device, dtype=torch.float32).index_add(0, rows, token_logps)
    return logps, keep.sum(dim=1).float()


def policy_logprobs(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Chosen and rejected rows of a ``preference_collate`` batch through ``model`` in ONE forward pass.

    Returns:
        ``(logps [2b], counts [2b])``: chosen rows first, then rejected.
    """
    return sequence_logprobs(model.hidden_states(batch["tokens"]), batch["labels"], model.logits)




class Reference:
    """The reference model's log-probs, from wherever they are cheapest.

    * LoRA policy: the same network with its adapters disabled (``disable_adapters``), so the
      reference costs no memory. The base weights are frozen, so this IS the starting model.
    * Full-weights policy: ``frozen_copy``, a deep copy taken before training.
    * ``precompute(dataset)``: one no-grad pass over a dataset, stored as a [N, 2] table looked up by
      each batch's ``index`` (the reference never changes, so one pass serves every epoch; a
      full-weights run then needs no copy at all).

    Args:
        model: The policy (with LoRA adapters when ``frozen_copy`` is None).
        frozen_copy: A frozen copy of the starting model, for full-weights training.
    """

    def __init__(self, model: nn.Module, frozen_copy: nn.Module | None = None) -> None:
        self.model, self.frozen_copy = model, frozen_copy

    @classmethod
    def copy_of(cls, model: nn.Module) -> Reference:
        """A reference that is a frozen deep copy of ``model`` as it is now (full-weights training)."""
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        return cls(model, frozen)

    @torch.no_grad()
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Reference log-probs [2b] of a batch, computed now."""
        if self.frozen_copy is not None:
            return policy_logprobs(self.frozen_copy, batch)[0]
        from tunesmith.models.lora import disable_adapters

        with disable_adapters(self.model):
            return policy_logprobs(self.model, batch)[0]

    @torch.no_grad()
    def precompute(self, dataset: Any, collate: Callable, batch_size: int, device: torch.device) -> Tensor:
        """[len(dataset), 2] table of (chosen, rejected) reference log-probs, in dataset order."""
        table = torch.zeros(len(dataset), 2, device=device)
        for start in range(0, len(dataset), batch_size):
            idx = list(range(start, min(start + batch_size, len(dataset))))
            batch = {k: v.to(device) for k, v in collate([dataset[i] for i in idx]).items()}
            table[idx] = torch.stack(self.forward(batch).chunk(2), dim=1)
        return table

    def __call__(self, batch: dict[str, Tensor], table: Tensor | None = None) -> Tensor:
        """Reference log-probs [2b]: looked up in ``table`` when given, else computed."""
        if table is not None:
            return table[batch["index"]].T.reshape(-1)  # [b, 2] → chosen rows, then rejected rows
        return self.forward(batch)


def preference_logprobs(model: nn.Module, batch: dict[str, Tensor], reference: Reference | None,
                        table: Tensor | None = None) -> PreferenceLogProbs:
    """Policy log-probs (one forward over chosen + rejected, with grad) and reference log-probs of a batch.

    Args:
        model: The policy.
        batch: A ``preference_collate`` batch on the model's device.
        reference: Where reference log-probs come from; ``None`` for reference-free losses (zeros).
        table: Precomputed reference log-probs of the batch's dataset (``Reference.precompute``).
    """
    policy, counts = policy_logprobs(model, batch)
    ref = reference(batch, table) if reference is not None else torch.zeros_like(policy)
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    nc, nr = counts.chunk(2)
    return PreferenceLogProbs(pc, pr, rc, rr, nc.clamp(min=1), nr.clamp(min=1))


# ---------------------------------------------------------------------------------------------
# Metrics and evaluation
# ---------------------------------------------------------------------------------------------
def pair_metrics(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor,
                 logps: PreferenceLogProbs) -> dict[str, Tensor]:
    """Per-pair values [b] of what a preference run logs (average them over a step or a split).

    ``reward_acc`` counts a pair as 1 when its chosen reward is higher, 0 when lower and 0.5 on a
    tie, so an untrained LoRA policy (policy == reference: every DPO reward is 0) scores 50 %,
    chance level, rather than a misleading 0 %.
    """
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "loss": losses.detach().float(),
        "reward_acc": (c > r).float() + 0.5 * (c == r).float(),
        "margin": c - r,
        "reward_chosen": c,
        "reward_rejected": r,
        "logp_chosen": logps.policy_chosen.detach(),
        "logp_rejected": logps.policy_rejected.detach(),
        "ref_logp_chosen": logps.reference_chosen.detach(),
        "ref_logp_rejected": logps.reference_rejected.detach(),
    }


def mean_metrics(per_pair: list[dict[str, Tensor]]) -> dict[str, float]:
    """Average ``pair_metrics`` outputs over all the pairs they cover."""
    return {k: float(torch.cat([m[k] for m in per_pair]).mean()) for k in per_pair[0]}


@torch.no_grad()
def evaluate_preferences(model: nn.Module, batches: BatchStream, loss_fn: Any, reference: Reference | None,
                         device: torch.device, *, table: Tensor | None = None, max_batches: int = 0) -> dict[str, float]:
    """Mean loss, reward accuracy, margin, rewards and log-probs over the held-out pairs (dropout off).

    Args:
        model: The policy.
        batches: Held-out batches, unshuffled.
        loss_fn: The preference loss.
        reference: Where reference log-probs come from; ``None`` for reference-free losses.
        device: Where the model lives.
        table: Precomputed reference log-probs of the held-out set, if any.
        max_batches: Evaluate at most this many batches; 0 means all.
    """
    was_training = model.training
    model.eval()
    n = batches.per_epoch if max_batches <= 0 else min(max_batches, batches.per_epoch)
    per_pair = []
    for i in range(n):
        batch = {k: v.to(device) for k, v in batches[i].items()}
        logps = preference_logprobs(model, batch, reference, table)
        per_pair.append(pair_metrics(*loss_fn(logps), logps))
    model.train(was_training)
    return mean_metrics(per_pair)


def report_preferences(metrics: dict[str, float], when: str) -> None:
    """Print the held-out reward accuracy and margin, the numbers a user compares before/after."""
    print(f"held-out reward accuracy: {100 * metrics['reward_acc']:.1f}% ({when} training); "
          f"reward margin {metrics['margin']:.4f}; loss {metrics['loss']:.4f}; "
          f"log-prob chosen {metrics['logp_chosen']:.2f} / rejected {metrics['logp_rejected']:.2f}", flush=True)


def save_full_checkpoint(output_dir: str | Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                         scheduler: Any, micro_batches: int, config_yaml: str, keep_last: int = 2,
                         tokenizer_dir: str | None = None, save_merged: bool = False) -> Path:
    """Checkpoint a full-weights run: every trainable tensor + training state; the HF model in ``merged/``.

    Args:
        save_merged: Also write the whole model in the HF layout (the final checkpoint, usually).
    """
    from tunesmith.models import save_hf_checkpoint
    from tunesmith.training.checkpointing import TrainingState, rng_state, save_checkpoint

    state = TrainingState(step=step, micro_batches=micro_batches, optimizer=optimizer.state_dict(),
                          scheduler=scheduler.state_dict(), rng=rng_state())
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    writers = {"merged": lambda path: save_hf_checkpoint(model, path, tokenizer_dir=tokenizer_dir)} if save_merged else {}
    return save_checkpoint(output_dir, step, trainable=trainable, state=state, config_yaml=config_yaml,
                           extra_writers=writers, keep_last=keep_last)
