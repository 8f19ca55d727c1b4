"""ResultsStore, queries and formats (fast, no Ray cluster); the driver's ResultsCallback; one real Ray Tune run."""

import csv
import io
import json
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from widthsearch.app.callbacks import ResultsCallback
from widthsearch.errors import ConfigError, WidthSearchError
from widthsearch.results import SCHEMA, ResultsStore, format_table, load, load_metadata, pareto_front, query

META = {"experiment": "exp", "groups": ["conv1", "conv2"], "widths": [4, 8], "min_widths": [1, 1],
        "base_flops": 1000, "base_params": 100, "base_val_acc": 0.9, "config": {"searcher": "random"}}


def row(trial_id: str, flops_ratio: float | None, score: float | None, **extra) -> dict:
    return {"experiment": "exp", "trial_id": trial_id, "searcher": "random", "status": "ok", "widths": [2, 4],
            "flops_ratio": flops_ratio, "score": score, "val_acc": score, **extra}


@pytest.fixture
def exp_dir(tmp_path) -> str:
    return str(tmp_path / "exp")


@pytest.fixture
def store(exp_dir) -> ResultsStore:
    return ResultsStore.create(exp_dir, META)


@pytest.fixture
def table(store, exp_dir) -> pa.Table:
    for r in [row("a", 0.2, 0.5), row("b", 0.4, 0.7), row("c", 0.5, 0.6), row("d", 0.9, 0.9),
              row("e", None, None, status="error", error="ValueError: boom", searcher="grid")]:
        store.write_row(r)
    return load(exp_dir)


def test_write_load_roundtrip_and_overwrite(store, exp_dir):
    store.write_row(row("a", 0.5, 0.1))
    store.write_row(row("b", 0.6, 0.2))
    store.write_row(row("a", 0.5, 0.3))  # the same trial again (resume): replaces, no duplicate
    table = load(exp_dir)
    assert table.schema.remove_metadata().equals(SCHEMA)
    assert json.loads(table.schema.metadata[b"widthsearch.groups"]) == ["conv1", "conv2"]
    assert json.loads(table.schema.metadata[b"widthsearch.widths"]) == [4, 8]
    assert table.column("trial_id").to_pylist() == ["a", "b"]
    assert table.column("score").to_pylist() == [0.3, 0.2]
    assert table.column("error").to_pylist() == [None, None]
    meta = load_metadata(exp_dir)
    assert meta["groups"] == ["conv1", "conv2"] and meta["version"] and meta["created_at"]


def test_empty_experiment_and_file_uri(tmp_path):
    uri = (tmp_path / "exp").as_uri()
    store = ResultsStore.create(uri, META)
    assert load(uri).num_rows == 0 and load(uri).schema.remove_metadata().equals(SCHEMA)
    store.write_row(row("a", 0.5, 0.1))
    assert load(str(tmp_path / "exp")).column("trial_id").to_pylist() == ["a"]


def test_rows_are_plain_parquet(store, exp_dir):
    store.write_row(row("a", 0.5, 0.1))
    store.write_row(row("b", 0.6, 0.2))
    direct = ds.dataset(f"{exp_dir}/widthsearch/rows", format="parquet").to_table()
    assert sorted(direct.column("trial_id").to_pylist()) == ["a", "b"]
    assert direct.schema.remove_metadata().equals(SCHEMA)
    assert b"widthsearch.groups" in direct.schema.metadata


def test_rows_readable_by_duckdb(store, exp_dir):
    import duckdb  # the test extra installs it

    store.write_row(row("a", 0.5, 0.1))
    store.write_row(row("b", 0.6, 0.2))
    rows = f"{exp_dir}/widthsearch/rows/*.parquet"
    assert duckdb.sql(f"select trial_id, widths from '{rows}' order by score desc").fetchall() == [
        ("b", [2, 4]), ("a", [2, 4])]


def test_rows_readable_by_polars(store, exp_dir):
    import polars  # the test extra installs it

    store.write_row(row("a", 0.5, 0.1))
    store.write_row(row("b", 0.6, 0.2))
    frame = polars.read_parquet(f"{exp_dir}/widthsearch/rows/*.parquet").sort("score", descending=True)
    assert frame["trial_id"].to_list() == ["b", "a"] and frame["widths"].to_list() == [[2, 4], [2, 4]]


def test_stray_temp_files_are_ignored(store, exp_dir):
    store.write_row(row("a", 0.5, 0.1))
    rows = f"{exp_dir}/widthsearch/rows"
    for name in ("b.parquet.tmp", ".c.parquet.1234.tmp"):  # a crash mid-write leaves these behind
        with open(f"{rows}/{name}", "wb") as f:
            f.write(b"PAR1 truncat")
    assert load(exp_dir).column("trial_id").to_pylist() == ["a"]


class FailingMove:
    """A filesystem whose rename fails, as when the driver dies between write and rename."""

    def __init__(self, fs):
        self.fs, self.temp = fs, None

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def move(self, src, dest):
        self.temp = src
        raise OSError("killed before rename")


def test_failed_rename_never_leaves_a_final_file(store, exp_dir):
    store.write_row(row("a", 0.5, 0.1))
    store.fs = FailingMove(store.fs)
    with pytest.raises(OSError, match="killed"):
        store.write_row(row("a", 0.5, 0.9))
    with pytest.raises(OSError, match="killed"):
        store.write_row(row("b", 0.5, 0.9))
    assert store.fs.temp.rsplit("/", 1)[1].startswith(".b.parquet.")  # hidden: pyarrow.dataset skips it
    assert sorted(p.name for p in Path(exp_dir, "widthsearch", "rows").iterdir()) == ["a.parquet"]
    assert load(exp_dir).column("score").to_pylist() == [0.1]  # the earlier row survives intact


def test_write_row_rejects_unknown_keys_and_missing_trial_id(store):
    with pytest.raises(ValueError, match="bogus"):
        store.write_row({**row("a", 0.5, 0.1), "bogus": 1})
    with pytest.raises(ValueError, match="trial_id"):
        store.write_row({"score": 0.5})


def test_create_twice_needs_resume(store, exp_dir):
    with pytest.raises(ConfigError, match="already exists at .*pass --resume to continue it or choose another --name"):
        ResultsStore.create(exp_dir, META)
    created = load_metadata(exp_dir)["created_at"]
    resumed = ResultsStore.create(exp_dir, {**META, "base_val_acc": 0.8}, resume=True)
    assert resumed.metadata()["base_val_acc"] == 0.8 and resumed.metadata()["created_at"] == created
    ResultsStore.create(exp_dir, META, resume=True, changed={"num_samples": [16, 24]})
    assert [r["changed"] for r in load_metadata(exp_dir)["resumed"]] == [{}, {"num_samples": [16, 24]}]


def test_load_missing_experiment(tmp_path):
    with pytest.raises(WidthSearchError, match="no widthsearch experiment at .*nowhere"):
        load(str(tmp_path / "nowhere"))
    assert not ResultsStore(str(tmp_path / "nowhere")).exists()


def ids(table: pa.Table) -> list:
    return table.column("trial_id").to_pylist()


def test_pareto_front(table):
    assert ids(query(table, META, pareto="flops", sort="flops_ratio")) == ["a", "b", "d"]  # c beaten by b; e failed
    assert ids(query(table, META, pareto="cost", sort="flops_ratio")) == ["a", "b", "d"]  # no cost_ratio: FLOPs
    assert ids(pareto_front(table)) == ["a", "b", "d"]
    twins = pa.Table.from_pylist([row("x", 0.4, 0.7), row("y", 0.4, 0.7), row("z", 0.5, 0.7)], schema=SCHEMA)
    assert ids(pareto_front(twins)) == ["x", "y"]
    assert ids(pareto_front(table, maximize="val_acc", minimize="score")) == ["a", "c", "b", "d"]


def test_query_filters_sort_limit(table):
    assert ids(query(table, META)) == ["d", "b", "c", "a", "e"]  # default -score, nulls last
    assert ids(query(table, META, sort="flops_ratio", limit=2)) == ["a", "b"]
    assert ids(query(table, META, max={"flops": 0.45})) == ["b", "a"]
    assert ids(query(table, META, where=["val_acc>=0.6", "status='ok'"])) == ["d", "b", "c"]  # DuckDB's SQL
    assert ids(query(table, META, where=["searcher != 'random'"])) == ["e"]
    assert ids(query(table, META, where=["score < 0.6", "flops_ratio = 0.2"])) == ["a"]
    assert ids(query(table, META, where=["status IN ('error') OR score > 0.8"])) == ["d", "e"]
    assert query(table, META, where=["score > 0.5"]).schema.metadata == table.schema.metadata  # group names kept


def test_costs_compare_as_fractions_of_the_base_models(table):
    params = table.set_column(table.schema.get_field_index("params"), "params", pa.array([10, 20, 50, 90, None]))
    assert ids(query(params, META, max={"params": 0.3}, sort="params")) == ["a", "b"]  # base_params 100
    assert ids(query(params, META, max={"params": 0.5, "flops": 0.3})) == ["a"]
    latency = {**META, "latency": {"base_ms": 2.0}}
    timed = table.set_column(table.schema.get_field_index("latency_ms"), "latency_ms",
                             pa.array([0.4, 1.2, 0.6, 1.8, None]))
    assert ids(query(timed, latency, max={"latency": 0.35}, sort="latency_ms")) == ["a", "c"]
    assert ids(query(timed, latency, pareto="latency", sort="latency_ms")) == ["a", "c", "b", "d"]
    with pytest.raises(ConfigError, match="no latency model"):
        query(timed, META, max={"latency": 0.5})


@pytest.mark.parametrize("kwargs, message", [
    ({"where": ["nope > 1"]}, "--where query failed: Binder Error.*nope"),
    ({"where": ["status = ok"]}, "quote text, e.g. status = 'ok'"),
    ({"where": ["score >"]}, "--where query failed: Parser Error"),
    ({"sort": "-nope"}, "unknown column 'nope'"),
    ({"limit": -1}, "limit"),
    ({"pareto": "joules"}, "unknown cost 'joules'"),
])
def test_query_errors(table, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        query(table, META, **kwargs)


def test_rows_written_before_a_column_was_renamed_load_under_its_new_name(store, exp_dir):
    """Rows of an experiment stored before `finetune_steps` became `steps_reached` (and before `phase_s` and `run`
    existed) load into today's schema."""
    store.write_row(row("new", 0.5, 0.7, steps_reached=20))
    fields = [pa.field("finetune_steps", pa.int32()) if f.name == "steps_reached" else f for f in SCHEMA
              if f.name not in ("phase_s", "run", "measured_ms", "measured_ratio")]
    old = pa.Table.from_pylist([{"trial_id": "old", "status": "ok", "score": 0.6, "finetune_steps": 50}],
                               schema=pa.schema(fields))
    pq.write_table(old, Path(exp_dir) / "widthsearch" / "rows" / "old.parquet")
    table = load(exp_dir)
    assert table.schema.remove_metadata().equals(SCHEMA)
    assert dict(zip(ids(table), table["steps_reached"].to_pylist())) == {"new": 20, "old": 50}
    assert table.filter(pc.equal(table["trial_id"], "old"))["run"].to_pylist() == [None]


def test_format_table(table):
    text = format_table(query(table, META))
    lines = text.splitlines()
    assert lines[0].split() == ["trial_id", "searcher", "status", "flops_ratio", "params", "val_acc", "score",
                                "steps_reached", "wall_s", "widths"]
    assert len(lines) == 6 and lines[1].split()[:4] == ["d", "random", "ok", "0.9000"]
    assert lines[1].endswith("conv1=2 conv2=4")  # the widths by group name (the schema's metadata)
    assert "[2,4]" in format_table(table.replace_schema_metadata(None)).splitlines()[1]  # no names: a list
    records = list(csv.DictReader(io.StringIO(format_table(table, "csv"))))
    assert list(records[0]) == SCHEMA.names and len(records) == 5
    assert json.loads(records[0]["widths"]) == [2, 4] and records[0]["error"] == ""
    data = json.loads(format_table(table, "json"))
    assert data[0]["widths"] == [2, 4] and data[4]["error"] == "ValueError: boom"
    back = pq.read_table(pa.BufferReader(format_table(table, "parquet")))
    assert back.equals(table) and back.schema.metadata[b"widthsearch.groups"]
    with pytest.raises(ConfigError, match="unknown format 'xml'"):
        format_table(table, "xml")


ERROR_FILE = """Failure # 1 (occurred at 2025-01-01_00-00-00)
ray::ImplicitFunc.train() (pid=1, ip=10.0.0.1)
  File "trainable.py", line 3, in train
    raise RuntimeError("first")
RuntimeError: first
Failure # 2 (occurred at 2025-01-01_00-00-05)
ray::ImplicitFunc.train() (pid=2, ip=10.0.0.1)
  File "function_trainable.py", line 45, in train
    return self._trainable_func(self.config)
  File "trainable.py", line 3, in train
    raise ValueError("boom")
ValueError: boom
"""


def fake_trial(tmp_path, trial_id: str, last_result: dict, error: str | None = None) -> SimpleNamespace:
    error_file = None
    if error is not None:
        error_file = tmp_path / f"{trial_id}-error.txt"
        error_file.write_text(error)
    return SimpleNamespace(trial_id=trial_id, config={"widths": [2, 4], "payload": {"arm": 3}},
                           last_result=last_result, error_file=error_file and str(error_file))


def test_callback_rows(store, exp_dir, tmp_path):
    callback = ResultsCallback(store, "exp", "random", [4, 8])
    started = time.time() - 5
    result = {"score": 0.8, "val_acc": 0.8, "val_loss": 0.5, "flops": 250, "params": 30, "flops_ratio": 0.25,
              "widths": [2, 4], "steps_reached": 10, "criterion": "l1", "wall_s": 5.0, "node": "10.0.0.2",
              "started_at": started, "payload": '{"arm": 3}', "training_iteration": 1}
    callback.on_trial_complete(iteration=1, trials=[], trial=fake_trial(tmp_path, "t1", result))
    callback.on_trial_error(iteration=2, trials=[], trial=fake_trial(tmp_path, "t2", {}, ERROR_FILE))
    callback.on_trial_complete(iteration=3, trials=[], trial=fake_trial(tmp_path, "t3", {"training_iteration": 0}))
    ok, failed, silent = load(exp_dir).to_pylist()
    assert ok["status"] == "ok" and ok["error"] is None and ok["searcher"] == "random"
    assert ok["keep_ratios"] == [0.5, 0.5] and ok["flops"] == 250 and ok["steps_reached"] == 10
    assert ok["node"] == "10.0.0.2" and ok["payload"] == '{"arm": 3}'
    assert abs(ok["started_at"].timestamp() - started) < 1e-3 and ok["finished_at"] > ok["started_at"]
    assert failed["status"] == "error" and failed["error"] == "ValueError: boom"
    assert failed["widths"] == [2, 4] and failed["payload"] == '{"arm": 3}' and failed["score"] is None
    assert isinstance(failed["finished_at"], datetime)
    assert silent["status"] == "error" and "without reporting" in silent["error"]


def test_rows_of_trials_the_run_does_not_know_are_set_aside(store, exp_dir, tmp_path):
    """A resumed run (Tune state from before the kill) must not count a row from after its snapshot."""
    callback = ResultsCallback(store, "exp", "random", [4, 8])
    trials = [fake_trial(tmp_path, t, {"score": 0.5, "widths": [2, 4]}) for t in ("t1", "t2", "late")]
    for trial in trials:
        callback.on_trial_complete(iteration=1, trials=trials, trial=trial)
    callback.on_experiment_end(trials=trials[:2])
    assert ids(load(exp_dir)) == ["t1", "t2"]
    assert store.trial_ids() == ["t1", "t2"]
    kept = Path(exp_dir) / "widthsearch" / "orphaned_rows" / "late.parquet"
    assert pq.read_table(kept).column("trial_id").to_pylist() == ["late"]  # moved, not deleted
    callback.on_experiment_end(trials=trials[:2])  # idempotent
    assert ids(load(exp_dir)) == ["t1", "t2"] and kept.is_file()


def test_a_follow_up_run_sets_aside_only_its_own_orphans(store, exp_dir, tmp_path):
    """A re-scoring run in the same experiment knows none of the search's trials: their rows stay."""
    search = ResultsCallback(store, "exp", "random", [4, 8])
    rescore = ResultsCallback(store, "exp", "random", [4, 8], run="rescore")
    first = [fake_trial(tmp_path, t, {"score": 0.5, "widths": [2, 4]}) for t in ("s1", "s2")]
    second = [fake_trial(tmp_path, t, {"score": 0.6, "widths": [2, 4]}) for t in ("r1", "late")]
    for trial in first:
        search.on_trial_complete(iteration=1, trials=first, trial=trial)
    search.on_experiment_end(trials=first)
    for trial in second:
        rescore.on_trial_complete(iteration=1, trials=second, trial=trial)
    rescore.on_experiment_end(trials=second[:1])
    table = load(exp_dir)
    assert ids(table) == ["r1", "s1", "s2"]
    assert dict(zip(ids(table), table["run"].to_pylist())) == {"r1": "rescore", "s1": "search", "s2": "search"}


def test_rows_record_where_the_trial_spent_its_time(store, exp_dir, tmp_path):
    callback = ResultsCallback(store, "exp", "random", [4, 8])
    trial = fake_trial(tmp_path, "t1", {"score": 0.5, "widths": [2, 4], "wall_s": 2.0, "started_at": time.time() - 2.5,
                                        "phase_s": {"prune": 0.5, "finetune": 1.25}, "cpu_s": 1.5})
    callback.on_trial_start(iteration=0, trials=[trial], trial=trial)
    flat = fake_trial(tmp_path, "t2", {"score": 0.5, "widths": [2, 4], "phase_s/eval": 0.25})  # as Tune flattens it
    for t in (trial, flat):
        callback.on_trial_complete(iteration=1, trials=[trial, flat], trial=t)
    first, second = load(exp_dir).to_pylist()
    assert first["cpu_s"] == 1.5 and second["cpu_s"] is None
    one, two = dict(first["phase_s"]), dict(second["phase_s"])
    assert one["prune"] == 0.5 and one["finetune"] == 1.25 and one["start"] >= 0 and one["finish"] >= 0
    assert two == {"eval": 0.25}  # no driver view without the trial's start


@pytest.mark.slow
def test_real_tune_run(tmp_path):
    ray = pytest.importorskip("ray")
    from ray import tune

    def trainable(config):
        if config["widths"] == [2, 2]:
            raise ValueError("boom")
        tune.report({"score": 0.5, "val_acc": 0.5, "val_loss": 1.0, "flops": 10, "params": 2, "flops_ratio": 0.5,
                     "widths": config["widths"], "steps_reached": 0, "criterion": "l1", "wall_s": 0.1,
                     "node": "local", "started_at": time.time(), "payload": None})

    exp_dir = str(tmp_path / "run")
    store = ResultsStore.create(exp_dir, {**META, "widths": [3, 3]})
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        tune.Tuner(trainable, param_space={"widths": tune.grid_search([[1, 2], [2, 2], [3, 3]])},
                   tune_config=tune.TuneConfig(reuse_actors=True),  # fewer worker start-ups: faster
                   run_config=tune.RunConfig(name="run", storage_path=str(tmp_path), verbose=0,
                                             callbacks=[ResultsCallback(store, "run", "grid", [3, 3])],
                                             failure_config=tune.FailureConfig(max_failures=0))).fit()
    finally:
        ray.shutdown()
    rows = {tuple(r["widths"]): r for r in load(exp_dir).to_pylist()}
    assert set(rows) == {(1, 2), (2, 2), (3, 3)}
    assert rows[(2, 2)]["status"] == "error" and "boom" in rows[(2, 2)]["error"]
    assert rows[(1, 2)]["status"] == "ok" and rows[(1, 2)]["keep_ratios"] == pytest.approx([1 / 3, 2 / 3])
