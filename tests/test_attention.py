"""``attention: matmul`` computes the same function as SDPA: forward, gradients, packing, KV cache.

The matmul path (``models/llama.py:matmul_attention``) is the CPU speed option; SDPA is the
reference here (PyTorch's own kernel; both are also checked against ``transformers`` in the
parity tests). Its custom softmax backward keeps only the low-precision probabilities, so the
gradients are checked against autograd-through-SDPA, and the bytes it saves against the estimate.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunesmith.models import apply_lora
from tunesmith.models.llama import Llama, LlamaConfig, matmul_attention
from tunesmith.models.lora import LoRALinear
from tunesmith.training.config import ConfigError
from tunesmith.training.setup import set_attention

TINY = LlamaConfig(vocab_size=61, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=64)


def tiny_lora_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(TINY)
    apply_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.normal_(0, 0.1)  # nonzero B: adapters change the output
    return model


@pytest.mark.parametrize("kv_heads", [6, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["causal", "mask"])
@pytest.mark.parametrize("s", [11, 131], ids=["short", "split"])  # ≥ 128: the causal half-split path
def test_matches_sdpa_values_and_gradients(kv_heads, with_mask, s):
    torch.manual_seed(0)
    b, h, hd = 2, 6, 8
    q, k, v = torch.randn(b, h, s, hd), torch.randn(b, kv_heads, s, hd), torch.randn(b, kv_heads, s, hd)
    mask = None
    if with_mask:  # two packed documents per row, the boundary before the split: causal within each
        doc = (torch.arange(s) >= s // 2 - 3).long()
        mask = ((torch.arange(s)[None, :] <= torch.arange(s)[:, None]) & (doc[None, :] == doc[:, None]))
        mask = mask.expand(b, 1, s, s)
    grad_out = torch.randn(b, h, s, hd)

    def run(fn):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*ins)
        out.backward(grad_out)
        return out.detach(), [t.grad for t in ins]

    got, got_grads = run(lambda q, k, v: matmul_attention(q, k, v, mask, scale=0.3))
    ref, ref_grads = run(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=0.3, enable_gqa=kv_heads != h))
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    for name, g, r in zip("qkv", got_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_model_packing_and_kv_cache_match_sdpa():
    model = tiny_lora_llama().eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, 14), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(9), torch.arange(5)]).expand(2, -1)
    docs = torch.cat([torch.zeros(9), torch.ones(5)]).long().expand(2, -1)
    with torch.no_grad():
        ref_full = model(tokens)
        ref_packed = model(tokens, positions=positions, document_ids=docs)
        model.set_attention("matmul")
        assert all(not layer.attn.use_sdpa for layer in model.layers)
        torch.testing.assert_close(model(tokens), ref_full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(tokens, positions=positions, document_ids=docs), ref_packed, atol=1e-5, rtol=1e-5)
        model.setup_kv_cache(batch=2, max_len=16)  # decoding: 6 prompt positions, then one at a time
        steps = [model(tokens[:, :6])] + [model(tokens[:, t : t + 1]) for t in range(6, 14)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), ref_full, atol=1e-5, rtol=1e-5)


def test_lora_gradients_match_sdpa_under_compile():
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))

    def adapter_grads(attention: str, compile: bool) -> dict[str, torch.Tensor]:
        model = tiny_lora_llama().train()
        model.set_attention(attention)
        if compile:
            for layer in model.layers:
                layer.compile()
        model(tokens).logsumexp(-1).sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ref = adapter_grads("sdpa", compile=False)
    got = adapter_grads("matmul", compile=True)
    assert ref.keys() == got.keys() and len(ref) == 8
    for name in ref:
        assert ref[name].abs().max() > 0
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("s", [64, 128], ids=["whole", "split"])
def test_bf16_keeps_only_bf16_probabilities(s):
    """The custom softmax backward saves the bf16 probabilities and nothing in fp32 of score size;
    from 128 positions on, the causal split saves only ¾ of the [s × s] matrix (the estimate's term)."""
    torch.manual_seed(0)
    b, h, hd = 1, 4, 8
    q, k, v = (torch.randn(b, h, s, hd, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        matmul_attention(q, k, v, None, scale=hd**-0.5)
    # Score-sized tensors (q, k, v and outputs are far smaller), each storage once: softmax and
    # the second matmul save views of the same probabilities.
    scores = {t.data_ptr(): t for t in saved if t.is_floating_point() and t.numel() >= b * h * (s // 2) ** 2}
    assert scores and all(t.dtype == torch.bfloat16 for t in scores.values()), [(t.dtype, t.shape) for t in saved]
    expected = b * h * s * s if s < 128 else b * h * (s // 2) * (s // 2 + s)
    assert sum(t.numel() for t in scores.values()) == expected


def test_causal_split_is_exact():
    """Splitting the queries at s/2 changes which kernels run, not a single output bit."""
    from tunesmith.models.llama import _attend

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 160, 8), torch.randn(2, 2, 160, 8), torch.randn(2, 2, 160, 8)
    doc = (torch.arange(160) >= 100).long()
    mask = ((torch.arange(160)[None, :] <= torch.arange(160)[:, None]) & (doc[None, :] == doc[:, None]))
    for m in (None, mask.expand(2, 1, 160, 160)):
        assert torch.equal(matmul_attention(q, k, v, m, 0.3, softcap=5.0), _attend(q, k, v, m, 0.3, 5.0))


def test_unknown_attention_is_a_config_error():
    with pytest.raises(ConfigError, match="attention must be sdpa or matmul; got 'flash'"):
        set_attention(tiny_lora_llama(), "flash")
