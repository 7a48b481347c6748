"""Qwen2/2.5/3 ↔ Hugging Face and Qwen ↔ GGUF: Llama's names plus the biases or the QK-norm.

The Qwen counterpart of ``models/llama_hf.py``, with the same functions (``config_from_hf``,
``config_to_hf``, ``hf_to_ours``, ``config_from_gguf``, ``gguf_to_ours``, ``fix_gguf_tensor`` and the
GGUF writer's ``config_to_gguf``, ``ours_to_gguf``, ``to_gguf_tensor``, ``extra_gguf_tensors``), for
``model_type`` ``qwen2`` (Qwen2 and Qwen2.5) and ``qwen3``, and GGUF architectures of the same names.

A Qwen checkpoint is a Llama checkpoint with, per layer, the q/k/v biases (Qwen2) or the two
per-head norms (Qwen3). llama.cpp runs Qwen with "rotate half" RoPE as HF does, so unlike Llama's
its Q and K rows are *not* permuted in GGUF and need no un-permute (nor a permute on the way out).
Sliding-window settings (``use_sliding_window``, ``max_window_layers``) have no GGUF key: llama.cpp
does not implement them, so a model with local layers is not written as GGUF.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tunesmith.models.llama import GLOBAL, SLIDING
from tunesmith.models.llama_hf import (
    GGUF_PER_LAYER, HF_PER_LAYER, check_supported, gguf_fields, gguf_names, gguf_shape_metadata, hf_names,
    llama_config_json, llama_fields,
)
from tunesmith.models.qwen import QwenConfig

HF_MODEL_TYPES = {2: "qwen2", 3: "qwen3"}
HF_ARCHITECTURES = {2: "Qwen2ForCausalLM", 3: "Qwen3ForCausalLM"}
GGUF_ARCHITECTURES = {"qwen2": 2, "qwen3": 3}

# ------------------------------------------------------------------------------------------------
# Names, on top of Llama's. ``{i}`` is the layer index.
#                      Hugging Face / GGUF                          tunesmith
# ------------------------------------------------------------------------------------------------
HF_QKV_BIAS = {  # Qwen2 / 2.5
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.v_proj.bias",
}
HF_QK_NORM = {  # Qwen3
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attn.k_norm.weight",
}
GGUF_QKV_BIAS = {
    "blk.{i}.attn_q.bias": "layers.{i}.attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "layers.{i}.attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "layers.{i}.attn.v_proj.bias",
}
GGUF_QK_NORM = {
    "blk.{i}.attn_q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.attn.k_norm.weight",
}


def hf_to_ours(cfg: QwenConfig) -> dict[str, str | None]:
    """Every HF parameter name of a checkpoint for ``cfg`` → our name (``None``: read past it)."""
    return hf_names({**HF_PER_LAYER, **(HF_QKV_BIAS if cfg.version == 2 else HF_QK_NORM)}, cfg)


def gguf_to_ours(cfg: QwenConfig) -> dict[str, str | None]:
    """Every GGUF tensor name for ``cfg`` → our name (``None``: not a weight we load)."""
    return gguf_names({**GGUF_PER_LAYER, **(GGUF_QKV_BIAS if cfg.version == 2 else GGUF_QK_NORM)}, cfg)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def _sliding_from_hf(d: dict[str, Any]) -> tuple[int | None, list[str]]:
    """(sliding_window, layer_types) as transformers derives them.

    The window counts only with ``use_sliding_window``; then the layers from ``max_window_layers`` on
    are local, unless the file lists ``layer_types`` itself (transformers 5 writes them).
    """
    num_layers = d["num_hidden_layers"]
    window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
    if window is None:
        return None, [GLOBAL] * num_layers
    if d.get("layer_types") is not None:
        return window, list(d["layer_types"])
    first_local = d.get("max_window_layers", 28)
    return window, [SLIDING if i >= first_local else GLOBAL for i in range(num_layers)]


def config_from_hf(d: dict[str, Any]) -> QwenConfig:
    """Build a ``QwenConfig`` from a parsed HF ``config.json`` (``model_type`` ``qwen2`` or ``qwen3``).

    Missing keys take transformers' own class defaults (Qwen3: ``head_dim`` 128).

    Raises:
        ValueError: naming the key, for an unknown model_type, a missing required key or a feature this
            implementation does not have (Qwen3's ``attention_bias``, RoPE scaling other than linear).
    """
    versions = {v: k for k, v in HF_MODEL_TYPES.items()}
    if d.get("model_type") not in versions:
        raise ValueError(f"config model_type {d.get('model_type')!r} is not a dense Qwen (expected {list(versions)})")
    version = versions[d["model_type"]]
    if version == 3:  # would put a bias on all four projections, o_proj too; no Qwen3 release has one
        check_supported(d, {"attention_bias": False})
    fields = llama_fields(d, norm_eps=1e-6, max_seq_len=32768, head_dim=128 if version == 3 else None,
                          rope_types=("linear",))
    window, layer_types = _sliding_from_hf(d)
    return QwenConfig(**fields, version=version, sliding_window=window, layer_types=layer_types)


def config_to_hf(cfg: QwenConfig) -> dict[str, Any]:
    """HF ``config.json`` contents for ``cfg``, as ``transformers`` and vLLM read them.

    The local layers are written both ways: ``layer_types`` (transformers 5) and the classic
    ``use_sliding_window`` + ``max_window_layers`` (the first local layer), which older readers use.
    """
    local = [i for i, kind in enumerate(cfg.layer_types) if kind == SLIDING]
    out = {
        "architectures": [HF_ARCHITECTURES[cfg.version]],
        "model_type": HF_MODEL_TYPES[cfg.version],
        **llama_config_json(cfg),
        "use_sliding_window": bool(local),
        "sliding_window": cfg.sliding_window if local else None,
        "max_window_layers": local[0] if local else cfg.num_layers,
        "layer_types": list(cfg.layer_types),
    }
    if cfg.version == 3:
        out["attention_bias"] = False
    return out


# ------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------
def config_from_gguf(meta: dict[str, Any]) -> QwenConfig:
    """Build a ``QwenConfig`` from GGUF metadata (``general.architecture`` qwen2 / qwen3).

    Qwen3's ``head_dim`` is ``qwen3.attention.key_length`` (llama.cpp writes it from config.json).
    """
    arch = meta["general.architecture"]
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF general.architecture {arch!r} is not a dense Qwen (expected {list(GGUF_ARCHITECTURES)})")
    return QwenConfig(**gguf_fields(meta), version=GGUF_ARCHITECTURES[arch])


def fix_gguf_tensor(our_name: str, w: Tensor, cfg: QwenConfig) -> Tensor:
    """GGUF Qwen tensors are already in our layout (no Q/K permutation, plain norm weights)."""
    return w


# ------------------------------------------------------------------------------------------------
# GGUF out: what the writer (models/gguf_writer.py) asks, each the inverse of a loading function above
# ------------------------------------------------------------------------------------------------
def ours_to_gguf(cfg: QwenConfig) -> dict[str, str]:
    """Our name of every tensor a GGUF file for ``cfg`` stores → its GGUF name (``gguf_to_ours`` inverted):
    Llama's names plus ``attn_{q,k,v}.bias`` (Qwen2) or ``attn_{q,k}_norm.weight`` (Qwen3)."""
    return {ours: theirs for theirs, ours in gguf_to_ours(cfg).items() if ours is not None}


def config_to_gguf(cfg: QwenConfig) -> dict[str, Any]:
    """GGUF metadata for ``cfg``: ``general.architecture`` (``qwen2`` / ``qwen3``) and its keys.

    ``head_dim`` goes in ``attention.key_length`` (and ``rope.dimension_count``: Qwen rotates whole
    heads), which is where ``config_from_gguf`` and llama.cpp read Qwen3's ``head_dim`` from.

    Raises:
        ValueError: a config with local (sliding-window) layers: llama.cpp's Qwen attends globally in
            every layer, so the file would run a different model past the window.
    """
    if SLIDING in cfg.layer_types:
        local = [i for i, kind in enumerate(cfg.layer_types) if kind == SLIDING]
        raise ValueError(f"layers {local} use a {cfg.sliding_window}-token sliding window, which llama.cpp's "
                         f"qwen{cfg.version} does not implement; export the HF folder instead")
    arch = {v: k for k, v in GGUF_ARCHITECTURES.items()}[cfg.version]
    meta = gguf_shape_metadata(arch, cfg)
    meta[f"{arch}.rope.dimension_count"] = cfg.head_dim
    return meta


def extra_gguf_tensors(cfg: QwenConfig) -> dict[str, Tensor]:
    """Tensors beyond the weights a GGUF file needs: none for Qwen."""
    return {}


def to_gguf_tensor(our_name: str, w: Tensor, cfg: QwenConfig) -> Tensor:
    """Our parameter in llama.cpp's layout: unchanged (``fix_gguf_tensor`` is the identity too)."""
    return w
