"""The merged export streams: exporting a ~300 MB LoRA model (merged HF folder, GGUF) holds about one
merged tensor beyond the model, where merging everything at once holds a whole merged copy.

Measured in a process of its own (tests/export_memory.py: the kernel's resident-set high-water mark,
reset per phase), so other work on the machine does not enter the numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streaming_export_peak_is_one_tensor_not_a_merged_copy(tmp_path):
    script = Path(__file__).parent / "export_memory.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout.strip().splitlines()[-1])
    merged, one = m["merged_mib"], m["biggest_tensor_mib"]
    assert merged > 250  # large enough to tell a merged copy from a few tensors
    assert m["at_once"]["peak_above_mib"] > 0.9 * merged  # the measurement sees a merged copy when there is one
    for phase in ("hf", "gguf"):  # a merged tensor, its fp32 update, the writer's copy: a few tensors at most
        assert m[phase]["peak_above_mib"] < 4 * one + 8, (phase, m)
        assert m[phase]["peak_above_mib"] < 0.15 * merged, (phase, m)
    assert (tmp_path / "merged" / "model.safetensors").stat().st_size > merged * 2**20
    assert (tmp_path / "model-f32.gguf").stat().st_size > merged * 2**20
