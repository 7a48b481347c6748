"""Named Qwen3 and Qwen2.5 sizes with the values of their released HF ``config.json`` files.

Every builder takes keyword overrides (``qwen3_8b(max_seq_len=8192)``). ``HUB_IDS`` gives each
size's Hub repository; the numbers are those repositories' ``config.json`` (huggingface.co/<id>/
blob/main/config.json), read from copies in public code: Qwen3 4B/8B/14B/32B and Qwen2.5
3B/7B/14B/32B from github.com/citsjtu2020/LLM-Prof ``sglang/Model_Config.md``; Qwen3 0.6B/1.7B and
Qwen2.5-0.5B from config.json excerpts quoted in other projects (0.6B also printed by
``AutoConfig.from_pretrained("Qwen/Qwen3-0.6B")`` in kiraa-blog's Qwen3-0.6B notes). Parameter
counts are checked against the Hub's safetensors totals in tests/test_family_parity.py.
"""

from __future__ import annotations

from typing import Any

from tunesmith.models.qwen import QwenConfig

# Qwen3's chat models carry the plain names (Qwen/Qwen3-8B; the pre-trained ones are -Base);
# Qwen2.5's plain names are the pre-trained models (the -Instruct repos share the shapes).
HUB_IDS: dict[str, str] = {
    "qwen3_0_6b": "Qwen/Qwen3-0.6B",
    "qwen3_1_7b": "Qwen/Qwen3-1.7B",
    "qwen3_4b": "Qwen/Qwen3-4B",
    "qwen3_8b": "Qwen/Qwen3-8B",
    "qwen3_14b": "Qwen/Qwen3-14B",
    "qwen3_32b": "Qwen/Qwen3-32B",
    "qwen2_5_0_5b": "Qwen/Qwen2.5-0.5B",
    "qwen2_5_3b": "Qwen/Qwen2.5-3B",
    "qwen2_5_7b": "Qwen/Qwen2.5-7B",
    "qwen2_5_14b": "Qwen/Qwen2.5-14B",
    "qwen2_5_32b": "Qwen/Qwen2.5-32B",
}

# head_dim 128 for every Qwen3 size; 40,960 positions in the chat models (32,768 in -Base).
_QWEN3 = dict(version=3, vocab_size=151936, head_dim=128, norm_eps=1e-6, rope_theta=1_000_000.0, max_seq_len=40960)
_QWEN2_5 = dict(version=2, vocab_size=151936, norm_eps=1e-6, rope_theta=1_000_000.0, max_seq_len=32768)
# 7B and up: a 152,064-slot vocabulary, untied head, 128k positions.
_QWEN2_5_LARGE = dict(_QWEN2_5, vocab_size=152064, max_seq_len=131072)


def _build(defaults: dict[str, Any], overrides: dict[str, Any]) -> QwenConfig:
    return QwenConfig(**{**defaults, **overrides})


def qwen3_0_6b(**overrides: Any) -> QwenConfig:
    """Qwen3 0.6B: 28 layers of width 1024 with 16 query heads of 128 (2048 ≠ 1024), tied head."""
    return _build(dict(_QWEN3, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                       intermediate_size=3072, tie_embeddings=True), overrides)


def qwen3_1_7b(**overrides: Any) -> QwenConfig:
    """Qwen3 1.7B: tied head."""
    return _build(dict(_QWEN3, hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8,
                       intermediate_size=6144, tie_embeddings=True), overrides)


def qwen3_4b(**overrides: Any) -> QwenConfig:
    """Qwen3 4B: 36 layers, tied head."""
    return _build(dict(_QWEN3, hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8,
                       intermediate_size=9728, tie_embeddings=True), overrides)


def qwen3_8b(**overrides: Any) -> QwenConfig:
    """Qwen3 8B."""
    return _build(dict(_QWEN3, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                       intermediate_size=12288), overrides)


def qwen3_14b(**overrides: Any) -> QwenConfig:
    """Qwen3 14B."""
    return _build(dict(_QWEN3, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=8,
                       intermediate_size=17408), overrides)


def qwen3_32b(**overrides: Any) -> QwenConfig:
    """Qwen3 32B: 64 query heads of 128 (8192 ≠ hidden 5120)."""
    return _build(dict(_QWEN3, hidden_size=5120, num_layers=64, num_heads=64, num_kv_heads=8,
                       intermediate_size=25600), overrides)


def qwen2_5_0_5b(**overrides: Any) -> QwenConfig:
    """Qwen2.5 0.5B: 24 layers of width 896, 14 heads sharing 2 KV heads, tied head."""
    return _build(dict(_QWEN2_5, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                       intermediate_size=4864, tie_embeddings=True), overrides)


def qwen2_5_3b(**overrides: Any) -> QwenConfig:
    """Qwen2.5 3B: tied head."""
    return _build(dict(_QWEN2_5, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2,
                       intermediate_size=11008, tie_embeddings=True), overrides)


def qwen2_5_7b(**overrides: Any) -> QwenConfig:
    """Qwen2.5 7B: 28 heads sharing 4 KV heads."""
    return _build(dict(_QWEN2_5_LARGE, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                       intermediate_size=18944), overrides)


def qwen2_5_14b(**overrides: Any) -> QwenConfig:
    """Qwen2.5 14B: 48 layers; RMSNorm epsilon 1e-5 (1e-6 below 14B)."""
    return _build(dict(_QWEN2_5_LARGE, hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8,
                       intermediate_size=13824, norm_eps=1e-5), overrides)


def qwen2_5_32b(**overrides: Any) -> QwenConfig:
    """Qwen2.5 32B."""
    return _build(dict(_QWEN2_5_LARGE, hidden_size=5120, num_layers=64, num_heads=40, num_kv_heads=8,
                       intermediate_size=27648, norm_eps=1e-5), overrides)


BUILDERS = {name: globals()[name] for name in HUB_IDS}
