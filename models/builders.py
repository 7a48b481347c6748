"""Named Llama-architecture sizes, with the values of their Hugging Face ``config.json``.

Each builder returns a ``LlamaConfig``; build the (randomly initialised) model with
``Llama(llama3_2_1b())``, or load real weights with ``load_pretrained(HUB_IDS["llama3_2_1b"])``,
which reads the same numbers from the checkpoint's own config.json.

``BUILDERS`` and ``HUB_IDS`` also hold the families built on Llama (``qwen_builders``,
``mistral_builders``, ``phi3_builders``: ``Qwen(qwen3_8b())``, ``Phi3(phi4_mini())``, …), so the
memory estimate knows their shapes from a Hub id alone.
"""

from __future__ import annotations

from typing import Any

from tunesmith.models import mistral_builders, phi3_builders, qwen_builders
from tunesmith.models.llama import LlamaConfig

# Hub repository of each size's base weights (the matching "-Instruct" repos share the shapes).
HUB_IDS: dict[str, str] = {
    "llama2_7b": "meta-llama/Llama-2-7b-hf",
    "llama2_13b": "meta-llama/Llama-2-13b-hf",
    "llama3_8b": "meta-llama/Meta-Llama-3-8B",
    "llama3_1_8b": "meta-llama/Llama-3.1-8B",
    "llama3_1_70b": "meta-llama/Llama-3.1-70B",
    "llama3_2_1b": "meta-llama/Llama-3.2-1B",
    "llama3_2_3b": "meta-llama/Llama-3.2-3B",
    "smollm2_135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2_360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2_1_7b": "HuggingFaceTB/SmolLM2-1.7B",
    **qwen_builders.HUB_IDS,
    **mistral_builders.HUB_IDS,
    **phi3_builders.HUB_IDS,
}


def _llama3_rope(factor: float) -> dict[str, Any]:
    """Llama 3.1 / 3.2 long-context RoPE scaling (8k pre-training context, stretched by ``factor``)."""
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def llama2_7b() -> LlamaConfig:
    """Llama 2 7B: multi-head attention (no GQA), 32k SentencePiece vocabulary, 4k context."""
    return LlamaConfig(
        vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
        intermediate_size=11008, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
    )  # fmt: skip


def llama2_13b() -> LlamaConfig:
    """Llama 2 13B."""
    return LlamaConfig(
        vocab_size=32000, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
        intermediate_size=13824, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
    )  # fmt: skip


def llama3_8b() -> LlamaConfig:
    """Llama 3 8B: GQA with 8 KV heads, 128k tiktoken-style vocabulary, 8k context."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_size=14336, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
    )  # fmt: skip


def llama3_1_8b() -> LlamaConfig:
    """Llama 3.1 8B: Llama 3 8B shapes with "llama3" RoPE scaling to a 128k context."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_size=14336, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_llama3_rope(8.0),
        max_seq_len=131072,
    )  # fmt: skip


def llama3_1_70b() -> LlamaConfig:
    """Llama 3.1 70B."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
        intermediate_size=28672, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_llama3_rope(8.0),
        max_seq_len=131072,
    )  # fmt: skip


def llama3_2_1b() -> LlamaConfig:
    """Llama 3.2 1B: tied embeddings, RoPE scaling factor 32."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        intermediate_size=8192, head_dim=64, norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_llama3_rope(32.0), max_seq_len=131072, tie_embeddings=True,
    )  # fmt: skip


def llama3_2_3b() -> LlamaConfig:
    """Llama 3.2 3B: tied embeddings, 24 query heads of width 128."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8,
        intermediate_size=8192, head_dim=128, norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_llama3_rope(32.0), max_seq_len=131072, tie_embeddings=True,
    )  # fmt: skip


def smollm2_135m() -> LlamaConfig:
    """SmolLM2 135M: 30 narrow layers, GQA 9:3, tied embeddings, 49k BPE vocabulary."""
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
        intermediate_size=1536, norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192,
        tie_embeddings=True,
    )  # fmt: skip


def smollm2_360m() -> LlamaConfig:
    """SmolLM2 360M."""
    return LlamaConfig(
        vocab_size=49152, hidden_size=960, num_layers=32, num_heads=15, num_kv_heads=5,
        intermediate_size=2560, norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192,
        tie_embeddings=True,
    )  # fmt: skip


def smollm2_1_7b() -> LlamaConfig:
    """SmolLM2 1.7B: multi-head attention (32 KV heads)."""
    return LlamaConfig(
        vocab_size=49152, hidden_size=2048, num_layers=24, num_heads=32, num_kv_heads=32,
        intermediate_size=8192, norm_eps=1e-5, rope_theta=130000.0, max_seq_len=8192,
        tie_embeddings=True,
    )  # fmt: skip


def tiny_llama(**overrides: Any) -> LlamaConfig:
    """A few-thousand-parameter Llama for tests: GQA 4:2, untied; any field can be overridden."""
    fields: dict[str, Any] = dict(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=64, norm_eps=1e-6, rope_theta=10000.0, max_seq_len=256,
    )  # fmt: skip
    fields.update(overrides)
    return LlamaConfig(**fields)


# Name → builder, for configs that name a size as a string (``model: llama3_2_1b``).
BUILDERS = {
    "llama2_7b": llama2_7b,
    "llama2_13b": llama2_13b,
    "llama3_8b": llama3_8b,
    "llama3_1_8b": llama3_1_8b,
    "llama3_1_70b": llama3_1_70b,
    "llama3_2_1b": llama3_2_1b,
    "llama3_2_3b": llama3_2_3b,
    "smollm2_135m": smollm2_135m,
    "smollm2_360m": smollm2_360m,
    "smollm2_1_7b": smollm2_1_7b,
    **qwen_builders.BUILDERS,
    **mistral_builders.BUILDERS,
    **phi3_builders.BUILDERS,
}
