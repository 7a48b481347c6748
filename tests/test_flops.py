"""The step FLOP counter (training/flops.py) against a hand count and against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tunesmith.models import apply_lora
from tunesmith.models.llama import Llama, LlamaConfig, matmul_attention_keys_per_query
from tunesmith.training.flops import gemm_rate, train_step_flops
from tunesmith.training.losses import CrossEntropyLoss

TINY = LlamaConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)


def test_hand_count_lora_q_v():
    # d=32, hd=8, q=32, kv=16, I=48, v=96, r=2; 1 row of 4 tokens; causal K = (4+1)/2 = 2.5.
    T, d, q, kv, I, v, r, K, h, hd = 4, 32, 32, 16, 48, 96, 2, 2.5, 4, 8
    base = 2 * T * (d * q + 2 * d * kv + q * d + 3 * d * I)  # one block's base linears
    lora_fwd = 2 * T * r * (d + q) + 2 * T * r * (d + kv)
    attn = 2 * T * h * hd * K
    forward = 2 * (base + lora_fwd + 2 * attn) + 2 * T * d * v
    # Input grads: layer 0 skips q/k/v (input from the frozen embedding) and its adapters' A inputs, and dK
    # (k frozen); layer 1 has them all. B's input always (A trains).
    lin_in_l0 = 2 * T * (q * d + 3 * d * I)
    lin_in_l1 = base
    lora_in_l0 = 2 * T * r * (q + kv)
    lora_in_l1 = lora_in_l0 + 2 * T * r * (d + d)
    attn_in_l0 = 3 * attn  # dP, dQ, dV
    attn_in_l1 = 4 * attn  # k's input needs a gradient, so k does: dK too
    input_grad = lin_in_l0 + lin_in_l1 + lora_in_l0 + lora_in_l1 + attn_in_l0 + attn_in_l1 + 2 * T * d * v
    weight_grad = 2 * lora_fwd
    f = train_step_flops(TINY, rows=1, seq_len=4, targets=["q_proj", "v_proj"], rank=2)
    assert f.forward == pytest.approx(forward)
    assert f.input_grad == pytest.approx(input_grad)
    assert f.weight_grad == pytest.approx(weight_grad)
    assert f.recompute == 0
    ckpt = train_step_flops(TINY, rows=1, seq_len=4, targets=["q_proj", "v_proj"], rank=2, activation_checkpointing=True)
    assert ckpt.recompute == pytest.approx(2 * (base + lora_fwd + 2 * attn))
    full = train_step_flops(TINY, rows=1, seq_len=4, full=True)
    assert full.weight_grad == pytest.approx(2 * base + 2 * T * d * v)
    assert full.input_grad == pytest.approx(2 * base + 2 * 4 * attn + 2 * T * d * v)


def _counted_step(targets: list[str] | None, seq: int, labelled_every: int = 1) -> tuple[float, float]:
    """(FlopCounterMode's GEMM FLOPs of one eager step, train_step_flops' count) for a tiny model."""
    torch.manual_seed(0)
    model = Llama(TINY)
    if targets is None:
        model.requires_grad_(True)
    else:
        apply_lora(model, targets, rank=2, alpha=4.0)
        for name, p in model.named_parameters():  # B = 0 would still cost its GEMMs; values don't matter
            if "lora_b" in name:
                torch.nn.init.normal_(p)
    model.set_attention("matmul")
    model.train()
    tokens = torch.randint(0, TINY.vocab_size, (2, seq))
    labels = torch.randint(0, TINY.vocab_size, (2, seq))
    labels[:, ::labelled_every] = -100 if labelled_every > 1 else labels[:, ::labelled_every]
    labelled = int((labels != -100).sum())
    with FlopCounterMode(display=False) as counter:
        loss = CrossEntropyLoss(chunk_size=16)(model.hidden_states(tokens), labels, model.logits)
        loss.backward()
    ours = train_step_flops(TINY, rows=2, seq_len=seq, targets=targets or [], rank=2, full=targets is None,
                            labelled=labelled, keys_per_query=matmul_attention_keys_per_query(seq),
                            head_recompute=targets is None and labelled > 16)  # a trained head: chunks checkpointed
    return float(counter.get_total_flops()), ours.total


@pytest.mark.parametrize("targets, seq", [(["q_proj", "v_proj"], 16), (["q_proj", "v_proj"], 160),
                                          (["k_proj", "o_proj", "down_proj"], 16), (None, 16)])
def test_matches_flop_counter_mode_on_a_real_step(targets, seq):
    counted, ours = _counted_step(targets, seq)
    assert ours == pytest.approx(counted, rel=1e-9)


def test_only_labelled_positions_reach_the_head():
    counted, ours = _counted_step(["q_proj", "v_proj"], 16, labelled_every=2)
    assert ours == pytest.approx(counted, rel=1e-9)


def test_gemm_rate_is_positive_and_finite():
    rate = gemm_rate(TINY, torch.float32, tokens=64, seconds=0.05)
    assert 1e6 < rate < 1e16
