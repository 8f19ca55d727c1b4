"""The results store: one Parquet row per finished or failed trial, written atomically by one driver-side callback.

    EXP_DIR/widthsearch/experiment.json         experiment metadata (groups, widths, costs, config)
    EXP_DIR/widthsearch/rows/<trial_id>.parquet one row per trial; rewritten, never duplicated, on resume

All I/O goes through pyarrow.fs, so EXP_DIR may be a local path, a file:// or an s3:// URI.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from importlib import metadata as importlib_metadata

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray import tune

from .errors import ConfigError, WidthSearchError
from .storage import Storage, write_atomic

_TIMESTAMP = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema([
    ("experiment", pa.string()), ("trial_id", pa.string()), ("searcher", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("widths", pa.list_(pa.int32())), ("keep_ratios", pa.list_(pa.float32())),
    ("flops", pa.int64()), ("params", pa.int64()), ("flops_ratio", pa.float64()), ("cost_ratio", pa.float64()),
    ("latency_ms", pa.float64()), ("val_acc", pa.float64()),
    ("val_loss", pa.float64()), ("score", pa.float64()), ("steps_reached", pa.int32()), ("criterion", pa.string()),
    ("wall_s", pa.float64()), ("node", pa.string()), ("started_at", _TIMESTAMP), ("finished_at", _TIMESTAMP),
    ("checkpoint", pa.string()), ("payload", pa.string()),
    ("phase_s", pa.map_(pa.string(), pa.float64())), ("run", pa.string()), ("cpu_s", pa.float64()),
])
MAIN_RUN = "search"  # the Tune run of the search itself; follow-up runs (e.g. "rescore") add rows under their name
# Columns renamed since: their name in rows written before -> their name now (`load` reads both).
RENAMED = {"finetune_steps": "steps_reached"}
FORMATS = ("table", "csv", "json", "parquet")
_TABLE_COLUMNS = ("trial_id", "searcher", "status", "flops_ratio", "params", "val_acc", "score", "steps_reached",
                  "wall_s")
_WHERE = re.compile(r"^\s*(\w+)\s*(==|!=|<=|>=|=|<|>)\s*(.*?)\s*$")
_OPS = {"=": pc.equal, "==": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal,
        ">": pc.greater, ">=": pc.greater_equal}
_ERROR_CHARS = 2000


def _json_default(value):
    """Datetimes -> ISO text, decimals and numpy scalars and arrays -> Python, dataclasses and other mappings (a
    searcher's payload on its way to a trial) -> dicts; anything else is a bug in the caller."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):  # e.g. an SQL sum of integers
        return int(value) if value == value.to_integral_value() else float(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _version() -> str:
    try:
        return importlib_metadata.version("widthsearch")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _schema(meta: dict) -> pa.Schema:
    return SCHEMA.with_metadata({b"widthsearch.groups": json.dumps(meta.get("groups", [])),
                                 b"widthsearch.widths": json.dumps(meta.get("widths", []), default=_json_default)})


class ResultsStore(Storage):
    """Experiment metadata and per-trial rows under EXP_DIR/widthsearch; one writer."""

    def __init__(self, exp_dir: str):
        super().__init__(exp_dir)
        self.rows = f"{self.root}/rows"
        self.orphans = f"{self.root}/orphaned_rows"
        self.meta_path = f"{self.root}/experiment.json"

    @classmethod
    def create(cls, exp_dir: str, metadata: dict, resume: bool = False) -> ResultsStore:
        """Write experiment.json; an existing experiment is an error unless resuming (created_at is kept)."""
        store = cls(exp_dir)
        meta = {**metadata, "created_at": datetime.now(timezone.utc).isoformat(), "version": _version()}
        if store.exists():
            if not resume:
                raise ConfigError(f"experiment {metadata.get('experiment', exp_dir)!r} already exists at {exp_dir}; "
                                  "pass --resume to continue it or choose another --name")
            meta["created_at"] = store.metadata().get("created_at", meta["created_at"])
        store.fs.create_dir(store.rows, recursive=True)
        write_atomic(store.meta_path, json.dumps(meta, indent=1, default=_json_default).encode(), store.fs)
        return store

    def exists(self) -> bool:
        return self.fs.get_file_info(self.meta_path).type == pafs.FileType.File

    def metadata(self) -> dict:
        if not self.exists():
            raise WidthSearchError(f"no widthsearch experiment at {self.exp_dir} (no widthsearch/experiment.json)")
        with self.fs.open_input_stream(self.meta_path) as f:
            return json.loads(f.read())

    def write_row(self, row: dict) -> None:
        """Write one trial's row to rows/<trial_id>.parquet (replacing an earlier one); missing keys are null."""
        unknown = sorted(set(row) - set(SCHEMA.names))
        if unknown:
            raise ValueError(f"unknown result column(s): {', '.join(unknown)}")
        trial_id = row.get("trial_id")
        if not trial_id or "/" in trial_id:
            raise ValueError(f"a row needs a trial_id usable as a file name, got {trial_id!r}")
        table = pa.Table.from_pylist([row], schema=_schema(self.metadata()))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_atomic(f"{self.rows}/{trial_id}.parquet", sink.getvalue().to_pybytes(), self.fs)

    def trial_ids(self) -> list[str]:
        """The trial ids that have a row."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.rows, allow_not_found=True))
        return sorted(i.base_name[:-len(".parquet")] for i in infos if i.type == pafs.FileType.File
                      and i.base_name.endswith(".parquet") and not i.base_name.startswith("."))

    def set_aside(self, trial_ids: Iterable[str]) -> None:
        """Move these trials' rows out of the table, to widthsearch/orphaned_rows/ (kept, not loaded)."""
        self.fs.create_dir(self.orphans, recursive=True)
        for trial_id in trial_ids:
            self.fs.move(f"{self.rows}/{trial_id}.parquet", f"{self.orphans}/{trial_id}.parquet")


def _error_text(text: str) -> str:
    """The exception line(s) of the latest failure in a Tune error file or traceback, at most 2000 chars."""
    lines = re.split(r"^Failure # \d+.*$", text, flags=re.M)[-1].strip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith("File ")]
    if frames:
        tail = lines[frames[-1] + 1:]
        start = next((i for i, line in enumerate(tail) if not line.startswith(" ")), len(tail))
        lines = tail[start:] or lines
    return "\n".join(lines).strip()[:_ERROR_CHARS]


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.isfile(path):
        with open(path) as f:
            return _error_text(f.read())
    error = trial.get_error() if hasattr(trial, "get_error") else None
    return _error_text(str(error)) if error else "trial failed (no error recorded)"


class ResultsCallback(tune.Callback):
    """Driver-side: writes a row when a trial completes or (finally) errors.

    Ray calls on_trial_error only when no retry is left (retries go to on_trial_recover), and a trial that
    runs again after a resume rewrites its own file, so each trial ends as exactly one row. Rows carry the
    name of the Tune run that made them (`run`: MAIN_RUN, or a follow-up run's name).
    """

    def __init__(self, store: ResultsStore, experiment: str, searcher: str, space_widths: list[int],
                 run: str = MAIN_RUN):
        self.store, self.experiment, self.searcher, self.run = store, experiment, searcher, run
        self.space_widths = [int(w) for w in space_widths]
        self._scheduled: dict[str, float] = {}  # trial_id -> when the driver started it (time.time())

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._scheduled.setdefault(trial.trial_id, time.time())

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        if "score" not in result:
            self.store.write_row(self._row(trial, error="trial ended without reporting a score"))
            return
        row = self._row(trial, result)
        row["status"] = result.get("status", "ok")  # searchers may mark helper trials, e.g. aofp "probe"
        row.update({key: result.get(key) for key in ("score", "val_acc", "val_loss", "flops", "params", "flops_ratio",
                                                     "cost_ratio", "latency_ms", "steps_reached", "criterion",
                                                     "checkpoint", "cpu_s")})
        row["wall_s"] = result.get("wall_s", result.get("time_total_s"))
        row["node"] = result.get("node", result.get("node_ip"))
        if result.get("started_at") is not None:
            row["started_at"] = datetime.fromtimestamp(result["started_at"], timezone.utc)
        row["phase_s"] = self._phases(trial.trial_id, result)
        self.store.write_row(row)

    def _phases(self, trial_id: str, result: dict) -> dict | None:
        """The trial's own phases (`phase_s`, also when Tune flattened it to phase_s/NAME keys), plus the driver's
        view: `start` (the driver started the trial -> its body began: actor start, job transfer) and `finish`
        (its last report -> this row), when both clocks are this machine's (a local search)."""
        phases = dict(result.get("phase_s") or {})
        phases.update({k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("phase_s/")})
        scheduled, started, wall = self._scheduled.pop(trial_id, None), result.get("started_at"), result.get("wall_s")
        if phases and scheduled is not None and started is not None and wall is not None:
            phases["start"] = max(0.0, started - scheduled)
            phases["finish"] = max(0.0, time.time() - started - wall)
        return {str(k): float(v) for k, v in phases.items()} or None

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.store.write_row(self._row(trial, error=_trial_error(trial)))

    def on_experiment_end(self, trials: list, **info) -> None:
        """Set aside rows of this run's trials that the run does not know: a driver killed between a trial's
        end and Tune's next experiment snapshot leaves a row that the resumed run (searcher state from that
        snapshot) proposes and evaluates again under a new trial id; without this, a resume would add a row.
        Rows of other runs of the experiment are left alone."""
        known = {trial.trial_id for trial in trials}
        table = load(self.store.exp_dir)
        runs = [r or MAIN_RUN for r in table["run"].to_pylist()]
        self.store.set_aside(t for t, r in zip(table["trial_id"].to_pylist(), runs) if r == self.run and t not in known)

    def _row(self, trial, result: dict | None = None, error: str | None = None) -> dict:
        """The fields known for any trial: ids, status, widths and payload (from the result, else the config)."""
        config, result = trial.config or {}, result or {}
        widths = result.get("widths", config.get("widths"))
        widths = None if widths is None else [int(w) for w in widths]
        payload = result.get("payload", config.get("payload"))
        return {
            "experiment": self.experiment, "trial_id": trial.trial_id, "searcher": self.searcher, "run": self.run,
            "status": "error" if error else "ok", "error": error, "widths": widths,
            "keep_ratios": None if widths is None else [w / s for w, s in zip(widths, self.space_widths)],
            "finished_at": datetime.now(timezone.utc),
            "payload": payload if payload is None or isinstance(payload, str)
            else json.dumps(payload, sort_keys=True, default=_json_default),
        }


def load_metadata(exp_dir: str) -> dict:
    return ResultsStore(exp_dir).metadata()


def load(exp_dir: str) -> pa.Table:
    """All rows of an experiment (ordered by trial_id), with the group metadata on the schema; a column of rows
    written before it was renamed (RENAMED) is read under its new name."""
    store = ResultsStore(exp_dir)
    schema = _schema(store.metadata())
    paths = [f"{store.rows}/{trial_id}.parquet" for trial_id in store.trial_ids()]
    if not paths:
        return schema.empty_table()
    scan = pa.schema([*schema, *(pa.field(old, schema.field(new).type) for old, new in RENAMED.items())])
    table = ds.dataset(paths, schema=scan, format="parquet", filesystem=store.fs).to_table()
    for old, new in RENAMED.items():
        merged = pc.coalesce(table[new], table[old])
        table = table.set_column(schema.get_field_index(new), schema.field(new), merged).drop_columns([old])
    return table.sort_by("trial_id").replace_schema_metadata(schema.metadata)


def _column(table: pa.Table, name: str, what: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise ConfigError(f"unknown column {name!r} in {what}; columns: {', '.join(table.column_names)}")
    return table.column(name)


def pareto_front(table: pa.Table, maximize: str = "score", minimize: str = "flops_ratio") -> pa.Table:
    """The successful rows no other row beats on both columns, sorted by `minimize`."""
    for name in (maximize, minimize):
        _column(table, name, "pareto_front")
    ok = table.filter(pc.and_(pc.equal(table["status"], "ok"),
                              pc.and_(pc.is_valid(table[maximize]), pc.is_valid(table[minimize]))))
    ok = ok.sort_by([(minimize, "ascending"), (maximize, "descending")])
    keep, best, best_low = [], -math.inf, None
    for i, (low, high) in enumerate(zip(ok[minimize].to_pylist(), ok[maximize].to_pylist())):
        if high > best or (high == best and low == best_low):  # equal points do not dominate each other
            keep.append(i)
            best, best_low = high, low
    return ok.take(keep)


def cost_ratio_of(row: dict) -> float:
    """A row's ratio of the experiment's constraint (rows older than the cost_ratio column: FLOPs)."""
    value = row.get("cost_ratio")
    return row["flops_ratio"] if value is None else value


def ranked(table: pa.Table, budget: float | None = None, *, distinct: bool = True) -> list[dict]:
    """The one ranking rule: successful rows within `budget` (a ratio of the experiment's constraint; None: all),
    best first.

    Rows scored with more fine-tune steps come first (a promotion scheduler or a re-scoring stage gives the
    most promising rows a longer fine-tune, and a longer fine-tune scores higher, so scores compare like with
    like), then the higher score, then the cheaper profile. With `distinct`, each width profile appears once
    (its best row). `choose_trial`, the CLI's listing, the latency timing of the best rows, the report and
    the bench all rank rows with this.
    """
    rows = [r for r in table.to_pylist() if r["status"] == "ok" and r["score"] is not None
            and math.isfinite(r["score"]) and (budget is None or cost_ratio_of(r) <= budget + 1e-9)]
    rows.sort(key=lambda r: (-(r["steps_reached"] or 0), -r["score"], cost_ratio_of(r)))
    if not distinct:
        return rows
    seen, out = set(), []
    for row in rows:
        key = tuple(row["widths"] or ())
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def ranked_table(table: pa.Table, budget: float | None = None, limit: int | None = None) -> pa.Table:
    """`ranked` (distinct profiles) as a table of the same schema, at most `limit` rows."""
    return pa.Table.from_pylist(ranked(table, budget)[:limit], schema=table.schema)


def budget_of(meta: dict) -> float | None:
    """An experiment's budget (a ratio of its constraint) from its metadata, or None for a Pareto search."""
    config = meta.get("config", {})
    return None if config.get("pareto") else config.get("budget")


def choose_trial(table: pa.Table, trial: str | None = None, *, budget: float | None = None,
                 constraint: str = "flops") -> dict:
    """The row of `trial`; else the best successful row within `budget` (`ranked`: the highest fidelity reached,
    then the best score, ties going to the cheaper profile).

    `budget=None` (a Pareto search without a chosen bound) is refused: there is no single best.
    """
    if trial is not None:
        match = [r for r in table.to_pylist() if r["trial_id"] == trial]
        if not match:
            raise WidthSearchError(f"no trial {trial!r} in this experiment")
        if match[0]["status"] != "ok":
            raise WidthSearchError(f"trial {trial!r} did not score a profile (status {match[0]['status']}"
                                   f"{': ' + match[0]['error'] if match[0]['error'] else ''}); pick another")
        return match[0]
    ok = ranked(table)
    if not ok:
        raise WidthSearchError("this experiment has no successful trial yet")
    if budget is None:
        raise WidthSearchError("this experiment searched a Pareto front, so it has no single best: give --budget R "
                               f"(the best row whose {constraint} ratio is <= R) or --trial ID; "
                               "`widthsearch results EXP --pareto` lists the front")
    within = ranked(table, budget)
    if not within:
        smallest = min(cost_ratio_of(r) for r in ok)
        raise WidthSearchError(f"no successful trial within the budget {budget:g} ({constraint}): {len(ok)} ok rows, "
                               f"the smallest ratio is {smallest:.4f}; give --trial ID or a larger --budget")
    return within[0]


def chosen_channels(row: Mapping) -> dict:
    """keep/weights of a row whose searcher chose the channels itself (its payload has "keep"); else {}."""
    payload = json.loads(row["payload"]) if row.get("payload") else {}
    if not isinstance(payload, dict) or "keep" not in payload:
        return {}
    return {"keep": payload["keep"], "weights": row.get("checkpoint")}


def _where(table: pa.Table, item: str) -> pa.ChunkedArray:
    """A boolean mask for one filter such as 'val_acc>=0.9' or 'status=ok'."""
    match = _WHERE.match(item)
    if not match:
        raise ConfigError(f"bad filter {item!r}; expected COLUMN OP VALUE with OP one of = == != < <= > >=")
    name, op, text = match.groups()
    column = _column(table, name, f"filter {item!r}")
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"filter {item!r}: column {name!r} is numeric, {text!r} is not a number") from None
    elif pa.types.is_string(column.type):
        value = text
    else:
        raise ConfigError(f"filter {item!r}: cannot compare column {name!r} of type {column.type}")
    return _OPS[op](column, value)


def query(table: pa.Table, *, pareto: bool = False, max_flops: float | None = None, where: Sequence[str] = (),
          sort: str | None = None, limit: int | None = None) -> pa.Table:
    """Filter (Pareto front, flops_ratio <= max_flops, `where` filters), sort and limit.

    `sort` is 'col' or '-col' (descending), or several of them comma-separated; default '-score'.
    """
    if pareto:
        table = pareto_front(table)
    if max_flops is not None:
        table = table.filter(pc.less_equal(table["flops_ratio"], max_flops))
    for item in where:
        table = table.filter(_where(table, item))
    keys = []
    for key in (sort or "-score").split(","):
        name = key.strip().lstrip("-")
        _column(table, name, f"sort {sort!r}")
        keys.append((name, "descending" if key.strip().startswith("-") else "ascending"))
    table = table.sort_by(keys)
    if limit is not None:
        if limit < 0:
            raise ConfigError(f"limit must be zero or more, got {limit}")
        table = table.slice(0, limit)
    return table


SQL_TABLE = "results"


def sql_query(table: pa.Table, sql: str) -> pa.Table:
    """Run a DuckDB SQL query over `table` (registered as the view `results`) and return its answer.

    DuckDB is the optional extra `sql`. The table is read first (through pyarrow.fs, see `load`), so
    the same query works for local and URI storage.
    """
    try:
        import duckdb
    except ImportError:
        raise WidthSearchError("--sql needs DuckDB: pip install 'widthsearch[sql]'") from None
    con = duckdb.connect()
    try:
        statements = con.extract_statements(sql)
        if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
            raise ConfigError(f"--sql takes one query that returns rows, such as SELECT ... FROM {SQL_TABLE}; "
                              f"got {sql!r}")
        con.register(SQL_TABLE, table)
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        raise ConfigError(f"--sql query failed: {exc}") from None
    finally:
        con.close()


def cell_text(value) -> str:
    """A table cell: "-" for null, floats to 4 decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _widths_preview(widths: list | None, shown: int = 6) -> str:
    if widths is None:
        return "-"
    head = ",".join(map(str, widths[:shown]))
    return f"[{head},...] ({len(widths)})" if len(widths) > shown else f"[{head}]"


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


def _plain(table: pa.Table) -> str:
    """Aligned text columns, numbers right-aligned, lists previewed: of a whole results table, the readable
    subset (and latency_ms where rows have it) plus widths; of any other table (e.g. an SQL answer), every
    column."""
    header = table.column_names
    if sorted(header) == sorted(SCHEMA.names):
        header = [*_TABLE_COLUMNS, "widths"]
        if table["latency_ms"].null_count < table.num_rows:
            header.insert(header.index("flops_ratio") + 1, "latency_ms")
    rows = [[_widths_preview(r[n]) if isinstance(r[n], list) else cell_text(r[n]) for n in header]
            for r in table.to_pylist()]
    sizes = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    numeric = [n in table.column_names and _is_number(table.schema.field(n).type) for n in header]
    lines = ["  ".join(c.rjust(s) if num else c.ljust(s) for c, s, num in zip(line, sizes, numeric)).rstrip()
             for line in [header, *rows]]
    return "\n".join(lines)


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value)
    return value.isoformat() if isinstance(value, datetime) else str(value)


def format_table(table: pa.Table, fmt: str = "table") -> str | bytes:
    """Render rows as aligned text, CSV, JSON (a list of records) or Parquet bytes."""
    if fmt == "table":
        return _plain(table)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(table.column_names)
        for record in table.to_pylist():
            writer.writerow([_csv_value(v) for v in record.values()])
        return out.getvalue()
    if fmt == "json":
        return json.dumps(table.to_pylist(), default=_json_default, indent=1)
    if fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()
    raise ConfigError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")
