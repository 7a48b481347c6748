"""Sequence packing: several short examples share one row, so batches carry no padding waste.

    row tokens      [ a a a a | b b b | c c c c c | pad pad ]
    positions       [ 0 1 2 3 | 0 1 2 | 0 1 2 3 4 | 0   1   ]   RoPE restarts per example
    document_ids    [ 0 0 0 0 | 1 1 1 | 2 2 2 2 2 | 3   3   ]   attention stays inside a document

With ``positions`` and ``document_ids`` passed to the model (``Llama.hidden_states``), every
example gets exactly the logits it would get alone. Labels need no fixing at the seams: each
example's labels are already shifted and end in ``-100``, so no token is asked to predict the
first token of the next example.
"""

from __future__ import annotations

import torch

from tunesmith.data.collate import IGNORE_INDEX


def pack_items(items: list[dict], max_seq_len: int) -> list[dict]:
    """Greedily concatenate ``{"tokens", "labels"}`` items into rows of at most ``max_seq_len``.

    Items are taken in order; a row is closed when the next item does not fit. Items longer than
    ``max_seq_len`` are truncated (their last label set to -100 so nothing leaks across the cut).

    Returns:
        Rows ``{"tokens", "labels", "positions", "document_ids"}``, each a list of ints.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    rows: list[dict] = []
    row = _empty_row()
    for item in items:
        tokens, labels = list(item["tokens"][:max_seq_len]), list(item["labels"][:max_seq_len])
        if not tokens:
            continue
        if len(item["tokens"]) > max_seq_len:
            labels[-1] = IGNORE_INDEX  # its target was cut off
        if row["tokens"] and len(row["tokens"]) + len(tokens) > max_seq_len:
            rows.append(row)
            row = _empty_row()
        doc = row["document_ids"][-1] + 1 if row["document_ids"] else 0
        row["tokens"] += tokens
        row["labels"] += labels
        row["positions"] += list(range(len(tokens)))
        row["document_ids"] += [doc] * len(tokens)
    if row["tokens"]:
        rows.append(row)
    return rows


def _empty_row() -> dict:
    return {"tokens": [], "labels": [], "positions": [], "document_ids": []}


def packed_collate(
    rows: list[dict], pad_id: int, ignore_index: int = IGNORE_INDEX, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack packed rows into tensors [b, s], right-padded to the longest row (or ``pad_to``).

    Padding gets a document id of its own (one past the row's last), so no real token attends to
    it, and positions counting from 0; its labels are ``ignore_index``.

    Returns:
        ``{"tokens", "labels", "positions", "document_ids"}``, each [b, s] long, and ``lengths`` [b]
        (real tokens per row).
    """
    if not rows:
        raise ValueError("packed_collate got an empty batch")
    seq_len = max(max(len(r["tokens"]) for r in rows), pad_to or 0)
    out = {k: torch.zeros((len(rows), seq_len), dtype=torch.long) for k in ("tokens", "labels", "positions", "document_ids")}
    out["tokens"].fill_(pad_id)
    out["labels"].fill_(ignore_index)
    for b, r in enumerate(rows):
        n = len(r["tokens"])
        for key in out:
            out[key][b, :n] = torch.tensor(r[key], dtype=torch.long)
        pad = seq_len - n
        if pad:
            out["positions"][b, n:] = torch.arange(pad)
            out["document_ids"][b, n:] = (max(r["document_ids"]) + 1) if n else 0
    out["lengths"] = torch.tensor([len(r["tokens"]) for r in rows], dtype=torch.long)
    return out
