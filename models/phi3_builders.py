"""Named Phi-3 / Phi-4-mini sizes with the values of their released HF ``config.json`` files.

Sources (found with the search tools, the files quoted verbatim in public code): the config.json
of microsoft/Phi-3-mini-4k-instruct (transformers_version 4.40.2: 32 layers × 3072, multi-head
attention with 32 heads, a 32,064-token vocabulary, a 2047-token sliding window) and of
microsoft/Phi-4-mini-instruct (its 4-bit MLX conversion's copy: 24 query / 8 KV heads of 128,
partial_rotary_factor 0.75, LongRoPE to 131,072 positions from 4096 with the 48 factors below, tied
head, a 200,064-token vocabulary). Parameter
counts are checked against the Hub in tests/test_family_parity.py.
"""

from __future__ import annotations

from typing import Any

from tunesmith.models.phi3 import Phi3Config

HUB_IDS: dict[str, str] = {
    "phi3_mini_4k": "microsoft/Phi-3-mini-4k-instruct",
    "phi4_mini": "microsoft/Phi-4-mini-instruct",
}

# Phi-4-mini's LongRoPE factors (rope_scaling.long_factor / short_factor, one per rotated frequency).
PHI4_MINI_LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
    2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
    6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23,
    32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]  # fmt: skip
PHI4_MINI_SHORT_FACTOR = [1.0] * 48


def phi3_mini_4k(**overrides: Any) -> Phi3Config:
    """Phi-3-mini-4k: 3.8B, multi-head attention, 4k context with a 2047-token sliding window."""
    return Phi3Config(**{
        "vocab_size": 32064, "hidden_size": 3072, "num_layers": 32, "num_heads": 32, "num_kv_heads": 32,
        "intermediate_size": 8192, "norm_eps": 1e-5, "rope_theta": 10000.0, "max_seq_len": 4096,
        "sliding_window": 2047, **overrides,
    })  # fmt: skip


def phi4_mini(**overrides: Any) -> Phi3Config:
    """Phi-4-mini: 3.8B, GQA 24:8, RoPE on 96 of 128 head dims, LongRoPE to 128k, tied head."""
    return Phi3Config(**{
        "vocab_size": 200064, "hidden_size": 3072, "num_layers": 32, "num_heads": 24, "num_kv_heads": 8,
        "intermediate_size": 8192, "norm_eps": 1e-5, "rope_theta": 10000.0, "max_seq_len": 131072,
        "tie_embeddings": True, "partial_rotary_factor": 0.75, "sliding_window": 262144,
        "rope_scaling": {"rope_type": "longrope", "long_factor": PHI4_MINI_LONG_FACTOR,
                         "short_factor": PHI4_MINI_SHORT_FACTOR, "original_max_position_embeddings": 4096},
        **overrides,
    })  # fmt: skip


BUILDERS = {name: globals()[name] for name in HUB_IDS}
