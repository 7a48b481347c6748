"""Held-out evaluation sees every example; resume refuses configs that change the data or the shapes;
an interrupted re-save never loses the step it was replacing."""

from __future__ import annotations

import os

import pytest
import torch

from tunesmith.data import DataError
from tunesmith.training.batching import BatchStream
from tunesmith.training.checkpointing import remove_stale_temp_dirs, resume_conflicts
from tunesmith.training.losses import CrossEntropyLoss
from tunesmith.training.options import DataOptions
from tunesmith.training.setup import load_model_and_tokenizer, sft_batches


def test_held_out_stream_keeps_the_last_partial_batch_training_stream_drops_it():
    items = list(range(16))
    train = BatchStream(items, 6, list, shuffle=False)
    held_out = BatchStream(items, 6, list, shuffle=False, drop_last=False)
    assert train.per_epoch == 2 and [train[i] for i in range(2)] == [items[:6], items[6:12]]
    assert held_out.per_epoch == 3 and sum((held_out[i] for i in range(3)), []) == items
    with pytest.raises(DataError, match="data.jsonl has 3 usable example"):
        BatchStream(items[:3], 4, list, name="data.jsonl")
    assert BatchStream(items[:3], 4, list, drop_last=False).per_epoch == 1  # a small held-out set is fine


def test_evaluation_covers_every_held_out_example(tiny_llama_dir, tiny_data):
    base = load_model_and_tokenizer(str(tiny_llama_dir), None, torch.float32, torch.device("cpu"))
    opts = DataOptions(train=str(tiny_data["train"]), val=str(tiny_data["val"]), max_seq_len=64, packing=False)
    _, val_batches, val_set = sft_batches(opts, base.tokenizer, batch_size=6, seed=0)
    assert len(val_set) == 16 and val_batches.per_epoch == 3
    from tunesmith.training.evaluation import evaluate_loss

    loss_fn = CrossEntropyLoss()
    total, count = 0.0, 0
    with torch.no_grad():
        for item in val_set:  # one example at a time, by hand
            tokens, labels = torch.tensor([item["tokens"]]), torch.tensor([item["labels"]])
            total += float(loss_fn(base.model.hidden_states(tokens), labels, base.model.logits))
            count += int((labels != -100).sum())
    assert evaluate_loss(base.model, val_batches, loss_fn, torch.device("cpu")) == pytest.approx(total / count, rel=1e-5)


SAVED = {"model": "m", "seed": 0, "batch_size": 4, "grad_accum_steps": 1, "lr": 1e-4, "max_steps": 10,
         "eval_every": 5, "save_every": 5, "keep_last": 2, "attention": "sdpa", "device": "auto",
         "data": {"train": "t.jsonl", "val": "v.jsonl", "val_split": "validation", "max_seq_len": 256,
                  "column_map": {}, "packing": False},
         "lora": {"rank": 8, "targets": ["q_proj", "v_proj"]}, "loss_args": {"chunk_size": 1024}}


def changed(**kw) -> dict:
    new = {**SAVED, "data": dict(SAVED["data"]), "lora": dict(SAVED["lora"]), "loss_args": dict(SAVED["loss_args"])}
    for key, value in kw.items():
        node = new
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return new


@pytest.mark.parametrize("key,value", [("batch_size", 8), ("seed", 1), ("grad_accum_steps", 2), ("model", "other"),
                                       ("lr", 2e-4), ("data__train", "u.jsonl"), ("data__max_seq_len", 128),
                                       ("data__packing", True), ("data__column_map", {"output": "r"}),
                                       ("lora__rank", 16), ("lora__targets", ["q_proj"])])
def test_resume_refuses_what_changes_the_data_stream_or_the_shapes(key, value):
    conflicts = resume_conflicts(SAVED, changed(**{key: value}))
    assert [c[0] for c in conflicts] == [key.replace("__", ".") if key != "data__column_map" else "data.column_map.output"]


@pytest.mark.parametrize("key,value", [("max_steps", 20), ("eval_every", 1), ("save_every", 2), ("keep_last", 0),
                                       ("attention", "matmul"), ("device", "cpu"), ("loss_args__chunk_size", 64),
                                       ("data__val", "other_val.jsonl"), ("data__val_split", "test")])
def test_resume_allows_run_length_bookkeeping_and_speed_changes(key, value):
    assert resume_conflicts(SAVED, changed(**{key: value})) == []


def test_held_out_file_matters_when_it_is_split_off_the_training_data():
    no_val = changed(data__val=None)
    assert [c[0] for c in resume_conflicts(no_val, changed(data__val="v.jsonl"))] == ["data.val"]


def test_an_interrupted_re_save_gets_its_step_back(tmp_path):
    old = tmp_path / f".old-step_000010-{os.getpid()}"
    old.mkdir()
    (old / "trainable.safetensors").write_bytes(b"weights")
    (tmp_path / ".tmp-step_000010-123").mkdir()
    (tmp_path / f".old-step_000005-{os.getpid()}").mkdir()
    (tmp_path / "step_000005").mkdir()
    remove_stale_temp_dirs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000005", "step_000010"]
    assert (tmp_path / "step_000010" / "trainable.safetensors").read_bytes() == b"weights"
