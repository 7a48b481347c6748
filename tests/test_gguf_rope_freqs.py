"""Llama 3.1 / 3.2 GGUFs: RoPE scaling stored as the ``rope_freqs.weight`` tensor.

llama.cpp's converter does not write Llama 3's ``rope_scaling`` as metadata; it writes one divisor
per frequency. We write a tiny Llama 3.1-style GGUF the way the converter does (Q/K rows permuted,
divisors computed by its rule, written out below independently of our code) from a random HF model
with ``rope_scaling: llama3``, and check our GGUF load against that HF model's logits.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from tunesmith.models import load_pretrained
from tunesmith.models.hf_checkpoint import CheckpointFormatError
from test_gguf_smollm2 import llama_cpp_permute

gguf = pytest.importorskip("gguf")

SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
THETA, HEAD_DIM = 500000.0, 16


def llama_cpp_rope_factors(scaling: dict) -> list[float]:
    """The divisors llama.cpp's convert_hf_to_gguf.py writes for ``rope_type: llama3``."""
    freqs = [1.0 / THETA ** (i / HEAD_DIM) for i in range(0, HEAD_DIM, 2)]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / scaling["low_freq_factor"], old / scaling["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(scaling["factor"])
        else:
            smooth = (old / wavelen - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
            out.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return out


def write_llama31_gguf(path, hf: transformers.LlamaForCausalLM, rope_factors: list[float]) -> str:
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(131072)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    sd = {k: v.float() for k, v in hf.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    w.add_tensor("rope_freqs.weight", torch.tensor(rope_factors, dtype=torch.float32).numpy())
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"].numpy())
        w.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads).numpy())
        w.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads).numpy())
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def tiny_hf_llama31() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=67, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=THETA, rope_scaling=dict(SCALING),  # HF edits the dict it gets max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights: peaky attention, so rotations at long distances show in the logits
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.15)
    return model


def test_llama31_gguf_rope_freqs_give_transformers_logits(tmp_path):
    hf = tiny_hf_llama31()
    path = write_llama31_gguf(tmp_path / "llama31.gguf", hf, llama_cpp_rope_factors(SCALING))
    ours = load_pretrained(path)
    assert ours.config.rope_scaling == SCALING
    # Only frequencies with wavelengths over 2048 positions are rescaled, so the scaling shows only
    # between tokens thousands of positions apart: a long sequence of a tiny model.
    tokens = torch.randint(0, 67, (1, 3000), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
        ours.config.rope_scaling = None  # the same weights without the scaling are clearly off
        ours.reset_buffers()
        unscaled = ours(tokens)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (unscaled - expected).abs().max().item() > 1e-2


def test_rope_freqs_that_are_not_llama3_scaling_are_refused(tmp_path):
    factors = llama_cpp_rope_factors(SCALING)
    factors[3] *= 1.5  # no Llama 3 parameter set gives this
    path = write_llama31_gguf(tmp_path / "odd.gguf", tiny_hf_llama31(), factors)
    with pytest.raises(CheckpointFormatError, match=r"odd\.gguf: rope_freqs\.weight .* is not Llama 3 RoPE scaling"):
        load_pretrained(path)
