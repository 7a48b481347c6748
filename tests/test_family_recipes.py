"""Every recipe on every family built on Llama: tiny Qwen2 (q/k/v biases, tied, local layers), Qwen3
(QK-norm, head_dim ≠ hidden / heads), Mistral (sliding window) and Phi-3 (fused projections, partial
rotary, sliding window), each an HF folder made by ``transformers`` with a real tokenizer.

The LoRA recipe runs end to end on Qwen3 and Phi-3 — it learns, resumes exactly, and its adapter
and merged model load in ``peft`` / ``transformers`` with our logits. Then a smoke run of each
recipe (LoRA, LoRA with an NF4 base, DPO, the full fine-tune as one process, generate) per family.
The windows (16, 24 tokens) are shorter than the examples, so the local masks are in play.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import make_tokenizer_dir  # noqa: E402
from recipe_helpers import base_adapter_and_merged_logits, run_until_checkpoint, write_splits  # noqa: E402
from test_dpo_recipe import make_cfg as dpo_cfg, make_pairs  # noqa: E402
from test_full_finetune_distributed import run_values as full_values  # noqa: E402
from test_lora_recipe import make_cfg as lora_cfg  # noqa: E402
from tunesmith.recipes import dpo_single_device, full_finetune_distributed, generate, lora_single_device  # noqa: E402
from tunesmith.training.config import build_config  # noqa: E402

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=2, pad_token_id=0)
# family → (transformers class, config class, config overrides, LoRA targets)
FAMILIES = {
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=True,
                                                      sliding_window=16, max_window_layers=1),
              ["q_proj", "v_proj", "o_proj", "down_proj"]),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=32), ["q_proj", "v_proj", "o_proj", "down_proj", "output"]),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=16), ["q_proj", "k_proj", "gate_proj"]),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(partial_rotary_factor=0.5, sliding_window=24,
                                                    original_max_position_embeddings=256),
             ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family → an HF-layout folder: config.json, model.safetensors, tokenizer files (made once)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            cls, cfg_cls, overrides, _ = FAMILIES[family]
            path = tmp_path_factory.mktemp(f"tiny_{family}")
            vocab = make_tokenizer_dir(path)
            torch.manual_seed(0)
            config = getattr(transformers, cfg_cls)(vocab_size=vocab, **SIZES, **overrides)
            getattr(transformers, cls)(config).save_pretrained(path)
            made[family] = path
        return made[family]

    return get


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> dict[str, Path]:
    return write_splits(tmp_path_factory.mktemp("family_pref_data"), make_pairs)


def targets_of(family: str) -> dict:
    return {"lora.targets": FAMILIES[family][3]}


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_lora_recipe_learns_resumes_and_saves_for_peft_and_transformers(family, family_dir, tiny_data, tmp_path,
                                                                          monkeypatch):
    model_dir = family_dir(family)
    kw = dict(max_steps=12, save_every=6, **targets_of(family))
    full = lora_single_device.main(lora_cfg(model_dir, tiny_data, tmp_path / "full", save_merged=True, **kw))
    assert full["held_out_after"] < full["held_out_before"]
    run_until_checkpoint(monkeypatch, lambda: lora_single_device.main(
        lora_cfg(model_dir, tiny_data, tmp_path / "split", **kw)), stop_step=6)
    resumed = lora_single_device.main(lora_cfg(model_dir, tiny_data, tmp_path / "split", resume=True, **kw))
    assert len(resumed["losses"]) == 6
    assert torch.allclose(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][6:]), atol=1e-6, rtol=0)

    ckpt = full["checkpoint"]
    adapter_config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"lm_head" if t == "output" else t for t in FAMILIES[family][3]}
    tokens = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(0))  # past the windows
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base_logits, peft_logits, merged_logits = base_adapter_and_merged_logits(base, ckpt, tokens)
    assert (peft_logits - base_logits).abs().max() > 1e-3  # training changed the model
    assert (merged_logits - peft_logits).abs().max() <= 1e-4


def finite(losses) -> bool:
    return len(losses) > 0 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_and_qlora_run(family, family_dir, tiny_data, tmp_path):
    for name, extra in (("lora", {}), ("qlora", {"quantize_base": True})):
        result = lora_single_device.main(lora_cfg(family_dir(family), tiny_data, tmp_path / name, max_steps=2,
                                                  eval_batches=1, **extra, **targets_of(family)))
        assert finite(result["losses"]) and (result["checkpoint"] / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dpo_runs(family, family_dir, pref_data, tmp_path):
    result = dpo_single_device.main(dpo_cfg(family_dir(family), pref_data, tmp_path / "dpo", max_steps=2,
                                            eval_batches=1, **targets_of(family)))
    assert finite(result["losses"]) and result["held_out_before"]["reward_acc"] == pytest.approx(0.5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_finetune_one_process_exports_its_family(family, family_dir, tiny_data, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    values = full_values(family_dir(family), tiny_data, tmp_path / "full", max_steps=2, save_every=0)
    result = full_finetune_distributed.main(build_config(full_finetune_distributed.Config, values, []))
    assert finite(result["losses"])
    hf_dir = result["checkpoint"] / "hf"
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == FAMILIES[family][0].removesuffix(
        "ForCausalLM").lower()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert type(reloaded).__name__ == FAMILIES[family][0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_answers(family, family_dir, tiny_data, tmp_path):
    values = {"model": str(family_dir(family)), "device": "cpu", "dtype": "fp32", "adapter": "none",
              "prompt": "Repeat the words twice.\n\nred cat", "max_new_tokens": 5, "output_dir": str(tmp_path)}
    replies = generate.main(build_config(generate.Config, values, []))
    assert len(replies) == 1 and isinstance(replies[0], str)
