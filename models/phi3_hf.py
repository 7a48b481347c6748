"""Phi-3 / Phi-4-mini ↔ Hugging Face and Phi-3 ↔ GGUF: fused names, partial rotary, LongRoPE.

The Phi-3 counterpart of ``models/llama_hf.py`` (same functions, the GGUF writer's included) for
``model_type: "phi3"`` and the ``phi3`` GGUF architecture. Our parameters are the checkpoint's tensors
one to one, fused ones included: HF ``self_attn.qkv_proj`` / ``mlp.gate_up_proj`` are llama.cpp's ``attn_qkv`` /
``ffn_up`` (the gate half first), stored unpermuted (llama.cpp runs Phi-3 with "rotate half" RoPE).

GGUF keeps what HF keeps in config.json elsewhere: the rotated dimensions in
``phi3.rope.dimension_count`` (head_dim is embedding_length / head_count), the LongRoPE factors as
the tensors ``rope_factors_long`` / ``rope_factors_short`` with ``phi3.rope.scaling.attn_factor`` and
``phi3.rope.scaling.original_context_length``, and the window in ``phi3.attention.sliding_window``
(0: none, Phi-4).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tunesmith.models.llama_hf import (
    check_supported, gguf_fields, gguf_get, gguf_names, gguf_shape_metadata, hf_names, llama_config_json, llama_fields,
    warn_window_not_run,
)
from tunesmith.models.phi3 import Phi3Config

# ------------------------------------------------------------------------------------------------
# Names. ``{i}`` is the layer index.
#                      Hugging Face                                 tunesmith
# ------------------------------------------------------------------------------------------------
HF_PER_LAYER = {
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.qkv_proj.weight": "layers.{i}.attn.qkv_proj.weight",  # rows [q | k | v]
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.o_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_up_proj.weight": "layers.{i}.mlp.gate_up_proj.weight",  # rows [gate | up]
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.down_proj.weight",
}
GGUF_PER_LAYER = {
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.attn_qkv.weight": "layers.{i}.attn.qkv_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.gate_up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}
# Phi-3's names for the old LongRoPE type, which transformers reads as longrope.
LONGROPE_ALIASES = ("su", "yarn")


def hf_to_ours(cfg: Phi3Config) -> dict[str, str | None]:
    """Every HF parameter name of a checkpoint for ``cfg`` → our name (``None``: read past it)."""
    return hf_names(HF_PER_LAYER, cfg)


def gguf_to_ours(cfg: Phi3Config) -> dict[str, str | None]:
    """Every GGUF tensor name for ``cfg`` → our name; the LongRoPE factors are read into the config."""
    names = gguf_names(GGUF_PER_LAYER, cfg)
    if cfg.rope_scaling:
        names.update({"rope_factors_long.weight": None, "rope_factors_short.weight": None})
    return names


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def _with_longrope_name(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with the legacy LongRoPE type names ("su", "yarn") spelled "longrope", as transformers reads them."""
    d = dict(d)
    for key in ("rope_scaling", "rope_parameters"):
        scaling = d.get(key)
        if scaling and scaling.get("rope_type", scaling.get("type")) in LONGROPE_ALIASES:
            d[key] = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "longrope"}
    return d


def config_from_hf(d: dict[str, Any]) -> Phi3Config:
    """Build a ``Phi3Config`` from a parsed HF ``config.json`` (``model_type: "phi3"``).

    ``partial_rotary_factor`` and ``original_max_position_embeddings`` are read at the top level
    (Hub files) or inside ``rope_parameters`` (transformers 5); missing keys take transformers'
    ``Phi3Config`` defaults (rms_norm_eps 1e-5, a 4096-token context).

    Raises:
        ValueError: naming the key, for a missing required key, residual or embedding dropout (not
            implemented: the released models train without it), or RoPE scaling other than LongRoPE.
    """
    check_supported(d, {"resid_pdrop": 0.0, "embd_pdrop": 0.0})
    d = _with_longrope_name(d)
    fields = llama_fields(d, norm_eps=1e-5, max_seq_len=4096, rope_types=("longrope",))
    params = d.get("rope_parameters") or {}
    partial = d.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    if fields["rope_scaling"]:
        scaling = {k: v for k, v in fields["rope_scaling"].items() if k != "partial_rotary_factor"}
        scaling.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings", 4096))
        fields["rope_scaling"] = scaling
    return Phi3Config(**fields, partial_rotary_factor=float(partial), sliding_window=d.get("sliding_window"),
                      pad_token_id=d.get("pad_token_id"))


def config_to_hf(cfg: Phi3Config) -> dict[str, Any]:
    """HF ``config.json`` contents for ``cfg``, as ``transformers`` and vLLM read them (Hub layout:
    ``partial_rotary_factor`` and ``original_max_position_embeddings`` at the top level)."""
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    original = scaling.pop("original_max_position_embeddings") if scaling else cfg.max_seq_len
    out = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", **llama_config_json(cfg),
           "rope_scaling": scaling, "partial_rotary_factor": cfg.partial_rotary_factor,
           "original_max_position_embeddings": original, "sliding_window": cfg.sliding_window,
           "pad_token_id": cfg.pad_token_id, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
    return out


# ------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------
def config_from_gguf(meta: dict[str, Any]) -> Phi3Config:
    """Build a ``Phi3Config`` from GGUF metadata (``general.architecture == "phi3"``).

    Args:
        meta: GGUF key → plain Python value, plus the ``rope_factors_long`` / ``rope_factors_short``
            tensors when the file has them (``gguf_loader.config_from_reader`` adds them).
    """
    fields = gguf_fields(meta)
    head_dim = fields["hidden_size"] // fields["num_heads"]  # rope.dimension_count is the rotated part
    rotary = gguf_get(meta, "rope.dimension_count", head_dim)
    scaling = None
    if "rope_factors_long" in meta:
        scaling = {
            "rope_type": "longrope",
            "long_factor": meta["rope_factors_long"].tolist(),
            "short_factor": meta["rope_factors_short"].tolist(),
            "original_max_position_embeddings": gguf_get(meta, "rope.scaling.original_context_length"),
        }
        attention_factor = gguf_get(meta, "rope.scaling.attn_factor", None)
        if attention_factor is not None:
            scaling["attention_factor"] = attention_factor
    fields.update(head_dim=head_dim, rope_scaling=scaling)
    window = gguf_get(meta, "attention.sliding_window", 0) or None
    return Phi3Config(**fields, partial_rotary_factor=rotary / head_dim, sliding_window=window,
                      pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))


def fix_gguf_tensor(our_name: str, w: Tensor, cfg: Phi3Config) -> Tensor:
    """GGUF Phi-3 tensors are already in our layout (fused as in HF, no Q/K permutation)."""
    return w


# ------------------------------------------------------------------------------------------------
# GGUF out: what the writer (models/gguf_writer.py) asks, each the inverse of a loading function above
# ------------------------------------------------------------------------------------------------
def ours_to_gguf(cfg: Phi3Config) -> dict[str, str]:
    """Our name of every tensor a GGUF file for ``cfg`` stores → its GGUF name (``gguf_to_ours`` inverted):
    the fused ``qkv_proj`` / ``gate_up_proj`` are ``attn_qkv`` / ``ffn_up`` as they are."""
    return {ours: theirs for theirs, ours in gguf_to_ours(cfg).items() if ours is not None}


def config_to_gguf(cfg: Phi3Config) -> dict[str, Any]:
    """GGUF metadata for ``cfg``, the keys llama.cpp's converter writes for Phi-3 (``config_from_gguf`` inverted).

    ``rope.dimension_count`` is the rotated part of each head (partial rotary), the window is
    ``attention.sliding_window`` (0: none), and LongRoPE adds its original context and attention
    factor here and its two factor tables as tensors (``extra_gguf_tensors``).

    llama.cpp reads the window but does not apply it to Phi-3 for now (its "Phi SWA is currently
    disabled"), so a window shorter than the context (Phi-3-mini-4k's 2047) is written with a warning.

    Raises:
        ValueError: a ``head_dim`` other than hidden_size / num_heads, which llama.cpp's phi3 assumes.
    """
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ValueError(f"head_dim={cfg.head_dim} with {cfg.num_heads} heads: llama.cpp's phi3 takes head_dim = "
                         f"hidden_size / num_heads = {cfg.hidden_size / cfg.num_heads}, so the file would run a "
                         "different model")
    warn_window_not_run("Phi-3", cfg)
    meta = gguf_shape_metadata("phi3", cfg)
    meta["phi3.rope.dimension_count"] = cfg.rotary_dim
    meta["phi3.attention.sliding_window"] = cfg.sliding_window or 0
    meta["phi3.rope.scaling.original_context_length"] = (
        cfg.rope_scaling["original_max_position_embeddings"] if cfg.rope_scaling else cfg.max_seq_len)
    if cfg.rope_scaling:
        meta["phi3.rope.scaling.attn_factor"] = float(cfg.attention_factor)
    return meta


def extra_gguf_tensors(cfg: Phi3Config) -> dict[str, Tensor]:
    """LongRoPE's per-frequency divisors as llama.cpp's ``rope_factors_long`` / ``rope_factors_short``
    tensors (what ``config_from_gguf`` reads back into ``rope_scaling``); none without LongRoPE."""
    if not cfg.rope_scaling:
        return {}
    return {f"rope_factors_{kind}.weight": torch.tensor(cfg.rope_scaling[f"{kind}_factor"], dtype=torch.float32)
            for kind in ("long", "short")}


def to_gguf_tensor(our_name: str, w: Tensor, cfg: Phi3Config) -> Tensor:
    """Our parameter in llama.cpp's layout: unchanged (fused as in HF, Q/K rows not permuted)."""
    return w
