"""The results store: one Parquet row per finished or failed trial, written atomically by one driver-side callback
(`widthsearch.app.callbacks.ResultsCallback`); queries over it (the one ranking rule, fronts, costs, DuckDB SQL) and
its text formats. Loads neither torch nor Ray.

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
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from importlib import metadata as importlib_metadata

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

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
    ("measured_ms", pa.float64()), ("measured_ratio", pa.float64()),
])
# The Tune runs of an experiment, by stage: the search itself, then its follow-up runs (re-scoring), each adding rows
# under its name (`run`). A search extended with more trials adds a part: its runs are named STAGE-2, STAGE-3, ...
MAIN_RUN = "search"
RESCORE_RUN = "rescore"
# Columns renamed since: their name in rows written before -> their name now (`load` reads both).
RENAMED = {"finetune_steps": "steps_reached"}
FORMATS = ("table", "csv", "json", "parquet")
_TABLE_COLUMNS = ("trial_id", "searcher", "status", "flops_ratio", "params", "val_acc", "score", "steps_reached",
                  "wall_s")
COSTS = ("flops", "params", "latency")  # what --max and --pareto compare: a fraction of the base model's


def json_default(value):
    """The `default` of json.dumps for results and payloads: Datetimes -> ISO text, decimals and numpy scalars and arrays -> Python, dataclasses and other mappings (a
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
                                 b"widthsearch.widths": json.dumps(meta.get("widths", []), default=json_default)})


class ResultsStore(Storage):
    """Experiment metadata and per-trial rows under EXP_DIR/widthsearch; one writer."""

    def __init__(self, exp_dir: str):
        super().__init__(exp_dir)
        self.rows = f"{self.root}/rows"
        self.orphans = f"{self.root}/orphaned_rows"
        self.meta_path = f"{self.root}/experiment.json"

    @classmethod
    def create(cls, exp_dir: str, metadata: dict, resume: bool = False,
               changed: Mapping[str, Sequence] | None = None) -> ResultsStore:
        """Write experiment.json; an existing experiment is an error unless resuming. A resume keeps created_at and
        adds an entry to `resumed`: when, and the settings it changed ({key: [stored, new]})."""
        store = cls(exp_dir)
        now = datetime.now(timezone.utc).isoformat()
        meta = {**metadata, "created_at": now, "version": _version()}
        if store.exists():
            if not resume:
                raise ConfigError(f"experiment {metadata.get('experiment', exp_dir)!r} already exists at {exp_dir}; "
                                  "pass --resume to continue it or choose another --name")
            before = store.metadata()
            meta["created_at"] = before.get("created_at", now)
            meta["resumed"] = [*before.get("resumed", []), {"at": now, "changed": dict(changed or {})}]
        store.fs.create_dir(store.rows, recursive=True)
        write_atomic(store.meta_path, json.dumps(meta, indent=1, default=json_default).encode(), store.fs)
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


def run_name(stage: str, part: int) -> str:
    """The name of a stage's Tune run (and its rows' `run`) in part `part` of a search (1: the first)."""
    return stage if part == 1 else f"{stage}-{part}"


def of_stage(table: pa.Table, stage: str) -> pa.Table:
    """The rows a stage's runs made, in any part of the search (rows without a run: the search's)."""
    runs = pc.fill_null(table["run"], MAIN_RUN)
    return table.filter(pc.or_(pc.equal(runs, stage), pc.starts_with(runs, f"{stage}-")))


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
    return ok.take(pa.array(keep, pa.int64()))


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


def cost_of(table: pa.Table, cost: str, meta: Mapping) -> pa.ChunkedArray:
    """Every row's `cost` (one of COSTS; or "cost", the experiment's constraint) as a fraction of the base model's:
    flops_ratio, params / base params, predicted latency_ms / the base model's (a latency experiment only)."""
    if cost == "cost":
        return pc.coalesce(table["cost_ratio"], table["flops_ratio"])
    if cost == "flops":
        return table["flops_ratio"]
    if cost == "params":
        return pc.divide(pc.cast(table["params"], pa.float64()), float(meta["base_params"]))
    if cost == "latency" and meta.get("latency"):
        return pc.divide(table["latency_ms"], float(meta["latency"]["base_ms"]))
    if cost == "latency":
        raise ConfigError("latency: this experiment has no latency model (search it with --constraint latency)")
    raise ConfigError(f"unknown cost {cost!r}; expected one of: {', '.join(COSTS)}")


def query(table: pa.Table, meta: Mapping, *, pareto: str | None = None, max: Mapping[str, float] | None = None,
          where: Sequence[str] = (), sort: str | None = None, limit: int | None = None) -> pa.Table:
    """Filter, sort and limit the rows of an experiment (its metadata `meta`): the Pareto front of score against a
    cost (`pareto`: one of COSTS, or "cost", the experiment's constraint), rows whose costs are at most the given
    fractions of the base model's (`max`: {cost: ratio}), rows that satisfy every `where` condition (a DuckDB SQL
    expression over the columns, e.g. "val_acc >= 0.9" or "status = 'ok'"; the extra `sql`).

    `sort` is 'col' or '-col' (descending), or several of them comma-separated; default '-score'.
    """
    if pareto is not None:
        table = pareto_front(table.append_column("_cost", cost_of(table, pareto, meta)), minimize="_cost")
        table = table.drop_columns(["_cost"])
    for cost, ratio in (max or {}).items():
        table = table.filter(pc.less_equal(cost_of(table, cost, meta), ratio))
    if where:
        condition = " AND ".join(f"({item})" for item in where)
        table = sql_query(table, f"SELECT * FROM {SQL_TABLE} WHERE {condition}", "--where").replace_schema_metadata(
            table.schema.metadata)
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


def sql_query(table: pa.Table, sql: str, flag: str = "--sql") -> pa.Table:
    """Run a DuckDB SQL query over `table` (registered as the view `results`) and return its answer; errors name
    `flag` (the option that gave the query).

    DuckDB is the optional extra `sql`. The table is read first (through pyarrow.fs, see `load`), so
    the same query works for local and URI storage.
    """
    try:
        import duckdb
    except ImportError:
        raise WidthSearchError(f"{flag} needs DuckDB: pip install 'widthsearch[sql]'") from None
    con = duckdb.connect()
    try:
        statements = con.extract_statements(sql)
        if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
            raise ConfigError(f"{flag} takes one query that returns rows, such as SELECT ... FROM {SQL_TABLE}; "
                              f"got {sql!r}")
        con.register(SQL_TABLE, table)
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        hint = " (a --where condition is SQL: quote text, e.g. status = 'ok')" if flag == "--where" else ""
        raise ConfigError(f"{flag} query failed: {exc}{hint}") from None
    finally:
        con.close()


def cell_text(value) -> str:
    """A table cell: "-" for null, floats to 4 decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _widths_preview(widths: list | None, names: Sequence[str] = (), shown: int = 6) -> str:
    """A width profile in a table cell: NAME=WIDTH per group when the group names are known, else [W,...]; the
    first `shown` groups of a longer one."""
    if widths is None:
        return "-"
    if len(names) == len(widths):
        head = " ".join(f"{n}={w}" for n, w in zip(names[:shown], widths))
        return f"{head} ... ({len(widths)} groups)" if len(widths) > shown else head
    head = ",".join(map(str, widths[:shown]))
    return f"[{head},...] ({len(widths)})" if len(widths) > shown else f"[{head}]"


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


def _plain(table: pa.Table) -> str:
    """Aligned text columns, numbers right-aligned, lists previewed: of a whole results table, the readable
    subset (and the predicted latency_ms, the measured_ms, where rows have them) plus the widths by group name (from
    the schema's metadata); of any other table (e.g. an SQL answer), every column."""
    header = table.column_names
    if sorted(header) == sorted(SCHEMA.names):
        header = [*_TABLE_COLUMNS, "widths"]
        for name in ("measured_ms", "latency_ms"):
            if table[name].null_count < table.num_rows:
                header.insert(header.index("flops_ratio") + 1, name)
    names = json.loads((table.schema.metadata or {}).get(b"widthsearch.groups", b"[]"))
    rows = [[_widths_preview(r[n], names if n == "widths" else ()) if isinstance(r[n], list) else cell_text(r[n])
             for n in header] for r in table.to_pylist()]
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
        return json.dumps(table.to_pylist(), default=json_default, indent=1)
    if fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()
    raise ConfigError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")
