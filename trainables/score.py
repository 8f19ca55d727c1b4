"""`score_profile`: the trial that scores one width profile on the validation split."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from ray import tune
from torch import nn

from widthsearch.data import DataSplits
from widthsearch.surgery import prune
from widthsearch.training import TrainConfig, evaluate, recalibrate_bn, train

from .common import Job, cached_data, importance_batches, profile_fields, run_with_deadline, setup_trial


@dataclass
class ScoreJob(Job):
    finetune_steps: int
    finetune_lr: float
    report_every: int | None = None   # fine-tune in chunks and report each (for ASHA)
    trial_timeout_s: float | None = None  # the trial fails with a TimeoutError past this many seconds


def trial_job(cfg, exp_dir: str, common: dict) -> tuple[Callable, ScoreJob]:
    """score_profile and its job, from a SearchConfig and the fields every Job shares."""
    return score_profile, ScoreJob(**common, finetune_steps=cfg.finetune_steps, finetune_lr=cfg.finetune_lr,
                                   report_every=max(1, cfg.finetune_steps // 4) if cfg.asha else None,
                                   trial_timeout_s=cfg.trial_timeout_s)


def score_profile(config: dict, job: ScoreJob) -> None:
    """Prune to config["widths"] -> adaptive BN -> fine-tune k steps -> evaluate on val -> report.

    Reports score (= val accuracy), val_acc, val_loss, flops, params, flops_ratio, widths,
    finetune_steps, criterion, wall_s, node, started_at and the searcher's payload. A trial still
    running after job.trial_timeout_s seconds fails with TimeoutError("trial exceeded trial_timeout_s=...").
    """
    run_with_deadline(job.trial_timeout_s, lambda: _score(config, job))


def _score(config: dict, job: ScoreJob) -> None:
    """The body of score_profile."""
    started = time.time()
    device, node = setup_trial()
    data = cached_data(job.data, job.val_fraction, job.seed)
    profile = job.space.from_vector(config["widths"])
    model = prune(job.model, job.space, profile, job.criterion,
                  importance_batches(job, data, device), seed=job.seed).to(device)
    fields = profile_fields(job, config["widths"], job.criterion, node, started, config.get("payload"))
    finetune_and_report(model, job, data, device, fields, started)


def finetune_and_report(model: nn.Module, job: ScoreJob, data: DataSplits, device: torch.device, fields: dict,
                        started: float) -> None:
    """Adaptive BN, then fine-tune job.finetune_steps in chunks of job.report_every, reporting val after each."""
    recalibrate_bn(model, data, job.bn_batches, job.batch_size, seed=job.seed, device=device)
    chunk = job.report_every or job.finetune_steps
    done = 0
    while True:
        step = min(chunk, job.finetune_steps - done)
        if step > 0:
            train(model, data, steps=step, config=TrainConfig(lr=job.finetune_lr, batch_size=job.batch_size),
                  seed=job.seed + done, device=device)
            done += step
        acc, loss = evaluate(model, data, "val", device=device)
        tune.report({**fields, "score": acc, "val_acc": acc, "val_loss": loss, "finetune_steps": done,
                     "wall_s": time.time() - started})
        if done >= job.finetune_steps:
            return
