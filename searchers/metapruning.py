"""MetaPruning (Liu, Mu, Zhang, Guo, Yang, Cheng, Sun; ICCV 2019), on the WidthSpace's channel groups.

1. **PruningNet training** (one trial, payload phase "train"; widthsearch/pruningnet.py,
   trainables/metapruning.py): every conv/linear touched by a channel group gets a meta block
   (two FC layers) from the layer's encoding (keep ratios of the groups on its output and
   input channels) to its full-size weight, cropped to the first ``w`` channels of every
   group. Each step samples a random profile (every group's width uniform over its legal
   widths; with ``train_flops_min``/``train_flops_max``, rejection-sampled into that FLOPs
   range), generates the weights, and runs one SGD step end to end through the meta blocks,
   with BatchNorm on batch statistics. Checkpointed every ``checkpoint_every`` steps; a
   re-run trial continues from its checkpoint.
2. **Evolutionary search**: generation 0 is ``population`` random profiles; every later
   generation is ``population // 2`` mutants (each gene of a top-k parent resampled with
   probability ``mutation_prob``), ``population // 2`` crossovers (gene-wise uniform between
   two top-k parents) and random profiles for any shortfall. Every child is checked against
   the FLOPs budget with the CostModel and resampled until feasible (and new) before it is
   proposed; the top ``topk`` are kept over all generations. Each candidate is a trial:
   generated weights, BN recalibrated on ``bn_batches`` train batches, scored on val, no
   fine-tuning. ``suggest`` returns None while the PruningNet trains or a generation runs.

Defaults are the paper's search settings (population 50, 20 generations, top-k 10,
mutation probability 0.1). Deviations, stated: (1) genes are channel groups (a residual
stream is one gene, as the paper searches a stage's shortcut width once); the encoding fed
to a meta block is keep ratios rather than channel counts. (2) BatchNorm affine parameters,
biases and layers outside every group are plain parameters shared by all profiles, trained
with the meta blocks (the paper's code drops BN's affine transform). (3) The meta blocks start
at the base weights (output bias = base weight, output weight = 0), not from scratch.
(4) Pareto mode (no budget) ranks by domination count over (score, FLOPs), then score.
(5) The training trial gets the same resources as every trial (search.py gives one set).
(6) Retraining a chosen profile keeps the first ``w`` channels of the *base* weights
(payload "keep"); the paper retrains the found widths.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from widthsearch.errors import ConfigError
from widthsearch.pruningnet import allowed_widths, prefix_keep, sample_widths

from .base import WidthSearcher
from .options import Option

logger = logging.getLogger(__name__)


class MetaPruningSearcher(WidthSearcher):
    """Train a PruningNet, then evolve width profiles scored with its generated weights."""

    name = "metapruning"
    trainable = "metapruning"
    promotes = False  # its candidates are scored with generated weights, not fine-tuned in rungs
    OPTIONS = {"train_steps": Option(2000, int, "PruningNet training steps", low=1),
               "lr": Option(0.01, float, "PruningNet learning rate", low=0, low_open=True),
               "hidden": Option(32, int, "hidden units of each meta block", low=1),
               "checkpoint_every": Option(100, int, "PruningNet steps between checkpoints", low=1),
               "train_flops_min": Option(0.0, float, "smallest FLOPs ratio sampled in training", low=0, high=1),
               "train_flops_max": Option(1.0, float, "largest FLOPs ratio sampled in training", low=0, high=1),
               "population": Option(50, int, "profiles per generation", low=1),
               "generations": Option(20, int, "generations of the evolution", low=1),
               "topk": Option(10, int, "parents kept over all generations", low=1),
               "mutation_prob": Option(0.1, float, "probability of resampling each gene of a mutant", low=0, high=1)}

    @classmethod
    def check_together(cls, o: dict) -> None:
        if not o["train_flops_min"] < o["train_flops_max"]:
            raise ConfigError("searcher 'metapruning': train_flops_min must be below train_flops_max, got "
                              f"{o['train_flops_min']!r} and {o['train_flops_max']!r}")
        if o["topk"] > o["population"]:
            raise ConfigError(f"searcher 'metapruning': option 'topk' ({o['topk']}) exceeds 'population' "
                              f"({o['population']})")

    def __init__(self, space, cost, **kwargs: Any):
        super().__init__(space, cost, **kwargs)
        self.rng = np.random.default_rng(self.seed)
        self.phase = "train"          # "train": waiting for the PruningNet; "evolve": running generations
        self.net = f"pruningnet-s{self.seed}"   # the PruningNet checkpoint id (EXP/widthsearch/metapruning/<net>.pt)
        self.checkpoint: str | None = None      # its path, once trained
        self.issued = False           # the training trial was suggested
        self.generation = 0
        self.queue: list[list[int]] = []        # children of the current generation not yet suggested
        self.pending = 0              # candidates of the current generation suggested, not yet complete
        self.scored: list[dict] = []  # every candidate scored: widths, value, cost_ratio, generation
        self.top: list[dict] = []     # the top-k over all generations so far (parents of the next one)

    # -- proposals ----------------------------------------------------------------------
    def _propose(self, trial_id: str):
        if self.phase == "train":
            if self.issued:
                return None
            self.issued = True
            o = self.options
            payload = {"phase": "train", "net": self.net, "steps": o["train_steps"], "lr": o["lr"],
                       "hidden": o["hidden"], "every": o["checkpoint_every"], "seed": self.seed,
                       "flops_min": o["train_flops_min"], "flops_max": o["train_flops_max"]}
            label = self.space.widths if self.budget is None else self.project(np.ones(len(self.space)))
            return label, payload
        if not self.queue:
            if self.pending:
                return None
            self.top = self.ranked(self.scored)[: self.options["topk"]]
            self.generation += 1
            if self.generation >= self.options["generations"]:
                return Searcher.FINISHED
            self.queue = self.children()
        widths = self.queue.pop(0)
        self.pending += 1
        payload = {"phase": "candidate", "net": self.net, "hidden": self.options["hidden"],
                   "generation": self.generation, "keep": prefix_keep(self.space, widths)}
        return widths, payload

    def _observe(self, trial_id, widths, result, error, value, cost_ratio) -> None:
        if self.phase == "train":
            if error or not result or "checkpoint" not in result:
                logger.error("metapruning: the PruningNet training trial failed; the search cannot go on")
                self._finished = True
                return
            self.checkpoint = str(result["checkpoint"])
            self.phase = "evolve"
            self.queue = self.children()
            return
        self.pending -= 1
        if value is not None:
            self.scored.append({"widths": [int(w) for w in widths], "value": value, "cost_ratio": cost_ratio,
                                "generation": self.generation})

    # -- evolution ----------------------------------------------------------------------
    def ranked(self, candidates: list[dict]) -> list[dict]:
        """Best first: by score (budget mode), or by domination count over (score, FLOPs), then score."""
        sign = 1.0 if self.mode == "max" else -1.0
        value = np.array([sign * c["value"] for c in candidates])
        if self.budget is None:
            flops = np.array([c["cost_ratio"] for c in candidates])
            v, f = value[:, None], flops[:, None]  # row i: is candidate j at least as good on both, better on one?
            dominated = ((value >= v) & (flops <= f) & ((value > v) | (flops < f))).sum(axis=1)
        else:
            dominated = np.zeros(len(candidates))
        return [candidates[i] for i in np.lexsort((-value, dominated))]

    def feasible(self, widths: np.ndarray) -> np.ndarray:
        """Rows within the FLOPs budget (all rows in Pareto mode)."""
        if self.budget is None:
            return np.ones(len(widths), dtype=bool)
        return self.measure.ratio_many(widths) <= self.budget

    def children(self) -> list[list[int]]:
        """The next generation: random (generation 0), else mutants + crossovers + random fill; all feasible and new."""
        n = self.options["population"]
        out: list[list[int]] = []
        if self.generation > 0 and self.top:
            parents = np.array([c["widths"] for c in self.top])
            legal = allowed_widths(self.space)
            self._breed(out, n // 2, lambda: self._mutant(parents, legal))
            self._breed(out, n // 2, lambda: self._crossover(parents))
        self._breed(out, n - len(out), lambda: sample_widths(self.space, self.rng, 1)[0])
        return out

    def _breed(self, out: list[list[int]], count: int, make, tries: int = 20) -> None:
        """Append up to `count` feasible, never-seen profiles made by `make` (resampling rejects)."""
        goal = len(out) + count
        for _ in range(count * tries):
            if len(out) >= goal:
                return
            child = np.asarray(make(), dtype=np.int64)
            key = tuple(int(w) for w in child)
            if self.feasible(child[None])[0] and key not in self._seen and list(key) not in out:
                out.append(list(key))
        while len(out) < goal:  # rejection failed (tight budget, or few profiles left): feasible by construction
            if self.budget is None:
                out.append([int(w) for w in sample_widths(self.space, self.rng, 1)[0]])
            else:
                out.append([int(w) for w in self.project(self.rng.uniform(self.min_ratios, 1.0))])

    def _mutant(self, parents: np.ndarray, legal: list[np.ndarray]) -> np.ndarray:
        child = parents[self.rng.integers(len(parents))].copy()
        for i in np.flatnonzero(self.rng.random(len(child)) < self.options["mutation_prob"]):
            child[i] = self.rng.choice(legal[i])
        return child

    def _crossover(self, parents: np.ndarray) -> np.ndarray:
        a, b = parents[self.rng.choice(len(parents), size=2, replace=len(parents) < 2)]
        return np.where(self.rng.random(len(a)) < 0.5, a, b)
