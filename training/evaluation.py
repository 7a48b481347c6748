"""Held-out evaluation: the loss, and what users care about: greedy answers scored by a metric.

    metrics = load_eval_metrics(cfg.eval_metric)
    before = held_out_report(model, ..., metrics, cfg, when="before")   # loss, metric means, a few samples
    ... train ...
    after = held_out_report(model, ..., metrics, cfg, when="after")
    write_held_out_report(output_dir, before, after)       # before → after table + held_out_report.json

The answers come from ``generate_batch`` (greedy, KV cache, ``batch_size`` prompts at a time) and
are scored by the ``eval_metric`` functions (see training/eval_metrics.py for their contract). A
recipe whose held-out numbers are not a loss (DPO) builds its own ``HeldOutReport`` and calls
``answer_held_out``.

Distributed runs pass their ``env``: each rank evaluates its share of every held-out batch and the
loss sums and label counts are added over ranks, so the set is evaluated once, not once per rank;
the answers are generated in lockstep (every rank runs every forward of the sharded model and
continues with rank 0's tokens) and rank 0 prints.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.training.batching import BatchStream
from tunesmith.training.eval_metrics import Metric, score
from tunesmith.training.losses import IGNORE_INDEX
from tunesmith.training.options import RunOptions
from tunesmith.training.process_group import DistEnv, agree_on, eval_slice, main_rank_prints, sum_tensor_over_ranks

REPORT_FILE = "held_out_report.json"


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: BatchStream, loss_fn: Any, device: torch.device,
                  max_batches: int = 0, env: DistEnv | None = None) -> float:
    """Mean loss per labelled token over the held-out batches (dropout off; mode restored after).

    Args:
        model: The model (with adapters).
        batches: Held-out micro-batches, unshuffled.
        loss_fn: The training loss (summed over tokens).
        device: Where the model lives.
        max_batches: Evaluate at most this many batches; 0 means all.
        env: A distributed run's process group: each rank takes its share of every batch.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = batches.per_epoch if max_batches <= 0 else min(max_batches, batches.per_epoch)
    for i in range(n):
        batch = batches[i] if env is None else eval_slice(batches[i], env)
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        total += float(loss_fn(model.hidden_states(tokens), labels, model.logits))
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    if env is not None:
        total, count = sum_tensor_over_ranks(torch.tensor([total, count], dtype=torch.float64), env).tolist()
    return total / max(1, count)


def sample_answer(model: torch.nn.Module, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int,
                  env: DistEnv | None = None) -> str:
    """Greedy answer of the model to a chat prompt.

    With a sharded ``env`` every rank generates in lockstep, continuing with rank 0's token.
    """
    from tunesmith.models.generation import generate

    sharded = env is not None and env.sharded
    was_training = model.training
    model.eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    device = next(model.parameters()).device
    out = generate(model, torch.tensor(prompt, device=device), max_new_tokens=max_new_tokens,
                   temperature=0.0, stop_ids=tokenizer.stop_ids,
                   agree=(lambda picked: agree_on(picked, env)) if sharded else None)
    model.train(was_training)
    return tokenizer.decode(out)


@dataclass
class HeldOutReport:
    """What one held-out evaluation found.

    Attributes:
        when: ``before`` or ``after`` (training).
        scores: ``loss`` (or the preference metrics) and the mean of every eval metric.
        percent: Names in ``scores`` whose per-example values all lie in [0, 1] (shown as %).
        samples: ``{"prompt", "reference", "completion", <metric>: score}`` for every answered example
            (``reference``: the target ``answer`` the metrics compared with).
    """

    when: str
    scores: dict[str, float] = field(default_factory=dict)
    percent: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def scalars(self) -> dict[str, float]:
        """The scores under ``val/`` names, as the metric loggers get them."""
        return {f"val/{name}": value for name, value in self.scores.items()}

    def show(self, name: str) -> str:
        """One score as printed: a percentage for shares, four decimals otherwise."""
        value = self.scores[name]
        return f"{100 * value:.1f}%" if name in self.percent else f"{value:.4f}"


def record_fields(dataset: Any, n: int) -> dict[str, list]:
    """The first ``n`` examples' record fields, one list per field (None where a record lacks it),
    plus ``answer`` (each example's target answer) when the records have no field of that name."""
    records = dataset.records[:n]
    names = list(dict.fromkeys(k for r in records for k in r))
    fields = {k: [r.get(k) for r in records] for k in names}
    fields.setdefault("answer", [dataset.reference(i) for i in range(n)])
    return fields


def metric_prompt(messages: list[dict[str, str]]) -> str | list[dict[str, str]]:
    """A prompt as metrics get it: the user's text when it is one user turn, else the chat messages."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def answer_held_out(model: torch.nn.Module, tokenizer: Any, dataset: Any, metrics: dict[str, Metric],
                    report: HeldOutReport, run: RunOptions, env: DistEnv | None = None) -> None:
    """Answer held-out prompts greedily, score them, print a few; fill ``report``.

    Args:
        model: The model (mode restored after).
        tokenizer: Renders each prompt with the chat template; its stop ids end an answer.
        dataset: Held-out set with ``prompt_messages(i)``, ``reference(i)`` and ``records``.
        metrics: ``{name: fn}`` from ``load_eval_metrics``.
        report: Gets the metric means and the samples.
        run: The recipe's options: ``eval_examples`` answered (0: all), ``sample_max_new_tokens``
            at most each, ``batch_size`` prompts decoded together, ``show_samples`` printed.
        env: A distributed run's process group: every rank decodes every batch in lockstep and
            continues with rank 0's tokens (the sharded model needs every rank in every forward).
    """
    from tunesmith.models.generation import generate_batch

    n = len(dataset) if run.eval_examples <= 0 else min(run.eval_examples, len(dataset))
    batch_size = max(1, run.batch_size)
    lockstep = (lambda picked: agree_on(picked, env)) if env is not None and env.sharded else None
    messages = [dataset.prompt_messages(i) for i in range(n)]
    prompt_ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    answers: list[str] = []
    for start in range(0, n, batch_size):
        new = generate_batch(model, prompt_ids[start:start + batch_size], max_new_tokens=run.sample_max_new_tokens,
                             stop_ids=tokenizer.stop_ids, agree=lockstep)
        answers += [tokenizer.decode(ids) for ids in new]
    prompts = [metric_prompt(m) for m in messages]
    fields = record_fields(dataset, n)
    per_example = {name: score(fn, name, prompts, answers, fields) for name, fn in metrics.items()}
    for name, values in per_example.items():
        report.scores[name] = sum(values) / max(1, len(values))
        if all(0.0 <= v <= 1.0 for v in values):
            report.percent.append(name)
    report.samples = [{"prompt": prompts[i], "reference": fields["answer"][i], "completion": answers[i],
                       **{name: values[i] for name, values in per_example.items()}} for i in range(n)]

    if metrics:
        means = ", ".join(f"{name} {report.show(name)}" for name in metrics)
        print(f"held-out answers ({report.when} training, {n} examples, greedy): {means}", flush=True)
    for i, sample in enumerate(report.samples[:run.show_samples]):
        marks = ", ".join(f"{name} {sample[name]:.3g}" for name in metrics)
        print(f"  sample {i + 1}: {sample['prompt']!r}\n    reference: {sample['reference']!r}\n"
              f"    answer ({report.when}): {sample['completion']!r}" + (f"  [{marks}]" if marks else ""), flush=True)


def held_out_report(model: torch.nn.Module, tokenizer: Any, batches: BatchStream, dataset: Any, loss_fn: Any,
                    device: torch.device, metrics: dict[str, Metric], run: RunOptions, *, when: str,
                    env: DistEnv | None = None) -> HeldOutReport:
    """Print the held-out loss, the eval metrics over greedy answers and a few samples.

    Args:
        metrics: ``{name: fn}`` (``load_eval_metrics(cfg.eval_metric)``); empty: loss and samples only.
        run: The recipe's options: the loss covers ``eval_batches`` batches (0: all); answers as in
            ``answer_held_out``, none when ``sample_max_new_tokens`` is 0.
        when: ``before`` or ``after``, for the printout.
        env: A distributed run's process group (every rank calls this; rank 0 prints).

    Args:
        env: A distributed run's process group (every rank calls this; rank 0 prints).

    Returns:
        The report: ``scores["loss"]`` and each metric's mean, and every answer.
    """
    with main_rank_prints(env) if env is not None else nullcontext():
        loss = evaluate_loss(model, batches, loss_fn, device, max_batches=run.eval_batches, env=env)
        print(f"held-out loss: {loss:.4f} ({when} training)", flush=True)
        report = HeldOutReport(when, scores={"loss": loss})
        has_prompts = len(dataset) > 0 and bool(dataset.prompt_messages(0))  # plain text (format=text) has none
        if run.sample_max_new_tokens > 0 and has_prompts:
            answer_held_out(model, tokenizer, dataset, metrics, report, run, env)
    return report


def write_held_out_report(output_dir: str | Path, before: HeldOutReport | None, after: HeldOutReport) -> Path:
    """Print the before → after table and write both reports to ``output_dir/held_out_report.json``.

    Args:
        before: The report before training (``None`` for a resumed run, which did not measure it).
        after: The report after training.

    Returns:
        The JSON file (logged as an artifact of the run).
    """
    from tunesmith.training.checkpointing import atomic_write_text

    answered = len(after.samples)
    print("held-out, before → after training" + (f" ({answered} answered examples)" if answered else "") + ":")
    for name in after.scores:
        was = before.show(name) if before is not None and name in before.scores else "—"
        print(f"  {name:<24} {was:>10} → {after.show(name)}")
    path = Path(output_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"before": asdict(before) if before is not None else None, "after": asdict(after)}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path
