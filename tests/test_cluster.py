"""From laptop to cluster: the launcher config, URI storage, a real multi-node Ray on loopback, faults, GPUs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from widthsearch.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "widthsearch.app.cli"]
SMALL = ["--num-samples", "4", "--concurrency", "2", "--finetune-steps", "10", "--bn-batches", "5",
         "--base-epochs", "1", "--searcher", "random", "--quiet"]


def rows(exp_dir: str) -> list[dict]:
    from widthsearch.results import load

    return load(exp_dir).to_pylist()


def test_cluster_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` runs before launching anything
    head, workers = config["head_node_type"], config["available_node_types"]
    gpu = [t for name, t in workers.items() if name != head and t["resources"].get("GPU", 0) > 0]
    assert config["provider"]["type"] == "aws" and gpu and 1 <= gpu[0]["min_workers"] <= gpu[0]["max_workers"]
    assert "docker" not in config and config["file_mounts"] == {"~/widthsearch": "."}
    assert any("pip install -e ~/widthsearch" in c for c in config["setup_commands"])
    with pytest.raises(Exception, match="max_workers"):  # the validator is not a rubber stamp
        validate_config(prepare_config({**config, "max_workers": "four"}))


def test_results_and_base_model_on_a_file_uri(tmp_path, digits):
    from widthsearch.app.config import SearchConfig
    from widthsearch.app.experiment import _base_model, experiment_dir
    from widthsearch.results import ResultsStore, load

    storage = tmp_path.as_uri()  # file:///...: the same pyarrow.fs path as s3:// or gs://
    cfg = SearchConfig(name="uri", storage=storage, base_epochs=1).resolved()
    assert cfg.storage == storage
    exp_dir = experiment_dir(cfg.storage, cfg.name)
    trained = _base_model(cfg, digits, exp_dir, progress=False)
    assert (tmp_path / "uri" / "widthsearch" / "base.pt").is_file()
    reloaded = _base_model(cfg, digits, exp_dir, progress=False)  # a resume reuses it, no training
    assert all((a == b).all() for a, b in zip(trained.state_dict().values(), reloaded.state_dict().values()))

    store = ResultsStore.create(exp_dir, {"experiment": "uri", "groups": ["a"], "widths": [4]})
    store.write_row({"experiment": "uri", "trial_id": "t1", "status": "ok", "widths": [2], "score": 0.5})
    assert [(r["trial_id"], r["score"]) for r in load(exp_dir).to_pylist()] == [("t1", 0.5)]
    assert (tmp_path / "uri" / "widthsearch" / "rows" / "t1.parquet").is_file()


def test_trial_timeout_is_a_checked_config_key():
    from widthsearch.app.cli import _search_settings, build_parser
    from widthsearch.app.config import SearchConfig, load_config

    assert SearchConfig().trial_timeout_s is None
    assert load_config(None, _search_settings(build_parser().parse_args(
        ["search", "--trial-timeout-s", "90"]))).trial_timeout_s == 90.0
    with pytest.raises(ConfigError, match="'trial_timeout_s' must be a number > 0"):
        SearchConfig(trial_timeout_s=0)


def test_hung_trial_times_out_and_out_of_memory_is_an_error_row(tmp_path, digits, monkeypatch):
    """Two runs, so no trial races a clock that a busy machine can stretch: the out-of-memory and the fine trial
    have no deadline; the hung trial (it waits forever) has a short one that only it can reach."""
    import ray
    from ray import tune

    from trainables.score import ScoreJob, score_profile
    from widthsearch import CostModel, build_space, load_model
    from widthsearch.app.callbacks import ResultsCallback
    from widthsearch.results import ResultsStore

    model = load_model("tests.fixtures.flaky_model:make", digits.num_classes)
    space = build_space(model, digits.example_input)
    cost = CostModel(space)
    hang, oom, fine = (space.vector(space.uniform(r)).tolist() for r in (0.25, 0.5, 0.75))
    monkeypatch.setenv("WIDTHSEARCH_TEST_HANG_WIDTH", str(hang[0]))  # inherited by the local Ray's workers
    monkeypatch.setenv("WIDTHSEARCH_TEST_OOM_WIDTH", str(oom[0]))
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        for name, widths, timeout in (("faults", [oom, fine], None), ("hang", [hang], 5)):
            store = ResultsStore.create(str(tmp_path / name), {"experiment": name, "groups": space.names,
                                                               "widths": space.widths.tolist()})
            job = ScoreJob(model=model, space=space, cost=cost, measure=cost.measure("flops"), data="digits",
                           val_fraction=0.1, split_seed=0, seed=0, criterion="l1", importance_batches=1, bn_batches=2,
                           batch_size=64, finetune_steps=2, finetune_lr=0.01, rungs=[2], trial_timeout_s=timeout)
            tune.Tuner(
                tune.with_resources(tune.with_parameters(score_profile, job=job), {"cpu": 1}),
                param_space={"widths": tune.grid_search(widths)},
                run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=0),
                                          callbacks=[ResultsCallback(store, name, "grid", space.widths.tolist())]),
            ).fit()
    finally:
        ray.shutdown()
    by_width = {tuple(r["widths"]): r for name in ("faults", "hang") for r in rows(str(tmp_path / name))}
    assert by_width[tuple(hang)]["status"] == "error"
    assert "TimeoutError: trial exceeded trial_timeout_s=5" in by_width[tuple(hang)]["error"]
    assert by_width[tuple(oom)]["status"] == "error" and "MemoryError" in by_width[tuple(oom)]["error"]
    assert by_width[tuple(fine)]["status"] == "ok" and by_width[tuple(fine)]["score"] is not None


# ---------------------------------------------------------------- a head and two workers on loopback


@pytest.fixture(scope="module")
def marks(tmp_path_factory) -> Path:
    """Where the flaky model's trials on the cluster leave one file per node they run on."""
    return tmp_path_factory.mktemp("marks")


@pytest.fixture(scope="module")
def cluster(marks):
    """A real 3-node Ray cluster (1 CPU each); workers inherit the flaky model's slow-down and node marks."""
    from ray.cluster_utils import Cluster

    slow = {"WIDTHSEARCH_TEST_SLOW_S": "0.2", "WIDTHSEARCH_TEST_MARK_DIR": str(marks)}
    fast_health = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}  # notice a dead node in ~2 s
    with pytest.MonkeyPatch.context() as env:
        for key, value in slow.items():
            env.setenv(key, value)  # read by the nodes' processes only, not by the CLI below
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                              "resources": {"head": 1}, "_system_config": fast_health})
        try:
            for name in ("worker_a", "worker_b"):
                nodes.add_node(num_cpus=1, resources={name: 1})
            nodes.wait_for_nodes()
        except BaseException:
            nodes.shutdown()
            raise
    try:
        yield nodes
    finally:
        nodes.shutdown()


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(CLI + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"widthsearch {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_gpu_trials_on_a_cluster_without_gpus_fail_fast(cluster):
    import ray

    from widthsearch.app.tuning import init_ray

    try:
        with pytest.raises(ConfigError, match=r"gpus_per_trial is 0.5 but the Ray cluster has 0 GPUs"):
            init_ray(cluster.address, gpus_per_trial=0.5)
        init_ray(cluster.address, gpus_per_trial=0)  # already connected: only the check runs, and passes
    finally:
        ray.shutdown()


def test_search_spreads_over_nodes_and_reads_back_from_uri(cluster, tmp_path):
    storage = tmp_path.as_uri()
    cli("search", "--name", "multi", "--storage", storage, "--address", cluster.address, *SMALL)
    table = rows(f"{storage}/multi")
    assert len(table) == 4 and len({r["trial_id"] for r in table}) == 4
    assert all(r["status"] == "ok" for r in table)
    nodes = {r["node"].rsplit("/", 1)[1] for r in table}
    assert len(nodes) > 1 and nodes <= {n.node_id for n in cluster.list_all_nodes()}
    listed = json.loads(cli("results", "multi", "--storage", storage, "--format", "json").stdout)
    assert sorted(r["trial_id"] for r in listed) == sorted(r["trial_id"] for r in table)


def test_killed_worker_node_trials_are_retried_elsewhere(cluster, marks, tmp_path):
    """Runs last: removes a worker node (its raylet and all) while one of its trials is running."""
    storage = tmp_path.as_uri()
    workers = {n.node_id: n for n in cluster.worker_nodes}
    for stale in marks.iterdir():  # earlier tests' trials marked the workers; only this search's marks count
        stale.unlink()
    log = tmp_path / "driver.log"
    with log.open("w") as out:  # a file, not a pipe: nobody reads the driver's output while it runs
        driver = subprocess.Popen(CLI + ["search", "--name", "kill", "--storage", storage, "--address",
                                         cluster.address, "--model", "tests.fixtures.flaky_model:make",
                                         "--max-failures", "1", *SMALL[:-1], "--verbose"],  # Tune's logs shown
                                  cwd=ROOT, stdout=out, stderr=out)
    try:
        deadline, killed = time.monotonic() + 600, None  # generous: a busy machine starts trials late
        while killed is None and driver.poll() is None and time.monotonic() < deadline:
            busy = [p.name for p in marks.iterdir() if p.name in workers]  # a trial runs there now
            if busy:
                killed = busy[0]
                cluster.remove_node(workers[killed], allow_graceful=False)
            time.sleep(0.1)
        assert killed, "no trial started on a worker node"
        driver.wait(timeout=900)
        assert driver.returncode == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    table = rows(f"{storage}/kill")
    assert len(table) == 4 and len({r["trial_id"] for r in table}) == 4
    assert all(r["status"] == "ok" for r in table), [r["error"] for r in table]
    assert all(not r["node"].endswith(killed) for r in table)  # the interrupted trial finished on another node
    assert re.search(r"ActorDiedError|ActorUnavailableError|NodeDiedError", log.read_text())  # it failed there once
