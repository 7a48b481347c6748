"""NF4 (4-bit NormalFloat) storage for frozen base weights: the "Q" in QLoRA.

We use torchao's ``NF4Tensor`` rather than our own kernels. What it stores, per weight matrix,
flattened row-major into blocks of ``block_size`` = 64 values (QLoRA paper, Dettmers et al. 2023):

* each value as a 4-bit index into the 16 NF4 levels (quantiles of a standard normal, scaled to
  [-1, 1]), packed two per byte;
* one absmax scale per 64-value block. These scales are themselves quantized ("double
  quantization", paper §3): torchao subtracts their mean and stores them as int8 with one fp
  factor per group of ``scaler_block_size`` scales (256 by default). The paper uses FP8 for the
  second level; int8 with a mean offset is torchao's equivalent. Verified by reading
  ``NF4Tensor.double_quantize_scalers`` in torchao 0.18: ``quantized_scalers`` is int8,
  ``quantization_factor`` has one entry per scaler group, ``scaler_mean`` is a single value.

So a weight costs about 4 + 8/64 + 32/(64·256) ≈ 4.13 bits per value instead of 16 (bf16).

``linear_nf4`` dequantizes the weight to the input's dtype inside the matmul and never produces
a gradient for it, which is exactly what a frozen QLoRA base needs.

Two behaviours of NF4Tensor worth knowing (torchao 0.18):

* ``module.load_state_dict`` with a dense tensor for an NF4 parameter re-quantizes it with that
  parameter's block sizes, so dense checkpoints load straight into a QLoRA model.
* ``copy.deepcopy`` / ``clone`` re-quantize with torchao's *default* group size of 256 and fail
  for shapes whose block count 256 does not divide; use ``disable_adapters`` instead of a
  deep-copied reference model, or deep-copy before quantizing.

torchao is imported lazily: importing it costs ~1.5 s and prints warnings about CUDA-only
extensions, which plain LoRA or inference runs should not pay for.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK_SIZE = 64  # values per first-level absmax scale (QLoRA paper)
SCALER_BLOCK_SIZE = 256  # first-level scales per second-level factor (QLoRA paper)


def _nf4_module():
    # The module that defines NF4Tensor, to_nf4 and linear_nf4 (torchao >= 0.18 path).
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    return nf4_tensor


def is_nf4(t: Tensor) -> bool:
    """True if ``t`` is a torchao NF4Tensor. Does not import torchao unless it is already loaded,
    because a tensor can only be an NF4Tensor if torchao was imported to make it."""
    import sys

    module = sys.modules.get("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    return module is not None and isinstance(t, module.NF4Tensor)


def _scaler_block_size(n_blocks: int) -> int:
    """Largest group size ≤ 256 that divides the number of 64-value blocks.

    torchao needs the scales to split evenly into groups. 256 does not divide every real shape:
    SmolLM2-135M's q_proj (576×576) has 5184 blocks, so it gets groups of 216 instead. A smaller
    group only adds one fp32 factor per group (negligible memory) and is slightly more accurate.
    """
    for size in range(min(SCALER_BLOCK_SIZE, n_blocks), 0, -1):
        if n_blocks % size == 0:
            return size
    return 1  # unreachable: 1 divides everything


def to_nf4(weight: Tensor, name: str = "weight") -> Tensor:
    """Quantize a dense weight [out, in] to an NF4Tensor (keeps the original dtype for dequant).

    Args:
        weight: Dense floating-point weight; its element count must be a multiple of 64.
        name: Used in the error message (e.g. the parameter's full name).

    Raises:
        ValueError: If the weight cannot be split into 64-value blocks.
    """
    if weight.numel() % BLOCK_SIZE != 0:
        raise ValueError(
            f"cannot NF4-quantize {name} with shape {tuple(weight.shape)}: its {weight.numel()} values are "
            f"not a multiple of the block size {BLOCK_SIZE}; leave this layer out of the LoRA targets "
            "or set quantize_base: false"
        )
    n_blocks = weight.numel() // BLOCK_SIZE
    return _nf4_module().to_nf4(weight.detach().contiguous(), BLOCK_SIZE, _scaler_block_size(n_blocks))


def linear_nf4(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ dequant(weight).T`` with the NF4 weight dequantized to ``x.dtype``; no weight grad."""
    return _nf4_module().linear_nf4(x, weight)


def dequantize(weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Dense copy of an NF4 weight, in ``dtype`` (default: the dtype it was quantized from)."""
    return weight.get_original_weight().to(dtype or weight.dtype)
