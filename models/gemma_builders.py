"""Named Gemma sizes with the values of their released HF ``config.json`` files (text decoders only).

Every builder takes keyword overrides (``gemma3_270m(max_seq_len=2048)``) for experiments.
``HUB_IDS`` gives the Hub repository of each size's base (pre-trained) checkpoint.
"""

from __future__ import annotations

from typing import Any

from tunesmith.models.gemma import GemmaConfig

HUB_IDS: dict[str, str] = {
    "gemma_2b": "google/gemma-2b",
    "gemma_7b": "google/gemma-7b",
    "gemma2_2b": "google/gemma-2-2b",
    "gemma2_9b": "google/gemma-2-9b",
    "gemma2_27b": "google/gemma-2-27b",
    "gemma3_270m": "google/gemma-3-270m",
    "gemma3_1b": "google/gemma-3-1b-pt",
    "gemma3_4b": "google/gemma-3-4b-pt",
    "gemma3_12b": "google/gemma-3-12b-pt",
    "gemma3_27b": "google/gemma-3-27b-pt",
}

_GEMMA1 = dict(version=1, vocab_size=256000, head_dim=256, rope_theta=10000.0, max_seq_len=8192)
_GEMMA2 = dict(
    version=2, vocab_size=256000, rope_theta=10000.0, max_seq_len=8192, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
)
_GEMMA3 = dict(version=3, vocab_size=262144, head_dim=256, rope_theta=1_000_000.0, rope_local_theta=10000.0)
# 4B and up: larger vocabulary slot count, 128k context through linear RoPE scaling on global layers.
_GEMMA3_LARGE = dict(
    _GEMMA3, vocab_size=262208, sliding_window=1024, max_seq_len=131072,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
)


def _build(defaults: dict[str, Any], overrides: dict[str, Any]) -> GemmaConfig:
    return GemmaConfig(**{**defaults, **overrides})


def gemma_2b(**overrides: Any) -> GemmaConfig:
    """Gemma 1 2B: 18 layers, multi-query attention (1 KV head)."""
    return _build(dict(_GEMMA1, hidden_size=2048, num_layers=18, num_heads=8, num_kv_heads=1,
                       intermediate_size=16384), overrides)


def gemma_7b(**overrides: Any) -> GemmaConfig:
    """Gemma 1 7B: 28 layers, 16 heads of 256 (head_dim × heads = 4096 ≠ hidden 3072)."""
    return _build(dict(_GEMMA1, hidden_size=3072, num_layers=28, num_heads=16, num_kv_heads=16,
                       intermediate_size=24576), overrides)


def gemma2_2b(**overrides: Any) -> GemmaConfig:
    """Gemma 2 2B."""
    return _build(dict(_GEMMA2, hidden_size=2304, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256,
                       intermediate_size=9216, query_pre_attn_scalar=256), overrides)


def gemma2_9b(**overrides: Any) -> GemmaConfig:
    """Gemma 2 9B."""
    return _build(dict(_GEMMA2, hidden_size=3584, num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256,
                       intermediate_size=14336, query_pre_attn_scalar=256), overrides)


def gemma2_27b(**overrides: Any) -> GemmaConfig:
    """Gemma 2 27B: head_dim 128 and queries scaled by (hidden / heads) = 144, not head_dim."""
    return _build(dict(_GEMMA2, hidden_size=4608, num_layers=46, num_heads=32, num_kv_heads=16, head_dim=128,
                       intermediate_size=36864, query_pre_attn_scalar=144), overrides)


def gemma3_270m(**overrides: Any) -> GemmaConfig:
    """Gemma 3 270M: 18 layers of width 640 and a 262,144-token vocabulary (most of its weights)."""
    return _build(dict(_GEMMA3, hidden_size=640, num_layers=18, num_heads=4, num_kv_heads=1,
                       intermediate_size=2048, query_pre_attn_scalar=256, sliding_window=512,
                       max_seq_len=32768), overrides)


def gemma3_1b(**overrides: Any) -> GemmaConfig:
    """Gemma 3 1B."""
    return _build(dict(_GEMMA3, hidden_size=1152, num_layers=26, num_heads=4, num_kv_heads=1,
                       intermediate_size=6912, query_pre_attn_scalar=256, sliding_window=512,
                       max_seq_len=32768), overrides)


def gemma3_4b(**overrides: Any) -> GemmaConfig:
    """Gemma 3 4B (text decoder of the multimodal checkpoint)."""
    return _build(dict(_GEMMA3_LARGE, hidden_size=2560, num_layers=34, num_heads=8, num_kv_heads=4,
                       intermediate_size=10240, query_pre_attn_scalar=256), overrides)


def gemma3_12b(**overrides: Any) -> GemmaConfig:
    """Gemma 3 12B (text decoder of the multimodal checkpoint)."""
    return _build(dict(_GEMMA3_LARGE, hidden_size=3840, num_layers=48, num_heads=16, num_kv_heads=8,
                       intermediate_size=15360, query_pre_attn_scalar=256), overrides)


def gemma3_27b(**overrides: Any) -> GemmaConfig:
    """Gemma 3 27B: head_dim 128 and queries scaled by (hidden / heads) = 168."""
    return _build(dict(_GEMMA3_LARGE, hidden_size=5376, num_layers=62, num_heads=32, num_kv_heads=16,
                       head_dim=128, intermediate_size=21504, query_pre_attn_scalar=168), overrides)
