"""Typed recipe configs: a recipe's ``Config`` dataclass + a YAML file + ``key=value`` overrides.

Each recipe declares its options once, as a dataclass with types and defaults. A YAML file (a bundled
config or the user's own) supplies values, and the command line overrides them with dotted keys::

    tune-run lora_single_device --config smollm2_135m batch_size=8 lora.rank=16

Every key is checked against the dataclass before anything runs: an unknown key names the closest
valid one ("did you mean batch_size?"), a value of the wrong type names the key, the value and the
expected type. Nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user's config is wrong (unknown key, wrong type, missing value, bad path)."""


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a dataclass accepts, for suggestions."""
    keys = []
    hints = _hints(cls)
    for name in _fields(cls):
        keys.append(prefix + name)
        if dataclasses.is_dataclass(hints[name]):
            keys += _all_keys(hints[name], prefix + name + ".")
    return keys


def _check_keys(cls: type, values: dict, where: str, prefix: str = "") -> None:
    """Raise ConfigError for the first key in ``values`` that ``cls`` does not declare."""
    fields, hints = _fields(cls), _hints(cls)
    for key, value in values.items():
        full = prefix + str(key)
        if key not in fields:
            valid = _all_keys(cls, prefix)
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.6)
            hint = f" — did you mean {close[0]}?" if close else f". Valid keys here: {', '.join(sorted(valid))}."
            raise ConfigError(f"unknown config key '{full}' in {where}{hint}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            _check_keys(hints[key], value, where, full + ".")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} (or null)" if len(args) < len(typing.get_args(tp)) else inner
    return str(tp).replace("typing.", "")


def _expected_type(cls: type, dotted: str) -> str:
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            break
        tp = _hints(tp).get(part, Any)
    return _type_name(tp)


def _parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` → nested dict, values parsed as YAML scalars/lists ("[q_proj,v_proj]")."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. batch_size=4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def load_yaml(path: Path) -> dict:
    """Read a YAML config file into a dict, with errors that name the file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def build_config(cls: type, yaml_values: dict, overrides: list[str], yaml_name: str = "the config file") -> Any:
    """Merge defaults ← YAML ← command-line overrides into a validated instance of ``cls``.

    Args:
        cls: The recipe's ``Config`` dataclass.
        yaml_values: Values from the config file.
        overrides: ``key=value`` strings from the command line.
        yaml_name: How to name the YAML source in error messages.

    Returns:
        An instance of ``cls`` (a real dataclass, so recipes get attribute access and type hints).

    Raises:
        ConfigError: unknown key (with a suggestion), wrong type, or a required value left missing.
    """
    cli_values = _parse_overrides(overrides)
    _check_keys(cls, yaml_values, yaml_name)
    _check_keys(cls, cli_values, "the command line")
    merged = OmegaConf.structured(cls)
    for source, values in ((yaml_name, yaml_values), ("the command line", cli_values)):
        try:
            merged = OmegaConf.merge(merged, values)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            value = _lookup(values, key)
            raise ConfigError(
                f"config key '{key}' in {source} expects {_expected_type(cls, key)}, got {value!r}"
                f" ({type(value).__name__})"
            ) from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(
            f"config key(s) {', '.join(missing)} have no value: set them in the config file or on the command "
            f"line ({missing[0]}=...)"
        )
    return OmegaConf.to_object(merged)


def _lookup(values: dict, dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return "?"
    return node


def to_yaml(cfg: Any) -> str:
    """The fully resolved config as YAML (what ``--dry-run`` prints and each checkpoint keeps)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    """The config as plain containers (for saving next to checkpoints)."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(container, dict)
    return container


def import_object(path: str) -> Any:
    """Import ``package.module.Name`` (research code plugged in by config, e.g. a custom loss).

    The current directory is importable, so ``loss=my_losses.FocalLoss`` finds ``./my_losses.py``.
    """
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"'{path}' is not an import path of the form package.module.Name")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import module '{module_name}' for '{path}': {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module '{module_name}' has no attribute '{attr}' (from '{path}')") from None


__all__ = [
    "ConfigError",
    "build_config",
    "load_yaml",
    "to_yaml",
    "to_dict",
    "import_object",
]
