"""Reward functions for online RL (GRPO), and how the recipe calls them.

A reward function scores a batch of completions; this is the whole contract::

    fn(prompts: list, completions: list[str], **fields: list) -> list[float]

- ``prompts[i]``: the prompt completion i answers, as written in the data (a string, or a list of
  chat messages); every prompt appears once per completion of its group.
- ``completions[i]``: the generated text (special tokens such as the end-of-turn marker removed).
- ``fields``: every other column of the prompt records, as lists aligned with ``completions``
  (a record ``{"prompt": ..., "answer": "7"}`` gives ``answer=["7", "7", ...]``). Name the columns
  your function needs as parameters and take the rest with ``**_``.
- Returns one float per completion.

Name functions in the config by import path, with optional weights (default 1 each)::

    rewards: [my_rewards.exact_answer, tunesmith.training.rewards.format_json]
    reward_weights: [1.0, 0.5]

The built-in ones below can also be named by their short names (``exact_match``, ``number_match``,
``format_json``, ``json_match``, ``json_all_match``); every training recipe's held-out report scores
its greedy answers with the same functions (``eval_metric``, training/eval_metrics.py). The total reward of a completion is the weighted sum; each function's mean and
standard deviation are logged on their own.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

RewardFn = Callable[..., list[float]]


def _normalise(text: str) -> str:
    """Lower case, surrounding whitespace and one trailing full stop removed."""
    return text.strip().removesuffix(".").strip().lower()


def exact_match(prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
    """1.0 when the completion is the record's ``answer`` (case, outer spaces, a final "." ignored), else 0.0."""
    return [float(_normalise(c) == _normalise(str(a))) for c, a in zip(completions, answer)]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def number_match(prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
    """1.0 when the last number in the completion equals the record's numeric ``answer``, else 0.0.

    The usual check for math word problems, where the reasoning may come first ("5 + 3 = 8").
    """
    scores = []
    for c, a in zip(completions, answer):
        numbers = _NUMBER.findall(c.replace(",", ""))
        scores.append(float(bool(numbers) and float(numbers[-1]) == float(a)))
    return scores


def format_json(prompts: list, completions: list[str], **_: Any) -> list[float]:
    """1.0 when the whole completion parses as one JSON object, else 0.0."""
    return [float(_json_object(c) is not None) for c in completions]


def _target_objects(answer: list, name: str) -> list[dict]:
    """The ``answer`` column as objects (dicts, or their JSON text); one that is not an object means
    the function does not fit the data (a config error that names it)."""
    from tunesmith.training.config import ConfigError

    objects = []
    for i, target in enumerate(answer):
        obj = target
        if isinstance(target, str):
            try:
                obj = json.loads(target)
            except ValueError:
                obj = None
        if not isinstance(obj, dict):
            raise ConfigError(f"{name} needs JSON-object answers, but example {i}'s is {str(target)[:80]!r}; "
                              "choose another reward / eval_metric (e.g. exact_match)")
        objects.append(obj)
    return objects


def _json_object(text: str) -> dict | None:
    """The JSON object ``text`` is (whitespace around it allowed), or None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def json_match(prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
    """Share of the ``answer`` object's fields that the completion, parsed as a JSON object, has equal.

    ``answer`` is a dict (or its JSON text); a completion that is not exactly one JSON object scores 0.
    Partial credit (2 of 3 fields right: 0.67) gives the policy a gradient before it is perfect.
    """
    scores = []
    for c, expected in zip(completions, _target_objects(answer, "json_match")):
        got = _json_object(c)
        if got is None or not expected:
            scores.append(0.0)
            continue
        scores.append(sum(k in got and got[k] == v for k, v in expected.items()) / len(expected))
    return scores


def json_all_match(prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
    """1.0 when every field of the ``answer`` object is right in the completion (see ``json_match``), else 0.0."""
    return [float(s == 1.0) for s in json_match(prompts, completions, answer)]


# Names a config can use; anything else is an import path to your own function.
REWARDS: dict[str, RewardFn] = {"exact_match": exact_match, "number_match": number_match, "format_json": format_json,
                                "json_match": json_match, "json_all_match": json_all_match}


def build_rewards(names: Sequence[str], weights: Sequence[float], field_names: set[str]) -> tuple[list[RewardFn], Tensor]:
    """Reward functions from built-in names or import paths, and their weights [k].

    Args:
        names: ``exact_match``, ``number_match``, ``format_json``, ``json_match`` or import paths (``my_rewards.score``).
        weights: One weight per function; empty means 1.0 each.
        field_names: Columns every prompt record has: each function's required parameters
            (other than ``prompts`` and ``completions``) must be among them.

    Raises:
        ConfigError: An unknown name, a weight count that does not match, or a function that needs a
            column the data lacks (named, with the columns there are).
    """
    from tunesmith.training.config import ConfigError
    from tunesmith.training.plugins import resolve

    if not names:
        raise ConfigError("rewards is empty: name at least one reward function (rewards=[exact_match])")
    if weights and len(weights) != len(names):
        raise ConfigError(f"reward_weights has {len(weights)} values for {len(names)} rewards {list(names)}")
    fns = []
    for name in names:
        fn = resolve(name, REWARDS, "reward")
        needed = [p.name for p in list(inspect.signature(fn).parameters.values())[2:]
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty]
        missing = [n for n in needed if n not in field_names]
        if missing:
            raise ConfigError(f"reward {name} needs the data column(s) {missing}, which the prompt records lack "
                              f"(columns besides the prompt: {sorted(field_names) or 'none'})")
        fns.append(fn)
    return fns, torch.tensor(list(weights) or [1.0] * len(names), dtype=torch.float32)


def reward_names(names: Sequence[str]) -> list[str]:
    """Short names for logging: ``my_rewards.exact_answer`` → ``exact_answer``."""
    return [name.rsplit(".", 1)[-1] for name in names]


def score(fns: Sequence[RewardFn], prompts: list, completions: list[str], fields: dict[str, list]) -> Tensor:
    """Every function's reward of every completion: [n, k] for n completions and k functions.

    Raises:
        ConfigError: When a function returns other than one number per completion.
    """
    from tunesmith.training.config import ConfigError

    columns = []
    for fn in fns:
        values = fn(prompts, completions, **fields)
        if len(values) != len(completions):
            raise ConfigError(f"reward function {fn.__module__}.{fn.__name__} returned {len(values)} values "
                              f"for {len(completions)} completions (it must return one float per completion)")
        columns.append(torch.tensor([float(v) for v in values], dtype=torch.float32))
    return torch.stack(columns, dim=1)
