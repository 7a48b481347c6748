"""Pieces of preference training (DPO and friends) that recipes call: data, log-probs, reference, eval.

    preference_batches(opts, tokenizer, …)    → train / held-out streams of concatenated (or packed) pairs
    sequence_logprobs(hidden, labels, head)   → Σ log p(response tokens) per response, and token counts
    policy_logprobs(model, batch)             → one forward pass over chosen + rejected rows
    pair_slice / eval_pair_slice              → a process's pairs of a batch (FSDP)
    Reference(model, frozen_copy=…)           → reference log-probs: adapters off, a frozen copy,
                                                or a table precomputed once per dataset pass
    preference_logprobs(model, batch, ref)    → PreferenceLogProbs for the loss
    pair_metrics / evaluate_preferences       → rewards, margin, reward accuracy, log-probs
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from tunesmith.training.batching import BatchStream
from tunesmith.training.config import MISSING
from tunesmith.training.losses import IGNORE_INDEX, token_logprobs
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
        packing: Pack whole training pairs into rows of 2 × ``max_seq_len`` tokens (both sides of a
            pair in one row, per-response attention and positions, log-probs summed per response);
            ``batch_size`` then counts rows. Faster on short pairs; held-out pairs stay unpacked.
    """

    train: DataSource = MISSING
    val: DataSource | None = None
    val_fraction: Fraction = 0.1
    split: str = "train"
    val_split: str = "validation"
    max_seq_len: SeqLen = 512
    packing: bool = False


def preference_batches(
    opts: PreferenceDataOptions, tokenizer: Any, batch_size: int, seed: int
) -> tuple[BatchStream, BatchStream, Any, Any]:
    """Read, split and tokenize preference pairs; batch them as concatenated chosen+rejected rows.

    With ``opts.packing`` the training pairs are packed into rows (``pack_pairs``) and a
    micro-batch is ``batch_size`` such rows; held-out pairs stay one side per row.

    Returns:
        ``(train_batches, val_batches, train_set, val_set)``; the sets are ``PreferenceDataset``s.
    """
    from tunesmith.data import load_records, split_records
    from tunesmith.data.preference import PreferenceDataset, pack_pairs, packed_pairs_collate, preference_collate
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
    if opts.packing:
        rows = pack_pairs(train_set.items, 2 * opts.max_seq_len)
        train_batches = BatchStream(rows, batch_size, partial(packed_pairs_collate, pad_id=tokenizer.pad_id), seed=seed,
                                    name=opts.train)
    else:
        train_batches = BatchStream(train_set, batch_size, collate, seed=seed, name=opts.train)
    val_batches = BatchStream(val_set, batch_size, collate, shuffle=False, drop_last=False, name=opts.val or "held-out pairs")
    return train_batches, val_batches, train_set, val_set


# ---------------------------------------------------------------------------------------------
# Batches: plain (chosen rows, then rejected rows) or packed (whole pairs per row)
# ---------------------------------------------------------------------------------------------
def pair_index(batch: dict[str, Tensor]) -> Tensor:
    """Dataset index of each pair in the batch [p], in the order its log-probs come out."""
    if "pairs" in batch:
        return batch["pairs"][batch["pairs"] >= 0]  # row by row, slot by slot
    return batch["index"]


def count_pairs(batch: dict[str, Tensor]) -> int:
    return int((batch["pairs"] >= 0).sum()) if "pairs" in batch else len(batch["index"])


def response_slots(batch: dict[str, Tensor]) -> Tensor | None:
    """For a packed batch, which response [r, s] each position belongs to: chosen of pair p is
    slot p, rejected is P + p (P pairs, in ``pair_index`` order), so the sums come out as a plain
    batch's rows do. ``None`` for a plain batch (one response per row)."""
    if "pairs" not in batch:
        return None
    first = torch.cumsum((batch["pairs"] >= 0).sum(dim=1), 0) - (batch["pairs"] >= 0).sum(dim=1)  # [r]
    doc = batch["document_ids"]
    return (doc % 2) * count_pairs(batch) + first[:, None] + doc // 2


def pair_slice(batch: dict[str, Tensor], env: Any) -> dict[str, Tensor]:
    """This rank's share of a global training micro-batch: its pairs (plain) or its rows (packed).

    Raises:
        ConfigError: the micro-batch does not split evenly over the processes.
    """
    from tunesmith.training.config import ConfigError
    from tunesmith.training.process_group import rank_slice

    if "pairs" in batch:
        return rank_slice(batch, env)
    pairs = len(batch["index"])
    if pairs % env.world_size:
        raise ConfigError(f"batch_size={pairs} must be a multiple of the number of processes ({env.world_size})")
    per = pairs // env.world_size
    return _pairs(batch, env.rank * per, (env.rank + 1) * per)


def _pairs(batch: dict[str, Tensor], start: int, end: int) -> dict[str, Tensor]:
    """Pairs [start, end) of a plain batch: their chosen rows, then their rejected rows."""
    b = len(batch["index"])
    rows = torch.cat([torch.arange(start, end), torch.arange(b + start, b + end)])
    return {k: (v[start:end] if k == "index" else v[rows]) for k, v in batch.items()}


def eval_pair_slice(batch: dict[str, Tensor], env: Any) -> tuple[dict[str, Tensor], bool]:
    """This rank's share of a held-out plain batch of any size, and whether it holds real pairs.

    A rank left without pairs runs the batch's first pair, since under FSDP every rank must join
    every forward pass; the caller leaves its numbers out (``False``).
    """
    from tunesmith.training.process_group import row_range

    start, end = row_range(len(batch["index"]), env)
    return (_pairs(batch, start, end), True) if end > start else (_pairs(batch, 0, 1), False)


# ---------------------------------------------------------------------------------------------
# Log-probabilities
# ---------------------------------------------------------------------------------------------
LOGPROB_CHUNK_SIZE = 256  # labelled positions projected to the vocabulary at once


def sequence_logprobs(hidden: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor],
                      slots: Tensor | None = None, num_slots: int = 0,
                      chunk_size: int = LOGPROB_CHUNK_SIZE) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each response's labelled tokens, and how many there are.

    Only labelled positions are projected to the vocabulary (prompt and padding never are), and
    only ``chunk_size`` of them at a time (``losses.token_logprobs``): no [n, v] logits for the
    whole batch, in the policy's pass (a frozen LoRA head keeps a [n, d] gradient instead) or the
    reference's.

    Args:
        hidden: Final hidden states [r, s, d].
        labels: Shifted targets [r, s], -100 where not scored.
        head: ``model.logits`` ([..., d] → [..., v]).
        slots: Which response each position belongs to [r, s] (packed rows, ``response_slots``);
            ``None``: each row is one response.
        num_slots: Number of responses when ``slots`` is given.
        chunk_size: Labelled positions per projection; 0 projects them all at once.

    Returns:
        ``(logps [responses] fp32, counts [responses] fp32)``.
    """
    keep = labels != IGNORE_INDEX
    where = keep.nonzero()[:, 0] if slots is None else slots[keep]  # response of each labelled position, [n]
    size = labels.shape[0] if slots is None else num_slots
    token_logps = token_logprobs(hidden, labels, head, chunk_size)  # [n], row-major like ``where``
    logps = torch.zeros(size, device=hidden.device, dtype=torch.float32).index_add(0, where, token_logps)
    counts = torch.zeros(size, device=hidden.device, dtype=torch.float32).index_add(0, where, torch.ones_like(token_logps))
    return logps, counts


def policy_logprobs(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Chosen and rejected responses of a batch through ``model`` in ONE forward pass.

    Packed batches pass their positions and document ids (per-response attention).

    Returns:
        ``(logps [2p], counts [2p])``: chosen first, then rejected, pairs in ``pair_index`` order.
    """
    hidden = model.hidden_states(batch["tokens"], positions=batch.get("positions"), document_ids=batch.get("document_ids"))
    return sequence_logprobs(hidden, batch["labels"], model.logits, response_slots(batch), 2 * count_pairs(batch))




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

    @torch.no_grad()
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Reference log-probs [2b] of a batch, computed now."""
        if self.frozen_copy is not None:
            return policy_logprobs(self.frozen_copy, batch)[0]
        from tunesmith.models.lora import disable_adapters

        with disable_adapters(self.model):
            return policy_logprobs(self.model, batch)[0]

    @torch.no_grad()
    def precompute(self, dataset: Any, collate: Callable, batch_size: int, device: torch.device,
                   env: Any = None) -> Tensor:
        """[len(dataset), 2] table of (chosen, rejected) reference log-probs, in dataset order.

        Args:
            env: A distributed run's process group: each rank computes its share of every chunk
                and the table is summed over ranks (every rank gets the whole table).
        """
        from tunesmith.training.process_group import sum_tensor_over_ranks

        table = torch.zeros(len(dataset), 2, device=device)
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            real = True
            if env is not None:
                batch, real = eval_pair_slice(batch, env)
            batch = {k: v.to(device) for k, v in batch.items()}
            logps = torch.stack(self.forward(batch).chunk(2), dim=1)  # [b, 2]
            if real:
                table[batch["index"]] = logps
        return table if env is None else sum_tensor_over_ranks(table, env)

    def __call__(self, batch: dict[str, Tensor], table: Tensor | None = None) -> Tensor:
        """Reference log-probs [2p]: looked up in ``table`` when given, else computed."""
        if table is not None:
            return table[pair_index(batch)].T.reshape(-1)  # [p, 2] → chosen, then rejected
        return self.forward(batch)


def build_reference(model: nn.Module, loss_fn: Any, *, full: bool, precompute: bool, train_set: Any, val_set: Any,
                    collate: Callable, batch_size: int, device: torch.device,
                    frozen_copy: Callable[[], nn.Module] = lambda: None, env: Any = None,
                    ) -> tuple[Reference | None, Tensor | None, Tensor | None]:
    """DPO's reference, and with ``precompute`` its tables for the training and held-out pairs.

    Build it before any resume loads trained weights: the reference is the starting model.

    Args:
        model: The policy, untrained.
        loss_fn: The preference loss; one with ``needs_reference = False`` gets no reference.
        full: Every weight trains: the reference is ``frozen_copy()`` (unless precomputed), not
            the policy with its adapters switched off.
        precompute: One pass over each set now, instead of a reference forward per step.
        collate: Batches pairs one side per row (the held-out stream's collate).
        frozen_copy: Makes a frozen copy of the starting model (a deep copy; a second sharded
            load under FSDP).
        env: A distributed run's process group (each rank computes its share of the tables).

    Returns:
        ``(reference or None, train table or None, held-out table or None)``.
    """
    if not getattr(loss_fn, "needs_reference", True):
        return None, None, None
    reference = Reference(model, frozen_copy() if full and not precompute else None)
    if not precompute:
        return reference, None, None
    return (reference, reference.precompute(train_set, collate, batch_size, device, env),
            reference.precompute(val_set, collate, batch_size, device, env))


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


def mean_metrics(per_pair: list[dict[str, Tensor]], env: Any = None) -> dict[str, float]:
    """Average ``pair_metrics`` outputs over all the pairs they cover (on every rank, with ``env``)."""
    from tunesmith.training.process_group import sum_tensor_over_ranks

    keys = list(per_pair[0])
    values = {k: torch.cat([m[k] for m in per_pair]).double() for k in keys}
    sums = torch.stack([values[k].sum() for k in keys] + [torch.tensor(float(len(values[keys[0]])), dtype=torch.float64,
                                                                        device=values[keys[0]].device)])
    if env is not None:
        sums = sum_tensor_over_ranks(sums, env)
    return {k: float(sums[i] / sums[-1].clamp(min=1)) for i, k in enumerate(keys)}


@torch.no_grad()
def evaluate_preferences(model: nn.Module, batches: BatchStream, loss_fn: Any, reference: Reference | None,
                         device: torch.device, *, table: Tensor | None = None, max_batches: int = 0,
                         env: Any = None) -> dict[str, float]:
    """Mean loss, reward accuracy, margin, rewards and log-probs over the held-out pairs (dropout off).

    Args:
        model: The policy.
        batches: Held-out batches, unshuffled.
        loss_fn: The preference loss.
        reference: Where reference log-probs come from; ``None`` for reference-free losses.
        device: Where the model lives.
        table: Precomputed reference log-probs of the held-out set, if any.
        max_batches: Evaluate at most this many batches; 0 means all.
        env: A distributed run's process group: each rank evaluates its share of every batch.
    """
    was_training = model.training
    model.eval()
    n = batches.per_epoch if max_batches <= 0 else min(max_batches, batches.per_epoch)
    per_pair = []
    for i in range(n):
        batch, real = (batches[i], True) if env is None else eval_pair_slice(batches[i], env)
        batch = {k: v.to(device) for k, v in batch.items()}
        logps = preference_logprobs(model, batch, reference, table)
        metrics = pair_metrics(*loss_fn(logps), logps)
        per_pair.append(metrics if real else {k: v[:0] for k, v in metrics.items()})
    model.train(was_training)
    return mean_metrics(per_pair, env)


def report_preferences(metrics: dict[str, float], when: str) -> None:
    """Print the held-out reward accuracy and margin, the numbers a user compares before/after."""
    print(f"held-out reward accuracy: {100 * metrics['reward_acc']:.1f}% ({when} training); "
          f"reward margin {metrics['margin']:.4f}; loss {metrics['loss']:.4f}; "
          f"log-prob chosen {metrics['logp_chosen']:.2f} / rejected {metrics['logp_rejected']:.2f}", flush=True)


def preference_report(model: nn.Module, tokenizer: Any, batches: BatchStream, dataset: Any, loss_fn: Any,
                      reference: Reference | None, device: torch.device, metrics: dict[str, Any], run: Any, *,
                      when: str, table: Tensor | None = None, env: Any = None) -> Any:
    """Evaluate the held-out pairs (reward accuracy, margin, loss) and, like every recipe's report,
    answer held-out prompts greedily and score the answers against the chosen ones.

    Args:
        metrics: ``{name: fn}`` (``load_eval_metrics(cfg.eval_metric)``).
        run: The recipe's options (``eval_batches``; the answers' options, see ``answer_held_out``).
        env: A distributed run's process group: every rank evaluates its share and joins the
            answers' forward passes; rank 0 prints.

    Returns:
        A ``HeldOutReport`` whose scores are ``evaluate_preferences``'s metrics and the eval metrics.
    """
    from contextlib import nullcontext

    from tunesmith.training.evaluation import HeldOutReport, answer_held_out
    from tunesmith.training.process_group import main_rank_prints

    with main_rank_prints(env) if env is not None else nullcontext():
        scores = evaluate_preferences(model, batches, loss_fn, reference, device, table=table,
                                      max_batches=run.eval_batches, env=env)
        report_preferences(scores, when)
        report = HeldOutReport(when, scores=scores, percent=["reward_acc"])
        if run.sample_max_new_tokens > 0:
            answer_held_out(model, tokenizer, dataset, metrics, report, run, env)
    return report


def save_full_checkpoint(output_dir: str | Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                         scheduler: Any, micro_batches: int, config_yaml: str, keep_last: int = 2,
                         final_writers: dict[str, Any] | None = None) -> Path:
    """Checkpoint a full-weights run: every trainable tensor + training state (+ the serving outputs).

    Args:
        final_writers: The final checkpoint's ``merged/`` and ``gguf/`` writers
            (``final_outputs.run_output_writers``).
    """
    from tunesmith.training.checkpointing import TrainingState, rng_state, save_checkpoint

    state = TrainingState(step=step, micro_batches=micro_batches, optimizer=optimizer.state_dict(),
                          scheduler=scheduler.state_dict(), rng=rng_state())
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return save_checkpoint(output_dir, step, trainable=trainable, state=state, config_yaml=config_yaml,
                           keep_last=keep_last, collective_writers=final_writers)
