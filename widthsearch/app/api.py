"""The Python API: one object, `Search`, with the whole workflow of an experiment, used alike by a notebook, the
`widthsearch` command line and the bench.

    import widthsearch as ws
    run = ws.Search(name="demo", storage="runs", model="small_cnn", data="digits", budget=0.5, num_samples=16)
    run.fit()                                   # Ray started and shut down by it (or joined: address=...)
    table = run.results()                       # pyarrow.Table, one row per trial; run.sql("SELECT ...")
    best = run.best()                           # the best row within the budget (results.ranked)
    model, metrics = run.retrain(best, epochs=30)
    run.export(model, "best-export")            # weights, TorchScript, ONNX, metadata, latency

`ws.load_search("runs/demo")` opens an existing experiment (to query it, retrain from it, or continue or extend its
search with `fit()`), as Optuna's `load_study` or Ray Tune's `Tuner.restore` do. Opening one and querying it loads
neither torch nor Ray.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from .. import results
from ..errors import ConfigError, WidthSearchError
from ..storage import check_writable, upload_folder
from .config import SearchConfig, absolute, experiment_dir, load_config

if TYPE_CHECKING:
    from torch import nn

    from .experiment import Experiment


class Search:
    """An experiment: its settings, its search (`fit`), its results table and what follows from it (`best`,
    `front`, `retrain`, `export`, `report`). Everything it writes is under `path` (STORAGE/NAME)."""

    def __init__(self, config: SearchConfig | Mapping[str, Any] | str | os.PathLike | None = None, /,
                 **settings: Any):
        """A new experiment from `config` (a SearchConfig, a mapping of its keys or a YAML file) and keyword
        `settings` (any SearchConfig key: name, storage, model, data, searcher, budget, num_samples, ...; they
        override `config`). Every setting is checked now, before any data is read or model trained; the name
        defaults to MODEL-SEARCHER-TIMESTAMP, and an experiment of that name must not exist yet (`load_search`
        opens one)."""
        if isinstance(config, SearchConfig):
            cfg = load_config(None, {**config.to_dict(), **settings})
        elif isinstance(config, Mapping):
            cfg = load_config(None, {**config, **settings})
        else:
            cfg = load_config(config, settings)
        self._start(cfg.resolved(), resume=False)
        if results.ResultsStore(self.path).exists():
            raise ConfigError(f"experiment {self.config.name!r} already exists in {self.config.storage}; pass --resume "
                              "(Python: widthsearch.load_search(PATH)) to continue it or choose another --name")

    def _start(self, cfg: SearchConfig, resume: bool) -> None:
        self.config = cfg
        self._resume = resume                     # fit() continues the stored search
        self._experiment: Experiment | None = None
        self._metrics: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()

    @classmethod
    def _stored(cls, path: str, address: str | None) -> Search:
        """The experiment at `path`, its stored settings, joining `address` (default: the stored one)."""
        path = absolute(path).rstrip("/")
        stored = results.load_metadata(path).get("config", {})
        storage, _, name = path.rpartition("/")
        run = cls.__new__(cls)
        run._start(SearchConfig.stored({**stored, "storage": storage, "name": name,
                                        "address": address or stored.get("address")}), resume=True)
        return run

    def __repr__(self) -> str:
        return f"Search({self.path!r})"

    @property
    def path(self) -> str:
        """The experiment's folder (or URI): STORAGE/NAME."""
        return experiment_dir(self.config.storage, self.config.name)

    @property
    def budget(self) -> float | None:
        """The budget `best` applies by default: the experiment's, a ratio of its constraint (a max_latency_ms
        bound as the ratio it became); None for a Pareto search."""
        if results.ResultsStore(self.path).exists():
            return results.budget_of(results.load_metadata(self.path))
        return None if self.config.pareto else self.config.budget

    def fit(self, progress: bool = True, *, verbose: bool = False, num_samples: int | None = None,
            concurrency: int | None = None, address: str | None = None) -> pa.Table:
        """Run the search (a stored one: continue it), its re-scoring stage and, under a latency constraint, the
        timing of its best profiles; return the results table. Starts a local Ray and shuts it down after, or joins
        the cluster at `address` (or RAY_ADDRESS), or uses the Ray already running in this process.

        `progress` draws one progress bar per stage (trials done of all, the best score so far, the time left);
        `verbose` shows Ray's, Tune's and Optuna's own console output too. `num_samples` above the stored one
        extends a stored search: only the missing trials run, as a new part of it that continues the searcher's
        state (searchers that can go on: `extendable`); `concurrency` changes how many trials run at once, `address`
        the Ray cluster joined. Each is recorded in the experiment's metadata (its config, and `resumed`). The storage is checked writable before any data is read
        or model trained. Ctrl-C or SIGTERM stops the search after Tune saved its state: `tuning.Interrupted`
        (a KeyboardInterrupt), and a later `fit()` of `load_search(path)` goes on.
        """
        from searchers import searcher_class

        from . import runs
        from .tuning import ray_session

        changed = self._change(num_samples=num_samples, concurrency=concurrency, address=address)
        if self._resume and "num_samples" in changed and not searcher_class(self.config.searcher).extendable:
            raise ConfigError(f"searcher {self.config.searcher!r} cannot be extended (it proposes a planned set of "
                              "trials, then stops); start a new experiment (another --name) for more trials")
        check_writable(self.config.storage)
        with ray_session(verbose):
            experiment = self._prepared(progress)
            resume, self._resume = self._resume, True  # from here on it exists: a second fit continues it
            return runs.search(experiment, resume=resume, progress=progress, changed=changed)

    def _change(self, **settings: Any) -> dict[str, list]:
        """Apply the given (not None) settings that may change between fits (config.RESUMABLE; num_samples only
        upwards for a stored search); return {key: [before, after]} of those that changed."""
        from .config import resume_changes

        given = {key: value for key, value in settings.items() if value is not None}
        given = resume_changes(self.config, given) if self._resume else given
        changed = {key: [getattr(self.config, key), value] for key, value in given.items()
                   if getattr(self.config, key) != value}
        if changed:
            self.config = dataclasses.replace(self.config, **given)  # checked again
            if self._experiment is not None:
                self._experiment = dataclasses.replace(self._experiment, config=self.config)
        return changed

    def results(self) -> pa.Table:
        """The results table: one row per trial (README: Results lists the columns)."""
        return results.load(self.path)

    def sql(self, query: str) -> pa.Table:
        """A DuckDB query over the results table, registered as the view `results` (the extra `sql`)."""
        return results.sql_query(self.results(), query)

    def best(self, budget: float | None = None, *, trial: str | None = None) -> dict:
        """The best row within `budget` (default: the experiment's) by the one ranking rule, `results.ranked`:
        the longest fine-tune reached, then the highest score, then the cheaper profile. With `trial`, that
        trial's row. A Pareto search has no budget: give one."""
        budget = self.budget if budget is None else budget
        return results.choose_trial(self.results(), trial, budget=budget, constraint=self.config.constraint)

    def front(self) -> pa.Table:
        """The successful rows no other row beats on both score and cost ratio (the constraint's), cheapest first."""
        table = self.results()
        ok = table.filter(pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["score"])))
        return results.pareto_front(ok, minimize="cost_ratio")

    def retrain(self, row: Mapping | str | None = None, *, epochs: int = 30, lr: float = 0.05,
                from_scratch: bool = False, budget: float | None = None, cpus: float | None = None,
                gpus: float | None = None, timeout_s: float | None = None, progress: bool = True,
                verbose: bool = False) -> tuple[nn.Module, dict]:
        """Retrain a profile for `epochs` (cosine schedule from `lr`) as a Ray Tune trial that resumes from its last
        epoch, and report its test accuracy: `row` (a row of the table, or a trial id; default: `best(budget)`),
        from the base weights (its searcher's channels where it chose them) or `from_scratch`. Returns the model
        (CPU, eval mode) and its figures, the base model's and this retrain's recipes among them. `cpus`/`gpus`
        default to the search's per-trial resources; it runs on a local Ray or the experiment's cluster (its
        `address`). `progress` draws a bar of the epochs; `verbose` shows Ray's and Tune's own output."""
        from . import runs
        from .tuning import ray_session

        if epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {epochs}")
        if row is None or isinstance(row, str):
            row = self.best(budget, trial=row)
        check_writable(self.config.storage)
        with ray_session(verbose):
            model, metrics = runs.retrain(self._prepared(progress), dict(row), epochs=epochs, lr=lr,
                                          from_scratch=from_scratch, cpus=cpus, gpus=gpus, timeout_s=timeout_s,
                                          progress=progress)
        self._metrics[model] = metrics
        return model, metrics

    def export_dir(self, row: Mapping, epochs: int, from_scratch: bool = False) -> str:
        """Where `export` puts a retrained profile by default: EXP/exports/TRIAL-eEPOCHS (-scratch)."""
        return f"{self.path}/exports/{row['trial_id']}-e{epochs}" + ("-scratch" if from_scratch else "")

    def export(self, model: nn.Module, out: str | os.PathLike | None = None, metrics: Mapping | None = None) -> str:
        """Write `model` (a pruned copy of the experiment's base model) to the new folder `out` (a local path or a
        URI; default: `export_dir` of the retrain that made it) and return where: weights.pt, profile.json,
        model.json, metrics.json (`metrics`, default: those `retrain` returned with this model), latency.json,
        preprocessing.json (how to feed the model: input shape, mean, std, channel order, class names; also in the
        ONNX model's metadata), model.torchscript.pt and model.onnx (checked in ONNX Runtime).
        `widthsearch.load_exported` reads it back."""
        from ..export import check_export_folder, export
        from ..space import build_space
        from .tuning import ray_session

        metrics = dict(self._metrics.get(model, {}) if metrics is None else metrics)
        if out is None:
            if "trial_id" not in metrics:
                raise WidthSearchError("export needs `out` for a model that retrain() did not return")
            out = self.export_dir(metrics, metrics["epochs"], metrics.get("from_scratch", False))
        out = str(out)
        check_export_folder(out)
        with ray_session():  # preparing may measure latency on the experiment's cluster
            exp = self._prepared(progress=False)
        cfg = exp.config
        pruned = build_space(model.cpu().eval(), exp.data.example_input, cfg.frozen)
        if pruned.names != exp.space.names:
            raise WidthSearchError(f"the model is not a pruned copy of experiment {cfg.name!r}'s base model (its "
                                   f"channel groups differ: {pruned.names[:3]}... vs {exp.space.names[:3]}...)")
        source = {"model": cfg.model, "num_classes": exp.data.num_classes, "in_channels": exp.data.in_channels,
                  "input_size": list(exp.data.image_size), "frozen": cfg.frozen, "min_width": cfg.min_width,
                  "divisor": cfg.divisor}
        fields = dict(profile=dict(zip(pruned.names, pruned.widths.tolist())), source=source, metrics=metrics,
                      example_input=exp.data.example_input, check_input=exp.data.normalize(exp.data.val.x[:64]),
                      preprocessing=exp.data.preprocessing())
        if "://" not in out:
            return str(export(model, exp.model, out, **fields))
        with tempfile.TemporaryDirectory() as tmp:  # a URI: written here, then copied through pyarrow.fs
            upload_folder(export(model, exp.model, Path(tmp) / "export", **fields), out)
        return out

    def report(self, out: str | os.PathLike | None = None, top: int = 3) -> list[str]:
        """Write the report (pareto.png, profiles.png, index.html; latency.png under a latency constraint) to `out`
        (default NAME-report) and return the paths: the `top` best rows by `results.ranked`."""
        from ..report import write_report

        return write_report(self.path, str(out or f"{self.config.name}-report"), top=top)

    def _prepared(self, progress: bool) -> Experiment:
        """The experiment's data, base model, width space and measure, loaded (or trained) once."""
        if self._experiment is None:
            from .experiment import prepare

            self._experiment = prepare(self.config.check(), progress)
        return self._experiment


def load_search(path: str | os.PathLike, *, address: str | None = None) -> Search:
    """The experiment stored at `path` (STORAGE/NAME, a folder or a URI) with its stored settings: query it,
    retrain from it, or continue or extend its search with `fit()` (joining `address`, default: the stored one)."""
    return Search._stored(str(path), address)

