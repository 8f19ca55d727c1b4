"""AOFP: Approximated Oracle Filter Pruning (Ding, Ding, Guo, Han, Yan; ICML 2019).

Oracle pruning ranks a filter by the damage done when it alone is removed: accurate but one
evaluation per filter. AOFP approximates it with a binary search per layer (here: per
channel group). Each group keeps a *search space* S of candidate channels (first all alive
channels). Pruning attempts mask a random half of S in every searched group at once, on
every batch; the damage t = ||y - y'||^2 / ||y||^2 at the output of the layers that consume
the group (base and ablated paths share weights) is added to every masked channel's running
sum and count. After a window of attempts the k = |S|//2 channels with the smallest mean
damage (never-sampled ones last) are tested: if the k-th smallest mean is below epsilon,
they are masked for good and S is reset to the remaining channels; else, if k > 1, S shrinks
to those k; else nothing more can go from that group and it stops (the authors' code resets
S instead; we stop it so the search ends; a stopped group still shrinks nothing). A group
also stops at its minimum width. The widths are found, not given: with a budget, the search
stops as soon as the FLOPs ratio of the committed widths is at or below it; without one,
when every group has stopped.

How it runs on Ray Tune (trainable ``aofp`` in trainables/aofp.py): a *round* is
``probes`` parallel probe trials, each evaluating ``window`` batches of masking attempts on
the current model version and reporting per-channel damage sums and counts; then one
*commit* trial applies the decisions (masking for good), fine-tunes the base path for
``commit_steps`` SGD steps at ``lr`` (1e-3 in the paper) with masked channels held at zero,
evaluates on val and writes the next model version to the experiment storage. ``suggest``
returns None while a round or a commit is in flight.

Deviations, stated: (1) the paper fine-tunes the base path on the same batches that carry
the pruning attempts; here attempts (probe trials) and fine-tuning (commit trials) alternate,
so that attempts parallelise across trials; one round's ``probes x window`` batches play the
role of the code's 1000-iteration window (scaled down). (2) Searched units are DepGraph
channel groups, so a residual stream is searched as one unit and its damage is measured at
all its consumers; the authors search only the first conv of each ResNet block. (3) Layers
start staggered by ``stagger`` rounds (group i joins at round i mod stagger; 0 = all at once).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .base import WidthSearcher
from .options import Option


class AofpSearcher(WidthSearcher):
    """Binary search for the least important filters by accumulated random-masking damage."""

    name = "aofp"
    trainable = "aofp"
    enforce_budget = False
    promotes = False  # its trials are not fine-tuned in rungs
    OPTIONS = {"epsilon": Option(0.01, float, "damage threshold below which a half is pruned", low=0, low_open=True),
               "probes": Option(2, int, "probe trials per round", low=1),
               "window": Option(10, int, "batches of masking attempts per probe trial", low=1),
               "commit_steps": Option(50, int, "fine-tune steps of the base path per commit", low=0),
               "lr": Option(1e-3, float, "learning rate of the base path's fine-tune", low=0, low_open=True),
               "stagger": Option(0, int, "rounds between the starts of consecutive groups (0: all at once)", low=0),
               "max_rounds": Option(100, int, "most rounds", low=1)}

    def __init__(self, space, cost, **kwargs: Any):
        super().__init__(space, cost, **kwargs)
        self.version = 0                  # model version the next trials start from (0 = base)
        self.round = 0
        self.phase = "probe"              # "probe": collecting damages; "commit": waiting for the next version
        self.alive = {g.name: list(range(g.width)) for g in space.groups}
        self.search = {g.name: list(range(g.width)) for g in space.groups}
        self.stopped: set[str] = set()
        self._reset_damage()
        self.issued = 0                   # trials issued in the current phase
        self.done = 0                     # trials completed in the current phase
        self.loss_evals = 0               # ablated evaluations spent by the probes (per group per batch)
        self.trajectory: list[dict] = []  # committed versions: widths, cost_ratio, val_acc

    # -- state ------------------------------------------------------------------------
    def _reset_damage(self, names=None) -> None:
        names = self.space.names if names is None else names
        if not hasattr(self, "dsum"):
            self.dsum, self.dcount = {}, {}
        for n in names:
            self.dsum[n] = np.zeros(self.space[n].width)
            self.dcount[n] = np.zeros(self.space[n].width, dtype=np.int64)

    def active_groups(self) -> list[str]:
        """Groups searched this round: not stopped, and started (staggered start)."""
        stagger = self.options["stagger"]
        return [g.name for i, g in enumerate(self.space.groups)
                if g.name not in self.stopped and (stagger == 0 or i % stagger <= self.round)]

    def widths(self) -> list[int]:
        return [len(self.alive[n]) for n in self.space.names]

    # -- proposals ----------------------------------------------------------------------
    def _propose(self, trial_id: str):
        if self.phase == "probe":
            if self.issued >= self.options["probes"]:
                return None
            self.issued += 1
            active = self.active_groups()
            payload = {"phase": "probe", "version": self.version, "round": self.round, "window": self.options["window"],
                       "seed": self.seed * 100003 + self.round * 101 + self.issued,
                       "search": {n: self.search[n] for n in active}}
            return self.widths(), payload
        if self.issued >= 1:
            return None
        self.issued = 1
        payload = {"phase": "commit", "version": self.version, "keep": self.alive,
                   "commit_steps": self.options["commit_steps"], "lr": self.options["lr"]}
        return self.widths(), payload

    def _observe(self, trial_id, widths, result, error, value, cost_ratio) -> None:
        if self.phase == "probe":
            if not error and result and "damages" in result:
                damages = json.loads(result["damages"])
                for n, sums in damages["sum"].items():
                    idx = np.asarray(self.search[n])
                    self.dsum[n][idx] += np.asarray(sums)
                    self.dcount[n][idx] += np.asarray(damages["count"][n])
                self.loss_evals += int(result.get("loss_evals", 0))
            self.done += 1
            if self.done >= self.options["probes"]:
                self.decide()
                self.phase, self.issued, self.done = "commit", 0, 0
            return
        if error or not result:  # a commit that failed for good: the search cannot go on
            self._finished = True
            return
        self.version = int(result.get("version", self.version + 1))
        self.trajectory.append({"version": self.version, "widths": self.widths(), "cost_ratio": cost_ratio,
                                "val_acc": result.get("val_acc")})
        self.round += 1
        self.phase, self.issued, self.done = "probe", 0, 0
        budget_met = self.budget is not None and cost_ratio <= self.budget
        if budget_met or len(self.stopped) == len(self.space) or self.round >= self.options["max_rounds"]:
            self._finished = True

    # -- the binary search --------------------------------------------------------------
    def _prunable(self, name: str, k: int) -> int:
        """How many of k candidates may go: the rest stays >= min width and a legal width."""
        group, alive = self.space[name], len(self.alive[name])
        m = min(k, alive - group.min_width)
        while m > 0 and not group.allowed(alive - m):
            m -= 1
        return max(m, 0)

    def decide(self) -> dict[str, str]:
        """Apply one binary-search step to every active group; return what happened per group."""
        outcome = {}
        for n in self.active_groups():
            group, space = self.space[n], np.asarray(self.search[n])
            k = len(space) // 2
            counts = self.dcount[n][space]
            means = np.where(counts > 0, self.dsum[n][space] / np.maximum(counts, 1), np.inf)
            order = np.argsort(means, kind="stable")
            m = self._prunable(n, k)
            if m >= 1 and means[order[m - 1]] < self.options["epsilon"]:
                drop = set(space[order[:m]].tolist())
                self.alive[n] = [c for c in self.alive[n] if c not in drop]
                self.search[n] = list(self.alive[n])
                outcome[n] = f"pruned {len(drop)}"
            elif k > 1:
                self.search[n] = sorted(space[order[:k]].tolist())
                outcome[n] = f"shrunk search to {k}"
            else:
                self.stopped.add(n)
                outcome[n] = "stopped"
            if len(self.alive[n]) <= group.min_width and n not in self.stopped:
                self.stopped.add(n)
                outcome[n] += ", stopped at minimum width"
            self._reset_damage([n])
        return outcome
