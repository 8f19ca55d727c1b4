"""Options declared once: default, type, range, one line of help; checks and help text come from the declaration.

Searchers declare ``OPTIONS = {"key": Option(default, kind, help, ...)}``; the application's settings
(``widthsearch.app.config.SearchConfig``) declare theirs on their dataclass fields. Both are checked by
:func:`check_options` / :meth:`Option.check` (one message style, before any expensive step) and listed by
:func:`options_help` (``widthsearch search --help`` and the README).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
          dict: "a mapping of keys to values"}
_ITEMS = {float: "numbers", int: "integers", str: "strings"}


@dataclass(frozen=True)
class Option:
    """One option. `kind` is int, float, str, bool, list or dict; bounds apply to numbers (and list items).

    `choices` is a tuple of allowed values, or a callable returning them (a registry's names, read when
    checked, so that names registered later count); for a list, they constrain its items. `help` is a line of
    text, or a callable returning it (one that names a registry's entries, read when listed).
    """

    default: Any
    kind: type
    help: str | Callable[[], str]
    low: float | None = None          # smallest allowed value (inclusive unless low_open)
    high: float | None = None         # largest allowed value (inclusive)
    low_open: bool = False            # True: the value must be strictly above `low`
    choices: tuple | Callable[[], Iterable] | None = None  # allowed values (for strings, or list items)
    optional: bool = False            # None is allowed ...
    empty: str = "for automatic"      # ... and means this
    item: type = float                # the kind of a list's items (without choices)

    def help_text(self) -> str:
        """The help line (a callable one read now)."""
        return self.help() if callable(self.help) else self.help

    def allowed(self) -> tuple | None:
        """The allowed values (a registry's names read now), or None when any value of the kind goes."""
        return tuple(self.choices()) if callable(self.choices) else self.choices

    def describe(self) -> str:
        """What a valid value is, e.g. "a number > 0", "one of: tpe, nsga2, random", "a list of numbers in (0, 1]"."""
        choices = self.allowed()
        if choices is not None:
            what = ("a list of: " if self.kind is list else "one of: ") + ", ".join(map(str, choices))
        else:
            what = f"a list of {_ITEMS[self.item]}" if self.kind is list else _NAMES[self.kind]
            if self.low is not None and self.high is not None:
                what += f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
            elif self.low is not None:
                what += f" {'>' if self.low_open else '>='} {self.low:g}"
            elif self.high is not None:
                what += f" <= {self.high:g}"
        return what + (f", or empty {self.empty}" if self.optional else "")

    def check(self, name: str, value: Any) -> Any:
        """The value, coerced (int -> float for numbers, whole floats -> int for integers, one value -> a one-item
        list); ConfigError "`name` must be <describe()>, got <value>" if invalid."""
        if value is None and self.optional:
            return None
        if self.kind is dict:
            if not isinstance(value, Mapping):
                raise self._error(name, value)
            return dict(value)
        if self.kind is list:
            items = list(value) if isinstance(value, (list, tuple)) else [value]  # one value: a one-item list
            if (items or self.default == []) and all(self._item_ok(v) for v in items):  # empty only if by default
                return [self._coerced(v, self.item) for v in items]
            raise self._error(name, value)
        if not self._item_ok(value):
            raise self._error(name, value)
        return self._coerced(value, self.kind)

    def _item_ok(self, value: Any) -> bool:
        kind = self.item if self.kind is list else self.kind
        choices = self.allowed()
        if choices is not None:
            return (kind is bool or not isinstance(value, bool)) and value in choices
        if kind is bool:
            return isinstance(value, bool)
        if kind is str:
            return isinstance(value, str)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or (kind is int and not float(value).is_integer()) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    @staticmethod
    def _coerced(value: Any, kind: type) -> Any:
        if kind is float and not isinstance(value, bool) and isinstance(value, int):
            return float(value)
        if kind is int and isinstance(value, float):
            return int(value)
        return value

    def _error(self, name: str, value: Any) -> ConfigError:
        return ConfigError(f"{name} must be {self.describe()}, got {value!r}")


def check_options(searcher: str, declared: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """A searcher's defaults overlaid with `given`, each checked; unknown keys are errors that list the accepted
    ones."""
    unknown = [k for k in given if k not in declared]
    if unknown:
        accepted = ", ".join(sorted(declared)) or "none"
        raise ConfigError(f"unknown option {unknown[0]!r} for searcher {searcher!r}; accepted options: {accepted}")
    out = {key: option.default for key, option in declared.items()}
    for key, value in given.items():
        out[key] = declared[key].check(f"searcher {searcher!r}: option {key!r}", value)
    return out


def options_help(declared: Mapping[str, Option]) -> list[str]:
    """One line per option: ``key=default  help (valid values)``."""
    return [f"{key}={default_text(o)}  {o.help_text()} ({o.describe()})" for key, o in declared.items()]


def default_text(option: Option) -> str:
    """An option's default as a user writes it; a None default that does not mean "automatic" is written empty."""
    return "" if option.default is None and option.empty != Option.empty else value_text(option.default)


def value_text(value: Any) -> str:
    """A default as a user writes it: "auto" for None, lower-case booleans, comma-separated lists."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)
