"""Llama ↔ Hugging Face and Llama ↔ GGUF: parameter names, config fields, the Q/K un-permute.

This is the one place that knows how a Llama checkpoint outside tunesmith is spelled. The generic
reader/writer (``models/hf_checkpoint.py``, ``models/gguf_loader.py``, ``models/peft_adapter.py``)
asks this module four things and nothing more:

* ``config_from_hf(d)`` / ``config_to_hf(cfg)``: HF ``config.json`` ↔ ``LlamaConfig``;
* ``hf_to_ours(cfg)``: every HF parameter name → our state-dict name (``None`` = skip it);
* ``config_from_gguf(meta)`` / ``gguf_to_ours(cfg)`` / ``fix_gguf_tensor(...)``: the same for GGUF;
* ``config_to_gguf(cfg)`` / ``ours_to_gguf(cfg)`` / ``to_gguf_tensor(...)`` / ``extra_gguf_tensors(cfg)``:
  their inverses, for the GGUF writer (``models/gguf_writer.py``).

A Llama checkpoint's layout is identical to ours apart from the names (HF stores nn.Linear weights
as [out, in], as we do), so the table below is the whole conversion. GGUF additionally permutes the
rows of Q and K; ``unpermute_qk`` undoes that and ``permute_qk`` redoes it.

The families built on Llama (``mistral_hf``, ``qwen_hf``, ``phi3_hf``) start from the shared pieces
here — ``llama_fields`` / ``llama_config_json`` (config.json) and ``gguf_fields`` (GGUF metadata) —
and add only their own keys and names.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from tunesmith.models.llama import LlamaConfig, rope_inv_freq

# ------------------------------------------------------------------------------------------------
# Names. ``{i}`` is the layer index.
#                      Hugging Face                                 tunesmith
# ------------------------------------------------------------------------------------------------
HF_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_PER_LAYER = {
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.o_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.down_proj.weight",
    # Older exports (early Llama 2 conversions) also saved RoPE's inverse frequencies; we
    # recompute them from the config, so they are read past, not loaded.
    "model.layers.{i}.self_attn.rotary_emb.inv_freq": None,
}

GGUF_TOP_LEVEL = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
GGUF_PER_LAYER = {
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}


def expand_names(top: dict[str, str | None], per_layer: dict[str, str | None], num_layers: int) -> dict[str, str | None]:
    """A name table for a whole model: the top-level entries plus ``per_layer`` for each ``{i}``."""
    names = dict(top)
    for i in range(num_layers):
        for theirs, ours in per_layer.items():
            names[theirs.format(i=i)] = None if ours is None else ours.format(i=i)
    return names


def hf_names(per_layer: dict[str, str | None], cfg: LlamaConfig) -> dict[str, str | None]:
    """Every HF parameter name of a Llama-style checkpoint with these per-layer entries → our name.

    With tied embeddings ``lm_head.weight`` is the embedding itself: HF leaves it out of the file,
    and if a file has it anyway we skip it rather than let it overwrite the shared matrix.
    """
    names = expand_names(HF_TOP_LEVEL, per_layer, cfg.num_layers)
    if cfg.tie_embeddings:
        names["lm_head.weight"] = None
    return names


def gguf_names(per_layer: dict[str, str | None], cfg: LlamaConfig) -> dict[str, str | None]:
    """Every GGUF tensor name of a Llama-style file with these per-layer entries → our name
    (``None``: not a weight we load)."""
    names = expand_names(GGUF_TOP_LEVEL, per_layer, cfg.num_layers)
    if cfg.tie_embeddings:
        names["output.weight"] = None
    if cfg.rope_scaling:
        names["rope_freqs.weight"] = None  # already turned into cfg.rope_scaling; RoPE is recomputed
    return names


def hf_to_ours(cfg: LlamaConfig) -> dict[str, str | None]:
    """Every HF parameter name of a checkpoint for ``cfg`` → our name (``None``: read past it)."""
    return hf_names(HF_PER_LAYER, cfg)


def gguf_to_ours(cfg: LlamaConfig) -> dict[str, str | None]:
    """Every GGUF tensor name for ``cfg`` → our name (``None``: not a weight we load)."""
    return gguf_names(GGUF_PER_LAYER, cfg)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either transformers-5 ``rope_parameters`` or the classic
    ``rope_theta`` + ``rope_scaling`` pair that Hub checkpoints carry."""
    params = d.get("rope_parameters")
    if params:
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = dict(d["rope_scaling"]) if d.get("rope_scaling") else {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return float(theta), None
    scaling["rope_type"] = kind
    scaling.pop("type", None)
    return float(theta), scaling


def check_supported(d: dict[str, Any], supported: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first key of ``d`` set to something other than ``supported[key]``."""
    for key, value in supported.items():
        if d.get(key, value) != value:
            raise ValueError(f"config key {key!r} = {d[key]!r} is not supported (only {value!r})")


def llama_fields(
    d: dict[str, Any],
    *,
    norm_eps: float = 1e-6,
    max_seq_len: int = 2048,
    head_dim: int | None = None,
    rope_types: tuple[str, ...] = ("linear", "llama3"),
) -> dict[str, Any]:
    """The ``LlamaConfig`` fields of a Llama-style ``config.json``, as keyword arguments.

    Llama, Mistral, Qwen and Phi-3 spell these keys the same way, so their family modules start from
    this and add their own. A missing optional key takes the default given: each family passes the
    defaults of its own transformers config class.

    Args:
        rope_types: The ``rope_scaling`` types the family's model implements.

    Raises:
        ValueError: naming a missing required key, an activation other than SiLU, or a RoPE
            scaling type the model does not implement.
    """
    check_supported(d, {"hidden_act": "silu"})
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"config is missing required key(s) {missing}")
    theta, scaling = _rope_from_hf(d)
    if scaling and scaling["rope_type"] not in rope_types:
        raise ValueError(
            f"config key 'rope_scaling' has type {scaling['rope_type']!r}, which is not supported "
            f"(supported: {', '.join(rope_types)}, or none)"
        )
    return dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        head_dim=d.get("head_dim") or head_dim,
        norm_eps=d.get("rms_norm_eps", norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=d.get("max_position_embeddings", max_seq_len),
        tie_embeddings=d.get("tie_word_embeddings", False),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
    )


def config_from_hf(d: dict[str, Any]) -> LlamaConfig:
    """Build a ``LlamaConfig`` from a parsed HF ``config.json`` (``model_type: "llama"``).

    Raises:
        ValueError: naming the key, for features this Llama does not implement (biases,
            activations other than SiLU) or a missing required key.
    """
    check_supported(d, {"attention_bias": False, "mlp_bias": False})
    return LlamaConfig(**llama_fields(d))  # defaults: transformers' LlamaConfig (rms_norm_eps 1e-6)


def llama_config_json(cfg: LlamaConfig) -> dict[str, Any]:
    """The ``config.json`` keys every Llama-style family writes the same way (no model_type yet).

    RoPE is written in the classic ``rope_theta`` + ``rope_scaling`` form, which every
    transformers version (5 converts it to ``rope_parameters`` itself) and vLLM understand.
    """
    out: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_id is not None:
        out["eos_token_id"] = cfg.eos_token_id
    return out


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """HF ``config.json`` contents for ``cfg``, as ``transformers`` and vLLM read them.

    The writer adds ``torch_dtype`` (it knows the dtype it saves in).
    """
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **llama_config_json(cfg),
            "attention_bias": False, "mlp_bias": False}


# ------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------
def gguf_get(meta: dict[str, Any], key: str, default: Any = KeyError) -> Any:
    """``meta["{arch}.{key}"]`` for the file's own architecture, else ``default``.

    Raises:
        ValueError: the key is missing and there is no default.
    """
    arch = meta["general.architecture"]
    if f"{arch}.{key}" in meta:
        return meta[f"{arch}.{key}"]
    if default is KeyError:
        raise ValueError(f"GGUF metadata is missing {arch}.{key}")
    return default


def gguf_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``LlamaConfig`` fields of GGUF metadata, as keyword arguments (llama, qwen2, qwen3, phi3
    files spell them the same way under their own architecture prefix)."""
    num_heads = gguf_get(meta, "attention.head_count")
    hidden = gguf_get(meta, "embedding_length")
    vocab = gguf_get(meta, "vocab_size", None) or len(meta["tokenizer.ggml.tokens"])
    head_dim = (gguf_get(meta, "attention.key_length", None) or gguf_get(meta, "rope.dimension_count", None)
                or hidden // num_heads)
    theta = gguf_get(meta, "rope.freq_base", 10000.0)
    rope_scaling = None
    if "rope_freqs" in meta:  # Llama 3.1 / 3.2: the scaling is stored as a tensor, not as metadata
        rope_scaling = llama3_scaling_from_rope_freqs(meta["rope_freqs"], head_dim, theta)
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=gguf_get(meta, "block_count"),
        num_heads=num_heads,
        num_kv_heads=gguf_get(meta, "attention.head_count_kv", num_heads),
        intermediate_size=gguf_get(meta, "feed_forward_length"),
        head_dim=head_dim,
        norm_eps=gguf_get(meta, "attention.layer_norm_rms_epsilon"),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_seq_len=gguf_get(meta, "context_length"),
        tie_embeddings=False,  # decided by the loader: tied when the file has no output.weight
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )


def config_from_gguf(meta: dict[str, Any]) -> LlamaConfig:
    """Build a ``LlamaConfig`` from GGUF metadata (``general.architecture == "llama"``).

    Args:
        meta: GGUF key → plain Python value (see ``gguf_loader.read_metadata``).
    """
    return LlamaConfig(**gguf_fields(meta))


def llama3_scaling_from_rope_freqs(rope_freqs: Tensor, head_dim: int, theta: float) -> dict[str, Any]:
    """HF's ``rope_scaling`` for a GGUF's ``rope_freqs.weight`` (Llama 3.1 / 3.2 files).

    llama.cpp's converter writes, per frequency, the number the base frequency is divided by; it
    computes them from the Llama 3 scaling rule. The file keeps only the divisors, so we take
    ``factor`` = the largest divisor and the three parameters every Llama 3.x release shares (low 1,
    high 4, original context 8192), then check that they reproduce every stored divisor.

    Raises:
        ValueError: the divisors do not follow the Llama 3 rule with those parameters.
    """
    factor = float(rope_freqs.max())
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    divisors = rope_inv_freq(head_dim, theta) / rope_inv_freq(head_dim, theta, scaling)
    if rope_freqs.shape != divisors.shape or not torch.allclose(rope_freqs.float(), divisors, rtol=1e-4, atol=0):
        raise ValueError(
            f"rope_freqs.weight (shape {tuple(rope_freqs.shape)}) is not Llama 3 RoPE scaling with factor {factor}, "
            "low_freq_factor 1, high_freq_factor 4 and original context 8192; convert the model from its "
            "Hugging Face checkpoint instead"
        )
    return scaling


def unpermute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp rotates *adjacent* pairs (x0, x1), (x2, x3), … while HF (and we) rotate the two
    halves of a head against each other, (x0, x_{hd/2}), …; its converter reorders each head's
    rows from [first half | second half] to interleaved [h0, s0, h1, s1, …]. Per head we read the
    rows back as [hd/2, 2] pairs and transpose to [2, hd/2].

    Args:
        w: GGUF weight [n_heads * hd, in].
        n_heads: Heads in this projection (query heads for Q, key/value heads for K).
    """
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def fix_gguf_tensor(our_name: str, w: Tensor, cfg: LlamaConfig) -> Tensor:
    """Turn a dequantized GGUF tensor into the layout our ``our_name`` parameter expects."""
    if our_name.endswith("attn.q_proj.weight"):
        return unpermute_qk(w, cfg.num_heads)
    if our_name.endswith("attn.k_proj.weight"):
        return unpermute_qk(w, cfg.num_kv_heads)
    return w


# ------------------------------------------------------------------------------------------------
# GGUF out: what the writer (models/gguf_writer.py) asks, each the inverse of a loading function above
# ------------------------------------------------------------------------------------------------
def ours_to_gguf(cfg: LlamaConfig) -> dict[str, str]:
    """Our name of every tensor a GGUF file for ``cfg`` stores → its GGUF name (``gguf_to_ours`` inverted).

    A tied head has no ``output.weight`` in GGUF (llama.cpp reuses ``token_embd.weight``).
    """
    return {ours: theirs for theirs, ours in gguf_to_ours(cfg).items() if ours is not None}


def config_to_gguf(cfg: LlamaConfig) -> dict[str, Any]:
    """GGUF metadata for ``cfg``: ``general.architecture`` and the ``llama.*`` keys llama.cpp reads.

    ``config_from_gguf`` reads these back to ``cfg`` (with the tokenizer's BOS/EOS ids). Llama 3.x
    RoPE scaling is not metadata but the ``rope_freqs.weight`` tensor (``extra_gguf_tensors``).

    Raises:
        ValueError: a RoPE scaling llama.cpp's Llama cannot run.
    """
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind not in (None, "default", "llama3", "linear"):
        raise ValueError(f"rope_scaling type {kind!r} has no GGUF encoding for Llama here (supported: llama3, linear)")
    meta = gguf_shape_metadata("llama", cfg)
    meta["llama.rope.dimension_count"] = cfg.head_dim
    return meta


def gguf_shape_metadata(arch: str, cfg: Any) -> dict[str, Any]:
    """The GGUF keys every decoder family shares (sizes, heads, norm epsilon, RoPE base and linear
    scaling), under ``arch``, for a config with ``LlamaConfig``'s field names."""
    meta: dict[str, Any] = {
        "general.architecture": arch,
        f"{arch}.context_length": cfg.max_seq_len,
        f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.block_count": cfg.num_layers,
        f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_heads,
        f"{arch}.attention.head_count_kv": cfg.num_kv_heads,
        f"{arch}.attention.key_length": cfg.head_dim,
        f"{arch}.attention.value_length": cfg.head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
        f"{arch}.rope.freq_base": float(cfg.rope_theta),
        f"{arch}.vocab_size": cfg.vocab_size,
    }
    if (cfg.rope_scaling or {}).get("rope_type") == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(cfg.rope_scaling["factor"])
    return meta


def warn_window_not_run(arch: str, cfg: Any) -> None:
    """Warn that llama.cpp runs ``arch`` attending to the whole context although ``cfg`` has a sliding window
    shorter than its context: the file then matches the model only for contexts up to the window."""
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_seq_len:
        warnings.warn(f"sliding_window={cfg.sliding_window}: llama.cpp runs {arch} attending to the whole context, "
                      f"so the GGUF file matches this model for contexts up to {cfg.sliding_window} tokens",
                      stacklevel=3)


def extra_gguf_tensors(cfg: LlamaConfig) -> dict[str, Tensor]:
    """Tensors a GGUF file needs beyond the weights: Llama 3.x's ``rope_freqs.weight``, the number
    llama.cpp divides each RoPE frequency by (what ``llama3_scaling_from_rope_freqs`` reads back)."""
    if (cfg.rope_scaling or {}).get("rope_type") != "llama3":
        return {}
    plain = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    return {"rope_freqs.weight": plain / rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)}


def permute_qk(w: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's Q/K row permutation (``unpermute_qk`` inverted): per head, rows
    [first half | second half] become interleaved pairs [h0, s0, h1, s1, …] for its adjacent-pair RoPE.

    Args:
        w: Our weight [n_heads * hd, in].
        n_heads: Heads in this projection (query heads for Q, key/value heads for K).
    """
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, 2, hd // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def to_gguf_tensor(our_name: str, w: Tensor, cfg: LlamaConfig) -> Tensor:
    """Our parameter ``our_name`` in the layout llama.cpp expects (``fix_gguf_tensor`` inverted)."""
    if our_name.endswith("attn.q_proj.weight"):
        return permute_qk(w, cfg.num_heads)
    if our_name.endswith("attn.k_proj.weight"):
        return permute_qk(w, cfg.num_kv_heads)
    return w
