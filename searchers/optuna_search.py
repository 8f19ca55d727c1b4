"""Optuna-driven width search (``optuna``): TPE in budget mode, NSGA-II in Pareto mode.

Sources: Tree-structured Parzen Estimator (Bergstra et al., 2011; multivariate TPE of
Falkner et al., 2018, as implemented in Optuna, Akiba et al., 2019); NSGA-II (Deb et al.,
2002). The study is driven with Optuna's ask/tell interface, like Ray Tune's OptunaSearch.

Search space (option ``parameterization``):

* ``group``: one keep ratio per channel group (params ``r0``, ``r1``, ... by group index).
* ``stage``: one keep ratio per *stage*, i.e. per class of groups with the same full width and the
  same kind (a *stream* group couples several producing layers, like a residual stream; an *inner*
  group is one layer's output): 6 parameters for any CIFAR ResNet instead of 12 to 54.
* ``depth``: a smooth depth profile: per kind, ``knots`` keep ratios at evenly spaced depths
  (the group's first layer's position in the model, 0..1), linearly interpolated.

The low-dimensional spaces let TPE model the results with the few trials a search can afford.

Sizing from the trial count (``num_samples``): TPE's random start-up trials default to a quarter
of the trials (at least the warm-start trials, at most 10), NSGA-II's population to a quarter
(4 to 50), so that the model-guided part is most of a small search. Measured against random start-up trials
on top of the warm starts (bench row optuna-startup7: 3 warm + 4 random before TPE at 16 trials, instead of 3 warm
+ 1 random; 3 search seeds per cell, mean retrained validation accuracy, 2026-12-06): cifar_resnet20 FLOPs 0.1
0.637 vs 0.641, cifar_vgg16 0.02 0.546 vs 0.540: not better, so the warm starts still count as start-up trials.

Warm start: the study first evaluates (enqueued trials) the uniform profile and the global-ranking profiles of the
experiment's criterion (normalisers mean and max) in budget mode, uniform profiles at three
ratios in Pareto mode. Option ``width_exponents`` (budget mode) adds one warm start per exponent a: keep ratios
proportional to (full width)^-a, scaled to the budget, so narrow groups keep a larger share than wide ones (a = 1:
every group as many channels). The axis comes from the bench: cifar_vgg16's best profiles at FLOPs 0.02 keep the
512-channel layers about 5x narrower than the 64-channel ones, relative to their full widths, which the stage
parameterization with ``spread`` 3 cannot express and which two of three searches never sampled in 16 trials.
Measured against no exponent warm starts (bench row optuna-widthexp: exponents 0.5 and 1, spread 3, 16 trials; 3
search seeds per cell, mean retrained validation accuracy, 2026-12-06): cifar_resnet20 FLOPs 0.1 0.641 vs 0.641,
cifar_resnet56 0.1 0.609 vs 0.607, cifar_vgg16 0.02 0.611 vs 0.540 (every search chose the exponent-0.5 warm start
there, test 0.616 against uniform's 0.545): the default since. TPE runs with ``constant_liar`` so concurrent trials
are not duplicates.

Synflow warm starts (option ``synflow_warm_starts`` K, budget mode, default 3 where the searcher has the model,
which the application always gives; 0 without it, since synflow scores a pruned copy of it): K more warm starts, the
K profiles of highest synaptic flow among ``synflow_pool`` random proposals from the study's own prior, each
projected to the budget; synflow (widthsearch.zero_cost) scores an architecture without training in milliseconds.
Source: the warm-up of Abdelfattah et al., "Zero-Cost Proxies for Lightweight NAS" (ICLR 2021), which seeds a search
with the best of a pool ranked by synflow. Deviation: the pool comes from this study's prior over keep ratios
instead of their search space's uniform sampling. Measured as a ranker of 24 pruned cifar_resnet20 profiles at FLOPs
0.1 (bench/fidelity.py, 2026-12-07): Spearman 0.55 with the 40-epoch retrain's test accuracy, where the 50-step
trial score had 0.27; at FLOPs 0.05 0.27, where every trained score ranked below 0. Measured as bench row
optuna-synflow (optuna-widthexp + 3 synflow warm starts of a pool of 32; cifar_resnet20 FLOPs 0.05, 3 search seeds x
3 retrains): mean retrained val 0.613 against 0.610, test 0.616 against 0.607 (uniform 0.619), worst seed 0.605
against 0.591, 3 s more driver CPU per search; at FLOPs 0.1 (10 search seeds) val 0.677 against 0.668, test 0.679
against 0.675 (uniform 0.667); cifar_resnet56 at FLOPs 0.02 val 0.540 against 0.524, test 0.551 against 0.535
(uniform 0.544); cifar_vgg16 at FLOPs 0.02 val 0.677 against 0.673, test 0.671 against 0.668 (uniform 0.650;
2026-12-07/08, 40-epoch retrain). Ahead of the row without them on every base and budget measured, on the mean and
on the worst search seed: the default since 2026-12-08 (bench rows optuna and optuna-widthexp pin K = 0).

Persistence: given the experiment (``exp_dir``), every trial the study is told is also recorded in an Optuna
journal study named after the experiment, EXP/widthsearch/optuna/study.journal (JournalStorage), which
``optuna.load_study(study_name=EXP, storage=JournalStorage(JournalFileBackend(PATH)))`` and
optuna-dashboard open; on object storage (s3://...) the journal is written beside the driver and copied
into the experiment after every trial. The sampler works on the in-memory study that Tune checkpoints with
the searcher (so a resumed search continues exactly where its snapshot was); the journal keeps each trial
once, also across resumes.

Spread (option ``spread``, budget mode, default 3): each parameter is sampled log-uniformly in [1/spread, 1]
instead of uniformly from its group's minimum ratio to 1, so no group is sampled more than ``spread`` times
narrower than another before the budget scales them all (a prior against profiles that starve one stage; halving
or doubling a share equally likely). Measured at FLOPs 0.1 and 0.05 (bench/RESULTS.md, optuna-spread3 against
the earlier unlimited sampling, 3 search seeds each, chosen on the retrained models' validation accuracy): equal
or better on cifar_resnet20 at 0.1 and cifar_vgg16 at 0.05, and at cifar_resnet20 0.05 it removed the search
seeds that starved a stage to one channel (worst seed 0.557 instead of 0.403 test). Warm-start profiles are
evaluated as given; the study records them at the closest parameters within these bounds.

Floor (option ``min_channels``, budget mode, default none): the budget projection keeps every group at or above
the narrower of ``min_channels`` and its width in the uniform profile at the budget (the floor profile costs no
more than the uniform one, so the budget can always be met), a prior against starved layers that, unlike
``spread``, leaves wide groups free to shrink far (cifar_vgg16's winning profiles keep the 512-channel layers 4x
narrower than the 64-channel ones, relative to their full widths). Measured as ``spread`` 8 with
``min_channels`` 8 against the default (bench row optuna-floor8, 3 search seeds per cell, mean retrained
validation accuracy, 2026-12-06): cifar_resnet20 0.1 0.640 vs 0.641, 0.05 0.569 vs 0.578; cifar_vgg16 0.05
0.641 vs 0.660, 0.02 0.545 vs 0.540: not better, so not the default. In those searches the 50-step score did rank
cifar_vgg16's early-wide profiles first where the search sampled them (seed 0 at 0.02: test 0.593 against
uniform's 0.545), but two of three searches never sampled one in 16 trials.

Deviations: in budget mode the sampled ratios are *repaired* with ``project_to_budget``
(the largest feasible scale of the ratio vector), so an infeasible profile is never
evaluated; the study is told the repaired profile's score for the sampled parameters
(Baldwinian repair). Proposals that repair to an already-scored profile are answered from
the history without a Tune trial (up to ``max_cached`` times in a row).
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pyarrow.fs as pafs
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from torch import nn

from widthsearch.storage import Storage, filesystem

from .base import WidthSearcher
from .options import SYNFLOW_WARM_STARTS


class OptunaWidthSearcher(WidthSearcher):
    """Optuna study over keep ratios (TPE: Bergstra et al. 2011; NSGA-II: Deb et al. 2002).

    Budget mode: ``TPESampler(seed, multivariate=True, constant_liar=True)`` by default (option
    ``sampler``: "tpe" | "nsga2" | "random"), one objective (the metric, in the searcher's mode);
    every sampled ratio vector is repaired by ``project_to_budget`` so the budget holds for every
    suggestion. Pareto mode (``budget=None``): ``NSGAIISampler(seed)`` by default with two
    objectives, the metric (in the searcher's mode) and the measure's ratio of the profile
    (minimised), without repair. Errored trials and trials without a finite metric are told as FAIL.
    """

    name = "optuna"
    extendable = True  # the study goes on where it stopped


    def __init__(self, space, cost, **kwargs):
        super().__init__(space, cost, **kwargs)
        sampler = self.options["sampler"] or ("nsga2" if self.pareto else "tpe")
        self._basis = _basis(space, self.model, self.options["parameterization"], self.options["knots"])
        self._floor = self._floor_widths()
        self._warm = self._warm_profiles() if self.options["warm_start"] else []
        trials = self.num_samples or 40
        startup = self.options["startup_trials"]
        if startup is None:
            startup = max(len(self._warm), min(10, max(2, math.ceil(trials / 4))))
        population = self.options["population_size"] or int(np.clip(trials // 4, 4, 50))
        self.options = {**self.options, "sampler": sampler, "startup_trials": startup, "population_size": population}
        self._trials: dict[str, int] = {}        # Tune trial_id -> optuna trial number
        self._scores: dict[tuple[int, ...], Any] = {}  # profile -> values told (for repeated profiles)
        self.study = self._create_study()
        self._journal: optuna.Study | None = None   # the experiment's journal study (opened on first use)

    # -- study --------------------------------------------------------------------------
    def _make_sampler(self) -> optuna.samplers.BaseSampler:
        kind = self.options["sampler"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if kind == "tpe":
                return optuna.samplers.TPESampler(seed=self.seed, multivariate=True, constant_liar=True,
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
        for index, ratios in enumerate(self._warm):
            study.enqueue_trial(self._params_of(ratios), user_attrs={"warm_start": True, "warm_index": index})
        return study

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        ok = super().set_search_properties(metric, mode, config, **spec)
        if ok and [d.name.lower() for d in self.study.directions] != self._directions():
            if any(t.state != TrialState.WAITING for t in self.study.trials):  # enqueued warm starts don't count
                return False
            self.study = self._create_study()
        return ok

    # -- parameterization ---------------------------------------------------------------
    @property
    def _low(self) -> np.ndarray:
        """Smallest value of each parameter: the largest minimum ratio among the groups it sets, and 1/spread."""
        low = np.array([self.min_ratios[row > 0].max() for row in self._basis.T])
        return np.maximum(low, 1.0 / self._spread) if self._spread else low

    @property
    def _spread(self) -> float | None:
        """The `spread` option where it applies (budget mode: the budget then scales the sampled ratios)."""
        return None if self.pareto else self.options["spread"]

    def _floor_widths(self) -> np.ndarray | None:
        """Budget mode with `min_channels`: per group, the narrower of min_channels and its uniform width at the
        budget (so the floor profile costs no more than the uniform one, which fits)."""
        if self.pareto or self.options["min_channels"] is None:
            return None
        return np.minimum(self._uniform_widths(self.budget),
                          [g.round(self.options["min_channels"]) for g in self.space.groups])

    def _uniform_widths(self, target: float) -> np.ndarray:
        """The uniform searcher's profile at `target` (the floor's reference, a warm start)."""
        from .baselines import UniformSearcher

        uniform = UniformSearcher(self.space, self.cost, budget=target, measure=self.measure)
        return np.asarray(uniform.suggest("uniform")["widths"], dtype=np.int64)

    def _ratios(self, params: np.ndarray) -> np.ndarray:
        """Per-group keep ratios of parameter values: their expansion, within each group's bounds."""
        return np.clip(self._basis @ params, self.min_ratios, 1.0)

    def _params_of(self, ratios: np.ndarray) -> dict[str, float]:
        """Parameters whose expansion is closest (least squares) to per-group `ratios`, within bounds."""
        values = np.linalg.lstsq(self._basis, np.asarray(ratios, dtype=np.float64), rcond=None)[0]
        values = np.clip(values, self._low, 1.0)
        return {f"r{i}": float(v) for i, v in enumerate(values)}

    def _warm_profiles(self) -> list[np.ndarray]:
        """Per-group keep ratios to evaluate first: uniform, and (budget mode) the global-ranking profiles and one
        profile per width exponent a, ratios proportional to full width^-a, and the synflow warm starts."""
        from .global_ranking import GlobalRankingSearcher

        targets = [self.budget] if not self.pareto else [0.3, 0.5, 0.7]
        targets = [t for t in targets if t >= self.min_cost_ratio]
        profiles = [np.ones(len(self.space))] if self.pareto else []
        profiles += [self._uniform_widths(target) / self.space.widths for target in targets]
        if not self.pareto and self.model is not None:
            ranking = GlobalRankingSearcher(self.space, self.cost, budget=self.budget, model=self.model,
                                            criterion=self.criterion, measure=self.measure, batches=self.batches,
                                            normalizers=["mean", "max"])
            while isinstance(config := ranking.suggest("warm"), dict):
                profiles.append(np.asarray(config["widths"]) / self.space.widths)
        if not self.pareto:  # the budget scales these (project_to_budget), like every sampled ratio vector
            full = self.space.widths.astype(np.float64)
            profiles += [(full / full.max()) ** -float(a) for a in self.options["width_exponents"] or []]
            if count := self._synflow_count():
                profiles += self._synflow_profiles(count)
        return profiles

    def _synflow_count(self) -> int:
        """How many synflow warm starts: the option, or where it is unset SYNFLOW_WARM_STARTS where the searcher
        has the model (the application always gives it) and none without it."""
        given = self.options["synflow_warm_starts"]
        if given is None:
            return SYNFLOW_WARM_STARTS if self.model is not None else 0
        return int(given)

    def _synflow_profiles(self, count: int) -> list[np.ndarray]:
        """Per-group keep ratios of the `count` profiles of highest synflow (widthsearch.zero_cost: no training)
        among `synflow_pool` proposals drawn from the study's own prior (each parameter in its bounds, log-uniform
        with `spread`) and projected to the budget, floor included, like every proposal."""
        from widthsearch.errors import ConfigError
        from widthsearch.surgery import prune
        from widthsearch.zero_cost import synflow

        if self.model is None:
            raise ConfigError("searcher 'optuna': option 'synflow_warm_starts' needs the model (synflow scores the "
                              "architecture of each proposal's pruned copy)")
        rng, low, shape = np.random.default_rng(self.seed), self._low, self.space.example_input.shape[1:]
        scored: dict[tuple[int, ...], float] = {}
        for _ in range(int(self.options["synflow_pool"])):
            u = rng.random(len(low))
            params = low ** (1.0 - u) if self._spread else low + u * (1.0 - low)
            widths = self.project(self._ratios(params), low=self._floor)
            key = tuple(int(w) for w in widths)
            if key not in scored:  # the architecture alone counts: any channels will do
                score = synflow(prune(self.model, self.space, self.space.from_vector(list(key))), shape)
                scored[key] = score if math.isfinite(score) else -math.inf  # an overflow ranks last, not first
        best = sorted(scored, key=scored.__getitem__, reverse=True)[:count]
        return [np.asarray(widths, dtype=np.float64) / self.space.widths for widths in best]

    # -- proposals ----------------------------------------------------------------------
    def _ask(self) -> tuple[optuna.Trial, np.ndarray]:
        trial = self.study.ask()
        log = bool(self._spread)
        params = np.array([trial.suggest_float(f"r{i}", float(low), 1.0, log=log) for i, low in enumerate(self._low)])
        warm = trial.user_attrs.get("warm_index")
        if warm is not None:  # a warm start is evaluated as given (its parameters: the closest in bounds), no floor
            ratios = self._warm[int(warm)]
        else:
            ratios = self._ratios(params)
        if self.pareto:
            widths = np.array([g.round(r * g.width) for g, r in zip(self.space.groups, ratios)], dtype=np.int64)
        else:
            widths = self.project(ratios, low=None if warm is not None else self._floor)
        trial.set_user_attr("widths", [int(w) for w in widths])
        return trial, widths

    def _propose(self, trial_id):
        for attempt in range(int(self.options["max_cached"]) + 1):
            trial, widths = self._ask()
            known = self._scores.get(tuple(int(w) for w in widths))
            if known is None or attempt == self.options["max_cached"]:
                break  # new, or too many repeats in a row: evaluate it (again)
            self._tell(trial.number, known)  # already scored: answer without a Tune trial
        trial.set_user_attr("trial_id", trial_id)
        self._trials[trial_id] = trial.number
        return widths, {"optuna_trial": trial.number, "warm_start": bool(trial.user_attrs.get("warm_start"))}

    def _observe(self, trial_id, widths, result, error, value, cost_ratio):
        number = self._trials.pop(trial_id, None)
        if number is None:
            return
        if error or value is None:
            self._tell(number, state=TrialState.FAIL)
            return
        values: Any = [value, cost_ratio] if self.pareto else value
        if self.pareto and not math.isfinite(cost_ratio):
            self._tell(number, state=TrialState.FAIL)
            return
        self._tell(number, values)
        self._scores[tuple(int(w) for w in widths)] = values

    # -- the experiment's journal --------------------------------------------------------
    def _tell(self, number: int, values: Any = None, state: TrialState | None = None) -> None:
        """Tell the study a trial's outcome, and record the finished trial in the experiment's journal study."""
        if state is None:
            self.study.tell(number, values)
        else:
            self.study.tell(number, state=state)
        if self.exp_dir is not None:
            self._record(self.study.trials[number])

    def _record(self, trial: optuna.trial.FrozenTrial) -> None:
        journal = self._journal_study()
        if any(t.user_attrs.get("search_number") == trial.number and t.params == trial.params
               for t in journal.get_trials(deepcopy=False)):
            return  # recorded before a resume (a resumed search re-runs the trials its snapshot had in flight)
        trial.set_user_attr("search_number", trial.number)
        journal.add_trial(trial)
        if self._journal_copy:
            Storage(self.exp_dir).write_bytes(JOURNAL, Path(self._journal_file).read_bytes())

    def _journal_study(self) -> optuna.Study:
        """The journal study (created on first use, reopened after a resume)."""
        if getattr(self, "_journal", None) is None:
            fs, root = filesystem(self.exp_dir)
            self._journal_copy = not isinstance(fs, pafs.LocalFileSystem)
            if self._journal_copy:  # object storage: a local journal beside the driver, copied after each trial
                key = hashlib.sha256(self.exp_dir.encode()).hexdigest()[:16]
                self._journal_file = str(Path(tempfile.gettempdir()) / "widthsearch-journals" / f"{key}.journal")
            else:
                self._journal_file = f"{root.rstrip('/')}/widthsearch/{JOURNAL}"
            Path(self._journal_file).parent.mkdir(parents=True, exist_ok=True)
            storage = JournalStorage(JournalFileBackend(self._journal_file))
            self._journal = optuna.create_study(storage=storage, study_name=study_name(self.exp_dir),
                                                directions=self._directions(), load_if_exists=True)
            for key, value in self.study.user_attrs.items():
                self._journal.set_user_attr(key, value)
        return self._journal


JOURNAL = "optuna/study.journal"  # the experiment's Optuna journal, under EXP/widthsearch/


def study_name(exp_dir: str) -> str:
    """The journal study's name: the experiment's (the last part of its folder or URI)."""
    return exp_dir.rstrip("/").rsplit("/", 1)[-1]


def group_kinds(space, model: nn.Module | None) -> list[str]:
    """'stream' for a group with more than two conv/linear layers (several producers, like a residual
    stream), else 'inner' (one layer's output and its consumer); without the model: more than 3 layers."""
    if model is None:
        return ["stream" if len(g.layers) > 3 else "inner" for g in space.groups]
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
    return ["stream" if sum(1 for layer in g.layers if layer in layers) > 2 else "inner" for g in space.groups]


def group_depths(space, model: nn.Module | None) -> np.ndarray:
    """Each group's position in the model (its root module's index among all modules), scaled to 0..1."""
    names = [n for n, _ in model.named_modules()] if model is not None else space.names
    index = {n: i for i, n in enumerate(names)}
    positions = np.array([index.get(g.name, i) for i, g in enumerate(space.groups)], dtype=np.float64)
    span = positions.max() - positions.min()
    return (positions - positions.min()) / span if span > 0 else np.zeros(len(positions))


def _basis(space, model: nn.Module | None, how: str, knots: int) -> np.ndarray:
    """Matrix B (groups x parameters) with per-group ratios = B @ parameters."""
    n = len(space)
    if how == "group":
        return np.eye(n)
    kinds = group_kinds(space, model)
    if how == "stage":
        classes = list(dict.fromkeys(zip(kinds, (int(w) for w in space.widths))))
        return np.array([[1.0 if (k, int(w)) == c else 0.0 for c in classes] for k, w in zip(kinds, space.widths)])
    depths, columns = group_depths(space, model), []
    grid = np.linspace(0.0, 1.0, knots)
    for kind in dict.fromkeys(kinds):
        for j in range(knots):  # hat function of knot j, on the groups of this kind
            hat = np.interp(depths, grid, np.eye(knots)[j])
            columns.append(np.where(np.array(kinds) == kind, hat, 0.0))
    basis = np.stack(columns, axis=1)
    return basis[:, basis.sum(axis=0) > 0]
