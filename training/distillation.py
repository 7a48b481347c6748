"""Pieces of knowledge distillation that the recipe calls: the frozen teacher and the held-out KL.

    load_teacher(source, student, …)     → the teacher, frozen, checked to share the student's vocabulary
    evaluate_distillation(student, …)    → held-out KL(teacher ‖ student) per token, and the CE loss
    report_distillation(metrics, when)   → prints ``held-out KL: …``
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.training.batching import BatchStream
from tunesmith.training.config import ConfigError
from tunesmith.training.losses import IGNORE_INDEX, CrossEntropyLoss


def missing_teacher_message(source: str) -> str:
    """What to run when ``source`` names a tunesmith checkpoint (``OUTPUT_DIR/step_N`` or its ``merged``
    folder) that is not there yet.

    When a bundled config has that ``output_dir``, the message names the command that trains it.
    """
    path = Path(source)
    step_dir = path.parent if path.name == "merged" else path
    if not step_dir.name.startswith("step_") or not step_dir.name.removeprefix("step_").isdigit():
        return (f"teacher={source} does not exist: give a LoRA checkpoint folder (OUTPUT_DIR/step_N), a local HF "
                "model folder, a .gguf file, a Hub repo id or package:MODULE/FILE")
    import yaml

    from tunesmith.training.cli import CONFIGS_DIR

    output_dir, steps = step_dir.parent, int(step_dir.name.removeprefix("step_"))
    merged = " save_merged=true" if path.name == "merged" else ""
    for config in sorted(CONFIGS_DIR.glob("*.yaml")):
        values = yaml.safe_load(config.read_text()) or {}
        if Path(str(values.get("output_dir", ""))) == output_dir:
            extra = "" if values.get("max_steps") == steps else f" max_steps={steps}"
            return (f"teacher={source} does not exist yet; it is the checkpoint the bundled config {config.stem} "
                    f"writes. Train it first:\n  tune-run lora_single_device --config {config.stem}{merged}{extra}")
    return (f"teacher={source} does not exist yet; it is the checkpoint a run with output_dir={output_dir} writes "
            f"at step {steps}{' with save_merged=true' if merged else ''}: run that training first")


def check_teacher_exists(source: str) -> str:
    """``source`` resolved (``package:`` names become paths); a local path that is not there is an error.

    Raises:
        ConfigError: naming what to run when the teacher is a tunesmith checkpoint not written yet.
    """
    from tunesmith.training.setup import resolve_source

    resolved = resolve_source(source)
    looks_local = resolved.startswith((".", "/", "~")) or resolved.count("/") != 1 or resolved.endswith(".gguf")
    if looks_local and not Path(resolved).exists():
        raise ConfigError(missing_teacher_message(source))
    return resolved


def teacher_adapter(source: str) -> Path | None:
    """The PEFT adapter folder when ``source`` is a LoRA checkpoint (``step_N/`` holding ``adapter/``, or the
    adapter folder itself); ``None`` for a model."""
    for folder in (Path(source), Path(source) / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return folder
    return None


def adapter_base(adapter: Path) -> str:
    """The base model an adapter was trained on: its run's ``config.yaml`` ``model``, else the adapter's
    recorded ``base_model_name_or_path``."""
    import json

    import yaml

    run = adapter.parent / "config.yaml"
    model = (yaml.safe_load(run.read_text()) or {}).get("model") if run.is_file() else None
    base = model or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"teacher: the adapter {adapter} names no base model (no config.yaml beside it and no "
                          "base_model_name_or_path): give a merged model folder instead")
    return str(base)


def load_teacher(source: str, tokenizer_source: str | None, student: nn.Module, student_tokenizer: Any, dtype: torch.dtype,
                 device: torch.device, quantize: bool = False, probe_texts: tuple[str, ...] = ()) -> nn.Module:
    """The frozen teacher, after checking it shares the student's vocabulary.

    Args:
        source: A LoRA checkpoint folder (``OUTPUT_DIR/step_N``: its base with the adapter merged), a
            local HF folder, Hub id, ``.gguf`` file or ``package:MODULE/FILE``.
        tokenizer_source: The teacher's tokenizer when it is not beside its weights; ``None``: the
            teacher's own, if its folder has one (else it is taken to use the student's: the vocabulary
            sizes are still compared).
        student: The student model (its vocabulary size is compared).
        student_tokenizer: The student's tokenizer (its encodings are compared).
        dtype: Weight dtype of the teacher.
        device: Where the teacher runs.
        quantize: Store every linear layer of the teacher in NF4 (4-bit) as it is read.
        probe_texts: Texts both tokenizers must encode identically.

    Raises:
        ConfigError: A missing teacher (naming the command that writes it, when it is a tunesmith
            checkpoint) or a vocabulary that differs from the student's.
    """
    from tunesmith.models import load_peft_adapter, load_pretrained
    from tunesmith.models.lora import LORA_TARGETS, merge_lora
    from tunesmith.training.setup import load_tokenizer_with_template, resolve_source

    resolved = check_teacher_exists(source)
    nf4_targets = [t for t in LORA_TARGETS if t != "output"] if quantize else []
    adapter = teacher_adapter(resolved)
    weights = resolve_source(adapter_base(adapter)) if adapter else resolved
    teacher = load_pretrained(weights, dtype=dtype, device=device, nf4_targets=nf4_targets)
    if adapter is not None:  # a LoRA checkpoint: its base with the adapter folded in (kept beside an NF4 base)
        load_peft_adapter(teacher, adapter)
        if not quantize:
            merge_lora(teacher)
    teacher.eval().requires_grad_(False)

    v_student, v_teacher = student.config.vocab_size, teacher.config.vocab_size
    if v_student != v_teacher:
        raise ConfigError(f"teacher {source} has a vocabulary of {v_teacher} tokens, the student {v_student}: "
                          "distillation compares the two next-token distributions token by token, so both models "
                          "must use the same tokenizer (pick a teacher of the student's family)")
    own = tokenizer_source or (adapter_base(adapter) if adapter else resolved)
    has_tokenizer = (not Path(own).is_dir()) or any((Path(own) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    if has_tokenizer:
        teacher_tokenizer = load_tokenizer_with_template(resolve_source(own))
        for text in probe_texts:
            if teacher_tokenizer.encode(text, add_special_tokens=False) != student_tokenizer.encode(text, add_special_tokens=False):
                raise ConfigError(f"teacher {source} tokenizes text differently from the student (e.g. {text[:60]!r}): "
                                  "distillation needs both models to share one tokenizer")
    else:
        print(f"teacher {source} has no tokenizer files; using the student's (same vocabulary size, {v_student})")
    return teacher


@torch.no_grad()
def evaluate_distillation(student: nn.Module, teacher: nn.Module, batches: BatchStream, device: torch.device,
                          max_batches: int = 0) -> dict[str, float]:
    """Held-out forward KL(teacher ‖ student) per labelled token (τ = 1, whatever the training loss) and CE loss.

    Args:
        student: The student (dropout off during the pass; its mode is restored after).
        teacher: The frozen teacher.
        batches: Held-out micro-batches, unshuffled.
        device: Where both models live.
        max_batches: At most this many batches; 0 means all.

    Returns:
        ``{"kl": nats per token, "loss": the student's cross-entropy per token}``.
    """
    from tunesmith.training.distillation_losses import ForwardKL

    was_training = student.training
    student.eval()
    kl_fn, ce_fn = ForwardKL(), CrossEntropyLoss()
    kl = ce = 0.0
    count = 0
    n = batches.per_epoch if max_batches <= 0 else min(max_batches, batches.per_epoch)
    for i in range(n):
        batch = batches[i]
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        hidden, teacher_hidden = student.hidden_states(tokens), teacher.hidden_states(tokens)
        kl += float(kl_fn(hidden, teacher_hidden, labels, student.logits, teacher.logits))
        ce += float(ce_fn(hidden, labels, student.logits))
        count += int((labels != IGNORE_INDEX).sum())
    student.train(was_training)
    return {"kl": kl / max(1, count), "loss": ce / max(1, count)}


def report_distillation(metrics: dict[str, float], when: str) -> None:
    """Print the held-out KL to the teacher (and the student's loss), the numbers to compare before/after."""
    print(f"held-out KL (teacher ‖ student): {metrics['kl']:.4f} nats/token ({when} training); "
          f"held-out loss {metrics['loss']:.4f}", flush=True)
