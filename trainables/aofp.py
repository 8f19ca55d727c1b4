"""`aofp_step`: AOFP's probe trials (masking attempts, damage per channel) and commit trials.

See searchers/aofp.py for the algorithm. Model versions are dense-shaped state dicts with
the pruned channels held at zero, in `versions_dir` (on a cluster: a shared path).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ray import tune
from torch import nn

from widthsearch.models import save_checkpoint
from widthsearch.space import WidthSpace, dependency_graph, root_group
from widthsearch.surgery import zero_channels
from widthsearch.training import TrainConfig, evaluate, make_optimizer

from .common import Job, setup_trial

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class AofpJob(Job):
    versions_dir: str


def trial_job(cfg, exp_dir: str, common: dict) -> tuple[Callable, AofpJob]:
    """aofp_step and its job: model versions live under EXP/widthsearch/aofp."""
    return aofp_step, AofpJob(**common, versions_dir=f"{exp_dir}/widthsearch/aofp")


def version_path(versions_dir: str, version: int) -> Path:
    return Path(versions_dir) / f"v{version:04d}.pt"


def load_version(job: AofpJob, version: int) -> nn.Module:
    """The base model (version 0) or a committed version's weights."""
    model = copy.deepcopy(job.model)
    if version > 0:
        saved = torch.load(version_path(job.versions_dir, version), map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
    return model


def _consumers(graph, group) -> list[tuple[nn.Module, list[int]]]:
    """(layer, input channel indices) of every conv/linear that consumes the group's channels."""
    return [(dep.target.module, sorted(int(i) for i in idxs)) for dep, idxs in group
            if isinstance(dep.target.module, _LAYERS) and not graph.is_out_channel_pruning_fn(dep.handler)]


def probe_damage(model: nn.Module, space: WidthSpace, search: dict[str, list[int]], batches,
                 rng: np.random.Generator) -> tuple[dict, dict, int]:
    """Pruning attempts: per batch, mask a random half of every group's search space at once.

    The damage of group g on a batch is sum ||y - y'||^2 / sum ||y||^2 over the layers that
    consume g, where y' is that layer's output with the masked channels of its input zeroed
    (the ablated path shares the base path's weights). It is added to every masked channel.
    Returns per-group damage sums and counts aligned with `search[g]`, and the number of
    ablated evaluations.
    """
    model.eval()
    device = next(model.parameters()).device
    graph = dependency_graph(model, space.example_input.to(device))
    modules = dict(model.named_modules())
    taps = {m for n in search for m, _ in _consumers(graph, root_group(graph, modules[n], [0]))}
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(m, (i[0], o))) for m in taps]
    sums = {n: np.zeros(len(s)) for n, s in search.items()}
    counts = {n: np.zeros(len(s), dtype=np.int64) for n, s in search.items()}
    evals = 0
    try:
        with torch.no_grad():
            for x, _ in batches:
                seen.clear()
                model(x.to(device))
                base = dict(seen)  # the ablated calls below re-trigger the hooks
                for n, candidates in search.items():
                    if len(candidates) < 2:
                        continue
                    picked = rng.choice(len(candidates), size=len(candidates) // 2, replace=False)
                    masked = [candidates[i] for i in picked]
                    num = den = 0.0
                    for layer, idxs in _consumers(graph, root_group(graph, modules[n], masked)):
                        inp, out = base[layer]
                        ablated = inp.clone()
                        ablated.index_fill_(1 if inp.dim() > 2 else inp.dim() - 1, torch.tensor(idxs, device=device), 0.0)
                        num += (layer(ablated) - out).pow(2).sum().item()
                        den += out.pow(2).sum().item()
                    damage = num / max(den, 1e-12)
                    sums[n][picked] += damage
                    counts[n][picked] += 1
                    evals += 1
    finally:
        for h in hooks:
            h.remove()
    return sums, counts, evals


def commit(model: nn.Module, space: WidthSpace, keep: dict[str, list[int]], data, steps: int, lr: float,
           batch_size: int, seed: int, device: torch.device) -> nn.Module:
    """Mask the dropped channels for good and fine-tune the base path, holding them at zero."""
    graph = dependency_graph(model, space.example_input.to(device))
    modules = dict(model.named_modules())
    dropped = [root_group(graph, modules[n], [c for c in range(space[n].width) if c not in set(k)])
               for n, k in keep.items() if len(k) < space[n].width]

    def hold_zero() -> None:
        for group in dropped:
            zero_channels(graph, group)

    hold_zero()
    if steps > 0:
        model.train()
        opt, sched = make_optimizer(model, TrainConfig(lr=lr, batch_size=batch_size), steps)
        stream = data.stream("train", batch_size, seed=seed, device=device)
        for _ in range(steps):
            x, y = next(stream)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            hold_zero()
    return model


def aofp_step(config: dict, job: AofpJob) -> None:
    """One AOFP trial: a probe (damages of masking attempts) or a commit (next model version)."""
    started = time.time()
    device, node = setup_trial()
    data = job.splits()
    payload = json.loads(config["payload"])
    model = load_version(job, payload["version"]).to(device)
    profile = job.space.from_vector(config["widths"])
    fixed = {"widths": list(config["widths"]), "flops": job.cost.flops(profile), "params": job.cost.params(profile),
             "flops_ratio": job.cost.flops_ratio(profile),
             "cost_ratio": job.measure.ratio(config["widths"]), "criterion": "aofp-damage", "node": node,
             "started_at": started, "finetune_steps": 0}
    if payload["phase"] == "probe":
        rng = np.random.default_rng(payload["seed"])
        stream = data.stream("train", job.batch_size, seed=payload["seed"], augment=False, device=device)
        sums, counts, evals = probe_damage(model, job.space, payload["search"],
                                           (next(stream) for _ in range(payload["window"])), rng)
        tune.report({**fixed, "status": "probe", "score": float("nan"), "loss_evals": evals,
                     # one JSON string: Tune flattens nested dicts before the searcher sees them
                     "damages": json.dumps({"sum": {n: v.tolist() for n, v in sums.items()},
                                            "count": {n: c.tolist() for n, c in counts.items()}}),
                     "payload": json.dumps({"phase": "probe", "version": payload["version"], "round": payload["round"],
                                            "loss_evals": evals, "batches": payload["window"]}),
                     "wall_s": time.time() - started})
        return
    version = payload["version"] + 1
    commit(model, job.space, payload["keep"], data, payload["commit_steps"], payload["lr"], job.batch_size,
           job.seed + version, device)
    acc, loss = evaluate(model, data, "val", device=device)
    path = version_path(job.versions_dir, version)
    save_checkpoint(model.cpu(), path, version=version)
    tune.report({**fixed, "score": acc, "val_acc": acc, "val_loss": loss, "finetune_steps": payload["commit_steps"],
                 "version": version, "checkpoint": str(path), "wall_s": time.time() - started,
                 "payload": json.dumps({"phase": "commit", "version": version, "keep": payload["keep"]})})
