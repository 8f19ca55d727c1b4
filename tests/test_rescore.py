"""The re-scoring stage: the best profiles of a search get a longer fine-tune, and the final choice is made on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from widthsearch.results import load

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "widthsearch.app.cli"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ})


def test_rescoring_needs_a_longer_fine_tune_and_says_so_before_any_work(tmp_path):
    proc = cli("search", "--storage", str(tmp_path), "--name", "bad", "--finetune-steps", "20", "--rescore-top", "3",
               "--rescore-steps", "20", "--quiet")
    assert proc.returncode == 2
    assert "config key 'rescore_steps' must be more than finetune_steps (20) with rescore_top > 0, got 20" in proc.stderr
    assert not (tmp_path / "bad").exists()  # refused before the base model was trained


def test_the_best_profiles_are_rescored_and_the_choice_is_made_on_the_longer_fine_tune(tmp_path):
    proc = cli("search", "--storage", str(tmp_path), "--name", "rs", "--num-samples", "5", "--finetune-steps", "5",
               "--bn-batches", "3", "--base-epochs", "2", "--rescore-top", "2", "--rescore-steps", "15", "--quiet")
    assert proc.returncode == 0, proc.stderr
    rows = load(str(tmp_path / "rs")).to_pylist()
    search = {r["trial_id"]: r for r in rows if r["run"] == "search"}
    rescored = [r for r in rows if r["run"] == "rescore"]
    assert len(search) == 5 and len(rescored) == 2
    order = sorted(search.values(), key=lambda r: (-r["score"], r["cost_ratio"]))
    best_two = [r for i, r in enumerate(order) if all(r["widths"] != q["widths"] for q in order[:i])]
    assert all(r["status"] == "ok" and r["steps_reached"] == 15 and r["cost_ratio"] <= 0.5 for r in rescored)
    sources = [json.loads(r["payload"])["rescore_of"] for r in rescored]
    assert len(set(sources)) == 2 and all(search[s]["widths"] == r["widths"] for s, r in zip(sources, rescored))
    assert {tuple(search[s]["widths"]) for s in sources} == {tuple(r["widths"]) for r in best_two[:2]} or \
        best_two[1]["score"] == best_two[2]["score"]  # a tie at the second place may pick either profile
    chosen = max(rescored, key=lambda r: (r["score"], -r["cost_ratio"]))
    assert f"best: trial {chosen['trial_id']} (score {chosen['score']:.4f} after 15 fine-tune steps" in proc.stdout
    phases = dict(rescored[0]["phase_s"])
    assert {"setup", "prune", "bn", "finetune", "eval"} <= set(phases) and phases["finetune"] > 0
    assert all(0 < r["cpu_s"] for r in rows)  # each trial's compute, whatever the load
