"""Packing: rows hold whole examples with restarted positions, and a packed forward gives every
example exactly the logits (and loss) it gets when run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunesmith.data import pack_items, packed_collate, pad_collate
from tunesmith.models.llama import Llama, LlamaConfig


def _items(lengths, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for n in lengths:
        tokens = torch.randint(1, vocab, (n,), generator=g).tolist()
        labels = tokens[1:] + [-100]
        labels[: n // 3] = [-100] * (n // 3)  # a masked prompt
        items.append({"tokens": tokens, "labels": labels})
    return items


def test_pack_items_layout():
    items = _items([5, 3, 4, 7, 2, 9])
    rows = pack_items(items, max_seq_len=10)
    # Greedy, in order: [5+3] [4] [7+2] [9]  (4 does not fit after 5+3, 7 not after 4 → new rows)
    assert [len(r["tokens"]) for r in rows] == [8, 4, 9, 9]
    assert rows[0]["positions"] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[0]["document_ids"] == [0] * 5 + [1] * 3
    assert rows[0]["tokens"] == items[0]["tokens"] + items[1]["tokens"]
    assert rows[0]["labels"] == items[0]["labels"] + items[1]["labels"]
    flat = [t for r in rows for t in r["tokens"]]
    assert flat == [t for it in items for t in it["tokens"]]  # nothing lost or reordered


def test_pack_items_truncates_long_examples():
    rows = pack_items(_items([15]), max_seq_len=8)
    assert len(rows[0]["tokens"]) == 8 and rows[0]["labels"][-1] == -100
    with pytest.raises(ValueError):
        pack_items(_items([3]), max_seq_len=0)


def test_packed_collate_pads_with_own_document():
    rows = pack_items(_items([5, 3, 4]), max_seq_len=8)
    batch = packed_collate(rows, pad_id=0, pad_to=10)
    assert batch["tokens"].shape == (2, 10)
    assert batch["document_ids"][1].tolist() == [0] * 4 + [1] * 6  # padding: a document of its own
    assert batch["labels"][1, 4:].eq(-100).all() and batch["tokens"][1, 4:].eq(0).all()
    assert batch["positions"][1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]


def test_packed_forward_matches_each_example_alone():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, norm_eps=1e-6)
    model = Llama(cfg).eval()
    items = _items([6, 9, 4, 11, 3, 7], seed=1)
    rows = pack_items(items, max_seq_len=20)
    assert len(rows) < len(items)
    batch = packed_collate(rows, pad_id=0)
    with torch.no_grad():
        packed = model(batch["tokens"], positions=batch["positions"], document_ids=batch["document_ids"])
        k = 0
        for b, row in enumerate(rows):
            start = 0
            for doc in range(max(row["document_ids"]) + 1):
                n = row["document_ids"].count(doc)
                alone = model(torch.tensor([items[k]["tokens"]]))[0]
                torch.testing.assert_close(packed[b, start : start + n], alone, atol=1e-5, rtol=1e-5)
                start, k = start + n, k + 1
        assert k == len(items)

        # The summed token loss is the same packed or padded one example per row.
        padded = pad_collate(items, pad_id=0)
        unpacked = model(padded["tokens"])
        loss_packed = F.cross_entropy(packed.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        loss_unpacked = F.cross_entropy(unpacked.flatten(0, 1), padded["labels"].flatten(), reduction="sum")
        torch.testing.assert_close(loss_packed, loss_unpacked, atol=1e-4, rtol=1e-5)
        assert (batch["labels"] != -100).sum() == (padded["labels"] != -100).sum()
