"""Every key of a composed config gets its type and its range checked before anything is built, with a message
naming the fix.

Both come from where the values go: the parameters of the class or function a node builds (its `_target_`, or
the builder named for it, like the model's `GeneratorConfig`), their annotations and their `Range`s, so a key
added to one of them is checked with no table to keep in step. Keys nothing builds from, and the ranges of keys
of classes the project does not own, come from two small tables (run/checks.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from typing import Any, Literal, Union

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from shakespeare.errors import UsageError
from shakespeare.ranges import Rule, check_range, ranges_of
from shakespeare.run.composition import nearest

# what a YAML value can be; other classes in a signature (Tensor, Accelerator, timedelta) are for Python callers
PLAIN = (type(None), bool, int, float, str, list, tuple, dict)


@dataclasses.dataclass
class Parameters:
    """What a builder takes: each parameter's type, default and range, and whether it takes any other keyword."""

    owner: str
    types: dict[str, Any]
    defaults: dict[str, Any]
    ranges: dict[str, tuple[Rule, bool]]
    open: bool


@cache
def parameters(builder: Callable) -> Parameters:
    """The parameters of a class (its `__init__`), dataclass or function."""
    function = builder if dataclasses.is_dataclass(builder) or not isinstance(builder, type) else builder.__init__
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation that names something only a type checker imports: those keys go unchecked
        hints = {}
    signature = inspect.signature(builder)
    named = {name: p for name, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return Parameters(
        owner=f"{builder.__module__}.{builder.__qualname__}",
        types={name: hints.get(name, Any) for name in named},
        defaults={name: p.default for name, p in named.items() if p.default is not p.empty},
        ranges=ranges_of(builder),
        open=any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()),
    )


def conforms(value: Any, kind: Any) -> bool:
    """Whether a plain config value (None, bool, number, str, list, dict) fits the annotation `kind`."""
    if kind is Any:  # a class on Python 3.11+, so it must not reach isinstance below
        return True
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str or (isinstance(kind, type) and issubclass(kind, os.PathLike)):
        return isinstance(value, str)
    if kind is type(None):
        return value is None
    if origin in (list, tuple, set, typing.Sequence, typing.Iterable) or kind in (list, tuple):
        if not isinstance(value, list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(conforms, value, args))
        return all(conforms(item, args[0]) for item in value) if args else True
    if origin in (dict, Mapping) or kind is dict:
        return isinstance(value, dict) and (not args or all(conforms(item, args[1]) for item in value.values()))
    if isinstance(kind, type):
        return isinstance(value, kind)  # a class no config value is (a Tensor, an Accelerator)
    return True  # Any, a TypeVar, a Callable: left to the builder to judge


def describe(kind: Any) -> str:
    """The plain values `kind` accepts, in words: `a whole number or null`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        choices = [str(a) for arg in args if typing.get_origin(arg) is Literal for a in typing.get_args(arg)]
        words = list(
            dict.fromkeys(
                choices + [describe(arg) for arg in args if configurable(arg) and typing.get_origin(arg) is not Literal]
            )
        )
        return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
    if origin is Literal:
        return "one of " + ", ".join(dict.fromkeys(str(arg) for arg in args))
    words = {bool: "true or false", int: "a whole number", float: "a number", str: "text", type(None): "null"}
    if kind in words:
        return words[kind]
    if origin in (list, tuple, set, typing.Sequence, typing.Iterable) or kind in (list, tuple):
        return f"a list of {len(args)} values" if origin is tuple and args and args[-1] is not Ellipsis else "a list"
    if origin in (dict, Mapping) or kind is dict:  # trainer.max_time={minutes:10}: whole numbers, as Lightning says
        values = {int: "whole numbers", float: "numbers", str: "text"}.get(args[1] if args else None, "values")
        return f"a mapping of keys to {values}"
    return "text" if isinstance(kind, type) and issubclass(kind, os.PathLike) else getattr(kind, "__name__", str(kind))


def configurable(kind: Any) -> bool:
    origin = typing.get_origin(kind)
    return origin is not None or kind in PLAIN or (isinstance(kind, type) and issubclass(kind, os.PathLike))


def resolved(cfg: DictConfig, key: str) -> Any:
    """`cfg[key]` resolved as plain Python values."""
    value = cfg[key]
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


NOT_TAKEN = object()  # the type of a key its builder has no parameter for


@dataclasses.dataclass
class Leaf:
    """One key of a config, its value, and what says which values it takes."""

    key: str
    value: Any
    kind: Any  # its type; None: nothing says, NOT_TAKEN: its builder has no such parameter
    owner: str = ""  # the class or function it is a parameter of
    default: Any = None
    rule: Rule | None = None  # the numbers that mean something for it
    whole: bool = False  # whether it counts (whole numbers only)


def leaves(node: dict, prefix: str, table: Mapping[str, Any], builders: Mapping[str, Callable]) -> Iterator[Leaf]:
    """Every leaf under `node`: a node with a `_target_` or a builder types its keys by that builder's parameters
    (NOT_TAKEN: none of them); any other node is a folder of keys (type None: nothing says), the table's keys
    aside, which are leaves whatever their value."""
    target = node.get("_target_")
    builder = builders.get(prefix.rstrip(".")) or (get_object(target) if isinstance(target, str) else None)
    if builder is None:
        for key, value in node.items():
            if isinstance(value, dict) and f"{prefix}{key}" not in table:
                yield from leaves(value, f"{prefix}{key}.", table, builders)
            else:
                yield Leaf(f"{prefix}{key}", value, None)
        return
    taken = parameters(builder)
    owner = target if isinstance(target, str) else taken.owner  # as the config names it
    for key, value in node.items():
        if key != "_target_":
            kind = taken.types.get(key, Any if taken.open else NOT_TAKEN)
            rule, whole = taken.ranges.get(key, (None, False))
            yield Leaf(f"{prefix}{key}", value, kind, owner, taken.defaults.get(key), rule, whole)


def described(
    values: dict, table: Mapping[str, Any], ranges: Mapping[str, Rule] = {}, builders: Mapping[str, Callable] = {}
) -> list[Leaf]:
    """Every leaf of the resolved config `values` with its type and range: the tables' first (a bad
    paths.cache_dir is named as such, not as data.cache_dir that interpolates it), then the builders'."""
    found = []
    for leaf in leaves(values, "", table, builders):
        if leaf.key in table:
            leaf.kind, leaf.owner, leaf.default = table[leaf.key], "", None
        if leaf.key in ranges:
            leaf.rule, leaf.whole = ranges[leaf.key], conforms(1, leaf.kind) and not conforms(0.5, leaf.kind)
        found.append(leaf)
    return sorted(found, key=lambda leaf: leaf.key not in table and leaf.key not in ranges)


def check_types(
    cfg: DictConfig, table: Mapping[str, Any], ranges: Mapping[str, Rule] = {}, builders: Mapping[str, Callable] = {}
) -> None:
    """Raise UsageError for the first key of `cfg` (Hydra's own `hydra` node aside) whose value has the wrong
    type or a meaningless value, or that nothing takes (see `check_values`)."""
    try:
        values = {key: resolved(cfg, key) for key in cfg if key != "hydra"}
    except OmegaConfBaseException as err:
        raise UsageError(f"{err.full_key}: {str(err).splitlines()[0]}. Check that value's interpolation.") from None
    check_values(values, table, ranges, builders)


def check_values(
    values: dict, table: Mapping[str, Any], ranges: Mapping[str, Rule] = {}, builders: Mapping[str, Callable] = {}
) -> None:
    """Raise UsageError for the first key of the resolved config `values` whose value has the wrong type, lies
    outside its range, or that nothing takes: typed by `table` (key -> type) and ranged by `ranges` (key -> Range)
    first, then by the parameters of what builds its node (its `_target_`, or `builders`: node -> class or
    function)."""
    found = described(values, table, ranges, builders)
    for leaf in found:
        key, value, kind, owner, default = leaf.key, leaf.value, leaf.kind, leaf.owner, leaf.default
        if kind is None or kind is NOT_TAKEN:
            siblings = [
                other.key
                for other in found
                if other.key.rpartition(".")[0] == key.rpartition(".")[0] and other.key != key
            ]
            guess = nearest(key, siblings)
            raise UsageError(
                f"{key} is not a setting of {owner or 'this project'}.{f' Did you mean {guess}?' if guess else ''} "
                f"Fix its spelling, or remove it (a key that is not in the config can only have been added with "
                f"+{key}=...)."
            )
        if not conforms(value, kind):
            example = f", e.g. {key}={default}" if default is not None and conforms(default, kind) else ""
            quote = (
                " (Hydra reads 8 as a number and true as a boolean: quote text, key='\"8\"')"
                if (conforms("text", kind) and not isinstance(value, (str, list, dict)))
                else ""
            )
            by = f" (a parameter of {owner})" if owner else ""
            raise UsageError(f"{key}={value!r} is refused: {key}{by} takes {describe(kind)}{example}.{quote}")
        if leaf.rule is not None:
            check_range(key, value, leaf.rule, leaf.whole, default)
