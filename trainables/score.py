"""`score_profile`: the trial that scores one width profile on the validation split."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from ray import tune
from torch import nn

from widthsearch.data import DataSplits
from widthsearch.training import StepTrainer, TrainConfig, bn_statistics_share, evaluate, recalibrate_bn

from .common import Job, Phases, begin_trial, profile_fields, pruned_model, run_with_deadline


# Adaptive BN is skipped where the fine-tune before the first evaluation leaves the re-estimated statistics less
# than this share of the running ones (BatchNorm momentum 0.1: from 44 steps on; the default 50 steps leave 0.5%):
# training normalises with each batch's own statistics, so there it would only cost time (13% of the trials' time in a
# 16-trial, 50-step search on cifar_resnet20 at FLOPs 0.1; skipping it took the trials from 139 to 121 CPU-seconds,
# bench/RESULTS.md "Where a trial's time goes").
STALE_BN_SHARE = 0.01


@dataclass
class ScoreJob(Job):
    finetune_steps: int
    finetune_lr: float
    rungs: list[int]                  # fine-tune steps at which to report (the last = finetune_steps, the setting)
    score: str = "val_acc"            # "val_acc", or "val_loss" (score = -loss)
    trial_timeout_s: float | None = None  # the trial fails with a TimeoutError past this many seconds


def trial_job(cfg, exp_dir: str, common: dict) -> tuple[Callable, ScoreJob]:
    """score_profile and its job, from a SearchConfig and the fields every Job shares."""
    return score_profile, ScoreJob(**common, finetune_steps=cfg.finetune_steps, finetune_lr=cfg.finetune_lr,
                                   rungs=cfg.rungs(), score=cfg.score, trial_timeout_s=cfg.trial_timeout_s)


def score_profile(config: dict, job: ScoreJob) -> None:
    """Prune to config["widths"] -> adaptive BN -> fine-tune k steps -> evaluate on val -> report.

    Reports score (val accuracy, or -val loss), first_score, val_acc, val_loss, flops, params, flops_ratio, widths,
    steps_reached (the fine-tune steps behind the score), criterion, wall_s, node, started_at and the searcher's
    payload. A trial still
    running after job.trial_timeout_s seconds fails with TimeoutError("trial exceeded trial_timeout_s=...").
    """
    run_with_deadline(job.trial_timeout_s, lambda: _score(config, job))


def _score(config: dict, job: ScoreJob) -> None:
    """The body of score_profile. A config under "candidate" (a re-scoring run's grid) may name the exact channels
    a searcher chose ("keep", and "weights" they come from), as `widthsearch retrain` builds them."""
    config = config.get("candidate", config)
    phases = Phases()
    with phases("setup"):
        device, node, data, started = begin_trial(job)
    with phases("prune"):
        model = pruned_model(job, config["widths"], data, device, config.get("keep"), config.get("weights"))
        criterion = job.criterion if config.get("keep") is None else "chosen"
        fields = profile_fields(job, config["widths"], criterion, node, started, config.get("payload"))
    finetune_and_report(model, job, data, device, fields, started, phases)


def finetune_and_report(model: nn.Module, job: ScoreJob, data: DataSplits, device: torch.device, fields: dict,
                        started: float, phases: Phases | None = None) -> None:
    """Adaptive BN (unless the fine-tune to the first rung makes it moot: STALE_BN_SHARE), then one fine-tune of
    job.finetune_steps (one schedule), reporting val at each rung.

    Every report carries the score at the current fidelity (`score`, `steps_reached`), the
    score at the first rung (`first_score`), which every trial reaches, for searchers that must
    compare trials at one fidelity while a promotion scheduler stops most of them early, and
    `phase_s`, the seconds spent so far in each phase (setup, prune, bn, finetune, eval).
    """
    phases = phases or Phases()
    if bn_statistics_share(model, job.rungs[0]) >= STALE_BN_SHARE:
        with phases("bn"):
            recalibrate_bn(model, data, job.bn_batches, job.batch_size, seed=job.seed, device=device)
    trainer = StepTrainer(model, data, job.finetune_steps, TrainConfig(lr=job.finetune_lr, batch_size=job.batch_size),
                          seed=job.seed, device=device)
    first = None
    for rung in job.rungs:
        with phases("finetune"):
            trainer.run(rung - trainer.done)
        with phases("eval"):
            acc, loss = evaluate(model, data, "val", device=device)
        score = acc if job.score == "val_acc" else -loss
        first = score if first is None else first
        tune.report({**fields, "score": score, "first_score": first, "val_acc": acc, "val_loss": loss,
                     "steps_reached": rung, "wall_s": time.time() - started, "phase_s": dict(phases.seconds),
                     "cpu_s": phases.cpu_s()})
