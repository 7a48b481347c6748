"""The bundled Qwen / Mistral / Phi configs: they fit their recipe, resolve to the builder's shape
offline, and the peak memory in their first line is what ``--dry-run`` estimates for them."""

from __future__ import annotations

import re

import pytest

from tunesmith.models import builders
from tunesmith.recipes import full_finetune_distributed, lora_single_device
from tunesmith.training.cli import CONFIGS_DIR
from tunesmith.training.config import build_config, load_yaml
from tunesmith.training.memory import GIB, estimate, model_config

LORA_CONFIGS = {  # config → builder of its model
    "qwen3_0_6b": "qwen3_0_6b", "qwen3_1_7b": "qwen3_1_7b", "qwen3_4b": "qwen3_4b", "qwen3_8b": "qwen3_8b",
    "qwen3_14b": "qwen3_14b", "qwen3_32b": "qwen3_32b", "qwen2_5_7b": "qwen2_5_7b", "mistral_7b": "mistral_7b",
    "phi4_mini": "phi4_mini",
}
FULL_CONFIGS = ["qwen3_8b_full", "qwen3_32b_full", "qwen2_5_7b_full", "mistral_7b_full", "phi4_mini_full"]


@pytest.mark.parametrize("name", list(LORA_CONFIGS))
def test_lora_config_header_is_its_dry_run_estimate(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a known Hub id needs no network: the builder has its shape
    path = CONFIGS_DIR / f"{name}.yaml"
    cfg = build_config(lora_single_device.Config, load_yaml(path), [], yaml_name=str(path))
    shape = model_config(cfg.model)
    assert shape == builders.BUILDERS[LORA_CONFIGS[name]]()
    header = path.read_text().splitlines()[0]
    lora_gib, qlora_gib = map(float, re.search(r"bf16\): ([\d.]+) GiB; with qlora_single_device ([\d.]+) GiB", header).groups())
    for quantize, expected in ((False, lora_gib), (True, qlora_gib)):
        # What --dry-run prints on a GPU (dtype auto → bf16, peak allocated: no CPU runtime term).
        e = estimate(shape, dtype="bf16", batch_size=cfg.batch_size, seq_len=cfg.data.max_seq_len, rank=cfg.lora.rank,
                     targets=list(cfg.lora.targets), quantize_base=quantize, optimizer=cfg.optimizer,
                     activation_checkpointing=cfg.activation_checkpointing,
                     chunk_size=int(cfg.loss_args.get("chunk_size", 1024)), device_type="cuda")
        assert round(e.total / GIB, 1) == expected, (name, quantize)


def test_phi4_mini_config_targets_its_fused_layers():
    cfg = build_config(lora_single_device.Config, load_yaml(CONFIGS_DIR / "phi4_mini.yaml"), [])
    assert set(cfg.lora.targets) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


@pytest.mark.parametrize("name", FULL_CONFIGS)
def test_full_configs_fit_the_recipe(name):
    path = CONFIGS_DIR / f"{name}.yaml"
    cfg = build_config(full_finetune_distributed.Config, load_yaml(path), [], yaml_name=str(path))
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "GB/GPU" in first  # sizes documented
    assert cfg.batch_size % 4 == 0 and cfg.lr < 1e-4 and cfg.dtype == "bf16"
