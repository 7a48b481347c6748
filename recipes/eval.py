"""Evaluate on lm-evaluation-harness tasks: the base model, a run's adapter, or a merged model.

    tune-run eval --config smollm2_135m tasks=[hellaswag,arc_easy] limit=100     # the run's newest adapter
    tune-run eval --config smollm2_135m tasks=[arc_easy] compare_base=true       # base and tuned side by side
    tune-run eval --config smollm2_135m tasks=[my_task] include_path=my_tasks/   # your own task YAMLs
    tune-run eval --config smollm2_135m checkpoint=none tasks=[arc_easy]         # the base model alone
    tune-run eval --config smollm2_135m model=output/smollm2_135m/step_000060/merged tasks=[arc_easy]

    load the base model (NF4 where the adapter sits, if quantize_base) + tokenizer
    add the adapter: the newest checkpoint in output_dir (checkpoint=auto), or checkpoint=STEP_DIR
    wrap it as an lm-eval model (our forward and batched generation; no second copy in transformers)
    lm_eval.simple_evaluate(tasks) ─► table ─► output_dir/eval/RESULTS.json
    compare_base: the same tasks again with the adapter switched off, side by side

It reads the training run's config, so ``--config`` finds the run's model and output_dir; the
training options in that file (lr, lora, data, …) belong to the training recipe and are skipped.
Needs the ``eval`` extra: ``pip install "tunesmith[eval]"``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from tunesmith.models import load_peft_adapter
from tunesmith.models.lora import disable_adapters
from tunesmith.models.peft_adapter import read_adapter_config
from tunesmith.training.checkpointing import atomic_write_text, find_adapter
from tunesmith.training.config import MISSING, ConfigError, NonNegativeInt, PositiveInt, Range
from tunesmith.training.options import ModelOptions
from tunesmith.training.setup import load_model_and_tokenizer, resolve_source, select_device, select_dtype

EVAL_EXTRA = 'lm-eval is not installed: pip install "tunesmith[eval]"'


@dataclass
class Config(ModelOptions):
    """Options of this recipe (YAML keys and ``key=value`` overrides use these names).

    ``model``, ``tokenizer``, ``chat_template``, ``device``, ``dtype`` and ``output_dir`` come from
    ``ModelOptions`` in training/options.py: ``model`` may also be a merged or fully fine-tuned model
    folder; ``output_dir`` is the training run's folder (``checkpoint=auto`` looks for adapters
    there) and results go to ``output_dir/eval/RESULTS.json``. This recipe adds these.

    Attributes:
        quantize_base: QLoRA runs: store the base weights of the adapted layers in NF4, as in
            training (the adapter's ``target_modules`` say which); needs an adapter.
        checkpoint: ``auto``: the newest checkpoint's adapter in ``output_dir`` when it was trained
            on ``model`` (otherwise ``model`` alone); ``none``: ``model`` alone; or a checkpoint
            folder ``step_N`` / an adapter folder.
        tasks: lm-eval task or group names (``[hellaswag,arc_easy]``), including your own tasks'.
        include_path: A folder of lm-eval task YAMLs to add to the built-in ones (your own tasks).
        limit: Examples per task: a count (``100``), a fraction below 1 (``0.1``), or unset for all.
        num_fewshot: Few-shot examples in each prompt; unset: each task's default.
        batch_size: Requests scored or generated together.
        max_length: Longest input in tokens (longer contexts lose tokens on the left); 0: the
            model's context length.
        max_gen_toks: Longest generation for tasks that do not set their own.
        apply_chat_template: Render prompts with the model's chat template (instruct models).
        compare_base: Also evaluate the base model (adapter switched off) and print both side by side.
        log_samples: Also write every request with the model's responses to
            ``output_dir/eval/samples_<model>.jsonl`` (``<model>``: ``tuned``, ``base`` or ``model``).
    """

    reads_training_configs: ClassVar[bool] = True  # its config file is usually a training run's (tune-run
    # drops the training options it does not declare; see cli.own_file_values)

    quantize_base: bool = False
    checkpoint: str = "auto"
    tasks: list[str] = MISSING
    include_path: str | None = None
    limit: Annotated[float, Range(gt=0)] | None = None
    num_fewshot: NonNegativeInt | None = None
    batch_size: PositiveInt = 8
    max_length: NonNegativeInt = 0
    max_gen_toks: PositiveInt = 256
    apply_chat_template: bool = False
    compare_base: bool = False
    log_samples: bool = False


def adapter_targets(adapter: Path) -> list[str]:
    """Our names of the layers an adapter sits on (PEFT's ``lm_head`` is our ``output``): the NF4 layers of QLoRA."""
    return ["output" if t == "lm_head" else t for t in read_adapter_config(adapter)["target_modules"]]


def open_tasks(task_manager_cls: Any, include_path: str | None, tasks: list[str]) -> Any:
    """lm-eval's ``TaskManager`` that knows ``tasks``; unknown names are refused with the closest ones.

    When ``include_path`` alone holds every task, lm-eval's ~15k built-in task YAMLs are not indexed
    (that takes tens of seconds).
    """
    import difflib

    if include_path is not None:
        own = task_manager_cls(include_path=include_path, include_defaults=False)
        if all(task in own.all_tasks for task in tasks):
            return own
    manager = task_manager_cls(include_path=include_path)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f" — did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"tasks: lm-eval has no task or group named {task!r}{hint} "
                              "(your own task YAMLs go in a folder: include_path=DIR)")
    return manager


def run_tasks(lm: Any, cfg: Config, tasks: list[str], task_manager: Any, label: str) -> dict[str, dict[str, float]]:
    """``lm_eval.simple_evaluate`` on our model; → ``{task: {metric: value}}`` (lm-eval's metric keys).

    With ``log_samples``, every request and response goes to ``output_dir/eval/samples_<label>.jsonl``.
    """
    import lm_eval

    limit = None if cfg.limit is None else (int(cfg.limit) if cfg.limit >= 1 else cfg.limit)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=cfg.num_fewshot, limit=limit,
                                      task_manager=task_manager, apply_chat_template=cfg.apply_chat_template,
                                      log_samples=cfg.log_samples)
    except ConnectionError as e:  # the task's data lives on the Hub and the Hub is out of reach
        raise ConfigError(f"{e}: lm-eval downloads the tasks' data from the Hugging Face Hub. Check the connection "
                          "(HF_TOKEN for gated datasets), or evaluate on local files: include_path=DIR of task YAMLs "
                          "with dataset_path: json") from None
    if cfg.log_samples:
        lines = [json.dumps({"task": task, **sample}, default=str) + "\n"
                 for task, samples in out["samples"].items() for sample in samples]
        write_text(Path(cfg.output_dir) / "eval" / f"samples_{label}.jsonl", "".join(lines))
    return {task: {k: v for k, v in metrics.items() if k not in ("alias", "sample_len") and isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}


def write_text(path: Path, text: str) -> None:
    """Write a result file atomically (readers never see half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def results_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per task and metric, one column per evaluated model (``base`` / ``tuned``), ± stderr."""
    columns = list(results)
    first = results[columns[0]]
    lines = [f"{'task':<28} {'metric':<16} " + " ".join(f"{c:>18}" for c in columns)]
    for task, metrics in first.items():
        for key in metrics:
            name, _, filt = key.partition(",")
            if name.endswith("_stderr"):
                continue
            label = name if filt in ("", "none") else f"{name} ({filt})"
            cells = []
            for c in columns:
                value = results[c].get(task, {}).get(key)
                err = results[c].get(task, {}).get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
                cell = "—" if value is None else f"{value:.4f}" + (f" ± {err:.4f}" if isinstance(err, float) else "")
                cells.append(f"{cell:>18}")
            lines.append(f"{task:<28} {label:<16} " + " ".join(cells))
    return "\n".join(lines)


def main(cfg: Config) -> dict[str, Any]:
    try:  # an optional extra: the recipe loads (and --dry-run works) without it
        import lm_eval
    except ImportError:
        raise ConfigError(EVAL_EXTRA) from None
    from lm_eval.tasks import TaskManager

    from tunesmith.training.lm_eval_model import TunesmithLM

    # ---- what to evaluate --------------------------------------------------------------------------
    tasks = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
    if cfg.include_path is not None and not Path(cfg.include_path).is_dir():
        raise ConfigError(f"include_path={cfg.include_path}: no such folder (it holds your lm-eval task YAMLs)")
    task_manager = open_tasks(TaskManager, cfg.include_path, tasks)
    adapter = find_adapter(cfg.checkpoint, cfg.output_dir, base_model=resolve_source(cfg.model))
    if adapter is None and (cfg.compare_base or cfg.quantize_base):
        what = "compare_base" if cfg.compare_base else "quantize_base"
        raise ConfigError(f"{what}=true needs an adapter, and none was found (checkpoint={cfg.checkpoint}, "
                          f"output_dir={cfg.output_dir}); name one with checkpoint=STEP_DIR")

    # ---- the model, through our own code -----------------------------------------------------------
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    nf4_targets = adapter_targets(adapter) if cfg.quantize_base and adapter is not None else []
    base = load_model_and_tokenizer(cfg.model, cfg.tokenizer, dtype, device, cfg.chat_template, nf4_targets)
    model = base.model
    if adapter is not None:
        load_peft_adapter(model, adapter)
    print(f"evaluating {cfg.model}" + (f" + adapter {adapter}" if adapter else " (no adapter)") +
          f" on {', '.join(tasks)}", flush=True)
    lm = TunesmithLM(model, base.tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                     max_gen_toks=cfg.max_gen_toks, name=Path(cfg.model).name)

    # ---- evaluate ----------------------------------------------------------------------------------
    results: dict[str, dict[str, dict[str, float]]] = {}
    if cfg.compare_base:
        with disable_adapters(model):
            results["base"] = run_tasks(lm, cfg, tasks, task_manager, "base")
    label = "tuned" if adapter is not None else "model"
    results[label] = run_tasks(lm, cfg, tasks, task_manager, label)
    print(results_table(results), flush=True)

    out_file = Path(cfg.output_dir) / "eval" / "RESULTS.json"
    record = {"model": cfg.model, "adapter": str(adapter) if adapter else None, "tasks": tasks,
              "lm_eval_version": lm_eval.__version__, "config": asdict(cfg), "results": results}
    write_text(out_file, json.dumps(record, indent=2) + "\n")
    print(f"results written to {out_file}")
    return {"results": results, "adapter": adapter, "file": out_file}


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
