"""Ray Tune trainables: the trials a searcher's proposals run.

Registry: ``TRAINABLES`` maps a name (a searcher's ``trainable`` attribute) to the module that
defines ``trial_job(cfg, exp_dir, common) -> (trainable function, job)``. To add one, write
``trainables/<name>.py`` and add one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from widthsearch.errors import ConfigError

TRAINABLES: dict[str, str] = {
    "score": "trainables.score",
    "aofp": "trainables.aofp",
    "gradient": "trainables.gradient",
    "metapruning": "trainables.metapruning",
}


def trial_job(name: str, cfg: Any, exp_dir: str, common: dict) -> tuple[Callable, Any]:
    """The trainable function registered as `name` and the job shipped to its trials."""
    if name not in TRAINABLES:
        raise ConfigError(f"unknown trainable {name!r}; registered trainables: {', '.join(sorted(TRAINABLES))}")
    return importlib.import_module(TRAINABLES[name]).trial_job(cfg, exp_dir, common)
