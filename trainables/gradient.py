"""`gate_trial`: one gate optimisation for one penalty lam, then extraction and scoring (searcher `gradient`).

The payload (from searchers/gradient.py, read as proposed) carries lam and the gate schedule. The
trial learns the gates on the train split with the base weights frozen (widthsearch/gates.py), keeps
the channels with p > 0.5, prunes exactly those (surgery with explicit indices), then runs
adaptive BN, `finetune_steps` of fine-tuning and scores on val, like score_profile.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np

from widthsearch.gates import extract, optimize_gates
from widthsearch.surgery import prune

from . import score
from .common import Phases, begin_trial, profile_fields, run_with_deadline
from .score import ScoreJob, finetune_and_report

def trial_job(cfg, exp_dir: str, common: dict) -> tuple[Callable, ScoreJob]:
    """gate_trial and the same job score_profile gets (fine-tune steps and lr, timeout)."""
    return gate_trial, score.trial_job(cfg, exp_dir, common)[1]


def gate_trial(config: dict, job: ScoreJob) -> None:
    """Gates for config's lam -> keep p > 0.5 -> prune -> adaptive BN -> fine-tune -> val score -> report.

    Reports what score_profile reports, plus lam and expected_ratio (the complexity ratio of the
    expected widths at the end of the gate optimisation); the payload adds the kept channels ("keep").
    """
    run_with_deadline(job.trial_timeout_s, lambda: _run(config, job))


def _run(config: dict, job: ScoreJob) -> None:
    phases = Phases()
    device, node, data, started = begin_trial(job)
    request = config["payload"]  # from GradientSearcher: lam, schedule (a GateSchedule), complexity, budget, seed
    seed = job.seed + request["seed"]
    work = copy.deepcopy(job.model).to(device)
    stream = data.stream("train", job.batch_size, seed=seed, augment=False, device=device)
    complexity = job.measure if request["complexity"] == "budget" else job.cost.measure(request["complexity"])
    gates = optimize_gates(work, job.space, complexity, stream, request["lam"], request["schedule"], seed)
    gate_s = time.time() - started
    keep = extract(job.space, gates.logits, job.measure, request["budget"])
    gate_widths = [int((a > 0).sum()) for a in gates.logits]
    profile = {name: len(idxs) for name, idxs in keep.items()}
    model = prune(job.model, job.space, keep=keep).to(device)
    payload = {**request, "keep": keep, "expected_ratio": gates.expected_ratio, "gate_task_loss": gates.task_loss,
               "gate_s": gate_s}
    fields = {**profile_fields(job, job.space.vector(profile).tolist(), "gate", node, started, payload),
              "lam": request["lam"], "expected_ratio": gates.expected_ratio,
              "gate_ratio": job.measure.ratio(np.maximum(gate_widths, job.space.min_widths))}
    phases.seconds["gates"] = time.time() - started
    finetune_and_report(model, job, data, device, fields, started, phases)
