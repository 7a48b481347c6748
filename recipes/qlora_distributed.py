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

from tunesmith.recipes import qlora_single_device
from tunesmith.recipes.lora_distributed import estimate_memory, main  # noqa: F401  (the entry points)
from tunesmith.training.options import ShardingOptions


@dataclass
class Config(ShardingOptions, qlora_single_device.Config):
    """``qlora_single_device``'s options (the LoRA options with QLoRA defaults: ``quantize_base=true``,
    ``dtype=bf16``) plus FSDP2's: ``lora_distributed.Config`` with QLoRA defaults."""


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
