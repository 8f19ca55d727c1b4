"""`metapruning_step`: MetaPruning's PruningNet training trial and its candidate trials.

See searchers/metapruning.py for the algorithm and widthsearch/pruningnet.py for the PruningNet.
The PruningNet checkpoint lives in EXP/widthsearch/metapruning/<net>.pt (on a cluster: a shared
path); the training trial writes it every ``every`` steps and, when run again (a retry or
``--resume``), continues from it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ray import tune

from widthsearch.cost import CostModel
from widthsearch.data import DataSplits
from widthsearch.pruningnet import PruningNet, sample_widths
from widthsearch.training import TrainConfig, evaluate, make_optimizer, recalibrate_bn

from .common import Job, profile_fields, run_with_deadline, setup_trial


@dataclass
class MetaPruningJob(Job):
    net_dir: str
    trial_timeout_s: float | None = None


def trial_job(cfg, exp_dir: str, common: dict) -> tuple[Callable, MetaPruningJob]:
    """metapruning_step and its job: PruningNet checkpoints live under EXP/widthsearch/metapruning."""
    return metapruning_step, MetaPruningJob(**common, net_dir=f"{exp_dir}/widthsearch/metapruning",
                                            trial_timeout_s=cfg.trial_timeout_s)


def train_pruningnet(net: PruningNet, data: DataSplits, cost: CostModel, *, steps: int, lr: float,
                     batch_size: int, seed: int, flops: tuple[float, float] = (0.0, 1.0),
                     checkpoint: str | os.PathLike | None = None, every: int = 100,
                     device: torch.device | str = "cpu") -> dict:
    """Stochastic structure sampling: each step a random profile, generated weights, one SGD step on the meta net.

    With `checkpoint`, resumes from it when it exists and saves to it every `every` steps and at the
    end (atomically). Returns {"step", "train_s" (all attempts), "loss" (mean of the last 50 steps)}.
    """
    device = torch.device(device)
    net.to(device).train()
    # SGD skips the generated placeholders (requires_grad=False, never a gradient)
    opt, sched = make_optimizer(net, TrainConfig(lr=lr, batch_size=batch_size), steps)
    start, spent, losses = 0, 0.0, []
    if checkpoint is not None and Path(checkpoint).is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        start, spent = saved["step"], saved["train_s"]
    begun = time.time()

    def save(step: int) -> None:
        if checkpoint is None:
            return
        tmp = Path(f"{checkpoint}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"net": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "step": step, "train_s": spent + time.time() - begun}, tmp)
        os.replace(tmp, checkpoint)

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


def load_pruningnet(job: Job, path: str, hidden: int) -> PruningNet:
    """A PruningNet from a training checkpoint (cached per worker process while the file is unchanged)."""
    key = (path, os.stat(path).st_mtime_ns, hidden)
    if _CACHE.get("key") != key:
        net = PruningNet(job.model, job.space, hidden)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["net"])
        _CACHE.clear()
        _CACHE.update(key=key, net=net.eval())
    return _CACHE["net"]


_CACHE: dict = {}


def metapruning_step(config: dict, job: MetaPruningJob) -> None:
    """One MetaPruning trial: PruningNet training (payload phase "train") or one candidate's score."""
    run_with_deadline(job.trial_timeout_s, lambda: _step(config, job))


def _step(config: dict, job: MetaPruningJob) -> None:
    started = time.time()
    device, node = setup_trial()
    data = job.splits()
    payload = json.loads(config["payload"])
    fixed = {**profile_fields(job, config["widths"], "metapruning", node, started, config["payload"]),
             "finetune_steps": 0}
    path = f"{job.net_dir}/{payload['net']}.pt"
    if payload["phase"] == "train":
        net = PruningNet(job.model, job.space, payload["hidden"])
        info = train_pruningnet(net, data, job.cost, steps=payload["steps"], lr=payload["lr"],
                                batch_size=job.batch_size, seed=payload["seed"],
                                flops=(payload["flops_min"], payload["flops_max"]), checkpoint=path,
                                every=payload["every"], device=device)
        tune.report({**fixed, "status": "train", "score": float("nan"), "checkpoint": path,
                     "train_steps": info["step"], "train_s": info["train_s"], "train_loss": info["loss"],
                     "wall_s": time.time() - started})
        return
    net = load_pruningnet(job, path, payload["hidden"]).to(device)
    acc, loss = score_widths(net, config["widths"], data, bn_batches=job.bn_batches, batch_size=job.batch_size,
                             seed=job.seed, device=device)
    tune.report({**fixed, "score": acc, "val_acc": acc, "val_loss": loss, "wall_s": time.time() - started})
