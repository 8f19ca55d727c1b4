"""Width searchers: Ray Tune Searchers that propose per-group channel widths.

    from searchers import make_searcher
    searcher = make_searcher("optuna", space, cost, budget=0.5, seed=0)

Registry: ``SEARCHERS`` maps each name to ``"module:Class"``, imported on first use (like Ray
Tune's ``SEARCH_ALG_IMPORT``). To add a searcher, write ``searchers/<name>.py`` with a
:class:`WidthSearcher` subclass (``name``, ``trainable``, ``OPTIONS``, ``_propose``) and add
one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from widthsearch.cost import CostModel
from widthsearch.errors import ConfigError
from widthsearch.options import Option, options_help
from widthsearch.space import WidthSpace

from .base import WidthSearcher, project_to_budget

SEARCHERS: dict[str, str] = {
    "uniform": "searchers.baselines:UniformSearcher",
    "random": "searchers.baselines:RandomSearcher",
    "global": "searchers.global_ranking:GlobalRankingSearcher",
    "optuna": "searchers.optuna_search:OptunaWidthSearcher",
    "aofp": "searchers.aofp:AofpSearcher",
    "gradient": "searchers.gradient:GradientSearcher",
    "metapruning": "searchers.metapruning:MetaPruningSearcher",
}


def searcher_class(name: str) -> type[WidthSearcher]:
    """The class registered as ``name``; ConfigError listing every registered searcher if unknown."""
    if name not in SEARCHERS:
        raise ConfigError(f"unknown searcher {name!r}; registered searchers: {', '.join(sorted(SEARCHERS))}")
    module, _, attr = SEARCHERS[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, WidthSearcher)) or cls.name != name:
        raise TypeError(f"SEARCHERS[{name!r}] = {SEARCHERS[name]!r} is not a WidthSearcher named {name!r}")
    return cls


def make_searcher(name: str, space: WidthSpace, cost: CostModel, **kwargs: Any) -> WidthSearcher:
    """Build the searcher registered as ``name``; kwargs go to its constructor."""
    return searcher_class(name)(space, cost, **kwargs)


def searchers_help() -> str:
    """Every searcher's options, one line each (for ``widthsearch search --help`` and the README)."""
    lines = []
    for name in SEARCHERS:
        cls = searcher_class(name)
        lines.append(f"{name}:" + ("" if cls.OPTIONS else " (no options)"))
        lines += [f"  {line}" for line in options_help(cls.OPTIONS)]
    return "\n".join(lines)


__all__ = ["SEARCHERS", "Option", "WidthSearcher", "make_searcher", "project_to_budget", "searcher_class",
           "searchers_help"]
