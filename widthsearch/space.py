"""WidthSpace: the searchable channel groups of a model, found with torch-pruning's DependencyGraph.

A *channel group* is a set of layers whose channels must be removed together (a conv's
output, the BN after it and the next conv's input; every conv summed into one residual
stream; the parts of a concat; depthwise convs). A *width profile* maps each group's
name (the qualified name of its root module) to the number of channels kept.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from .errors import ProfileError, WidthSearchError

Profile = dict[str, int]


@dataclass(frozen=True)
class ChannelGroup:
    """One searchable dimension: coupled channels rooted at module `name`."""

    name: str
    width: int
    min_width: int
    divisor: int
    layers: tuple[str, ...]

    def round(self, channels: float) -> int:
        """Nearest allowed width (a multiple of `divisor`, or the full width) within bounds."""
        if channels >= self.width:
            return self.width
        rounded = int(round(channels / self.divisor)) * self.divisor
        return max(self.min_width, min(self.width, rounded))

    def allowed(self, channels: int) -> bool:
        """True when `channels` is a legal width for this group."""
        return self.min_width <= channels <= self.width and (
            channels == self.width or channels % self.divisor == 0
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with the model in eval mode (BN statistics untouched), then restore."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's parameters (its first parameter's)."""
    return next(model.parameters()).device


def dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Trace `model` (in eval mode, so BN statistics are not touched; the example moved to the model's device)
    into a DependencyGraph.

    A model torch-pruning cannot trace (e.g. a channel shuffle: a view that interleaves channel groups)
    raises WidthSearchError naming the op and the layers around it.
    """
    with eval_mode(model):
        try:
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input.to(device_of(model)),
                                                         verbose=False)
        except (ZeroDivisionError, IndexError, KeyError, ValueError, RuntimeError) as exc:
            raise WidthSearchError(_trace_failure(model, exc)) from exc


def _trace_failure(model: nn.Module, exc: BaseException) -> str:
    """What to tell a user whose model torch-pruning's tracer fails on: where (the op and its nearest layers)."""
    node, tb = None, exc.__traceback__
    while tb is not None:  # the torch-pruning graph node being mapped when it failed, if any
        candidate = tb.tb_frame.f_locals.get("node")
        node = candidate if hasattr(candidate, "inputs") and hasattr(candidate, "outputs") else node
        tb = tb.tb_next
    where = ""
    if node is not None:
        names = {m: n for n, m in model.named_modules()}
        before, after = _nearest(node, "inputs", names), _nearest(node, "outputs", names)
        where = (f" at the op {node.name.split('(')[0]} (after layer {before!r}"
                 + (f", before layer {after!r}" if after else "") + ")")
    return (f"cannot build a width space for this model: torch-pruning's dependency tracing fails{where} with "
            f"{type(exc).__name__}: {exc}. The op reorders channels in a way torch-pruning cannot follow (e.g. "
            "ShuffleNet's channel shuffle), so no channel group around it can be pruned safely; search another "
            "model (e.g. torchvision:mobilenet_v2 or torchvision:resnet18), or replace that op in your own model")


def _nearest(node, direction: str, names: dict) -> str | None:
    """The qualified name of the nearest model layer from a graph node, walking its inputs or outputs."""
    seen, queue = set(), list(getattr(node, direction))
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.module in names:
            return names[current.module]
        queue += list(getattr(current, direction))
    return None


def root_group(graph: tp.DependencyGraph, root: nn.Module, idxs: Sequence[int]) -> tp.Group:
    """The torch-pruning group obtained by removing output channels `idxs` of `root`."""
    pruner = graph.get_pruner_of_module(root)
    return graph.get_pruning_group(root, pruner.prune_out_channels, list(idxs))


class WidthSpace:
    """The channel groups of a model and operations on width profiles."""

    def __init__(self, groups: Sequence[ChannelGroup], example_input: torch.Tensor, frozen: Sequence[str] = (),
                 model: nn.Module | None = None):
        if not groups:
            raise WidthSearchError("the model has no prunable channel group")
        self.groups: list[ChannelGroup] = list(groups)
        self.example_input = example_input.detach().clone()
        self.frozen = tuple(frozen)
        self.model = model  # the model the space was built from; not pickled
        self._index = {g.name: i for i, g in enumerate(self.groups)}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "model": None}

    # -- lookups -------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    @property
    def widths(self) -> np.ndarray:
        return np.array([g.width for g in self.groups], dtype=np.int64)

    @property
    def min_widths(self) -> np.ndarray:
        return np.array([g.min_width for g in self.groups], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, name: str) -> ChannelGroup:
        return self.groups[self._index[name]]

    # -- profiles ------------------------------------------------------------------
    def full(self) -> Profile:
        """The unpruned profile."""
        return {g.name: g.width for g in self.groups}

    def minimal(self) -> Profile:
        """The smallest profile the space allows."""
        return {g.name: g.min_width for g in self.groups}

    def uniform(self, ratio: float) -> Profile:
        """Keep the same fraction `ratio` of every group (rounded, within bounds)."""
        if not 0.0 < ratio <= 1.0:
            raise ProfileError(f"keep ratio must be in (0, 1], got {ratio!r}")
        return {g.name: g.round(ratio * g.width) for g in self.groups}

    def from_ratios(self, ratios: Mapping[str, float] | Sequence[float]) -> Profile:
        """Profile from per-group keep ratios (a mapping by name or a sequence in group order)."""
        if not isinstance(ratios, Mapping):
            if len(ratios) != len(self.groups):
                raise ProfileError(f"expected {len(self.groups)} ratios (one per group), got {len(ratios)}")
            ratios = dict(zip(self.names, ratios))
        unknown = sorted(set(ratios) - set(self._index))
        if unknown:
            raise ProfileError(f"unknown channel group {unknown[0]!r}")
        profile = self.full()
        for name, ratio in ratios.items():
            if not 0.0 <= float(ratio) <= 1.0 or math.isnan(float(ratio)):
                raise ProfileError(f"keep ratio of group {name!r} must be in [0, 1], got {ratio!r}")
            profile[name] = self[name].round(float(ratio) * self[name].width)
        return profile

    def ratios(self, profile: Mapping[str, int]) -> dict[str, float]:
        """Keep ratio of every group."""
        profile = self.validate(profile)
        return {g.name: profile[g.name] / g.width for g in self.groups}

    def validate(self, profile: Mapping[str, int]) -> Profile:
        """Check a profile; return it complete, in group order, with plain ints.

        Groups missing from `profile` keep their full width. Raises ProfileError naming
        the group and the bound on an unknown group, a non-integer width or a width out of
        bounds.
        """
        if not isinstance(profile, Mapping):
            raise ProfileError(f"a width profile is a mapping {{group: channels}}, got {type(profile).__name__}")
        for name in profile:
            if name not in self._index:
                raise ProfileError(f"unknown channel group {name!r}; groups are: {', '.join(self.names[:8])}"
                                   + (", ..." if len(self.names) > 8 else ""))
        out: Profile = {}
        for g in self.groups:
            value = profile.get(g.name, g.width)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)):
                raise ProfileError(f"width of group {g.name!r} must be an integer, got {value!r}")
            if not math.isfinite(float(value)) or float(value) != int(value):
                raise ProfileError(f"width of group {g.name!r} must be an integer, got {value!r}")
            value = int(value)
            if value < g.min_width:
                raise ProfileError(f"width of group {g.name!r} is {value}, below its minimum {g.min_width}")
            if value > g.width:
                raise ProfileError(f"width of group {g.name!r} is {value}, above its original width {g.width}")
            if not g.allowed(value):
                raise ProfileError(f"width of group {g.name!r} is {value}, not a multiple of its divisor {g.divisor}")
            out[g.name] = value
        return out

    def vector(self, profile: Mapping[str, int]) -> np.ndarray:
        """A validated profile as an int64 vector in group order."""
        p = self.validate(profile)
        return np.array([p[n] for n in self.names], dtype=np.int64)

    def from_vector(self, widths: Sequence[int]) -> Profile:
        """Inverse of `vector` (validated)."""
        if len(widths) != len(self.groups):
            raise ProfileError(f"expected {len(self.groups)} widths (one per group), got {len(widths)}")
        return self.validate(dict(zip(self.names, (int(w) for w in widths))))

    # -- serialisation ---------------------------------------------------------------
    def profile_to_json(self, profile: Mapping[str, int]) -> str:
        """JSON text of a validated profile."""
        return json.dumps(self.validate(profile))

    def profile_from_json(self, text: str) -> Profile:
        """Parse and validate a profile written by `profile_to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"width profile is not valid JSON: {exc}") from None
        return self.validate(data)

    def describe(self) -> list[dict]:
        """Plain-data description of the groups (for experiment metadata)."""
        return [{**asdict(g), "layers": list(g.layers)} for g in self.groups]


def _grouped(module) -> bool:
    """A grouped convolution that is not depthwise (ResNeXt-style)."""
    return isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups < module.in_channels


def build_space(
    model: nn.Module,
    example_input: torch.Tensor,
    frozen: Sequence[str] = (),
    min_width: int = 1,
    divisor: int = 1,
) -> WidthSpace:
    """Find the coupled channel groups of `model`.

    The classifier's output and the modules listed in `frozen` (qualified names) are never
    pruned. `divisor` > 1 restricts widths to its multiples (hardware-friendly); the
    minimum width is then at least `divisor`. Groups that cannot shrink are left out.
    """
    from .models import classifier_of

    if min_width < 1 or divisor < 1:
        raise WidthSearchError(f"min_width and divisor must be >= 1, got {min_width} and {divisor}")
    modules = dict(model.named_modules())
    for name in frozen:
        if name not in modules:
            raise WidthSearchError(f"frozen module {name!r} is not in the model")
    names = {m: n for n, m in modules.items()}
    ignored = [modules[classifier_of(model)]] + [modules[n] for n in frozen]
    graph = dependency_graph(model, example_input)
    floor = -(-max(min_width, divisor) // divisor) * divisor  # smallest multiple of divisor >= min_width
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored):
        root = group[0].dep.target.module
        width = len(group[0].idxs)
        if width <= floor or any(_grouped(d.target.module) for d, _ in group):
            continue  # too narrow to shrink, or touches a grouped conv torch-pruning cannot shrink safely
        layers = tuple(dict.fromkeys(names[d.target.module] for d, _ in group if d.target.module in names))
        groups.append(ChannelGroup(names[root], width, floor, divisor, layers))
    order = {n: i for i, n in enumerate(modules)}
    groups.sort(key=lambda g: order[g.name])  # model order, not tracing order
    return WidthSpace(groups, example_input, frozen, model)
