"""Importance criteria: which channels of a group to keep once its width is chosen.

A criterion scores every channel of a channel group, summed over the coupled layers; the
highest-scoring channels are kept. Registry keyed by name (`CRITERIA`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .errors import WidthSearchError

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
    """Decorator adding a scorer to the registry."""

    def add(fn: Scorer) -> Scorer:
        CRITERIA[name] = Criterion(name, needs_batches, fn)
        return fn

    return add


def get_criterion(name: str) -> Criterion:
    """Look a criterion up by name, with an error that lists the known ones."""
    if name not in CRITERIA:
        raise WidthSearchError(f"unknown importance criterion {name!r}; expected one of: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]


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


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@register("taylor", needs_batches=True)
def _taylor(model, groups, batches, seed):
    """First-order Taylor |w * dL/dw| summed over coupled layers (Molchanov et al., 2019)."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    device = _device(model)
    for x, y in batches:
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
    scores = _by_tp(tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None))(
        model, groups, batches, seed)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return scores


@register("frs", needs_batches=True)
def _frs(model, groups, batches, seed):
    """Feature relevance score (Aketi et al., 2020): a channel's relevance to the true class.

    The authors propagate the true-class score back with layer-wise relevance propagation
    (LRP). Deviation: we use LRP-epsilon's closed form on ReLU networks, gradient x input
    (Ancona et al., 2018), which works on any graph torch-pruning can trace. A channel's
    score is the per-sample relevance of its feature map (activation x d logit_y / d
    activation, summed over space), averaged over samples and summed over the group's
    output layers (its BNs, or its convs/linears when it has none).
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    taps: dict[str, list[nn.Module]] = {}
    for name, group in groups.items():
        outs = [d.target.module for d, _ in group if group._DG.is_out_channel_pruning_fn(d.handler)]
        bns = [m for m in outs if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        taps[name] = bns or [m for m in outs if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    outputs: dict[nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o))
             for ms in taps.values() for m in ms]
    totals = {name: 0.0 for name in groups}
    count = 0
    try:
        for x, y in batches:
            outputs.clear()
            logits = model(x.to(device))
            true_class = logits.gather(1, y.to(device).view(-1, 1)).sum()
            tapped = list(outputs)
            grads = torch.autograd.grad(true_class, [outputs[m] for m in tapped], allow_unused=True)
            relevance = {}
            for m, grad in zip(tapped, grads):
                act = outputs[m]
                r = act * grad if grad is not None else torch.zeros_like(act)
                relevance[m] = r.flatten(2).sum(2).sum(0) if r.dim() > 2 else r.sum(0)
            for name, ms in taps.items():
                totals[name] = totals[name] + sum(relevance[m].detach() for m in ms)
            count += len(y)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: t / count for name, t in totals.items()}
