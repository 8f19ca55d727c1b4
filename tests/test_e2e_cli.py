"""End to end through the real CLI (subprocesses, real Ray Tune trials) on digits, CI-sized."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from widthsearch import CostModel, build_space, load_model

from .storage_check import artifacts_under_experiment

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "widthsearch.app.cli"]
FAST = ["--finetune-steps", "10", "--bn-batches", "5", "--concurrency", "2", "--quiet"]


def cli(*args: str, ok: bool = True, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(CLI + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if ok and proc.returncode != 0:
        raise AssertionError(f"widthsearch {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def rows(exp_dir: Path):
    return ds.dataset(exp_dir / "widthsearch" / "rows", format="parquet").to_table().to_pylist()


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "small_cnn.pt"
    out = cli("train-base", "--model", "small_cnn", "--data", "digits", "--epochs", "4", "--out", str(path))
    assert "val accuracy" in out.stdout and path.is_file()
    return path


def test_search_results_retrain_export(base_ckpt, tmp_path):
    out = cli("search", "--name", "e2e", "--storage", str(tmp_path), "--checkpoint", str(base_ckpt),
              "--searcher", "optuna", "--budget", "0.5", "--num-samples", "4", "--fill-budget", *FAST)
    assert "next: widthsearch retrain e2e" in out.stdout
    table = rows(tmp_path / "e2e")  # plain Parquet, read without widthsearch
    assert len(table) == 4 and len({r["trial_id"] for r in table}) == 4
    assert all(r["status"] == "ok" and r["flops_ratio"] <= 0.5 and len(r["widths"]) == 3 for r in table)
    space = build_space(load_model("small_cnn", 10, in_channels=1), torch.randn(1, 1, 8, 8))
    flops = CostModel(space).measure("flops")
    for r in table:  # --fill-budget: no group of a profile can take one more channel within the budget
        assert all(flops.ratio(np.add(r["widths"], np.eye(3, dtype=int)[i])) > 0.5
                   for i in range(3) if r["widths"][i] < space.widths[i])
    assert all(0 <= r["val_acc"] <= 1 and r["steps_reached"] == 10 for r in table)

    listed = json.loads(cli("results", "e2e", "--storage", str(tmp_path), "--format", "json").stdout)
    assert len(listed) == 4 and listed[0]["score"] == max(r["score"] for r in table)
    front = json.loads(cli("results", "e2e", "--storage", str(tmp_path), "--pareto", "--format", "json").stdout)
    assert 1 <= len(front) <= 4

    export_dir = tmp_path / "export"
    summary = json.loads(cli("retrain", "e2e", "--storage", str(tmp_path), "--best", "--epochs", "2",
                             "--out", str(export_dir), "--quiet").stdout)
    assert summary["flops_ratio"] <= 0.5 and 0 < summary["test_acc"] <= 1
    assert summary["trial_id"] == listed[0]["trial_id"]
    for name in ("weights.pt", "profile.json", "model.json", "metrics.json", "model.torchscript.pt", "model.onnx",
                 "latency.json"):
        assert (export_dir / name).is_file(), name
    metrics = json.loads((export_dir / "metrics.json").read_text())
    assert metrics["test_acc"] == summary["test_acc"] and metrics["onnx_check_batch"] == 64
    assert 0 <= metrics["onnx_max_abs_diff"] <= 1e-4

    import onnxruntime

    from widthsearch import load_data, load_exported

    model = load_exported(export_dir)
    scripted = torch.jit.load(str(export_dir / "model.torchscript.pt"))
    session = onnxruntime.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = load_data("digits").normalize(load_data("digits").test.x[:32])
    with torch.no_grad():
        assert torch.allclose(model(x), scripted(x), atol=1e-5)
        assert torch.allclose(model(x), torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), atol=1e-4)
    assert json.loads((export_dir / "profile.json").read_text()) == dict(
        zip(json.loads((tmp_path / "e2e" / "widthsearch" / "experiment.json").read_text())["groups"],
            listed[0]["widths"]))

    again = cli("retrain", "e2e", "--storage", str(tmp_path), "--best", "--epochs", "2", "--out", str(export_dir),
                ok=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_crashing_trial_is_recorded_and_the_search_goes_on(tmp_path):
    from searchers import make_searcher
    from widthsearch import CostModel, build_space, load_data, load_model

    data = load_data("digits")
    model = load_model("tests.fixtures.faulty_model:make", data.num_classes)
    space = build_space(model, data.example_input)
    searcher = make_searcher("uniform", space, CostModel(space), budget=None, points=3)
    widths = [searcher.suggest(f"t{i}")["widths"] for i in range(3)]
    fault = widths[1][0]  # the first conv's width in the second proposal: only that trial crashes
    assert fault not in (widths[0][0], widths[2][0], space.groups[0].width)

    out = cli("search", "--name", "faulty", "--storage", str(tmp_path), "--model", "tests.fixtures.faulty_model:make",
              "--searcher", "uniform", "--pareto", "--option", "points=3", "--num-samples", "3", "--base-epochs", "1",
              "--max-failures", "1", *FAST, env={"WIDTHSEARCH_TEST_FAULT_WIDTH": str(fault)})
    table = rows(tmp_path / "faulty")
    assert sorted(r["status"] for r in table) == ["error", "ok", "ok"]
    bad = next(r for r in table if r["status"] == "error")
    assert f"injected fault at width {fault}" in bad["error"] and bad["widths"][0] == fault
    assert "3 trials (2 ok, 1 failed)" in out.stdout  # some failed: said, and the exit status is 0 (a front)


def test_killed_driver_resumes_without_duplicates(base_ckpt, tmp_path):
    args = ["search", "--name", "killed", "--storage", str(tmp_path), "--checkpoint", str(base_ckpt),
            "--searcher", "random", "--num-samples", "6", "--finetune-steps", "40", "--bn-batches", "5",
            "--concurrency", "1", "--quiet"]
    driver = subprocess.Popen(CLI + args, cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows_dir = tmp_path / "killed" / "widthsearch" / "rows"
    deadline = time.monotonic() + 900  # generous: a busy machine starts trials late
    while time.monotonic() < deadline and len(list(rows_dir.glob("*.parquet"))) < 2:
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    before = {p.name: p.read_bytes() for p in rows_dir.glob("*.parquet")}
    assert 2 <= len(before) < 6, "the driver should have been killed mid-search"

    cli("search", "--resume", "--name", "killed", "--storage", str(tmp_path), "--quiet")
    table = rows(tmp_path / "killed")
    ids = [r["trial_id"] for r in table]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert all(r["status"] == "ok" for r in table)
    # A row the killed driver wrote after Tune's last snapshot is set aside, and its profile evaluated again.
    orphans = {p.name: p for p in (rows_dir.parent / "orphaned_rows").glob("*.parquet")}
    assert set(before) <= {p.name for p in rows_dir.glob("*.parquet")} | set(orphans)
    for path in orphans.values():
        assert pq.read_table(path).column("widths").to_pylist()[0] in [r["widths"] for r in table]


@pytest.mark.parametrize("args, text", [
    (["--searcher", "nope"], "config key 'searcher' must be one of: aofp, global, gradient, metapruning"),
    (["--budget", "0.0001"], "unreachable"),
    (["--data", "npz:/no/such/file.npz"], "data file not found: /no/such/file.npz"),
    (["--num-samples", "0"], "'num_samples' must be an integer >= 1, got 0"),
    (["--criterion", "l7"], "config key 'criterion' must be one of: bn_scale, frs, l1, random, taylor, got 'l7'"),
    (["--gpus-per-trial", "1"], "no CUDA GPU"),
])
def test_bad_input_fails_before_any_trial(base_ckpt, tmp_path, args, text):
    if "--gpus-per-trial" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = cli("search", "--name", "bad", "--storage", str(tmp_path), "--checkpoint", str(base_ckpt), *args, ok=False)
    assert proc.returncode == 2 and text in proc.stderr, proc.stderr
    assert not (tmp_path / "bad" / "widthsearch" / "rows").exists()


@pytest.mark.parametrize("args, text", [
    (["--searcher", "aofp", "--option", "epsilon=abc"], "searcher 'aofp': option 'epsilon' must be a number > 0, got 'abc'"),
    (["--option", "sampler=bogus"], "searcher 'optuna': option 'sampler' must be one of: tpe, nsga2, random"),
    (["--searcher", "metapruning", "--option", "topk=9", "--option", "population=4"], "option 'topk' (9) exceeds"),
])
def test_bad_searcher_options_fail_before_the_base_model_is_trained(tmp_path, args, text):
    # no --checkpoint: a base model would be trained first; the options are checked before that
    proc = cli("search", "--name", "early", "--storage", str(tmp_path), "--base-epochs", "50", *args, ok=False,
               timeout=600)
    assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "training a base" not in proc.stderr and not (tmp_path / "early").exists()


def test_mismatched_checkpoint_and_existing_name(base_ckpt, tmp_path):
    proc = cli("search", "--name", "x", "--storage", str(tmp_path), "--model", "cifar_resnet20",
               "--checkpoint", str(base_ckpt), ok=False)
    assert proc.returncode == 2 and str(base_ckpt) in proc.stderr
    meta = tmp_path / "taken" / "widthsearch"
    meta.mkdir(parents=True)
    (meta / "experiment.json").write_text("{}")
    proc = cli("search", "--name", "taken", "--storage", str(tmp_path), "--checkpoint", str(base_ckpt), ok=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--resume" in proc.stderr


def test_aofp_search_on_uri_storage_traces_a_trajectory_and_retrains_its_final_model(base_ckpt, tmp_path):
    storage = tmp_path.as_uri()  # file:///...: read and written through pyarrow.fs like s3://
    out = cli("search", "--name", "aofp", "--storage", storage, "--checkpoint", str(base_ckpt),
              "--searcher", "aofp", "--budget", "0.8", "--num-samples", "500", "--option", "window=4",
              "--option", "epsilon=0.05", *FAST)
    table = rows(tmp_path / "aofp")
    phase = {r["trial_id"]: json.loads(r["payload"])["phase"] for r in table}
    commits = sorted((r for r in table if phase[r["trial_id"]] == "commit"),
                     key=lambda r: json.loads(r["payload"])["version"])
    probes = [r for r in table if r["status"] == "probe"]
    finals = [r for r in table if phase[r["trial_id"]] == "final"]
    assert len(probes) == 2 * len(commits) and commits and len(finals) == 1, out.stdout
    ratios = [r["flops_ratio"] for r in commits]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] <= 0.8 and all(r > 0.8 for r in ratios[:-1])
    final, stop = finals[0], json.loads(finals[0]["payload"])
    assert final["status"] == "ok" and final["widths"] == commits[-1]["widths"] and final["steps_reached"] == 10
    assert stop["budget_met"] and stop["stop"].startswith("budget 0.8 met")

    # every artifact under the experiment (rows, metadata, searcher state, model versions), none beside the checkout
    state = artifacts_under_experiment(tmp_path, "aofp", [r["trial_id"] for r in table])
    exp = tmp_path / "aofp" / "widthsearch"
    versions = [f"v{i:04d}.pt" for i in range(1, len(commits) + 1)]
    assert sorted(p.name for p in (exp / "aofp").iterdir()) == sorted(versions + ["final.pt"])
    assert [r["checkpoint"] for r in commits] == [f"{storage}/aofp/widthsearch/aofp/{v}" for v in versions]
    assert state["version"] == len(commits)

    summary = json.loads(cli("retrain", "aofp", "--storage", storage, "--best", "--epochs", "1", "--quiet").stdout)
    assert summary["trial_id"] == final["trial_id"] and summary["flops_ratio"] == final["flops_ratio"]


def test_promotion_gives_most_trials_the_cheap_score_and_best_picks_from_the_longest(base_ckpt, tmp_path):
    cli("search", "--name", "asha", "--storage", str(tmp_path), "--checkpoint", str(base_ckpt), "--searcher", "random",
        "--budget", "0.5", "--num-samples", "8", "--asha", "--min-finetune-steps", "4", "--finetune-steps", "16",
        "--reduction-factor", "4", "--bn-batches", "5", "--concurrency", "1", "--quiet")
    # one trial at a time: which trials ASHA promotes depends on the order results arrive, and with two at
    # once that order is the machine's timing; with one it is the searcher's (seeded) order
    table = rows(tmp_path / "asha")
    steps = [r["steps_reached"] for r in table]
    assert len(table) == 8 and set(steps) <= {4, 16} and steps.count(4) > steps.count(16) >= 1
    summary = json.loads(cli("retrain", "asha", "--storage", str(tmp_path), "--best", "--epochs", "1",
                             "--quiet").stdout)
    assert summary["search_steps_reached"] == 16
    best = max((r for r in table if r["steps_reached"] == 16), key=lambda r: r["score"])
    assert summary["trial_id"] == best["trial_id"]


def test_a_base_from_another_split_is_refused_before_any_trial(tmp_path):
    ckpt = tmp_path / "base20.pt"
    cli("train-base", "--model", "small_cnn", "--data", "digits", "--epochs", "1", "--val-fraction", "0.2",
        "--out", str(ckpt), "--quiet")
    out = cli("search", "--name", "leak", "--storage", str(tmp_path), "--checkpoint", str(ckpt), "--searcher", "random",
              "--num-samples", "2", *FAST, ok=False)
    assert out.returncode == 2 and "was trained on another train/val split" in out.stderr
    assert "val_fraction 0.2, split_seed 0" in out.stderr and "val_fraction 0.1, split_seed 0" in out.stderr
    assert not (tmp_path / "leak" / "widthsearch" / "rows").exists()
