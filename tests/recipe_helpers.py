"""Helpers shared by the recipe tests: data files and a run that stops right after a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from tunesmith.training import checkpointing


def write_splits(path: Path, make: Callable[[int, int], list[dict]]) -> dict[str, Path]:
    """``train.jsonl`` (64 records, seed 0) and ``val.jsonl`` (16 records, seed 1) made by ``make(n, seed)``."""
    files = {}
    for split, n, seed in (("train", 64, 0), ("val", 16, 1)):
        files[split] = path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in make(n, seed)))
    return files


class StoppedAfterSave(Exception):
    """Raised by ``run_until_checkpoint`` to end a run as if the process stopped there."""


def run_until_checkpoint(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any], stop_step: int) -> None:
    """Call ``run()`` and stop it right after the checkpoint of ``stop_step`` is on disk."""
    real_save = checkpointing.save_checkpoint

    def save_then_stop(output_dir, step, **kw):
        path = real_save(output_dir, step, **kw)
        if step == stop_step:
            raise StoppedAfterSave
        return path

    with monkeypatch.context() as patch:
        patch.setattr(checkpointing, "save_checkpoint", save_then_stop)
        with pytest.raises(StoppedAfterSave):
            run()


def with_overrides(values: dict, overrides: dict[str, Any]) -> dict:
    """``values`` with dotted ``overrides`` (``{"lora.rank": 4}``) written into its nested dicts, in place."""
    for key, value in overrides.items():
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return values
