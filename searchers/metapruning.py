"""MetaPruning (Liu, Mu, Zhang, Guo, Yang, Cheng, Sun; ICCV 2019), on the WidthSpace's channel groups.

Source: the paper ("MetaPruning: Meta Learning for Automatic Neural Network Channel Pruning",
arXiv 1903.10258) and the authors' code, github.com/liuzechun/MetaPruning (``resnet/training/
train.py``: PruningNet training; ``resnet/searching/search.py``: the evolution and the BN
recalibration; the mobilenet folders are the same recipe).

1. **Channel order**: before anything else, every group's channels of the base model are
   ranked once by the experiment's criterion (``--criterion``; data-driven ones get the
   search's training batches), best first. "The first ``w`` channels" below means the first
   ``w`` of that order, i.e. the ``w`` best; the order travels in the training payload and
   the PruningNet checkpoint, and every candidate's payload ``keep`` lists those channels.
2. **PruningNet training** (one trial, payload phase "train"; widthsearch/pruningnet.py,
   trainables/metapruning.py): every conv/linear touched by a channel group gets a meta block
   (two FC layers) from the layer's encoding (keep ratios of the groups on its output and
   input channels) to its full-size weight, cropped to the first ``w`` channels of every
   group. Each step samples a random profile (every group's width uniform over its legal
   widths; with ``train_flops_min``/``train_flops_max``, rejection-sampled into that FLOPs
   range), generates the weights, and runs one SGD step end to end through the meta blocks,
   with BatchNorm on batch statistics. Checkpointed every ``checkpoint_every`` steps through
   the experiment's storage (``EXP/widthsearch/metapruning/``; a path or a URI); a re-run
   trial continues from its checkpoint.
3. **Evolutionary search** (the authors' ``search.py``): generation 0 is ``population``
   random profiles; every later generation is ``population // 2`` mutants (each gene of a
   top-k parent moved, with probability ``mutation_prob``, to another legal width: the
   authors' random non-zero offset modulo the choices), ``population // 2`` crossovers
   (gene-wise uniform between two top-k parents) and random profiles for any shortfall. Every
   child is checked against the budget with the searcher's Measure and resampled until
   feasible and new before it is proposed; the top ``topk`` over all generations are the
   parents. Each candidate is a trial: generated weights, BN statistics reset and
   re-estimated on ``bn_batches`` train batches, scored on val, no fine-tuning. ``suggest``
   returns None while the PruningNet trains or a generation runs.
4. **Retrain** (``widthsearch retrain``) of a candidate row prunes the base model to the
   row's ``keep``: the same channels the PruningNet kept for that profile.

Sizing: the search runs 1 + population x generations trials (the authors: 50 x 20, top 10 of
the best 50 as parents, mutation probability 0.1). With ``num_samples`` known (the CLI passes
it), unset ``population``/``generations`` are sized from it: the paper's 50 x 20 when it allows
1,000 candidates, else population ~ sqrt(2.5 x candidates) (the paper's 5:2 ratio), at most
half the candidates so that a generation of mutation and crossover follows the random one, and
as many generations as fit. ``num_samples`` below 5 (only the random generation would run), or
one that does not cover explicit sizes, is refused before any work (the rules of
``searchers.options``, checked by ``widthsearch search`` before data are loaded or a base model is trained). ``topk`` defaults
to population / 5 (the paper's 10 of 50), at least 2. The sizes are logged and written into
every payload.

Deviations, each with its reason:

1. Genes are channel groups (a residual stream is one gene, as the paper searches a stage's
   shortcut width once); a meta block's encoding is the keep ratios of the layer's output and
   input groups (the authors feed a block's mid/in/out ratios to each of its convs): the
   WidthSpace is model-agnostic and knows groups, not blocks.
2. The PruningNet starts at the trained base model (meta block output bias = base weight,
   output weight = 0) instead of from scratch, so that a short training is useful on a
   converged base. The authors' crop keeps the first ``w`` channels, whose order their
   from-scratch training makes meaningful; a trained base's channel order is arbitrary, hence
   the ranking by the criterion (step 1), which also makes a retrain keep the channels the
   search scored.
3. BatchNorm: the authors keep one non-affine BN per width choice. In training mode a BN
   normalises with the batch's statistics, so per-width copies differ only in the running
   statistics they accumulate, which the authors discard: before scoring each candidate they
   reset them and re-estimate them on 100 augmented training batches of 1,000 images
   (momentum 0.1). We recalibrate per candidate the same way, on ``bn_batches`` batches of
   the search's batch size (default 20 x 128: a CPU-sized search cannot afford 100,000
   images per candidate; bench/metapruning.py ``bn`` measures how many are enough),
   unaugmented, as a cumulative average (the project's one recalibration,
   ``widthsearch.training.recalibrate_bn``). Per-width statistics could not be reused anyway:
   a BN's input depends on the widths of every group upstream, not only its own. BN's affine
   parameters, conv/linear biases and layers outside every group are shared, trained
   parameters (cropped with their channels), because the materialised candidate must be the
   base architecture (retrain, export), whose BatchNorms are affine.
4. Pareto mode (no budget) ranks by domination count over (score, cost ratio), then score:
   the authors search one FLOPs window and have no Pareto mode.
5. Random profiles draw every group's width uniformly over its legal widths (the authors:
   scale choices 12 to 23 of 31, i.e. 46-79% of the width, within a FLOPs window of 1,950-
   2,050 MFLOPs around a 2,000 target, +-2.5%); candidates are only bounded above by the
   budget, as for every searcher here (the budget is a bound, not a target). When rejection
   sampling runs out of tries (20 per child), the missing children are random profiles
   projected into the budget, so a generation is always full (the authors retry mutation and
   crossover a bounded number of times, then draw random profiles until enough fit).
6. Training samples every group independently over all its legal widths (optionally within a
   FLOPs range); the authors sample one ratio per stage for the shortcut widths and one per
   block for the mid widths, over all 31 choices, and keep the last stage at full width.
7. The training trial gets the same resources as every trial (search.py gives one set).
8. The authors train their PruningNet for 32 ImageNet epochs from scratch (batch 256, lr 0.1
   stepped down x0.1 at epochs 8, 16 and 24, label smoothing 0.1, weight decay 1e-4 on part of
   the parameters); ours fine-tunes from the base for ``train_steps`` steps of the search's
   batch size with the project's one optimiser (SGD, Nesterov momentum 0.9, weight decay
   5e-4, lr ``lr`` on a cosine schedule, no label smoothing), because it starts from a
   trained base (deviation 2) and searches run on CPUs. Whether that is long enough is
   measured by bench/metapruning.py (Spearman of the generated-weight score against the
   retrained accuracy over >= 20 profiles; the issue's goal is >= 0.6).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from widthsearch.errors import ConfigError
from widthsearch.importance import CRITERIA
from widthsearch.pruningnet import allowed_widths, channel_order, keep_channels, sample_widths

from .base import WidthSearcher
from .options import evolution_plan

logger = logging.getLogger(__name__)

class MetaPruningSearcher(WidthSearcher):
    """Train a PruningNet, then evolve width profiles scored with its generated weights."""

    name = "metapruning"
    trainable = "metapruning"
    promotes = False  # its candidates are scored with generated weights, not fine-tuned in rungs


    def __init__(self, space, cost, **kwargs: Any):
        super().__init__(space, cost, **kwargs)
        if self.model is None:
            raise ConfigError("searcher 'metapruning' needs the base model (model=...) to rank its channels")
        if CRITERIA[self.criterion].needs_batches and not self.batches:
            raise ConfigError(f"searcher 'metapruning' with criterion {self.criterion!r} needs training batches "
                              "(widthsearch search passes them; from Python, pass batches=[(x, y), ...])")
        plan = evolution_plan(self.options, self.num_samples)
        self.population, self.generations, self.topk = plan["population"], plan["generations"], plan["topk"]
        logger.info("metapruning: 1 PruningNet training trial + population %d x generations %d candidates "
                    "(top-k %d; num_samples %s)", self.population, self.generations, self.topk, self.num_samples)
        # every group's channels, best first: a profile keeps the first w (PruningNet crop, retrain's "keep")
        self.order = channel_order(self.model, space, self.criterion, self.batches, self.seed)
        self.rng = np.random.default_rng(self.seed)
        self.phase = "train"          # "train": waiting for the PruningNet; "evolve": running generations
        self.net = f"pruningnet-s{self.seed}"   # the PruningNet checkpoint id (EXP/widthsearch/metapruning/<net>.pt)
        self.checkpoint: str | None = None      # its location, once trained
        self.issued = False           # the training trial was suggested
        self.generation = 0
        self.queue: list[list[int]] = []        # children of the current generation not yet suggested
        self.pending = 0              # candidates of the current generation suggested, not yet complete
        self.scored: list[dict] = []  # every candidate scored: widths, value, cost_ratio, generation
        self.top: list[dict] = []     # the top-k over all generations so far (parents of the next one)

    def plan(self) -> dict[str, int]:
        """The evolution's sizes, as run."""
        return {"population": self.population, "generations": self.generations, "topk": self.topk}

    # -- proposals ----------------------------------------------------------------------
    def _propose(self, trial_id: str):
        if self.phase == "train":
            if self.issued:
                return None
            self.issued = True
            o = self.options
            payload = {"phase": "train", "net": self.net, "steps": o["train_steps"], "lr": o["lr"],
                       "hidden": o["hidden"], "every": o["checkpoint_every"], "seed": self.seed,
                       "flops_min": o["train_flops_min"], "flops_max": o["train_flops_max"],
                       "criterion": self.criterion, "order": self.order, **self.plan()}
            label = self.space.widths if self.budget is None else self.project(np.ones(len(self.space)))
            return label, payload
        if not self.queue:
            if self.pending:
                return None
            self.top = self.ranked(self.scored)[: self.topk]
            self.generation += 1
            if self.generation >= self.generations:
                return Searcher.FINISHED
            self.queue = self.children()
        widths = self.queue.pop(0)
        self.pending += 1
        payload = {"phase": "candidate", "net": self.net, "generation": self.generation,
                   "bn_batches": self.options["bn_batches"], "keep": keep_channels(self.space, self.order, widths),
                   **self.plan()}
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
        n = self.population
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
        """A random top-k parent with each gene, with probability mutation_prob, moved to another legal width."""
        child = parents[self.rng.integers(len(parents))].copy()
        for i in np.flatnonzero(self.rng.random(len(child)) < self.options["mutation_prob"]):
            others = legal[i][legal[i] != child[i]]
            if len(others):
                child[i] = self.rng.choice(others)
        return child

    def _crossover(self, parents: np.ndarray) -> np.ndarray:
        a, b = parents[self.rng.choice(len(parents), size=2, replace=len(parents) < 2)]
        return np.where(self.rng.random(len(a)) < 0.5, a, b)
