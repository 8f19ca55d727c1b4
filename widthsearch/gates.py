"""Relaxed per-channel gates with a complexity penalty (the ``gradient`` searcher's machinery).

One learnable logit ``a`` per channel of every channel group (coupled layers share it). With
the *architecture temperature* ``T`` the keep probability is ``p = sigmoid(a / T)``; with the
*sampling temperature* ``tau`` a relaxed Bernoulli(p) gate is drawn as
``z = sigmoid((a / T + log u - log(1 - u)) / tau)``, u ~ U(0, 1) (binary concrete). A gate
multiplies its channel at the input of every conv/linear layer that consumes the group, so
``z = 0`` computes exactly what the physically pruned model computes.

`optimize_gates` minimises ``task loss(z) + lam * cost(E[widths]) / cost(dense)`` over the
logits only (the weights are frozen), where ``E[width_g] = sum_c p_gc`` and ``cost`` is a
`Measure` evaluated in torch (FLOPs, params or the latency model). `extract` keeps the
channels with ``p > 0.5``, i.e. ``a > 0`` (at least the group's minimum width, rounded up to a legal width).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .budget import project_to_budget
from .cost import Measure
from .space import WidthSpace, dependency_graph, device_of, root_group

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class GateSchedule:
    """Gate optimisation: steps, Adam lr, initial logit and both temperatures (start -> end, geometric)."""

    steps: int = 100
    lr: float = 0.1
    init_logit: float = 3.0
    tau: float = 1.0          # sampling temperature at the start
    tau_end: float = 0.1      # ... and at the end
    temp: float = 1.0         # architecture temperature at the start
    temp_end: float = 0.1     # ... and at the end

    def at(self, step: int) -> tuple[float, float]:
        """(tau, T) at `step`: geometric interpolation from the start to the end values."""
        frac = step / max(1, self.steps - 1)
        return self.tau * (self.tau_end / self.tau) ** frac, self.temp * (self.temp_end / self.temp) ** frac


class ChannelGates(nn.Module):
    """Per-channel gate logits of `space`'s groups, applied to `model` at the consumers' inputs."""

    def __init__(self, model: nn.Module, space: WidthSpace, init_logit: float = 3.0):
        super().__init__()
        self.space = space
        sizes = [g.width for g in space.groups]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        device = device_of(model)
        self.logits = nn.Parameter(torch.full((int(self.offsets[-1]),), float(init_logit), device=device))
        self.register_buffer("group_of", torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                                                 torch.tensor(sizes, device=device)))
        self._maps = self._consumer_maps(model, space, device)
        self._current: torch.Tensor | None = None

    def _consumer_maps(self, model: nn.Module, space: WidthSpace, device) -> dict[nn.Module, torch.Tensor]:
        """Per consuming layer: for each input channel, the index of its gate (or of a constant 1)."""
        graph = dependency_graph(model, space.example_input)
        modules = dict(model.named_modules())
        ones = int(self.offsets[-1])  # index of the constant-1 slot
        maps: dict[nn.Module, torch.Tensor] = {}
        for j, g in enumerate(space.groups):
            for dep, idxs in root_group(graph, modules[g.name], range(g.width)):
                layer = dep.target.module
                if not isinstance(layer, _LAYERS) or graph.is_out_channel_pruning_fn(dep.handler):
                    continue
                size = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
                index = maps.setdefault(layer, torch.full((size,), ones, dtype=torch.long))
                if len(idxs) == g.width:  # one position per channel, in root order
                    index[torch.tensor(idxs)] = torch.arange(g.width) + int(self.offsets[j])
                else:  # several positions per channel (e.g. after a flatten): ask channel by channel
                    for c in range(g.width):
                        for d, ids in root_group(graph, modules[g.name], [c]):
                            if d.target.module is layer and d.handler == dep.handler:
                                index[torch.tensor(ids)] = int(self.offsets[j]) + c
        return {layer: index.to(device) for layer, index in maps.items()}

    def probabilities(self, temp: float = 1.0) -> torch.Tensor:
        """Keep probabilities sigmoid(a / T) of every channel (groups concatenated)."""
        return torch.sigmoid(self.logits / temp)

    def sample(self, tau: float, temp: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Relaxed Bernoulli(sigmoid(a / T)) gates at sampling temperature tau (reparameterised)."""
        u = torch.rand(self.logits.shape, generator=generator, device=self.logits.device).clamp(1e-6, 1 - 1e-6)
        return torch.sigmoid((self.logits / temp + torch.log(u) - torch.log1p(-u)) / tau)

    def expected_widths(self, p: torch.Tensor) -> torch.Tensor:
        """E[width] per group: the sum of its channels' keep probabilities."""
        return torch.zeros(len(self.space), dtype=p.dtype, device=p.device).index_add(0, self.group_of, p)

    def split(self, values: torch.Tensor) -> list[np.ndarray]:
        """Per-group slices of a per-channel vector, as numpy arrays."""
        flat = values.detach().cpu().double().numpy()
        return [flat[self.offsets[j]:self.offsets[j + 1]] for j in range(len(self.space))]

    @contextlib.contextmanager
    def applied(self) -> Iterator["ChannelGates"]:
        """Within the block, the model's consumers multiply their inputs by the gates set with `set`."""
        handles = [layer.register_forward_pre_hook(self._hook) for layer in self._maps]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._current = None

    def set(self, gates: torch.Tensor) -> None:
        """The per-channel gate values the next forward passes use."""
        self._current = torch.cat([gates, gates.new_ones(1)])

    def _hook(self, layer: nn.Module, args: tuple) -> tuple:
        if self._current is None:
            return args
        x, gate = args[0], self._current[self._maps[layer]]
        shape = (1, -1) + (1,) * (x.dim() - 2) if isinstance(layer, nn.modules.conv._ConvNd) else (-1,)
        return (x * gate.view(shape),) + tuple(args[1:])


@dataclass
class GateResult:
    """Outcome of one gate optimisation."""

    probabilities: list[np.ndarray]   # per group, at the final architecture temperature
    logits: list[np.ndarray]          # per group, the learnt a (p > 0.5 where a > 0; they order the channels)
    expected_ratio: float             # cost(E[widths]) / cost(dense) at the end
    task_loss: float                  # mean task loss over the last 10% of steps


def complexity_fn(measure: Measure):
    """Normalised differentiable complexity of real-valued widths: the measure over the dense model's."""
    return lambda w: measure.torch(w) / measure.base


def optimize_gates(model: nn.Module, space: WidthSpace, measure: Measure, batches: Iterator, lam: float,
                   schedule: GateSchedule = GateSchedule(), seed: int = 0) -> GateResult:
    """Learn the gate logits of `model` (whose weights stay frozen) for penalty `lam` x `measure`'s ratio.

    BatchNorm layers use batch statistics (train mode) without updating their running statistics,
    as adaptive BN will after extraction; `model` is left in eval mode with its parameters' grad flags restored.
    """
    penalty = complexity_fn(measure)
    gates = ChannelGates(model, space, schedule.init_logit)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # batch statistics, running statistics untouched
    model.train()
    optimizer = torch.optim.Adam([gates.logits], lr=schedule.lr)
    generator = torch.Generator(device=gates.logits.device).manual_seed(seed)
    losses: list[float] = []
    try:
        with gates.applied():
            for step in range(schedule.steps):
                tau, temp = schedule.at(step)
                x, y = next(batches)
                gates.set(gates.sample(tau, temp, generator))
                task = F.cross_entropy(model(x), y)
                loss = task + lam * penalty(gates.expected_widths(gates.probabilities(temp)))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(task.item())
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.eval()
    with torch.no_grad():
        p = gates.probabilities(schedule.temp_end)
        ratio = float(penalty(gates.expected_widths(p.double())))
    tail = losses[-max(1, len(losses) // 10):] or [math.nan]
    return GateResult(gates.split(p), gates.split(gates.logits), ratio, float(np.mean(tail)))


def extract(space: WidthSpace, logits: list[np.ndarray], measure: Measure | None = None,
            budget: float | None = None) -> dict[str, list[int]]:
    """Kept channel indices per group from the learnt gate logits: a > 0 (keep probability above 0.5 at any
    temperature), at least the minimum width, rounded up to a legal width; each group keeps its channels of the
    largest logits. (The logits order the channels: at the final temperature the probabilities of most kept
    channels round to exactly 1 in float32 and no longer tell them apart.)

    With a `measure` and a `budget`, a profile above the budget is scaled onto it as a whole (project_to_budget of
    its keep ratios: every group shrinks by the same factor, so the gates' allocation across groups is kept).
    """
    widths, orders = [], []
    for g, a in zip(space.groups, logits):
        width = max(int((np.asarray(a) > 0).sum()), g.min_width)
        while not g.allowed(width):
            width += 1
        widths.append(width)
        orders.append(np.argsort(-np.asarray(a), kind="stable"))
    if measure is not None and budget is not None and measure.ratio(widths) > budget:
        widths = project_to_budget(space, measure, np.asarray(widths) / space.widths, budget).tolist()
    return {g.name: sorted(int(c) for c in order[:w]) for g, order, w in zip(space.groups, orders, widths)}
