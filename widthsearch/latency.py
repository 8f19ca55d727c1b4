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
  (c_in, c_out): `grid` legal widths per axis (:func:`grid_widths`), taken from the group's own legal widths
  (multiples of the divisor), so profiles made with `--divisor` fall on or between measured points: the two
  narrowest and the two widest, the rest spaced evenly in square root in between. The narrowest width often
  runs another kernel (a depthwise conv of one channel is a plain conv, 3x faster on oneDNN than one of two
  channels: interpolating from it put cifar_mobilenetv2's depthwise units 15-30% low on average, 70% at two
  channels); the full width often runs another kernel than the one below it (oneDNN at batch 64: 3 -> 64
  channels 2.5x slower than 3 -> 63; 462 -> 462 at 4x4 slower than 512 -> 512). A depthwise conv, a norm or an
  elementwise op (c_out tied to c_in) gets a 1-D grid. Runtime onnxruntime (ALIGN): a conv whose input
  channels are a multiple of 4 runs another kernel (ONNX Runtime 1.32 on AVX-512: a depthwise conv of 577
  channels 10x slower than one of 576, a 3x3 conv of 61 input channels 1.8x slower than one of 60), so such a
  conv gets two grids, one over input widths that are multiples of 4 and one over the others, and a profile
  is read from the grid of its width's class. A unit at a grid point is a copy of the model's own
  layers shrunk with torch-pruning's layer pruners, timed on random inputs of the target's batch size.
  Between points: bilinear interpolation.
* **Monotone.** Tables are made monotone below the full width (a unit is never predicted slower at fewer
  channels; timing noise only adds time), so predictions grow with every width below the full ones and the
  smallest profile is the fastest; the full width itself keeps its own time (it may run a faster kernel), and
  under onnxruntime a width that is a multiple of 4 may be faster than the one below it.
* **Composition.** A unit runs slower inside the model than alone, where its weights and inputs stay in the
  caches between calls, and what runs between the units (functional glue, Python dispatch of container
  modules, a runtime's session call) is not in any unit: prediction = overhead + scale x sum over units. The
  whole model is timed at the dense profile and at six random profiles around keep ratios 0.85 to 0.2
  (:func:`calibration_profiles`: widths of every kind, not only the round ones of uniform ratios), and
  (overhead, scale) fitted by Theil-Sen, robust to one disturbed timing (:func:`calibrate`); under onnxruntime
  the aligned entries get a scale of their own (:func:`calibrate_aligned`).
* **Cold weights.** A unit timed alone finds its weights in the caches; a model whose weights outgrow the
  last-level cache streams them from memory on every forward (ONNX Runtime, cifar_vgg16 at batch 1: the whole
  model 1.4-1.6x its units' summed time from 35 MiB of weights on, with a 32 MiB L3; see COLD). On a (device,
  runtime) of COLD, when the dense model's weights exceed half the cache (:func:`cold_cache_bytes`), every grid
  point is also timed cold (each sample one call after `evict_caches`; its extra over the warm time counted above
  the one at the unit's narrowest point, :func:`cold_extra`), and a profile counts each unit's warm time plus
  :func:`cold_share` of its cold extra: how cold a working set of the profile's weight bytes
  (:class:`WeightBytes`) is on this machine, read from a curve measured with the table (:func:`cold_curve`: a
  buffer of 1 to 128 MiB read again and again), so profiles that fit in the cache keep their warm tables.
* **Timing.** Warm-up, then samples of enough calls for a minimum duration each; clock `wall` takes the median
  sample, clock `cpu` (one thread on a CPU shared with other work) the fastest sample of the process's CPU
  time. Grid points: samples of >= 1 ms, 2 to 8 of them within 40 ms, and two interleaved passes over each
  unit's grid for points timed in under 50 ms (a burst of load slows one pass, not both), the faster kept.
  Whole models: samples of >= 10 ms (calibration: 3 to 10 in 0.25 s), 3 interleaved passes. `threads`
  threads, CUDA synchronised; runtime `eager` (PyTorch, no_grad) or `onnxruntime` (each unit and the model
  exported to ONNX, one session each, CPU, inputs and outputs bound to buffers once). The C allocator is held
  steady first (:func:`widthsearch.timing.steady_allocator`): under glibc's default a forward's large
  activations were mapped afresh on every call, at a cost that moved with the process's history.

Deviations from NetAdapt: interpolation between grid points instead of a table at every width (a full
table costs hours), with the grid's ends doubled where kernels switch, and a grid per residue class of the
input channels under onnxruntime; the composition term (NetAdapt's
tables cover whole layers of mobile runtimes, where the glue is negligible; eager PyTorch at batch 1 spends
a large share between layers, and a layer alone runs from warmer caches than inside the model); functional
ops other than elementwise ones (flatten, cat) are not timed as units but fall to the overhead. Known
limits: a unit's time is not smooth in its channels where the kernel's blocking depends on them (oneDNN at
batch 64: 512 -> 364 channels 1.5x slower per FLOP than 512 -> 512 or 512 -> 242), which interpolation
cannot follow between grid points (single units off by up to 30%; the errors partly cancel over a model's
units); onnxruntime lays out the whole graph at once (a blocked layout where channels allow it, fused adds),
which per-class scales (ALIGN) follow only on average: a pruned model's layout changes between its layers.

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

from .cost import CostModel, Measure, trace_slopes
from .errors import ConfigError, WidthSearchError
from .space import WidthSpace, eval_mode
from .target import LatencyTarget
from .timing import evict_caches, last_level_cache_bytes, read_ns_per_byte, time_ms

FORMAT = 3                      # of the cached table; a change invalidates old tables (3: timed with steady_allocator)
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # of target.DTYPES
# (device, runtime) -> the input-channel modulus whose multiples run other kernels (plan; see alignment). Eager
# PyTorch on the CPU has none: oneDNN at batch 64 runs a 3x3 conv of 24 or 32 input channels 1.5x slower than one
# of 28, yet a split by c_in % 8 (bench/latency.py, 2026-12-06) helped cifar_resnet20 at batch 64 (ratio within
# 10%: 72% -> 90% of profiles) and hurt cifar_resnet56 (82% -> 48%; its small profiles predicted 15-20% fast).
ALIGN = {("cpu", "onnxruntime"): 4}
# (device, runtime) whose units are also timed with their weights out of the caches (see COLD and cold_cache_bytes):
# ONNX Runtime at batch 1 ran cifar_vgg16 in 0.93-1.06x its units' summed time up to 12 MiB of weights, 1.15x at
# 21.5 MiB and 1.41-1.58x at 35-55 MiB (L3: 32 MiB; bench/latency.py --residuals, 2026-12-07), while eager PyTorch
# ran it in 1.10-1.26x at every size (oneDNN reorders the weights on each call, inside the model and alone).
COLD = {("cpu", "onnxruntime")}
CALIBRATION_RATIOS = (1.0, 0.85, 0.7, 0.55, 0.4, 0.3, 0.2)
ROUNDS = 3                      # interleaved passes over the whole-model timings (calibration, measure_profiles)
SCALE_RANGE = (0.5, 2.0)        # the calibrated in-context scale of the summed units is clipped to this range
UNIT_PASSES = 2                 # interleaved passes over each unit's grid, for points timed in under REPASS_S
REPASS_S = 0.05                 # a point whose timing spans longer is timed once (a burst of load hits few samples)
UNIT_TIMING = {"warmup": 1, "min_sample_s": 0.001, "repeats": 8, "min_repeats": 2, "budget_s": 0.04}  # per point
COLD_TIMING = {"warmup": 1, "repeats": 3, "min_repeats": 3}  # per point, each sample one call after evict_caches
CURVE_MIB = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 48, 64, 128)  # buffer sizes of the cold curve (cold_curve)
CALIBRATION_TIMING = {"repeats": 10, "min_repeats": 3, "budget_s": 0.25}  # per calibration profile and round
Timer = Callable[[nn.Module, tuple], float]   # (module, inputs) -> milliseconds per forward


# ----------------------------------------------------------------------------- timing
def make_timer(target: LatencyTarget, repeats: int = 15, **timing) -> Timer:
    """The timer of `target`: (module, CPU fp32 inputs) -> ms per forward on the target (see time_ms; `timing`:
    its other sampling arguments). Its `prepare(module, inputs)` readies a module once (copied to the device;
    for onnxruntime exported and loaded in a session) and returns a function `run(cold=False)` that times it, for
    repeated timings; `cold=True`: COLD_TIMING's samples, each one call after the caches were emptied
    (`evict_caches`) and the inputs read back in, so the call streams its weights from memory as a layer inside a
    model that outgrows the caches does."""
    device, dtype = torch.device(target.device), TORCH_DTYPES[target.dtype]
    sync = torch.cuda.synchronize if target.device == "cuda" else (lambda: None)
    sampling = {"clock": target.clock, "repeats": repeats, **timing}

    def evicting(inputs: Sequence, cold: bool) -> dict:
        if not cold:
            return sampling
        return {"clock": target.clock, **COLD_TIMING, "before": lambda: (evict_caches(), [x.sum() for x in inputs])}

    def eager(module: nn.Module, inputs: tuple) -> Callable[[], float]:
        module = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
        xs = tuple(x.to(device=device, dtype=dtype) for x in inputs)

        def run(cold: bool = False) -> float:
            with torch.no_grad():
                return time_ms(lambda: module(*xs), sync, **evicting(xs, cold))

        return run

    def onnx(module: nn.Module, inputs: tuple) -> Callable[[], float]:
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
        # Inputs and outputs bound once to CPU buffers: a run copies no output into a new array (a copy a unit
        # alone would pay, on its output's size, that the model pays once).
        arrays = [np.ascontiguousarray(x.numpy()) for x in inputs]
        outputs = [np.empty_like(o) for o in session.run(None, {i.name: a for i, a in zip(session.get_inputs(),
                                                                                           arrays)})]
        binding = session.io_binding()
        for i, a in zip(session.get_inputs(), arrays):
            binding.bind_cpu_input(i.name, a)
        for o, buffer in zip(session.get_outputs(), outputs):
            binding.bind_output(o.name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)

        def run(cold: bool = False) -> float:
            keep = (arrays, outputs)  # noqa: F841  (the bound buffers live as long as the timing)
            return time_ms(lambda: session.run_with_iobinding(binding), **evicting(arrays, cold))

        return run

    ready = onnx if target.runtime == "onnxruntime" else eager

    def threaded(fn: Callable, *args) -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(target.threads)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(threads)

    def prepare(module: nn.Module, inputs: tuple) -> Callable[..., float]:
        run = threaded(ready, module, inputs)
        return lambda cold=False: threaded(run, cold)

    def timed(module: nn.Module, inputs: tuple) -> float:
        return prepare(module, inputs)()

    timed.prepare = prepare
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
    align: int = 0                         # >1: this entry holds the c_in of one residue class (see ALIGN)
    aligned: bool = False                  # which: c_in % align == 0, else != 0

    def active(self, c_in: float) -> bool:
        """Whether this entry predicts the unit at `c_in` input channels (always, unless split by residue)."""
        return self.align < 2 or (round(c_in) % self.align == 0) == self.aligned


def _channels(const: float, slope: np.ndarray, space: WidthSpace) -> np.ndarray | None:
    """The channel counts this affine map takes on one group's legal widths; None when several groups feed it."""
    groups = np.flatnonzero(slope)
    if len(groups) != 1:
        return None
    g = space.groups[groups[0]]
    return const + slope[groups[0]] * np.array([w for w in range(g.min_width, g.width + 1) if g.allowed(w)],
                                               dtype=np.float64)


def _grid(const: float, slope: np.ndarray, space: WidthSpace, points: int,
          keep: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """`points` channel counts over the range this affine map takes on legal profiles, ends included: of one
    group's legal widths (those whose channel counts `keep` selects), :func:`grid_widths`; of several groups'
    (a concat), evenly spaced."""
    groups = np.flatnonzero(slope)
    if len(groups) == 0:
        return np.array([const])
    channels = _channels(const, slope, space)
    if channels is not None:
        channels = np.sort(channels if keep is None else channels[keep(channels)])
        return grid_widths(channels, points)
    low = const + slope @ space.min_widths
    high = const + slope @ space.widths
    return np.unique(np.round(np.linspace(low, high, points)))


def grid_widths(legal: np.ndarray, points: int) -> np.ndarray:
    """`points` of the sorted `legal` widths (all of them when there are no more): the two narrowest, the two
    widest, and the rest spaced evenly in square root between the second narrowest and the second widest, each
    the nearest legal width (`points` 2: the ends; 3: the two narrowest and the widest).

    The two narrowest: at the narrowest width a layer often runs another kernel (a depthwise conv of one channel is
    a plain conv, 3x faster on oneDNN than a depthwise one of two channels), so interpolating from it to a wide grid
    point misses everything in between. The two widest: the full width is often a multiple of the vector or block
    size that the one below it is not, and runs another kernel, faster or slower (oneDNN at batch 64: 3 -> 64
    channels 2.5x slower than 3 -> 63); with the second widest on the grid, the step stays between the two widest
    and every pruned width is interpolated between widths of its own kind. Square-root spacing in between: denser at
    small widths, where fixed costs bend the time curve, yet not sparse at large ones, where a kernel's efficiency
    still grows.
    """
    legal = np.asarray(legal, dtype=np.float64)
    n = len(legal)
    if n <= points:
        return legal
    if points < 3:
        return legal[[0, -1]]
    ends = {0, 1, n - 1} | ({n - 2} if points >= 4 else set())
    inner = np.linspace(np.sqrt(legal[1]), np.sqrt(legal[-2]), points - 2)[1:-1] ** 2 if points > 4 else []
    picks = ends | {int(np.abs(legal - v).argmin()) for v in inner}
    return legal[sorted(picks)]


def _replica(model_modules: dict, unit: _Unit, c_in: int, c_out: int, batch: int) -> tuple[nn.Module, tuple]:
    """The unit at (c_in, c_out): a copy of the model's own layers, shrunk, and random inputs of `batch`."""
    shape = (batch, int(c_in), *unit.input_shape[2:])
    inputs = tuple(torch.randn(shape) for _ in range(unit.inputs))
    if unit.op is not None:
        return _Op(unit.op, unit.template, unit.kwargs), inputs
    layers = [_shrink(model_modules[name], c_in, c_out, name, head=i == 0) for i, name in enumerate(unit.modules)]
    return (layers[0] if len(layers) == 1 else nn.Sequential(*layers)), inputs


def alignment(target: LatencyTarget) -> int:
    """The input-channel modulus whose multiples run other kernels on `target` (0: none): a conv whose input widths
    take both classes is timed on one grid per class (see ALIGN, :func:`plan`)."""
    return ALIGN.get((target.device, target.runtime), 0)


def cold_cache_bytes(target: LatencyTarget, model: nn.Module) -> int:
    """The last-level cache size where `model`'s units are also timed cold on `target` (see COLD), else 0: on a
    (device, runtime) of COLD whose cache this machine reports, when the dense model's weights exceed half of it
    (a smaller model's profiles all keep their weights in the cache, and the cold timings would change nothing)."""
    cache = last_level_cache_bytes() if (target.device, target.runtime) in COLD else 0
    size = TORCH_DTYPES[target.dtype].itemsize
    weights = sum(p.numel() for p in model.parameters()) * size
    return cache if cache and weights > cache / 2 else 0


class WeightBytes:
    """W (..., groups) -> the pruned model's weight bytes on `target` (parameters x element size; differentiable,
    picklable: it travels with the LatencyModel to the trials)."""

    def __init__(self, space: WidthSpace, model: nn.Module, target: LatencyTarget):
        self.cost, self.size = CostModel(space, model), TORCH_DTYPES[target.dtype].itemsize

    def __call__(self, widths: torch.Tensor) -> torch.Tensor:
        return self.cost.params_torch(widths) * self.size


def cold_extra(extra: np.ndarray) -> np.ndarray:
    """A unit's cold extra time over its grid (cold - warm) less the extra at its narrowest point, never below 0:
    emptying the caches slows any call by the runtime's own state and code read back in (ONNX Runtime on this
    CPU: 0.07-0.19 ms even for a conv of 4 channels, whose weights are nothing), which a layer inside the model
    does not pay; what remains grows with the weights (a 512 -> 512 3x3 conv, 9 MiB: 0.70 ms, ~17 GB/s)."""
    extra = np.asarray(extra, dtype=np.float64)
    return np.maximum(extra - extra.flat[0], 0.0)


def cold_curve(ns_per_byte: Sequence[float] | None = None) -> list[list[float]]:
    """[[bytes, share], ...] over CURVE_MIB: how cold a working set of that many bytes is when it is read again and
    again on this machine now, from :func:`widthsearch.timing.read_ns_per_byte` (or the given timings): 0 at the
    fastest size, 1 at the mean of the two largest, never falling with size (each share the lowest at its size or
    above); all 0 where the largest sizes read under 1.2x the fastest (no cache to outgrow). Measured rather than
    taken from the cache's nominal size: on this 2-core VM the reads slowed from 12-16 MiB on, with a 32 MiB L3
    that the host's other guests share (2026-12-07)."""
    sizes = [m * 2**20 for m in CURVE_MIB]
    ns = np.asarray(read_ns_per_byte(sizes) if ns_per_byte is None else ns_per_byte, dtype=np.float64)
    hot, cold = ns.min(), ns[-2:].mean()
    share = np.clip((ns - hot) / (cold - hot), 0.0, 1.0) if cold > 1.2 * hot else np.zeros_like(ns)
    share = np.flip(np.minimum.accumulate(np.flip(share)))
    return [[float(b), float(v)] for b, v in zip(sizes, share)]


def cold_share(weights: torch.Tensor, curve: Sequence[Sequence[float]] | None) -> torch.Tensor:
    """The share of each unit's cold extra time that a profile with these weight bytes pays: the :func:`cold_curve`
    read at its bytes, linear between its points, its end values beyond (differentiable; 0 without a curve). The
    whole model keeps its weights in the cache between forwards while they fit, and streams them from memory once
    they outgrow it (see COLD)."""
    if not curve:
        return torch.zeros_like(weights)
    points = torch.tensor(curve, dtype=weights.dtype, device=weights.device)
    i, f = _axis(points[None, :, 0], torch.tensor([len(curve)], device=weights.device), weights[..., None])
    i1 = torch.clamp(i + 1, max=len(curve) - 1)
    return ((1 - f) * points[i, 1] + f * points[i1, 1])[..., 0]


def plan(space: WidthSpace, model: nn.Module, grid: int = 7, align: int = 0) -> list[_Planned]:
    """The units of `model` with their affine channel maps, grids and signatures (no timing). `align` > 1: a
    conv whose input channels take both multiples of `align` and other counts is planned as two entries, one
    per residue class, each with its own grid (see ALIGN)."""
    from torch_pruning import ops

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
        grid_out = np.array([0.0]) if tied is not None else _grid(*c_out, space, grid)
        classes = [(0, False, None)]
        channels = _channels(*c_in, space)
        if align > 1 and channels is not None and unit.modules and ops.module2type(modules[unit.modules[0]]) in (
                ops.OPTYPE.CONV, ops.OPTYPE.DEPTHWISE_CONV) and 0 < np.sum(np.round(channels) % align == 0) < len(
                channels):
            classes = [(align, False, lambda c: np.round(c) % align != 0),
                       (align, True, lambda c: np.round(c) % align == 0)]
        for residue, aligned, keep in classes:
            grid_in = _grid(*c_in, space, grid, keep)
            corner = _replica(modules, unit, int(grid_in[-1]), int(q["c_out"]), 1)[0]
            signature = json.dumps([repr(corner), unit.input_shape[2:], unit.inputs, tied, grid_in.tolist(),
                                    grid_out.tolist()] + ([residue, aligned] if residue else []))
            planned.append(_Planned(unit, c_in, c_out, tied, grid_in, grid_out, signature, residue, aligned))
    return planned


def architecture_signature(space: WidthSpace, model: nn.Module, planned: Sequence[_Planned]) -> str:
    """A digest of what the table depends on in the model: its units, its groups and the example input."""
    text = json.dumps({"model": type(model).__qualname__, "groups": space.describe(),
                       "input": list(space.example_input.shape), "units": [p.signature for p in planned],
                       "calibration": [w.tolist() for w in calibration_profiles(space)]})
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- measuring
def measure_table(space: WidthSpace, model: nn.Module, target: LatencyTarget, planned: Sequence[_Planned], *,
                  timer: Timer | None = None, progress: bool = True, curve: list | None = None) -> dict:
    """Time every distinct unit on its grid and the whole model at the calibration profiles (the table); with a
    :func:`cold_curve` (where :func:`cold_cache_bytes`): every grid point also cold ("cold_units"), and each unit
    counts its warm time plus the profile's :func:`cold_share` of its cold extra, in the calibration too."""
    from .training import Progress

    whole = timer or make_timer(target, **CALIBRATION_TIMING)
    unit_timer = timer or make_timer(target, **UNIT_TIMING)
    prepare = getattr(unit_timer, "prepare", lambda module, inputs: lambda cold=False: unit_timer(module, inputs))
    modules = dict(model.named_modules())
    distinct = {p.signature: p for p in planned}
    points = sum(len(p.grid_in) * len(p.grid_out) for p in distinct.values())
    bar = Progress(points * (UNIT_PASSES + bool(curve)) + len(CALIBRATION_RATIOS) * ROUNDS,
                   f"latency table ({target.device}, batch {target.batch})", enabled=progress)
    start, cpu_start, done, units, cold_units = time.time(), time.process_time(), 0, {}, {}
    for signature, p in distinct.items():
        what = p.unit.modules[0] if p.unit.modules else repr(_Op(p.unit.op, p.unit.template, {}))
        cells = [(i, j, int(c_in), int(round(p.tied * c_in) if p.tied is not None else c_out))
                 for i, c_in in enumerate(p.grid_in) for j, c_out in enumerate(p.grid_out)]
        runs, spans = {}, {}
        table = np.full((len(p.grid_in), len(p.grid_out)), np.inf)
        for k in range(UNIT_PASSES):  # interleaved: a burst of load slows one pass over the grid, not every one
            for i, j, c_in, c_out in cells:
                try:
                    if (i, j) not in runs:
                        runs[i, j] = prepare(*_replica(modules, p.unit, c_in, c_out, target.batch))
                    if k == 0 or spans[i, j] < REPASS_S:
                        begin = time.perf_counter()
                        table[i, j] = min(table[i, j], runs[i, j]())
                        spans[i, j] = time.perf_counter() - begin
                except Exception as exc:
                    raise WidthSearchError(f"timing {what!r} at {c_in} -> {c_out} channels failed: "
                                           f"{type(exc).__name__}: {exc}") from exc
                done += 1
                bar.update(done)
        units[signature] = table.tolist()
        if curve:  # one pass: each sample is a single call after the caches were emptied
            cold = np.full_like(table, np.inf)
            for i, j, c_in, c_out in cells:
                cold[i, j] = runs[i, j](cold=True)
                done += 1
                bar.update(done)
            cold_units[signature] = (table + cold_extra(cold - table)).tolist()
    units_cpu_s = time.process_time() - cpu_start
    sums = _UnitSums(planned, units, cold_units or None)

    def step() -> None:
        nonlocal done
        done += 1
        bar.update(done)

    profiles = calibration_profiles(space)
    measured = [m["ms"] for m in measure_profiles(space, model, target, profiles, timer=whole, step=step)]
    widths = torch.from_numpy(np.stack(profiles).astype(np.float64))
    share = cold_share(WeightBytes(space, model, target)(widths), curve) if curve else None
    per_entry = sums.units(widths, share).numpy()
    aligned = np.array([p.align > 1 and p.aligned for p in planned])
    calibration = [{"ratio": r, "measured_ms": m, "units_ms": float(u.sum()),
                    "aligned_units_ms": float(u[aligned].sum()), "widths": w.tolist(),
                    **({"cold_share": float(share[k])} if curve else {})}
                   for k, (r, m, u, w) in enumerate(zip(CALIBRATION_RATIOS, measured, per_entry, profiles))]
    if aligned.any():
        overhead, scale, aligned_scale = calibrate_aligned(
            [c["units_ms"] - c["aligned_units_ms"] for c in calibration], [c["aligned_units_ms"] for c in calibration],
            [c["measured_ms"] for c in calibration])
    else:
        overhead, scale = calibrate([c["units_ms"] for c in calibration], [c["measured_ms"] for c in calibration])
        aligned_scale = scale
    return {"format": FORMAT, "units": units, "calibration": calibration, "overhead_ms": overhead, "scale": scale,
            "aligned_scale": aligned_scale, **({"cold_units": cold_units, "cold_curve": curve} if curve else {}),
            "measure_s": time.time() - start, "measure_cpu_s": time.process_time() - cpu_start,
            "units_cpu_s": units_cpu_s,
            "loadavg": list(os.getloadavg()), "created_at": time.time(),
            "measured_on": {"host": platform.node(), "pid": os.getpid()}}


def calibration_profiles(space: WidthSpace) -> list[np.ndarray]:
    """The profiles the whole model is timed at to fit the overhead and scale: the dense one, and for each smaller
    ratio r of CALIBRATION_RATIOS, keep ratios r x exp(N(0, 0.3)) per group (seeded, within (0, 1]): widths of
    every kind, as a search's are. Uniform ratios give round widths (half of 512 is 256), which run aligned
    kernels faster than the widths around them (oneDNN, batch 64); a fit on those alone predicted every other
    profile too fast."""
    rng = np.random.default_rng(0)
    profiles = []
    for r in CALIBRATION_RATIOS:
        ratios = np.ones(len(space)) if r >= 1 else np.clip(r * np.exp(rng.normal(0.0, 0.3, len(space))), 1e-6, 1)
        profiles.append(space.vector(space.from_ratios(ratios.tolist())))
    return profiles


def calibrate(units_ms: Sequence[float], measured_ms: Sequence[float]) -> tuple[float, float]:
    """(overhead, scale) with measured ~ overhead + scale x sum of units, fitted on the calibration profiles by
    Theil-Sen (the median of the pairwise slopes, then the median intercept), so one disturbed measurement
    cannot move either; the scale is clipped to SCALE_RANGE.

    The scale: a unit runs slower inside the model than alone, where its weights and input stay in the caches
    between calls; the more the layers move, the more they evict each other (cifar_resnet56, batch 1: about
    10% on the units' sum, drift-free residuals of bench/latency.py). A constant overhead alone left small
    profiles predicted slow and large ones fast."""
    x, y = np.asarray(units_ms, dtype=np.float64), np.asarray(measured_ms, dtype=np.float64)
    slopes = [(y[j] - y[i]) / (x[j] - x[i]) for i in range(len(x)) for j in range(i + 1, len(x))
              if abs(x[j] - x[i]) > 1e-9 * max(abs(x[i]), abs(x[j]), 1e-12)]
    scale = float(np.clip(np.median(slopes), *SCALE_RANGE)) if slopes else 1.0
    return float(np.median(y - scale * x)), scale


def calibrate_aligned(other_ms: Sequence[float], aligned_ms: Sequence[float],
                      measured_ms: Sequence[float]) -> tuple[float, float, float]:
    """(overhead, scale, aligned scale) with measured ~ overhead + scale x the units of no residue class or the
    unaligned one + aligned scale x the aligned ones (runtime onnxruntime, see ALIGN), by least squares with
    the worst point dropped when it is off by over 3x the median residual; both scales clipped to SCALE_RANGE.

    The aligned entries get their own scale: a unit alone converts its input to the runtime's blocked layout
    and back, which the dense model, all of whose convs are aligned, does once for the whole graph (ONNX
    Runtime, cifar_resnet20 at batch 1: the dense model ran in 0.78 of its units' summed time, pruned profiles
    in 0.85-0.9); one scale for all left the dense model, the base of every ratio, predicted 13% slow."""
    x = np.stack([np.ones(len(measured_ms)), np.asarray(other_ms, float), np.asarray(aligned_ms, float)], axis=1)
    y = np.asarray(measured_ms, dtype=np.float64)
    keep = np.ones(len(y), dtype=bool)
    for _ in range(2):
        coef = np.linalg.lstsq(x[keep], y[keep], rcond=None)[0]
        coef[1:] = np.clip(coef[1:], *SCALE_RANGE)
        residual = np.abs(y - x @ coef)
        worst = int(np.argmax(np.where(keep, residual, -1)))
        if keep.sum() <= 4 or residual[worst] <= 3 * np.median(residual[keep]):
            break
        keep[worst] = False
    overhead = float(np.median((y - x[:, 1:] @ coef[1:])[keep]))
    return overhead, float(coef[1]), float(coef[2])


def monotone(table: np.ndarray) -> np.ndarray:
    """Each entry lowered to the fastest time at the same or more channels on both axes, except that the widest
    point of an axis (the full width, see :func:`grid_widths`) lowers no other: timing noise only adds time, and
    a layer is not slower with fewer channels, but the full width may run a faster kernel than any narrower
    one. So predictions never grow as widths shrink below the full ones."""
    table = np.array(table, dtype=np.float64)
    a, b = max(1, table.shape[0] - 1), max(1, table.shape[1] - 1)

    def down(t: np.ndarray, axis: int) -> np.ndarray:
        return np.flip(np.minimum.accumulate(np.flip(t, axis), axis=axis), axis)

    table[:a, :b] = down(down(table[:a, :b], 0), 1)
    if table.shape[1] > 1:
        table[:a, -1] = down(table[:a, -1], 0)
    if table.shape[0] > 1:
        table[-1, :b] = down(table[-1, :b], 0)
    return table


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
    grad) and the differentiable `torch`. With `cold` tables (the units timed with their weights out of the
    caches), each unit's time is its warm one plus a given share of the difference."""

    def __init__(self, planned: Sequence[_Planned], units: dict, cold: dict | None = None):
        def stacked(times: dict) -> np.ndarray:
            tables = [monotone(times[p.signature]) for p in planned]
            k_in, k_out = max(t.shape[0] for t in tables), max(t.shape[1] for t in tables)
            return np.stack([np.pad(t, ((0, k_in - t.shape[0]), (0, k_out - t.shape[1])), mode="edge")
                             for t in tables])

        tables = stacked(units)
        extra = np.maximum(stacked(cold) - tables, 0.0) if cold else np.zeros_like(tables)  # each made monotone alone
        tied = np.array([p.tied is not None for p in planned])
        arrays = {"grid_in": _padded([p.grid_in for p in planned]), "grid_out": _padded([p.grid_out for p in planned]),
                  "table": tables, "extra": extra, "a_in": np.array([p.c_in[0] for p in planned]),
                  "s_in": np.stack([p.c_in[1] for p in planned]),
                  "a_out": np.where(tied, 0.0, [p.c_out[0] for p in planned]),  # tied: the 1-point axis, at 0
                  "s_out": np.where(tied[:, None], 0.0, np.stack([p.c_out[1] for p in planned])),
                  "align": np.array([float(p.align) for p in planned]),
                  "aligned": np.array([float(p.aligned) for p in planned])}
        self.values = {k: torch.tensor(v, dtype=torch.float64) for k, v in arrays.items()}
        self.n_in = torch.tensor([len(p.grid_in) for p in planned])
        self.n_out = torch.tensor([len(p.grid_out) for p in planned])

    def units(self, widths: torch.Tensor, cold_share: torch.Tensor | None = None) -> torch.Tensor:
        """W (..., groups) -> each unit's interpolated milliseconds (..., units); `cold_share` (...): the share of
        each unit's cold extra time added (none without cold tables)."""
        v = {k: t.to(widths) for k, t in self.values.items()}
        n_in, n_out = self.n_in.to(widths.device), self.n_out.to(widths.device)
        c_in = widths @ v["s_in"].T + v["a_in"]
        i, f = _axis(v["grid_in"], n_in, c_in)
        j, g = _axis(v["grid_out"], n_out, widths @ v["s_out"].T + v["a_out"])
        i1, j1 = torch.minimum(i + 1, n_in - 1), torch.minimum(j + 1, n_out - 1)
        units = torch.arange(len(n_in), device=widths.device)

        def bilinear(table: torch.Tensor) -> torch.Tensor:
            return ((1 - f) * (1 - g) * table[units, i, j] + f * (1 - g) * table[units, i1, j]
                    + (1 - f) * g * table[units, i, j1] + f * g * table[units, i1, j1])

        value = bilinear(v["table"])
        if cold_share is not None:  # interpolation is linear in the table: mix the interpolated times
            value = value + cold_share[..., None] * bilinear(v["extra"])
        split = v["align"] > 1  # an entry of one residue class counts only where c_in is in its class
        aligned = torch.remainder(torch.round(c_in), torch.where(split, v["align"], 1.0)) == 0
        return value * torch.where(split, aligned == (v["aligned"] > 0), True).to(value.dtype)


# ----------------------------------------------------------------------------- the measure
class LatencyModel(Measure):
    """Predicted latency (ms per forward of `target.batch` images) of width profiles: a Measure for searchers.

    `many(W)` predicts every row of W (group order) in one vectorised pass, `torch(W)` the same differentiably;
    `base` is the dense model's prediction; `table` is the measured table (its key, calibration, overhead and
    `measure_s`). A table with cold timings ("cold_curve") needs `weight_bytes` (:class:`WeightBytes`): each
    unit then counts its warm time plus the profile's :func:`cold_share` of its cold extra.
    """

    name = "latency"
    unit = "ms"

    def __init__(self, planned: Sequence[_Planned], table: dict, full_widths: Sequence[int],
                 weight_bytes: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.table = table
        self.cold_curve = table.get("cold_curve")
        if self.cold_curve and weight_bytes is None:
            raise WidthSearchError("a latency table with cold timings needs the profiles' weight bytes")
        self._weight_bytes = weight_bytes
        self.overhead_ms = float(table["overhead_ms"])
        self.scale = float(table.get("scale", 1.0))
        self.aligned_scale = float(table.get("aligned_scale", self.scale))
        self.weights = np.array([self.aligned_scale if p.align > 1 and p.aligned else self.scale for p in planned])
        self._weights = torch.tensor(self.weights, dtype=torch.float64)
        self._sums = _UnitSums(planned, table["units"], table.get("cold_units"))
        self.unit_names = [(p.unit.modules[0] if p.unit.modules else getattr(p.unit.op, "__name__", "op"))
                           + (f" [c_in % {p.align} {'=' if p.aligned else '!'}= 0]" if p.align > 1 else "")
                           for p in planned]
        self.base = float(self.many(np.asarray(full_widths, dtype=np.float64))[0])

    def unit_ms(self, widths: np.ndarray) -> np.ndarray:
        """Each planned entry's interpolated ms alone (..., entries; names in `unit_names`) at W (..., groups): a
        unit, or one residue class of a unit split by ALIGN (0 where the widths are in the other class); the
        prediction is overhead_ms + their sum weighted by `weights` (scale; aligned_scale for aligned entries)."""
        with torch.no_grad():
            return self._units(torch.from_numpy(np.asarray(widths, dtype=np.float64))).numpy()

    def _units(self, widths: torch.Tensor) -> torch.Tensor:
        share = cold_share(self._weight_bytes(widths), self.cold_curve) if self.cold_curve else None
        return self._sums.units(widths, share)

    def many(self, widths: np.ndarray) -> np.ndarray:
        widths = torch.from_numpy(np.atleast_2d(np.asarray(widths, dtype=np.float64)))
        with torch.no_grad():
            return (self.overhead_ms + self._units(widths) @ self._weights).numpy()

    def torch(self, widths: torch.Tensor) -> torch.Tensor:
        """The prediction as a differentiable function of real-valued widths (group order, last dim):
        piecewise bilinear, so its gradient is each unit's table slope (zero beyond a grid's ends), plus the
        cold share's slope in the weight bytes where the table has cold timings."""
        return self.overhead_ms + self._units(widths) @ self._weights.to(widths)

    def budget_of(self, max_ms: float, smallest: Sequence[int]) -> float:
        """The budget ratio of an absolute latency bound; ConfigError when no profile (`smallest`) is that fast."""
        floor = self.of(smallest)
        if max_ms < floor:
            raise ConfigError(f"max_latency_ms {max_ms:g} is below the smallest profile's predicted latency "
                              f"{floor:.4g} ms (dense: {self.base:.4g} ms on {self.table['key']['device_name']})")
        return min(1.0, max_ms / self.base)

    def describe(self) -> dict:
        """Plain data for experiment metadata: the key, the overhead, the calibration, how long measuring took."""
        return {"key": self.table["key"], "base_ms": self.base, "overhead_ms": self.overhead_ms, "scale": self.scale,
                "aligned_scale": self.aligned_scale, "cold_curve": self.cold_curve,
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
    explains its own numbers. Runs where the target is (a Ray task on a cluster), where it also decides whether the
    units are timed cold too (:func:`cold_cache_bytes`: the target's cache against the model's weights)."""
    from .storage import Storage, write_atomic

    target.check_present()
    cache_bytes = cold_cache_bytes(target, model)
    key = {"format": FORMAT, **target.environment(), "grid": grid,
           "architecture": architecture_signature(space, model, planned),
           **({"cold_cache_bytes": cache_bytes} if cache_bytes else {})}
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
    curve = cold_curve() if cache_bytes else None
    table = {**measure_table(space, model, target, planned, timer=timer, progress=progress, curve=curve),
             "key": key}
    data = json.dumps(table, indent=1).encode()
    if storage:
        storage.write_bytes(f"latency/{name}", data)
    try:
        write_atomic(str(local), data)
    except OSError as exc:  # a read-only home: the experiment's copy is enough
        warnings.warn(f"cannot write the latency cache {local}: {exc}", stacklevel=2)
    return table


def latency_model(space: WidthSpace, model: nn.Module, target: LatencyTarget = LatencyTarget(), *, grid: int = 7,
                  exp_dir: str | None = None, cache_dir: str | os.PathLike | None = None, timer: Timer | None = None,
                  progress: bool = True, on_target: Callable | None = None) -> LatencyModel:
    """The LatencyModel of `model` on `target`: its table loaded from a cache or measured (minutes on a CPU).

    `on_target(fn, *args, **kwargs)` runs the loading/measuring elsewhere (e.g. :func:`ray_task`, on the
    nodes that run the trials); default: here. `timer` replaces the real clock (tests).
    """
    planned = plan(space, model, grid, alignment(target))
    call = on_target or (lambda fn, *args, **kwargs: fn(*args, **kwargs))
    table = call(load_or_measure, space, model, target, planned, grid=grid, exp_dir=exp_dir, cache_dir=cache_dir,
                 timer=timer, progress=progress)
    return LatencyModel(planned, table, space.widths,
                        WeightBytes(space, model, target) if table.get("cold_curve") else None)


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
