"""`widthsearch report EXP`: the Pareto plot, the best profiles and the HTML page, through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from widthsearch.app.cli import main
from widthsearch.results import ResultsStore

META = {"experiment": "exp", "groups": ["conv1", "conv2"], "widths": [4, 8], "min_widths": [1, 1],
        "base_flops": 1000, "base_params": 100, "base_val_acc": 0.9, "config": {"searcher": "random"}}
PNG = b"\x89PNG\r\n\x1a\n"


def write_rows(storage: Path, rows: list[tuple]) -> None:
    store = ResultsStore.create(str(storage / "exp"), META)
    for i, (trial_id, flops_ratio, score, status) in enumerate(rows):  # a profile each
        store.write_row({"experiment": "exp", "trial_id": trial_id, "searcher": "random", "status": status,
                         "widths": [2, 1 + i], "keep_ratios": [0.5, (1 + i) / 8], "flops_ratio": flops_ratio,
                         "score": score, "error": "ValueError: boom" if status == "error" else None})


def test_report_writes_plots_and_a_page_of_the_front(tmp_path, capsys):
    write_rows(tmp_path, [("a", 0.2, 0.5, "ok"), ("b", 0.4, 0.7, "ok"), ("c", 0.5, 0.6, "ok"),
                          ("d", 0.9, 0.9, "ok"), ("e", None, None, "error")])
    out = tmp_path / "report"
    assert main(["report", "exp", "--storage", str(tmp_path), "--out", str(out), "--top", "2"]) == 0
    assert capsys.readouterr().out.split() == [str(out / n) for n in ("pareto.png", "profiles.png", "index.html")]
    for name in ("pareto.png", "profiles.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    page = (out / "index.html").read_text()
    assert "Pareto front (3 trials)" in page and "Best 2 candidates" in page
    listed = [line.split("</td>")[0].removeprefix("<tr><td>") for line in page.splitlines()
              if line.startswith("<tr><td>")]
    assert listed == ["a", "b", "d", "d", "b"]  # the front (c is dominated), then the 2 best


def test_report_ranks_the_best_within_the_budget_at_the_longest_fine_tune(tmp_path, capsys):
    store = ResultsStore.create(str(tmp_path / "exp"), {**META, "config": {"searcher": "random", "budget": 0.5}})
    for i, (trial_id, flops_ratio, score, steps) in enumerate([("a", 0.2, 0.5, 50), ("b", 0.4, 0.7, 10),
                                                                ("c", 0.5, 0.6, 50), ("d", 0.9, 0.9, 50)]):
        store.write_row({"experiment": "exp", "trial_id": trial_id, "status": "ok", "widths": [2, 1 + i],
                         "keep_ratios": [0.5, (1 + i) / 8], "flops_ratio": flops_ratio, "cost_ratio": flops_ratio,
                         "score": score, "steps_reached": steps})
    out = tmp_path / "report"
    assert main(["report", "exp", "--storage", str(tmp_path), "--out", str(out), "--top", "2"]) == 0
    page = (out / "index.html").read_text()
    best = page.split("Best 2 candidates")[1]
    listed = [line.split("</td>")[0].removeprefix("<tr><td>") for line in best.splitlines()
              if line.startswith("<tr><td>")]
    assert listed == ["c", "a"]  # d is over the budget; b scored highest but after a shorter fine-tune


def test_report_without_successful_trials_says_so(tmp_path, capsys):
    write_rows(tmp_path, [("e", None, None, "error")])
    assert main(["report", "exp", "--storage", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "nothing to report: the experiment has 1 row(s) and no successful trial" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["missing"], "no widthsearch experiment at"),
    (["exp", "--top", "0"], "--top must be at least 1, got 0"),
])
def test_report_bad_input(tmp_path, capsys, args, message):
    write_rows(tmp_path, [("a", 0.2, 0.5, "ok")])
    assert main(["report", *args, "--storage", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
