"""Latency model: a Measure from measured layer timings. Numbers are asserted only with an injected timer."""

from __future__ import annotations

import json
import pickle
import re
import time

import numpy as np
import pytest
import torch

from searchers import make_searcher, project_to_budget
from widthsearch import CostModel, build_space, load_model, prune
from widthsearch.app.config import SearchConfig
from widthsearch.cost import Measure
from widthsearch.errors import ConfigError
from widthsearch.latency import LatencyTarget, calibrate, latency_model, monotone, plan
from widthsearch.timing import time_ms


def fake_ms(module, inputs) -> float:
    """A deterministic 'latency': 1 us per parameter plus 0.5 ms per timed call (so it is not FLOPs-shaped)."""
    return 1e-3 * sum(p.numel() for p in module.parameters()) + 0.5


class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, module, inputs) -> float:
        self.calls += 1
        return fake_ms(module, inputs)


def built(name: str, divisor: int = 1):
    torch.manual_seed(0)
    model = load_model(name).eval()
    space = build_space(model, torch.randn(1, 3, 32, 32), divisor=divisor)
    return model, space


@pytest.fixture(scope="module")
def resnet():
    return built("cifar_resnet20")


def random_widths(space, rng) -> list[int]:
    return [int(rng.choice([w for w in range(g.min_width, g.width + 1) if g.allowed(w)])) for g in space.groups]


@pytest.mark.parametrize("name,divisor", [("small_cnn", 1), ("cifar_resnet20", 1), ("cifar_resnet20", 4),
                                          ("cifar_mobilenetv2", 8)])
def test_prediction_is_the_sum_of_interpolated_units(tmp_path, name, divisor):
    """With a timer that is bilinear in (c_in, c_out) (parameter counts), interpolation is exact, so the
    prediction of any legal profile equals the timer on the physically pruned model."""
    model, space = built(name, divisor)
    measure = latency_model(space, model, grid=2 if len(space) > 20 else 3, cache_dir=tmp_path, timer=fake_ms,
                            progress=False)
    assert isinstance(measure, Measure) and measure.name == "latency" and measure.unit == "ms"
    rng = np.random.default_rng(0)
    for _ in range(4):
        widths = random_widths(space, rng)
        expected = fake_ms(prune(model, space, space.from_vector(widths)), None)
        assert measure.of(widths) == pytest.approx(expected, rel=1e-9)
    assert measure.base == pytest.approx(fake_ms(model, None), rel=1e-9)
    assert measure.overhead_ms < 0  # every unit's timing adds 0.5 ms, the whole model's only once
    batch = np.stack([random_widths(space, rng) for _ in range(5)])
    assert np.allclose(measure.ratio_many(batch), [measure.ratio(w) for w in batch])
    assert np.array_equal(pickle.loads(pickle.dumps(measure)).many(batch), measure.many(batch))  # shipped to trials


def test_the_latency_model_has_the_cost_models_interface(resnet, tmp_path):
    """The Measure methods searchers use (name, unit, base, many, of, ratio, ratio_many, torch) behave alike for
    the FLOPs measure and the latency model: same types and shapes, ratios of base, a differentiable torch."""
    model, space = resnet
    flops = CostModel(space).measure("flops")
    latency = latency_model(space, model, grid=3, cache_dir=tmp_path, timer=fake_ms, progress=False)
    assert type(latency).many is not Measure.many and type(latency).torch is not Measure.torch
    rng = np.random.default_rng(0)
    batch = np.stack([random_widths(space, rng) for _ in range(5)]).astype(np.float64)
    for measure in (flops, latency):
        assert isinstance(measure, Measure) and measure.name and measure.unit and measure.base > 0
        many = measure.many(batch)
        assert isinstance(many, np.ndarray) and many.shape == (5,)
        assert isinstance(measure.of(batch[0]), float) and measure.of(batch[0]) == pytest.approx(many[0])
        assert measure.ratio(space.widths) == pytest.approx(1.0)
        assert np.allclose(measure.ratio_many(batch), many / measure.base)
        widths = torch.tensor(batch, requires_grad=True)
        value = measure.torch(widths)
        assert value.shape == (5,) and np.allclose(value.detach().numpy(), many)
        value.sum().backward()
        assert torch.all(widths.grad >= 0) and torch.any(widths.grad > 0)  # more channels never cost less
    inner = torch.tensor(batch[0] - 0.37, requires_grad=True)  # off the grid points: the gradient is the slope
    latency.torch(inner).backward()
    step = 1e-4 * np.eye(len(space))
    differences = [(latency.of(inner.detach().numpy() + e) - latency.of(inner.detach().numpy() - e)) / 2e-4
                   for e in step]
    assert np.allclose(inner.grad.numpy(), differences, rtol=1e-5, atol=1e-9)


def test_units_cover_residual_adds_and_divisor_widths(resnet):
    model, space = built("cifar_resnet20", divisor=4)
    units = plan(space, model, grid=4)
    ops = [u for u in units if u.unit.op is not None]
    assert len(ops) == 9 and all(u.unit.inputs == 2 and u.tied == 1.0 for u in ops)  # out + identity, per block
    assert any(u.unit.modules[:3] == ["conv1", "bn1", "relu"] for u in units)  # conv + BN + ReLU timed together
    for u in units:
        const, slope = u.c_in
        if np.count_nonzero(slope) == 1:  # the grid's widths are legal widths of that group, ends included
            g = space.groups[int(np.flatnonzero(slope)[0])]
            widths = (u.grid_in - const) / slope[np.flatnonzero(slope)[0]]
            assert all(g.allowed(int(w)) for w in widths) and widths[0] == g.min_width and widths[-1] == g.width


def test_a_searcher_keeps_proposals_within_the_latency_budget(resnet, tmp_path):
    model, space = resnet
    cost = CostModel(space)
    latency = latency_model(space, model, grid=3, cache_dir=tmp_path, progress=False,
                            timer=lambda module, inputs: fake_ms(module, inputs) + 100)  # a large fixed cost
    at_half_flops = project_to_budget(space, cost, np.ones(len(space)), 0.5)
    assert latency.ratio(at_half_flops) > 0.55  # FLOPs and this latency disagree: the budget must be the latency's
    for name in ("random", "uniform", "global"):
        searcher = make_searcher(name, space, cost, budget=0.5, measure=latency, model=model, seed=0)
        for i in range(6):
            config = searcher.suggest(f"t{i}")
            if not isinstance(config, dict):
                break
            assert latency.ratio(config["widths"]) <= 0.5 + 1e-12
            searcher.on_trial_complete(f"t{i}", {"score": 0.5})


def test_a_cached_table_is_reused_and_a_changed_key_is_not(resnet, tmp_path):
    model, space = resnet
    timer = Counting()
    first = latency_model(space, model, grid=2, cache_dir=tmp_path / "user", exp_dir=str(tmp_path / "exp"),
                          timer=timer, progress=False)
    measured = timer.calls
    assert measured > 0 and len(list((tmp_path / "user").glob("*.json"))) == 1
    assert len(list((tmp_path / "exp" / "widthsearch" / "latency").glob("*.json"))) == 1
    cached = next((tmp_path / "user").glob("*.json"))
    written = cached.stat().st_mtime_ns
    again = latency_model(space, model, grid=2, cache_dir=tmp_path / "user", timer=timer, progress=False)
    assert timer.calls == measured and again.base == first.base  # the user cache, read and not rewritten
    assert cached.stat().st_mtime_ns == written
    again = latency_model(space, model, grid=2, cache_dir=tmp_path / "other", exp_dir=str(tmp_path / "exp"),
                          timer=timer, progress=False)
    assert timer.calls == measured  # the experiment's copy
    latency_model(space, model, grid=2, cache_dir=tmp_path / "user", exp_dir=str(tmp_path / "exp2"), timer=timer,
                  progress=False)
    assert timer.calls == measured  # from the user cache, and the new experiment keeps a copy of what it used
    assert [p.read_bytes() for p in (tmp_path / "exp2" / "widthsearch" / "latency").glob("*.json")] == [
        cached.read_bytes()]
    for change in (dict(target=LatencyTarget(threads=2)), dict(target=LatencyTarget(batch=4)), dict(grid=3)):
        before = timer.calls
        latency_model(space, model, **{"grid": 2, **change}, cache_dir=tmp_path / "user", timer=timer, progress=False)
        assert timer.calls > before, change
    other, other_space = built("cifar_resnet20", divisor=4)  # another architecture signature
    before = timer.calls
    latency_model(other_space, other, grid=2, cache_dir=tmp_path / "user", timer=timer, progress=False)
    assert timer.calls > before
    table = json.loads(next((tmp_path / "user").glob("*.json")).read_text())
    assert {"device_name", "torch", "threads", "batch", "dtype", "runtime", "architecture"} <= set(table["key"])


def test_a_changed_dtype_is_not_reused(resnet, tmp_path, monkeypatch):
    """fp16 and bf16 are CUDA targets: the device is faked (name, presence) and the timer injected."""
    model, space = resnet
    monkeypatch.setattr(LatencyTarget, "check_present", lambda self: None)
    monkeypatch.setattr("widthsearch.target.device_name", lambda device: f"a fake {device} device")
    timer = Counting()
    calls = []
    for dtype in ("fp32", "fp16", "bf16", "fp16", "fp32"):
        before = timer.calls
        measure = latency_model(space, model, LatencyTarget(device="cuda", dtype=dtype), grid=2, cache_dir=tmp_path,
                                timer=timer, progress=False)
        assert measure.table["key"]["dtype"] == dtype
        calls.append(timer.calls - before)
    assert calls[0] == calls[1] == calls[2] > 0 and calls[3] == calls[4] == 0
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_on_a_cluster_the_table_is_measured_in_a_ray_task(resnet, tmp_path):
    """The search's on_target for a cluster: a Ray task with a trial's resources, never the driver."""
    import os

    import ray

    from widthsearch.latency import ray_task

    model, space = resnet
    local = latency_model(space, model, grid=2, cache_dir=tmp_path / "local", timer=fake_ms, progress=False)
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        remote = latency_model(space, model, grid=2, cache_dir=tmp_path / "remote", timer=fake_ms, progress=False,
                               on_target=ray_task(1, 0))
    finally:
        ray.shutdown()
    assert remote.table["measured_on"]["pid"] != os.getpid() == local.table["measured_on"]["pid"]
    widths = np.stack([space.min_widths, space.widths, space.vector(space.uniform(0.5))])
    assert np.allclose(remote.many(widths), local.many(widths))


def test_the_overhead_and_scale_are_robust_to_one_disturbed_measurement():
    assert calibrate([1, 2, 3, 4, 5], [2, 3, 4, 5, 40]) == pytest.approx((1.0, 1.0))
    overhead, scale = calibrate([1, 2, 3, 4, 5, 6, 7], [1.3, 2.4, 3.5, 9.0, 5.7, 6.8, 7.9])  # 0.2 + 1.1 x, one spike
    assert overhead == pytest.approx(0.2) and scale == pytest.approx(1.1)


def test_the_scale_is_clipped_so_noise_cannot_make_a_narrower_profile_slower():
    from widthsearch.latency import SCALE_RANGE

    assert calibrate([1, 2, 3], [5, 3, 1])[1] == SCALE_RANGE[0] > 0  # measured falls as the units grow: noise
    assert calibrate([1, 2, 3], [1, 10, 20])[1] == SCALE_RANGE[1]
    assert calibrate([2, 2, 2], [3, 3.5, 4]) == (pytest.approx(1.5), 1.0)  # no spread: no slope to fit


def test_tables_are_made_monotone_so_narrower_is_never_slower():
    table = np.array([[1.0, 9.0, 3.0], [2.0, 2.5, 4.0], [3.0, 3.5, 5.0]])  # a noise spike at (0, 1)
    assert monotone(table).tolist() == [[1.0, 2.5, 3.0], [2.0, 2.5, 4.0], [3.0, 3.5, 5.0]]


def test_noisy_timings_still_give_a_measure_that_grows_with_the_widths(resnet, tmp_path):
    model, space = resnet
    rng = np.random.default_rng(0)
    noisy = latency_model(space, model, grid=3, cache_dir=tmp_path, progress=False,
                          timer=lambda module, inputs: fake_ms(module, inputs) * rng.uniform(1, 3))
    ratios = [noisy.ratio(space.vector(space.uniform(r))) for r in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]
    assert noisy.ratio(space.min_widths) <= ratios[0] and ratios == sorted(ratios) and ratios[-1] == 1.0


def test_the_grid_keeps_the_two_narrowest_and_the_two_widest_widths():
    from widthsearch.latency import grid_widths

    assert grid_widths(np.arange(1, 17), 7).tolist() == [1, 2, 4, 7, 11, 15, 16]
    wide = grid_widths(np.arange(1, 513), 7)
    assert wide[:2].tolist() == [1, 2] and wide[-2:].tolist() == [511, 512] and len(wide) == 7
    inner = np.sqrt(wide[1:-1])
    assert np.allclose(np.diff(inner), np.diff(inner).mean(), rtol=0.05)  # evenly spaced in square root
    assert grid_widths(np.arange(8, 65, 8), 5).tolist() == [8, 16, 32, 56, 64]  # legal widths of --divisor 8
    assert grid_widths(np.array([4, 8, 12]), 5).tolist() == [4, 8, 12]
    assert grid_widths(np.arange(1, 17), 2).tolist() == [1, 16]
    assert grid_widths(np.arange(1, 17), 3).tolist() == [1, 2, 16]


def switching(module, inputs) -> float:
    """fake_ms, plus 5 ms whenever the unit's input has more than one channel and is not a full-width one: a
    kernel that switches at the narrowest width (a depthwise conv of one channel is a plain conv) and a faster
    kernel at the full width (aligned channels)."""
    channels = inputs[0].shape[1] if inputs else 0
    return fake_ms(module, inputs) + (5.0 if 1 < channels < 16 else 0.0)


def unit_channels(p, widths: np.ndarray) -> tuple[float, float]:
    """A planned unit's (input, output) channels at a profile's group widths."""
    c_in = p.c_in[0] + p.c_in[1] @ widths
    return c_in, (p.tied * c_in if p.tied is not None else p.c_out[0] + p.c_out[1] @ widths)


def test_a_kernel_switch_at_the_narrowest_or_the_full_width_is_not_smeared_over_the_grid(tmp_path):
    """Interpolation between the two narrowest and the two widest grid points keeps such steps where they are:
    every unit at a profile's widths is predicted exactly (the timer is bilinear between its steps), and the
    table keeps the full width faster than the width below it."""
    from widthsearch.latency import _replica

    torch.manual_seed(0)
    model = TinyResidual().eval()
    space = build_space(model, torch.randn(1, 3, 16, 16))
    measure = latency_model(space, model, grid=5, cache_dir=tmp_path, timer=switching, progress=False)
    planned, modules = plan(space, model, 5), dict(model.named_modules())
    rng = np.random.default_rng(0)
    for _ in range(5):
        widths = np.array(random_widths(space, rng), dtype=np.float64)
        for p, predicted in zip(planned, measure.unit_ms(widths)):
            c_in, c_out = unit_channels(p, widths)
            assert predicted == pytest.approx(switching(*_replica(modules, p.unit, round(c_in), round(c_out), 1)))
    assert [g.width for g in space.groups] == [16, 8]  # body.0's output, then the residual stream
    body = measure.unit_ms(np.array([[15, 8], [16, 8]], dtype=np.float64))  # body.0 at 15 and 16 channels
    assert body[0].sum() > body[1].sum()


def residue(module, inputs) -> float:
    """fake_ms, plus 5 ms for a conv whose input channels are not a multiple of 4 (onnxruntime's kernels)."""
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    return fake_ms(module, inputs) + (5.0 if convs and convs[0].in_channels % 4 else 0.0)


def test_under_onnxruntime_a_conv_has_a_grid_per_residue_of_its_input_channels(resnet, tmp_path, monkeypatch):
    """plan(align=4) splits every conv whose input widths take both classes into two entries with grids of one
    class each; with a timer that is bilinear within each class, every profile's units are then exact, and
    only the entry of the width's class counts. Without the split the same timer is interpolated across."""
    from widthsearch.latency import ALIGN, _replica

    model, space = resnet
    assert ALIGN[("cpu", "onnxruntime")] == 4
    planned, modules = plan(space, model, 5, align=4), dict(model.named_modules())
    split = [p for p in planned if p.align == 4]
    assert split and all(p.unit.modules for p in split) and len(planned) == len(plan(space, model, 5)) + len(split) // 2
    for p in split:
        assert all((np.round(p.grid_in) % 4 == 0) == p.aligned)
    monkeypatch.setattr(LatencyTarget, "check_present", lambda self: None)  # a fake onnxruntime target
    measure = latency_model(space, model, LatencyTarget(runtime="onnxruntime"), grid=5, cache_dir=tmp_path,
                            timer=residue, progress=False)
    assert len(measure.unit_names) == len(planned) and any("c_in % 4 == 0" in n for n in measure.unit_names)
    rng = np.random.default_rng(0)
    for _ in range(4):
        widths = np.array(random_widths(space, rng), dtype=np.float64)
        for p, predicted in zip(planned, measure.unit_ms(widths)):
            c_in, c_out = unit_channels(p, widths)
            expected = residue(*_replica(modules, p.unit, round(c_in), round(c_out), 1)) if p.active(c_in) else 0.0
            assert predicted == pytest.approx(expected)
    eager = latency_model(space, model, grid=5, cache_dir=tmp_path, timer=residue, progress=False)
    widths = np.array([w - 1 if w % 4 == 0 and w > 4 else w for w in space.vector(space.uniform(0.5))], float)
    assert eager.of(widths) != pytest.approx(measure.of(widths))


def test_tables_keep_a_faster_full_width():
    table = np.array([[1.0, 2.0, 1.5], [2.0, 3.0, 2.5], [1.5, 2.5, 2.0]])  # the last row and column: faster
    assert monotone(table).tolist() == table.tolist()
    assert monotone(np.array([[3.0], [2.0], [5.0], [1.0]])).ravel().tolist() == [2.0, 2.0, 5.0, 1.0]


def test_the_scale_is_fitted_when_the_model_runs_slower_than_its_units(resnet, tmp_path):
    """A timer under which the whole model takes 1.2 x its units' time: the calibrated scale is 1.2 and every
    prediction is exact."""
    model, space = resnet
    whole = type(model)

    def timer(module, inputs):
        return 1.2 * fake_ms(module, inputs) if isinstance(module, whole) else fake_ms(module, inputs)

    measure = latency_model(space, model, grid=3, cache_dir=tmp_path, timer=timer, progress=False)
    assert measure.scale == pytest.approx(1.2) and measure.table["scale"] == measure.describe()["scale"]
    rng = np.random.default_rng(0)
    for _ in range(3):
        widths = random_widths(space, rng)
        assert measure.of(widths) == pytest.approx(timer(prune(model, space, space.from_vector(widths)), None))
        assert measure.of(widths) == pytest.approx(measure.overhead_ms + measure.scale * measure.unit_ms(
            np.array(widths, dtype=np.float64)).sum())


def test_the_calibration_profiles_are_the_dense_one_and_seeded_random_ones(resnet):
    from widthsearch.latency import CALIBRATION_RATIOS, calibration_profiles

    model, space = resnet
    profiles = calibration_profiles(space)
    assert len(profiles) == len(CALIBRATION_RATIOS) and profiles[0].tolist() == space.widths.tolist()
    assert all(np.array_equal(a, b) for a, b in zip(profiles, calibration_profiles(space)))  # seeded
    flops = CostModel(space).measure("flops")
    ratios = [flops.ratio(w) for w in profiles]
    assert ratios[0] == 1.0 and ratios[-1] < 0.15 and ratios == sorted(ratios, reverse=True)
    for w in profiles[1:]:
        space.from_vector(w)  # legal
        keep = w / space.widths
        assert keep.std() > 0.05  # not a uniform ratio


def test_a_burst_of_load_during_one_pass_over_a_units_grid_is_ignored(resnet, tmp_path):
    """Each grid point is timed in two interleaved passes, the faster kept: a timer 3x slow for its first 3 calls
    (the first pass over the first unit's grid: the stem conv, 3 -> 1, 2 or 16 channels) still gives exact
    predictions."""
    model, space = resnet
    calls = []

    def burst(module, inputs):
        calls.append(1)
        return fake_ms(module, inputs) * (3.0 if len(calls) <= 3 else 1.0)

    measure = latency_model(space, model, grid=3, cache_dir=tmp_path, timer=burst, progress=False)
    rng = np.random.default_rng(0)
    widths = random_widths(space, rng)
    assert measure.of(widths) == pytest.approx(fake_ms(prune(model, space, space.from_vector(widths)), None))


def test_a_prepared_timer_times_the_same_module_again():
    from widthsearch.latency import UNIT_TIMING, make_timer

    timer = make_timer(LatencyTarget(clock="cpu"), **UNIT_TIMING)
    run = timer.prepare(torch.nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),))
    assert run() > 0 and run() > 0 and timer(torch.nn.ReLU(), (torch.randn(1, 3, 8, 8),)) > 0


def test_bench_error_shares():
    from bench.latency import errors

    e = errors([1.0, 1.04, 1.08, 0.8], [1.0, 1.0, 1.0, 1.0])
    assert e["within_10"] == 0.75 and e["within_5"] == 0.5 and e["max_abs_rel_err"] == pytest.approx(0.2)
    assert e["median_abs_rel_err"] == pytest.approx(0.06) and e["mean_signed_rel_err"] == pytest.approx(-0.02)


def test_latency_search_compares_at_equal_measured_latency():
    """The FLOPs front's accuracy at the latency winner's measured latency: per image, linear between the two
    FLOPs winners that bracket it; none outside the front."""
    from bench.common import correct_mask  # noqa: F401  (the mask format)
    from bench.latency_search import front_at, front_ratio_at

    def mask(bits):
        return np.packbits(np.array(bits, dtype=bool)).tobytes().hex()

    front = [{"ratio_used": 0.4, "test_acc": 0.5, "test_correct": mask([1, 0, 1, 0]), "test_images": 4},
             {"ratio_used": 0.6, "test_acc": 1.0, "test_correct": mask([1, 1, 1, 1]), "test_images": 4}]
    per_image, acc = front_at(front, 0.45)
    assert per_image.tolist() == [1.0, 0.25, 1.0, 0.25] and acc == pytest.approx(0.625)
    assert front_at(front, 0.3) is None and front_at(front[:1], 0.4) is None  # no front to interpolate on
    assert front_ratio_at(front, 0.75) == pytest.approx(0.5) and front_ratio_at(front, 0.4) is None


def test_latency_search_summary_uses_the_joint_retiming_over_each_cells_own(tmp_path):
    """Winners timed together (timing.json) replace the cells' own timings, which ran in other processes; a cell
    the re-timing does not hold keeps its own, and the summary says which it used."""
    from bench.latency_search import summarize

    def cell(name, constraint, ratio, acc, factor=None):
        bits = np.packbits(np.array([1] * int(acc * 4) + [0] * (4 - int(acc * 4)), dtype=bool)).tobytes().hex()
        body = {"constraint": constraint, "seed": 0, "model": "m", "searcher": "optuna", "latency_budget": 0.5,
                "flops_factor": factor, "measured_latency_ratio": ratio, "test_acc": acc, "test_correct": bits,
                "test_images": 4}
        (tmp_path / f"{name}.json").write_text(json.dumps(body))

    cell("m-optuna-latency-L0.5-s0", "latency", 0.55, 0.75)  # own timing: outside the front's own timings
    cell("m-optuna-flops-L0.5-f0.8-s0", "flops", 0.45, 0.5, 0.8)
    cell("m-optuna-flops-L0.5-f1.25-s0", "flops", 0.50, 1.0, 1.25)
    (seed,) = summarize(tmp_path)["comparisons"][0]["seeds"]
    assert seed["flops_test_acc_at_same_latency"] is None and seed["timing"] == ["own"]
    joint = {"m-optuna-latency-L0.5-s0": {"ratio": 0.5}, "m-optuna-flops-L0.5-f0.8-s0": {"ratio": 0.4},
             "m-optuna-flops-L0.5-f1.25-s0": {"ratio": 0.6}}
    (tmp_path / "timing.json").write_text(json.dumps({"cells": joint}))
    comparison = summarize(tmp_path)["comparisons"][0]
    (seed,) = comparison["seeds"]
    assert seed["timing"] == ["joint"] and seed["latency_measured_ratio"] == 0.5
    assert seed["flops_test_acc_at_same_latency"] == pytest.approx(0.75) and comparison["paired_seeds"] == 1
    assert seed["flops_ratio_at_same_accuracy"] == pytest.approx(0.5)
    assert (tmp_path / "latency_search.png").is_file()


def test_time_ms_takes_the_median_wall_sample_or_the_fastest_cpu_sample():
    calls = []
    assert time_ms(lambda: calls.append(1), repeats=3, warmup=1) >= 0 and len(calls) >= 5
    slow = []
    time_ms(lambda: slow.append(time.sleep(0.01)), repeats=50, min_repeats=3, budget_s=0.05, warmup=0)
    assert 4 <= len(slow) <= 8  # long calls: enough samples for budget_s, at least min_repeats
    assert time_ms(lambda: sum(range(1000)), clock="cpu", repeats=3) > 0


class TinyResidual(torch.nn.Module):
    """conv-BN-ReLU, a residual block (an elementwise add between modules), pool and linear, on 8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.body = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(16, 8, 3, padding=1))
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def test_onnxruntime_times_units_and_model_in_onnx_runtime(tmp_path):
    model = TinyResidual().eval()
    space = build_space(model, torch.randn(1, 3, 8, 8))
    assert any(u.unit.op is not None for u in plan(space, model))  # the add is exported and timed too
    measure = latency_model(space, model, LatencyTarget(runtime="onnxruntime"), grid=2, cache_dir=tmp_path,
                            progress=False)
    assert measure.base > 0 and measure.ratio(space.min_widths) <= 1
    assert measure.table["key"]["runtime"] == "onnxruntime" and measure.table["key"]["onnxruntime"]


def test_max_latency_ms_below_the_smallest_profile_is_refused(resnet, tmp_path):
    model, space = resnet
    latency = latency_model(space, model, grid=2, cache_dir=tmp_path, timer=fake_ms, progress=False)
    floor = latency.of(space.min_widths)
    assert latency.budget_of((floor + latency.base) / 2, space.min_widths) == pytest.approx(
        (floor + latency.base) / 2 / latency.base)
    assert latency.budget_of(10 * latency.base, space.min_widths) == 1.0
    with pytest.raises(ConfigError, match="max_latency_ms .* below the smallest profile's predicted latency"):
        latency.budget_of(floor * 0.9, space.min_widths)


@pytest.mark.parametrize("values,text", [
    (dict(constraint="latency", latency_device="tpu"), "config key 'latency_device' must be one of: cpu, cuda"),
    (dict(constraint="latency", latency_dtype="fp16"), "config key 'latency_dtype' must be fp32 on latency_device cpu"),
    (dict(constraint="latency", latency_batch=0), "config key 'latency_batch' must be an integer >= 1, got 0"),
    (dict(constraint="latency", latency_runtime="tensorrt"), "config key 'latency_runtime' must be one of"),
    (dict(constraint="latency", latency_clock="cpu", latency_threads=2), "config key 'latency_clock' must be wall"),
    (dict(max_latency_ms=5.0), "config key 'max_latency_ms' must be empty unless constraint is latency"),
    (dict(constraint="latency", latency_grid=1), "config key 'latency_grid' must be an integer >= 2, got 1"),
])
def test_bad_latency_config_names_the_key(values, text):
    with pytest.raises(ConfigError, match=text):
        SearchConfig(**values)


@pytest.mark.parametrize("args,text", [
    (["--constraint", "energy"], "config key 'constraint' must be one of: flops, params, latency, got 'energy'"),
    (["--constraint", "latency", "--budget", "1.5"], "config key 'budget' must be a number in (0, 1], got 1.5"),
    (["--constraint", "latency", "--budget", "0"], "config key 'budget' must be a number in (0, 1], got 0"),
    (["--constraint", "latency", "--max-latency-ms", "0"], "config key 'max_latency_ms' must be a number > 0"),
    (["--constraint", "latency", "--max-latency-ms=-2.5"], "config key 'max_latency_ms' must be a number > 0"),
    (["--constraint", "latency", "--latency-device", "cuda"],
     "latency_device is 'cuda' but this machine has no CUDA GPU"),
])
def test_bad_search_input_is_refused_before_any_work(args, text, tmp_path, capsys, monkeypatch):
    """Through the CLI: exit status 2 and a message naming the problem, before data, Ray or timing."""
    from widthsearch.app import experiment, runs
    from widthsearch.app.cli import main

    def never(*args, **kwargs):
        raise AssertionError("expensive work started before the input was checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a CUDA GPU
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for module, name in ((experiment, "load_data"), (experiment, "latency_model"), (experiment, "init_ray"),
                         (runs, "init_ray")):
        monkeypatch.setattr(module, name, never)
    code = main(["search", "--name", "bad", "--storage", str(tmp_path), *args])
    assert code == 2 and text in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_on_a_cluster_a_cuda_target_needs_trials_with_a_gpu():
    """The table is measured where the trials run: a cuda target with CPU-only trials fails before any data."""
    from widthsearch.app.experiment import prepare

    cfg = SearchConfig(constraint="latency", latency_device="cuda", data="npz:/nonexistent/data.npz",
                       address="ray://nowhere:10001")
    with pytest.raises(ConfigError, match="latency_device is 'cuda' but the trials reserve no GPU"):
        prepare(cfg, progress=False)


def test_prepare_builds_the_latency_measure_and_converts_max_latency_ms(tmp_path, monkeypatch):
    from widthsearch.app.experiment import prepare

    monkeypatch.setenv("WIDTHSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("widthsearch.latency.make_timer",
                        lambda target, *args, **kwargs: fake_ms)  # numbers asserted: no clock
    common = dict(name="lat", storage=str(tmp_path), constraint="latency", base_epochs=1, latency_grid=2)
    exp = prepare(SearchConfig(**common), progress=False)
    assert exp.measure.name == "latency" and exp.measure.base > 0
    floor, base = exp.measure.of(exp.space.min_widths), exp.measure.base
    assert len(list((tmp_path / "lat" / "widthsearch" / "latency").glob("*.json"))) == 1
    exp = prepare(SearchConfig(**common, max_latency_ms=(floor + base) / 2), progress=False)  # the same table
    assert exp.measure.base == base and exp.config.budget == pytest.approx((floor + base) / 2 / base)
    with pytest.raises(ConfigError, match="below the smallest profile's predicted latency"):
        prepare(SearchConfig(**common, max_latency_ms=floor / 2), progress=False)


def test_search_under_a_latency_budget_end_to_end(tmp_path):
    """`search --constraint latency --budget 0.6` on the digits default (small_cnn; its weights, untrained, given
    as --checkpoint): the CLI reuses the table seeded in the user cache (a fake timer: deterministic numbers, no
    clock), rows carry the predicted latency within the budget, the best is timed (real timings, never
    asserted), the report plots them."""
    from tests.test_e2e_cli import cli, rows
    from widthsearch import load_data
    from widthsearch.app.cli import main
    from widthsearch.latency import cache_folder
    from widthsearch.models import save_checkpoint

    env = {"WIDTHSEARCH_CACHE": str(tmp_path / "cache")}
    cfg = SearchConfig(constraint="latency", latency_grid=2)
    data = load_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    model = load_model(cfg.model, data.num_classes, in_channels=data.in_channels)
    space = build_space(model, data.example_input, cfg.frozen, cfg.min_width, cfg.divisor)
    save_checkpoint(model, tmp_path / "base.pt", model_source=cfg.model, data=cfg.data, split=data.split)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WIDTHSEARCH_CACHE", env["WIDTHSEARCH_CACHE"])
        seeded = latency_model(space, model, cfg.latency_target(), grid=2, timer=fake_ms, progress=False)
        (cached,) = cache_folder().glob("*.json")
    written = cached.stat().st_mtime_ns
    out = cli("search", "--name", "lat", "--storage", str(tmp_path), "--checkpoint", str(tmp_path / "base.pt"),
              "--searcher", "random", "--constraint", "latency", "--budget", "0.6", "--latency-grid", "2",
              "--latency-top", "1", "--num-samples", "3", "--finetune-steps", "2", "--bn-batches", "2",
              "--concurrency", "2", "--quiet", env=env)
    assert cached.stat().st_mtime_ns == written and len(list(cached.parent.glob("*.json"))) == 1  # reused
    kept = list((tmp_path / "lat" / "widthsearch" / "latency").glob("*.json"))
    assert cached.read_bytes() in [p.read_bytes() for p in kept]  # the experiment keeps the table it used
    assert "latency ratio <= 0.6" in out.stdout and "latency_ms" in out.stdout and "measured_ms" in out.stdout
    assert re.search(r"measured: [\d.]+ ms \(predicted [\d.]+ ms\), latency ratio [\d.]+ measured against [\d.]+ "
                     r"predicted \([+-][\d.]+%\): (within|over) the budget 0.6", out.stdout), out.stdout
    meta = json.loads((tmp_path / "lat" / "widthsearch" / "experiment.json").read_text())
    assert meta["constraint"] == "latency" and meta["latency"]["base_ms"] == pytest.approx(seeded.base)
    table = rows(tmp_path / "lat")
    assert len(table) == 3 and all(r["status"] == "ok" for r in table)
    for r in table:
        assert r["latency_ms"] == pytest.approx(seeded.of(r["widths"]))
        assert r["cost_ratio"] == pytest.approx(r["latency_ms"] / seeded.base) and r["cost_ratio"] <= 0.6 + 1e-9
    measured = json.loads((tmp_path / "lat" / "widthsearch" / "latency" / "measured.json").read_text())
    (top,) = measured["rows"]
    assert top["measured_ms"] > 0 < top["measured_ratio"] and measured["base_measured_ms"] > 0
    assert [(r["trial_id"], r["measured_ms"]) for r in rows(tmp_path / "lat") if r["measured_ms"]] == [
        (top["trial_id"], top["measured_ms"])]  # the measured figures are in the timed row too
    assert main(["report", "lat", "--storage", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "latency.png").stat().st_size > 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert 'src="latency.png"' in page and "measured ratio" in page and f"<td>{top['trial_id']}</td>" in page


@pytest.mark.parametrize("pareto,expected", [(False, ["best", "second"]), (True, ["over", "second"])])
def test_the_best_profiles_within_the_budget_are_timed_after_the_search(resnet, tmp_path, monkeypatch, pareto,
                                                                        expected):
    """Budget: within it, longest fine-tune, best score, distinct profiles. Pareto: the front (over, short, second),
    in the same order (results.ranked): `short` scored after a shorter fine-tune comes last. The measured figures
    go to measured.json and into the timed rows."""
    import types

    from widthsearch.app import runs
    from widthsearch.results import ResultsStore, load

    model, space = resnet
    latency = latency_model(space, model, grid=2, cache_dir=tmp_path, timer=fake_ms, progress=False)
    w = [space.widths.tolist(), space.min_widths.tolist(), space.vector(space.uniform(0.5)).tolist()]
    rows = [dict(trial_id="over", status="ok", widths=w[0], score=0.99, cost_ratio=1.0, steps_reached=50),
            dict(trial_id="short", status="ok", widths=w[2], score=0.95, cost_ratio=0.4, steps_reached=10),
            dict(trial_id="best", status="ok", widths=w[2], score=0.90, cost_ratio=0.4, steps_reached=50),
            dict(trial_id="same", status="ok", widths=w[2], score=0.80, cost_ratio=0.4, steps_reached=50),
            dict(trial_id="second", status="ok", widths=w[1], score=0.70, cost_ratio=0.2, steps_reached=50),
            dict(trial_id="failed", status="error", widths=w[1], score=None, cost_ratio=0.2, steps_reached=None)]
    store = ResultsStore.create(str(tmp_path / "exp"), {"groups": space.names, "widths": space.widths.tolist()})
    for r in rows:
        store.write_row(r)
    table = load(str(tmp_path / "exp"))
    timed = []
    monkeypatch.setattr(runs, "measure_profiles", lambda space, model, target, profiles, paired: [
        timed.append(p) or {"ms": 1.0, "ratio": 0.5, "dense_ms": 2.0} for p in profiles])
    cfg = SearchConfig(constraint="latency", budget=0.5, latency_top=2, pareto=pareto)
    exp = types.SimpleNamespace(config=cfg, space=space, model=model, measure=latency, exp_dir=str(tmp_path / "exp"))
    out = runs.measure_top(exp, table)
    assert [r["trial_id"] for r in out["rows"]] == expected
    assert timed == [r["widths"] for r in rows if r["trial_id"] in expected]
    written = json.loads((tmp_path / "exp" / "widthsearch" / "latency" / "measured.json").read_text())
    assert written["rows"][0]["predicted_ms"] == pytest.approx(latency.of(timed[0]))
    assert written["rows"][0]["measured_ratio"] == 0.5 and written["base_measured_ms"] == 2.0
    again = {r["trial_id"]: r for r in load(str(tmp_path / "exp")).to_pylist()}
    assert {t for t, r in again.items() if r["measured_ms"] is not None} == set(expected)
    first = next(r for r in rows if r["trial_id"] == expected[0])
    assert again[expected[0]]["measured_ratio"] == 0.5 and again[expected[0]]["score"] == first["score"]  # kept


FAULTS_SCRIPT = """
import resource, sys, torch
from widthsearch import load_model
from widthsearch.timing import steady_allocator, time_ms
torch.set_num_threads(1)
if sys.argv[1] == "timed":
    time_ms(lambda: None, repeats=1, warmup=1)  # the clock makes the allocator steady itself
model, x = load_model("cifar_resnet20", 10).eval(), torch.randn(64, 3, 32, 32)  # activations of 1 to 4 MB
faults = []
with torch.no_grad():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(steady_allocator(), sorted(faults[3:])[1])  # the median of the settled calls: what a timing samples
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "confstr") or "glibc" not in
                    (__import__("os").confstr("CS_GNU_LIBC_VERSION") or ""), reason="glibc only")
def test_timing_keeps_freed_memory_so_a_forward_pays_no_page_faults_again():
    import subprocess
    import sys

    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], int(out[1])

    applied, steady = run("timed")
    _, default = run("default")
    # without it large activations (4 MB) are mapped afresh: thousands of faults on every call; with it a few
    # hundred at most while the heap settles. The median of three settled calls, not their sum: CI on 2026-12-07
    # saw one settling call of 1,610 faults against 8,064 over three calls without it
    assert applied == "True" and default > 256 and steady * 4 < default, (steady, default)


def test_time_ms_runs_before_off_the_clock_once_per_sample_of_one_call():
    calls, befores = [], []
    ms = time_ms(lambda: calls.append(1), before=lambda: befores.append(time.sleep(0.01)), warmup=1, repeats=4,
                 min_repeats=4)
    assert len(befores) == 4 and len(calls) == 1 + 4  # one warm-up call, then one call per sample
    assert ms < 5  # the 10 ms before each sample is not on the clock


def test_units_are_timed_cold_only_on_onnxruntime_when_the_weights_outgrow_half_the_cache(resnet, monkeypatch):
    from widthsearch.latency import cold_cache_bytes

    model, _ = resnet
    dense = 4 * sum(p.numel() for p in model.parameters())
    for cache, runtime, expected in [(dense * 3 // 2, "onnxruntime", dense * 3 // 2), (dense * 4, "onnxruntime", 0),
                                     (dense * 3 // 2, "eager", 0), (0, "onnxruntime", 0)]:
        monkeypatch.setattr("widthsearch.latency.last_level_cache_bytes", lambda cache=cache: cache)
        assert cold_cache_bytes(LatencyTarget(runtime=runtime), model) == expected


class WarmCold:
    """A prepared timer (like make_timer's): every unit 1 ms warm and 1 ms + 1 us per parameter cold; the whole
    model 1 ms."""

    def prepare(self, module, inputs):
        return lambda cold=False: 1.0 + (1e-3 * sum(p.numel() for p in module.parameters()) if cold else 0.0)

    def __call__(self, module, inputs) -> float:
        return 1.0


def test_a_burst_of_other_work_bends_no_size_of_the_buffer_reading(monkeypatch):
    """read_ns_per_byte takes the sizes in turn within each round and keeps each size's median: a burst that slows
    nine samples in a row (on a fake clock, every sample one call) reaches each size in only a third of its nine
    rounds, so every size reads the undisturbed time (taken size after size, the burst would cover every sample
    of the first sizes)."""
    import types

    import widthsearch.timing as timing

    ticks = {"calls": 0, "now": 0.0}

    def perf_counter():  # 3 readings per sample (start, one check before the call, one after); burst: samples 0-8
        ticks["calls"] += 1
        ticks["now"] += 10.0 if (ticks["calls"] - 1) // 3 < 9 else 1.0
        return ticks["now"]

    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=perf_counter))
    sizes = [2**10, 2**12, 2**14]
    ns = timing.read_ns_per_byte(sizes, min_s=0.5)
    assert ticks["calls"] == 3 * 9 * len(sizes)
    assert [v * size / 1e9 for v, size in zip(ns, sizes)] == pytest.approx([2.0] * len(sizes))  # 2 ticks a sample


def test_the_cold_curve_rises_from_the_fastest_size_to_the_largest_and_never_falls():
    from widthsearch.latency import CURVE_MIB, cold_curve, cold_share

    assert len(CURVE_MIB) == 13 and CURVE_MIB[-1] == 128
    ns = [0.014, 0.012, 0.011, 0.011, 0.011, 0.012, 0.017, 0.02, 0.026, 0.035, 0.03, 0.035, 0.035]  # measured-like
    curve = cold_curve(ns)
    shares = [v for _, v in curve]
    assert [b for b, _ in curve] == [m * 2**20 for m in CURVE_MIB]
    assert shares[:5] == [0.0] * 5 and shares[-2:] == [1.0, 1.0]  # the 1 MiB bump and the 32 MiB peak are gone
    assert all(a <= b for a, b in zip(shares, shares[1:])) and 0 < shares[7] < shares[8] < 1
    assert all(v == 0 for _, v in cold_curve([0.011] * 12 + [0.012]))  # no cache to outgrow
    weights = torch.tensor([0.0, 18 * 2**20, 1e12], requires_grad=True)
    read = cold_share(weights, curve)
    values = read.detach().tolist()
    assert values[0] == 0 and values[2] == 1 and values[1] == pytest.approx((shares[6] + shares[7]) / 2)
    read.sum().backward()
    assert weights.grad[1] > 0 and weights.grad[0] == 0
    assert cold_share(weights, None).tolist() == [0.0, 0.0, 0.0]
    measured = cold_curve()  # this machine: a real reading of 1-128 MiB buffers
    assert all(0 <= v <= 1 for _, v in measured)


def test_with_cold_timings_a_unit_counts_the_profiles_share_of_its_cold_extra(resnet, tmp_path, monkeypatch):
    """The cold curve read at the profile's weight bytes (parameters x 4) gives each unit's share of its cold extra,
    counted above the extra at its narrowest grid point; the prediction is differentiable in the share. Curve: 0
    up to half the dense model's weight bytes, 1 from all of them on."""
    from widthsearch.latency import LatencyModel, WeightBytes, cold_share

    model, space = resnet
    cost = CostModel(space, model)
    dense = 4 * cost.params_many(space.widths[None])[0]
    curve = [[0.0, 0.0], [dense / 2, 0.0], [dense, 1.0]]
    monkeypatch.setattr(LatencyTarget, "check_present", lambda self: None)
    monkeypatch.setattr("widthsearch.latency.last_level_cache_bytes", lambda: int(dense))
    monkeypatch.setattr("widthsearch.latency.cold_curve", lambda: curve)
    target = LatencyTarget(runtime="onnxruntime")
    measure = latency_model(space, model, target, grid=2, cache_dir=tmp_path, timer=WarmCold(), progress=False)
    table = measure.table
    assert table["key"]["cold_cache_bytes"] == int(dense) and table["cold_curve"] == curve
    assert all(cold[0][0] == 1.0 for cold in table["cold_units"].values())  # the narrowest point's extra: the base
    assert any(np.array(cold).max() > 1.0 for cold in table["cold_units"].values())
    planned = plan(space, model, 2, align=4)
    warm = LatencyModel(planned, {k: v for k, v in table.items() if k not in ("cold_units", "cold_curve")},
                        space.widths)
    everything = LatencyModel(planned, {**table, "cold_curve": [[0.0, 1.0]]}, space.widths,
                              WeightBytes(space, model, target))
    with pytest.raises(Exception, match="needs the profiles' weight bytes"):
        LatencyModel(planned, table, space.widths)
    small, middle = (np.array(space.vector(space.uniform(r)), dtype=np.float64) for r in (0.3, 0.85))
    assert 4 * cost.params_many(small[None])[0] < dense / 2
    assert np.allclose(measure.unit_ms(small), warm.unit_ms(small))  # all warm
    full = space.widths.astype(np.float64)
    assert np.allclose(measure.unit_ms(full), everything.unit_ms(full))  # all cold
    assert (everything.unit_ms(full) > warm.unit_ms(full)).any()
    share = float(cold_share(torch.tensor(4 * cost.params_many(middle[None])[0]), curve))
    assert 0 < share < 1
    mixed = warm.unit_ms(middle) + share * (everything.unit_ms(middle) - warm.unit_ms(middle))
    assert np.allclose(measure.unit_ms(middle), mixed)
    widths = torch.tensor(middle, requires_grad=True)
    measure.torch(widths).backward()
    assert widths.grad.abs().sum() > 0
    assert np.array_equal(pickle.loads(pickle.dumps(measure)).many(middle), measure.many(middle))
