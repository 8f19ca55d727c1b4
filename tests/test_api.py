"""The Python API (`widthsearch.Search`, `widthsearch.load_search`): its contracts on stored experiments (no Ray),
and the README's Python section run as written on the digits demo (real Ray Tune trials)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

import widthsearch as ws
from tests.test_results import META, row
from widthsearch.errors import ConfigError, WidthSearchError
from widthsearch.results import ResultsStore, choose_trial, ranked

ROOT = Path(__file__).resolve().parents[1]


def test_import_widthsearch_loads_neither_the_application_nor_torch_nor_ray():
    code = ("import sys, widthsearch, widthsearch.errors; "
            "print(sorted(m for m in ('torch', 'ray', 'widthsearch.app', 'searchers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]"]
    assert ws.Search is ws.app.api.Search and ws.load_search is ws.app.api.load_search
    assert {"Search", "load_search", "SearchConfig", "prune", "load_exported"} <= set(ws.__all__) <= set(dir(ws))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ws.nope


@pytest.fixture
def stored(tmp_path) -> Path:
    """An experiment folder with a budget of 0.5 and five rows (no search run): runs/exp."""
    store = ResultsStore.create(str(tmp_path / "runs" / "exp"),
                                {**META, "config": {"searcher": "random", "budget": 0.5}})
    for r in [row("a", 0.2, 0.5, cost_ratio=0.2, widths=[1, 4], steps_reached=10),
              row("b", 0.4, 0.7, cost_ratio=0.4, widths=[2, 4], steps_reached=10),
              row("c", 0.5, 0.6, cost_ratio=0.5, widths=[2, 6], steps_reached=40),  # a longer fine-tune: first
              row("d", 0.9, 0.9, cost_ratio=0.9, widths=[4, 8], steps_reached=40),  # over the budget
              row("e", None, None, status="error", error="ValueError: boom")]:
        store.write_row(r)
    return tmp_path / "runs"


def test_a_stored_experiment_is_queried_through_one_object(stored):
    run = ws.load_search(stored / "exp")
    assert run.path == str(stored / "exp") and (run.config.name, run.config.storage) == ("exp", str(stored))
    table = run.results()
    assert isinstance(table, pa.Table) and table.num_rows == 5
    assert run.budget == 0.5
    best = run.best()
    assert best["trial_id"] == "c" == choose_trial(table, budget=0.5)["trial_id"] == ranked(table, 0.5)[0]["trial_id"]
    assert run.best(budget=0.45)["trial_id"] == "b" and run.best(budget=1.0)["trial_id"] == "d"
    assert run.best(trial="a")["trial_id"] == "a"
    with pytest.raises(WidthSearchError, match="trial 'e' did not score a profile"):
        run.best(trial="e")
    assert run.front()["trial_id"].to_pylist() == ["a", "b", "d"]
    assert run.sql("SELECT count(*) AS n FROM results WHERE status = 'ok'").to_pylist() == [{"n": 4}]


def test_a_stored_search_changes_only_what_a_resume_may_and_extends_only_a_searcher_that_can_go_on(stored,
                                                                                                    monkeypatch):
    """fit() on a stored experiment: num_samples only upwards, and only for an `extendable` searcher; refused before
    any data is read (nothing is prepared)."""
    from widthsearch.app import experiment

    monkeypatch.setattr(experiment, "prepare", lambda *a, **k: pytest.fail("prepared before the settings were checked"))
    run = ws.load_search(stored / "exp")  # searcher random, num_samples 16 (the default)
    with pytest.raises(ConfigError, match=r"cannot lower num_samples \(stored 16, given 8\)"):
        run.fit(num_samples=8)
    meta = stored / "exp" / "widthsearch" / "experiment.json"
    meta.write_text(meta.read_text().replace('"random"', '"uniform"'))
    with pytest.raises(ConfigError, match="searcher 'uniform' cannot be extended"):
        ws.load_search(stored / "exp").fit(num_samples=20)


def test_load_search_of_a_missing_experiment_names_it(tmp_path):
    with pytest.raises(WidthSearchError, match="no widthsearch experiment at"):
        ws.load_search(tmp_path / "nothing")


def test_search_checks_its_settings_when_made(stored, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="config key 'budget' must be a number in \\(0, 1\\], got 1.5"):
        ws.Search(budget=1.5)
    with pytest.raises(ConfigError, match="unknown config key 'budgett'"):
        ws.Search(budgett=0.5)
    with pytest.raises(ConfigError, match="option 'pointz' for searcher 'uniform'"):
        ws.Search(searcher="uniform", searcher_options={"pointz": 3})
    with pytest.raises(ConfigError, match="experiment 'exp' already exists .*load_search"):
        ws.Search(name="exp", storage=str(stored))
    run = ws.Search(storage="new", searcher="random")
    assert run.config.name.startswith("small_cnn-random-") and run.config.storage == str(tmp_path / "new")
    assert run.budget == 0.5 and not (tmp_path / "new").exists()  # made, checked, nothing written yet


def test_search_takes_a_config_a_mapping_or_a_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: cifar_resnet20\nbudget: 0.3\nnum_samples: 5\n")
    for config in (str(path), {"model": "cifar_resnet20", "budget": 0.3, "num_samples": 5},
                   ws.SearchConfig(model="cifar_resnet20", budget=0.3, num_samples=5)):
        run = ws.Search(config, name="x", storage=str(tmp_path), num_samples=7)
        assert (run.config.model, run.config.budget, run.config.num_samples) == ("cifar_resnet20", 0.3, 7)


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of one `## section` of the README, in order."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_readme_python_section_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's Python API section, executed as written in a fresh folder: a demo search through the API, its
    table, the best row within the budget (the row `widthsearch retrain --best` takes too), a retrain and an
    export that loads back, and the stored search extended by two trials (only those run)."""
    from widthsearch.app.cli import main

    blocks = python_blocks("Python API")
    assert len(blocks) == 2 and "ws.Search(" in blocks[0] and "run.export(" in blocks[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the README's search starts (and stops) its own Ray
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    table, best, metrics = namespace["table"], namespace["best"], namespace["metrics"]
    assert isinstance(table, pa.Table) and table.num_rows == 4
    assert best == choose_trial(table, budget=0.5) and best["cost_ratio"] <= 0.5
    assert 0 < metrics["test_acc"] <= 1 and metrics["trial_id"] == best["trial_id"]
    export = tmp_path / "best-export"
    assert json.loads((export / "metrics.json").read_text())["test_acc"] == metrics["test_acc"]
    groups = json.loads(table.schema.metadata[b"widthsearch.groups"])
    assert json.loads((export / "profile.json").read_text()) == dict(zip(groups, best["widths"]))
    more = namespace["more"]
    assert more.num_rows == 6 and more.filter(pa.compute.is_in(more["trial_id"], table["trial_id"])).equals(table)
    assert sorted(more["run"].to_pylist()) == ["search"] * 4 + ["search-2"] * 2  # the extension's own part
    meta = json.loads((tmp_path / "runs" / "demo" / "widthsearch" / "experiment.json").read_text())
    assert meta["config"]["num_samples"] == 6 and meta["resumed"][-1]["changed"] == {"num_samples": [4, 6]}
    import ray

    assert not ray.is_initialized()  # fit and retrain shut down the Ray they started
    capsys.readouterr()
    assert main(["retrain", "demo", "--storage", "runs", "--best", "--epochs", "1", "--quiet"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)  # standard output: the figures alone (the restored retrain prints no Tune table)
    assert summary["trial_id"] == ws.load_search("runs/demo").best()["trial_id"]  # the CLI picks the API's row
    assert summary["export"] == str(tmp_path / "runs" / "demo" / "exports" / f"{summary['trial_id']}-e1")
    assert (Path(summary["export"]) / "model.onnx").is_file() and f"exported to {summary['export']}" in err
