"""The memory estimate's terms against what a real model holds.

Each term is checked against an independent count on a real (small) model: parameter and
optimizer-state bytes by summing tensors; activations by recording every tensor autograd saves
for backward (``saved_tensors_hooks``, deduplicated by storage); NF4 bytes from torchao's actual
buffers. Whole-run peaks are compared with measured peak RSS in bench/bench_lora.py
(BENCHMARKS.md); the dry-run CLI path is checked to print the estimate.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tunesmith.models import apply_lora, builders
from tunesmith.models.llama import Llama
from tunesmith.models.lora import LoRALinear
from tunesmith.training import cli
from tunesmith.training.memory import GIB, estimate, model_config

SHAPE = dataclasses.replace(builders.smollm2_135m(), num_layers=2, vocab_size=2048)  # real widths, few layers
TARGETS = ["q_proj", "v_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def saved_activation_bytes(model: Llama, tokens: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves during ``hidden_states`` (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.hidden_states(tokens)
    return sum(seen.values())


@pytest.mark.parametrize("dtype,checkpointing,attention", [
    ("fp32", False, "sdpa"), ("bf16", False, "sdpa"), ("fp32", True, "sdpa"), ("fp32", False, "matmul"),
    ("bf16", False, "matmul"),
])
def test_activation_term_matches_what_autograd_saves(dtype, checkpointing, attention):
    torch.manual_seed(0)
    model = Llama(SHAPE).to(DTYPES[dtype])
    apply_lora(model, TARGETS, rank=8, alpha=16)
    model.train()
    model.activation_checkpointing = checkpointing
    model.set_attention(attention)
    # matmul attention: long enough that its probabilities (¾·h·s per token, the causal split) are a
    # large share, so counting the full h·s would miss the 5% tolerance.
    b, s = 2, 512 if attention == "matmul" else 128
    measured = saved_activation_bytes(model, torch.randint(0, SHAPE.vocab_size, (b, s)))
    est = estimate(SHAPE, dtype=dtype, batch_size=b, seq_len=s, rank=8, targets=TARGETS,
                   activation_checkpointing=checkpointing, device_type="cuda", attention=attention)
    expected = est.activations
    if checkpointing:  # the estimate adds one block being recomputed in backward; the forward saves block inputs only
        from tunesmith.training.memory import activation_bytes_per_token_layer

        expected -= b * s * activation_bytes_per_token_layer(SHAPE, 4, 8, TARGETS)
    assert abs(expected - measured) <= 0.05 * measured, f"estimate {expected:.0f} B vs saved {measured} B"


@pytest.mark.parametrize("quantize_base,optimizer", [(False, "adamw"), (True, "adamw8bit")])
def test_weight_adapter_and_optimizer_terms_match_real_tensors(quantize_base, optimizer):
    pytest.importorskip("bitsandbytes")
    from tunesmith.training.setup import build_optimizer

    torch.manual_seed(0)
    cfg = dataclasses.replace(SHAPE, tie_embeddings=False)
    targets = ["q_proj", "v_proj", "down_proj", "output"]
    model = Llama(cfg).to(torch.bfloat16)
    apply_lora(model, targets, rank=64, alpha=64, quantize_base=quantize_base)
    est = estimate(cfg, dtype="bf16", batch_size=1, seq_len=8, rank=64, targets=targets,
                   quantize_base=quantize_base, optimizer=optimizer, device_type="cuda")

    def nbytes(t: torch.Tensor) -> int:
        if isinstance(t, LoRALinear) or not hasattr(t, "quantized_data"):
            return t.numel() * t.element_size()
        return sum(x.numel() * x.element_size() for x in (t.quantized_data, t.quantized_scalers,
                                                          t.quantization_factor, t.scaler_mean, t.nf4))

    base = sum(nbytes(p) for n, p in model.named_parameters() if "lora_" not in n)
    held = est.weights + est.nf4
    assert abs(held - base) <= 0.01 * base, f"weights: estimate {held / GIB:.4f} vs {base / GIB:.4f} GiB"
    if quantize_base:  # the NF4 term alone, to the byte: codes, block scales, group factors, mean, levels
        nf4_held = sum(nbytes(p) for n, p in model.named_parameters() if "lora_" not in n and hasattr(p, "quantized_data"))
        assert est.nf4 == nf4_held

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(trainable, optimizer, lr=1e-3, weight_decay=0.0)
    for p in trainable:
        p.grad = torch.randn_like(p)
    opt.step()
    grads_and_values = 2 * sum(p.numel() * p.element_size() for p in trainable)
    assert est.adapters == grads_and_values
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
                if isinstance(t, torch.Tensor) and k in ("exp_avg", "exp_avg_sq", "state1", "state2"))
    assert abs(est.optimizer - state) <= 0.01 * state, f"optimizer: estimate {est.optimizer} vs {state}"


def test_dry_run_prints_the_estimate(tiny_llama_dir, tiny_data, tmp_path, capsys):
    assert model_config(str(tiny_llama_dir)).hidden_size == 64  # read from config.json, no weights
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_llama_dir}\ndata:\n  train: {tiny_data['train']}\n  max_seq_len: 64\n"
                      f"output_dir: {tmp_path / 'out'}\ndevice: cpu\n")
    assert cli.main(["qlora_single_device", "--config", str(config), "--dry-run", "batch_size=2"]) in (0, None)
    out = capsys.readouterr().out
    for term in ("weights", "adapters", "optimizer", "activations", "logits", "total"):
        assert term in out
    assert not (tmp_path / "out").exists()  # nothing ran
