"""`retrain_profile`: the long training of a chosen profile, reporting every epoch (resumable)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from ray import tune

from widthsearch.models import load_model
from widthsearch.surgery import prune
from widthsearch.training import TrainConfig, evaluate, train

from .common import Job, begin_trial, pruned_model, run_with_deadline


@dataclass
class RetrainJob(Job):
    widths: list
    epochs: int
    lr: float
    from_scratch: bool
    model_source: str
    num_classes: int
    in_channels: int
    keep: dict | None = None      # explicit channels kept (searchers that choose channels, e.g. aofp)
    weights: str | None = None    # dense-shaped weights those channels come from
    trial_timeout_s: float | None = None  # the retrain fails with a TimeoutError past this many seconds


def build_pruned(job: RetrainJob, device: torch.device) -> torch.nn.Module:
    """The profile's model: pruned from the base weights, or freshly initialised (from scratch)."""
    profile = job.space.from_vector(job.widths)
    if job.from_scratch:
        torch.manual_seed(job.seed)
        fresh = load_model(job.model_source, job.num_classes, in_channels=job.in_channels)
        return prune(fresh, job.space, profile, "l1").to(device)
    return pruned_model(job, job.widths, job.splits(), device, job.keep, job.weights)


def retrain_profile(config: dict, job: RetrainJob) -> None:
    """Train the profile for `epochs`, report val metrics each epoch with a checkpoint; test at the end.

    A retrain still running after job.trial_timeout_s seconds fails with TimeoutError (its per-epoch
    checkpoints are kept, so a rerun continues from the last one).
    """
    run_with_deadline(job.trial_timeout_s, lambda: _retrain(job))


def _retrain(job: RetrainJob) -> None:
    """The body of retrain_profile."""
    device, node, data, started = begin_trial(job)
    model = build_pruned(job, device)
    start_epoch, state = 0, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / "state.pt", map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        start_epoch, state = saved["epoch"] + 1, saved["train_state"]

    def on_epoch(epoch: int, train_loss: float, train_state: dict) -> None:
        acc, loss = evaluate(model, data, "val", device=device)
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": acc, "val_loss": loss,
                   "node": node, "wall_s": time.time() - started}
        if epoch + 1 == job.epochs:  # the test split is used here only, for the final report
            metrics["test_acc"], metrics["test_loss"] = evaluate(model, data, "test", device=device)
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"model": model.state_dict(), "epoch": epoch, "train_state": train_state},
                       Path(folder) / "state.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    train(model, data, epochs=job.epochs, config=TrainConfig(lr=job.lr, batch_size=job.batch_size),
          seed=job.seed, device=device, start_epoch=start_epoch, state=state, on_epoch=on_epoch)
