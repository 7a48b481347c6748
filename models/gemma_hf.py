"""Gemma 1/2/3 ↔ Hugging Face and Gemma ↔ GGUF: parameter names, config fields, the norm offset.

The Gemma counterpart of ``models/llama_hf.py``, with the same functions so the generic
reader/writer (``hf_checkpoint.py``, ``gguf_loader.py``, ``peft_adapter.py``) handles both families:

* ``config_from_hf(d)`` / ``config_to_hf(cfg)``: HF ``config.json`` ↔ ``GemmaConfig``
  (``model_type`` ``gemma``, ``gemma2``, ``gemma3_text``);
* ``hf_to_ours(cfg)``: every HF parameter name → our state-dict name (``None`` = skip it);
* ``config_from_gguf(meta)`` / ``gguf_to_ours(cfg)`` / ``fix_gguf_tensor(...)``: the same for GGUF;
* ``config_to_gguf(cfg)`` / ``ours_to_gguf(cfg)`` / ``to_gguf_tensor(...)`` / ``extra_gguf_tensors(cfg)``:
  their inverses, for the GGUF writer (``models/gguf_writer.py``).

Two Gemma-specific traps live here. First, HF's ``post_attention_layernorm`` is the norm *before the
MLP* in Gemma 1 (as in Llama) but the norm *after attention* in Gemma 2/3, where the pre-MLP norm is
``pre_feedforward_layernorm``. Second, llama.cpp's converter stores every Gemma norm weight with the
``+ 1`` of ``(1 + w)`` already added; ``fix_gguf_tensor`` subtracts it again, ``to_gguf_tensor`` adds it. Gemma's Q and K rows are
*not* permuted in GGUF (llama.cpp runs Gemma with the same "rotate half" RoPE as HF).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tunesmith.models.gemma import GLOBAL, SLIDING, GemmaConfig, default_layer_types
from tunesmith.models.llama_hf import expand_names, gguf_shape_metadata

HF_MODEL_TYPES = {1: "gemma", 2: "gemma2", 3: "gemma3_text"}
HF_ARCHITECTURES = {1: "GemmaForCausalLM", 2: "Gemma2ForCausalLM", 3: "Gemma3ForCausalLM"}
GGUF_ARCHITECTURES = {"gemma": 1, "gemma2": 2, "gemma3": 3}

# ------------------------------------------------------------------------------------------------
# Names. ``{i}`` is the layer index.
#                      Hugging Face                                 tunesmith
# ------------------------------------------------------------------------------------------------
HF_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_PER_LAYER_COMMON = {
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.o_proj.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.down_proj.weight",
}
HF_PER_LAYER_V1 = {  # Gemma 1: Llama's layout, "post_attention" = before the MLP
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
}
HF_PER_LAYER_V2 = {  # Gemma 2 and 3: a norm before and after each sub-layer
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.post_attn_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.post_mlp_norm.weight",
}
HF_PER_LAYER_V3 = {  # Gemma 3: QK-norm
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attn.k_norm.weight",
}

GGUF_TOP_LEVEL = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
GGUF_PER_LAYER_COMMON = {
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.weight",  # before the MLP in every version
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}
GGUF_PER_LAYER_V2 = {
    "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attn_norm.weight",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_mlp_norm.weight",
}
GGUF_PER_LAYER_V3 = {
    "blk.{i}.attn_q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.attn.k_norm.weight",
}


def _per_layer(cfg: GemmaConfig, common: dict, v1: dict, v2: dict, v3: dict) -> dict[str, str | None]:
    table = dict(common)
    table.update(v1 if cfg.version == 1 else v2)
    if cfg.version == 3:
        table.update(v3)
    return table


def hf_to_ours(cfg: GemmaConfig) -> dict[str, str | None]:
    """Every HF parameter name of a checkpoint for ``cfg`` → our name (``None``: read past it).

    Gemma ties the output head to the embeddings; if a file carries ``lm_head.weight`` anyway we
    skip it rather than let it overwrite the shared matrix.
    """
    per_layer = _per_layer(cfg, HF_PER_LAYER_COMMON, HF_PER_LAYER_V1, HF_PER_LAYER_V2, HF_PER_LAYER_V3)
    names = expand_names(HF_TOP_LEVEL, per_layer, cfg.num_layers)
    if cfg.tie_embeddings:
        names["lm_head.weight"] = None
    return names


def gguf_to_ours(cfg: GemmaConfig) -> dict[str, str | None]:
    """Every GGUF tensor name for ``cfg`` → our name (``None``: not a weight we load)."""
    per_layer = _per_layer(cfg, GGUF_PER_LAYER_COMMON, {}, GGUF_PER_LAYER_V2, GGUF_PER_LAYER_V3)
    names = expand_names(GGUF_TOP_LEVEL, per_layer, cfg.num_layers)
    if cfg.tie_embeddings:
        names["output.weight"] = None
    return names


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def _rope_kind(params: dict[str, Any] | None) -> tuple[float | None, dict[str, Any] | None]:
    """(theta, scaling or None) from one rope dict: transformers-5 ``rope_parameters`` entry or a
    classic ``rope_scaling`` dict."""
    if not params:
        return None, None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return params.get("rope_theta"), None
    scaling["rope_type"] = kind
    return params.get("rope_theta"), scaling


def _rope_from_hf(d: dict[str, Any], version: int) -> tuple[float, float, dict[str, Any] | None]:
    """(global theta, local theta, global scaling) from either config.json spelling.

    transformers 5 writes ``rope_parameters`` (for Gemma 3 one dict per layer kind:
    ``{"full_attention": {...}, "sliding_attention": {...}}``); Hub checkpoints carry the classic
    ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling`` keys.
    """
    default_global = 1_000_000.0 if version == 3 else 10000.0
    params = d.get("rope_parameters")
    if params and GLOBAL in params:  # Gemma 3, per layer kind
        theta, scaling = _rope_kind(params[GLOBAL])
        local_theta, local_scaling = _rope_kind(params.get(SLIDING))
        if local_scaling is not None:
            raise ValueError(
                f"config rope_parameters[{SLIDING!r}] has scaling {local_scaling}; Gemma 3 sliding layers "
                "use plain RoPE (scaling is only supported on full_attention layers)"
            )
    elif params:
        theta, scaling = _rope_kind(params)
        local_theta = None
    else:
        theta, scaling = d.get("rope_theta"), _rope_kind(d.get("rope_scaling"))[1]
        local_theta = d.get("rope_local_base_freq")
    theta = float(theta if theta is not None else d.get("rope_theta", default_global))
    local_theta = float(local_theta if local_theta is not None else d.get("rope_local_base_freq", 10000.0))
    return theta, local_theta, scaling


def config_from_hf(d: dict[str, Any]) -> GemmaConfig:
    """Build a ``GemmaConfig`` from a parsed HF ``config.json``.

    Accepts ``model_type`` ``gemma``, ``gemma2`` and ``gemma3_text`` (Gemma 3 270M and 1B, or any
    ``Gemma3ForCausalLM`` save). Missing keys take transformers' own class defaults.

    Raises:
        ValueError: naming the key, for an unknown model_type, a missing required key, or a feature
            this implementation does not have (biases, a non-tanh GELU, bidirectional attention).
    """
    model_type = d.get("model_type")
    if model_type == "gemma3":
        raise ValueError(
            "model_type 'gemma3' is the multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration); "
            "only the text-decoder layout (model_type 'gemma3_text', Gemma3ForCausalLM) is supported"
        )
    versions = {v: k for k, v in HF_MODEL_TYPES.items()}
    if model_type not in versions:
        raise ValueError(f"config model_type {model_type!r} is not a Gemma text model (expected {list(versions)})")
    version = versions[model_type]
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"config is missing required key(s) {missing}")

    # Gemma 1 configs say "gelu" but mean the tanh approximation (transformers rewrites it too).
    act_key = "hidden_act" if version == 1 else "hidden_activation"
    act = (d.get("hidden_activation") if version == 1 else None) or d.get(act_key) or "gelu_pytorch_tanh"
    allowed_acts = ("gelu_pytorch_tanh", "gelu") if version == 1 else ("gelu_pytorch_tanh",)
    if act not in allowed_acts:
        raise ValueError(f"config key {act_key!r} = {act!r} is not supported (only {allowed_acts})")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if d.get(key):
            raise ValueError(f"config key {key!r} = {d[key]!r} is not supported (only false)")

    theta, local_theta, scaling = _rope_from_hf(d, version)
    head_dim = d.get("head_dim") or 256
    layer_types = d.get("layer_types")
    if layer_types is None and version == 3:
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
        layer_types = default_layer_types(3, d["num_hidden_layers"], pattern)
    if version == 1:
        layer_types = None  # all global; Gemma 1 has no sliding window
    return GemmaConfig(
        version=version,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        head_dim=head_dim,
        norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_local_theta=local_theta,
        rope_scaling=scaling,
        # Gemma 1 scales scores by head_dim ** -0.5; 2 and 3 by query_pre_attn_scalar ** -0.5.
        query_pre_attn_scalar=head_dim if version == 1 else d.get("query_pre_attn_scalar", 256),
        sliding_window=None if version == 1 else d.get("sliding_window", 4096),
        layer_types=list(layer_types) if layer_types is not None else None,
        # Gemma 2's caps default on; Gemma 3's transformers model never applies an attention cap.
        attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0) if version == 2 else None,
        final_logit_softcapping=(
            d.get("final_logit_softcapping", 30.0 if version == 2 else None) if version >= 2 else None
        ),
        max_seq_len=d.get("max_position_embeddings", 131072 if version == 3 else 8192),
        tie_embeddings=d.get("tie_word_embeddings", True),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
    )


def config_to_hf(cfg: GemmaConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """HF ``config.json`` contents for ``cfg``, as ``transformers`` and vLLM read them.

    RoPE is written in the classic keys (``rope_theta``, Gemma 3's ``rope_local_base_freq`` and
    ``rope_scaling``), which every transformers version understands (5 converts them itself).
    """
    v = cfg.version
    out: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[v]],
        "model_type": HF_MODEL_TYPES[v],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        ("hidden_act" if v == 1 else "hidden_activation"): "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if v >= 2:
        out.update(
            query_pre_attn_scalar=cfg.query_pre_attn_scalar,
            sliding_window=cfg.sliding_window,
            layer_types=list(cfg.layer_types),
            final_logit_softcapping=cfg.final_logit_softcapping,
            attn_logit_softcapping=cfg.attn_logit_softcapping,
        )
    if v == 3:
        out.update(rope_local_base_freq=cfg.rope_local_theta, rope_scaling=cfg.rope_scaling)
    elif cfg.rope_scaling:
        out["rope_scaling"] = cfg.rope_scaling
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_id is not None:
        out["eos_token_id"] = cfg.eos_token_id
    return out


# ------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------
def config_from_gguf(meta: dict[str, Any]) -> GemmaConfig:
    """Build a ``GemmaConfig`` from GGUF metadata (``general.architecture`` gemma / gemma2 / gemma3).

    GGUF leaves out what llama.cpp hard-codes per architecture, so we fill the same values in:
    Gemma 3's local RoPE base (10,000) and 5:1 layer pattern, and ``query_pre_attn_scalar`` =
    hidden / heads for the 27B sizes (the only ones where it differs from ``head_dim``).

    Args:
        meta: GGUF key → plain Python value (see ``gguf_loader.read_metadata``).
    """
    arch = meta["general.architecture"]
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF general.architecture {arch!r} is not a Gemma (expected {list(GGUF_ARCHITECTURES)})")
    version = GGUF_ARCHITECTURES[arch]

    def get(key: str, default: Any = KeyError) -> Any:
        if f"{arch}.{key}" in meta:
            return meta[f"{arch}.{key}"]
        if default is KeyError:
            raise ValueError(f"GGUF metadata is missing {arch}.{key}")
        return default

    num_layers, hidden, num_heads = get("block_count"), get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", None) or hidden // num_heads
    is_27b = (version, num_layers) in ((2, 46), (3, 62))
    scaling = None
    if get("rope.scaling.type", None) not in (None, "none"):
        scaling = {"rope_type": get("rope.scaling.type"), "factor": float(get("rope.scaling.factor"))}
    layer_types = None
    if version == 3:
        layer_types = default_layer_types(3, num_layers, get("attention.sliding_window_pattern", 6))
    return GemmaConfig(
        version=version,
        vocab_size=get("vocab_size", None) or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=get("attention.head_count_kv", num_heads),
        intermediate_size=get("feed_forward_length"),
        head_dim=head_dim,
        norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_theta=get("rope.freq_base", 1_000_000.0 if version == 3 else 10000.0),
        rope_local_theta=10000.0,
        rope_scaling=scaling,
        query_pre_attn_scalar=hidden // num_heads if is_27b else head_dim,
        sliding_window=get("attention.sliding_window", None) if version >= 2 else None,
        layer_types=layer_types,
        attn_logit_softcapping=get("attn_logit_softcapping", None) if version == 2 else None,
        final_logit_softcapping=get("final_logit_softcapping", None) if version == 2 else None,
        max_seq_len=get("context_length"),
        tie_embeddings=False,  # decided by the loader: tied when the file has no output.weight
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )


def fix_gguf_tensor(our_name: str, w: Tensor, cfg: GemmaConfig) -> Tensor:
    """Turn a dequantized GGUF tensor into the layout our ``our_name`` parameter expects.

    llama.cpp stores every Gemma RMSNorm weight as ``1 + w`` (it multiplies by the stored weight
    directly); our ``GemmaRMSNorm`` adds the 1 itself, so take it off again. Nothing else changes.
    """
    if our_name.endswith("norm.weight"):
        return w - 1.0
    return w


# ------------------------------------------------------------------------------------------------
# GGUF out: what the writer (models/gguf_writer.py) asks, each the inverse of a loading function above
# ------------------------------------------------------------------------------------------------
def ours_to_gguf(cfg: GemmaConfig) -> dict[str, str]:
    """Our name of every tensor a GGUF file for ``cfg`` stores → its GGUF name (``gguf_to_ours`` inverted)."""
    return {ours: theirs for theirs, ours in gguf_to_ours(cfg).items() if ours is not None}


def config_to_gguf(cfg: GemmaConfig) -> dict[str, Any]:
    """GGUF metadata for ``cfg``: ``general.architecture`` and the ``gemma*.`` keys llama.cpp reads.

    llama.cpp hard-codes part of Gemma (see ``config_from_gguf``), so a config that differs there
    cannot be written faithfully and is refused rather than silently run differently.

    Raises:
        ValueError: an untied head on Gemma 1/2 (llama.cpp always ties them), a
            ``query_pre_attn_scalar`` other than the one llama.cpp derives, a layer pattern other than
            Gemma 2's alternation / Gemma 3's 5:1, or RoPE scaling other than linear.
    """
    v = cfg.version
    a = {v: k for k, v in GGUF_ARCHITECTURES.items()}[v]
    if not cfg.tie_embeddings and v < 3:
        raise ValueError(f"llama.cpp's {a} always ties the output head to the embeddings; this model's head "
                         "is untied (e.g. LoRA on 'output'): export the HF folder or drop 'output' from the targets")
    is_27b = (v, cfg.num_layers) in ((2, 46), (3, 62))
    expected_scalar = cfg.hidden_size // cfg.num_heads if is_27b else cfg.head_dim
    if cfg.query_pre_attn_scalar != expected_scalar:
        raise ValueError(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar}: llama.cpp's {a} scales attention by "
                         f"{expected_scalar} ** -0.5 for this shape, so the GGUF file would run a different model")
    if v >= 2 and cfg.layer_types != default_layer_types(v, cfg.num_layers):
        raise ValueError(f"layer_types {cfg.layer_types} differ from the pattern llama.cpp's {a} assumes")
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind not in (None, "default", "linear"):
        raise ValueError(f"rope_scaling type {kind!r} has no GGUF encoding for Gemma here (supported: linear)")
    meta = gguf_shape_metadata(a, cfg)
    if v >= 2:
        meta[f"{a}.attention.sliding_window"] = cfg.sliding_window
    if v == 2:
        meta[f"{a}.attn_logit_softcapping"] = float(cfg.attn_logit_softcapping)
        meta[f"{a}.final_logit_softcapping"] = float(cfg.final_logit_softcapping)
    if v == 3:
        meta[f"{a}.rope.freq_base_swa"] = float(cfg.rope_local_theta)
    return meta


def extra_gguf_tensors(cfg: GemmaConfig) -> dict[str, Tensor]:
    """Tensors beyond the weights a GGUF file needs: none for Gemma."""
    return {}


def to_gguf_tensor(our_name: str, w: Tensor, cfg: GemmaConfig) -> Tensor:
    """Our parameter ``our_name`` in the layout llama.cpp expects: norm weights as ``1 + w``."""
    if our_name.endswith("norm.weight"):
        return w + 1.0
    return w
