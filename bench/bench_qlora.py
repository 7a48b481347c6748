"""QLoRA training throughput and peak memory: tunesmith (torchao NF4) vs transformers + peft + bitsandbytes NF4.

    python bench/bench_qlora.py                        # SmolLM2-135M shape, batch 4 × 256, bf16 and fp32
    python bench/bench_qlora.py --sides tunesmith,tunesmith_default,hf_bnb --rounds 3

The LoRA benchmark (``bench_lora.py``: same shape, same random token batches, same LoRA r=8,
alpha 16 on q_proj + v_proj, AdamW, batch 4 × 256) with frozen weights in 4-bit NF4 (block 64,
double-quantized scales):

- ``tunesmith``: ``qlora_single_device``'s model, ``apply_lora(quantize_base=True)`` (torchao's
  ``NF4Tensor``, ``models/nf4.py``): the ADAPTED layers' base weights are NF4 (q, v), the other
  block linears stay dense, as the recipe does; with the speed switches of the issue's
  measurement, ``compile`` and (CPU) ``attention: matmul``;
- ``tunesmith_default``: the same with the recipe's defaults (no compile, SDPA);
- ``tunesmith_nf4_all``: every block linear in NF4 (as bitsandbytes does), compile + matmul;
- ``hf_bnb``: ``LlamaForCausalLM`` (sdpa) with every block linear a bitsandbytes ``Linear4bit``,
  as ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=<dtype>))``
  builds it, + ``get_peft_model``.

The head (tied to the embedding) stays dense on every side. Every side builds the dense random
model and quantizes it, so peak memory is counted from the first step on
(``harness.reset_peak_memory``). Log lines and tables: ``harness.py``.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from bench_lora import hf_side, shape_bench, tunesmith_side
from harness import Side, SideRun

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_every_block_linear(model: torch.nn.Module) -> None:
    """NF4 for the block linears that are not adapted too (their forward dequantizes in ``F.linear``)."""
    from tunesmith.models import nf4

    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and name.rsplit(".", 1)[-1] in BLOCK_LINEARS:
            module.weight = torch.nn.Parameter(nf4.to_nf4(module.weight.detach(), name), requires_grad=False)


def tunesmith_nf4_all(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> SideRun:
    run = tunesmith_side(args, dtype, device, quantize_base=True, before_compile=quantize_every_block_linear)
    run.estimate_gib = None  # the estimate knows NF4 for adapted layers only
    return run


SIDES = {
    "tunesmith": Side(partial(tunesmith_side, quantize_base=True), "tunesmith"),
    "tunesmith_default": Side(partial(tunesmith_side, quantize_base=True, speed=False), "tunesmith (recipe defaults)"),
    "tunesmith_nf4_all": Side(tunesmith_nf4_all, "tunesmith, all 7 linears NF4"),
    "hf_bnb": Side(partial(hf_side, quantize=True), "HF + peft + bnb"),
}


def main() -> None:
    shape_bench(__file__, __doc__, SIDES, method="QLoRA", default_sides="tunesmith,tunesmith_default,hf_bnb",
                reference="hf_bnb", steps=5, warmup=3)


if __name__ == "__main__":
    main()
