"""Baseline searchers: one uniform keep ratio (``uniform``) and random per-group ratios (``random``).

Sources: the uniform-width baseline is the usual "shrink every layer by the same factor"
reference (as in the width-multiplier of MobileNets, Howard et al. 2017); random search
over per-layer widths follows the random-pruning baselines of Liu et al. 2019 ("Rethinking
the value of network pruning") and Li & Talwalkar 2019 (random search for architecture
search). Deviation: samples are projected onto the budget (largest feasible scale of
the sampled ratio vector) instead of being rejected when over budget.
"""

from __future__ import annotations

import numpy as np

from widthsearch.budget import project_with_scale

from .base import WidthSearcher, next_queued


class UniformSearcher(WidthSearcher):
    """One keep ratio for all groups (width-multiplier baseline).

    Budget mode: the largest uniform ratio whose profile fits the budget (a vectorised
    bisection on the ratio with ``measure.many``, via :func:`project_to_budget` on the
    all-ones direction), suggested once, then FINISHED. Pareto mode: ``points`` ratios evenly
    spaced between the smallest meaningful ratio (max over groups of min_width / width) and
    1.0, duplicates removed, then FINISHED.
    """

    name = "uniform"


    def __init__(self, space, cost, **kwargs):
        super().__init__(space, cost, **kwargs)
        self._queue = self._candidates()

    def _candidates(self) -> list[tuple[list[int], dict]]:
        if not self.pareto:
            scale, widths = _largest_uniform(self, self.budget)
            return [([int(w) for w in widths], {"ratio": round(float(scale), 6)})]
        smallest = float(np.max(self.min_ratios))
        out, seen = [], set()
        for ratio in np.linspace(smallest, 1.0, int(self.options["points"])):
            widths = tuple(g.round(ratio * g.width) for g in self.space.groups)
            if widths not in seen:
                seen.add(widths)
                out.append((list(widths), {"ratio": round(float(ratio), 6)}))
        return out

    def _propose(self, trial_id):
        return next_queued(self._queue)


def _largest_uniform(searcher: WidthSearcher, target: float) -> tuple[float, np.ndarray]:
    """Largest uniform keep ratio within `target` and its widths."""
    widths, scale = project_with_scale(searcher.space, searcher.measure, np.ones(len(searcher.space)), target)
    return min(float(scale), 1.0), widths


class RandomSearcher(WidthSearcher):
    """Random per-group keep ratios ~ U(min_ratio_g, 1) from a seeded numpy Generator.

    Budget mode: each sample is projected onto the budget with :func:`project_to_budget`
    (largest scale of the sampled ratio vector whose measure ratio fits), so every profile is
    feasible and sits close to the budget. Pareto mode: a random target in [measure ratio
    of the smallest profile, 1] is drawn first and the sample projected onto it. Profiles
    already suggested are re-sampled (up to ``max_tries`` times). Never FINISHED on its own:
    Tune's ``num_samples`` bounds it.
    """

    name = "random"
    extendable = True  # more samples of the same distribution; profiles already tried are re-sampled


    def __init__(self, space, cost, **kwargs):
        super().__init__(space, cost, **kwargs)
        self._rng = np.random.default_rng(self.seed)

    def _sample(self) -> tuple[np.ndarray, float]:
        low = self.min_ratios
        ratios = self._rng.uniform(low, 1.0)
        target = self.budget if not self.pareto else float(self._rng.uniform(self.min_cost_ratio, 1.0))
        return self.project(ratios, target), target

    def _propose(self, trial_id):
        for _ in range(int(self.options["max_tries"])):
            widths, target = self._sample()
            if tuple(int(w) for w in widths) not in self._seen:
                break
        return widths, ({"target": round(target, 6)} if self.pareto else None)
