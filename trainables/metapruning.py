"""`metapruning_step`: MetaPruning's PruningNet training trial and its candidate trials.

See searchers/metapruning.py for the algorithm and widthsearch/pruningnet.py for the PruningNet.
The PruningNet checkpoint is EXP/widthsearch/metapruning/<net>.pt, read and written through
:class:`~widthsearch.storage.Storage` (a local path, a shared path or a URI such as s3://);
the training trial writes it every ``every`` steps and, when run again (a retry after a
failure or a timeout, or ``--resume``), continues from it. Both kinds of trial fail with a
TimeoutError past ``trial_timeout_s`` (``run_with_deadline``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from ray import tune

from widthsearch.cost import CostModel
from widthsearch.data import DataSplits
from widthsearch.pruningnet import PruningNet, sample_widths
from widthsearch.storage import Storage
from widthsearch.training import TrainConfig, evaluate, make_optimizer, recalibrate_bn

from .common import Job, Phases, begin_trial, profile_fields, run_with_deadline


@dataclass
class MetaPruningJob(Job):
    exp_dir: str                          # the experiment (local path or URI); checkpoints under widthsearch/metapruning/
    trial_timeout_s: float | None = None  # a trial running longer fails with a TimeoutError


def trial_job(cfg, exp_dir: str, common: dict) -> tuple[Callable, MetaPruningJob]:
    """metapruning_step and its job: PruningNet checkpoints live under EXP/widthsearch/metapruning."""
    return metapruning_step, MetaPruningJob(**common, exp_dir=exp_dir, trial_timeout_s=cfg.trial_timeout_s)


def checkpoint_name(net: str) -> str:
    """The PruningNet checkpoint of `net`, relative to EXP/widthsearch."""
    return f"metapruning/{net}.pt"


def train_pruningnet(net: PruningNet, data: DataSplits, cost: CostModel, *, steps: int, lr: float,
                     batch_size: int, seed: int, flops: tuple[float, float] = (0.0, 1.0),
                     store: Storage | None = None, name: str = "", every: int = 100,
                     device: torch.device | str = "cpu") -> dict:
    """Stochastic structure sampling: each step a random profile, generated weights, one SGD step on the meta net.

    With `store`, resumes from widthsearch/<name> when it exists and saves there (atomically)
    every `every` steps and at the end; the checkpoint also holds the net's channel order and
    hidden size. Returns {"step", "train_s" (all attempts), "loss" (mean of the last 50 steps)}.
    """
    device = torch.device(device)
    net.to(device).train()
    # SGD skips the generated placeholders (requires_grad=False, never a gradient)
    opt, sched = make_optimizer(net, TrainConfig(lr=lr, batch_size=batch_size), steps)
    start, spent, losses = 0, 0.0, []
    saved = store.load_torch(name, map_location=device) if store is not None else None
    if saved is not None:
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        start, spent = saved["step"], saved["train_s"]
    begun = time.time()

    def save(step: int) -> None:
        if store is not None:
            store.save_torch(name, {"net": net.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "order": net.order, "hidden": net.hidden,
                                    "step": step, "train_s": spent + time.time() - begun})

    rng = np.random.default_rng([seed, start])
    stream = data.stream("train", batch_size, seed=seed + start, device=device)
    for step in range(start, steps):
        widths = sample_widths(net.space, rng, 1, cost, flops)[0]
        x, y = next(stream)
        loss = F.cross_entropy(net.logits(widths, x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 and step + 1 < steps:
            save(step + 1)
    save(max(start, steps))
    return {"step": max(start, steps), "train_s": spent + time.time() - begun,
            "loss": float(np.mean(losses[-50:])) if losses else float("nan")}


def score_widths(net: PruningNet, widths, data: DataSplits, *, bn_batches: int, batch_size: int, seed: int,
                 device: torch.device | str = "cpu") -> tuple[float, float]:
    """Val accuracy and loss of the profile with generated weights and recalibrated BN (no fine-tuning)."""
    model = net.materialize(widths).to(device)
    recalibrate_bn(model, data, bn_batches, batch_size, seed=seed, device=device)
    return evaluate(model, data, "val", device=device)


def load_pruningnet(job: Job, store: Storage, name: str) -> PruningNet:
    """The PruningNet of a training checkpoint (cached per worker process while the file is unchanged)."""
    info = store.fs.get_file_info(store.path(name))
    key = (store.uri(name), info.mtime_ns, info.size)
    if _CACHE.get("key") != key:
        saved = store.load_torch(name)
        if saved is None:
            raise FileNotFoundError(f"no PruningNet checkpoint at {store.uri(name)}")
        net = PruningNet(job.model, job.space, saved["hidden"], order=saved["order"])
        net.load_state_dict(saved["net"])
        _CACHE.clear()
        _CACHE.update(key=key, net=net.eval())
    return _CACHE["net"]


_CACHE: dict = {}


def metapruning_step(config: dict, job: MetaPruningJob) -> None:
    """One MetaPruning trial: PruningNet training (payload phase "train") or one candidate's score; fails
    with TimeoutError("trial exceeded trial_timeout_s=...") past job.trial_timeout_s."""
    run_with_deadline(job.trial_timeout_s, lambda: _step(config, job))


def _step(config: dict, job: MetaPruningJob) -> None:
    phases = Phases()
    device, node, data, started = begin_trial(job)
    payload = config["payload"]
    fixed = {**profile_fields(job, config["widths"], "metapruning", node, started, payload), "steps_reached": 0}
    store, name = Storage(job.exp_dir), checkpoint_name(payload["net"])
    if payload["phase"] == "train":
        net = PruningNet(job.model, job.space, payload["hidden"], order=payload["order"])
        info = train_pruningnet(net, data, job.cost, steps=payload["steps"], lr=payload["lr"],
                                batch_size=job.batch_size, seed=payload["seed"],
                                flops=(payload["flops_min"], payload["flops_max"]), store=store, name=name,
                                every=payload["every"], device=device)
        tune.report({**fixed, "status": "train", "score": float("nan"), "checkpoint": store.uri(name),
                     "train_steps": info["step"], "train_s": info["train_s"], "train_loss": info["loss"],
                     "wall_s": time.time() - started, "cpu_s": phases.cpu_s()})
        return
    net = load_pruningnet(job, store, name).to(device)
    acc, loss = score_widths(net, config["widths"], data, bn_batches=payload["bn_batches"],
                             batch_size=job.batch_size, seed=job.seed, device=device)
    tune.report({**fixed, "score": acc, "val_acc": acc, "val_loss": loss, "wall_s": time.time() - started,
                 "cpu_s": phases.cpu_s()})
