"""Which numbers mean something for a setting.

A `Range` is declared once per setting: on the parameter of the class or function the config key builds
(`embedding_size: Annotated[int, AT_LEAST_1]`), or, for a key of a class the project does not own (Lightning's
Trainer, torch's optimizers), in the table of run/checks.py. The config check reads it from there for every key
before anything is built, and the project's own classes check their arguments with it when code builds them.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from shakespeare.errors import UsageError


@dataclass(frozen=True)
class Range:
    """The numbers in [low, high] (either end left open, either left out), and `also`: values outside it that mean
    something else, each with its meaning (`((-1, "no limit"),)`)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[tuple[float, str], ...] = ()
    means: str = ""  # what the values mean, said after the range: "0 always picks the likeliest character"

    def __contains__(self, value: object) -> bool:
        """Whether a number means something here; anything else (null, text, a list) is for the type check to judge."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value in dict(self.also):
            return True
        if math.isnan(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self, whole: bool) -> str:
        """`a whole number of at least 1`, `a number in [0, 1)`, `..., or -1 (no limit)`."""
        kind = "a whole number" if whole else "a number"
        if math.inf in (self.high, -(self.low or 0)):  # an open infinite end: any finite number that far
            return (
                Range(
                    None if self.low == -math.inf else self.low,
                    None if self.high == math.inf else self.high,
                    self.low_open,
                    self.high_open,
                    self.also,
                    self.means,
                )
                .describe(whole)
                .replace("a ", "a finite ", 1)
            )
        low, high = shown(self.low), shown(self.high)
        if self.low is not None and self.high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{kind} {'above' if self.low_open else 'of at least'} {low}"
        elif self.high is not None:
            text = f"{kind} {'below' if self.high_open else 'of at most'} {high}"
        else:
            text = kind
        text += "".join(f", or {shown(value)} ({meaning})" for value, meaning in self.also)
        return f"{text} ({self.means})" if self.means else text

    def outside(self) -> float:
        """A number this range refuses (tests set it to see the refusal)."""
        if self.low is not None:
            return self.low if self.low_open else self.low - 1 - (1 if self.low - 1 in dict(self.also) else 0)
        return self.high if self.high_open else self.high + 1


def shown(number: float | None) -> str:
    """A bound as a user types it: `4294967296`, `0.5`, `inf`."""
    if number is None or not math.isfinite(number) or not float(number).is_integer():
        return f"{number:g}" if number is not None else ""
    return str(int(number))


@dataclass(frozen=True)
class WholeOrFraction:
    """A whole number (a count) or a fraction (of an epoch): Lightning's val_check_interval and limit_*_batches."""

    whole: Range
    fraction: Range

    def __contains__(self, value: object) -> bool:
        return value in (self.whole if isinstance(value, int) else self.fraction)

    def describe(self, whole: bool) -> str:
        return f"{self.whole.describe(True)} (a count) or {self.fraction.describe(False)} (a fraction)"

    def outside(self) -> float:
        return self.whole.outside()


Rule = Range | WholeOrFraction
AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
ABOVE_0 = Range(0, low_open=True)
PROBABILITY = Range(0, 1, high_open=True)  # dropout: 1 would drop everything
FRACTION = Range(0, 1)
TORCH_SEED = Range(-(2**63), 2**64, high_open=True, means="the seeds torch's generators take")


def ranges_of(builder: Callable) -> dict[str, tuple[Rule, bool]]:
    """The Range each parameter of `builder` (a class, dataclass or function) is annotated with, and whether the
    parameter counts (an `int`: a whole number)."""
    function = (
        builder.__init__ if isinstance(builder, type) and not hasattr(builder, "__dataclass_fields__") else builder
    )
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception:  # an annotation only a type checker imports: no ranges to read
        return {}
    return {name: found for name, hint in hints.items() if (found := _rule(hint))}


def _rule(hint: Any) -> tuple[Rule, bool] | None:
    if typing.get_origin(hint) is Annotated:
        rules = [rule for rule in hint.__metadata__ if isinstance(rule, (Range, WholeOrFraction))]
        return (rules[0], typing.get_args(hint)[0] is int) if rules else None
    return next(filter(None, map(_rule, typing.get_args(hint))), None)  # inside `X | None`


def rule_of(hint: Any) -> Rule | None:
    """The Range an annotation (`Annotated[int, AT_LEAST_1]`, or one inside `X | None`) carries."""
    found = _rule(hint)
    return found[0] if found else None


def check_range(key: str, value: Any, rule: Rule, whole: bool = False, example: Any = None) -> None:
    """Refuse `value` for `key` when `rule` says it means nothing there (or, `whole`, when it is no whole number),
    naming what it takes."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value not in rule or (whole and number and not isinstance(value, int)):
        hint = f", e.g. {key}={example}" if example is not None and example in rule else ""
        raise UsageError(f"{key}={value!r} must be {rule.describe(whole)}{hint}.")


def check_arguments(builder: Callable, arguments: Mapping[str, Any], prefix: str) -> None:
    """Refuse the first argument of `builder` outside the Range its parameter is annotated with, named as the
    config key `prefix.name`: what the project's classes run when code (not a config) builds them."""
    for name, (rule, whole) in ranges_of(builder).items():
        if name in arguments:
            check_range(f"{prefix}.{name}" if prefix else name, arguments[name], rule, whole)
