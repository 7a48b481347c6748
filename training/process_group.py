"""Who this process is, and the few collectives the distributed loops need.

    torchrun env (RANK, WORLD_SIZE, LOCAL_RANK) ─► init_distributed ─► DistEnv
    every rank builds the same global micro-batch ─► rank_slice: its own rows
    per-rank sums ─► sum_over_ranks ─► the step's numbers ; only rank 0 prints

Without torchrun (no ``WORLD_SIZE`` in the environment) nothing here starts a process group:
``DistEnv.sharded`` is False and every helper degrades to its one-process meaning, so the same
distributed recipe runs as one plain process on a laptop.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from tunesmith.training.config import ConfigError


@dataclass
class DistEnv:
    """Who this process is. ``world_size == 1`` and ``mesh is None`` without torchrun."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: Any = None  # 1-D DeviceMesh over all ranks (FSDP shards along it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mesh is not None


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Join the process group that ``torchrun`` describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    GPUs use NCCL (one GPU per process, ``cuda:LOCAL_RANK``) with gloo beside it for CPU tensors
    (CPU offload); CPUs use gloo. Without torchrun this returns a one-process ``DistEnv`` and
    starts nothing.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
        timeout_s: How long a collective waits for a missing rank before failing (a dead rank
            then ends the job instead of hanging it).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but CUDA is not available on this machine; use device=cpu or auto")
    if "WORLD_SIZE" not in os.environ:
        return DistEnv(0, 1, 0, torch.device("cuda" if device.startswith("cuda") else "cpu"))
    from torch.distributed.device_mesh import init_device_mesh

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "cpu:gloo,cuda:nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    mesh = init_device_mesh(dev.type, (world,))
    return DistEnv(rank, world, local, dev, mesh)


def teardown(env: DistEnv) -> None:
    """Leave the process group (a no-op for one process)."""
    if env.sharded and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait until every rank is here (a no-op for one process)."""
    if env.sharded:
        dist.barrier()


def seed_everything(seed: int, env: DistEnv) -> None:
    """Seed the global RNGs with ``seed + rank``: each rank draws its own dropout masks.

    Everything that must agree across ranks draws from its own generator instead: the data order
    (``BatchStream``), the LoRA initialisation (``lora.lora_a_init``), sampling (rank 0's token is
    broadcast). Rank 0 of a distributed run draws what the single-device recipe draws.
    """
    torch.manual_seed(seed + env.rank)


def sum_over_ranks(value: float, env: DistEnv) -> float:
    """Sum a Python number over all ranks (e.g. per-rank loss sums → the step's loss)."""
    if not env.sharded:
        return value
    return float(sum_tensor_over_ranks(torch.tensor([value], dtype=torch.float64), env).item())


def sum_tensor_over_ranks(t: Tensor, env: DistEnv) -> Tensor:
    """Elementwise sum of ``t`` over all ranks (a new tensor on ``t``'s device; ``t`` itself for one process)."""
    if not env.sharded:
        return t
    out = t.to(env.device, copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def rank_slice(batch: dict[str, Tensor], env: DistEnv) -> dict[str, Tensor]:
    """This rank's rows of a global micro-batch (rank r of W takes rows [r·b/W, (r+1)·b/W)).

    Every rank builds the same global micro-batch (it is a pure function of the step), so the
    data each rank sees, and therefore the update, does not depend on the number of processes.
    """
    rows = batch["tokens"].shape[0]
    if rows % env.world_size:
        raise ConfigError(f"batch_size={rows} must be a multiple of the number of processes ({env.world_size})")
    per = rows // env.world_size
    return {k: v[env.rank * per : (env.rank + 1) * per] for k, v in batch.items()}


def row_range(rows: int, env: DistEnv) -> tuple[int, int]:
    """This rank's share [start, end) of ``rows`` items split as evenly as possible (may be empty)."""
    start = rows * env.rank // env.world_size
    return start, rows * (env.rank + 1) // env.world_size


def eval_slice(batch: dict[str, Tensor], env: DistEnv, ignore_index: int = -100) -> dict[str, Tensor]:
    """This rank's share of a held-out batch of any size, for evaluating each example once.

    Shares differ by at most one row. A rank left without rows runs the batch's first row with
    every label ignored, since under FSDP every rank must join every forward pass; it adds
    nothing to the loss sum or the label count.
    """
    start, end = row_range(batch["tokens"].shape[0], env)
    if end > start:
        return {k: v[start:end] for k, v in batch.items()}
    share = {k: v[:1] for k, v in batch.items()}
    share["labels"] = torch.full_like(share["labels"], ignore_index)
    return share


def agree_on(values: Tensor, env: DistEnv) -> Tensor:
    """Rank 0's ``values`` on every rank (generation in lockstep: every rank continues with the
    same tokens, so every rank runs the same forwards)."""
    if not env.sharded:
        return values
    t = values.to(env.device).clone()
    dist.broadcast(t, src=0)
    return t.to(values.device)


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` for one process."""
    if not env.sharded:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def main_rank_prints(env: DistEnv) -> Any:
    """Context manager: inside it, only rank 0's ``print`` output is shown."""
    return contextlib.nullcontext() if env.is_main else contextlib.redirect_stdout(io.StringIO())
