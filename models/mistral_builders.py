"""Named Mistral sizes with the values of their released HF ``config.json`` files.

Sources: v0.2/v0.3 share the v0.2 architecture published in mistral-src (4096 wide, 32 layers, 8
KV heads, RoPE base 10⁶, RMSNorm ε 1e-5, no sliding window; e.g. edadaltocg/mistral-src-finetune
``finetune/config.py``) with v0.3's vocabulary extended to 32,768 (its model card); v0.1 has the
32,000-token vocabulary, RoPE base 10⁴ and the 4096-token window (transformers' MistralConfig
defaults are v0.1's). Parameter counts are checked against the Hub in tests/test_family_parity.py.
"""

from __future__ import annotations

from typing import Any

from tunesmith.models.mistral import MistralConfig

HUB_IDS: dict[str, str] = {
    "mistral_7b": "mistralai/Mistral-7B-v0.3",
    "mistral_7b_v0_1": "mistralai/Mistral-7B-v0.1",
}

_MISTRAL_7B = dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                   norm_eps=1e-5, max_seq_len=32768)


def mistral_7b(**overrides: Any) -> MistralConfig:
    """Mistral 7B v0.3: Llama-shaped (no sliding window), 32,768-token vocabulary, RoPE base 10⁶."""
    return MistralConfig(**{**_MISTRAL_7B, "vocab_size": 32768, "rope_theta": 1_000_000.0, **overrides})


def mistral_7b_v0_1(**overrides: Any) -> MistralConfig:
    """Mistral 7B v0.1: every layer attends to the last 4096 positions."""
    return MistralConfig(**{**_MISTRAL_7B, "vocab_size": 32000, "rope_theta": 10000.0, "sliding_window": 4096,
                            **overrides})


BUILDERS = {name: globals()[name] for name in HUB_IDS}
