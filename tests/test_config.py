"""The typed config: constraints declared on the dataclass, text taken verbatim, one error for all problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import pytest
import yaml

from tunesmith.training.config import (
    MISSING,
    ConfigError,
    PathCheck,
    PositiveInt,
    Range,
    Refuse,
    build_config,
    check_environment,
    check_keyword_args,
    to_dict,
    to_yaml,
)


def no_dots(value: str) -> None:
    if "." in value:
        raise ConfigError("no dots, please")


@dataclass
class Group:
    size: PositiveInt = 2
    names: list[Literal["a", "b"]] = field(default_factory=lambda: ["a"])
    mapping: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if len(self.names) > self.size:
            raise ConfigError("group.names: more names than group.size")


@dataclass
class Base:
    name: Annotated[str, PathCheck(no_dots)] = MISSING
    ratio: Annotated[float, Range(gt=0, lt=1)] = 0.5
    mode: Annotated[Literal["fast", "exact"], Refuse(sloppy="it is wrong by design")] = "exact"
    note: str | None = None
    flag: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    group: Group = field(default_factory=Group)
    calls: ClassVar[list[str]] = []

    def validate(self) -> None:
        Base.calls.append("base")


@dataclass
class Child(Base):
    ratio: float = 0.25  # a new default, declared with the bare type: the base's range still holds

    def validate(self) -> None:
        Child.calls.append("child")


def build(overrides: list[str], values: dict | None = None, cls: type = Child):
    return build_config(cls, {"name": "x", **(values or {})}, overrides, yaml_name="my.yaml")


def test_command_line_text_is_taken_verbatim_for_strings():
    cfg = build(["note=yes", "name=Extract the person's name, age and city as JSON: Ana, 41, lives in Porto."])
    assert cfg.note == "yes" and cfg.name.endswith("lives in Porto.")
    assert build(["note=null"], {"note": "set"}).note is None  # null clears an optional option
    assert build(["note=[a, b]"]).note == "[a, b]"


def test_other_types_parse_their_text():
    cfg = build(["ratio=1e-1", "flag=yes", "group.names=[a, b]", "group.size=3", "extra.k=2", "extra.s=yes",
                 "group.mapping.x=y"])
    assert cfg.ratio == 0.1 and cfg.flag is True and cfg.group.names == ["a", "b"] and cfg.group.size == 3
    assert cfg.extra == {"k": 2, "s": "yes"} and cfg.group.mapping == {"x": "y"}
    assert build(["group.names=b"]).group.names == ["b"]


def test_yaml_values_are_checked_and_mappings_merge_key_by_key():
    cfg = build(["extra.b=2"], {"ratio": "1e-1", "extra": {"a": 1}})  # PyYAML reads 1e-1 as a string
    assert cfg.ratio == 0.1 and cfg.extra == {"a": 1, "b": 2}
    with pytest.raises(ConfigError, match=r"config key 'flag' in my.yaml expects bool .*got 'maybe'"):
        build([], {"flag": "maybe"})
    with pytest.raises(ConfigError, match=r"expects str, got True \(bool\) \(quote it in YAML"):
        build([], {"note": True})


def test_every_problem_is_reported_at_once_with_key_value_and_allowed():
    with pytest.raises(ConfigError) as e:
        build(["ratio=2", "mode=fsat", "group.size=0", "group.names=[a,c]", "flag=maybe", "nmae=3"])
    msg = str(e.value)
    assert msg.startswith("6 problems in the config:")
    assert "config key 'ratio' in the command line: must be > 0 and < 1, got 2.0" in msg
    assert "must be one of fast, exact; got 'fsat' — did you mean fast?" in msg
    assert "config key 'group.size' in the command line: must be >= 1, got 0" in msg
    assert "item 1: must be one of a, b; got 'c'" in msg
    assert "unknown config key 'nmae' in the command line — did you mean name?" in msg
    with pytest.raises(ConfigError, match="'sloppy' is refused: it is wrong by design"):
        build(["mode=sloppy"])


def test_a_subclass_that_re_defaults_keeps_the_constraint_and_every_validate_runs():
    Base.calls.clear()
    assert build([]).ratio == 0.25
    assert Base.calls == ["base", "child"]  # base classes first, each class's own rule once
    with pytest.raises(ConfigError, match="'ratio'.*must be > 0 and < 1"):
        build(["ratio=5"])
    with pytest.raises(ConfigError, match="more names than group.size"):
        build(["group.size=1", "group.names=[a,b]"])


def test_missing_value_and_groups_given_a_value():
    with pytest.raises(ConfigError, match=r"config key 'name' has no value.*name=\.\.\."):
        build_config(Child, {}, [])
    with pytest.raises(ConfigError, match="config key 'group' in the command line is a group of options"):
        build(["group=3"])
    with pytest.raises(ConfigError, match="set twice"):
        build(["flag=true", "flag=false"])


def test_path_checks_run_apart_from_the_pure_checks():
    cfg = build(["name=a.b"])  # well-formed: build_config does not look at the disk
    with pytest.raises(ConfigError, match=r"config key 'name' = 'a.b': no dots, please"):
        check_environment(cfg)


def test_yaml_round_trip_and_interpolation():
    cfg = build(["note=${name}-notes"])
    assert cfg.note == "x-notes"
    again = build_config(Child, yaml.safe_load(to_yaml(cfg)), [])
    assert to_dict(again) == to_dict(cfg)


def test_keyword_args_of_a_class_are_checked_by_name_type_and_by_the_class():
    class Loss:
        def __init__(self, beta: float = 0.1, name: str = "x") -> None:
            if beta <= 0:
                raise ValueError("beta must be > 0")

    assert check_keyword_args(Loss, {"beta": 1}, "loss_args") == {"beta": 1.0}
    with pytest.raises(ConfigError, match="Loss takes no argument 'bta' — did you mean beta?"):
        check_keyword_args(Loss, {"bta": 1}, "loss_args")
    with pytest.raises(ConfigError, match=r"loss_args.beta' \(Loss's beta\) expects float"):
        check_keyword_args(Loss, {"beta": "high"}, "loss_args")
    with pytest.raises(ConfigError, match="Loss refuses it: beta must be > 0"):
        check_keyword_args(Loss, {"beta": -1}, "loss_args")
