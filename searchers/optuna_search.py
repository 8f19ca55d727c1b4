"""Optuna-driven width search (``optuna``): TPE in budget mode, NSGA-II in Pareto mode.

Sources: Tree-structured Parzen Estimator (Bergstra et al., 2011; multivariate TPE of
Falkner et al., 2018, as implemented in Optuna, Akiba et al., 2019); NSGA-II (Deb et al.,
2002). The study is driven with Optuna's ask/tell interface, like Ray Tune's OptunaSearch,
with a define-by-run space of one keep ratio per group (params ``r0``, ``r1``, ... by group
index; the group names are kept in the study's user attrs).

Deviations: in budget mode the sampled ratios are *repaired* with ``project_to_budget``
(the largest feasible scale of the ratio vector), so an infeasible profile is never
evaluated; the study is told the repaired profile's score for the sampled parameters
(Baldwinian repair). Proposals that repair to an already-scored profile are answered from
the history without a Tune trial (up to ``max_cached`` times in a row).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from .base import WidthSearcher
from .options import Option

SAMPLERS = ("tpe", "nsga2", "random")


class OptunaWidthSearcher(WidthSearcher):
    """Optuna study over per-group keep ratios (TPE: Bergstra et al. 2011; NSGA-II: Deb et al. 2002).

    Budget mode: ``TPESampler(seed, multivariate=True, n_startup_trials=startup_trials)`` by
    default (option ``sampler``: "tpe" | "nsga2" | "random"), one objective (the metric, in
    the searcher's mode); every sampled ratio vector is repaired by ``project_to_budget`` so
    the budget holds for every suggestion. Pareto mode (``budget=None``): ``NSGAIISampler(seed)``
    by default with two objectives, the metric (in the searcher's mode) and the FLOPs ratio
    (minimised; the measure's ratio of the profile), without repair.
    Errored trials and trials without a finite metric are told as FAIL.
    """

    name = "optuna"
    OPTIONS = {"sampler": Option(None, str, "tpe, nsga2 or random (default: tpe; nsga2 with --pareto)",
                                 choices=SAMPLERS, optional=True),
               "startup_trials": Option(10, int, "random trials before TPE models the results", low=0),
               "population_size": Option(50, int, "NSGA-II population", low=2),
               "max_cached": Option(20, int, "repaired repeats answered from the history in a row", low=0)}

    def __init__(self, space, cost, **kwargs):
        super().__init__(space, cost, **kwargs)
        sampler = self.options["sampler"] or ("nsga2" if self.pareto else "tpe")
        self.options = {**self.options, "sampler": sampler}
        self._trials: dict[str, int] = {}        # Tune trial_id -> optuna trial number
        self._scores: dict[tuple[int, ...], Any] = {}  # profile -> values told (for repeated profiles)
        self.study = self._create_study()

    # -- study --------------------------------------------------------------------------
    def _make_sampler(self) -> optuna.samplers.BaseSampler:
        kind = self.options["sampler"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if kind == "tpe":
                return optuna.samplers.TPESampler(seed=self.seed, multivariate=True,
                                                  n_startup_trials=int(self.options["startup_trials"]))
            if kind == "nsga2":
                return optuna.samplers.NSGAIISampler(seed=self.seed,
                                                     population_size=int(self.options["population_size"]))
            return optuna.samplers.RandomSampler(seed=self.seed)

    def _directions(self) -> list[str]:
        main = "maximize" if self.mode == "max" else "minimize"
        return [main, "minimize"] if self.pareto else [main]

    def _create_study(self) -> optuna.Study:
        study = optuna.create_study(sampler=self._make_sampler(), directions=self._directions())
        study.set_user_attr("groups", list(self.space.names))
        study.set_user_attr("searcher", self.name)
        study.set_user_attr("budget", self.budget)
        return study

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        ok = super().set_search_properties(metric, mode, config, **spec)
        if ok and [d.name.lower() for d in self.study.directions] != self._directions():
            if self.study.trials:
                return False
            self.study = self._create_study()
        return ok

    # -- proposals ----------------------------------------------------------------------
    def _ask(self) -> tuple[optuna.Trial, np.ndarray]:
        trial = self.study.ask()
        ratios = np.array([trial.suggest_float(f"r{i}", float(low), 1.0)
                           for i, low in enumerate(self.min_ratios)])
        if self.pareto:
            widths = np.array([g.round(r * g.width) for g, r in zip(self.space.groups, ratios)], dtype=np.int64)
        else:
            widths = self.project(ratios)
        trial.set_user_attr("widths", [int(w) for w in widths])
        return trial, widths

    def _propose(self, trial_id):
        for _ in range(int(self.options["max_cached"]) + 1):
            trial, widths = self._ask()
            known = self._scores.get(tuple(int(w) for w in widths))
            if known is None:
                break
            self.study.tell(trial, known)  # already scored: answer without a Tune trial
        trial.set_user_attr("trial_id", trial_id)
        self._trials[trial_id] = trial.number
        return widths, {"optuna_trial": trial.number}

    def _observe(self, trial_id, widths, result, error, value, cost_ratio):
        number = self._trials.pop(trial_id, None)
        if number is None:
            return
        if error or value is None:
            self.study.tell(number, state=TrialState.FAIL)
            return
        values: Any = [value, cost_ratio] if self.pareto else value
        if self.pareto and not math.isfinite(cost_ratio):
            self.study.tell(number, state=TrialState.FAIL)
            return
        self.study.tell(number, values)
        self._scores[tuple(int(w) for w in widths)] = values
