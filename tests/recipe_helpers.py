"""Helpers shared by the recipe tests: data files and a run that stops right after a checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

import pytest

from tunesmith.training import checkpointing, sharded_checkpoint

WORDS = "red green blue cat dog fish one two three four five apple pear plum tree river stone cloud".split()


def make_pairs(n: int, seed: int) -> list[dict]:
    """Preference pairs: prefer repeating the words twice over saying them once, reversed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 4))
        text = " ".join(words)
        out.append({"prompt": f"Repeat the words twice.\n\n{text}", "chosen": f"{text} {text}",
                    "rejected": " ".join(reversed(words))})
    return out


def make_prompts(n: int, seed: int) -> list[dict]:
    """GRPO prompt records: the repeat-twice task with its reference ``answer`` column."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = " ".join(rng.choices(WORDS, k=3))
        out.append({"prompt": f"Repeat the words twice.\n\n{words}", "answer": f"{words} {words}"})
    return out


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
    """Call ``run()`` and stop it right after the checkpoint of ``stop_step`` is on disk.

    Covers both checkpoint writers: ``checkpointing.save_checkpoint`` (single-device format, also
    gathered LoRA checkpoints) and ``sharded_checkpoint.save_dcp_checkpoint`` (full weights, DCP).
    """

    def stopping(real: Callable[..., Any]) -> Callable[..., Any]:
        def save_then_stop(output_dir, step, **kw):
            path = real(output_dir, step, **kw)
            if step == stop_step:
                raise StoppedAfterSave
            return path
        return save_then_stop

    with monkeypatch.context() as patch:
        patch.setattr(checkpointing, "save_checkpoint", stopping(checkpointing.save_checkpoint))
        patch.setattr(sharded_checkpoint, "save_dcp_checkpoint", stopping(sharded_checkpoint.save_dcp_checkpoint))
        with pytest.raises(StoppedAfterSave):
            run()


def base_adapter_and_merged_logits(base: Any, checkpoint: Path, tokens: Any) -> tuple[Any, Any, Any]:
    """Logits of an HF ``base`` model, of ``base`` + the checkpoint's PEFT adapter (``peft``), and of the
    checkpoint's merged HF folder (``transformers``): what a user gets from a LoRA run's outputs."""
    import peft
    import torch
    import transformers

    with torch.no_grad():
        base_logits = base(tokens).logits
        with_adapter = peft.PeftModel.from_pretrained(base, checkpoint / "adapter").eval()
        peft_logits = with_adapter(tokens).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(checkpoint / "merged", dtype=torch.float32).eval()
        return base_logits, peft_logits, merged(tokens).logits


def with_overrides(values: dict, overrides: dict[str, Any]) -> dict:
    """``values`` with dotted ``overrides`` (``{"lora.rank": 4}``) written into its nested dicts, in place."""
    for key, value in overrides.items():
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return values
