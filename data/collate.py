"""Batching unpacked examples: right-pad to the longest sequence in the batch."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label value the loss skips (PyTorch cross_entropy's default ignore_index)


def pad_collate(items: list[dict], pad_id: int, ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Stack ``{"tokens", "labels"}`` items into right-padded tensors.

    Args:
        items: Examples from ``SFTDataset``; ``labels`` are already shifted (one target per token).
        pad_id: Token id written into padding (``tokenizer.pad_id``).
        ignore_index: Label written into padding, so it never counts in the loss.

    Returns:
        ``{"tokens": [b, s] long, "labels": [b, s] long, "lengths": [b] long}`` with s the longest
        item; ``lengths`` counts each row's real (non-padding) tokens, for throughput numbers.
    """
    if not items:
        raise ValueError("pad_collate got an empty batch")
    seq_len = max(len(it["tokens"]) for it in items)
    tokens = torch.full((len(items), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(items), seq_len), ignore_index, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["tokens"])
        tokens[row, :n] = torch.tensor(it["tokens"], dtype=torch.long)
        labels[row, :n] = torch.tensor(it["labels"], dtype=torch.long)
    lengths = torch.tensor([len(it["tokens"]) for it in items], dtype=torch.long)
    return {"tokens": tokens, "labels": labels, "lengths": lengths}
