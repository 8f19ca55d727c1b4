"""Width searchers: Ray Tune Searchers that propose per-group channel widths.

    from searchers import make_searcher
    searcher = make_searcher("optuna", space, cost, budget=0.5, seed=0)

Registry: ``SEARCHERS`` maps each name to ``"module:Class"``, imported on first use (like Ray
Tune's ``SEARCH_ALG_IMPORT``); every searcher's options are declared in :mod:`searchers.options`.
Importing this package, the registry or the options loads neither Ray nor torch. To add a
searcher, write ``searchers/<name>.py`` with a :class:`WidthSearcher` subclass (``name``,
``trainable``, ``_propose``), add one line here and its options (if any) to ``searchers.options``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from widthsearch.errors import ConfigError
from widthsearch.options import Option

from . import options

if TYPE_CHECKING:
    from widthsearch.cost import CostModel
    from widthsearch.space import WidthSpace

    from .base import WidthSearcher

SEARCHERS: dict[str, str] = {
    "uniform": "searchers.baselines:UniformSearcher",
    "random": "searchers.baselines:RandomSearcher",
    "global": "searchers.global_ranking:GlobalRankingSearcher",
    "optuna": "searchers.optuna_search:OptunaWidthSearcher",
    "aofp": "searchers.aofp:AofpSearcher",
    "gradient": "searchers.gradient:GradientSearcher",
    "metapruning": "searchers.metapruning:MetaPruningSearcher",
}
_BASE = ("WidthSearcher", "project_to_budget")  # names of searchers.base, imported on first use (Ray, torch)


def searcher_class(name: str) -> type[WidthSearcher]:
    """The class registered as ``name``; ConfigError listing every registered searcher if unknown."""
    from .base import WidthSearcher

    check_name(name)
    module, _, attr = SEARCHERS[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, WidthSearcher)) or cls.name != name:
        raise TypeError(f"SEARCHERS[{name!r}] = {SEARCHERS[name]!r} is not a WidthSearcher named {name!r}")
    return cls


def check_name(name: str) -> None:
    """ConfigError listing every registered searcher unless ``name`` is one."""
    if name not in SEARCHERS:
        raise ConfigError(f"unknown searcher {name!r}; registered searchers: {', '.join(sorted(SEARCHERS))}")


def check_options(name: str, given: dict[str, Any], num_samples: int | None = None) -> dict[str, Any]:
    """Searcher ``name``'s options checked (:func:`searchers.options.check`) without loading it."""
    check_name(name)
    return options.check(name, given, num_samples)


def make_searcher(name: str, space: WidthSpace, cost: CostModel, **kwargs: Any) -> WidthSearcher:
    """Build the searcher registered as ``name``; kwargs go to its constructor."""
    return searcher_class(name)(space, cost, **kwargs)


def searchers_help() -> str:
    """Every registered searcher's options, one line each (for ``widthsearch search --help`` and the README)."""
    return options.help_text(list(SEARCHERS))


def __getattr__(name: str) -> Any:
    if name not in _BASE:
        raise AttributeError(f"module 'searchers' has no attribute {name!r}")
    from . import base

    return getattr(base, name)


__all__ = ["SEARCHERS", "Option", "WidthSearcher", "check_options", "make_searcher", "project_to_budget",
           "searcher_class", "searchers_help"]
