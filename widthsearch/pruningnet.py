"""PruningNet (MetaPruning, Liu et al., ICCV 2019): meta blocks that generate a model's weights for any width profile.

Every conv/linear weight whose input or output channels belong to a channel group gets a
*meta block*: two fully connected layers that map the layer's encoding (the keep ratios of
the groups on its output and input channel axes; 1.0 for an axis outside every group) to
the weight tensor at full size. The generated tensor is cropped to the profile by keeping
the first ``w`` channels of every group *in importance order* (``order``: every group's
channels, most important first, from :func:`channel_order`), so a profile keeps the ``w``
best channels of each group: physically with :meth:`PruningNet.materialize` (channel surgery
with explicit ``keep`` indices, :func:`keep_channels`), or, during training, by zeroing the
other channels in the dense-shaped tensor, which computes exactly the cropped network (every
consumer of a group's channels has those input channels zeroed, so nothing leaks from the
dropped ones). The authors train their PruningNet from scratch, so its channel order is
whatever training makes it; ours starts at a trained base model, whose channel order is
arbitrary, hence the sort.

Everything else (BatchNorm affine parameters, biases, layers outside every group) is an
ordinary parameter shared by all profiles, cropped the same way. BatchNorm statistics are
not generated: training uses batch statistics, scoring recalibrates them per profile.

Initialisation from the base model: a meta block's output bias is the base weight and its
output weight is zero, so before training every profile gets the base weights of its kept
channels (what ``prune(model, space, keep=keep_channels(...))`` gives).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .cost import CostModel
from .errors import WidthSearchError
from .importance import Batches, score_channels
from .space import WidthSpace, dependency_graph, device_of, root_group
from .surgery import prune

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
Order = Mapping[str, Sequence[int]]  # {group: its channels, most important first}


@dataclass(frozen=True)
class Axis:
    """The positions along one weight dimension that carry a group's channels, best channel first."""

    group: int               # index into space.groups
    positions: torch.Tensor  # in channel importance order: the r-th best channel owns positions[r * pc:(r + 1) * pc]
    per_channel: int         # pc; > 1 when a flatten spreads a channel over several features


def layer_axes(model: nn.Module, space: WidthSpace, order: Order) -> dict[str, dict[int, Axis]]:
    """For every conv/linear weight touched by a group: {weight dim: Axis} (0 = out, 1 = in channels).

    A depthwise conv's weight is [C, 1, k, k]: its channels follow the group on dim 0.
    """
    graph = dependency_graph(model, space.example_input)
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    axes: dict[str, dict[int, Axis]] = {}
    for gi, group in enumerate(space.groups):
        for dep, idxs in root_group(graph, modules[group.name], range(group.width)):
            layer = dep.target.module
            if not isinstance(layer, _LAYERS) or layer not in names:
                continue
            depthwise = isinstance(layer, nn.modules.conv._ConvNd) and 1 < layer.groups == layer.in_channels
            dim = 0 if depthwise or graph.is_out_channel_pruning_fn(dep.handler) else 1
            positions = sorted({int(i) for i in idxs})
            if len(positions) % group.width:
                raise WidthSearchError(f"layer {names[layer]!r} maps group {group.name!r} onto "
                                       f"{len(positions)} positions, not a multiple of its width {group.width}")
            per = len(positions) // group.width
            ranked = torch.tensor(positions).view(group.width, per)[torch.tensor(order[group.name])].flatten()
            axes.setdefault(f"{names[layer]}.weight", {})[dim] = Axis(gi, ranked, per)
    return axes


def channel_order(model: nn.Module, space: WidthSpace, criterion: str = "l1", batches: Batches | None = None,
                  seed: int = 0) -> dict[str, list[int]]:
    """Every group's channels of `model`, most important first under `criterion` (ties: lower index first).

    The first ``w`` of a group's order are the channels ``prune(model, space, profile, criterion)``
    keeps at width ``w``; data-driven criteria (taylor, frs) need `batches`.
    """
    work = copy.deepcopy(model)
    graph = dependency_graph(work, space.example_input)
    modules = dict(work.named_modules())
    groups = {g.name: root_group(graph, modules[g.name], range(g.width)) for g in space.groups}
    scores = score_channels(criterion, work, groups, batches, seed)
    return {name: torch.argsort(s, descending=True, stable=True).tolist() for name, s in scores.items()}


def identity_order(space: WidthSpace) -> dict[str, list[int]]:
    """Index order for every group (channel 0 first)."""
    return {g.name: list(range(g.width)) for g in space.groups}


def check_order(space: WidthSpace, order: Order) -> dict[str, list[int]]:
    """`order` as lists of ints; WidthSearchError unless it is a permutation of every group's channels."""
    out = {}
    for g in space.groups:
        ranked = [int(i) for i in order.get(g.name, ())]
        if sorted(ranked) != list(range(g.width)):
            raise WidthSearchError(f"channel order of group {g.name!r} is not a permutation of its {g.width} "
                                   f"channels (got {len(ranked)} indices)")
        out[g.name] = ranked
    return out


def keep_channels(space: WidthSpace, order: Order, widths: Sequence[int]) -> dict[str, list[int]]:
    """{group: its ``w`` most important channels, sorted} for every group that shrinks."""
    profile = space.from_vector(widths)
    return {g.name: sorted(int(i) for i in order[g.name][: profile[g.name]])
            for g in space.groups if profile[g.name] < g.width}


def allowed_widths(space: WidthSpace) -> list[np.ndarray]:
    """Every legal width of every group (min width, multiples of the divisor, full width)."""
    out = []
    for g in space.groups:
        values = np.arange(g.min_width, g.width + 1)
        out.append(values[[g.allowed(int(v)) for v in values]])
    return out


def sample_widths(space: WidthSpace, rng: np.random.Generator, n: int, cost: CostModel | None = None,
                  flops: tuple[float, float] = (0.0, 1.0), tries: int = 200) -> np.ndarray:
    """``n`` random profiles (rows; each group's width uniform over its legal widths), FLOPs ratio in ``flops``.

    Rejection sampling in batches; raises WidthSearchError when the range is (almost) never hit.
    """
    legal = allowed_widths(space)
    lo, hi = flops
    found: list[np.ndarray] = []
    for _ in range(tries):
        batch = np.stack([rng.choice(v, size=max(n, 64)) for v in legal], axis=1)
        if cost is not None and (lo > 0.0 or hi < 1.0):
            ratio = cost.flops_many(batch) / cost.base_flops
            batch = batch[(ratio >= lo) & (ratio <= hi)]
        found.extend(batch)
        if len(found) >= n:
            return np.stack(found[:n]).astype(np.int64)
    raise WidthSearchError(f"no random profile with a FLOPs ratio in [{lo:g}, {hi:g}] after {tries} batches")


class MetaBlock(nn.Module):
    """Two FC layers: layer encoding (2 keep ratios) -> weight tensor at full size."""

    def __init__(self, base: torch.Tensor, hidden: int):
        super().__init__()
        self.shape = tuple(base.shape)
        self.fc1 = nn.Linear(2, hidden)
        self.fc2 = nn.Linear(hidden, base.numel())
        with torch.no_grad():  # start at the base weight for every encoding
            self.fc2.weight.zero_()
            self.fc2.bias.copy_(base.flatten())

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(code))).view(self.shape)


class PruningNet(nn.Module):
    """Generates the weights of `model` for any width vector of `space` (group order).

    `order` ranks every group's channels (most important first; default: index order); a
    profile keeps the first ``w`` of each group's order.
    """

    def __init__(self, model: nn.Module, space: WidthSpace, hidden: int = 32, order: Order | None = None):
        super().__init__()
        if hidden < 1:
            raise WidthSearchError(f"hidden must be at least 1, got {hidden}")
        self.hidden = hidden
        self.order = check_order(space, identity_order(space) if order is None else order)
        self.net = copy.deepcopy(model).cpu()
        self.axes = layer_axes(self.net, space, self.order)
        self._space = space
        params = dict(self.net.named_parameters())
        self.blocks = nn.ModuleDict({_key(k): MetaBlock(params[k].detach(), hidden) for k in self.axes})
        for k in self.axes:
            params[k].requires_grad_(False)  # generated, never learned directly

    @property
    def space(self) -> WidthSpace:
        return self._space

    def _code(self, name: str, ratios: torch.Tensor) -> torch.Tensor:
        axes = self.axes[name]
        return torch.stack([ratios[axes[d].group] if d in axes else ratios.new_tensor(1.0) for d in (0, 1)])

    def forward(self, widths: Sequence[int]) -> dict[str, torch.Tensor]:
        """Dense-shaped generated weights, with every channel beyond its group's width zeroed."""
        widths = self._space.vector(self._space.from_vector(widths))
        device = device_of(self)
        ratios = torch.as_tensor(widths / self._space.widths, dtype=torch.float32, device=device)
        out = {}
        for name, axes in self.axes.items():
            weight = self.blocks[_key(name)](self._code(name, ratios))
            for dim, axis in axes.items():
                mask = torch.ones(weight.shape[dim], device=device)
                mask[axis.positions[int(widths[axis.group]) * axis.per_channel:].to(device)] = 0.0
                weight = weight * mask.view([-1 if d == dim else 1 for d in range(weight.dim())])
            out[name] = weight
        return out

    def logits(self, widths: Sequence[int], x: torch.Tensor) -> torch.Tensor:
        """The profile's network on `x` (the dense net with generated, masked weights)."""
        return functional_call(self.net, self(widths), (x,))

    def cropped(self, widths: Sequence[int]) -> dict[str, torch.Tensor]:
        """Generated weights cropped to the profile's exact shapes (the w best channels of every group, index order)."""
        widths = self._space.vector(self._space.from_vector(widths))
        out = {}
        for name, weight in self(widths).items():
            for dim, axis in self.axes[name].items():
                drop = set(axis.positions[int(widths[axis.group]) * axis.per_channel:].tolist())
                keep = [i for i in range(weight.shape[dim]) if i not in drop]
                weight = weight.index_select(dim, torch.tensor(keep, device=weight.device))
            out[name] = weight
        return out

    def materialize(self, widths: Sequence[int]) -> nn.Module:
        """The physically pruned network of the profile, with generated weights (BN statistics still to recalibrate)."""
        dense = copy.deepcopy(self.net).requires_grad_(True)  # an ordinary model again (tracing needs autograd)
        params = dict(dense.named_parameters())
        with torch.no_grad():
            for name, weight in self(widths).items():
                params[name].copy_(weight)
        return prune(dense, self._space, keep=keep_channels(self._space, self.order, widths))


def _key(name: str) -> str:
    return name.replace(".", "-")  # ModuleDict keys may not contain dots
