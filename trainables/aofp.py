"""`aofp_step`: AOFP's trials: probes (pruning attempts, damage per channel), commits (the base path trained
on the round's batches, then the round's decisions applied: the next model version) and the final fine-tune.

See searchers/aofp.py for the algorithm and how it maps onto Tune trials. Model versions are dense-shaped
state dicts (pruned channels held at zero) together with the base path's SGD state (momentum buffers), written
through :class:`widthsearch.storage.Storage` to EXP/widthsearch/aofp/vNNNN.pt; the fine-tuned final model is
aofp/final.pt. So a local folder, a shared path, ``file://`` or ``s3://`` storage all hold them.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from ray import tune
from torch import nn

from widthsearch.data import DataSplits
from widthsearch.errors import WidthSearchError
from widthsearch.space import WidthSpace, dependency_graph, device_of, root_group
from widthsearch.storage import Storage
from widthsearch.surgery import mask
from widthsearch.training import StepTrainer, TrainConfig, evaluate

from .common import Job, Phases, begin_trial, profile_fields, run_with_deadline

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm
FINAL = "aofp/final.pt"


@dataclass
class AofpJob(Job):
    exp_dir: str                          # the experiment (path or URI): versions live in EXP/widthsearch/aofp/
    finetune_steps: int                   # the final model's fine-tune (cosine schedule), like every scored trial's
    finetune_lr: float
    trial_timeout_s: float | None = None  # a trial still running after this many seconds fails with a TimeoutError


def trial_job(cfg, exp_dir: str, common: dict) -> tuple[Callable, AofpJob]:
    """aofp_step and its job: model versions under EXP/widthsearch/aofp, the search's fine-tune and timeout."""
    return aofp_step, AofpJob(**common, exp_dir=exp_dir, finetune_steps=cfg.finetune_steps,
                              finetune_lr=cfg.finetune_lr, trial_timeout_s=cfg.trial_timeout_s)


def version_name(version: int) -> str:
    """The storage name (under EXP/widthsearch) of a committed model version."""
    return f"aofp/v{version:04d}.pt"


def load_version(job: AofpJob, version: int) -> tuple[nn.Module, dict | None]:
    """The base model (version 0) or a committed version, with the base path's optimizer state (None for 0)."""
    model = copy.deepcopy(job.model)
    if version == 0:
        return model, None
    store = Storage(job.exp_dir)
    saved = store.load_torch(version_name(version))
    if saved is None:
        raise WidthSearchError(f"aofp model version {version} is missing: {store.uri(version_name(version))}")
    model.load_state_dict(saved["state_dict"])
    return model, saved.get("optimizer")


# ----------------------------------------------------------------------------- damage of pruning attempts
@dataclass(frozen=True)
class MeasurePoint:
    """Where a consumer's damage is taken: after the consumer, its BatchNorm and its ReLU, as far as they follow.

    `bn` is the BatchNorm that alone reads the consumer's output; `relu` is True when a ReLU alone reads the
    BN's output (or, without BN, the consumer's). A consumer without them (the classifier, a conv feeding
    an addition directly) is measured at its raw output; other activations (e.g. ReLU6) are not applied.
    """

    layer: nn.Module
    bn: nn.Module | None
    relu: bool

    @property
    def last(self) -> nn.Module:
        """The last module of the chain (its output, before the ReLU, is what the forward hook records)."""
        return self.bn if self.bn is not None else self.layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if self.bn is not None:
            y = self.bn(y)
        return torch.relu(y) if self.relu else y


def measure_point(graph, layer: nn.Module) -> MeasurePoint:
    """The MeasurePoint of a consuming conv/linear layer, read from the dependency graph."""
    node, bn = graph.module2node[layer], None
    if len(node.outputs) == 1 and isinstance(node.outputs[0].module, _BN):
        node = node.outputs[0]
        bn = node.module
    relu = len(node.outputs) == 1 and _is_relu(node.outputs[0])
    return MeasurePoint(layer, bn, relu)


def _is_relu(node) -> bool:
    grad_fn = getattr(node, "grad_fn", None)
    return isinstance(node.module, nn.ReLU) or (grad_fn is not None and grad_fn.name().startswith("ReluBackward"))


def _consumers(graph, group) -> list[tuple[nn.Module, list[int]]]:
    """(layer, input channel indices) of every conv/linear that consumes the group's channels."""
    return [(dep.target.module, sorted(int(i) for i in idxs)) for dep, idxs in group
            if isinstance(dep.target.module, _LAYERS) and not graph.is_out_channel_pruning_fn(dep.handler)]


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no dropout) except BatchNorm, which normalises with the batch's statistics as in training;
    the running statistics and every module's mode are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    saved = [{k: v.clone() for k, v in bn.state_dict().items() if not k.endswith(("weight", "bias"))} for bn in bns]
    model.eval()
    for bn in bns:
        bn.train()
    try:
        yield model
    finally:
        for bn, buffers in zip(bns, saved):
            bn.load_state_dict(buffers, strict=False)
        for m, training in modes.items():
            m.training = training


def probe_damage(model: nn.Module, space: WidthSpace, search: dict[str, list[int]], batches,
                 rng: np.random.Generator) -> tuple[dict, dict, int]:
    """Pruning attempts: per batch, mask a random half of every group's search space at once.

    The damage of group g on a batch is sum ||y - y'||^2 / sum ||y||^2 over the layers that consume g,
    where y is a consumer's output after its BatchNorm and ReLU (see MeasurePoint) and y' the same with the
    masked channels of its input zeroed (the ablated path shares the base path's weights). As in the
    authors' training-time measurement, BatchNorm uses the batch's statistics (running statistics are left
    untouched). The damage is added to every masked channel. Returns per-group damage sums and counts
    aligned with `search[g]`, and the number of ablated evaluations (one per group per batch).
    """
    device = device_of(model)
    graph = dependency_graph(model, space.example_input)
    modules = dict(model.named_modules())
    points = {layer: measure_point(graph, layer)
              for n in search for layer, _ in _consumers(graph, root_group(graph, modules[n], [0]))}
    inputs: dict[nn.Module, torch.Tensor] = {}
    outputs: dict[nn.Module, torch.Tensor] = {}
    recording = [False]

    def keep_input(layer, args):
        if recording[0]:
            inputs[layer] = args[0].detach().clone()

    def keep_output(point, out):
        if recording[0]:  # cloned: an in-place op (ReLU(inplace=True), +=) may change the tensor later
            outputs[point.layer] = torch.relu(out) if point.relu else out.detach().clone()

    hooks = [p.layer.register_forward_pre_hook(keep_input) for p in points.values()]
    hooks += [p.last.register_forward_hook(lambda m, a, out, p=p: keep_output(p, out)) for p in points.values()]
    sums = {n: np.zeros(len(s)) for n, s in search.items()}
    counts = {n: np.zeros(len(s), dtype=np.int64) for n, s in search.items()}
    evals = 0
    try:
        with torch.no_grad(), batch_statistics(model):
            for x, _ in batches:
                recording[0] = True
                model(x.to(device))
                recording[0] = False
                for n, candidates in search.items():
                    if len(candidates) < 2:
                        continue
                    picked = rng.choice(len(candidates), size=len(candidates) // 2, replace=False)
                    num = den = 0.0
                    group = root_group(graph, modules[n], [candidates[i] for i in picked])
                    for layer, idxs in _consumers(graph, group):
                        ablated = inputs[layer].clone()
                        ablated.index_fill_(1, torch.tensor(idxs, device=device), 0.0)
                        y = outputs[layer]
                        num += (points[layer](ablated) - y).pow(2).sum().item()
                        den += y.pow(2).sum().item()
                    damage = num / max(den, 1e-12)
                    sums[n][picked] += damage
                    counts[n][picked] += 1
                    evals += 1
    finally:
        for h in hooks:
            h.remove()
    return sums, counts, evals


# ----------------------------------------------------------------------------- the base path
def channel_masks(model: nn.Module, space: WidthSpace, keep: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Per parameter name, a 0/1 mask of the entries that belong to channels `keep` drops (in every coupled
    layer: outputs, BN, consumers' inputs); only parameters with a dropped entry are listed."""
    ones = copy.deepcopy(model)
    with torch.no_grad():
        for p in ones.parameters():
            p.fill_(1.0)
    zeroed = dict(mask(ones, space, keep=keep).named_parameters())
    return {name: (zeroed[name] != 0).to(p.dtype) for name, p in model.named_parameters()
            if not bool((zeroed[name] != 0).all())}


@torch.no_grad()
def zero_masked(model: nn.Module, masks: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None):
    """Zero the masked entries of the parameters and of their momentum buffers."""
    for name, p in model.named_parameters():
        if name in masks:
            p.mul_(masks[name])
            buffer = optimizer.state.get(p, {}).get("momentum_buffer") if optimizer is not None else None
            if buffer is not None:
                buffer.mul_(masks[name])


@contextlib.contextmanager
def held_at_zero(model: nn.Module, masks: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None):
    """Masked entries zeroed, and their gradients masked while inside (as the authors' gradient masks), so SGD
    with weight decay and momentum leaves them at exactly zero: training the dense model trains the pruned one."""
    zero_masked(model, masks, optimizer)
    params = dict(model.named_parameters())
    handles = [params[name].register_hook(lambda g, m=m: g * m) for name, m in masks.items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def train_base_path(model: nn.Module, space: WidthSpace, keep: dict[str, list[int]], data: DataSplits, *,
                    steps: int, lr: float, batch_size: int, seed: int, optimizer_state: dict | None,
                    device: torch.device) -> dict:
    """`steps` SGD steps of the base path at a constant `lr` on train batches `data.stream(seed=seed)` (the
    probes' batches), channels dropped by `keep` held at zero, momentum carried over from `optimizer_state`.
    Returns the optimizer state to carry on."""
    trainer = StepTrainer(model, data, steps, TrainConfig(lr=lr, batch_size=batch_size, schedule="constant"),
                          seed=seed, device=device)
    if optimizer_state is not None:
        trainer.optimizer.load_state_dict(optimizer_state)
    with held_at_zero(model, channel_masks(model, space, keep), trainer.optimizer):
        trainer.run(steps)
    return trainer.optimizer.state_dict()


def round_batches(data: DataSplits, batch_size: int, seed: int, offset: int, count: int, device) -> Iterator:
    """Batches offset .. offset + count of a round's train stream: the stream StepTrainer(seed=seed) trains on."""
    return itertools.islice(data.stream("train", batch_size, seed=seed, device=device), offset, offset + count)


# ----------------------------------------------------------------------------- the trial
def aofp_step(config: dict, job: AofpJob) -> None:
    """One AOFP trial: a probe, a commit or the final fine-tune (payload "phase"); fails with
    TimeoutError("trial exceeded trial_timeout_s=...") past job.trial_timeout_s."""
    run_with_deadline(job.trial_timeout_s, lambda: _step(config, job))


def _step(config: dict, job: AofpJob) -> None:
    cpu = Phases()
    device, node, data, started = begin_trial(job)
    payload = config["payload"]
    model, optimizer_state = load_version(job, payload["version"])
    model.to(device)
    fields = profile_fields(job, config["widths"], "aofp-damage", node, started, None)
    if payload["phase"] == "probe":
        _probe(model, payload, job, data, device, fields, cpu)
    elif payload["phase"] == "commit":
        _commit(model, optimizer_state, payload, job, data, device, fields, cpu)
    else:
        _final(model, payload, job, data, device, fields, cpu)


def _probe(model, payload, job, data, device, fields, cpu: Phases) -> None:
    batches = round_batches(data, job.batch_size, payload["seed"], payload["offset"], payload["window"], device)
    rng = np.random.default_rng([payload["seed"], payload["offset"]])
    sums, counts, evals = probe_damage(model, job.space, payload["search"], batches, rng)
    tune.report({**fields, "status": "probe", "score": math.nan, "loss_evals": evals, "steps_reached": 0,
                 # one JSON string: Tune flattens nested dicts before the searcher sees them
                 "damages": json.dumps({"sum": {n: v.tolist() for n, v in sums.items()},
                                        "count": {n: c.tolist() for n, c in counts.items()}}),
                 "payload": json.dumps({"phase": "probe", "version": payload["version"], "round": payload["round"],
                                        "loss_evals": evals, "batches": payload["window"]}),
                 "wall_s": time.time() - fields["started_at"], "cpu_s": cpu.cpu_s()})


def _commit(model, optimizer_state, payload, job, data, device, fields, cpu: Phases) -> None:
    """Train the base path on the round's batches under the version's masks, then apply the round's decisions."""
    state = train_base_path(model, job.space, payload["train_keep"], data, steps=payload["steps"], lr=payload["lr"],
                            batch_size=job.batch_size, seed=payload["seed"], optimizer_state=optimizer_state,
                            device=device)
    zero_masked(model, channel_masks(model, job.space, payload["keep"]))
    acc, loss = evaluate(model, data, "val", device=device)
    version = payload["version"] + 1
    store = Storage(job.exp_dir)
    store.save_torch(version_name(version), {"state_dict": model.cpu().state_dict(), "optimizer": state,
                                             "version": version, "keep": payload["keep"]})
    tune.report({**fields, "score": acc, "val_acc": acc, "val_loss": loss, "steps_reached": 0, "version": version,
                 "checkpoint": store.uri(version_name(version)), "wall_s": time.time() - fields["started_at"],
                 "cpu_s": cpu.cpu_s(),
                 "payload": json.dumps({"phase": "commit", "version": version, "round": payload["round"],
                                        "keep": payload["keep"], "base_path_steps": payload["steps"]})})


def _final(model, payload, job, data, device, fields, cpu: Phases) -> None:
    """The final model's fine-tune: job.finetune_steps at job.finetune_lr (cosine), pruned channels held at zero."""
    with held_at_zero(model, channel_masks(model, job.space, payload["keep"])):
        StepTrainer(model, data, job.finetune_steps, TrainConfig(lr=job.finetune_lr, batch_size=job.batch_size),
                    seed=job.seed, device=device).run(job.finetune_steps)
    acc, loss = evaluate(model, data, "val", device=device)
    store = Storage(job.exp_dir)
    store.save_torch(FINAL, {"state_dict": model.cpu().state_dict(), "version": payload["version"],
                             "keep": payload["keep"]})
    tune.report({**fields, "score": acc, "val_acc": acc, "val_loss": loss, "steps_reached": job.finetune_steps,
                 "checkpoint": store.uri(FINAL), "wall_s": time.time() - fields["started_at"],
                 "cpu_s": cpu.cpu_s(),
                 "payload": json.dumps({"phase": "final", "version": payload["version"], "keep": payload["keep"],
                                        "budget_met": payload["budget_met"], "stop": payload["stop"]})})
