"""The driver-side Ray Tune callbacks of the application's runs: `ResultsCallback` writes each trial's row to the
results store, `TrialProgress` and `EpochProgress` draw the one progress bar of a command."""

from __future__ import annotations

import json
import math
import os
import re
import time
from datetime import datetime, timezone

from ray import tune

from ..results import MAIN_RUN, ResultsStore, json_default, load
from ..training import Progress

ERROR_CHARS = 2000  # of a failed trial's error, in its row


def _error_text(text: str) -> str:
    """The exception line(s) of the latest failure in a Tune error file or traceback, at most 2000 chars."""
    lines = re.split(r"^Failure # \d+.*$", text, flags=re.M)[-1].strip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith("File ")]
    if frames:
        tail = lines[frames[-1] + 1:]
        start = next((i for i, line in enumerate(tail) if not line.startswith(" ")), len(tail))
        lines = tail[start:] or lines
    return "\n".join(lines).strip()[:ERROR_CHARS]


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
            else json.dumps(payload, sort_keys=True, default=json_default),
        }


class TrialProgress(tune.Callback):
    """The progress bar of a search (or a follow-up run): trials done of `total` (`done` of them by earlier runs of
    the experiment), failed ones counted, the best score so far within `budget` (None: any), and tqdm's ETA."""

    def __init__(self, total: int, label: str, *, done: int = 0, budget: float | None = None, enabled: bool = True):
        self.bar = Progress(max(total, done), label, enabled=enabled, initial=done, unit="trial")
        self.done, self.failed, self.budget, self.best = done, 0, budget, -math.inf

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        score, cost = result.get("score"), result.get("cost_ratio")
        if result.get("status", "ok") == "ok" and score is not None and math.isfinite(score) and (
                self.budget is None or (cost is not None and cost <= self.budget + 1e-9)):
            self.best = max(self.best, score)
        self._step()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.failed += 1
        self._step()

    def on_experiment_end(self, trials: list, **info) -> None:
        self.bar.close()

    def _step(self) -> None:
        self.done += 1
        parts = [f"best {self.best:.4f}" if self.best > -math.inf else "", f"{self.failed} failed" if self.failed else ""]
        self.bar.update(self.done, ", ".join(p for p in parts if p))


class EpochProgress(tune.Callback):
    """The progress bar of a retrain: epochs done of `total`, with the validation accuracy of the last one."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.bar = Progress(total, label, enabled=enabled, unit="epoch")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if "epoch" in result:
            self.bar.update(int(result["epoch"]), f"val acc {result['val_acc']:.4f}" if "val_acc" in result else "")

    def on_experiment_end(self, trials: list, **info) -> None:
        self.bar.close()
