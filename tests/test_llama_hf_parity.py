"""Our Llama, loaded from checkpoints that transformers wrote, gives transformers' logits.

Each case is a random tiny ``LlamaForCausalLM`` saved with ``save_pretrained`` (single file and
sharded); ``load_pretrained`` reads the directory and the fp32 logits must agree to 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tunesmith.models import Llama, load_pretrained  # noqa: E402
from tunesmith.models.llama_hf import config_from_hf, config_to_hf  # noqa: E402

LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # short, so a 64-token prompt crosses into the scaled band
}

CASES = {
    "gqa_untied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "mqa": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=False),
    "llama31_rope": dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE
    ),
    # odd widths everywhere, and head_dim (24) != hidden / heads (30 / 3 = 10)
    "odd_head_dim": dict(
        hidden_size=30, num_attention_heads=3, num_key_value_heads=1, head_dim=24, intermediate_size=37,
        vocab_size=131, tie_word_embeddings=True,
    ),
}


def make_hf(case: str, seed: int = 0):
    kwargs = dict(vocab_size=97, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    kwargs.update(CASES[case])
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    # Random norm weights too, so a swapped or skipped norm cannot hide behind all-ones.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, sharded, tmp_path):
    hf = make_hf(case)
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded

    ours = load_pretrained(str(tmp_path), dtype=torch.float32)
    assert isinstance(ours, Llama)
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    if ours.config.tie_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight

    tokens = torch.randint(0, hf.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    ours.set_attention("matmul")  # the CPU speed option computes the same function
    with torch.no_grad():
        assert (ours(tokens) - expected).abs().max().item() <= 1e-4


def test_config_round_trip_through_transformers(tmp_path):
    """config_to_hf writes a config.json that transformers reads to the same model shape."""
    hf = make_hf("llama31_rope")
    ours = config_from_hf(hf.config.to_dict())
    assert ours.rope_scaling["rope_type"] == "llama3" and ours.rope_scaling["factor"] == 8.0
    assert ours.rope_theta == 500000.0 and ours.norm_eps == 1e-5

    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(ours)))
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert back.model_type == "llama"
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "head_dim", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(back, key) == getattr(hf.config, key), key
    assert back.rope_parameters["rope_theta"] == 500000.0
    assert back.rope_parameters["factor"] == 8.0


def test_legacy_rope_scaling_keys():
    """Hub configs carry rope_theta + rope_scaling (with the old "type" key in places)."""
    d = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 16, "rope_theta": 1234.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = config_from_hf(d)
    assert cfg.rope_theta == 1234.0
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.num_kv_heads == 2  # defaults to num_attention_heads


def test_unsupported_config_key_is_named():
    d = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 16, "attention_bias": True}
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf(d)
