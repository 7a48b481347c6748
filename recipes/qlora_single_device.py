"""QLoRA fine-tuning on one device: the LoRA recipe with the frozen base stored in NF4.

    load base model, quantizing each adapted linear layer to NF4 as it is read
    add LoRA adapters (bf16) ─► the LoRA training loop, unchanged ─► save the PEFT adapter
    (and, with save_merged, the merged model dequantized to bf16)

QLoRA is not a different algorithm, only a different storage for the frozen weights, so this file
holds no loop of its own: ``Config`` is the LoRA recipe's with QLoRA defaults, and ``main`` is the
LoRA recipe's ``main``. Read (or copy) ``lora_single_device.py`` to see the loop; every LoRA switch
(compile, activation checkpointing, 8-bit AdamW, packing, …) works here too.

    tune-run qlora_single_device --config llama3_8b batch_size=4
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tunesmith.recipes import lora_single_device
from tunesmith.recipes.lora_single_device import estimate_memory, main  # noqa: F401  (the entry points)
from tunesmith.training.options import Dtype


@dataclass
class Config(lora_single_device.Config):
    """The LoRA recipe's options (see ``lora_single_device.Config``) with QLoRA defaults.

    Attributes:
        quantize_base: True: the adapted layers' frozen weights are NF4 (4-bit NormalFloat, block
            64, double-quantized scales; see ``tunesmith.models.nf4``).
        dtype: ``bf16``: adapters, norms, embeddings and activations; NF4 weights dequantize to it.
        output_dir: Default folder for checkpoints.
    """

    quantize_base: bool = True
    dtype: Dtype = "bf16"
    output_dir: str = "output/qlora"


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
