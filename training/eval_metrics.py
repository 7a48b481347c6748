"""Metrics for the held-out report: score each greedy answer of the model against its example.

A metric has the contract of a reward function (the one GRPO's rewards use)::

    fn(prompts: list[str], completions: list[str], **record_fields: list) -> list[float]

``prompts[i]`` is example i's prompt (its last user message), ``completions[i]`` the model's
greedy answer, and ``record_fields`` holds every field of the held-out records as one list per
field (instruct data: ``instruction``, ``input``, ``output``; chat data: ``messages``; your own
fields too), plus ``reference``: each example's target answer (its last assistant turn; the
``chosen`` answer of a preference pair). It returns one score per example; the report prints
their mean, as a percentage when every score lies in [0, 1]. Take the fields you need by name and
swallow the rest with ``**_``::

    # my_metrics.py
    def mentions_city(prompts, completions, reference, **_):
        return [float(json.loads(r)["city"] in c) for c, r in zip(completions, reference)]

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


def exact_match(prompts: list[str], completions: list[str], reference: list[str], **_: Any) -> list[float]:
    """1 when the answer equals the reference (surrounding whitespace ignored), else 0."""
    return [float(c.strip() == r.strip()) for c, r in zip(completions, reference)]


def _json_object(text: str) -> dict | None:
    """The JSON object ``text`` holds (whitespace around it allowed), or None."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _reference_objects(reference: list[str], metric: str) -> list[dict]:
    """Parse the references; a reference that is not a JSON object means the metric does not fit the data."""
    parsed = []
    for i, text in enumerate(reference):
        obj = _json_object(text)
        if obj is None:
            raise ConfigError(f"eval_metric={metric} needs JSON-object reference answers, but held-out example {i}'s "
                              f"is {text[:80]!r}; choose another eval_metric (e.g. exact_match)")
        parsed.append(obj)
    return parsed


def json_valid(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1 when the whole answer parses as one JSON object (what a program reading it needs), else 0."""
    return [float(_json_object(c) is not None) for c in completions]


def json_fields(prompts: list[str], completions: list[str], reference: list[str], **_: Any) -> list[float]:
    """Share of the reference object's fields the answer gets exactly right (same key, equal JSON value).

    An answer that is not a JSON object gets 0; keys the reference does not have are ignored.
    """
    scores = []
    for c, ref in zip(completions, _reference_objects(reference, "json_fields")):
        got = _json_object(c) or {}
        scores.append(sum(k in got and got[k] == v for k, v in ref.items()) / max(1, len(ref)))
    return scores


def json_all_fields(prompts: list[str], completions: list[str], reference: list[str], **_: Any) -> list[float]:
    """1 when every field of the reference object is right in the answer (see ``json_fields``), else 0."""
    return [float(s == 1.0) for s in json_fields(prompts, completions, reference)]


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
                              "import path (my_metrics.my_fn: fn(prompts, completions, **record_fields) -> list[float])")
        fn = import_object(name)
        if not callable(fn):
            raise ConfigError(f"eval_metric={name!r} is not callable (a metric is fn(prompts, completions, **record_fields))")
        metrics[name.rpartition(".")[2]] = fn
    return metrics


def score(metric: Metric, name: str, prompts: list[str], completions: list[str],
          record_fields: dict[str, list]) -> list[float]:
    """Call one metric and check its answer: one finite number per example."""
    scores = [float(s) for s in metric(prompts, completions, **record_fields)]
    if len(scores) != len(completions):
        raise ValueError(f"eval_metric {name} returned {len(scores)} scores for {len(completions)} answers")
    return scores
