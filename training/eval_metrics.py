"""Metrics for the held-out report: score each greedy answer of the model against its example.

A metric IS a reward function (GRPO's, training/rewards.py): the same contract, the same built-in
functions, the same names::

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

    tune-run lora_single_device --config smollm2_135m eval_metric=[format_json,my_metrics.mentions_city]

Built in (training/rewards.py): ``exact_match``, ``number_match``, and three JSON metrics
(``format_json``: the answer is one JSON object; ``json_match``: share of the target's fields right;
``json_all_match``: all of them right) for answers that must be one JSON object, like the demo's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Metric = Callable[..., Sequence[float]]


def load_eval_metrics(names: str | Sequence[str]) -> dict[str, Metric]:
    """Resolve the ``eval_metric`` option: built-in names (the rewards') or import paths, in order.

    Args:
        names: One name or a list; ``none`` or an empty list means no metric.

    Returns:
        ``{display name: function}``; an import path is shown by its last component.

    Raises:
        ConfigError: an unknown name (with the closest one), a path that does not import, or an
            object that is not callable.
    """
    from tunesmith.training.config import ConfigError
    from tunesmith.training.plugins import resolve
    from tunesmith.training.rewards import REWARDS

    names = [names] if isinstance(names, str) else list(names)
    metrics: dict[str, Metric] = {}
    for name in names:
        if name == "none":
            continue
        fn = resolve(name, REWARDS, "eval_metric")
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
