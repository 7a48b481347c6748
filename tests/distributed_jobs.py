"""Jobs that tests/test_distributed_recipes.py runs under torchrun, several per launch.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_jobs.py JOBS.json [cpu|cuda]

JOBS.json is a list of ``{"job": name, "result": path, ...}``; every rank runs every job in order and
rank 0 writes each job's result as JSON. The process group is joined once and kept for all jobs
(a torchrun launch cannot host a second one after the first is destroyed), so the recipes'
``teardown`` is a barrier until the last job. A launch costs seconds; jobs cost fractions of that.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipe_helpers

from tunesmith.training import checkpointing  # noqa: E402
from tunesmith.training.config import build_config  # noqa: E402
from tunesmith.training.options import LoRAOptions  # noqa: E402
from tunesmith.training.process_group import barrier, gather_objects, init_distributed  # noqa: E402

ENV = init_distributed(sys.argv[2] if len(sys.argv) > 2 else "cpu")


def run_recipe(spec: dict) -> dict:
    """A recipe's ``main`` on the config values in ``spec``; ``kill_rank_in_save`` SIGKILLs that rank
    inside the save of step ``kill_at``, after its files are in the temp folder, before the rename."""
    module = importlib.import_module(f"tunesmith.recipes.{spec['recipe']}")
    module.teardown = barrier  # keep the process group for the next job
    if "kill_rank_in_save" in spec and ENV.rank == spec["kill_rank_in_save"]:
        real_fsync = checkpointing._fsync_tree

        def fsync_then_die(root: Path) -> None:
            real_fsync(root)
            if f"step_{spec['kill_at']:06d}" in root.name:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpointing._fsync_tree = fsync_then_die
    result = module.main(build_config(module.Config, spec["values"], []))
    return {"losses": result["losses"], "grad_norms": result["grad_norms"], "checkpoint": str(result["checkpoint"])}


def nf4_shards(spec: dict) -> dict:
    """QLoRA loaded onto the process group: each rank's NF4 bytes, the logits of fixed tokens, and a
    sample answer generated in lockstep, without and with ``cpu_offload``."""
    from tunesmith.training.evaluation import sample_answer
    from tunesmith.training.sharding import load_for_training, sharded_nbytes

    out: dict[str, Any] = {}
    for offload in (False, True):
        base = load_for_training(spec["model"], None, None, torch.float32, ENV, lora=LoRAOptions(**spec["lora"]),
                                 quantize_base=True, seed=0, cpu_offload=offload)
        model = base.model.eval()
        tag = "offload" if offload else "plain"
        out[f"nf4_bytes_{tag}"] = gather_objects(sharded_nbytes(model)["nf4"], ENV)
        with torch.no_grad():
            tokens = torch.tensor(spec["tokens"])
            out[f"logits_{tag}"] = model.logits(model.hidden_states(tokens)).tolist()
        out[f"sample_{tag}"] = sample_answer(model, base.tokenizer, spec["messages"], 6, ENV)
    return out


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_bytes_in_use() -> int:
    """Bytes this process has allocated from glibc and not freed (heap + mmapped chunks): every CPU
    tensor storage, whether or not Python holds a reference to it (autograd keeps gradients in C++).

    Gathered weights are transient by design (an eval-only forward leaves the root gathered until
    the next step): every FSDP module is resharded first, so what is counted is what persists.
    """
    from torch.distributed.fsdp import FSDPModule

    for obj in gc.get_objects():
        if isinstance(obj, FSDPModule):
            obj.reshard()
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def gradient_memory(spec: dict) -> dict:
    """Heap bytes in use at the start of each micro-batch of the full fine-tune (the second micro-batch
    of a step starts with what the first left: its gradients), and, for contrast, what one
    micro-batch leaves on FSDP's no-sync path, which keeps unsharded gradients. Compare within the
    second step: the first one allocates one-off buffers (autograd, the optimizer's state)."""
    from tunesmith.training.sharding import load_for_training

    recipe = importlib.import_module("tunesmith.recipes.full_finetune_distributed")
    recipe.teardown = barrier
    at_micro_batch: list[int] = []
    real_slice = recipe.rank_slice

    def measuring_slice(batch: dict, env: Any) -> dict:
        at_micro_batch.append(heap_bytes_in_use())
        return real_slice(batch, env)

    recipe.rank_slice = measuring_slice
    recipe.main(build_config(recipe.Config, spec["values"], []))
    recipe.rank_slice = real_slice

    model = load_for_training(spec["values"]["model"], None, None, torch.float32, ENV).model
    tokens = torch.tensor(spec["tokens"])

    def micro_batch() -> None:
        model.logits(model.hidden_states(tokens)).float().square().mean().backward()

    micro_batch()  # warm-up: one-off buffers
    model.zero_grad(set_to_none=True)
    model.set_requires_gradient_sync(False)
    before = heap_bytes_in_use()
    micro_batch()
    return {"recipe": at_micro_batch, "no_sync": heap_bytes_in_use() - before}


JOBS = {"recipe": run_recipe, "nf4_shards": nf4_shards, "gradient_memory": gradient_memory}

if __name__ == "__main__":
    torch.set_num_threads(1)
    for spec in json.loads(Path(sys.argv[1]).read_text()):
        result = JOBS[spec["job"]](spec)
        if ENV.is_main:
            Path(spec["result"]).write_text(json.dumps(result))
        barrier(ENV)
    torch.distributed.destroy_process_group()
