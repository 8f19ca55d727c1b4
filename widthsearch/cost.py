"""CostModel: exact, analytic FLOPs and parameter counts of any width profile.

Units follow torch-pruning's `count_ops_and_params` exactly, so that the two agree to the
operation on a physically pruned model: *FLOPs* are multiply-accumulates of convolutions
and linear layers, plus one operation per output element for biases, activations and
pooling inputs, and two per element for affine normalisation layers; per example image.

How it works. Every counted layer call costs a product of at most two quantities that are
affine in the widths: a conv costs (k / groups) * c_in * numel(output) + bias * numel(output),
a linear layer numel(input) * out_features + bias * out_features, a BN/activation/pool a
multiple of numel. One trace records those quantities on the dense model; then, on a copy,
one channel is physically removed from each group in turn and the trace repeated, which
gives the exact coefficient of that group's width in every quantity (1 per channel, or
H*W after a flatten, summed over concat parts). Expanding the products gives
cost(w) = c0 + b.w + w.Q.w, evaluated in microseconds and vectorised over many profiles.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch_pruning.utils import op_counter

from .errors import ConfigError, WidthSearchError
from .space import WidthSpace, dependency_graph, eval_mode, root_group

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_ACTIVATIONS = (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6, nn.GELU)
_POOLS = tuple(m for m in op_counter.MODULES_MAPPING if "Pool" in m.__name__)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d, nn.GroupNorm)

# A term is coefficient * product of named quantities; quantities are affine in widths.
_Term = tuple[float, tuple[str, ...]]


def _call_terms(module: nn.Module, inputs: tuple, output: torch.Tensor) -> tuple[dict[str, float], list[_Term]]:
    """The quantities one counted layer call depends on, and its FLOPs as terms over them."""
    x = inputs[0]
    q = {"in": float(x.numel()), "out": float(output.numel())}
    if isinstance(module, _CONV):
        kernel = float(np.prod(module.kernel_size))
        bias = [(1.0, ("out",))] if module.bias is not None else []
        if module.groups == module.in_channels and module.groups > 1:  # depthwise: c_in/groups stays 1
            return q, [(kernel * module.in_channels / module.groups, ("out",))] + bias
        q["c_in"] = float(module.in_channels)
        q["groups"] = float(module.groups)
        return q, [(kernel / module.groups, ("c_in", "out"))] + bias
    if isinstance(module, nn.Linear):
        q["features"] = float(output.shape[-1])
        return q, [(1.0, ("in", "features"))] + ([(1.0, ("features",))] if module.bias is not None else [])
    if isinstance(module, _ACTIVATIONS):
        return q, [(1.0, ("out",))]
    if isinstance(module, _POOLS):
        return q, [(1.0, ("in",))]
    if isinstance(module, _NORMS):
        return q, [(2.0 if module.affine else 1.0, ("in",))]
    if isinstance(module, nn.LayerNorm):
        return q, [(2.0 if module.elementwise_affine else 1.0, ("in",))]
    if isinstance(module, nn.Upsample):
        return q, [(1.0 / x.shape[0], ("out",))]
    raise WidthSearchError(f"CostModel cannot model layer type {type(module).__name__}")


Record = list[tuple[object, dict[str, float]]]  # per traced item: (what it is, {quantity: value})


class _Recorder:
    """Forward hooks that record, per counted layer call, the quantities its cost depends on."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}

    def run(self, example_input: torch.Tensor) -> Record:
        """One record per counted layer call (("call", name, terms), quantities), then one per parameter
        (("param", shape), {dim index: size})."""
        calls: Record = []

        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise WidthSearchError(f"CostModel cannot model layer {self.names[module]!r} (non-tensor output)")
            quantities, terms = _call_terms(module, inputs, output)
            calls.append((("call", self.names[module], terms), quantities))

        handles = [m.register_forward_hook(hook) for m in self.model.modules()
                   if type(m) in op_counter.MODULES_MAPPING]
        try:
            with eval_mode(self.model), torch.no_grad():
                self.model(example_input)
        finally:
            for h in handles:
                h.remove()
        shapes = [(("param", tuple(p.shape)), {str(d): float(n) for d, n in enumerate(p.shape)})
                  for p in self.model.parameters()]
        return calls + shapes


def trace_slopes(space: WidthSpace, model: nn.Module, record) -> tuple[Record, list[dict[str, np.ndarray]]]:
    """Quantities of a model and their exact slope in every group's width.

    `record(model, example_input)` returns a list of (info, {quantity: value}); it runs on a copy of `model`,
    once dense and once after physically removing one channel of each group in turn (cumulatively), so that
    value(w) = value_dense - slope . (full widths - w) for every quantity that is affine in the widths
    (channel counts, numels, features after a flatten). Returns the dense records and, per record,
    {quantity: slope vector over the groups}. Raises WidthSearchError when pruning changes the structure.
    """
    work = copy.deepcopy(model).cpu()
    example = space.example_input.cpu()
    dense = record(work, example)
    g = len(space)
    slopes = [{k: np.zeros(g) for k in q} for _, q in dense]
    graph = dependency_graph(work, example)
    modules = dict(work.named_modules())
    previous = dense
    for j, group in enumerate(space.groups):
        root_group(graph, modules[group.name], [0]).prune()
        now = record(work, example)
        if len(now) != len(dense):
            raise WidthSearchError(f"pruning group {group.name!r} changed the model's structure")
        for slope, (_, before), (_, after) in zip(slopes, previous, now):
            for k in slope:
                slope[k][j] = before[k] - after[k]
        previous = now
    return dense, slopes


@dataclass
class _Affine:
    """value(w) = const + coef . w"""

    const: float
    coef: np.ndarray


class Measure:
    """A budgeted quantity of width profiles (FLOPs, params, latency): what a searcher keeps within budget x base.

    Searchers see only this interface, so every searcher works under every constraint:
    `many(W)` values of width vectors (rows in group order), `of(widths)` one value, `ratio`/`ratio_many`
    the same divided by `base` (the dense model's value), and `torch(W)` a differentiable version
    (for gradient-based searchers; a measure without one raises NotImplementedError).
    """

    name: str = ""       # "flops", "params", "latency"
    unit: str = ""       # for messages: "FLOPs", "params", "ms"
    base: float = 1.0

    def many(self, widths: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def torch(self, widths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} measure is not differentiable")

    def of(self, widths: Sequence[int] | np.ndarray) -> float:
        """Value of one width vector (group order)."""
        return float(self.many(np.asarray(widths, dtype=np.float64)[None, :])[0])

    def ratio(self, widths: Sequence[int] | np.ndarray) -> float:
        """Value of one width vector as a fraction of the dense model's."""
        return self.of(widths) / self.base

    def ratio_many(self, widths: np.ndarray) -> np.ndarray:
        """Values of many width vectors as fractions of the dense model's."""
        return self.many(widths) / self.base

    def check_budget(self, budget: float, smallest: Sequence[int] | np.ndarray) -> float:
        """`budget` as a float in (0, 1] that the smallest profile (`smallest`, widths in group order) meets;
        ConfigError otherwise. The check of a budget where it meets a width space (a searcher's constructor)."""
        try:
            budget = float(budget)
        except (TypeError, ValueError):
            raise ConfigError(f"budget must be a number in (0, 1] or None, got {budget!r}") from None
        if not 0.0 < budget <= 1.0 or math.isnan(budget):
            raise ConfigError(f"budget must be in (0, 1], got {budget!r}")
        floor = self.ratio(smallest)
        if floor > budget:
            raise ConfigError(f"budget {budget:g} is unreachable: the smallest profile of this model has "
                              f"{self.unit} ratio {floor:.4g}")
        return budget


class _CountMeasure(Measure):
    """FLOPs or params of a CostModel as a Measure."""

    def __init__(self, name: str, unit: str, many, torch_fn, base: float):
        self.name, self.unit, self.base = name, unit, float(base)
        self._many, self._torch = many, torch_fn

    def many(self, widths: np.ndarray) -> np.ndarray:
        return self._many(np.atleast_2d(np.asarray(widths, dtype=np.float64)))

    def torch(self, widths: torch.Tensor) -> torch.Tensor:
        return self._torch(widths)


class CostModel:
    """FLOPs and params of any profile of `space`, exactly as torch-pruning counts them.

    `flops(profile)` / `params(profile)` take one profile (a mapping) and return ints;
    `flops_many(W)` / `params_many(W)` take an array of width vectors (rows in group order);
    `measure("flops" | "params")` gives either as a :class:`Measure` for searchers.
    """

    MEASURES = ("flops", "params")

    def __init__(self, space: WidthSpace, model: nn.Module | None = None):
        model = model if model is not None else space.model
        if model is None:
            raise WidthSearchError("CostModel needs the model: pass it, or a space fresh from build_space")
        self.space = space
        self.batch = int(space.example_input.shape[0])
        records, slopes = trace_slopes(space, model, lambda work, example: _Recorder(work).run(example))
        widths = space.widths.astype(np.float64)
        g = len(space)

        def affine(value: float, slope: np.ndarray) -> _Affine:
            return _Affine(value - float(slope @ widths), slope)

        flops_terms: list[tuple[float, list[_Affine]]] = []
        params_terms: list[tuple[float, list[_Affine]]] = []
        for (info, quantities), slope in zip(records, slopes):
            if info[0] == "call":
                _, name, terms = info
                if "groups" in quantities and np.any(slope["groups"]):
                    raise WidthSearchError(f"CostModel cannot model grouped convolution {name!r}")
                for coef, keys in terms:
                    flops_terms.append((coef, [affine(quantities[k], slope[k]) for k in keys]))
            else:  # ("param", shape)
                dims = [(quantities[k], slope[k]) for k in sorted(quantities, key=int)]
                varying = [affine(d, s) for d, s in dims if np.any(s)]
                fixed = float(np.prod([d for d, s in dims if not np.any(s)]))
                if len(varying) > 2:
                    raise WidthSearchError(f"CostModel cannot model a parameter of shape {info[1]} (>2 pruned dims)")
                params_terms.append((fixed, varying))
        self._flops = _Polynomial.expand(flops_terms, g)
        self._params = _Polynomial.expand(params_terms, g)
        self.base_flops = self.flops(space.full())
        self.base_params = self.params(space.full())

    # -- evaluation -------------------------------------------------------------------
    def _vector(self, profile: Mapping[str, int]) -> np.ndarray:
        return self.space.vector(profile).astype(np.float64)

    def flops(self, profile: Mapping[str, int]) -> float:
        """FLOPs per image of `profile` (an int when the example input has batch 1)."""
        return self._per_image(self._flops(self._vector(profile)))

    def params(self, profile: Mapping[str, int]) -> int:
        """Parameter count of `profile`."""
        return int(round(self._params(self._vector(profile))))

    def flops_ratio(self, profile: Mapping[str, int]) -> float:
        """FLOPs of `profile` as a fraction of the dense model's."""
        return self.flops(profile) / self.base_flops

    def flops_many(self, widths: np.ndarray) -> np.ndarray:
        """FLOPs per image of many width vectors (rows in group order); no validation."""
        return self._flops.many(np.asarray(widths, dtype=np.float64)).round() / self.batch

    def params_many(self, widths: np.ndarray) -> np.ndarray:
        """Parameter counts of many width vectors (rows in group order); no validation."""
        return self._params.many(np.asarray(widths, dtype=np.float64)).round()

    def flops_torch(self, widths: torch.Tensor) -> torch.Tensor:
        """FLOPs per image as a differentiable torch function of real-valued widths (group order, last dim)."""
        return self._flops.torch(widths) / self.batch

    def params_torch(self, widths: torch.Tensor) -> torch.Tensor:
        """Parameter count as a differentiable torch function of real-valued widths (group order, last dim)."""
        return self._params.torch(widths)

    def measure(self, name: str = "flops") -> Measure:
        """FLOPs or params as a Measure (what searchers budget)."""
        if name == "flops":
            return _CountMeasure("flops", "FLOPs", self.flops_many, self.flops_torch, self.base_flops)
        if name == "params":
            return _CountMeasure("params", "params", self.params_many, self.params_torch, self.base_params)
        raise WidthSearchError(f"CostModel has no measure {name!r}; expected one of: {', '.join(self.MEASURES)}")

    def _per_image(self, total: float) -> float:
        total = int(round(total))
        return total // self.batch if total % self.batch == 0 else total / self.batch


@dataclass
class _Polynomial:
    """c0 + b.w + w.Q.w"""

    c0: float
    b: np.ndarray
    q: np.ndarray

    @classmethod
    def expand(cls, terms: Sequence[tuple[float, list[_Affine]]], g: int) -> "_Polynomial":
        c0, b, q = 0.0, np.zeros(g), np.zeros((g, g))
        for coef, factors in terms:
            if not factors:
                c0 += coef
            elif len(factors) == 1:
                (f,) = factors
                c0 += coef * f.const
                b += coef * f.coef
            else:
                f, h = factors
                c0 += coef * f.const * h.const
                b += coef * (f.const * h.coef + h.const * f.coef)
                q += coef * np.outer(f.coef, h.coef)
        return cls(c0, b, q)

    def __call__(self, w: np.ndarray) -> float:
        return float(self.c0 + self.b @ w + w @ self.q @ w)

    def torch(self, w: torch.Tensor) -> torch.Tensor:
        """The same polynomial on a torch tensor (differentiable; rows in the last dimension)."""
        b, q = w.new_tensor(self.b), w.new_tensor(self.q)
        return self.c0 + w @ b + ((w @ q) * w).sum(-1)

    def many(self, w: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(w)
        return self.c0 + w @ self.b + np.einsum("pg,gh,ph->p", w, self.q, w)
