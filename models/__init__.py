"""tunesmith.models: native PyTorch decoders, their checkpoints, LoRA and generation.

    model = load_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")   # Hub id, local dir or .gguf
    logits = model(tokens)                                            # [b, s] → [b, s, v]

Families: ``Llama`` (Llama 2/3/3.1/3.2, SmolLM2), ``Gemma`` (1/2/3), and on Llama's pieces ``Qwen``
(Qwen2/2.5/3 dense), ``Mistral`` and ``Phi3`` (Phi-3, Phi-4-mini); ``load_pretrained`` picks the
class from the checkpoint. Builders (``qwen3_8b()``, ``phi4_mini()``, …) give real sizes' configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from pathlib import Path

import torch
from torch import nn

from tunesmith.models.builders import (
    BUILDERS,
    HUB_IDS,
    llama2_7b,
    llama2_13b,
    llama3_1_8b,
    llama3_1_70b,
    llama3_2_1b,
    llama3_2_3b,
    llama3_8b,
    smollm2_1_7b,
    smollm2_135m,
    smollm2_360m,
    tiny_llama,
)
from tunesmith.models.generation import generate
from tunesmith.models.gguf_loader import load_gguf
from tunesmith.models.hf_checkpoint import (
    CheckpointFormatError,
    load_hf_checkpoint,
    resolve_model_dir,
    save_hf_checkpoint,
)
from tunesmith.models.llama import Llama, LlamaConfig
from tunesmith.models.lora import LoRALinear, apply_lora
from tunesmith.models.mistral import Mistral, MistralConfig
from tunesmith.models.mistral_builders import mistral_7b, mistral_7b_v0_1
from tunesmith.models.peft_adapter import load_peft_adapter, save_peft_adapter
from tunesmith.models.phi3 import Phi3, Phi3Config
from tunesmith.models.phi3_builders import phi3_mini_4k, phi4_mini
from tunesmith.models.qwen import Qwen, QwenConfig
from tunesmith.models.qwen_builders import (
    qwen2_5_0_5b,
    qwen2_5_3b,
    qwen2_5_7b,
    qwen2_5_14b,
    qwen2_5_32b,
    qwen3_0_6b,
    qwen3_1_7b,
    qwen3_4b,
    qwen3_8b,
    qwen3_14b,
    qwen3_32b,
)


def load_pretrained(
    source: str | Path | Any,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    nf4_targets: Sequence[str] = (),
) -> nn.Module:
    """Load pretrained weights as our native model, from wherever they are.

    Args:
        source: A local Hugging Face model directory, a Hub repo id (``org/name``, downloaded
            into the HF cache; ``HF_TOKEN`` is read for gated repos), or a ``.gguf`` file
            (dequantized to ``dtype``) or a ``gguf.GGUFReader`` open on one.
        dtype: Parameter dtype.
        device: Where the parameters live.
        nf4_targets: Leaf names of linear layers (``q_proj``, …) stored as NF4 as they are read
            (QLoRA): peak memory while loading stays near the 4-bit size.

    Returns:
        The model (``Llama``, ``Gemma``, ``Qwen``, ``Mistral`` or ``Phi3``, as the checkpoint says) in
        eval mode.
    """
    if not isinstance(source, (str, Path)) or str(source).endswith(".gguf"):  # a path or an open GGUFReader
        return load_gguf(source, dtype=dtype, device=device, nf4_targets=nf4_targets)
    return load_hf_checkpoint(source, dtype=dtype, device=device, nf4_targets=nf4_targets)

__all__ = [
    "BUILDERS",
    "HUB_IDS",
    "CheckpointFormatError",
    "Llama",
    "LlamaConfig",
    "LoRALinear",
    "Mistral",
    "MistralConfig",
    "Phi3",
    "Phi3Config",
    "Qwen",
    "QwenConfig",
    "apply_lora",
    "generate",
    "llama2_13b",
    "llama2_7b",
    "llama3_1_70b",
    "llama3_1_8b",
    "llama3_2_1b",
    "llama3_2_3b",
    "llama3_8b",
    "load_gguf",
    "load_hf_checkpoint",
    "load_peft_adapter",
    "load_pretrained",
    "mistral_7b",
    "mistral_7b_v0_1",
    "phi3_mini_4k",
    "phi4_mini",
    "qwen2_5_0_5b",
    "qwen2_5_14b",
    "qwen2_5_32b",
    "qwen2_5_3b",
    "qwen2_5_7b",
    "qwen3_0_6b",
    "qwen3_14b",
    "qwen3_1_7b",
    "qwen3_32b",
    "qwen3_4b",
    "qwen3_8b",
    "resolve_model_dir",
    "save_hf_checkpoint",
    "save_peft_adapter",
    "smollm2_135m",
    "smollm2_1_7b",
    "smollm2_360m",
    "tiny_llama",
]
