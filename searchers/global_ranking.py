"""Global importance ranking (``global``): prune the globally least important channels first.

Source: global pruning as in torch-pruning's ``global_pruning=True`` (Fang et al., 2023,
DepGraph) and Molchanov et al. (2017, 2019), who rank channels of all layers together by
one criterion (e.g. the first-order Taylor score) and remove the lowest globally.

Deviations: (1) removal stops at the budget of the experiment's measure (FLOPs by default) instead of a
channel-count ratio; (2) raw scores are not comparable across layers, so several per-group
normalisers are tried (one candidate profile each) and Tune evaluates them; (3) with a
divisor, channels are removed in steps of whole multiples, a step being ranked by the
largest score it removes; no group ever goes below its minimum width.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from widthsearch.errors import ConfigError
from widthsearch.importance import CRITERIA, score_channels
from widthsearch.space import dependency_graph, root_group

from .base import WidthSearcher, next_queued


def _normalise(scores: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return scores
    denominator = {"mean": np.mean, "max": np.max, "sum": np.sum}[how](np.abs(scores))
    return scores / denominator if denominator > 0 else scores


class GlobalRankingSearcher(WidthSearcher):
    """One global importance ranking across groups (torch-pruning global pruning / Molchanov et al.).

    Every channel of every group is scored once on the base ``model`` with ``criterion``
    (``importance.score_channels``; data-driven criteria use the search's training batches),
    normalised per group by each of ``normalizers`` (group mean / max / sum / nothing), and
    channels are removed in increasing global order. All prefixes of that removal order are
    costed in one vectorised ``measure.many`` call; the candidate is the first prefix
    whose measure ratio is <= the budget, so the budget holds by construction. Budget mode:
    one candidate per normaliser (duplicates merged), then FINISHED. Pareto mode: one per
    normaliser and target in ``targets``, then FINISHED.
    """

    name = "global"


    def __init__(self, space, cost, **kwargs):
        super().__init__(space, cost, **kwargs)
        if self.model is None:
            raise ConfigError("searcher 'global' needs the model (model=...) to score channels")
        normalizers = list(dict.fromkeys(self.options["normalizers"]))
        targets = [self.budget] if not self.pareto else self.options["targets"]
        reachable = [t for t in targets if t >= self.min_cost_ratio]
        if not reachable:
            raise ConfigError(f"targets {targets} are unreachable: the smallest profile of this model has "
                              f"{self.measure.unit} ratio {self.min_cost_ratio:.4g}")
        if CRITERIA[self.criterion].needs_batches and not self.batches:
            raise ConfigError(f"searcher 'global' with criterion {self.criterion!r} needs training batches "
                              "(widthsearch search passes them; from Python, pass batches=[(x, y), ...])")
        scores = self._score(self.batches)
        self.options = {**self.options, "normalizers": normalizers}
        self._queue = self._candidates(scores, normalizers, sorted(reachable))

    def _score(self, batches) -> dict[str, np.ndarray]:
        work = copy.deepcopy(self.model)
        modules = dict(work.named_modules())
        missing = [n for n in self.space.names if n not in modules]
        if missing:
            raise ConfigError(f"the model given to searcher 'global' has no module {missing[0]!r} of the width space")
        graph = dependency_graph(work, self.space.example_input)
        groups = {g.name: root_group(graph, modules[g.name], range(g.width)) for g in self.space.groups}
        scores = score_channels(self.criterion, work, groups, batches, self.seed)
        return {name: s.numpy().astype(np.float64) for name, s in scores.items()}

    def _removal_order(self, scores: dict[str, np.ndarray], how: str) -> np.ndarray:
        """Width profiles after each step of global removal: row k = after k steps (row 0 = full)."""
        keys, groups, drops = [], [], []
        for j, g in enumerate(self.space.groups):
            s = np.sort(_normalise(scores[g.name], how))
            allowed = [w for w in range(g.width, g.min_width - 1, -1) if g.allowed(w)]
            for a, b in zip(allowed, allowed[1:]):
                keys.append(s[g.width - b - 1])  # the largest score this step removes
                groups.append(j)
                drops.append(a - b)
        order = np.lexsort((np.arange(len(keys)), np.array(groups), np.array(keys)))
        deltas = np.zeros((len(keys) + 1, len(self.space)), dtype=np.int64)
        deltas[np.arange(1, len(keys) + 1), np.array(groups, dtype=np.int64)[order]] = np.array(drops)[order]
        return self.space.widths - np.cumsum(deltas, axis=0)

    def _candidates(self, scores, normalizers, targets) -> list[tuple[list[int], dict[str, Any]]]:
        out: list[tuple[list[int], dict[str, Any]]] = []
        index: dict[tuple[int, ...], int] = {}
        for how in normalizers:
            profiles = self._removal_order(scores, how)
            ratios = self.measure.ratio_many(profiles)
            for target in targets:
                fits = ratios <= target
                widths = profiles[int(np.argmax(fits))] if fits.any() else self.space.min_widths
                key = tuple(int(w) for w in widths)
                if key in index:
                    out[index[key]][1]["normalizers"].append(how)
                    continue
                index[key] = len(out)
                out.append((list(key), {"normalizers": [how], "target": target, "criterion": self.criterion}))
        return out

    def _propose(self, trial_id):
        return next_queued(self._queue)
