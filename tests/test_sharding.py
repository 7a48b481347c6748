"""Pieces of the distributed recipes that need no process group: launch checks, config compatibility,
the per-rank memory estimate and what ``tune-run --dry-run`` prints for it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tunesmith.models import builders
from tunesmith.recipes import (
    dpo_distributed,
    dpo_single_device,
    full_finetune_distributed,
    lora_distributed,
    lora_single_device,
    qlora_distributed,
    qlora_single_device,
)
from tunesmith.training import cli, sharding
from tunesmith.training.config import ConfigError, build_config, load_yaml, to_dict
from tunesmith.training.memory import estimate
from tunesmith.training.options import LoRAOptions
from tunesmith.training.process_group import DistEnv


def bundled(kind: str) -> list[str]:
    names = []
    for name in cli.bundled_configs():
        values = load_yaml(cli.CONFIGS_DIR / f"{name}.yaml")
        is_dpo = "dpo" in name
        other_method = name.endswith(("_grpo", "_kd"))  # GRPO and distillation have recipes of their own
        if (kind == "dpo") == is_dpo and (is_dpo or "lora" in values) and not other_method:
            names.append(name)
    return names


@pytest.mark.parametrize("name", bundled("lora"))
def test_every_lora_config_is_a_lora_distributed_config_with_the_same_values(name):
    values = load_yaml(cli.CONFIGS_DIR / f"{name}.yaml")
    for single, distributed in ((lora_single_device, lora_distributed), (qlora_single_device, qlora_distributed)):
        one, many = to_dict(build_config(single.Config, values, [])), to_dict(build_config(distributed.Config, values, []))
        assert {k: v for k, v in many.items() if k in one} == one
        assert set(many) - set(one) == {"compute_dtype", "reduce_dtype", "cpu_offload", "reshard_after_forward"}


@pytest.mark.parametrize("name", bundled("dpo"))
def test_every_dpo_config_is_a_dpo_distributed_config_with_the_same_values(name):
    values = load_yaml(cli.CONFIGS_DIR / f"{name}.yaml")
    one = to_dict(build_config(dpo_single_device.Config, values, []))
    many = to_dict(build_config(dpo_distributed.Config, values, []))
    assert {k: v for k, v in many.items() if k in one} == one


def test_uneven_nf4_rows_are_refused_before_anything_is_sharded(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(sharding, "barrier", lambda env: None)  # no process group here
    env = DistEnv(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"), mesh=object())
    with pytest.raises(ConfigError, match=r"q_proj.weight \(64, 64\).*64 rows do not split evenly over 3 processes"):
        sharding.load_sharded(str(tiny_llama_dir), torch.float32, env, lora=LoRAOptions(targets=["q_proj"]),
                              quantize_base=True)


@pytest.mark.parametrize("args,message", [
    (["lora_single_device", "--nproc-per-node", "2"], "runs in one process; --nproc-per-node needs a distributed recipe"),
    (["lora_distributed", "--nproc-per-node", "2", "optimizer=adamw8bit"], "optimizer=adamw8bit: bitsandbytes"),
    (["lora_distributed", "--nproc-per-node", "3"], "'batch_size' = 8 must be a multiple of the number of processes"),
    (["lora_distributed", "compute_dtype=bf16", "--dry-run", "model=HuggingFaceTB/SmolLM2-135M"], None),  # a dry run plans
])
def test_launch_checks_run_before_torchrun_starts(args, message, capsys):
    recipe, *rest = args
    code = cli.main([recipe, "--config", "smollm2_135m", *rest])
    if message is None:
        assert code == 0
    else:
        assert code == 2 and message in capsys.readouterr().err


def test_per_rank_estimate_splits_what_is_sharded_and_counts_what_is_gathered():
    shape = dataclasses.replace(builders.llama3_1_8b(), num_layers=4)
    kw = dict(dtype="bf16", batch_size=8, seq_len=512, rank=16, targets=["q_proj", "v_proj", "down_proj"],
              quantize_base=True, device_type="cuda")
    one, four = estimate(shape, **kw), estimate(shape, world_size=4, **kw)
    for term in ("weights", "nf4", "adapters", "optimizer", "activations"):
        assert getattr(four, term) == pytest.approx(getattr(one, term) / 4, rel=0.01), term
    assert one.gathered == 0 and four.gathered > 0
    # The root (embedding + head, bf16) stays gathered through the step: at least their bytes.
    assert four.gathered >= 2 * shape.vocab_size * shape.hidden_size * 2
    # Full-weights training: gradients and AdamW state for every weight, split too.
    full = estimate(shape, world_size=4, full=True, **{**kw, "quantize_base": False})
    assert full.gradients == pytest.approx(full.weights, rel=0.01) and full.optimizer == pytest.approx(2 * full.weights, rel=0.01)
    assert full.adapters == 0
    # Keeping every block gathered until backward costs every block's weights.
    kept = estimate(shape, world_size=4, reshard_after_forward=False, **kw)
    assert kept.gathered > four.gathered
    offloaded = estimate(shape, world_size=4, cpu_offload=True, **kw)
    assert offloaded.weights == offloaded.nf4 == offloaded.optimizer == 0 and offloaded.offloaded > 0


def test_dry_run_prints_the_estimate_per_rank_of_the_launch(tiny_llama_dir, tiny_pref_data, tmp_path, capsys):
    config = tmp_path / "dpo.yaml"
    config.write_text(f"model: {tiny_llama_dir}\ndata:\n  train: {tiny_pref_data['train']}\n  max_seq_len: 64\n"
                      f"output_dir: {tmp_path / 'out'}\ndevice: cpu\nfull: true\nbatch_size: 4\n")
    assert cli.main(["dpo_distributed", "--config", str(config), "--dry-run", "--nproc-per-node", "2"]) == 0
    out = capsys.readouterr().out
    assert "per rank, 2 processes" in out
    for term in ("weights", "gradients", "optimizer", "gathered", "reference", "activations", "logits", "total"):
        assert term in out, term
    assert cli.main(["dpo_single_device", "--config", str(config), "--dry-run"]) == 0
    assert "reference" in capsys.readouterr().out  # DPO's estimate on one device too
    assert cli.main(["full_finetune_distributed", "--config", "tiny_full_cpu", "--dry-run", "--nnodes", "2",
                     "--nproc-per-node", "2", "model=HuggingFaceTB/SmolLM2-135M"]) == 0  # a known Hub id: no file to fetch
    assert "per rank, 4 processes" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert full_finetune_distributed.estimate_memory  # every distributed recipe has one
