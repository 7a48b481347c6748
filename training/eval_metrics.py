"""Metrics for the held-out report: score each greedy answer of the model against its example.

A metric has the contract of a reward function (GRPO's, training/rewards.py), so one function
serves both::

    fn(prompts: list, completions: list[str], **fields: list) -> list[float]

- ``prompts[i]``: example i's prompt: the user's message (a string) when the prompt is one user
  turn, else the list of chat messages before the answer.
- ``completions[i]``: the model's greedy answer (special tokens removed).
- ``fields``: every field of the held-out records, one list per field (instruct data:
  ``instruction``, ``input``, ``output``; chat data: ``messages``; your own fields too), plus
  ``answer`` where the records have none: each example's target answer (its last assistant turn;
  a preference pair's ``chosen`` answer). Name the fields you need as parameters and take the
  rest with ``**_``.
- Returns one score per example; the report prints their mean, as a percentage when every score
  lies in [0, 1].

For example::

    # my_metrics.py
    def mentions_city(prompts, completions, answer, **_):
        return [float(json.loads(a)["city"] in c) for c, a in zip(completions, answer)]

    tune-run lora_single_device --config smollm2_135m eval_metric=[json_valid,my_metrics.mentions_city]

Built in: ``exact_match`` and three JSON metrics (``json_valid``, ``json_fields``,
``json_all_fields``) for answers that must be one JSON object, like the demo's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from tunesmith.training.config import ConfigError, import_object

Metric = Callable[..., Sequence[float]]


def _normalise(text: str) -> str:
    """Lower case, surrounding whitespace and one trailing full stop removed."""
    return text.strip().removesuffix(".").strip().lower()


def exact_match(prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
    """1 when the answer is the target (case, outer spaces and a final "." ignored), else 0."""
    return [float(_normalise(c) == _normalise(str(a))) for c, a in zip(completions, answer)]


def _json_object(text: str) -> dict | None:
    """The JSON object ``text`` holds (whitespace around it allowed), or None."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _target_objects(answer: list, metric: str) -> list[dict]:
    """The targets as objects (given as dicts or JSON text); one that is not an object means the
    metric does not fit the data."""
    parsed = []
    for i, target in enumerate(answer):
        obj = target if isinstance(target, dict) else _json_object(str(target))
        if obj is None:
            raise ConfigError(f"eval_metric={metric} needs JSON-object target answers, but held-out example {i}'s "
                              f"is {str(target)[:80]!r}; choose another eval_metric (e.g. exact_match)")
        parsed.append(obj)
    return parsed


def json_valid(prompts: list, completions: list[str], **_: Any) -> list[float]:
    """1 when the whole answer parses as one JSON object (what a program reading it needs), else 0."""
    return [float(_json_object(c) is not None) for c in completions]


def json_fields(prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
    """Share of the target object's fields the answer gets exactly right (same key, equal JSON value).

    An answer that is not a JSON object gets 0; keys the target does not have are ignored.
    """
    scores = []
    for c, target in zip(completions, _target_objects(answer, "json_fields")):
        got = _json_object(c) or {}
        scores.append(sum(k in got and got[k] == v for k, v in target.items()) / max(1, len(target)))
    return scores


def json_all_fields(prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
    """1 when every field of the target object is right in the answer (see ``json_fields``), else 0."""
    return [float(s == 1.0) for s in json_fields(prompts, completions, answer)]


BUILT_IN: dict[str, Metric] = {
    "exact_match": exact_match,
    "json_valid": json_valid,
    "json_fields": json_fields,
    "json_all_fields": json_all_fields,
}


def load_eval_metrics(names: str | Sequence[str]) -> dict[str, Metric]:
    """Resolve the ``eval_metric`` option: built-in names or import paths, in order.

    Args:
        names: One name or a list; ``none`` or an empty list means no metric.

    Returns:
        ``{display name: function}``; an import path is shown by its last component.

    Raises:
        ConfigError: an unknown name, a path that does not import, or an object that is not callable.
    """
    names = [names] if isinstance(names, str) else list(names)
    metrics: dict[str, Metric] = {}
    for name in names:
        if name == "none":
            continue
        if name in BUILT_IN:
            metrics[name] = BUILT_IN[name]
            continue
        if "." not in name:
            raise ConfigError(f"eval_metric={name!r} is neither a built-in metric ({', '.join(BUILT_IN)}) nor an "
                              "import path (my_metrics.my_fn: fn(prompts, completions, **fields) -> list[float])")
        fn = import_object(name)
        if not callable(fn):
            raise ConfigError(f"eval_metric={name!r} is not callable (a metric is fn(prompts, completions, **fields))")
        metrics[name.rpartition(".")[2]] = fn
    return metrics


def score(metric: Metric, name: str, prompts: list, completions: list[str], fields: dict[str, list]) -> list[float]:
    """Call one metric and check what it returns: one number per example."""
    scores = [float(s) for s in metric(prompts, completions, **fields)]
    if len(scores) != len(completions):
        raise ValueError(f"eval_metric {name} returned {len(scores)} scores for {len(completions)} answers")
    return scores
