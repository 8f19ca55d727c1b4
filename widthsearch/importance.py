"""Importance criteria: which channels of a group to keep once its width is chosen.

A criterion scores every channel of a channel group (a full-index torch-pruning group: all
its coupled layers); the highest-scoring channels are kept. Registry keyed by name
(`CRITERIA`): `l1` (weight L1 summed over the coupled layers), `bn_scale` (Network
Slimming), `random`, and the data-driven `taylor` (Molchanov et al., 2019) and `frs`
(Aketi et al., 2020), whose docstrings name their sources and deviations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .data import DataSplits
from .errors import WidthSearchError
from .lrp import AlphaBetaLRP
from .space import device_of, eval_mode

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Scorer = Callable[[nn.Module, Mapping[str, tp.Group], list | None, int], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Criterion:
    """A named channel scorer; `needs_batches` when it looks at data."""

    name: str
    needs_batches: bool
    score: Scorer


CRITERIA: dict[str, Criterion] = {}


def register(name: str, needs_batches: bool = False) -> Callable[[Scorer], Scorer]:
    """Decorator adding a scorer to the registry under a new name (a name already taken is an error)."""

    def add(fn: Scorer) -> Scorer:
        if name in CRITERIA:
            raise WidthSearchError(f"importance criterion {name!r} is already registered")
        CRITERIA[name] = Criterion(name, needs_batches, fn)
        return fn

    return add


def get_criterion(name: str) -> Criterion:
    """Look a criterion up by name, with an error that lists the known ones."""
    if name not in CRITERIA:
        raise WidthSearchError(f"unknown importance criterion {name!r}; expected one of: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]


def criterion_batches(criterion: str, data: DataSplits, *, batch_size: int, count: int, seed: int,
                      device: str | torch.device = "cpu") -> list | None:
    """`count` training batches (at least one, no augmentation) for a data-driven criterion (taylor, frs), on
    `device`; None for the other criteria."""
    if not get_criterion(criterion).needs_batches:
        return None
    stream = data.stream("train", batch_size, seed=seed, augment=False, device=device)
    return [next(stream) for _ in range(max(1, count))]


def score_channels(criterion: str, model: nn.Module, groups: Mapping[str, tp.Group],
                   batches: Batches | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Score every channel of every group in `groups` (full-index torch-pruning groups of `model`)."""
    crit = get_criterion(criterion)
    batches = list(batches) if batches is not None else None
    if crit.needs_batches and not batches:
        raise WidthSearchError(f"importance criterion {criterion!r} needs data batches")
    return {name: s.detach().float().cpu() for name, s in crit.score(model, groups, batches, seed).items()}


def _by_tp(importance: tp.importance.Importance) -> Scorer:
    return lambda model, groups, batches, seed: {name: importance(g) for name, g in groups.items()}


register("l1")(_by_tp(tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)))


@register("bn_scale")
def _bn_scale(model, groups, batches, seed):
    """|gamma| of the BatchNorms in the group (Network Slimming); groups without BN fall back to l1."""
    bn = tp.importance.BNScaleImportance(group_reduction="sum", normalizer=None)
    l1 = CRITERIA["l1"].score
    out = {}
    for name, group in groups.items():
        scores = bn(group)
        out[name] = scores if scores is not None and len(scores) else l1(model, {name: group}, None, seed)[name]
    return out


@register("random")
def _random(model, groups, batches, seed):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(len(g[0].idxs), generator=gen) for name, g in groups.items()}


@dataclass(frozen=True)
class _FeatureMap:
    """A layer whose output carries a group's channels: channels `idxs` are at positions `root` of the group's scores."""

    module: nn.Module
    idxs: torch.Tensor
    root: torch.Tensor


def _feature_maps(group: tp.Group, device: torch.device) -> list[_FeatureMap]:
    """The group's feature maps: the outputs of its BatchNorms, and of its convs/linears not normalised by one of them."""
    graph = group._DG
    outs = [(dep, idxs, group[i].root_idxs) for i, (dep, idxs) in enumerate(group)
            if graph.is_out_channel_pruning_fn(dep.handler)]
    bns = {dep.target.module for dep, _, _ in outs if isinstance(dep.target.module, _BatchNorm)}
    maps = []
    for dep, idxs, root in outs:
        module = dep.target.module
        normalised = any(node.module in bns for node in dep.target.outputs)
        if isinstance(module, _BatchNorm) or (isinstance(module, (_ConvNd, nn.Linear)) and not normalised):
            maps.append(_FeatureMap(module, torch.as_tensor(list(idxs), dtype=torch.long, device=device),
                                    torch.as_tensor(list(root), dtype=torch.long, device=device)))
    return maps


def _to_group(width: int, maps: list[_FeatureMap], per_layer: Mapping[nn.Module, torch.Tensor],
              device: torch.device, mean: bool = False) -> torch.Tensor:
    """Sum (or average) per-layer channel values over a group's feature maps, at the group's channel positions."""
    total, count = torch.zeros(width, device=device), torch.zeros(width, device=device)
    for fm in maps:
        if fm.module in per_layer:
            total.index_add_(0, fm.root, per_layer[fm.module][fm.idxs].float())
            count.index_add_(0, fm.root, torch.ones(len(fm.root), device=device))
    return total / count.clamp(min=1) if mean else total


def _gate_params(module: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters whose Taylor term is a gate on `module`'s output: BN scale and shift, or conv/linear weight and bias."""
    if isinstance(module, _BatchNorm):
        if not module.affine:
            raise WidthSearchError(f"importance criterion 'taylor' needs the scale and shift of BatchNorm {name!r} "
                                   "(it has affine=False)")
        return [module.weight, module.bias]
    if getattr(module, "transposed", False):
        raise WidthSearchError(f"importance criterion 'taylor' has no gate for transposed convolution {name!r}")
    return [p for p in (module.weight, module.bias) if p is not None]


def _gate_term(params: list[nn.Parameter], grads: Mapping[nn.Parameter, torch.Tensor | None]) -> torch.Tensor:
    """Per output channel, the sum over the channel's parameters of p * dL/dp (= the Taylor term of a gate on the output)."""
    total = torch.zeros(params[0].shape[0], device=params[0].device)
    for p in params:
        if grads[p] is not None:  # None: the parameter did not take part in the loss
            total += (p.detach() * grads[p]).reshape(p.shape[0], -1).sum(1)
    return total


@register("taylor", needs_batches=True)
def _taylor(model, groups, batches, seed):
    """Taylor-FO-BN (Molchanov et al., CVPR 2019; authors' code NVlabs/Taylor_pruning, method 22).

    A channel's importance is the squared first-order Taylor term of a gate g = 1 on its
    feature map, (dL/dg)^2 = (sum over the feature map of y * dL/dy)^2, computed per
    minibatch in train mode (cross-entropy, batch statistics) and averaged over minibatches.
    The gate sits after each BatchNorm of the group (for BN, y * dL/dy summed equals
    gamma * dL/dgamma + beta * dL/dbeta, the authors' "BN Taylor" identity); a conv/linear
    output that no BatchNorm of the group normalises is gated directly (sum of w * dL/dw
    and b * dL/db over the filter). A coupled group shares one gate, so its terms over all
    its feature maps are summed before squaring: removing the channel sets that one gate
    to zero in every layer at once (the authors likewise share one gate across a ResNet
    stage's skip connections). Deviations: on a residual stream the authors' shared gate
    sits after each block's output ReLU, ours after each BN writing to the stream (the
    group's layers; both remove the same channel, linearised at different points); their
    extra division of skip-gate scores by the number of blocks is an ImageNet-only
    adjustment in their code and is not applied; dropout (if any) runs with a generator
    seeded by `seed`.

    The model's mode, its buffers (BN running statistics, which train mode updates),
    requires_grad flags and .grad are as before afterwards.
    """
    device = device_of(model)
    names = {m: n for n, m in model.named_modules()}
    maps = {name: _feature_maps(g, device) for name, g in groups.items()}
    params = {fm.module: _gate_params(fm.module, names.get(fm.module, "?")) for ms in maps.values() for fm in ms}
    flat = list(dict.fromkeys(p for ps in params.values() for p in ps))
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    flags = [(p, p.requires_grad) for p in flat]
    was_training = model.training
    totals = {name: torch.zeros(len(g[0].idxs), device=device) for name, g in groups.items()}
    try:
        model.train()
        for p in flat:
            p.requires_grad_(True)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            torch.manual_seed(seed)
            for x, y in batches:
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                grads = dict(zip(flat, torch.autograd.grad(loss, flat, allow_unused=True)))
                terms = {m: _gate_term(ps, grads).detach() for m, ps in params.items()}
                for name, ms in maps.items():
                    totals[name] += _to_group(len(totals[name]), ms, terms, device) ** 2
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return {name: t / len(batches) for name, t in totals.items()}


def _class_weights(counts: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """FRS class weights: sigmoid(max accuracy / class accuracy) (1 for an accuracy of 0), averaged over present classes."""
    present = counts > 0
    accuracy = correct / counts.clamp(min=1)
    ratio = torch.where(accuracy > 0, accuracy.max() / accuracy.clamp(min=1e-12), torch.full_like(accuracy, torch.inf))
    return torch.sigmoid(ratio) * present / present.sum()


@register("frs", needs_batches=True)
def _frs(model, groups, batches, seed):
    """Feature relevance score (Aketi et al., IEEE Access 2020; code purdue-nrl/Gradual-Channel-Pruning-using-FRS).

    Relevance by LRP-alpha-beta (alpha=2, beta=1; rules and their deviations in
    `widthsearch.lrp`) from a one-hot of the true class at the output, in eval mode; a
    channel's relevance on a sample is its feature map's relevance summed over space (the
    authors average over space: a constant factor per layer that the normalisation below
    removes). Per layer, the per-sample relevance is averaged per class, each class mean is
    weighted by sigmoid(max class accuracy / class accuracy) (the authors' weighting, with
    the accuracies measured on the same batches rather than a separate pass over the
    training set), averaged over the classes present, made absolute and L2-normalised
    across the layer's channels. A coupled group's score is the mean of its feature maps'
    normalised scores (the outputs of its BatchNorms, or of its convs/linears that no
    BatchNorm follows): the authors score and mask each layer separately, a group removes
    the channel from all of them. Non-negative; a constant zero channel scores 0. Memory:
    LRP keeps every intermediate value of one batch.
    """
    device = device_of(model)
    maps = {name: _feature_maps(g, device) for name, g in groups.items()}
    lrp = AlphaBetaLRP(model, {fm.module for ms in maps.values() for fm in ms})
    sums: dict[nn.Module, torch.Tensor] = {}
    counts = correct = None
    with eval_mode(model):
        for x, y in batches:
            y = y.to(device)
            result = lrp(x.to(device), y)
            classes = result.logits.shape[1]
            if counts is None:
                counts, correct = torch.zeros(classes, device=device), torch.zeros(classes, device=device)
            counts += torch.bincount(y, minlength=classes)
            correct += torch.bincount(y[result.logits.argmax(1) == y], minlength=classes)
            for module, r in result.layers.items():
                per_sample = r.flatten(2).sum(2) if r.dim() > 2 else r
                if module not in sums:
                    sums[module] = torch.zeros(classes, per_sample.shape[1], dtype=per_sample.dtype, device=device)
                sums[module].index_add_(0, y, per_sample)
    weights = _class_weights(counts, correct)
    scores = {}
    for module, s in sums.items():
        score = (weights[:, None] * s / counts.clamp(min=1)[:, None]).sum(0).abs()
        scores[module] = score / (score.norm() + 1e-9)
    return {name: _to_group(len(g[0].idxs), maps[name], scores, device, mean=True) for name, g in groups.items()}
