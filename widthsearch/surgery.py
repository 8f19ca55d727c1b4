"""Surgery: physical channel removal (`prune`) and zeroing without removal (`mask`).

Both work on a deep copy; the caller's model is never modified. Channels are chosen per
group by an importance criterion (the highest scores are kept), or given explicitly as
`keep` = {group name: channel indices to keep}.
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from .errors import ProfileError
from .importance import Batches, get_criterion, score_channels
from .space import WidthSpace, dependency_graph, root_group

Keep = dict[str, list[int]]


def _plan(work: nn.Module, graph: tp.DependencyGraph, space: WidthSpace, profile: Mapping[str, int] | None,
          criterion: str, batches: Batches | None, seed: int, keep: Mapping[str, Sequence[int]] | None) -> Keep:
    """Kept channel indices (sorted) of every group that shrinks."""
    modules = dict(work.named_modules())
    if keep is not None:
        return _check_keep(space, keep)
    get_criterion(criterion)  # a bad name fails even when nothing shrinks
    profile = space.validate(profile)
    shrinking = [g for g in space.groups if profile[g.name] < g.width]
    groups = {g.name: root_group(graph, modules[g.name], range(g.width)) for g in shrinking}
    scores = score_channels(criterion, work, groups, batches, seed) if groups else {}
    plan = {}
    for g in shrinking:
        order = torch.argsort(scores[g.name], descending=True, stable=True)
        plan[g.name] = sorted(order[: profile[g.name]].tolist())
    return plan


def _check_keep(space: WidthSpace, keep: Mapping[str, Sequence[int]]) -> Keep:
    out = {}
    for name, idxs in keep.items():
        if name not in space.names:
            raise ProfileError(f"unknown channel group {name!r}")
        g = space[name]
        idxs = sorted({int(i) for i in idxs})
        if idxs and (idxs[0] < 0 or idxs[-1] >= g.width):
            raise ProfileError(f"channel index out of range for group {name!r} (width {g.width})")
        if not g.allowed(len(idxs)):
            raise ProfileError(f"keeping {len(idxs)} channels of group {name!r} is out of bounds "
                               f"[{g.min_width}, {g.width}] (divisor {g.divisor})")
        if len(idxs) < g.width:
            out[name] = idxs
    return out


def _prepare(model: nn.Module, space: WidthSpace):
    work = copy.deepcopy(model)
    graph = dependency_graph(work, space.example_input)
    return work, graph, dict(work.named_modules())


def select_channels(model: nn.Module, space: WidthSpace, profile: Mapping[str, int], criterion: str = "l1",
                    batches: Batches | None = None, seed: int = 0) -> Keep:
    """The channel indices each shrinking group would keep under `criterion`."""
    work, graph, _ = _prepare(model, space)
    return _plan(work, graph, space, profile, criterion, batches, seed, None)


def prune(model: nn.Module, space: WidthSpace, profile: Mapping[str, int] | None = None, criterion: str = "l1",
          batches: Batches | None = None, seed: int = 0, keep: Mapping[str, Sequence[int]] | None = None) -> nn.Module:
    """A physically smaller copy of `model` whose group widths equal `profile`.

    Channels are ranked by `criterion` (see `importance.CRITERIA`; `taylor` and `frs` need
    `batches`), or taken from `keep`. The copy keeps the model's device and train/eval mode.
    """
    work, graph, modules = _prepare(model, space)
    for name, kept in _plan(work, graph, space, profile, criterion, batches, seed, keep).items():
        kept_set = set(kept)
        drop = [i for i in range(space[name].width) if i not in kept_set]
        root_group(graph, modules[name], drop).prune()
    return work


def mask(model: nn.Module, space: WidthSpace, profile: Mapping[str, int] | None = None, criterion: str = "l1",
         batches: Batches | None = None, seed: int = 0, keep: Mapping[str, Sequence[int]] | None = None) -> nn.Module:
    """A copy of `model` with the dropped channels zeroed in every coupled layer.

    The masked copy computes the same function as `prune(...)` with the same arguments
    (in eval mode), at full size: cheap probes for searchers.
    """
    work, graph, modules = _prepare(model, space)
    for name, kept in _plan(work, graph, space, profile, criterion, batches, seed, keep).items():
        kept_set = set(kept)
        drop = [i for i in range(space[name].width) if i not in kept_set]
        zero_channels(graph, root_group(graph, modules[name], drop))
    return work


@torch.no_grad()
def zero_channels(graph: tp.DependencyGraph, group: tp.Group) -> None:
    """Zero the weights of `group`'s channels in all its layers: outputs and consumers' inputs."""
    for dep, idxs in group:
        module = dep.target.module
        if not isinstance(module, nn.Module):
            continue
        idx = torch.as_tensor(sorted(int(i) for i in idxs), dtype=torch.long)
        depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.in_channels > 1
        is_out = depthwise or graph.is_out_channel_pruning_fn(dep.handler)
        transposed = getattr(module, "transposed", False)
        for pname, param in module.named_parameters(recurse=False):
            if pname not in ("weight", "bias"):
                continue
            if is_out:
                dim = 1 if transposed and pname == "weight" else 0
            elif pname == "weight" and param.dim() > 1:
                dim = 0 if transposed else 1
            else:
                continue
            param.index_fill_(dim, idx.to(param.device), 0.0)
