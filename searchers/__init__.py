"""Width searchers: Ray Tune Searchers that propose per-group channel widths.

    from searchers import make_searcher
    searcher = make_searcher("optuna", space, cost, budget=0.5, seed=0)

Registry: ``SEARCHERS`` maps a name to a :class:`WidthSearcher` subclass; ``register`` is a
class decorator that adds one. Built-in searchers: ``uniform``, ``random`` (baselines),
``global`` (global importance ranking), ``optuna`` (TPE / NSGA-II). A searcher living in
module ``searchers/<name>.py`` that registers itself under ``<name>`` is found on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from widthsearch.cost import CostModel
from widthsearch.errors import ConfigError
from widthsearch.space import WidthSpace

from .base import FLOPS_KEY, WidthSearcher, project_to_budget

SEARCHERS: dict[str, type[WidthSearcher]] = {}


def register(cls: type[WidthSearcher]) -> type[WidthSearcher]:
    """Class decorator: add a WidthSearcher subclass to SEARCHERS under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, WidthSearcher)):
        raise TypeError(f"only WidthSearcher subclasses can be registered, got {cls!r}")
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no registry name (class attribute `name`)")
    existing = SEARCHERS.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"searcher name {cls.name!r} is already taken by {existing.__qualname__}")
    SEARCHERS[cls.name] = cls
    return cls


def _autoload(name: str) -> None:
    """Import searchers/<name>.py when it exists (it registers itself)."""
    if not name.isidentifier():
        return
    module = f"{__name__}.{name}"
    if importlib.util.find_spec(module) is not None:
        importlib.import_module(module)


def searcher_class(name: str) -> type[WidthSearcher]:
    """The class registered as ``name`` (importing ``searchers/<name>.py`` on first use)."""
    if name not in SEARCHERS:
        _autoload(name)
    if name not in SEARCHERS:
        raise ConfigError(f"unknown searcher {name!r}; registered searchers: {', '.join(sorted(SEARCHERS))}")
    return SEARCHERS[name]


def make_searcher(name: str, space: WidthSpace, cost: CostModel, **kwargs: Any) -> WidthSearcher:
    """Build the searcher registered as ``name``; kwargs go to its constructor."""
    return searcher_class(name)(space, cost, **kwargs)


# Built-in searchers register themselves on import.
from . import baselines, global_ranking, optuna_search  # noqa: E402,F401

__all__ = ["FLOPS_KEY", "SEARCHERS", "WidthSearcher", "make_searcher", "project_to_budget", "register"]
