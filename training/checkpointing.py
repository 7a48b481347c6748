"""Atomic, resumable checkpoints in ``output_dir``.

Layout (one folder per saved step; the newest is the one a resume continues from)::

    output_dir/
      step_000050/
        trainable.safetensors   trained tensors, our names (exact resume)
        training_state.pt       optimizer, LR schedule, RNG, step, data position
        config.yaml             the resolved config of the run
        adapter/                PEFT adapter  (recipes that train LoRA)
        merged/                 full HF model + tokenizer files (final checkpoint, ``save_merged=true``)
        gguf/                   model-<type>.gguf + Modelfile (final checkpoint, ``save_gguf=[…]``)
      step_000100/ ...
      LATEST                    name of the newest complete step folder

A checkpoint is written into ``.tmp-step_…`` and renamed into place only once every file is on
disk, so a crash (or SIGKILL) mid-save leaves the previous checkpoint untouched and loadable; the
half-written temp folder is removed the next time the run starts.

Resuming checks before it loads anything (``check_resume_config``): options that change the data
stream or the shapes (``RESUME_MUST_MATCH``: batch size, seed, data, model, LoRA shape, dtype, …)
must equal those in the checkpoint's ``config.yaml``, else the run is refused naming each one (old →
new); run-length and bookkeeping options (max_steps, eval_every, save_every, keep_last, logging,
speed switches) may change. A newest checkpoint that cannot be read (a truncated file) is refused
too, naming the file and the previous complete checkpoint to resume from instead: the run never
falls back to an older one by itself, and a refused run changes and deletes nothing.

Distributed LoRA runs (FSDP2) write the same format: the adapters and their optimizer state are
small, so every rank gathers them and rank 0 writes full tensors (plus ``rng/rank_R.pt``, each
rank's RNG). Such a checkpoint resumes on any number of processes, and in the single-device
recipe; a single-device checkpoint resumes in the distributed recipe. Pass ``env`` (a
``process_group.DistEnv``) to the functions below for that; without it they are one-process code.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint on disk does not fit the run (missing file, wrong keys or shapes, other config)."""


class CheckpointUnreadableError(CheckpointError):
    """A checkpoint file that cannot be read at all (truncated, corrupt, or missing)."""


@dataclass
class TrainingState:
    """Everything besides weights that a resumed run needs to continue exactly where it stopped."""

    step: int  # optimizer steps completed
    micro_batches: int  # micro-batches consumed from the data stream (the data position)
    optimizer: dict
    scheduler: dict
    rng: dict


def rng_state() -> dict:
    """Python and torch RNG states (dropout, sampling), so a resumed run draws the same numbers."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:06d}"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so readers see either the old or the new content, never half."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    state: TrainingState,
    config_yaml: str,
    extra_writers: dict[str, Callable[[Path], Any]] | None = None,
    keep_last: int = 2,
    env: Any = None,
    collective_writers: dict[str, Callable[[Path], Any]] | None = None,
    rank_rngs: list[dict] | None = None,
) -> Path:
    """Write ``output_dir/step_NNNNNN`` atomically and prune older ones.

    With a sharded ``env`` every rank calls this with the same (gathered) arguments: rank 0
    writes the files and runs ``extra_writers``; ``collective_writers`` run on every rank (they
    gather, rank 0 writes); the rename happens after every rank is done.

    Args:
        output_dir: The run's folder.
        step: Optimizer steps completed.
        trainable: Tensors that training changes (adapter weights, or all weights), our names.
        state: Optimizer/scheduler/RNG/data position.
        config_yaml: The resolved config, kept beside the weights.
        extra_writers: ``{subfolder: fn(path)}`` for export formats, e.g. ``{"adapter": save_peft}``.
        keep_last: How many step folders to keep (older ones are deleted after the new one is in
            place; 0 keeps all).
        env: The process group of a distributed run (``None``: one process).
        collective_writers: Like ``extra_writers``, but called on every rank (a gathered export).
        rank_rngs: Every rank's RNG state (distributed runs), written as ``rng/rank_R.pt``.

    Returns:
        The final checkpoint folder.
    """
    from tunesmith.training.process_group import barrier, gather_objects

    sharded = env is not None and env.sharded
    main = not sharded or env.is_main
    output_dir = Path(output_dir)
    final = output_dir / step_dir_name(step)
    pid = gather_objects(os.getpid(), env)[0] if sharded else os.getpid()  # rank 0's: one temp name for all
    tmp = output_dir / f".tmp-{final.name}-{pid}"
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if sharded:
        barrier(env)
    for name, write in (collective_writers or {}).items():
        write(tmp / name)
    if main:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        torch.save(vars(state), tmp / "training_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        for rank, rng in enumerate(rank_rngs or []):
            (tmp / "rng").mkdir(exist_ok=True)
            torch.save(rng, tmp / "rng" / f"rank_{rank}.pt")
        for name, write in (extra_writers or {}).items():
            write(tmp / name)
        _fsync_tree(tmp)
    if sharded:
        barrier(env)  # every rank's part is on disk
    if main:
        _publish(output_dir, tmp, final, keep_last)
    if sharded:
        barrier(env)
    return final


def _publish(output_dir: Path, tmp: Path, final: Path, keep_last: int) -> None:
    """Rename a complete temp folder into place, point ``LATEST`` at it, prune old ones."""
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = output_dir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    atomic_write_text(output_dir / "LATEST", final.name + "\n")
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete step folders, oldest first (temp folders of interrupted saves are not listed)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
    found = [p for p in found if (p / "training_state.pt").is_file() and (p / "trainable.safetensors").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_stale_temp_dirs(output_dir: str | Path) -> None:
    """Delete leftovers of saves that were interrupted (never a complete checkpoint).

    A save that replaces an existing step moves the old folder to ``.old-step_…`` first; if it died
    before the new one was in place, that old folder is the only copy of the step, so it is moved
    back instead of deleted.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for p in sorted(output_dir.iterdir()):
        if not p.is_dir():
            continue
        if p.name.startswith(".old-"):
            step_name = p.name[len(".old-"):].rpartition("-")[0]
            if step_name.startswith(_PREFIX) and not (output_dir / step_name).exists():
                os.replace(p, output_dir / step_name)
                print(f"restored {output_dir / step_name} from an interrupted re-save")
                continue
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Resume checks: the new run must continue the same data stream with tensors of the same shapes
# ------------------------------------------------------------------------------------------------
# Options (dotted; a group name covers its keys) that a resumed run must share with its checkpoint:
# they choose which examples each step sees (data, seed, batch_size, grad_accum_steps), what the
# saved tensors are (model, tokenizer, chat_template, dtype, lora, quantize_base, full, optimizer),
# or values the saved optimizer state would silently keep (lr, weight_decay). Everything else may
# change: max_steps, epochs, eval_every, eval_batches, save_every, keep_last, tensorboard, device,
# the speed/memory switches, sample lengths, losses' chunk sizes.
RESUME_MUST_MATCH = ("model", "tokenizer", "chat_template", "dtype", "seed", "batch_size", "grad_accum_steps", "data",
                     "lora", "quantize_base", "full", "optimizer", "lr", "weight_decay")
# Inside ``data``, options that only choose the held-out set: they may change when both runs name a
# held-out file (with data.val unset the held-out share is split off the training data).
_HELD_OUT_ONLY = ("data.val", "data.val_split")


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix[:-1]: values}
    out: dict[str, Any] = {}
    for key, value in values.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value})
    return out


def resume_conflicts(saved: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for each option in ``RESUME_MUST_MATCH`` that differs.

    Options present on one side only (added or removed between tunesmith versions) are not
    compared; entries of a mapping option (``data.column_map.output``) are, as unset on the other side.
    """
    old_flat, new_flat = _flatten(saved), _flatten(new)
    held_out_file = bool(old_flat.get("data.val")) and bool(new_flat.get("data.val"))

    def in_mapping(key: str, other: dict[str, Any]) -> bool:
        parent = key.rpartition(".")[0]
        return "." in parent or other.get(parent) == {}

    keys = (old_flat.keys() & new_flat.keys()) | {k for k in new_flat.keys() - old_flat.keys() if in_mapping(k, old_flat)} \
        | {k for k in old_flat.keys() - new_flat.keys() if in_mapping(k, new_flat)}
    conflicts = []
    for key in sorted(keys):
        if old_flat.get(key) == new_flat.get(key):
            continue
        if not any(key == m or key.startswith(m + ".") for m in RESUME_MUST_MATCH):
            continue
        if held_out_file and key in _HELD_OUT_ONLY:
            continue
        conflicts.append((key, old_flat.get(key), new_flat.get(key)))
    return conflicts


def check_resume_config(ckpt_dir: str | Path, config: dict) -> None:
    """Refuse to resume ``ckpt_dir`` with a config that would change the data stream or the shapes.

    Args:
        ckpt_dir: The checkpoint about to be loaded.
        config: The new run's resolved config (``to_dict(cfg)``).

    Raises:
        CheckpointError: naming every conflicting option (old → new), or an unreadable config.yaml.
    """
    path = Path(ckpt_dir) / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CheckpointUnreadableError(f"{path} is missing, so the resumed run cannot be checked against the one "
                                        "that wrote the checkpoint") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointUnreadableError(f"{path} is unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(saved, dict):
        raise CheckpointUnreadableError(f"{path} does not hold a config mapping")
    conflicts = resume_conflicts(saved, config)
    if conflicts:
        lines = "\n".join(f"  {key}: {old!r} → {new!r}" for key, old, new in conflicts)
        raise CheckpointError(
            f"resume=true, but {ckpt_dir} was written with other values of options that change the data stream or "
            f"the shapes:\n{lines}\nResume with the values in {path}, or start a new run with another output_dir. "
            "(Options such as max_steps, eval_every, save_every and keep_last may change on resume.) "
            "Nothing was changed on disk.")


def load_training_state(path: str | Path) -> TrainingState:
    """Read ``training_state.pt`` (tensors and plain containers only: no arbitrary pickle).

    Raises:
        CheckpointUnreadableError: a missing, truncated or foreign file, named.
    """
    try:
        raw: Any = torch.load(path, weights_only=True)
        return TrainingState(**raw)
    except FileNotFoundError:
        raise CheckpointUnreadableError(f"{path} is missing") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, KeyError) as e:  # torch.load's ways to fail
        raise CheckpointUnreadableError(f"{path} is unreadable (truncated or corrupt: {str(e).splitlines()[0][:200]})") from None
    except Exception as e:  # pickle.UnpicklingError and friends
        if type(e).__module__ in ("pickle", "_pickle"):
            raise CheckpointUnreadableError(f"{path} is unreadable ({e})") from None
        raise


def _weights_problem(weights: Path) -> str | None:
    """Why a safetensors file cannot be read (its header, and that the file covers every tensor), or None."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            list(f.keys())
    except Exception as e:  # SafetensorError is a bare Exception subclass
        return f"{weights} is unreadable ({e}; truncated or corrupt)"
    return None


def checkpoint_problem(ckpt_dir: str | Path) -> str | None:
    """Why a single-process checkpoint cannot be loaded (a truncated or corrupt file), or None."""
    ckpt_dir = Path(ckpt_dir)
    problem = _weights_problem(ckpt_dir / "trainable.safetensors")
    if problem is not None:
        return problem
    try:
        load_training_state(ckpt_dir / "training_state.pt")
    except CheckpointUnreadableError as e:
        return str(e)
    return None


def previous_checkpoint_hint(bad: Path, earlier: list[Path], verify: Callable[[Path], str | None] | None = None) -> str:
    """What to do about an unreadable newest checkpoint: the newest earlier one that is complete."""
    for candidate in reversed(earlier):
        if verify is None or verify(candidate) is None:
            return (f" The previous checkpoint {candidate} is complete: to resume from it, move the broken one out of "
                    f"the way (mv {bad} {bad.parent / ('broken-' + bad.name)}) and run again. Nothing was changed on disk.")
    return " There is no earlier complete checkpoint: start a new run with another output_dir. Nothing was changed on disk."


def load_checkpoint(ckpt_dir: str | Path, params: dict[str, torch.nn.Parameter]) -> TrainingState:
    """Copy saved tensors into ``params`` (strict names and shapes) and return the training state.

    Sharded (FSDP) parameters take their own rows of each saved full tensor.

    Raises:
        CheckpointUnreadableError: a file that cannot be read (naming it).
        CheckpointError: naming the file and the key when the checkpoint doesn't fit the model.
    """
    from tunesmith.training.sharding import copy_full_into

    ckpt_dir = Path(ckpt_dir)
    weights_file = ckpt_dir / "trainable.safetensors"
    problem = _weights_problem(weights_file)  # every file is read before any tensor is copied
    if problem is not None:
        raise CheckpointUnreadableError(problem)
    state = load_training_state(ckpt_dir / "training_state.pt")
    saved = load_file(weights_file)
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_file} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}. "
            "Was it written with a different model or LoRA setting? Resume with the config it was written with "
            f"(see {ckpt_dir / 'config.yaml'}) or use a fresh output_dir."
        )
    for name, p in params.items():
        if saved[name].shape != p.shape:
            raise CheckpointError(
                f"{weights_file}: '{name}' has shape {tuple(saved[name].shape)}, the model expects "
                f"{tuple(p.shape)}. Resume with the config in {ckpt_dir / 'config.yaml'} or a fresh output_dir."
            )
    with torch.no_grad():
        for name, p in params.items():
            copy_full_into(p, saved[name])  # this rank's rows of a sharded parameter
    return state


def resume_latest(
    output_dir: str | Path,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict | None = None,
    env: Any = None,
) -> int:
    """Load the newest checkpoint in ``output_dir`` into params/optimizer/scheduler/RNG.

    Args:
        config: The new run's resolved config (``to_dict(cfg)``); when given, it is checked against
            the checkpoint's first (``check_resume_config``).
        env: The process group of a distributed run: every rank reads the (small, full-tensor)
            checkpoint and keeps its own rows; each rank restores its own RNG.

    Returns:
        The number of optimizer steps already done (0 when there is no checkpoint yet).

    Raises:
        CheckpointError: a config that changes the data stream or shapes, an unreadable newest
            checkpoint (naming the previous complete one), or tensors that do not fit.
    """
    main = env is None or env.is_main
    found = list_checkpoints(output_dir)
    if not found:
        if main:
            print(f"resume: no checkpoint in {output_dir} yet, starting from step 0")
        return 0
    ckpt = found[-1]
    try:
        if config is not None:
            check_resume_config(ckpt, config)
        state = load_checkpoint(ckpt, params)
    except CheckpointUnreadableError as e:
        raise CheckpointUnreadableError(str(e) + previous_checkpoint_hint(ckpt, found[:-1], checkpoint_problem)) from None
    try:
        optimizer.load_state_dict(shard_optimizer_state(state.optimizer, list(params.values())))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt / 'training_state.pt'}: the saved optimizer state does not fit this run's "
                              f"optimizer ({e}); resume with the config in {ckpt / 'config.yaml'}") from None
    scheduler.load_state_dict(state.scheduler)
    set_rng_state(rank_rng_state(ckpt, state, env.rank if env is not None else 0))
    if main:
        print(f"resumed from {ckpt} at step {state.step}")
    return state.step


def explain_dcp_load_failure(error: BaseException, ckpt_dir: Path, earlier: list[Path]) -> CheckpointError | None:
    """Say what made ``torch.distributed.checkpoint.load`` of ``ckpt_dir/sharded`` fail.

    DCP wraps every failure in one ``CheckpointException`` (per rank). The known kinds become a
    ``CheckpointError`` that says which: tensors of other shapes or names (a different model or
    config), a missing shard file, or a file that cannot be read (truncated / corrupt; then the
    previous complete checkpoint is named). Anything else returns None: the caller re-raises it
    with its traceback, since it is not the user's checkpoint that is at fault.
    """
    shards = ckpt_dir / "sharded"
    failures = getattr(error, "failures", None) or {0: error}
    causes = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    redo = f"Resume with the config it was written with (see {ckpt_dir / 'config.yaml'}) or use a fresh output_dir."
    for cause in causes:
        text = str(cause).splitlines()[0][:300] if str(cause) else type(cause).__name__
        if "Size mismatch" in text:
            return CheckpointError(f"{shards} holds tensors of other shapes than this model's ({text}). {redo}")
        if "Missing key in checkpoint" in text:
            return CheckpointError(f"{shards} lacks tensors this model has ({text}). {redo}")
        if isinstance(cause, FileNotFoundError):
            names = sorted(p.name for p in shards.glob("*.distcp")) if shards.is_dir() else []
            return CheckpointUnreadableError(
                f"{shards}: a shard file is missing ({cause.filename or text}; present: {names}), e.g. deleted or "
                "never finished copying." + previous_checkpoint_hint(ckpt_dir, earlier))
        if isinstance(cause, EOFError) or type(cause).__module__ in ("pickle", "_pickle") or any(
                word in text for word in ("zip archive", "PytorchStreamReader", "pickle", "truncated", "metadata is None")):
            return CheckpointUnreadableError(f"{shards} is unreadable ({text}; truncated or corrupt)."
                                             + previous_checkpoint_hint(ckpt_dir, earlier))
    return None


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded (DTensor) state tensor gathered whole: the
    one-process format. Collective under FSDP (every rank calls it, in the same order)."""
    from tunesmith.training.sharding import full_tensor

    sd = optimizer.state_dict()
    sd["state"] = {i: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in sorted(s.items())}
                   for i, s in sorted(sd["state"].items())}
    return sd


def shard_optimizer_state(sd: dict, params: list[torch.nn.Parameter]) -> dict:
    """A one-process optimizer state dict with each tensor split like its (sharded) parameter."""
    from tunesmith.training.sharding import shard_like

    state = {i: {k: shard_like(v, params[i]) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for i, s in sd["state"].items()}
    return {**sd, "state": state}


def rank_rng_state(ckpt: Path, state: TrainingState, rank: int) -> dict:
    """The RNG state this rank continues with: its own file, else (rank 0 or a one-process
    checkpoint) the saved one; a rank new to the run derives a distinct seed from rank 0's."""
    own = ckpt / "rng" / f"rank_{rank}.pt"
    if own.is_file():
        return torch.load(own, weights_only=True)
    if rank == 0:
        return state.rng
    g = torch.Generator()
    g.set_state(state.rng["torch"])
    derived = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=g)) + rank)
    return {**state.rng, "torch": derived.get_state()}


def save_adapter_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    micro_batches: int,
    lora: Any,
    base_model: str,
    config_yaml: str,
    keep_last: int = 2,
    final_writers: dict[str, Callable[[Path], Any]] | None = None,
    env: Any = None,
) -> Path:
    """Checkpoint a LoRA run: adapter weights + training state (resume), PEFT adapter, serving outputs.

    Args:
        lora: The run's ``LoRAOptions`` (rank, alpha, dropout, targets → ``adapter_config.json``).
        base_model: Recorded as the adapter's ``base_model_name_or_path``.
        final_writers: The final checkpoint's serving outputs (``merged/``, ``gguf/``), from
            ``final_outputs.run_output_writers``; collective under FSDP (every rank runs them).
        env: The process group of a distributed run: every rank calls this; the adapters and
            their optimizer state are gathered whole and rank 0 writes the one-process format.
    """
    from tunesmith.models import save_peft_adapter
    from tunesmith.models.lora import lora_state_dict
    from tunesmith.training.process_group import gather_objects
    from tunesmith.training.sharding import full_tensor, reshard

    sharded = env is not None and env.sharded
    if sharded:
        reshard(model)  # an eval-only forward leaves the root gathered: gather from the shards, not its buffers
    trainable = {k: full_tensor(v) for k, v in lora_state_dict(model).items()}  # collective under FSDP
    state = TrainingState(step=step, micro_batches=micro_batches, optimizer=gathered_optimizer_state(optimizer),
                          scheduler=scheduler.state_dict(), rng=rng_state())
    writers: dict[str, Callable[[Path], Any]] = {
        "adapter": lambda path: save_peft_adapter(model, path, base_model=base_model, rank=lora.rank, alpha=lora.alpha,
                                                  dropout=lora.dropout, targets=list(lora.targets), tensors=trainable),
    }
    return save_checkpoint(output_dir, step, trainable=trainable, state=state, config_yaml=config_yaml,
                           extra_writers=writers, keep_last=keep_last, env=env, collective_writers=final_writers,
                           rank_rngs=gather_objects(rng_state(), env) if sharded else None)


def find_adapter(choice: str, output_dir: str | Path, base_model: str | None = None) -> Path | None:
    """Resolve an ``adapter`` / ``checkpoint`` option to a PEFT adapter folder.

    Args:
        choice: ``auto`` (the newest checkpoint's ``adapter/`` in ``output_dir``, if any), ``none``, or
            a path to an adapter folder or a checkpoint folder holding ``adapter/``.
        output_dir: The run's folder, searched by ``auto``.
        base_model: With ``auto``, the adapter is used only when it records this base model (so a
            merged model, or another base, is never given an adapter trained for a different one).

    Raises:
        ConfigError: a path without ``adapter_config.json``, or an ``auto`` checkpoint that holds a
            full model rather than an adapter (naming what to load instead).
    """
    import json

    from tunesmith.training.config import ConfigError

    if choice == "none":
        return None
    if choice == "auto":
        found = list_checkpoints(output_dir)
        exported = sorted(Path(output_dir).glob("step_*/hf"))
        if not found and exported:  # a full fine-tune's folder: its model is a model, not an adapter
            raise ConfigError(f"adapter=auto: {output_dir} holds full models, not adapters; load the newest with "
                              f"model={exported[-1]} adapter=none")
        if not found:
            return None
        newest = found[-1]
        adapter = newest / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            merged = newest / "merged"
            raise ConfigError(f"adapter=auto: the newest checkpoint {newest} holds no adapter (a full fine-tune); "
                              + (f"load it with model={merged} adapter=none" if merged.is_dir() else
                                 "talk to the base model with adapter=none"))
        trained_on = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base_model is not None and trained_on != base_model:
            print(f"not applying {adapter}: it was trained on {trained_on}, not {base_model}")
            return None
        return adapter
    path = Path(choice)
    path = path / "adapter" if (path / "adapter").is_dir() else path
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"config key 'adapter' = {choice!r}: no adapter_config.json in {path} "
                          "(give a PEFT adapter folder, a checkpoint folder holding adapter/, auto or none)")
    return path
