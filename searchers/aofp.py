"""AOFP: Approximated Oracle Filter Pruning (Ding, Ding, Guo, Han, Yan; ICML 2019; code: DingXiaoH/AOFP).

Oracle pruning ranks a filter by the damage done when it alone is removed: accurate but one
evaluation per filter. AOFP approximates it with a binary search per layer (here: per channel
group). Each group keeps a *search space* S of candidate channels (first all alive channels).
Pruning attempts mask a random half of S in every searched group at once, on every batch; the
damage t = ||y - y'||^2 / ||y||^2 is taken where the authors take it, at the output of the
next layer's BatchNorm and ReLU (base and ablated paths share weights; BN with the batch's
statistics, as in their training-time forward; see trainables.aofp.MeasurePoint for consumers
without BN or ReLU: the classifier and a conv feeding an addition are measured at their raw
output), and is added to every masked channel's running sum and count. After a half's batches
the k = |S|//2 channels with the smallest mean damage (never-sampled ones last) are tested: if
the k-th smallest mean is below epsilon, they are masked for good and S is reset to the
remaining channels; else, if k > 1, S shrinks to those k; else the pass failed and, as in the
authors' code, S is reset to all alive channels and the search starts over (the weights have
moved since, so damages differ). The widths are found, not given: with a budget, the search
stops as soon as the measure ratio of the committed widths is at or below it; without one,
when every group has stopped.

Batches per decision. Every decision rests on ``probes x window`` batches (default 2 x 250 =
500 batches of 128 images, the authors' 1000 iterations x 64 images per half). Fewer do not
rank the filters reproducibly: on the bench's cifar_resnet20 (first pass, all filters in S),
two independent runs rank a group's filters with a median Spearman (over the 12 groups) of
0.23 at 20 batches, 0.61 at 100, 0.75 at 200 and 0.88 at 500 (0.72 to 0.95 per group); see
``python bench/aofp.py --agreement`` and bench/results/aofp/agreement.json.

How it runs on Ray Tune (trainable ``aofp`` in trainables/aofp.py), the authors' multi-path
training mapped onto trials. A *round* is one half of every active group:

* ``probes`` parallel *probe* trials (rows with status ``probe``) take consecutive slices of
  ``window`` batches of the round's train stream and make the pruning attempts on the current
  model version, reporting per-channel damage sums and counts;
* one *commit* trial trains the base path on exactly those batches, in order, at a constant
  learning rate ``lr`` (1e-3 as in the paper) with the momentum carried over from version to
  version and the masked channels held at zero (gradient masks, as the authors'), then applies
  the round's decisions (masking for good) and writes the next model version (rows with status
  ``ok``: widths after the decisions, val accuracy right after masking, ``finetune_steps`` 0);
* once the search ends, one *final* trial fine-tunes the last version as the authors do after
  AOFP (``finetune_steps`` at ``finetune_lr``, cosine; the search's flags) and is its last row
  (status ``ok``), whose payload says why the search ended: ``budget_met`` and ``stop``, the
  message naming every group that could not be pruned further and why. The same message is
  logged. ``widthsearch retrain`` picks the final row (the most fine-tune steps in the budget).

``suggest`` returns None while a round or a commit is in flight.

Deviations, stated: (1) per batch, the authors make the attempts with the weights as updated by
the previous batch; here the probes see the version's weights for the whole round and the commit
then trains on the same batches (at lr 1e-3 the weights move little within a half), so that the
attempts parallelise across trials. (2) All searched groups decide at the end of each round; the
authors' halves are per layer, their starts spread over one half (``stagger`` delays group i's
start to round i mod stagger; 0 = all at once); no warm-up before the first attempts (theirs:
500 iterations). (3) Searched units are DepGraph channel groups, so a residual stream is searched
as one unit with its damages summed over all its consumers; the authors search only the first
conv of each ResNet block. (4) A group stops after ``patience`` failed passes in a row (k = 1
test failed), and at its smallest allowed width (min width, divisor: the tested count may be
smaller than k); the authors restart without end until their fixed training length is spent; we
stop so that a search that cannot reach the budget ends, with its message. (5) The base path
uses the project's SGD (Nesterov, weight decay 5e-4); the authors use plain momentum, weight
decay 1e-4 and twice the learning rate for biases. (6) The budget is checked after every commit
(the authors: after every epoch); the final fine-tune is the search's short one (theirs: 600
epochs; ``widthsearch retrain`` trains longer). (7) ``max_rounds`` and ``--num-samples`` bound
the search; when ``--num-samples`` leaves no room for another round and the final trial, the search
ends there (the final trial runs) with a message that says so and estimates, from the pace of the
last rounds, how many more trials the budget needs. (8) The authors reach a target size by choosing
epsilon by hand; here, while a budget is not met, a group whose pass fails (k = 1) or prunes less
than a quarter of its filters (several halvings for a few filters) has its epsilon multiplied by
``relax`` (2 by default; 1 keeps the authors' fixed threshold, and ``patience`` then stops the
group), so that a budget below what the initial epsilon allows is reached in a bounded number of
rounds instead of stalling; the damages still rank the filters within each group.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np

from .base import WidthSearcher

logger = logging.getLogger(__name__)


class AofpSearcher(WidthSearcher):
    """Binary search for the least important filters by accumulated random-masking damage."""

    name = "aofp"
    trainable = "aofp"
    enforce_budget = False
    promotes = False  # its trials are not fine-tuned in rungs


    def __init__(self, space, cost, **kwargs: Any):
        super().__init__(space, cost, **kwargs)
        self.version = 0                  # model version the next trials start from (0 = base)
        self.round = 0
        self.phase = "probe"              # "probe" -> "commit" -> "probe" ... -> "final"
        self.alive = {g.name: list(range(g.width)) for g in space.groups}
        self.search = {g.name: list(range(g.width)) for g in space.groups}
        self.train_keep = self.alive      # the masks the base path trains under in the next commit
        self.stopped: dict[str, str] = {}  # group -> why it stopped
        self.failed_passes = {g.name: 0 for g in space.groups}
        self.epsilon = {g.name: float(self.options["epsilon"]) for g in space.groups}  # grows with `relax`
        self.trials = 0                   # trials issued in all
        self.ratios: list[float] = []     # measure ratio after each commit (the pace, for running-out messages)
        self.last_test: dict[str, float] = {}  # group -> smallest mean damage at its last failed k = 1 test
        self.dsum = {g.name: np.zeros(g.width) for g in space.groups}
        self.dcount = {g.name: np.zeros(g.width, dtype=np.int64) for g in space.groups}
        self.issued = 0                   # trials issued in the current phase
        self.done = 0                     # trials completed in the current phase
        self.probes_ok = 0                # probe trials of the round that reported damages
        self.loss_evals = 0               # ablated evaluations spent by the probes (per group per batch)
        self.trajectory: list[dict] = []  # committed versions: widths, cost_ratio, val_acc
        self.budget_met = False
        self.stop_message: str | None = None  # why the search ended (the final trial's payload "stop")
        for g in space.groups:
            if not self._can_shrink(g.name):
                self.stopped[g.name] = f"at its smallest allowed width {g.width}"

    # -- state ------------------------------------------------------------------------
    def active_groups(self) -> list[str]:
        """Groups searched this round: not stopped, and started (staggered start)."""
        stagger = self.options["stagger"]
        return [g.name for i, g in enumerate(self.space.groups)
                if g.name not in self.stopped and (stagger == 0 or i % stagger <= self.round)]

    def widths(self) -> list[int]:
        return [len(self.alive[n]) for n in self.space.names]

    def round_seed(self) -> int:
        """Seed of the round's train stream (probes take slices of it; the commit trains on all of it)."""
        return int(np.random.SeedSequence([self.seed, self.round]).generate_state(1)[0])

    # -- proposals ----------------------------------------------------------------------
    def _propose(self, trial_id: str):
        if self.issued >= (self.options["probes"] if self.phase == "probe" else 1):
            return None
        if self.phase == "probe" and self.issued == 0 and self._out_of_trials():
            self._end(self._running_out())
        self.issued += 1
        self.trials += 1
        if self.phase == "probe":
            window = self.options["window"]
            payload = {"phase": "probe", "version": self.version, "round": self.round, "seed": self.round_seed(),
                       "offset": (self.issued - 1) * window, "window": window,
                       "search": {n: self.search[n] for n in self.active_groups()}}
        elif self.phase == "commit":
            payload = {"phase": "commit", "version": self.version, "round": self.round, "seed": self.round_seed(),
                       "steps": self.options["probes"] * self.options["window"], "lr": self.options["lr"],
                       "train_keep": self.train_keep, "keep": self.alive}
        else:
            payload = {"phase": "final", "version": self.version, "keep": self.alive, "budget_met": self.budget_met,
                       "stop": self.stop_message}
        return self.widths(), payload

    def _observe(self, trial_id, widths, result, error, value, cost_ratio) -> None:
        if self.phase == "probe":
            self._observe_probe(result if not error else None)
        elif self.phase == "commit":
            self._observe_commit(result if not error else None, cost_ratio)
        else:
            self._finished = True

    def _observe_probe(self, result: dict | None) -> None:
        if result and "damages" in result:
            damages = json.loads(result["damages"])
            for n, sums in damages["sum"].items():
                idx = np.asarray(self.search[n])
                self.dsum[n][idx] += np.asarray(sums)
                self.dcount[n][idx] += np.asarray(damages["count"][n])
            self.loss_evals += int(result.get("loss_evals", 0))
            self.probes_ok += 1
        self.done += 1
        if self.done < self.options["probes"]:
            return
        if self.probes_ok == 0:
            self._end(f"every probe trial of round {self.round} failed (see their error rows)")
            return
        outcome = self.decide()
        logger.info("aofp round %d: %s", self.round, "; ".join(f"{n}: {o}" for n, o in outcome.items()))
        self._next("commit")

    def _observe_commit(self, result: dict | None, cost_ratio: float) -> None:
        if not result:  # failed for good: the last version stands
            self.alive = self.train_keep
            self._end(f"the commit trial of round {self.round} failed (see its error row)")
            return
        self.version = int(result.get("version", self.version + 1))
        self.train_keep = self.alive
        self.trajectory.append({"version": self.version, "widths": self.widths(), "cost_ratio": cost_ratio,
                                "val_acc": result.get("val_acc")})
        self.ratios.append(cost_ratio)
        self.round += 1
        if self.budget is not None and cost_ratio <= self.budget:
            self.budget_met = True
            self._end(None)
        elif len(self.stopped) == len(self.space):
            self._end("no group can be pruned further")
        elif self.round >= self.options["max_rounds"]:
            self._end(f"max_rounds={self.options['max_rounds']} reached")
        else:
            self._next("probe")

    def _out_of_trials(self) -> bool:
        """True when --num-samples leaves no room for another round (probes + commit) and the final trial."""
        return self.num_samples is not None and self.num_samples - self.trials < self.options["probes"] + 2

    def _running_out(self) -> str:
        """Why the search ends early: the trials ran out; how many more a search would need at its pace so far."""
        now, per_round = self.cost_ratio(self.widths()), self.options["probes"] + 1
        text = f"num_samples={self.num_samples} ran out after {self.round} rounds"
        recent = self.ratios[-10:]
        if self.budget is None or len(recent) < 2 or recent[0] <= recent[-1]:
            return text + " (no estimate of the trials still needed: too little progress to extrapolate)"
        rounds = math.ceil((now - self.budget) / ((recent[0] - recent[-1]) / (len(recent) - 1)))
        return (text + f"; at the pace of its last {len(recent)} rounds it needs about {rounds * per_round} more "
                f"trials ({rounds} rounds of {per_round}): raise --num-samples (or the epsilon/relax options)")

    def _next(self, phase: str) -> None:
        self.phase, self.issued, self.done, self.probes_ok = phase, 0, 0, 0

    def _end(self, reason: str | None) -> None:
        """Go to the final trial, with the message saying why the search ended (logged)."""
        ratio = self.cost_ratio(self.widths())
        unit = self.measure.unit
        where = f"{unit} ratio {ratio:.4f} at version {self.version}"
        if self.budget_met:
            self.stop_message = f"budget {self.budget:g} met: {where}"
        else:
            head = f"budget {self.budget:g} not met ({where})" if self.budget is not None else f"search ended ({where})"
            groups = [f"{n} ({why})" for n, why in self.stopped.items()]
            searching = [n for n in self.space.names if n not in self.stopped]
            self.stop_message = (f"{head}: {reason}; groups that cannot be pruned further: "
                                 f"{', '.join(groups) or 'none'}"
                                 + (f"; still searching: {', '.join(searching)}" if searching else ""))
        (logger.info if self.budget_met or self.budget is None else logger.warning)("aofp: %s", self.stop_message)
        self._next("final")

    # -- the binary search --------------------------------------------------------------
    def _prunable(self, name: str, k: int) -> int:
        """How many of k candidates may go: the rest stays >= min width and a legal width."""
        group, alive = self.space[name], len(self.alive[name])
        m = min(k, alive - group.min_width)
        while m > 0 and not group.allowed(alive - m):
            m -= 1
        return max(m, 0)

    def _can_shrink(self, name: str) -> bool:
        return self._prunable(name, len(self.alive[name])) > 0

    def _relax(self, name: str) -> bool:
        """Raise a group's epsilon by `relax` while a budget is not met; False when it does not apply."""
        if self.budget is None or self.options["relax"] <= 1:
            return False
        self.epsilon[name] *= self.options["relax"]
        return True

    def decide(self) -> dict[str, str]:
        """Apply one binary-search step to every active group; return what happened per group."""
        self.train_keep = {n: list(c) for n, c in self.alive.items()}
        outcome, dropped = {}, []
        for n in self.active_groups():
            space = np.asarray(self.search[n])
            k = len(space) // 2
            counts = self.dcount[n][space]
            means = np.where(counts > 0, self.dsum[n][space] / np.maximum(counts, 1), np.inf)
            order = np.argsort(means, kind="stable")
            m = self._prunable(n, k)
            if m >= 1 and means[order[m - 1]] < self.epsilon[n]:
                drop = set(space[order[:m]].tolist())
                dropped += [(float(means[i]), n, int(space[i])) for i in order[:m]]
                if 4 * len(drop) < len(self.alive[n]):
                    self._relax(n)  # a slow pass: several halvings for a few filters
                self.alive[n] = [c for c in self.alive[n] if c not in drop]
                self.search[n] = list(self.alive[n])
                self.failed_passes[n] = 0
                outcome[n] = f"pruned {len(drop)}"
                if not self._can_shrink(n):
                    self.stopped[n] = f"at its smallest allowed width {len(self.alive[n])}"
                    outcome[n] += ", stopped at its smallest allowed width"
            elif k > 1 and self._prunable(n, k // 2) >= 1:
                self.search[n] = sorted(space[order[:k]].tolist())
                outcome[n] = f"shrunk search to {k}"
            else:
                self.failed_passes[n] += 1
                self.last_test[n] = float(means[order[max(m, 1) - 1]])
                self.search[n] = list(self.alive[n])
                outcome[n] = f"pass failed ({self.failed_passes[n]} in a row), search restarts"
                if self._relax(n):
                    self.failed_passes[n] = 0
                    outcome[n] += f" with epsilon {self.epsilon[n]:.4g}"
                elif self.failed_passes[n] >= self.options["patience"]:
                    self.stopped[n] = (f"no filter's mean damage below epsilon={self.epsilon[n]:g} in "
                                       f"{self.failed_passes[n]} passes in a row; the last test found "
                                       f"{self.last_test[n]:.4g}")
                    outcome[n] = f"stopped: {self.stopped[n]}"
            self.dsum[n][:] = 0
            self.dcount[n][:] = 0
        self._spare_past_budget(dropped, outcome)
        return outcome

    def _spare_past_budget(self, dropped: list[tuple[float, str, int]], outcome: dict[str, str]) -> None:
        """When a round's decisions take the widths below the budget, give back the most damaging of its filters
        for as long as the budget still holds (all groups decide at once, so the last round may overshoot)."""
        if self.budget is None or not dropped or self.cost_ratio(self.widths()) >= self.budget:
            return
        spared = 0
        for _, n, c in sorted(dropped, reverse=True):
            trial = sorted(self.alive[n] + [c])
            if not self.space[n].allowed(len(trial)):
                continue
            before, self.alive[n] = self.alive[n], trial
            if self.cost_ratio(self.widths()) > self.budget:
                self.alive[n] = before
            else:
                spared += 1
                self.search[n] = list(self.alive[n])
        if spared:
            outcome["budget"] = f"{spared} filter(s) spared: the round's decisions went past the budget"
