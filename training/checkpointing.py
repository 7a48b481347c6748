"""Atomic, resumable checkpoints in ``output_dir``.

Layout (one folder per saved step; the newest is the one a resume continues from)::

    output_dir/
      step_000050/
        trainable.safetensors   trained tensors, our names (exact resume)
        training_state.pt       optimizer, LR schedule, RNG, step, data position
        config.yaml             the resolved config of the run
        adapter/                PEFT adapter  (recipes that train LoRA)
        merged/                 full HF model (when ``save_merged=true``)
      step_000100/ ...
      LATEST                    name of the newest complete step folder

A checkpoint is written into ``.tmp-step_…`` and renamed into place only once every file is on
disk, so a crash (or SIGKILL) mid-save leaves the previous checkpoint untouched and loadable; the
half-written temp folder is removed the next time the run starts.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint on disk does not fit the run (missing file, wrong keys or shapes)."""


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
) -> Path:
    """Write ``output_dir/step_NNNNNN`` atomically and prune older ones.

    Args:
        output_dir: The run's folder.
        step: Optimizer steps completed.
        trainable: Tensors that training changes (adapter weights, or all weights), our names.
        state: Optimizer/scheduler/RNG/data position.
        config_yaml: The resolved config, kept beside the weights.
        extra_writers: ``{subfolder: fn(path)}`` for export formats, e.g. ``{"adapter": save_peft}``.
        keep_last: How many step folders to keep (older ones are deleted after the new one is in
            place; 0 keeps all).

    Returns:
        The final checkpoint folder.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / step_dir_name(step)
    tmp = output_dir / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    torch.save(vars(state), tmp / "training_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    for name, write in (extra_writers or {}).items():
        write(tmp / name)
    _fsync_tree(tmp)
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
    return final


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
    """Delete leftovers of saves that were interrupted (never a complete checkpoint)."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".old-")):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(ckpt_dir: str | Path, params: dict[str, torch.nn.Parameter]) -> TrainingState:
    """Copy saved tensors into ``params`` (strict names and shapes) and return the training state.

    Raises:
        CheckpointError: naming the file and the key when the checkpoint doesn't fit the model.
    """
    ckpt_dir = Path(ckpt_dir)
    weights_file = ckpt_dir / "trainable.safetensors"
    saved = load_file(weights_file)
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_file} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}. "
            "Was it written with a different model or LoRA setting? Resume with the config it was written with "
            f"(see {ckpt_dir / 'config.yaml'}) or use a fresh output_dir."
        )
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise CheckpointError(
                    f"{weights_file}: '{name}' has shape {tuple(saved[name].shape)}, the model expects "
                    f"{tuple(p.shape)}. Resume with the config in {ckpt_dir / 'config.yaml'} or a fresh output_dir."
                )
            p.copy_(saved[name])
    raw: dict[str, Any] = torch.load(ckpt_dir / "training_state.pt", weights_only=True)  # no arbitrary pickle
    return TrainingState(**raw)


def resume_latest(
    output_dir: str | Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any
) -> int:
    """Load the newest checkpoint in ``output_dir`` into params/optimizer/scheduler/RNG.

    Returns:
        The number of optimizer steps already done (0 when there is no checkpoint yet).
    """
    ckpt = latest_checkpoint(output_dir)
    if ckpt is None:
        print(f"resume: no checkpoint in {output_dir} yet, starting from step 0")
        return 0
    state = load_checkpoint(ckpt, params)
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    set_rng_state(state.rng)
    print(f"resumed from {ckpt} at step {state.step}")
    return state.step


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
    merged_tokenizer_dir: str | None = None,
    save_merged: bool = False,
) -> Path:
    """Checkpoint a LoRA run: adapter weights + training state (resume), PEFT adapter, merged model.

    Args:
        lora: The run's ``LoRAOptions`` (rank, alpha, dropout, targets → ``adapter_config.json``).
        base_model: Recorded as the adapter's ``base_model_name_or_path``.
        merged_tokenizer_dir: Tokenizer files copied next to a merged model.
        save_merged: Also write the merged full model (HF layout) into ``merged/``.
    """
    from tunesmith.models import save_hf_checkpoint, save_peft_adapter
    from tunesmith.models.lora import lora_state_dict

    state = TrainingState(step=step, micro_batches=micro_batches, optimizer=optimizer.state_dict(),
                          scheduler=scheduler.state_dict(), rng=rng_state())
    writers: dict[str, Callable[[Path], Any]] = {
        "adapter": lambda path: save_peft_adapter(model, path, base_model=base_model, rank=lora.rank, alpha=lora.alpha,
                                                  dropout=lora.dropout, targets=list(lora.targets)),
    }
    if save_merged:  # full model with the update folded in, HF layout (+ tokenizer files)
        writers["merged"] = lambda path: save_hf_checkpoint(model, path, tokenizer_dir=merged_tokenizer_dir)
    return save_checkpoint(output_dir, step, trainable=lora_state_dict(model), state=state, config_yaml=config_yaml,
                           extra_writers=writers, keep_last=keep_last)


def find_adapter(choice: str, output_dir: str | Path, base_model: str | None = None) -> Path | None:
    """Resolve an ``adapter`` / ``checkpoint`` option to a PEFT adapter folder.

    Args:
        choice: ``auto`` (the newest checkpoint's ``adapter/`` in ``output_dir``, if any), ``none``, or
            a path to an adapter folder or a checkpoint folder holding ``adapter/``.
        output_dir: The run's folder, searched by ``auto``.
        base_model: With ``auto``, the adapter is used only when it records this base model (so a
            merged model, or another base, is never given an adapter trained for a different one).

    Raises:
        ConfigError: a path without ``adapter_config.json``.
    """
    import json

    from tunesmith.training.config import ConfigError

    if choice == "none":
        return None
    if choice == "auto":
        ckpt = latest_checkpoint(output_dir)
        adapter = ckpt / "adapter" if ckpt is not None else None
        if adapter is None or not (adapter / "adapter_config.json").is_file():
            return None
        trained_on = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base_model is not None and trained_on != base_model:
            print(f"not applying {adapter}: it was trained on {trained_on}, not {base_model}")
            return None
        return adapter
    path = Path(choice)
    path = path / "adapter" if (path / "adapter").is_dir() else path
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"{choice}: no adapter_config.json in {path} (give a checkpoint folder step_N or its adapter/)")
    return path
