"""The model's weights with every LoRA update folded in, one dense tensor at a time: what exports write.

    iter_merged_tensors(model) ─► (our name, dense tensor) ─┬─► save_hf_checkpoint (safetensors shards)
                                                            └─► any other writer (GGUF, …)

For each weight of the model, in parameter order:

* a plain parameter, as it is;
* a LoRA layer's base weight with its update folded in, ``W + (alpha / r) · B A`` computed in fp32
  and cast to the base's dtype; an NF4 base is dequantized first (so a QLoRA model exports dense);
* under FSDP2 (parameters are DTensor shards) the same, collectively: each rank merges only its
  own rows (its NF4 rows dequantized, plus its rows of B times the whole, small A), and the rows
  are all-gathered into the full tensor. EVERY rank must iterate the stream to the end, in step,
  and every rank receives each full tensor: write it on rank 0 only.

Only one merged tensor exists at a time, so a writer that flushes as it goes never holds the
whole merged model (``save_hf_checkpoint`` keeps at most one output file's worth on the CPU).

Names are OUR parameter names (``layers.0.attn.q_proj.weight``), the same for every family; a
writer maps them with the family's name table. Adapter tensors (``lora_a`` / ``lora_b``) are not
yielded. A tied parameter is yielded once, under its first name (``tok_embeddings.weight``),
unless a LoRA update on one of its uses makes that use differ: then that use is yielded as well,
merged (``output.weight`` of a tied model whose head was adapted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from tunesmith.models import nf4
from tunesmith.models.lora import LoRALinear


def _entries(model: nn.Module) -> Iterator[tuple[str, Tensor, LoRALinear | None]]:
    """(name, parameter, LoRA layer whose update it takes or None) in stream order."""
    lora = {(f"{n}.weight" if n else "weight"): m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    adapters = {f"{n.removesuffix('weight')}{ab}.weight" for n in lora for ab in ("lora_a", "lora_b")}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in adapters:
            continue
        module = lora.get(name)
        update = module if module is not None and not module.merged else None
        if id(p) in seen and update is None:
            continue  # a tied use with nothing of its own to add
        seen.add(id(p))
        yield name, p, update


def merged_config(model: nn.Module) -> Any:
    """The config of the merged model: ``model.config``, untied when a LoRA update sits on a shared
    (tied) head, since the merged head then differs from the embedding and must be stored as well.

    Raises:
        ValueError: a shared weight is adapted but the config has no ``tie_embeddings`` switch.
    """
    cfg = model.config
    shared = [name for name, m in model.named_modules() if isinstance(m, LoRALinear) and m.weight_is_shared]
    if not shared:
        return cfg
    if not hasattr(cfg, "tie_embeddings"):
        raise ValueError(f"LoRA layer(s) {shared} adapt a shared weight, but {type(cfg).__name__} has no tie_embeddings "
                         "switch to save the merged head separately; save the adapter with save_peft_adapter instead")
    return dataclasses.replace(cfg, tie_embeddings=False)


def merged_tensor_specs(model: nn.Module) -> list[tuple[str, torch.Size, torch.dtype]]:
    """(name, shape, dtype) of every tensor ``iter_merged_tensors`` yields, in the same order.

    Computes nothing and communicates nothing, so a writer can plan its files up front.
    """
    return [(name, p.shape, p.dtype) for name, p, _ in _entries(model)]


def iter_merged_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(our parameter name, dense merged tensor)`` one at a time (see the module docstring).

    Args:
        model: A native model, plain or with ``LoRALinear`` layers (dense or NF4 bases), on one
            device or sharded by ``fully_shard`` (then every rank must consume the whole stream).

    Yields:
        The name and the full tensor, on the model's device, in the parameter's dtype (NF4: the
        dtype it was quantized from). The model is not modified.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for m in model.modules():  # an eval-only forward can leave the root gathered: export the shards
        if isinstance(m, FSDPModule):
            m.reshard()
    with torch.no_grad():
        for name, p, update in _entries(model):
            if not isinstance(p, DTensor):
                yield name, (update.merged_weight() if update is not None else p.detach())
                continue
            if update is None:
                yield name, p.full_tensor()
                continue
            local = p.to_local()
            rows = nf4.dequantize(local) if nf4.is_nf4(local) else local
            b = update.lora_b.weight.to_local()  # B [out, r] is split into the same rows as W [out, in]
            a = update.lora_a.weight.full_tensor()  # A [r, in] is small: every rank takes all of it
            rows = (rows.float() + update.scaling * (b.float() @ a.float())).to(rows.dtype)
            merged = DTensor.from_local(rows, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride())
            yield name, merged.full_tensor()
