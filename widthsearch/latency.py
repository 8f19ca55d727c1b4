"""LatencyModel: a width profile's latency on a target device, from a table of measured layer timings.

Source: NetAdapt (Yang et al., ECCV 2018) budgets pruning by latency read from layer-wise look-up tables
measured on the target platform, the network's latency being the sum of its layers'. Here:

* **Units.** One trace of the model (forward hooks on its leaf modules and a TorchFunctionMode for the
  functional ops between them) splits a forward into the units that run one after another: a leaf module
  (conv, linear, pool, ...) together with the shape-preserving modules that consume its output directly
  (BN, activation, dropout: timed with it, as they run, and as runtimes fuse them), and elementwise
  functional ops outside modules (a residual `out + identity`, with the activation module after it).
* **Widths.** Every unit's input and output channel counts are affine in the group widths; their slopes
  come from :func:`widthsearch.cost.trace_slopes`, the CostModel's trace (one channel removed per group).
* **Grid.** Each distinct unit (same layers, same input size, same channel ranges) is timed at a grid of
  (c_in, c_out): `grid` legal widths per axis, ends included, taken from the group's own legal widths
  (multiples of the divisor), so profiles made with `--divisor` fall on or between measured points; a
  depthwise conv, a norm or an elementwise op (c_out tied to c_in) gets a 1-D grid. A unit at a grid point
  is a copy of the model's own layers shrunk with torch-pruning's layer pruners, timed on random inputs of
  the target's batch size. Between points: bilinear interpolation.
* **Overhead.** What runs between the units (functional glue, Python dispatch of container modules) is a
  fixed overhead: the whole model is timed at uniform keep ratios 1, 0.75, 0.5, 0.35 and 0.25, and the
  overhead is the median of (measured - sum of units). Prediction = overhead + sum over units. Tables are
  made monotone (a unit is never predicted slower at fewer channels; timing noise only adds time), so
  predictions grow with every width and the smallest profile is the fastest.
* **Timing.** Warm-up, then samples of enough calls for >= 10 ms each, 15 of them (at least 5, once they
  add up to 1 s); clock `wall` takes the median sample, clock `cpu` (one thread on a CPU shared with
  other work) the fastest sample of the process's CPU time. Whole models are timed in 3 interleaved
  passes. `threads` threads, CUDA synchronised; runtime `eager` (PyTorch, no_grad) or `onnxruntime` (each
  unit and the model exported to ONNX, one session each, CPU).

Deviations from NetAdapt: interpolation between grid points instead of a table at every width (a full
table costs hours); the overhead term (NetAdapt's tables cover whole layers of mobile runtimes, where
the glue is negligible; eager PyTorch at batch 1 spends a large share between layers); functional ops
other than elementwise ones (flatten, cat) are not timed as units but fall to the overhead.

Tables are cached as JSON keyed by the device, library versions, threads, batch, dtype, runtime, clock,
grid and the architecture's signature, under EXP/widthsearch/latency/ and a user cache folder
($WIDTHSEARCH_CACHE, else $XDG_CACHE_HOME/widthsearch, else ~/.cache/widthsearch), so experiments on the
same model and device reuse them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .cost import Measure, trace_slopes
from .errors import ConfigError, WidthSearchError
from .space import WidthSpace, eval_mode
from .target import LatencyTarget
from .timing import time_ms

FORMAT = 1                      # of the cached table; a change invalidates old tables
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # of target.DTYPES
CALIBRATION_RATIOS = (1.0, 0.75, 0.5, 0.35, 0.25)
ROUNDS = 3                      # interleaved passes over the whole-model timings (calibration, measure_profiles)
Timer = Callable[[nn.Module, tuple], float]   # (module, inputs) -> milliseconds per forward


# ----------------------------------------------------------------------------- timing
def make_timer(target: LatencyTarget, repeats: int = 15) -> Timer:
    """The timer of `target`: (module, CPU fp32 inputs) -> ms per forward on the target (see time_ms)."""
    device, dtype = torch.device(target.device), TORCH_DTYPES[target.dtype]
    sync = torch.cuda.synchronize if target.device == "cuda" else (lambda: None)

    def eager(module: nn.Module, inputs: tuple) -> float:
        module = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
        xs = tuple(x.to(device=device, dtype=dtype) for x in inputs)
        with torch.no_grad():
            return time_ms(lambda: module(*xs), sync, clock=target.clock, repeats=repeats)

    def onnx(module: nn.Module, inputs: tuple) -> float:
        import onnxruntime

        from .export import ONNX_OPSET, legacy_onnx_kwargs

        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = f"{tmp}/unit.onnx"
            names = [f"x{i}" for i in range(len(inputs))]
            torch.onnx.export(copy.deepcopy(module).eval(), inputs, path, input_names=names,
                              opset_version=ONNX_OPSET, **legacy_onnx_kwargs())
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = target.threads, 1
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
        return time_ms(lambda: session.run(None, feeds), clock=target.clock, repeats=repeats)

    timer = onnx if target.runtime == "onnxruntime" else eager

    def timed(module: nn.Module, inputs: tuple) -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(target.threads)
        try:
            return timer(module, inputs)
        finally:
            torch.set_num_threads(threads)

    return timed


# ----------------------------------------------------------------------------- trace
@dataclass
class _Unit:
    """One timed piece of a forward: leaf modules (a head and its followers) or an elementwise op."""

    modules: list[str]                     # qualified names (head first); [] for an op
    op: Callable | None                    # the functional op (with `template`), or None
    template: tuple                        # op args: ("tensor", i) placeholders for its tensor inputs
    kwargs: dict
    input_shape: tuple[int, ...]           # of the head's (first) input, dense, batch of the example
    inputs: int                            # tensor inputs


class _UnitTrace(TorchFunctionMode):
    """Records the units of one forward (see the module docstring) with their channel counts."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.records: list[tuple[_Unit, dict[str, float]]] = []
        self.depth = 0
        self.last = None  # output tensor of the last unit

    def run(self, example: torch.Tensor) -> list[tuple[_Unit, dict[str, float]]]:
        leaves = [m for m in self.model.modules() if not any(True for _ in m.children())]
        handles = [h for m in leaves for h in (m.register_forward_pre_hook(self._enter),
                                                m.register_forward_hook(self._leave))]
        try:
            with eval_mode(self.model), torch.no_grad(), self:
                self.model(example)
        finally:
            for h in handles:
                h.remove()
        return self.records

    def _enter(self, module, inputs) -> None:
        self.depth += 1

    def _leave(self, module, inputs, output) -> None:
        self.depth -= 1
        if self.depth:
            return
        name = self.names[module]
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        if len(tensors) != 1 or not isinstance(output, torch.Tensor) or tensors[0].dim() < 2 or output.dim() < 2:
            raise WidthSearchError(f"the latency model cannot time layer {name!r} ({type(module).__name__}): it "
                                   "needs one tensor input and one tensor output with a channel dimension")
        x = tensors[0]
        if x is self.last and x.shape == output.shape and self.records and _follower(module):
            unit, quantities = self.records[-1]
            unit.modules.append(name)
            quantities["c_out"] = float(output.shape[1])
        else:
            unit = _Unit([name], None, (), {}, tuple(x.shape), 1)
            self.records.append((unit, {"c_in": float(x.shape[1]), "c_out": float(output.shape[1])}))
        self.last = output

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and isinstance(out, torch.Tensor) and out.dim() >= 2:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if tensors and all(t.shape == out.shape for t in tensors) and \
                    not any(isinstance(v, torch.Tensor) for v in kwargs.values()):
                template, k = [], 0
                for a in args:
                    template.append(("tensor", k) if isinstance(a, torch.Tensor) else a)
                    k += isinstance(a, torch.Tensor)
                unit = _Unit([], func, tuple(template), dict(kwargs), tuple(out.shape), k)
                self.records.append((unit, {"c_in": float(out.shape[1]), "c_out": float(out.shape[1])}))
                self.last = out
        return out


def _follower(module: nn.Module) -> bool:
    """A layer timed with the unit whose output it consumes (BN, activation, dropout, ...): not a conv or linear."""
    from torch_pruning import ops

    return ops.module2type(module) not in (ops.OPTYPE.CONV, ops.OPTYPE.DEPTHWISE_CONV, ops.OPTYPE.LINEAR,
                                           ops.OPTYPE.EMBED, ops.OPTYPE.MHA, ops.OPTYPE.LSTM)


class _Op(nn.Module):
    """An elementwise functional op as a module (its tensor inputs are the forward's arguments)."""

    def __init__(self, func: Callable, template: tuple, kwargs: dict):
        super().__init__()
        self.func, self.template, self.kwargs = func, template, kwargs

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        args = [xs[a[1]] if isinstance(a, tuple) and len(a) == 2 and a[0] == "tensor" else a for a in self.template]
        return self.func(*args, **self.kwargs)

    def extra_repr(self) -> str:
        name = f"{getattr(self.func, '__module__', '') or ''}.{getattr(self.func, '__qualname__', repr(self.func))}"
        return f"{name}, {self.template!r}, {self.kwargs!r}"


def _shrink(module: nn.Module, c_in: int, c_out: int, name: str, head: bool) -> nn.Module:
    """A copy of `module` with c_in input and c_out output channels, by torch-pruning's layer pruners."""
    from torch_pruning import ops
    from torch_pruning.pruner.function import PrunerBox

    module = copy.deepcopy(module)
    kind = ops.module2type(module)
    pruner = PrunerBox.get(kind)
    dense_in = getattr(module, "in_channels", getattr(module, "in_features", None))
    dense_out = getattr(module, "out_channels", getattr(module, "out_features", getattr(module, "num_features", None)))
    if pruner is None:
        if any(True for _ in module.parameters()) and (dense_in not in (None, c_in) or dense_out not in (None, c_out)):
            raise WidthSearchError(f"the latency model cannot shrink layer {name!r} ({type(module).__name__})")
        return module
    if dense_out is None:
        dense_out = pruner.get_out_channels(module)
    if head and kind != ops.OPTYPE.DEPTHWISE_CONV and dense_in is not None and dense_in > c_in:
        pruner.prune_in_channels(module, list(range(c_in, dense_in)))
    if dense_out is not None and dense_out > c_out:
        pruner.prune_out_channels(module, list(range(c_out, dense_out)))
    return module


@dataclass
class _Planned:
    """A unit with its channel counts as affine maps of the widths, and the grid it is timed on."""

    unit: _Unit
    c_in: tuple[float, np.ndarray]         # (value at zero widths, slope per group)
    c_out: tuple[float, np.ndarray]
    tied: float | None                     # c_out = tied * c_in (depthwise, norms, elementwise ops)
    grid_in: np.ndarray
    grid_out: np.ndarray                   # [0] when tied
    signature: str


def _grid(const: float, slope: np.ndarray, space: WidthSpace, points: int) -> np.ndarray:
    """`points` channel counts over the range this affine map takes on legal profiles, ends included."""
    groups = np.flatnonzero(slope)
    if len(groups) == 0:
        return np.array([const])
    if len(groups) == 1:
        g = space.groups[groups[0]]
        legal = np.array([w for w in range(g.min_width, g.width + 1) if g.allowed(w)], dtype=np.float64)
        picks = legal[np.unique(np.round(np.linspace(0, len(legal) - 1, points)).astype(int))]
        return const + slope[groups[0]] * picks
    low = const + slope @ space.min_widths
    high = const + slope @ space.widths
    return np.unique(np.round(np.linspace(low, high, points)))


def _replica(model_modules: dict, unit: _Unit, c_in: int, c_out: int, batch: int) -> tuple[nn.Module, tuple]:
    """The unit at (c_in, c_out): a copy of the model's own layers, shrunk, and random inputs of `batch`."""
    shape = (batch, int(c_in), *unit.input_shape[2:])
    inputs = tuple(torch.randn(shape) for _ in range(unit.inputs))
    if unit.op is not None:
        return _Op(unit.op, unit.template, unit.kwargs), inputs
    layers = [_shrink(model_modules[name], c_in, c_out, name, head=i == 0) for i, name in enumerate(unit.modules)]
    return (layers[0] if len(layers) == 1 else nn.Sequential(*layers)), inputs


def plan(space: WidthSpace, model: nn.Module, grid: int = 5) -> list[_Planned]:
    """The units of `model` with their affine channel maps, grids and signatures (no timing)."""
    if grid < 2:
        raise ConfigError(f"the latency grid needs at least 2 points per axis, got {grid}")
    records, slopes = trace_slopes(space, model, lambda work, example: _UnitTrace(work).run(example))
    widths = space.widths.astype(np.float64)
    modules = dict(model.named_modules())
    planned = []
    for (unit, q), slope in zip(records, slopes):
        c_in = (q["c_in"] - float(slope["c_in"] @ widths), slope["c_in"])
        c_out = (q["c_out"] - float(slope["c_out"] @ widths), slope["c_out"])
        ratio = q["c_out"] / q["c_in"]
        tied = ratio if np.allclose(c_out[1], ratio * c_in[1]) and np.isclose(c_out[0], ratio * c_in[0]) else None
        grid_in = _grid(*c_in, space, grid)
        grid_out = np.array([0.0]) if tied is not None else _grid(*c_out, space, grid)
        corner = _replica(modules, unit, int(grid_in[-1]), int(q["c_out"]), 1)[0]
        signature = json.dumps([repr(corner), unit.input_shape[2:], unit.inputs, tied, grid_in.tolist(),
                                grid_out.tolist()])
        planned.append(_Planned(unit, c_in, c_out, tied, grid_in, grid_out, signature))
    return planned


def architecture_signature(space: WidthSpace, model: nn.Module, planned: Sequence[_Planned]) -> str:
    """A digest of what the table depends on in the model: its units, its groups and the example input."""
    text = json.dumps({"model": type(model).__qualname__, "groups": space.describe(),
                       "input": list(space.example_input.shape), "units": [p.signature for p in planned],
                       "calibration": CALIBRATION_RATIOS})
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- measuring
def measure_table(space: WidthSpace, model: nn.Module, target: LatencyTarget, planned: Sequence[_Planned], *,
                  timer: Timer | None = None, progress: bool = True) -> dict:
    """Time every distinct unit on its grid and the whole model at the calibration profiles (the table)."""
    from .training import Progress

    timer = timer or make_timer(target)
    modules = dict(model.named_modules())
    distinct = {p.signature: p for p in planned}
    points = sum(len(p.grid_in) * len(p.grid_out) for p in distinct.values()) + len(CALIBRATION_RATIOS) * ROUNDS
    bar = Progress(points, f"latency table ({target.device}, batch {target.batch})", enabled=progress)
    start, done, units = time.time(), 0, {}
    for signature, p in distinct.items():
        table = np.zeros((len(p.grid_in), len(p.grid_out)))
        for i, c_in in enumerate(p.grid_in):
            for j, c_out in enumerate(p.grid_out):
                c_out = round(p.tied * c_in) if p.tied is not None else c_out
                module, inputs = _replica(modules, p.unit, int(c_in), int(c_out), target.batch)
                try:
                    table[i, j] = timer(module, inputs)
                except Exception as exc:
                    what = p.unit.modules[0] if p.unit.modules else repr(_Op(p.unit.op, p.unit.template, {}))
                    raise WidthSearchError(f"timing {what!r} at {int(c_in)} -> {int(c_out)} channels failed: "
                                           f"{type(exc).__name__}: {exc}") from exc
                done += 1
                bar.update(done)
        units[signature] = table.tolist()
    sums = _UnitSums(planned, units)

    def step() -> None:
        nonlocal done
        done += 1
        bar.update(done)

    profiles = [space.vector(space.uniform(r)) for r in CALIBRATION_RATIOS]
    measured = [m["ms"] for m in measure_profiles(space, model, target, profiles, timer=timer, step=step)]
    predicted = sums(torch.from_numpy(np.stack(profiles).astype(np.float64))).numpy()
    calibration = [{"ratio": r, "measured_ms": m, "units_ms": float(u)}
                   for r, m, u in zip(CALIBRATION_RATIOS, measured, predicted)]
    overhead = calibrate([c["units_ms"] for c in calibration], [c["measured_ms"] for c in calibration])
    return {"format": FORMAT, "units": units, "calibration": calibration, "overhead_ms": overhead,
            "measure_s": time.time() - start, "loadavg": list(os.getloadavg()), "created_at": time.time(),
            "measured_on": {"host": platform.node(), "pid": os.getpid()}}


def calibrate(units_ms: Sequence[float], measured_ms: Sequence[float]) -> float:
    """The overhead: the median of (measured - sum of units) over the calibration profiles, so one disturbed
    measurement cannot move it. (A fitted scale as well was tried: on a busy machine five whole-model timings
    do not pin down two parameters, and the fit made small profiles worse.)"""
    return float(np.median(np.asarray(measured_ms, dtype=np.float64) - np.asarray(units_ms, dtype=np.float64)))


def monotone(table: np.ndarray) -> np.ndarray:
    """Each entry lowered to the fastest time at the same or more channels on both axes: timing noise only adds
    time, and a layer is not slower with fewer channels; so predictions never grow as widths shrink."""
    table = np.minimum.accumulate(np.asarray(table, dtype=np.float64)[::-1], axis=0)[::-1]
    return np.minimum.accumulate(table[:, ::-1], axis=1)[:, ::-1]


def _padded(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Rows of different lengths as one array, each padded with its last value."""
    width = max(len(r) for r in rows)
    return np.stack([np.pad(np.asarray(r, dtype=np.float64), (0, width - len(r)), mode="edge") for r in rows])


def _axis(grid: torch.Tensor, n: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit u: the lower index into grid[u, :n[u]] of each x[..., u] and its interpolation weight (x clipped
    to the grid's ends; differentiable in x)."""
    units = torch.arange(len(n), device=x.device)
    x = torch.clamp(x, grid[:, 0], grid[units, n - 1])
    i = torch.minimum((grid <= x[..., None]).sum(-1) - 1, torch.clamp(n - 2, min=0))
    lower, upper = grid[units, i], grid[units, torch.minimum(i + 1, n - 1)]
    span = upper - lower
    return i, torch.where(span > 0, (x - lower) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)


class _UnitSums:
    """W (..., groups) -> summed unit milliseconds (...): every unit bilinear in its (monotone) table, all units
    in one vectorised pass over padded grids and tables. In torch, so the same code serves `many` (float64, no
    grad) and the differentiable `torch`."""

    def __init__(self, planned: Sequence[_Planned], units: dict):
        tables = [monotone(units[p.signature]) for p in planned]
        k_in, k_out = max(t.shape[0] for t in tables), max(t.shape[1] for t in tables)
        tables = np.stack([np.pad(t, ((0, k_in - t.shape[0]), (0, k_out - t.shape[1])), mode="edge")
                           for t in tables])
        tied = np.array([p.tied is not None for p in planned])
        arrays = {"grid_in": _padded([p.grid_in for p in planned]), "grid_out": _padded([p.grid_out for p in planned]),
                  "table": tables, "a_in": np.array([p.c_in[0] for p in planned]),
                  "s_in": np.stack([p.c_in[1] for p in planned]),
                  "a_out": np.where(tied, 0.0, [p.c_out[0] for p in planned]),  # tied: the 1-point axis, at 0
                  "s_out": np.where(tied[:, None], 0.0, np.stack([p.c_out[1] for p in planned]))}
        self.values = {k: torch.tensor(v, dtype=torch.float64) for k, v in arrays.items()}
        self.n_in = torch.tensor([len(p.grid_in) for p in planned])
        self.n_out = torch.tensor([len(p.grid_out) for p in planned])

    def __call__(self, widths: torch.Tensor) -> torch.Tensor:
        v = {k: t.to(widths) for k, t in self.values.items()}
        n_in, n_out = self.n_in.to(widths.device), self.n_out.to(widths.device)
        i, f = _axis(v["grid_in"], n_in, widths @ v["s_in"].T + v["a_in"])
        j, g = _axis(v["grid_out"], n_out, widths @ v["s_out"].T + v["a_out"])
        i1, j1 = torch.minimum(i + 1, n_in - 1), torch.minimum(j + 1, n_out - 1)
        units, table = torch.arange(len(n_in), device=widths.device), v["table"]
        value = ((1 - f) * (1 - g) * table[units, i, j] + f * (1 - g) * table[units, i1, j]
                 + (1 - f) * g * table[units, i, j1] + f * g * table[units, i1, j1])
        return value.sum(-1)


# ----------------------------------------------------------------------------- the measure
class LatencyModel(Measure):
    """Predicted latency (ms per forward of `target.batch` images) of width profiles: a Measure for searchers.

    `many(W)` predicts every row of W (group order) in one vectorised pass, `torch(W)` the same differentiably;
    `base` is the dense model's prediction; `table` is the measured table (its key, calibration, overhead and
    `measure_s`).
    """

    name = "latency"
    unit = "ms"

    def __init__(self, planned: Sequence[_Planned], table: dict, full_widths: Sequence[int]):
        self.table = table
        self.overhead_ms = float(table["overhead_ms"])
        self._sums = _UnitSums(planned, table["units"])
        self.base = float(self.many(np.asarray(full_widths, dtype=np.float64))[0])

    def many(self, widths: np.ndarray) -> np.ndarray:
        widths = torch.from_numpy(np.atleast_2d(np.asarray(widths, dtype=np.float64)))
        with torch.no_grad():
            return (self.overhead_ms + self._sums(widths)).numpy()

    def torch(self, widths: torch.Tensor) -> torch.Tensor:
        """The prediction as a differentiable function of real-valued widths (group order, last dim):
        piecewise bilinear, so its gradient is each unit's table slope (zero beyond a grid's ends)."""
        return self.overhead_ms + self._sums(widths)

    def budget_of(self, max_ms: float, smallest: Sequence[int]) -> float:
        """The budget ratio of an absolute latency bound; ConfigError when no profile (`smallest`) is that fast."""
        floor = self.of(smallest)
        if max_ms < floor:
            raise ConfigError(f"max_latency_ms {max_ms:g} is below the smallest profile's predicted latency "
                              f"{floor:.4g} ms (dense: {self.base:.4g} ms on {self.table['key']['device_name']})")
        return min(1.0, max_ms / self.base)

    def describe(self) -> dict:
        """Plain data for experiment metadata: the key, the overhead, the calibration, how long measuring took."""
        return {"key": self.table["key"], "base_ms": self.base, "overhead_ms": self.overhead_ms,
                "calibration": self.table["calibration"], "measure_s": self.table["measure_s"],
                "loadavg": self.table["loadavg"]}


# ----------------------------------------------------------------------------- cache and build
def cache_folder() -> Path:
    """The user's latency cache: $WIDTHSEARCH_CACHE, else $XDG_CACHE_HOME/widthsearch, else ~/.cache/widthsearch."""
    root = os.environ.get("WIDTHSEARCH_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "widthsearch"
    return Path(root) / "latency"


def load_or_measure(space: WidthSpace, model: nn.Module, target: LatencyTarget, planned: Sequence[_Planned], *,
                    grid: int, exp_dir: str | None = None, cache_dir: str | os.PathLike | None = None,
                    timer: Timer | None = None, progress: bool = True) -> dict:
    """The table of `planned` on `target`: from the experiment's storage or the user cache when its key matches,
    else measured here (then written to both); the experiment always keeps a copy of the table it used, so that it
    explains its own numbers. Runs where the target is (a Ray task on a cluster)."""
    from .storage import Storage, write_atomic

    target.check_present()
    key = {"format": FORMAT, **target.environment(), "grid": grid,
           "architecture": architecture_signature(space, model, planned)}
    name = f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"
    local = Path(cache_dir) / name if cache_dir is not None else cache_folder() / name
    storage = Storage(exp_dir) if exp_dir else None
    kept = storage.read_bytes(f"latency/{name}") if storage else None
    for data in (kept, local.read_bytes() if local.is_file() else None):
        table = json.loads(data) if data else None
        if table and table.get("key") == key:
            if storage and data is not kept:  # from the user cache: the experiment keeps its copy
                storage.write_bytes(f"latency/{name}", data)
            return table
    table = {**measure_table(space, model, target, planned, timer=timer, progress=progress), "key": key}
    data = json.dumps(table, indent=1).encode()
    if storage:
        storage.write_bytes(f"latency/{name}", data)
    try:
        write_atomic(str(local), data)
    except OSError as exc:  # a read-only home: the experiment's copy is enough
        warnings.warn(f"cannot write the latency cache {local}: {exc}", stacklevel=2)
    return table


def latency_model(space: WidthSpace, model: nn.Module, target: LatencyTarget = LatencyTarget(), *, grid: int = 5,
                  exp_dir: str | None = None, cache_dir: str | os.PathLike | None = None, timer: Timer | None = None,
                  progress: bool = True, on_target: Callable | None = None) -> LatencyModel:
    """The LatencyModel of `model` on `target`: its table loaded from a cache or measured (minutes on a CPU).

    `on_target(fn, *args, **kwargs)` runs the loading/measuring elsewhere (e.g. :func:`ray_task`, on the
    nodes that run the trials); default: here. `timer` replaces the real clock (tests).
    """
    planned = plan(space, model, grid)
    call = on_target or (lambda fn, *args, **kwargs: fn(*args, **kwargs))
    table = call(load_or_measure, space, model, target, planned, grid=grid, exp_dir=exp_dir, cache_dir=cache_dir,
                 timer=timer, progress=progress)
    return LatencyModel(planned, table, space.widths)


def ray_task(cpus: float, gpus: float) -> Callable:
    """An `on_target` that runs its function as a Ray task with these resources (the trials' node type)."""

    def call(fn, *args, **kwargs):
        import ray

        return ray.get(ray.remote(num_cpus=cpus, num_gpus=gpus)(fn).remote(*args, **kwargs))

    return call


def measure_profiles(space: WidthSpace, model: nn.Module, target: LatencyTarget, profiles: Sequence[Sequence[int]],
                     *, timer: Timer | None = None, rounds: int = ROUNDS, paired: bool = False,
                     step: Callable[[], None] | None = None) -> list[dict]:
    """Measured latency of each width vector: the model pruned to it (l1; which channels go does not change the
    time), timed on `target` in `rounds` interleaved passes (a burst of load hits one pass, not every timing of
    a profile) and combined like the samples of one timing (clock cpu: the fastest; wall: the median).

    Returns [{"ms": ...}] in the order of `profiles`; `paired` times the dense model right before every profile
    and adds "ratio", the median over the passes of ms / dense ms (a change of load moves both timings of a
    pair, so the ratio, what a budget bounds, is steadier than either on a busy machine) and "dense_ms", the dense
    model's timings combined alike.
    """
    from .surgery import prune

    target.check_present()
    timer = timer or make_timer(target)
    example = torch.randn(target.batch, *space.example_input.shape[1:])
    models = [prune(model, space, space.from_vector(w)).eval() for w in profiles]
    times, dense, ratios = [[] for _ in models], [[] for _ in models], [[] for _ in models]
    for _ in range(rounds):
        for i, pruned in enumerate(models):
            if paired:
                dense[i].append(timer(model.eval(), (example,)))
            times[i].append(timer(pruned, (example,)))
            if paired:
                ratios[i].append(times[i][-1] / dense[i][-1])
            if step:
                step()
    pick = min if target.clock == "cpu" else statistics.median
    return [{"ms": pick(t), **({"ratio": statistics.median(r), "dense_ms": pick(d)} if paired else {})}
            for t, d, r in zip(times, dense, ratios)]
