"""WidthSearcher: the Ray Tune Searcher every width-search algorithm derives from.

A searcher proposes *width profiles* of a :class:`~widthsearch.space.WidthSpace` as Tune
configs ``{"widths": [int, ...] (group order), "payload": Payload or None}`` (the payload: the
searcher's own values for its trial, a mapping; the results store it as JSON text).

What the budget bounds is a :class:`~widthsearch.cost.Measure` (the experiment's constraint:
FLOPs by default, params, or a device's measured latency); searchers only ever see that
interface, so each works under every constraint. Two modes:

* **target-budget mode** (``budget`` in (0, 1]): every suggested profile costs at most
  ``budget`` times the dense model's measure. The base class checks each proposal before
  handing it to Tune and repairs (with :func:`project_to_budget`) any proposal a subclass got
  wrong, so no infeasible profile is ever trained.
* **Pareto mode** (``budget=None``): any in-bounds profile; the searcher trades the metric
  against the measure's ratio (computed from the widths the trial reports).

Subclasses set ``name`` and ``trainable`` and implement ``_propose`` (and optionally ``_observe``);
their options are declared in :mod:`searchers.options` (light, so that they are listed and checked
without loading any searcher) and checked here with one message style. ``save``/``restore`` pickle the
searcher's own state (never the space, the measure, the model or data).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
from ray.tune.search import Searcher
from torch import nn

from widthsearch.budget import fill_budget, project_to_budget
from widthsearch.cost import CostModel, Measure
from widthsearch.errors import ConfigError, WidthSearchError
from widthsearch.importance import CRITERIA
from widthsearch.space import WidthSpace
from widthsearch.storage import write_atomic

from .options import check as check_declared_options

logger = logging.getLogger(__name__)

_TRANSIENT = ("_space", "_cost", "_model", "_measure", "_batches", "_journal")  # never pickled by save()

# A proposal: widths in group order and an optional payload (a mapping; JSON-able but for dataclasses).
Proposal = tuple[np.ndarray, Any]


class Payload(Mapping):
    """A proposal's payload on its way to the trial: the searcher's own values, read by the trial as proposed (no
    JSON round trip). One leaf of the trial's config (Tune would flatten a dict into many), shown by Tune, and
    stored in the results' payload column, as JSON text."""

    def __init__(self, values: Mapping[str, Any]):
        self.values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return json.dumps(self.values, sort_keys=True, default=dataclasses.asdict)


def next_queued(queue: list) -> "tuple[np.ndarray, dict] | str":
    """The next of a searcher's proposals made up front ((widths, payload) pairs), or FINISHED when none is left."""
    if not queue:
        return Searcher.FINISHED
    widths, payload = queue.pop(0)
    return np.array(widths), payload


# ----------------------------------------------------------------------------- base class
class WidthSearcher(Searcher):
    """Base: proposes width profiles within a budget of its Measure, checked before suggesting."""

    name: ClassVar[str] = ""
    trainable: ClassVar[str] = "score"      # the trainable its trials run (a name in trainables.TRAINABLES)
    enforce_budget: ClassVar[bool] = True   # False: the budget is a stopping target, not a per-trial bound
    promotes: ClassVar[bool] = True         # its trials fine-tune in rungs, so a promotion scheduler applies
    extendable: ClassVar[bool] = False      # a finished search can go on with more trials (its state restored)

    def __init__(self, space: WidthSpace, cost: CostModel, *, budget: float | None = 0.5,
                 metric: str = "score", mode: str = "max", seed: int = 0, model: nn.Module | None = None,
                 criterion: str = "l1", measure: Measure | None = None, batches: list | None = None,
                 num_samples: int | None = None, exp_dir: str | None = None, fill_budget: bool = False,
                 **options: Any):
        if not isinstance(metric, str) or not metric:
            raise ConfigError(f"metric must be a non-empty string, got {metric!r}")
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        if criterion not in CRITERIA:
            raise ConfigError(f"unknown importance criterion {criterion!r}; expected one of: "
                              f"{', '.join(sorted(CRITERIA))}")
        if cost.space is not space and cost.space.names != space.names:
            raise ConfigError("the cost model was built for a different width space")
        super().__init__(metric=metric, mode=mode)
        self.num_samples = num_samples        # the trials Tune will run (None: unknown, e.g. from Python), for sizing
        self.exp_dir = exp_dir                # the experiment's folder or URI, for searchers that keep files there
        self.options: dict[str, Any] = check_declared_options(self.name, options, num_samples)
        self._space = space
        self._cost = cost
        self._measure = measure if measure is not None else cost.measure("flops")
        self._model = model
        self._batches = batches               # training batches for data-driven criteria (never pickled)
        self.budget = None if budget is None else self._measure.check_budget(budget, space.min_widths)
        self.seed = int(seed)
        self.criterion = criterion
        self.fill_budget = bool(fill_budget)  # widen each proposal into what rounding left of the budget
        self._live: dict[str, np.ndarray] = {}        # trial_id -> widths suggested, not yet complete
        self._seen: set[tuple[int, ...]] = set()       # every profile suggested
        self.history: list[dict[str, Any]] = []       # completed trials: widths, value, cost_ratio, error
        self._finished = False
        self._signature = (self.name, tuple(space.names), tuple(int(w) for w in space.widths), self.budget,
                           self._measure.name)

    def option_error(self, text: str) -> ConfigError:
        """A ConfigError in the options' message style."""
        return ConfigError(f"searcher {self.name!r}: {text}")

    # -- properties -------------------------------------------------------------------
    @property
    def space(self) -> WidthSpace:
        return self._space

    @property
    def cost(self) -> CostModel:
        return self._cost

    @property
    def measure(self) -> Measure:
        """What the budget bounds (FLOPs, params or latency)."""
        return self._measure

    @property
    def model(self) -> nn.Module | None:
        return self._model

    @property
    def batches(self) -> list | None:
        """Training batches for data-driven criteria (taylor, frs), when the search passed them."""
        return self._batches

    @property
    def pareto(self) -> bool:
        """True in Pareto mode (no budget)."""
        return self.budget is None

    @property
    def min_ratios(self) -> np.ndarray:
        """Per-group smallest keep ratio (min_width / width)."""
        return self._space.min_widths / self._space.widths

    @property
    def min_cost_ratio(self) -> float:
        """Measure ratio of the smallest profile."""
        return self._measure.ratio(self._space.min_widths)

    def cost_ratio(self, widths) -> float:
        """Measure ratio of a width vector (validated)."""
        return self._measure.ratio(self._space.vector(self._space.from_vector(widths)))

    def project(self, ratios: np.ndarray, target: float | None = None, low: np.ndarray | None = None) -> np.ndarray:
        """project_to_budget on this searcher's space and measure (default target: the budget; `low`: floor
        widths per group, default the groups' minimum widths)."""
        return project_to_budget(self._space, self._measure, ratios, self.budget if target is None else target,
                                 low=low)

    # -- Tune API ---------------------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        """Adopt Tune's metric/mode; refuse configs with their own search variables."""
        from ray.tune.search.variant_generator import parse_spec_vars

        if config:
            _, domains, grids = parse_spec_vars(config)
            if domains or grids:
                return False
        if mode is not None and mode not in ("min", "max"):
            return False
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._finished:
            return Searcher.FINISHED
        proposal = self._propose(trial_id)
        if proposal is None:
            return None
        if isinstance(proposal, str) and proposal == Searcher.FINISHED:
            self._finished = True
            return Searcher.FINISHED
        widths, payload = proposal
        widths = self._checked(np.asarray(widths))
        self._live[trial_id] = widths
        self._seen.add(tuple(int(w) for w in widths))
        return {"widths": [int(w) for w in widths], "payload": None if payload is None else Payload(payload)}

    def _checked(self, widths: np.ndarray) -> np.ndarray:
        """Validate bounds and, in budget mode, the budget (repairing if needed); with `fill_budget`, then widen the
        profile into what is left of the budget (:func:`fill_budget`)."""
        vector = self._space.vector(self._space.from_vector(widths))
        if self.enforce_budget and self.budget is not None and self.cost_ratio(vector) > self.budget:
            logger.warning("searcher %r proposed a profile over budget %g; projecting it onto the budget",
                           self.name, self.budget)
            vector = self.project(vector / self._space.widths)
            if self.cost_ratio(vector) > self.budget:  # pragma: no cover - defensive
                vector = self._space.min_widths.copy()
        if self.fill_budget and self.enforce_budget and self.budget is not None:
            vector = fill_budget(self._space, self._measure, vector, self.budget)
        return vector

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        widths = self._live.pop(trial_id, None)
        if widths is None:
            logger.warning("searcher %r: completion of unknown trial %r ignored", self.name, trial_id)
            return
        if result and result.get("widths") is not None:
            widths = np.asarray(result["widths"], dtype=np.int64)  # what the trial built (gradient, aofp choose)
        value = self._metric_value(result)
        ratio = self.cost_ratio(widths)
        self.history.append({"trial_id": trial_id, "widths": [int(w) for w in widths], "value": value,
                             "cost_ratio": ratio, "error": bool(error)})
        self._observe(trial_id, widths, result, error, value, ratio)

    def _metric_value(self, result: Mapping | None) -> float | None:
        """The result's metric at the first rung every trial reaches (``first_score`` when a trial reports it),
        so trials that a promotion scheduler stopped early and trials it promoted compare like with like."""
        if not result:
            return None
        key = "first_score" if self.metric == "score" and "first_score" in result else self.metric
        if key not in result:
            return None
        try:
            value = float(result[key])
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None

    # -- subclass hooks -----------------------------------------------------------------
    def _propose(self, trial_id: str) -> Proposal | str | None:
        """(widths, payload), None to wait, or Searcher.FINISHED."""
        raise NotImplementedError

    def _observe(self, trial_id: str, widths: np.ndarray, result: dict | None, error: bool,
                 value: float | None, cost_ratio: float) -> None:
        """React to a completed trial: `widths` as built, `cost_ratio` their measure ratio (default: nothing)."""

    # -- checkpointing --------------------------------------------------------------------
    def get_state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}

    def set_state(self, state: dict) -> None:
        signature = state.get("_signature")
        if signature != self._signature:
            name, groups, _, budget = signature[:4] if signature else ("?", (), None, "?")
            raise WidthSearchError(
                f"searcher checkpoint does not match: it was written by searcher {name!r} for {len(groups)} "
                f"groups with budget {budget}; this is searcher {self.name!r} for {len(self._space)} groups "
                f"with budget {self.budget} ({self._measure.name})")
        self.__dict__.update({k: v for k, v in state.items() if k not in _TRANSIENT})

    def save(self, checkpoint_path: str) -> None:
        """Pickle the searcher's own state (atomically)."""
        write_atomic(checkpoint_path, pickle.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        """Load a state written by ``save`` from a searcher of the same name, space and budget."""
        try:
            with open(checkpoint_path, "rb") as f:
                state = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            raise WidthSearchError(f"cannot read searcher checkpoint {checkpoint_path}: {exc}") from exc
        if not isinstance(state, dict):
            raise WidthSearchError(f"{checkpoint_path} is not a searcher checkpoint")
        self.set_state(state)
