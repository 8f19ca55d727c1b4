"""A check shared by the searchers' URI-storage tests: every artifact of a search lies under its experiment."""

from __future__ import annotations

import pickle
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def artifacts_under_experiment(storage: Path, name: str, trial_ids: list[str]) -> dict:
    """Assert that a search on `storage` (a folder reached through a file:// URI) wrote only under
    ``storage/name``: its metadata, one row per trial, Tune's searcher state; and nothing beside the
    checkout (a path library that took the URI for a relative path would write into ``./file:``).

    Returns the searcher's saved state (what ``WidthSearcher.get_state`` pickled) for further checks.
    """
    assert sorted(p.name for p in storage.iterdir()) == [name]
    exp = storage / name
    meta = exp / "widthsearch"
    assert (meta / "experiment.json").is_file()
    assert sorted(p.stem for p in (meta / "rows").glob("*.parquet")) == sorted(trial_ids)
    states = list(exp.glob("searcher-state-*.pkl"))
    assert len(states) == 1, sorted(p.name for p in exp.iterdir())
    assert not (ROOT / "file:").exists()
    with states[0].open("rb") as f:
        return pickle.load(f)
