"""Searcher options, declared once: default, type, range, one line of help.

Every searcher lists its options as ``OPTIONS = {"key": Option(default, kind, help, ...)}``.
The base class checks a user's options against that declaration (one message style, before
any expensive step), and ``widthsearch search --help`` and the README list them from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from widthsearch.errors import ConfigError

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


@dataclass(frozen=True)
class Option:
    """One searcher option: `kind` is int, float, str, bool or list; bounds apply to numbers (and list items)."""

    default: Any
    kind: type
    help: str
    low: float | None = None          # smallest allowed value (inclusive unless low_open)
    high: float | None = None         # largest allowed value (inclusive)
    low_open: bool = False            # True: the value must be strictly above `low`
    choices: tuple | None = None      # allowed values (for strings, or list items)
    optional: bool = False            # None is allowed (means "automatic")

    def describe(self) -> str:
        """What a valid value is, e.g. "a number > 0", "one of: tpe, nsga2, random", "a list of numbers in (0, 1]"."""
        if self.choices is not None:
            what = ("a list of: " if self.kind is list else "one of: ") + ", ".join(map(str, self.choices))
        else:
            what = "a list of numbers" if self.kind is list else _NAMES[self.kind]
            if self.low is not None and self.high is not None:
                what += f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
            elif self.low is not None:
                what += f" {'>' if self.low_open else '>='} {self.low:g}"
            elif self.high is not None:
                what += f" <= {self.high:g}"
        return what + (", or empty for automatic" if self.optional else "")

    def check(self, searcher: str, key: str, value: Any) -> Any:
        """The value, coerced (int -> float for numbers); ConfigError naming searcher, key and value if invalid."""
        if value is None and self.optional:
            return None
        items = value if self.kind is list and isinstance(value, (list, tuple)) else None
        if self.kind is list:
            if items is None:
                items = [value]  # a single value stands for a one-item list
            if not items or not all(self._item_ok(v) for v in items):
                raise self._error(searcher, key, value)
            return list(items)
        if not self._item_ok(value):
            raise self._error(searcher, key, value)
        return float(value) if self.kind is float else value

    def _item_ok(self, value: Any) -> bool:
        if self.choices is not None:
            return (self.kind is bool or not isinstance(value, bool)) and value in self.choices
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return isinstance(value, str)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or (self.kind is int and not float(value).is_integer()) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def _error(self, searcher: str, key: str, value: Any) -> ConfigError:
        return ConfigError(f"searcher {searcher!r}: option {key!r} must be {self.describe()}, got {value!r}")


def check_options(searcher: str, declared: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with `given`, each checked; unknown keys are errors that list the accepted ones."""
    unknown = [k for k in given if k not in declared]
    if unknown:
        accepted = ", ".join(sorted(declared)) or "none"
        raise ConfigError(f"unknown option {unknown[0]!r} for searcher {searcher!r}; accepted options: {accepted}")
    out = {key: option.default for key, option in declared.items()}
    for key, value in given.items():
        value = declared[key].check(searcher, key, value)
        out[key] = int(value) if declared[key].kind is int and value is not None else value
    return out


def options_help(declared: Mapping[str, Option]) -> list[str]:
    """One line per option: ``key=default  help (valid values)``."""
    return [f"{key}={_text(o.default)}  {o.help} ({o.describe()})" for key, o in declared.items()]


def _text(value: Any) -> str:
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)
