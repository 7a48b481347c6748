"""Sharded training runtime: process group, FSDP2, sharded loading, DCP checkpoints, HF export.

    torchrun env ─► init_distributed ─► load_sharded (meta → fully_shard → each rank reads its rows)
    train: set_requires_gradient_sync on inner micro-batches ; clip_grad_norm (global norm)
    save_dcp_checkpoint: every rank writes its shards into .tmp-step_N ; barrier ; rank 0 renames
    resume_dcp: DCP reshards on load, so 2 processes → 1 process (or 8 → 16) just works
    export_hf_checkpoint: one tensor at a time gathered to rank 0's CPU, written shard by shard

Without torchrun (no ``WORLD_SIZE`` in the environment) nothing here starts a process group: the
model stays a plain module and every helper degrades to its one-process meaning, so the same
recipe runs on a laptop.

Multi-node runs need ``output_dir`` on a filesystem every node sees (each rank writes its own
shard files into the same checkpoint folder).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from tunesmith.training.checkpointing import (
    CheckpointError,
    TrainingState,
    atomic_write_text,
    rng_state,
    set_rng_state,
    step_dir_name,
)
from tunesmith.training.config import ConfigError

_STEP_PREFIX = "step_"
_SHARDS = "sharded"  # DCP folder inside a step checkpoint: .metadata + one __R_0.distcp per rank


# ------------------------------------------------------------------------------------------------
# Process group
# ------------------------------------------------------------------------------------------------
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
    if env.sharded:
        dist.barrier()


def sum_over_ranks(value: float, env: DistEnv) -> float:
    """Sum a Python number over all ranks (e.g. per-rank loss sums → the step's loss)."""
    if not env.sharded:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t.item())


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


# ------------------------------------------------------------------------------------------------
# Sharding
# ------------------------------------------------------------------------------------------------
def shard_model(
    model: nn.Module,
    env: DistEnv,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2: ``fully_shard`` every transformer block, then the root (embedding, final norm, head).

    One FSDP unit per block means only one block's full weights exist at a time (all-gathered
    just before it runs, freed after); the root unit holds the rest. ``hidden_states`` is
    registered as a forward method so calling it (rather than ``model(...)``) still triggers the
    root's all-gather; the loss then calls ``model.logits`` while the root is still gathered.

    Args:
        model: A model with ``layers`` (blocks) and ``hidden_states`` (our families).
        env: From ``init_distributed``; must be sharded.
        param_dtype: Compute dtype the weights are all-gathered in (bf16: half the traffic);
            ``None`` keeps the stored dtype.
        reduce_dtype: Dtype of the gradient reduce-scatter (fp32 is more accurate for bf16 compute).
        cpu_offload: Keep sharded weights, gradients and optimizer state in CPU memory; weights
            go to the GPU only while their block runs (slow, but fits much larger models).
        reshard_after_forward: Free each block's gathered weights after its forward (ZeRO-3);
            ``False`` keeps them until backward (ZeRO-2-like: more memory, less communication).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kwargs: dict[str, Any] = {"mesh": env.mesh, "mp_policy": MixedPrecisionPolicy(param_dtype, reduce_dtype)}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in model.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Turn the gradient reduce-scatter on (last micro-batch of a step) or off (inner ones)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def reshard(model: nn.Module) -> None:
    """Free every all-gathered weight (the root stays gathered after an eval-only forward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip by the norm of ALL gradients (every rank's shards together); returns the norm before.

    With FSDP each rank holds slices of each gradient, so the per-tensor norms are partial sums;
    ``full_tensor()`` adds them up across ranks before the clip factor is applied.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


# ------------------------------------------------------------------------------------------------
# Loading: meta device → shard → every rank reads only its rows
# ------------------------------------------------------------------------------------------------
def _my_rows(global_rows: int, env: DistEnv) -> tuple[int, int]:
    """FSDP2 splits dim 0 like ``torch.chunk``: rank r gets rows [r·c, min((r+1)·c, n)), c = ceil(n/W)."""
    per = -(-global_rows // env.world_size)
    start = min(env.rank * per, global_rows)
    return start, min(start + per, global_rows)


def load_sharded(source: str, dtype: torch.dtype, env: DistEnv, **shard_kwargs: Any) -> nn.Module:
    """Build the model on the meta device, shard it, then fill each rank's shard from safetensors.

    Each rank opens the (memory-mapped) safetensors files and reads only the rows of dim 0 that it
    owns (``get_slice``), so no process ever holds a full copy: a 70B model loads on 8 GPUs whose
    CPUs could not hold it either. We chose this over "rank 0 reads and broadcasts" because it
    needs no full-size staging buffer on rank 0 and reads in parallel; the price is that every
    rank needs the files (a shared or node-local copy; a Hub id is downloaded once per node).

    Args:
        source: Local HF directory or Hub repo id (``.gguf`` files: use ``load_pretrained`` on each
            rank and ``shard_model``; they are small).
        dtype: Dtype of the sharded (master) weights.
        env: The process group; must be sharded.
        **shard_kwargs: Passed to ``shard_model`` (mixed precision, CPU offload).
    """
    from tunesmith.models.hf_checkpoint import CheckpointFormatError, read_config, resolve_model_dir, safetensors_files

    if env.local_rank != 0:  # local rank 0 downloads a Hub id first; the others then hit the cache
        barrier(env)
    model_dir = resolve_model_dir(source)
    if env.local_rank == 0:
        barrier(env)
    d, family, cls = read_config(model_dir)
    try:
        cfg = family.config_from_hf(d)
    except ValueError as e:
        raise CheckpointFormatError(f"{model_dir / 'config.json'}: {e}") from e
    with torch.device("meta"):
        model = cls(cfg).to(dtype)
    shard_model(model, env, **shard_kwargs)
    # Offloaded shards live on the CPU; FSDP moves them to the GPU only while a block runs.
    model.to_empty(device="cpu" if shard_kwargs.get("cpu_offload") else env.device)
    model.reset_buffers()
    for module in model.modules():  # RoPE tables belong where the compute runs, also with offloaded weights
        for key, buf in module.named_buffers(recurse=False):
            setattr(module, key, buf.to(env.device))

    params = dict(model.named_parameters())
    table = family.hf_to_ours(cfg)
    names = {hf: ours for hf, ours in table.items() if ours is not None}
    files = safetensors_files(model_dir)
    unknown = sorted(set(files) - set(table))
    if unknown:
        raise CheckpointFormatError(f"{model_dir}: unexpected tensor(s) not used by this model: {unknown[:10]}")
    by_file: dict[Path, list[str]] = {}
    for hf_name, path in files.items():
        if hf_name in names:  # tensors the family table skips (None) are never read
            by_file.setdefault(path, []).append(hf_name)
    loaded: set[str] = set()
    with torch.no_grad():
        for path, hf_names in by_file.items():
            with safe_open(path, framework="pt") as f:  # memory-mapped: a slice reads only its bytes
                for hf_name in hf_names:
                    ours, piece = names[hf_name], f.get_slice(hf_name)
                    param, shape = params[ours], tuple(piece.get_shape())
                    if shape != tuple(param.shape):
                        raise CheckpointFormatError(
                            f"{path}: tensor {hf_name!r} has shape {shape} but the model's {ours!r} expects "
                            f"{tuple(param.shape)}; does config.json belong to these weights?")
                    local = param.to_local() if isinstance(param, DTensor) else param
                    start, end = _my_rows(shape[0], env)
                    if local.shape[0] != end - start:  # FSDP changed how it splits: fail loudly, never misload
                        raise RuntimeError(f"{ours}: FSDP shard has {local.shape[0]} rows, expected rows {start}:{end}")
                    local.copy_(piece[start:end])
                    loaded.add(ours)
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointFormatError(f"{model_dir}: checkpoint lacks tensor(s) for {missing[:10]}")
    return model


def load_for_training(model: str, tokenizer: str | None, chat_template: str | None, dtype: torch.dtype,
                      env: DistEnv, **shard_kwargs: Any) -> Any:
    """The base model (every parameter trainable) and its tokenizer, sharded when ``env`` is.

    One process: ``setup.load_model_and_tokenizer`` as in the LoRA recipe. Several: the tokenizer
    the same way, the weights through ``load_sharded`` (an HF directory or Hub id); a ``.gguf`` file
    is small enough to load whole on each rank's CPU and shard afterwards.

    Returns:
        ``setup.Pretrained`` (model, tokenizer, source, tokenizer_dir).
    """
    from tunesmith.models import load_pretrained
    from tunesmith.training.setup import Pretrained, load_model_and_tokenizer, load_tokenizer_with_template, resolve_source

    if not env.sharded:
        base = load_model_and_tokenizer(model, tokenizer, dtype, env.device, chat_template)
    else:
        source, tok_source = resolve_source(model), resolve_source(tokenizer or model)
        tok = load_tokenizer_with_template(tok_source, chat_template)
        if source.endswith(".gguf"):
            net = shard_model(load_pretrained(source, dtype=dtype, device="cpu"), env, **shard_kwargs)
        else:
            net = load_sharded(source, dtype, env, **shard_kwargs)
        base = Pretrained(net, tok, source, tok_source if Path(tok_source).is_dir() else None)
    if base.tokenizer_dir is None and tokenizer is None and not base.source.endswith(".gguf"):
        from tunesmith.models.hf_checkpoint import resolve_model_dir

        # A Hub id: its downloaded snapshot holds the tokenizer files the HF export copies.
        base.tokenizer_dir = str(resolve_model_dir(base.source))
    base.model.requires_grad_(True)
    return base


def main_rank_prints(env: DistEnv) -> Any:
    """Context manager: inside it, only rank 0's ``print`` output is shown."""
    return contextlib.nullcontext() if env.is_main else contextlib.redirect_stdout(io.StringIO())


# ------------------------------------------------------------------------------------------------
# Step checkpoints with torch.distributed.checkpoint
# ------------------------------------------------------------------------------------------------
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
    hf_export: dict[str, Any] | None = None,
) -> Path:
    """Write ``output_dir/step_NNNNNN`` atomically; every rank writes only its own shards.

    Layout::

        step_000050/
          sharded/              DCP: .metadata + one file per rank (model + optimizer, by name)
          training_state.pt     step, data position, LR schedule, rank 0's RNG
          rng/rank_R.pt         each rank's RNG
          config.yaml
          hf/                   (final checkpoint) the model in Hugging Face layout

    All ranks write into ``.tmp-step_NNNNNN``; after a barrier (every shard is on disk) rank 0
    renames it into place and updates ``LATEST``. A rank that dies before the rename leaves only
    the temp folder, which the next start deletes: the previous checkpoint stays the newest.

    Args:
        hf_export: Keyword arguments for ``export_hf_checkpoint`` (``tokenizer_dir``, ``dtype``)
            to also write ``hf/`` in the same atomic save; ``None`` skips it.
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
    if hf_export is not None:
        export_hf_checkpoint(model, tmp / "hf", env, **hf_export)
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
               env: DistEnv) -> tuple[int, int]:
    """Load the newest complete checkpoint in ``output_dir`` into model, optimizer, schedule and RNG.

    DCP stores every tensor with its global shape and each file's slice of it, so any number of
    processes (including one, unsharded) can load a checkpoint that any other number wrote.

    Returns:
        ``(step, micro_batches)`` already done; ``(0, 0)`` when there is no checkpoint yet.

    Raises:
        CheckpointError: the checkpoint does not fit the model (naming the folder and what to do).
    """
    found = list_dcp_checkpoints(output_dir)
    if not found:
        if env.is_main:
            print(f"resume: no checkpoint in {output_dir} yet, starting from step 0")
        return 0, 0
    ckpt = found[-1]
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state_dict = {"model": model_sd, "optimizer": optim_sd}
    try:
        with _one_process_dcp(env):
            dcp.load(state_dict, checkpoint_id=str(ckpt / _SHARDS), no_dist=not env.sharded)
    except Exception as e:  # DCP raises CheckpointException (a bare Exception) for missing keys/shapes
        raise CheckpointError(
            f"{ckpt / _SHARDS} does not fit this model ({str(e).splitlines()[0][:300]}). Resume with the config it "
            f"was written with (see {ckpt / 'config.yaml'}) or use a fresh output_dir.") from e
    set_state_dict(model, optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optimizer"])
    raw = torch.load(ckpt / "training_state.pt", weights_only=True)
    state = TrainingState(**raw)
    scheduler.load_state_dict(state.scheduler)
    own_rng = ckpt / "rng" / f"rank_{env.rank}.pt"  # a rank that did not exist before takes rank 0's
    set_rng_state(torch.load(own_rng, weights_only=True) if own_rng.is_file() else state.rng)
    if env.is_main:
        print(f"resumed from {ckpt} at step {state.step}")
    return state.step, state.micro_batches


# ------------------------------------------------------------------------------------------------
# Hugging Face export
# ------------------------------------------------------------------------------------------------
def export_hf_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    env: DistEnv,
    *,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write the (sharded) model as an HF directory without holding it whole on any GPU.

    Tensors are gathered one at a time (``full_tensor()``: every rank sends its rows), moved to
    rank 0's CPU, and written out whenever a safetensors shard of ``max_shard_bytes`` is full;
    so rank 0 holds at most one shard in CPU memory and one tensor on its GPU.

    Args:
        model: The trained model, sharded or not.
        out_dir: Directory to create (only rank 0 writes).
        env: The process group (every rank must call this: the gathers are collective).
        dtype: dtype of the saved tensors; default: the weights' dtype.
        tokenizer_dir: Folder whose tokenizer files are copied next to the weights.
        max_shard_bytes: Split into ``model-0000k-of-0000n.safetensors`` above this total.
    """
    from tunesmith.models.hf_checkpoint import HF_FAMILIES, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TOKENIZER_FILES, _shards

    reshard(model)
    # fully_shard swaps the class for a subclass (FSDPLlama), so match with isinstance.
    family, cfg = next(fam for fam, cls in HF_FAMILIES.values() if isinstance(model, cls)), model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    dtype = dtype or params["tok_embeddings.weight"].dtype
    hf_names = {hf: ours for hf, ours in family.hf_to_ours(cfg).items() if ours is not None}
    # Shard plan from shapes alone (meta tensors cost nothing), identical on every rank.
    sizes = {hf: torch.empty(params[ours].shape, dtype=dtype, device="meta") for hf, ours in hf_names.items()}
    groups = _shards(sizes, max_shard_bytes)
    out_dir = Path(out_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for k, names in enumerate(groups, start=1):
        fname = SAFETENSORS_SINGLE if len(groups) == 1 else f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        shard: dict[str, Tensor] = {}
        for hf in names:
            p = params[hf_names[hf]].detach()
            full = p.full_tensor() if isinstance(p, DTensor) else p  # collective: all ranks take part
            if env.is_main:
                shard[hf] = full.to(device="cpu", dtype=dtype).contiguous()
            del full
        if env.is_main:
            save_file(shard, out_dir / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, fname))
    if env.is_main:
        if len(groups) > 1:
            total = sum(t.numel() * t.element_size() for t in sizes.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        config = family.config_to_hf(cfg)
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for fname in TOKENIZER_FILES if tokenizer_dir is not None else ():
            src = Path(tokenizer_dir) / fname
            if src.is_file():
                shutil.copy2(src, out_dir / fname)
    barrier(env)
    return out_dir
