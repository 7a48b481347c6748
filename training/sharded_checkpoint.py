"""Step checkpoints of full-weight runs with ``torch.distributed.checkpoint`` (DCP): every rank writes its shards.

    save_dcp_checkpoint: every rank writes its shards into .tmp-step_N ; barrier ; rank 0 renames
    resume_dcp: DCP reshards on load, so 2 processes → 1 process (or 8 → 16) just works

Full fine-tunes (``full_finetune_distributed``, ``dpo_distributed full=true``) keep weights AND AdamW
state for every parameter: too big to gather on one rank, so each rank writes its own 1/W. LoRA
runs write a small gathered checkpoint instead, in the single-device format
(``checkpointing.save_adapter_checkpoint``). Multi-node runs need ``output_dir`` on a filesystem
every node sees (each rank writes its own shard files into the same checkpoint folder).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from tunesmith.training.checkpointing import (
    TrainingState,
    atomic_write_text,
    check_resume_config,
    explain_dcp_load_failure,
    load_training_state,
    rank_rng_state,
    rng_state,
    set_rng_state,
    step_dir_name,
)
from tunesmith.training.process_group import DistEnv, barrier
from tunesmith.training.sharding import reshard

_STEP_PREFIX = "step_"
_SHARDS = "sharded"  # DCP folder inside a step checkpoint: .metadata + one __R_0.distcp per rank


def list_dcp_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete sharded step folders, oldest first (half-written temp folders are not listed)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX)]
    found = [p for p in found if (p / _SHARDS / ".metadata").is_file() and (p / "training_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_STEP_PREFIX):]))


def save_dcp_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    micro_batches: int,
    config_yaml: str,
    env: DistEnv,
    keep_last: int = 2,
    final_writers: dict[str, Callable[[Path], Any]] | None = None,
) -> Path:
    """Write ``output_dir/step_NNNNNN`` atomically; every rank writes only its own shards.

    Layout::

        step_000050/
          sharded/              DCP: .metadata + one file per rank (model + optimizer, by name)
          training_state.pt     step, data position, LR schedule, rank 0's RNG
          rng/rank_R.pt         each rank's RNG
          config.yaml
          hf/ (or merged/)      (final checkpoint) the model in Hugging Face layout, with its tokenizer
          gguf/                 (final checkpoint, save_gguf) model-<type>.gguf + Modelfile

    All ranks write into ``.tmp-step_NNNNNN``; after a barrier (every shard is on disk) rank 0
    renames it into place and updates ``LATEST``. A rank that dies before the rename leaves only
    the temp folder, which the next start deletes: the previous checkpoint stays the newest.

    Args:
        final_writers: ``{subfolder: write(path)}`` of the final checkpoint's serving outputs (``hf/`` or
            ``merged/``, ``gguf/``; ``final_outputs.run_output_writers``), run on every rank in the same
            atomic save: they gather tensor by tensor and rank 0 writes.
    """
    output_dir = Path(output_dir)
    final = output_dir / step_dir_name(step)
    if final.is_dir():  # a step is saved once: only a resumed, already finished run gets here
        if env.is_main:
            print(f"{final} already exists; not saving step {step} again")
        return final
    tmp = output_dir / f".tmp-{final.name}"  # one name for all ranks (they share the folder)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    barrier(env)

    reshard(model)  # an eval-only forward leaves the root gathered; save the shards, not the gathered copy
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _one_process_dcp(env):
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / _SHARDS), no_dist=not env.sharded)
    torch.save(rng_state(), tmp / "rng" / f"rank_{env.rank}.pt")
    for name, write in (final_writers or {}).items():  # collective: every rank gathers, rank 0 writes
        write(tmp / name)
    if env.is_main:
        state = TrainingState(step=step, micro_batches=micro_batches, optimizer={}, scheduler=scheduler.state_dict(),
                              rng=rng_state())
        torch.save(vars(state), tmp / "training_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
    _fsync_own_files(tmp, env)
    barrier(env)  # every rank's files are complete and on disk

    if env.is_main:
        os.replace(tmp, final)
        atomic_write_text(output_dir / "LATEST", final.name + "\n")
        if keep_last > 0:
            for stale in list_dcp_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
    barrier(env)
    return final


@contextlib.contextmanager
def _one_process_dcp(env: DistEnv) -> Iterator[None]:
    """Silence DCP's "assuming a single process" warning when that is exactly what we asked for."""
    with warnings.catch_warnings():
        if not env.sharded:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_own_files(root: Path, env: DistEnv) -> None:
    """Flush this rank's files (DCP names them ``__RANK_*``; rank 0 also owns the shared ones)."""
    for path in sorted(root.rglob("*")):
        mine = path.name.startswith(f"__{env.rank}_") or path.name == f"rank_{env.rank}.pt"
        if path.is_file() and (mine or env.is_main):
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def resume_dcp(output_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               env: DistEnv, config: dict | None = None) -> tuple[int, int]:
    """Load the newest complete checkpoint in ``output_dir`` into model, optimizer, schedule and RNG.

    DCP stores every tensor with its global shape and each file's slice of it, so any number of
    processes (including one, unsharded) can load a checkpoint that any other number wrote.

    Args:
        config: The new run's resolved config; when given it must match the checkpoint's in the
            options that change the data stream or the shapes (``check_resume_config``).

    Returns:
        ``(step, micro_batches)`` already done; ``(0, 0)`` when there is no checkpoint yet.

    Raises:
        CheckpointError: another config, or a checkpoint that does not fit the model or cannot be
            read (saying which, and naming the folder and what to do).
    """
    found = list_dcp_checkpoints(output_dir)
    if not found:
        if env.is_main:
            print(f"resume: no checkpoint in {output_dir} yet, starting from step 0")
        return 0, 0
    ckpt = found[-1]
    if config is not None:
        check_resume_config(ckpt, config)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state_dict = {"model": model_sd, "optimizer": optim_sd}
    try:
        with _one_process_dcp(env):
            dcp.load(state_dict, checkpoint_id=str(ckpt / _SHARDS), no_dist=not env.sharded)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException: name it
        explained = explain_dcp_load_failure(e, ckpt, found[:-1])
        if explained is None:
            raise
        raise explained from e
    set_state_dict(model, optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optimizer"])
    state = load_training_state(ckpt / "training_state.pt")
    scheduler.load_state_dict(state.scheduler)
    set_rng_state(rank_rng_state(ckpt, state, env.rank))  # a rank new to the run derives its own
    if env.is_main:
        print(f"resumed from {ckpt} at step {state.step}")
    return state.step, state.micro_batches
