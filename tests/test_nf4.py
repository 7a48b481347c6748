"""QLoRA: LoRA over NF4-quantized frozen base weights (torchao NF4Tensor).

Error bound used below, and why. NF4 stores each weight as one of 16 levels times the absmax of
its 64-value block. For nn.Linear's uniform init (and for Gaussian weights) that leaves a
relative weight error ‖Ŵ − W‖/‖W‖ of about 0.09 (measured 0.092–0.094 here; a uniform 16-level
grid on the same data would give ~0.07, NF4's levels suit normal data better). The logits are
``output(h)``: the quantized output head alone perturbs them by the same relative ~0.09, and the
blocks' quantized projections add a smaller amount because each block's update is small next to
the residual stream in a tiny random model. Measured logit RMS error / logit std: 0.098–0.100 over
four seeds. We assert ≤ 0.15 (1.5× the measurement): loose enough for seeds and platforms, tight
enough that a wrong scale, a wrong block layout or a quantized adapter would fail it. The exact
part is checked separately: QLoRA must equal LoRA run on the dequantized weights to 1e-5.
"""

import copy

import pytest
import torch

from tunesmith.models import nf4
from tunesmith.models.llama import Llama, LlamaConfig
from tunesmith.models.lora import (
    LORA_TARGETS,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    trainable_parameters,
)

ALL_TARGETS = list(LORA_TARGETS)
TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny_model(seed: int = 0, tie: bool = False) -> Llama:
    # Every projection's size is a multiple of 64 (NF4 block); k/v have 2048 values → 32 blocks,
    # fewer than torchao's default 256 scales per group, which nf4.to_nf4 adapts to.
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
        tie_embeddings=tie,
    )
    return Llama(cfg).eval()


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_and_qlora(seed: int = 0):
    """The same base model with the same non-zero adapters, dense (LoRA) and NF4 (QLoRA)."""
    base = tiny_model(seed)
    lora = apply_lora(copy.deepcopy(base), ALL_TARGETS, rank=4, alpha=8)
    qlora = apply_lora(copy.deepcopy(base), ALL_TARGETS, rank=4, alpha=8, quantize_base=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_modules(lora).values():
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.05)
    load_lora_state_dict(qlora, lora_state_dict(lora))
    return lora, qlora


def test_base_weights_are_nf4_with_double_quantized_scales():
    _, qlora = lora_and_qlora()
    for name, m in lora_modules(qlora).items():
        w = m.weight
        assert nf4.is_nf4(w) and not w.requires_grad, name
        assert w.quantized_data.dtype == torch.uint8 and w.quantized_data.numel() == w.numel() // 2  # 4 bits
        assert w.quantized_scalers.dtype == torch.int8  # the per-block scales are themselves quantized
        assert w.quantization_factor.numel() == (w.numel() // 64) // w.scaler_block_size
        # The adapters stay dense and trainable.
        assert not nf4.is_nf4(m.lora_a.weight) and m.lora_a.weight.requires_grad
    # Norms and embeddings keep the model dtype.
    assert qlora.tok_embeddings.weight.dtype == torch.float32 and not nf4.is_nf4(qlora.tok_embeddings.weight)
    assert not nf4.is_nf4(qlora.layers[0].attn_norm.weight)


def test_qlora_equals_lora_on_dequantized_weights():
    lora, qlora = lora_and_qlora()
    with torch.no_grad():
        for name, m in lora_modules(lora).items():
            m.weight.copy_(nf4.dequantize(lora_modules(qlora)[name].weight))
    assert torch.allclose(qlora(TOKENS), lora(TOKENS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_qlora_logits_close_to_lora(seed):
    lora, qlora = lora_and_qlora(seed)
    for name, m in lora_modules(qlora).items():
        dense = lora_modules(lora)[name].weight
        rel = (nf4.dequantize(m.weight) - dense).norm() / dense.norm()
        assert 0.02 < rel < 0.12, f"{name}: NF4 relative weight error {rel:.3f}"
    expected, got = lora(TOKENS), qlora(TOKENS)
    rel_rms = (got - expected).pow(2).mean().sqrt() / expected.std()
    assert rel_rms <= 0.15, f"logit RMS error {rel_rms:.3f} × logit std exceeds the NF4 bound"


def test_training_keeps_nf4_frozen_and_loss_falls():
    _, qlora = lora_and_qlora()
    snapshot = {
        n: (m.weight, m.weight.quantized_data.clone(), m.weight.quantized_scalers.clone())
        for n, m in lora_modules(qlora).items()
    }
    opt = torch.optim.AdamW(trainable_parameters(qlora), lr=1e-2)
    qlora.train()
    inputs, labels = TOKENS[:, :-1], TOKENS[:, 1:]
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(qlora(inputs).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        # Gradients reach the first layer's adapter, so backward passed through every NF4 linear.
        assert qlora.layers[0].attn.q_proj.lora_a.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    for name, m in lora_modules(qlora).items():
        weight, data, scalers = snapshot[name]
        assert m.weight is weight and nf4.is_nf4(m.weight) and m.weight.grad is None, name
        assert torch.equal(m.weight.quantized_data, data) and torch.equal(m.weight.quantized_scalers, scalers)


def test_dense_checkpoint_loads_into_qlora_model():
    lora, qlora = lora_and_qlora(seed=0)
    other = tiny_model(seed=5).state_dict()  # different dense base weights
    qlora.load_state_dict(other, strict=False)  # strict=False: the adapters are not in `other`
    k = qlora.layers[1].attn.k_proj.weight
    assert nf4.is_nf4(k)
    # torchao re-quantizes with its own float32 mean of the scales; ours sums in float64 (≤ 1 ulp apart).
    torch.testing.assert_close(nf4.dequantize(k), nf4.dequantize(nf4.to_nf4(other["layers.1.attn.k_proj.weight"])),
                               atol=1e-7, rtol=0)


def test_bf16_qlora_forward_backward():
    base = tiny_model().to(torch.bfloat16)
    qlora = apply_lora(base, ALL_TARGETS, rank=4, alpha=8, quantize_base=True)
    assert qlora.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # dequantizes back to bf16
    logits = qlora(TOKENS)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert qlora.output.lora_b.weight.grad.dtype == torch.bfloat16


def test_merge_refused_but_merged_weight_dequantizes():
    _, qlora = lora_and_qlora()
    m = qlora.layers[1].mlp.down_proj
    with pytest.raises(RuntimeError, match="merged_weight"):
        m.merge()
    expected = nf4.dequantize(m.weight) + m.scaling * m.lora_b.weight @ m.lora_a.weight
    merged = m.merged_weight()
    assert not nf4.is_nf4(merged) and torch.allclose(merged, expected, atol=1e-6)


def test_tied_output_stays_dense():
    model = apply_lora(tiny_model(tie=True), ["q_proj", "output"], rank=4, alpha=8, quantize_base=True)
    assert nf4.is_nf4(model.layers[0].attn.q_proj.weight)
    assert model.output.weight is model.tok_embeddings.weight and not nf4.is_nf4(model.output.weight)


def test_scale_groups_end_at_row_ends_and_bad_sizes_error():
    # SmolLM2-135M's q_proj (576×576): 9 blocks of 64 per row, so groups of 9 scales (never two rows).
    w = torch.randn(576, 576) * 0.02
    q = nf4.to_nf4(w)
    assert q.scaler_block_size == 9 and q.quantization_factor.numel() == 576
    assert nf4.to_nf4(torch.randn(4, 8192)).scaler_block_size == 128  # Llama 70B's width: 128 blocks per row
    assert nf4.to_nf4(torch.randn(2, 28672)).scaler_block_size == 224  # its down_proj: 448 blocks per row
    assert (nf4.dequantize(q) - w).norm() / w.norm() < 0.12
    with pytest.raises(ValueError, match="my.layer.*multiple of the block size 64"):
        nf4.to_nf4(torch.randn(10, 10), name="my.layer")


def test_our_quantizer_is_torchaos_with_row_aligned_groups():
    """Same levels, codes and scales as torchao's own quantizer at the same group size."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    w = torch.randn(96, 640, generator=torch.Generator().manual_seed(3)) * 0.02
    ours, theirs = nf4.to_nf4(w), NF4Tensor.from_tensor(w, 64, 10)
    assert torch.equal(ours.nf4, theirs.nf4) and torch.equal(ours.quantized_data, theirs.quantized_data)
    torch.testing.assert_close(ours.scaler_mean, theirs.scaler_mean, atol=0, rtol=3e-7)  # 1-2 float32 ulp
    torch.testing.assert_close(nf4.dequantize(ours), nf4.dequantize(theirs), atol=1e-7, rtol=0)


def test_row_slices_quantized_with_the_global_mean_are_the_whole_weight_to_the_bit():
    """What each FSDP rank does with its rows (plus the shared mean) reassembles the one-process tensor."""
    w = torch.randn(96, 576, generator=torch.Generator().manual_seed(4)) * 0.02
    whole = nf4.to_nf4(w)
    sums = torch.zeros(96, dtype=torch.float64)
    for rows in (slice(0, 32), slice(32, 64), slice(64, 96)):  # three "ranks", each summing its own rows
        sums[rows] = nf4.row_scale_sums(w[rows])
    mean = nf4.scale_mean(sums, w.numel() // 64, w.dtype)
    parts = [nf4.to_nf4(w[r], mean=mean) for r in (slice(0, 32), slice(32, 64), slice(64, 96))]
    for buffer in ("quantized_data", "quantized_scalers", "quantization_factor"):
        assert torch.equal(torch.cat([getattr(p, buffer) for p in parts]), getattr(whole, buffer)), buffer
    assert torch.equal(mean, whole.scaler_mean)
    with pytest.raises(ValueError, match="96 rows do not split evenly over 5 processes"):
        nf4.check_shardable((96, 576), 5, "layers.0.attn.q_proj.weight")
