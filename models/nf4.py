"""NF4 (4-bit NormalFloat) storage for frozen base weights: the "Q" in QLoRA.

We store weights in torchao's ``NF4Tensor`` (its dequantizing matmul and its FSDP2 all-gather
hooks) and build the tensor ourselves from torchao's pieces. What it stores, per weight matrix
[out, in], flattened row-major into blocks of ``BLOCK_SIZE`` = 64 values (QLoRA paper, Dettmers
et al. 2023):

* each value as a 4-bit index into the 16 NF4 levels (quantiles of a standard normal, scaled to
  [-1, 1]), packed two per byte;
* one absmax scale per 64-value block. These scales are themselves quantized ("double
  quantization", paper §3): their mean is subtracted and they are stored as int8 with one fp
  factor per group of ``scaler_block_size`` scales. The paper uses FP8 for the second level;
  int8 with a mean offset is torchao's equivalent (``NF4Tensor.double_quantize_scalers``).

Two choices differ from ``torchao.to_nf4`` so that a weight quantizes to the same bits whether
one process holds it or W processes each hold a slice of its rows (FSDP2, ``quantize_rows``):

* **Groups never span rows.** The group size is the largest divisor ≤ 256 of the blocks per row
  (``in / 64``): 128 for in = 8192, 9 for SmolLM2's in = 576. So every row boundary, and with it
  every FSDP shard boundary, is a group boundary, and each group's int8 factor depends only on
  rows one process holds. (Smaller groups cost one extra fp factor per group: 0.06 bits per value
  at 9 blocks, nothing at 128.)
* **The scale mean is summed per row in float64, then over rows in a fixed order**
  (``row_scale_sums`` → ``scale_mean``). It is the only quantity that depends on the whole
  matrix; on W processes each rank contributes its rows' sums and the same vector is summed, so
  1 process and W processes get the same mean to the bit.

So a weight costs about 4 + 8/64 + 32/(64·g) bits per value instead of 16 (bf16).

``linear_nf4`` dequantizes the weight to the input's dtype inside the matmul and never produces
a gradient for it, which is exactly what a frozen QLoRA base needs.

Behaviours of NF4Tensor worth knowing (torchao 0.18):

* ``module.load_state_dict`` with a dense tensor for an NF4 parameter re-quantizes it with that
  parameter's block sizes (torchao's own mean), so dense checkpoints load straight into a QLoRA
  model.
* ``copy.deepcopy`` / ``clone`` re-quantize with torchao's *default* group size of 256 and fail
  for shapes whose block count 256 does not divide; use ``disable_adapters`` instead of a
  deep-copied reference model, or deep-copy before quantizing.
* FSDP2 splits an NF4Tensor along dim 0 by splitting each packed buffer evenly, so a sharded NF4
  weight needs ``out`` divisible by the number of processes (``check_shardable``).

torchao is imported lazily: importing it costs ~1.5 s and prints warnings about CUDA-only
extensions, which plain LoRA or inference runs should not pay for.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK_SIZE = 64  # values per first-level absmax scale (QLoRA paper)
SCALER_BLOCK_SIZE = 256  # most first-level scales per second-level factor (QLoRA paper)
# The 16 NF4 levels (QLoRA paper, appendix E; torchao's table, checked in tests/test_nf4.py).
NF4_LEVELS = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
              0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0)


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


def _largest_divisor(n: int, limit: int) -> int:
    return next(size for size in range(min(limit, n), 0, -1) if n % size == 0)


def scaler_block_size(shape: tuple[int, ...]) -> int:
    """Second-level group size for a weight of ``shape``: groups end at row ends when they can.

    Rows whose length is a multiple of 64 get the largest divisor ≤ 256 of their block count;
    other shapes (blocks cross rows; such a weight cannot be sharded by rows) get the largest
    divisor ≤ 256 of the whole matrix's block count.
    """
    numel = 1
    for n in shape:
        numel *= n
    per_row = shape[-1] // BLOCK_SIZE if len(shape) == 2 and shape[-1] % BLOCK_SIZE == 0 else 0
    return _largest_divisor(per_row or numel // BLOCK_SIZE, SCALER_BLOCK_SIZE)


def _check_blocks(shape: tuple[int, ...], name: str) -> int:
    numel = 1
    for n in shape:
        numel *= n
    if numel % BLOCK_SIZE != 0:
        raise ValueError(
            f"cannot NF4-quantize {name} with shape {tuple(shape)}: its {numel} values are "
            f"not a multiple of the block size {BLOCK_SIZE}; leave this layer out of the LoRA targets "
            "or set quantize_base: false"
        )
    return numel // BLOCK_SIZE


def row_scale_sums(weight: Tensor) -> Tensor:
    """Σ of each row's 64-value block absmaxes, in float64, [rows] (one entry for a 1-D weight).

    A weight whose rows are not whole blocks is summed as one row.
    """
    w = weight.detach()
    scales = w.reshape(-1, BLOCK_SIZE).abs().amax(dim=1).double()
    rows = w.shape[0] if w.dim() == 2 and w.shape[-1] % BLOCK_SIZE == 0 else 1
    return scales.view(rows, -1).sum(dim=1)


def scale_mean(row_sums: Tensor, n_blocks: int, dtype: torch.dtype) -> Tensor:
    """The double quantization's mean block scale, from ``row_scale_sums`` of every row, in ``dtype``."""
    return (row_sums.sum() / n_blocks).to(dtype)


def to_nf4(weight: Tensor, name: str = "weight", mean: Tensor | None = None) -> Tensor:
    """Quantize a dense weight [out, in] (or a slice of its rows) to an NF4Tensor.

    Args:
        weight: Dense floating-point weight; its element count must be a multiple of 64. On the
            meta device the result is an NF4Tensor shell with meta buffers of the right sizes
            (what FSDP2 shards before any data is read).
        name: Used in the error message (e.g. the parameter's full name).
        mean: The mean block scale of the WHOLE weight (``scale_mean``), when ``weight`` is only
            some of its rows; default: computed from ``weight``.

    Raises:
        ValueError: If the weight cannot be split into 64-value blocks.
    """
    m = _nf4_module()
    n_blocks = _check_blocks(tuple(weight.shape), name)
    group = scaler_block_size(tuple(weight.shape))
    w = weight.detach().contiguous()
    # Storage offset 0: a row slice of a bigger tensor must not carry its offset into the NF4 metadata
    # (FSDP2 rebuilds the gathered weight from it).
    meta = m.SubclassTensorArgs(w.size(), w.stride(), 0, w.dtype, w.device, False)
    levels = torch.tensor(NF4_LEVELS, dtype=w.dtype, device=w.device)
    if w.is_meta:
        empty = lambda n, dtype: torch.empty(n, dtype=dtype, device="meta")  # noqa: E731
        return m.NF4Tensor(meta, BLOCK_SIZE, n_blocks, group, empty(n_blocks, torch.int8),
                           empty(n_blocks // group, w.dtype), empty((), w.dtype), empty(w.numel() // 2, torch.uint8),
                           levels)
    if mean is None:
        mean = scale_mean(row_scale_sums(w), n_blocks, w.dtype)
    mean = mean.to(device=w.device, dtype=w.dtype)
    # Double quantization (torchao's formulas, with the mean given): centred scales, int8 per group.
    centred = (m.get_block_absmax(w.flatten(), BLOCK_SIZE) - mean).view(-1, group)  # [groups, group]
    absmax = centred.abs().amax(dim=1)
    factor = 256 / (2 * torch.where(absmax > 0, absmax, torch.ones_like(absmax)))  # [groups]
    scalers = (centred * factor[:, None]).round().clamp(-128, 127).flatten().to(torch.int8)
    data = m.NF4Tensor.convert_to_norm_float_weight(w, n_blocks, BLOCK_SIZE, levels)
    return m.NF4Tensor(meta, BLOCK_SIZE, n_blocks, group, scalers, factor.contiguous(), mean, data, levels)


def check_shardable(shape: tuple[int, ...], world_size: int, name: str) -> None:
    """Refuse an NF4 weight that FSDP2 could not split into W equal row slices.

    Raises:
        ValueError: naming the layer, its shape and what to do instead.
    """
    if len(shape) != 2 or shape[1] % BLOCK_SIZE:
        raise ValueError(f"{name} {tuple(shape)}: sharding an NF4 weight over processes needs rows that are "
                         f"whole {BLOCK_SIZE}-value blocks; leave this layer out of lora.targets or set quantize_base=false")
    if shape[0] % world_size:
        raise ValueError(f"{name} {tuple(shape)}: its {shape[0]} rows do not split evenly over {world_size} "
                         "processes, which FSDP2 needs for NF4 weights; use a process count that divides "
                         f"{shape[0]}, leave this layer out of lora.targets, or set quantize_base=false")


def nbytes(t: Tensor) -> int:
    """Bytes an NF4Tensor (or a dense tensor) actually stores: codes, scales, factors, mean, levels."""
    if not is_nf4(t):
        return t.numel() * t.element_size()
    return sum(x.numel() * x.element_size()
               for x in (t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean, t.nf4))


def linear_nf4(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ dequant(weight).T`` with the NF4 weight dequantized to ``x.dtype``; no weight grad."""
    return _nf4_module().linear_nf4(x, weight)


def dequantize(weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Dense copy of an NF4 weight, in ``dtype`` (default: the dtype it was quantized from)."""
    return weight.get_original_weight().to(dtype or weight.dtype)
