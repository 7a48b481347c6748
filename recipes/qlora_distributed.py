"""QLoRA sharded with FSDP2: the distributed LoRA recipe with the frozen base stored as NF4 shards.

    meta model + adapters, the adapted layers' weights NF4 shells ─► fully_shard per block + root
    each rank reads its rows and quantizes them (the scale mean summed over ranks: the same bits as
    on one device) ─► lora_distributed's loop, unchanged ─► the PEFT adapter (+ merged model, bf16)

Like ``qlora_single_device`` this file holds no loop: ``Config`` is ``lora_distributed``'s with
QLoRA defaults and ``main`` is ``lora_distributed``'s. Each rank holds about 1/W of the NF4 bytes
(BENCHMARKS.md). An NF4 layer's rows must split evenly over the processes (every Llama/Gemma size
on 2, 4 or 8 GPUs does).

    tune-run qlora_distributed --config llama3_1_70b --nproc-per-node 8
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tunesmith.recipes import lora_distributed
from tunesmith.recipes.lora_distributed import estimate_memory, main  # noqa: F401  (the entry points)


@dataclass
class Config(lora_distributed.Config):
    """``lora_distributed``'s options with QLoRA defaults (those of ``qlora_single_device``).

    Attributes:
        quantize_base: True: the adapted layers' frozen weights are NF4 (see ``tunesmith.models.nf4``).
        dtype: ``bf16``: adapters, norms, embeddings and activations; NF4 weights dequantize to it.
        output_dir: Default folder for checkpoints.
    """

    quantize_base: bool = True
    dtype: str = "bf16"
    output_dir: str = "output/qlora"


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
