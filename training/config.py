"""Typed recipe configs: a recipe's ``Config`` dataclass + a YAML file + ``key=value`` overrides.

Each recipe declares its options once, as a dataclass with types, defaults and constraints. A YAML
file (a bundled config or the user's own) supplies values, and the command line overrides them with
dotted keys::

    tune-run lora_single_device --config smollm2_135m batch_size=8 lora.rank=16

How an option declares what it accepts (the type annotation says it all, next to the option)::

    batch_size: PositiveInt = 4                                  # Annotated[int, Range(ge=1)]
    val_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.1      # any numeric bounds
    format: Literal["instruct", "chat", "text"] = "instruct"     # allowed values
    dtype: Annotated[Literal["auto", "fp32", "bf16"], Refuse(fp16="why, and what to use")] = "auto"
    device: Annotated[str, Pattern(r"auto|cpu|cuda(:\\d+)?", "auto, cpu, cuda or cuda:N")] = "auto"
    targets: list[Literal["q_proj", "v_proj"]] = ...             # element types are checked too
    model: Annotated[str, PathCheck(check_model_source)] = MISSING   # checked against the disk

and, for rules across options, a ``validate(self)`` method on the dataclass (pure: raise
``ConfigError``; it may also fill a default that depends on other options) and a
``validate_environment(self)`` method (may look at the disk and the machine). Every class in a Config's hierarchy runs
its own ``validate`` (base classes and option groups first), so a recipe adds rules without
repeating its parents'.

Two stages, both before anything heavy runs:

* ``build_config`` (pure): unknown keys name the closest valid one ("did you mean batch_size?"),
  values are converted to the declared type and checked against ranges, allowed values and
  patterns, then the ``validate`` hooks run. All problems are reported in one error.
* ``check_environment`` (the disk and the machine): every ``PathCheck`` and ``validate_environment``
  hook (a model folder without config.json, a data file that does not exist, an output_dir that
  is a file, device=cuda on a machine without CUDA, …).

Command-line text is taken verbatim for string options (``prompt=yes`` is the string "yes";
``tokenizer=null`` clears an optional one); other types parse their text (``lr=1e-4``,
``packing=true``, ``lora.targets=[q_proj,v_proj]``). YAML values are checked the same way.

``${other.key}`` interpolations in values are resolved with OmegaConf, as before. (A recipe that
reads a training run's config file, like ``generate``, sets ``reads_training_configs``; ``tune-run``
then drops the training options from the file before it gets here: see ``cli.own_file_values``.)
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user's config is wrong (unknown key, wrong type, value out of range, missing value, bad path)."""


# ---------------------------------------------------------------------------------------------
# Constraints an option declares in its annotation
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Range:
    """Numeric bounds: ``Annotated[float, Range(gt=0)]``, ``Annotated[int, Range(ge=0, le=10)]``;
    ``why`` is added to the error (``Range(ge=2, why="a group needs two completions to compare")``)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    why: str = ""

    def describe(self) -> str:
        parts = [f"{op} {bound:g}" for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if bound is not None]
        return " and ".join(parts)

    def holds(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A string option that must match ``regex`` in full; ``description`` says what is allowed."""

    regex: str
    description: str


class Refuse:
    """Values refused with a reason of their own (``Refuse(fp16="...")``), beyond "not one of ...".

    Args:
        **reasons: refused value → why, and what to use instead.
    """

    def __init__(self, **reasons: str) -> None:
        self.reasons = reasons


@dataclasses.dataclass(frozen=True)
class PathCheck:
    """A check against the disk, run by ``check_environment``: ``fn(value)`` raises ``ConfigError(reason)``."""

    fn: Callable[[Any], None]


PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]


# ---------------------------------------------------------------------------------------------
# Converting one value to its declared type
# ---------------------------------------------------------------------------------------------
class _Invalid(Exception):
    """A value that does not fit its option; ``str(e)`` says what is wrong."""


_UNION_TYPES = (typing.Union, getattr(types, "UnionType", typing.Union))
_CLI_TRUE, _CLI_FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, m1, m2]`` → ``(T, [m1, m2])``; other types → ``(tp, [])``."""
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        inner, more = _unwrap(base)
        return inner, meta + more
    return tp, []


def _optional_of(tp: Any) -> Any | None:
    """``X | None`` → ``X``; anything else → None."""
    if typing.get_origin(tp) in _UNION_TYPES and type(None) in typing.get_args(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return None


def type_name(tp: Any) -> str:
    """How a type reads in messages: ``int``, ``str (or null)``, ``list of str``, ``one of a, b``."""
    base, _ = _unwrap(tp)
    inner = _optional_of(base)
    if inner is not None:
        return f"{type_name(inner)} (or null)"
    origin = typing.get_origin(base)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(base))
    if origin is list:
        return f"a list of {type_name(typing.get_args(base)[0])}"
    if origin is dict:
        return "a mapping"
    if origin in _UNION_TYPES:
        return " or ".join(type_name(a) for a in typing.get_args(base))
    return getattr(base, "__name__", str(base))


def _closest(value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
    return f" — did you mean {close[0]}?" if close else ""


def _cli_scalar(text: str) -> Any:
    """Command-line text for an option without a declared type (``loss_args.*``): a number, a
    bool, null, or the text itself (``yes`` stays the string "yes")."""
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    if text in ("null", "None", "~"):
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _cli_list(text: str) -> list[str]:
    """``[q_proj, v_proj]`` or ``q_proj,v_proj`` → ``["q_proj", "v_proj"]`` (items verbatim, unquoted)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    return [item[1:-1] if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"" else item for item in items]


def _convert(tp: Any, value: Any, cli: bool) -> Any:
    """``value`` as type ``tp`` (raw command-line text when ``cli``), checked against its constraints.

    Raises:
        _Invalid: saying what is expected.
    """
    base, meta = _unwrap(tp)
    inner = _optional_of(base)
    if inner is not None:
        if value is None or (cli and value == "null"):
            return None
        return _convert(inner, value, cli)
    origin = typing.get_origin(base)
    if base is Any:
        return _cli_scalar(value) if cli and isinstance(value, str) else value
    if origin is Literal:
        allowed = typing.get_args(base)
        for refuse in (m for m in meta if isinstance(m, Refuse)):
            if str(value) in refuse.reasons:
                raise _Invalid(f"{value!r} is refused: {refuse.reasons[str(value)]}")
        for a in allowed:
            if value == a or (isinstance(value, str) and value == str(a)):
                return a
        raise _Invalid(f"must be one of {', '.join(str(a) for a in allowed)}; got {value!r}"
                       + _closest(str(value), [str(a) for a in allowed]))
    if origin is list:
        if cli and isinstance(value, str):
            value = _cli_list(value)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # one value for a list option (``logger: wandb``), as on the command line
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"expects {type_name(base)}, got {value!r} ({type(value).__name__})")
        (item_type,) = typing.get_args(base) or (Any,)
        out = []
        for i, item in enumerate(value):
            try:
                out.append(_convert(item_type, item, cli))
            except _Invalid as e:
                raise _Invalid(f"item {i}: {e}") from None
        return out
    if origin is dict:
        if cli and isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise _Invalid(f"expects a mapping (set its keys: key.name=value), got {value!r}")
        key_type, value_type = typing.get_args(base) or (str, Any)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Invalid(f"keys must be strings, got {k!r}")
            try:
                out[k] = _convert(value_type, v, cli and isinstance(v, str))
            except _Invalid as e:
                raise _Invalid(f"key {k!r}: {e}") from None
        return out
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _CLI_TRUE | _CLI_FALSE:
            return value.lower() in _CLI_TRUE
        raise _Invalid(f"expects bool (true or false), got {value!r} ({type(value).__name__})")
    if base is int or base is float:
        number = _number(value, base)
        if number is None:
            raise _Invalid(f"expects {base.__name__}, got {value!r} ({type(value).__name__})")
        if not math.isfinite(number):
            raise _Invalid(f"must be a finite number, got {value!r}")
        return _check_meta(number, meta)
    if base is str:
        if isinstance(value, str):
            return _check_meta(value, meta)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not cli:
            return _check_meta(str(value), meta)  # YAML read `split: 2024` as a number
        hint = " (quote it in YAML: 'yes')" if isinstance(value, bool) else ""
        raise _Invalid(f"expects str, got {value!r} ({type(value).__name__}){hint}")
    if origin in _UNION_TYPES:
        for option in typing.get_args(base):
            try:
                return _convert(option, value, cli)
            except _Invalid:
                pass
        raise _Invalid(f"expects {type_name(base)}, got {value!r} ({type(value).__name__})")
    return value  # a type we do not check (Any-like)


def _number(value: Any, kind: type) -> int | float | None:
    """``value`` as an int or float (text is parsed; a bool or a float for an int is not a number)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (kind is float and isinstance(value, float)):
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            return None
    return None


def _check_meta(value: Any, meta: list[Any]) -> Any:
    for m in meta:
        if isinstance(m, Range) and not m.holds(value):
            raise _Invalid(f"must be {m.describe()}, got {value!r}" + (f" ({m.why})" if m.why else ""))
        if isinstance(m, Pattern) and not re.fullmatch(m.regex, value):
            raise _Invalid(f"must be {m.description}, got {value!r}")
        if isinstance(m, Refuse) and str(value) in m.reasons:
            raise _Invalid(f"{value!r} is refused: {m.reasons[str(value)]}")
    return value


# ---------------------------------------------------------------------------------------------
# Merging defaults ← YAML ← command line into a checked dataclass
# ---------------------------------------------------------------------------------------------
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _hints(cls: type) -> dict[str, Any]:
    """Field annotations; a field a subclass re-declares with the bare type only to change its
    default (``output_dir: str = "output/lora"``) keeps the constraints its base class declared."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            for name, tp in typing.get_type_hints(base, include_extras=True).items():
                if name in hints and tp != hints[name] and hints[name] == _unwrap(tp)[0]:
                    hints[name] = tp
    return hints


def _group_type(tp: Any) -> type | None:
    base, _ = _unwrap(tp)
    return base if dataclasses.is_dataclass(base) else None


def _is_mapping(tp: Any) -> bool:
    base, _ = _unwrap(tp)
    return typing.get_origin(_optional_of(base) or base) is dict


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a dataclass accepts, for suggestions."""
    keys = []
    hints = _hints(cls)
    for name in _fields(cls):
        keys.append(prefix + name)
        group = _group_type(hints[name])
        if group is not None:
            keys += _all_keys(group, prefix + name + ".")
    return keys


def _parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` → ``{"a": {"b": "1"}, "c": "x"}``: values stay text, converted per option."""
    nested: dict = {}
    seen: dict[str, str] = {}
    for item in overrides:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(f"command-line argument '{item}' is not of the form key=value (e.g. batch_size=4)")
        parts = key.split(".")
        if not key or any(not p for p in parts) or any(not re.fullmatch(r"[A-Za-z_][\w-]*", p) for p in parts[:-1]):
            raise ConfigError(f"'{item}': '{key}' is not a config key (keys look like batch_size or lora.rank)")
        if key in seen:
            raise ConfigError(f"config key '{key}' is set twice on the command line ({seen[key]!r} and {raw!r}); "
                              "keep one")
        seen[key] = raw
        node = nested
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"'{item}': '{'.'.join(parts[:depth + 1])}' is set as a value on the command "
                                  "line and used as a group here; keep one")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"'{item}': '{key}' is a group here and a value there; keep one")
        node[parts[-1]] = raw
    return nested


class _Builder:
    """One pass over a Config class: merges the sources, converts every value, collects every problem."""

    def __init__(self, yaml_name: str) -> None:
        self.yaml_name = yaml_name
        self.errors: list[str] = []

    def build(self, cls: type, file_values: Any, cli_values: Any, prefix: str = "") -> Any:
        fields, hints = _fields(cls), _hints(cls)
        for source, values in ((self.yaml_name, file_values), ("the command line", cli_values)):
            for key in values:
                if key not in fields:
                    full = prefix + str(key)
                    valid = _all_keys(cls, prefix)
                    close = difflib.get_close_matches(full, valid, n=1, cutoff=0.6)
                    names = sorted(prefix + n + (".*" if _group_type(hints[n]) else "") for n in fields)
                    hint = f" — did you mean {close[0]}?" if close else f". Valid keys here: {', '.join(names)}."
                    self.errors.append(f"unknown config key '{full}' in {source}{hint}")
        kwargs = {}
        for name, f in fields.items():
            key, tp = prefix + name, hints[name]
            group = _group_type(tp)
            if group is not None:
                sub = {}
                for source, values in ((self.yaml_name, file_values), ("the command line", cli_values)):
                    node = values.get(name, {})
                    if not isinstance(node, dict):
                        self.errors.append(f"config key '{key}' in {source} is a group of options, not a value: "
                                           f"set its keys instead (e.g. {_all_keys(group, key + '.')[0]}=...)")
                        node = {}
                    sub[source] = node
                kwargs[name] = self.build(group, sub[self.yaml_name], sub["the command line"], key + ".")
                continue
            value, source = self._default(f), "the default"
            in_file, in_cli = name in file_values, name in cli_values
            try:
                if _is_mapping(tp) and in_file and in_cli:
                    # a mapping option merges key by key: the file's keys, then the command line's
                    source = self.yaml_name
                    merged = _convert(tp, file_values[name], cli=False) or {}
                    source = "the command line"
                    value = {**merged, **(_convert(tp, cli_values[name], cli=True) or {})}
                elif in_cli:
                    source = "the command line"
                    value = _convert(tp, cli_values[name], cli=True)
                elif in_file:
                    source = self.yaml_name
                    value = _convert(tp, file_values[name], cli=False)
                elif value is not MISSING:
                    value = _convert(tp, value, cli=False)
            except _Invalid as e:
                self.errors.append(self._message(key, source, str(e)))
                value = MISSING
            else:
                if value == MISSING:
                    self.errors.append(f"config key '{key}' has no value: set it in the config file or on the "
                                       f"command line ({key}=...)")
            kwargs[name] = value
        return cls(**kwargs)

    @staticmethod
    def _default(f: dataclasses.Field) -> Any:
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return MISSING

    @staticmethod
    def _message(key: str, source: str, problem: str) -> str:
        joiner = " " if problem.startswith("expects") else ": "
        return f"config key '{key}' in {source}{joiner}{problem}"


def _objects(cfg: Any) -> list[Any]:
    """``cfg`` and every option group in it, groups first (depth first)."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += _objects(value)
    return out + [cfg]


def _run_hooks(cfg: Any, hook: str) -> list[str]:
    """Call every class's own ``hook`` method (bases first) on ``cfg`` and its groups; collect errors."""
    errors = []
    for obj in _objects(cfg):
        for klass in reversed(type(obj).__mro__):
            method = klass.__dict__.get(hook)
            if method is None:
                continue
            try:
                method(obj)
            except ConfigError as e:
                errors.append(str(e))
    return errors


def _raise(errors: list[str]) -> None:
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} problems in the config:\n  " + "\n  ".join(errors))


def _resolve_interpolations(cfg: Any) -> None:
    """Replace ``${other.key}`` in string values by that key's value (OmegaConf's interpolation)."""
    if "${" not in yaml.safe_dump(to_dict(cfg)):
        return
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(to_dict(cfg)), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config interpolation failed: {str(e).splitlines()[0]}") from None

    def assign(obj: Any, values: dict) -> None:
        for f in dataclasses.fields(obj):
            current = getattr(obj, f.name)
            if dataclasses.is_dataclass(current):
                assign(current, values[f.name])
            elif isinstance(current, (str, list, dict)) and current != values[f.name]:
                setattr(obj, f.name, values[f.name])

    assert isinstance(resolved, dict)
    assign(cfg, resolved)


def build_config(cls: type, yaml_values: dict, overrides: list[str], yaml_name: str = "the config file") -> Any:
    """Merge defaults ← YAML ← command-line overrides into a checked instance of ``cls``.

    Args:
        cls: The recipe's ``Config`` dataclass.
        yaml_values: Values from the config file.
        overrides: ``key=value`` strings from the command line.
        yaml_name: How to name the YAML source in error messages.

    Returns:
        An instance of ``cls`` (a real dataclass, so recipes get attribute access and type hints).

    Raises:
        ConfigError: every unknown key (with a suggestion), wrong type, value out of range or not
            allowed, missing value, and what the ``validate`` hooks refuse — in one message.
    """
    builder = _Builder(yaml_name)
    cfg = builder.build(cls, yaml_values or {}, _parse_overrides(overrides))
    _raise(builder.errors)
    _resolve_interpolations(cfg)
    _raise(_run_hooks(cfg, "validate"))
    return cfg


def check_environment(cfg: Any) -> None:
    """Check options against the disk and the machine (``PathCheck``s and ``validate_environment`` hooks).

    Raises:
        ConfigError: naming each key, its value and what is wrong, in one message.
    """
    errors = []

    def walk(obj: Any, prefix: str) -> None:
        hints = _hints(type(obj))
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), prefix + f.name
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
                continue
            base, meta = _unwrap(hints[f.name])
            meta += _unwrap(_optional_of(base))[1] if _optional_of(base) is not None else []
            for check in (m for m in meta if isinstance(m, PathCheck)):
                if value is None or value == MISSING:
                    continue
                try:
                    check.fn(value)
                except ConfigError as e:
                    errors.append(f"config key '{key}' = {value!r}: {e}")

    walk(cfg, "")
    _raise(errors)  # each option on its own first: rules across options assume they hold
    _raise(_run_hooks(cfg, "validate_environment"))


def check_keyword_args(cls: type, args: dict[str, Any], key: str) -> dict[str, Any]:
    """Check a mapping option against the keyword arguments of ``cls``'s constructor, then build one.

    Unknown names get the closest valid one; values are converted to the parameter's annotated type
    when it is a plain one (int, float, bool, str, or one of them or null); building an instance
    lets the class refuse values itself (a ``ValueError``/``TypeError`` from its ``__init__``).

    Args:
        cls: A class named by a config (a loss, built in or the user's own).
        args: The mapping option's value (``loss_args``).
        key: The option's name, for messages.

    Returns:
        ``args`` with values converted to the annotated types.

    Raises:
        ConfigError: naming the key, the argument and what the class accepts.
    """
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return dict(args)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # annotations that do not evaluate: names are still checked
        hints = {}
    out = {}
    for name, value in args.items():
        if name not in names and not takes_any:
            accepted = ", ".join(names) or "no arguments"
            raise ConfigError(f"config key '{key}.{name}': {cls.__name__} takes no argument '{name}'"
                              f"{_closest(name, names)} ({cls.__name__} accepts: {accepted})")
        tp = hints.get(name)
        simple = {int, float, bool, str}
        base = _optional_of(tp) or tp
        if tp is not None and (base in simple or tp in simple):
            try:
                value = _convert(tp, value, cli=False)
            except _Invalid as e:
                raise ConfigError(f"config key '{key}.{name}' ({cls.__name__}'s {name}) {e}") from None
        out[name] = value
    try:
        cls(**out)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key '{key}' = {out}: {cls.__name__} refuses it: {e}") from None
    return out


def load_yaml(path: Path) -> dict:
    """Read a YAML config file into a dict, with errors that name the file (and the line)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; give a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def to_dict(cfg: Any) -> dict:
    """The config as plain containers (for saving next to checkpoints and comparing on resume)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """The fully resolved config as YAML (what ``--dry-run`` prints and each checkpoint keeps)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


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
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name.split(".")[0]):
            raise ConfigError(f"cannot import module '{module_name}' for '{path}': no module named '{e.name}' "
                              f"(a file {module_name.replace('.', '/')}.py in the current folder works)") from None
        raise  # the user's module itself imports something missing: their code, their traceback
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module '{module_name}' has no attribute '{attr}' (from '{path}')") from None


__all__ = [
    "ConfigError",
    "MISSING",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PathCheck",
    "Pattern",
    "PositiveFloat",
    "PositiveInt",
    "Range",
    "Refuse",
    "build_config",
    "check_keyword_args",
    "check_environment",
    "import_object",
    "load_yaml",
    "to_dict",
    "to_yaml",
    "type_name",
]
