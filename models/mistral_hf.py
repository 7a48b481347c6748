"""Mistral ↔ Hugging Face and Mistral → GGUF: Llama's names, plus the ``sliding_window`` key.

The Mistral counterpart of ``models/llama_hf.py`` for ``model_type: "mistral"``. A Mistral
checkpoint's tensors are named and laid out exactly as Llama's, so the table is Llama's; only the
config differs (``sliding_window``, and transformers' Mistral defaults for missing keys).

There is no Mistral GGUF architecture: llama.cpp writes Mistral as ``llama`` (Q/K permuted, no
window in the metadata), which ``llama_hf`` reads, and so does our writer: ``config_to_gguf`` and
the tensor functions are Llama's. llama.cpp's ``llama`` attends globally, so a v0.1 model (4096-token
window) runs there as every published v0.1 GGUF does: the same model up to a context of 4096 tokens.
"""

from __future__ import annotations

from typing import Any

from tunesmith.models import llama_hf
from tunesmith.models.llama_hf import HF_PER_LAYER, hf_names, llama_config_json, llama_fields
from tunesmith.models.mistral import MistralConfig


def hf_to_ours(cfg: MistralConfig) -> dict[str, str | None]:
    """Every HF parameter name of a checkpoint for ``cfg`` → our name (``None``: read past it)."""
    return hf_names(HF_PER_LAYER, cfg)


def config_from_hf(d: dict[str, Any]) -> MistralConfig:
    """Build a ``MistralConfig`` from a parsed HF ``config.json`` (``model_type: "mistral"``).

    Missing keys take transformers' ``MistralConfig`` defaults — among them ``sliding_window`` 4096
    (v0.1's), so a file must say ``"sliding_window": null`` to attend globally, as v0.2 / v0.3 do.

    Raises:
        ValueError: naming the key, for a missing required key or a feature this implementation
            does not have (an activation other than SiLU, RoPE scaling other than linear).
    """
    fields = llama_fields(d, norm_eps=1e-6, max_seq_len=4096 * 32, rope_types=("linear",))
    return MistralConfig(**fields, sliding_window=d.get("sliding_window", 4096))


def config_to_hf(cfg: MistralConfig) -> dict[str, Any]:
    """HF ``config.json`` contents for ``cfg``, as ``transformers`` and vLLM read them."""
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **llama_config_json(cfg),
            "sliding_window": cfg.sliding_window}


# ------------------------------------------------------------------------------------------------
# GGUF out: llama.cpp's ``llama`` architecture, written by Llama's functions
# ------------------------------------------------------------------------------------------------
ours_to_gguf = llama_hf.ours_to_gguf
to_gguf_tensor = llama_hf.to_gguf_tensor  # Q/K rows permuted for llama.cpp's adjacent-pair RoPE
extra_gguf_tensors = llama_hf.extra_gguf_tensors


def config_to_gguf(cfg: MistralConfig) -> dict[str, Any]:
    """GGUF metadata for ``cfg``: Llama's (``general.architecture = "llama"``), as llama.cpp converts Mistral.

    Warns when the model has a sliding window shorter than its context: llama.cpp's ``llama`` has no
    window, so the file gives the same outputs only while the context fits in the window (as every
    Mistral-7B-v0.1 GGUF does).
    """
    llama_hf.warn_window_not_run("Mistral (as 'llama')", cfg)
    return llama_hf.config_to_gguf(cfg)
