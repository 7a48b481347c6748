"""The LoRA recipe end to end on a tiny random Llama: learning, exact resume, crash safety, interop."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tunesmith.models
from tunesmith.recipes import lora_single_device as recipe
from recipe_helpers import run_until_checkpoint
from tunesmith.training.config import build_config, to_dict


def make_cfg(model_dir: Path, data: dict[str, Path], out: Path, **overrides) -> recipe.Config:
    values = {
        "model": str(model_dir),
        "data": {"train": str(data["train"]), "val": str(data["val"]), "max_seq_len": 64},
        "lora": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj", "o_proj", "down_proj", "output"]},
        "output_dir": str(out), "device": "cpu", "dtype": "fp32", "batch_size": 4, "max_steps": 20, "lr": 1e-2,
        "warmup_steps": 2, "sample_max_new_tokens": 0, "logger": "none", "eval_batches": 2,
    }
    for key, value in overrides.items():
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return build_config(recipe.Config, values, [])


def test_loss_falls_and_held_out_improves(tiny_llama_dir, tiny_data, tmp_path):
    result = recipe.main(make_cfg(tiny_llama_dir, tiny_data, tmp_path / "run"))
    losses = result["losses"]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert result["held_out_after"] < result["held_out_before"]
    adapter = result["checkpoint"] / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()


def test_resume_after_stop_gives_the_same_losses(tiny_llama_dir, tiny_data, tmp_path, monkeypatch):
    full = recipe.main(make_cfg(tiny_llama_dir, tiny_data, tmp_path / "full", max_steps=12, save_every=4))["losses"]
    run_until_checkpoint(monkeypatch, lambda: recipe.main(
        make_cfg(tiny_llama_dir, tiny_data, tmp_path / "split", max_steps=12, save_every=4)), stop_step=8)
    resumed = recipe.main(make_cfg(tiny_llama_dir, tiny_data, tmp_path / "split", max_steps=12, save_every=4,
                                   resume=True))["losses"]
    assert len(resumed) == 4
    assert torch.allclose(torch.tensor(resumed), torch.tensor(full[8:]), atol=1e-6, rtol=0)


def test_grad_accumulation_4x1_equals_1x4(tiny_llama_dir, tiny_data, tmp_path):
    a = recipe.main(make_cfg(tiny_llama_dir, tiny_data, tmp_path / "a", batch_size=4, grad_accum_steps=1, max_steps=6))
    b = recipe.main(make_cfg(tiny_llama_dir, tiny_data, tmp_path / "b", batch_size=1, grad_accum_steps=4, max_steps=6))
    assert torch.allclose(torch.tensor(a["losses"]), torch.tensor(b["losses"]), atol=1e-5, rtol=0)
    wa = load_file(a["checkpoint"] / "trainable.safetensors")
    wb = load_file(b["checkpoint"] / "trainable.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_crash_during_save_keeps_previous_checkpoint_loadable(tiny_llama_dir, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real_writer = tunesmith.models.save_peft_adapter

    def failing_writer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half way through writing
            raise OSError("simulated crash while saving")
        return real_writer(*args, **kwargs)

    monkeypatch.setattr(tunesmith.models, "save_peft_adapter", failing_writer)
    with pytest.raises(OSError, match="simulated crash"):
        recipe.main(make_cfg(tiny_llama_dir, tiny_data, out, max_steps=8, save_every=3))
    monkeypatch.setattr(tunesmith.models, "save_peft_adapter", real_writer)
    complete = sorted(p.name for p in out.iterdir() if p.name.startswith("step_"))
    assert complete == ["step_000003"]
    resumed = recipe.main(make_cfg(tiny_llama_dir, tiny_data, out, max_steps=8, save_every=3, resume=True))
    assert len(resumed["losses"]) == 5  # continued from step 3
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())


def _run_subprocess(cfg: recipe.Config, cfg_path: Path) -> subprocess.Popen:
    import yaml

    cfg_path.write_text(yaml.safe_dump(to_dict(cfg)))
    return subprocess.Popen([sys.executable, "-m", "tunesmith.training.cli", "lora_single_device", "--config",
                             str(cfg_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_sigkill_at_a_random_moment_then_resume_is_bit_exact(tiny_llama_dir, tiny_data, tmp_path):
    kw = dict(max_steps=40, save_every=2, keep_last=2, **{"lora.dropout": 0.1})  # dropout: RNG must resume too
    reference = recipe.main(make_cfg(tiny_llama_dir, tiny_data, tmp_path / "ref", **kw))
    out = tmp_path / "killed"
    proc = _run_subprocess(make_cfg(tiny_llama_dir, tiny_data, out, **kw), tmp_path / "killed.yaml")
    deadline = time.time() + 120
    while not (out / "step_000002").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = recipe.main(make_cfg(tiny_llama_dir, tiny_data, out, resume=True, **kw))
    final_ref = load_file(reference["checkpoint"] / "trainable.safetensors")
    final_res = load_file(resumed["checkpoint"] / "trainable.safetensors")
    assert final_ref.keys() == final_res.keys()
    assert all(torch.equal(final_ref[k], final_res[k]) for k in final_ref)


def test_adapter_loads_in_peft_and_merged_model_in_transformers(tiny_llama_dir, tiny_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    result = recipe.main(make_cfg(tiny_llama_dir, tiny_data, tmp_path / "run", max_steps=5, save_merged=True))
    ckpt = result["checkpoint"]
    tokens = torch.randint(0, 300, (1, 17))
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(tokens).logits
    with_adapter = peft.PeftModel.from_pretrained(base, ckpt / "adapter").eval()
    with torch.no_grad():
        peft_logits = with_adapter(tokens).logits
    assert (peft_logits - base_logits).abs().max() > 1e-3  # training changed the model
    merged = transformers.AutoModelForCausalLM.from_pretrained(ckpt / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged(tokens).logits
    assert (merged_logits - peft_logits).abs().max() <= 1e-4


def test_renamed_fields_map_through_config_and_missing_ones_name_file_line_field(tiny_llama_dir, tmp_path):
    from tunesmith.data import DataError

    rows = [{"instruction": "Repeat the words twice.", "input": "red cat", "response": "red cat red cat"}] * 8
    data = tmp_path / "renamed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {"train": data, "val": data}
    with pytest.raises(DataError, match=r"renamed\.jsonl line 1: missing field 'output'.*data\.column_map\.output"):
        recipe.main(make_cfg(tiny_llama_dir, files, tmp_path / "a", max_steps=1))
    result = recipe.main(make_cfg(tiny_llama_dir, files, tmp_path / "b", max_steps=2, **{"data.column_map": {"output": "response"}}))
    assert len(result["losses"]) == 2 and result["held_out_after"] < result["held_out_before"]
