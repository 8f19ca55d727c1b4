"""Latency model accuracy: predicted vs measured latency of random width profiles on this machine's CPU.

One cell per (model, batch, runtime): a fresh latency table (timed, grid `--grid`; its build time in wall
and CPU seconds), then `--profiles` random profiles (the `random` searcher at FLOPs budgets evenly spread
over `--flops` 0.05-0.9, one profile each), each pruned and timed whole with the same timer, right after
the dense model (3 passes). Reported per cell, for the predicted ms and for the predicted ratio to the dense
model (what a budget bounds; paired with the dense timing, so steadier than ms on a busy machine): the
share of profiles within +-10% and +-5% of the measurement, the median and largest relative error, the
mean signed error; the same for the predicted ms against each measured ms at the machine's speed when the
table was timed (scaled by the dense model's time in the table over its time right beside the profile: a
VM's speed drifts by 10-30% within minutes, which moves every measured ms and no model can predict); the
same for the naive "latency proportional to FLOPs" guess; the load average
(`/proc/loadavg`) before and after; the dense model timed before and after the profiles (how far the
machine's speed drifted since the table: a drift moves every measured ms, not the model's error).
`--residuals K` also times every unit alone at the exact widths of K of the profiles, beside the model's
interpolated unit times and the whole model: the per-unit residuals (interpolation) and what the sum of
exact units plus the overhead misses (composition: overhead, cache effects between layers).

One JSON per cell, `OUT_DIR/{model}-b{batch}-{runtime}-{clock}.json`, `...-a{N}.json` where the model times
convs on one grid per input-channel residue mod N (widthsearch.latency.ALIGN), `...-d{D}.json` for `--divisor D`
(every width a multiple of D, as a search with `--divisor D` proposes; a present cell is skipped unless
--force, so cells run one at a time and resume), and `OUT_DIR/latency.png` over all present cells.
Untrained models (weights do not change the time).

    python -m bench.latency --models cifar_resnet56 --batches 1 64 --runtime eager [--clock wall]
    python -m bench.latency --quick        # cifar_resnet20, batch 1, 8 profiles, into bench/results/latency-quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS
from searchers import make_searcher
from widthsearch import CostModel, build_space, load_model, prune
from widthsearch.latency import (
    UNIT_TIMING,
    LatencyTarget,
    _replica,
    alignment,
    cold_cache_bytes,
    cold_extra,
    cold_share,
    latency_model,
    make_timer,
    measure_profiles,
    plan,
)
from widthsearch.report import pyplot, save_figure

MODELS = ("cifar_resnet20", "cifar_resnet56", "cifar_mobilenetv2", "cifar_vgg16")
OUT_DIR = RESULTS / "latency"


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def random_profiles(space, cost, n: int, low: float, high: float) -> list[list[int]]:
    """One profile of the `random` searcher per budget, budgets evenly spread over low-high (FLOPs)."""
    out = []
    for i, budget in enumerate(np.linspace(low, high, n)):
        searcher = make_searcher("random", space, cost, budget=float(budget), seed=i)
        out.append([int(w) for w in searcher.suggest(f"p{i}")["widths"]])
    return out


def errors(predicted, measured) -> dict:
    """Relative errors of `predicted` against `measured`: shares within 10% and 5%, median, max, mean signed."""
    signed = [(p - m) / m for p, m in zip(predicted, measured)]
    rel = [abs(e) for e in signed]
    return {"within_10": sum(e <= 0.10 for e in rel) / len(rel), "within_5": sum(e <= 0.05 for e in rel) / len(rel),
            "median_abs_rel_err": statistics.median(rel), "max_abs_rel_err": max(rel),
            "mean_signed_rel_err": statistics.fmean(signed)}


def weight_mb(model: torch.nn.Module) -> float:
    """The bytes of `model`'s parameters in MiB: what a forward streams in when they do not fit in the caches."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def _corners(grid: np.ndarray, x: float) -> list[tuple[int, float]]:
    """(index, weight) of the grid points that linear interpolation at x uses (x clipped to the grid's ends)."""
    if len(grid) == 1:
        return [(0, 1.0)]
    x = min(max(x, grid[0]), grid[-1])
    i = min(int(np.searchsorted(grid, x, side="right")) - 1, len(grid) - 2)
    f = (x - grid[i]) / (grid[i + 1] - grid[i])
    return [(i, 1 - f), (i + 1, f)]


def residuals(space, model, latency, target: LatencyTarget, profiles, grid: int, passes: int = 2) -> dict:
    """Why the model misses, per profile: every unit timed alone at the profile's exact widths and at the grid
    points its interpolation uses, in the same interleaved passes (so a drift of the machine's speed since the
    table cancels out), and the whole model timed before, between and after those passes. Per unit:
    interpolation error (bilinear over the fresh grid points against the exact time: the grid's resolution)
    and drift (the table's value against the fresh one). Per profile: composition error (measured whole
    against the sum of exact units plus the overhead: the overhead term, cache effects between layers) and the
    pruned model's weight bytes (`weight_mb`: a unit timed alone keeps its weights in the caches, the whole model
    streams them in once they outgrow the caches); where the table has cold timings (`cold_curve`), every unit is
    also timed cold at its exact widths and mixed by the profile's cold share, as the model predicts
    (`units_mixed_ms`)."""
    planned = plan(space, model, grid, alignment(target))
    modules = dict(model.named_modules())
    timer, whole_timer = make_timer(target, **UNIT_TIMING), make_timer(target)
    units_table = latency.table["units"]
    per_unit, whole = {}, []
    for w in profiles:
        widths = np.asarray(w, dtype=np.float64)
        table_ms = latency.unit_ms(widths)
        jobs, rows = {}, []
        for k, (p, name, pred) in enumerate(zip(planned, latency.unit_names, table_ms)):
            c_in = float(p.c_in[0] + p.c_in[1] @ widths)
            c_out = p.tied * c_in if p.tied is not None else float(p.c_out[0] + p.c_out[1] @ widths)
            if not p.active(c_in):  # the other residue class's entry of a unit split by ALIGN (predicts 0)
                continue
            corners = [((i, j), f * g) for i, f in _corners(p.grid_in, c_in)
                       for j, g in _corners(p.grid_out, 0.0 if p.tied is not None else c_out) if f * g > 0]
            points = {"exact": (round(c_in), round(c_out))}
            for (i, j), _ in corners:
                ci = int(p.grid_in[i])
                points[i, j] = (ci, round(p.tied * ci) if p.tied is not None else int(p.grid_out[j]))
            if latency.cold_curve:  # the cold extra counts above the one at the unit's narrowest point
                narrow = int(p.grid_in[0])
                points["narrowest"] = (narrow, round(p.tied * narrow) if p.tied is not None else int(p.grid_out[0]))
            for key, (ci, co) in points.items():
                jobs.setdefault((p.signature, ci, co), (p, ci, co))
            rows.append((p, f"{k}:{name}", float(pred), points, corners, round(c_in), round(c_out),
                         latency.weights[k]))
        runs = {k: timer.prepare(*_replica(modules, p.unit, ci, co, target.batch)) for k, (p, ci, co) in jobs.items()}
        pruned = prune(model, space, space.from_vector(list(w))).eval()
        whole_run = whole_timer.prepare(pruned, (torch.randn(target.batch, *space.example_input.shape[1:]),))
        fresh, cold = dict.fromkeys(runs, np.inf), dict.fromkeys(runs, np.inf)
        measured = whole_run()
        for _ in range(passes):  # the whole model before, between and after the passes over the units
            for k, run in runs.items():
                fresh[k] = min(fresh[k], run())
                if latency.cold_curve:
                    cold[k] = min(cold[k], run(cold=True))
            measured = min(measured, whole_run())
        share = float(cold_share(torch.tensor(weight_mb(pruned) * 2**20), latency.cold_curve))
        exact_sum = interp_sum = weighted = mixed_sum = 0.0
        for p, name, pred, points, corners, c_in, c_out, weight in rows:
            exact = fresh[(p.signature, *points["exact"])]
            if latency.cold_curve:
                narrowest = (p.signature, *points["narrowest"])
                extra = cold_extra([cold[narrowest] - fresh[narrowest], cold[(p.signature, *points["exact"])] - exact])
                mixed_sum += exact + share * float(extra[1])
            interp = sum(wt * fresh[(p.signature, *points[ij])] for ij, wt in corners)
            table = np.asarray(units_table[p.signature])
            table_interp = sum(wt * table[ij] for ij, wt in corners)
            exact_sum += exact
            interp_sum += interp
            weighted += weight * exact
            per_unit.setdefault(name, []).append({"c_in": c_in, "c_out": c_out, "predicted_ms": pred,
                                                  "exact_ms": exact, "fresh_interp_ms": interp,
                                                  "table_interp_ms": float(table_interp)})
        whole.append({"measured_ms": measured, "weight_mb": weight_mb(pruned), "units_exact_ms": exact_sum,
                      **({"cold_share": share, "units_mixed_ms": mixed_sum} if latency.cold_curve else {}),
                      "units_fresh_interp_ms": interp_sum, "units_predicted_ms": float(table_ms.sum()),
                      "exact_plus_overhead_ms": latency.overhead_ms + weighted})

    def rel(a, b):
        return (a - b) / b

    worst = sorted(((name, statistics.median(rel(r["fresh_interp_ms"], r["exact_ms"]) for r in rows),
                     max(rows, key=lambda r: abs(rel(r["fresh_interp_ms"], r["exact_ms"]))))
                    for name, rows in per_unit.items()), key=lambda t: -abs(t[1]))
    every = [r for rows in per_unit.values() for r in rows]
    return {"units": per_unit, "whole": whole,
            "worst_units": [{"unit": n, "median_interp_err": e, "worst": w} for n, e, w in worst[:15]],
            "unit_interp_errors": errors([r["fresh_interp_ms"] for r in every], [r["exact_ms"] for r in every]),
            "unit_drift": statistics.median(r["table_interp_ms"] / r["fresh_interp_ms"] for r in every),
            "interp_sum_errors": errors([r["units_fresh_interp_ms"] for r in whole],
                                        [r["units_exact_ms"] for r in whole]),
            "composition_errors": errors([r["exact_plus_overhead_ms"] for r in whole],
                                         [r["measured_ms"] for r in whole])}


def cell(name: str, batch: int, args) -> dict:
    torch.manual_seed(0)
    model = load_model(name).eval()
    space = build_space(model, torch.randn(1, 3, 32, 32), divisor=args.divisor)
    cost = CostModel(space)
    flops = cost.measure("flops")
    target = LatencyTarget(threads=args.threads, batch=batch, clock=args.clock, runtime=args.runtime)
    before = loadavg()
    with tempfile.TemporaryDirectory() as cache:  # a fresh table: its build time is a real measurement
        start, cpu = time.time(), time.process_time()
        latency = latency_model(space, model, target, grid=args.grid, cache_dir=cache, progress=not args.quiet)
        table_s, table_cpu_s = time.time() - start, time.process_time() - cpu
    after_table = loadavg()
    profiles = random_profiles(space, cost, args.profiles, *args.flops)
    dense = [space.widths.tolist()]
    dense_before = measure_profiles(space, model, target, dense)[0]["ms"]
    start = time.time()
    timed = measure_profiles(space, model, target, profiles, paired=True)  # 3 passes, the dense model beside each
    profiles_s = time.time() - start
    dense_after = measure_profiles(space, model, target, dense)[0]["ms"]
    measured, measured_ratio = [m["ms"] for m in timed], [m["ratio"] for m in timed]
    dense_beside = [m["dense_ms"] for m in timed]
    predicted = latency.many(np.asarray(profiles, dtype=np.float64)).tolist()
    units = latency.unit_ms(np.asarray(profiles, dtype=np.float64)).sum(-1).tolist()
    predicted_ratio = [p / latency.base for p in predicted]
    dense_table = next(c["measured_ms"] for c in latency.table["calibration"] if c["ratio"] == 1.0)
    by_flops = [flops.ratio(w) * dense_table for w in profiles]
    # each profile's ms at the machine's speed when the table was timed: scaled by the dense model's time then
    # over its time right beside the profile (a VM's speed drifts by 10-30% within minutes, idle or not)
    at_table_speed = [m * dense_table / d for m, d in zip(measured, dense_beside)]
    half = space.vector(space.uniform(0.5))
    out = {"model": name, "batch": batch, "runtime": args.runtime, "divisor": args.divisor, "threads": args.threads,
           "clock": args.clock,
           "grid": args.grid, "align": alignment(target), "cache_bytes": latency.table["key"].get("cold_cache_bytes", 0),
           "cold_curve": latency.cold_curve, "groups": len(space),
           "units": len(latency.unit_names),
           "table_s": table_s, "table_cpu_s": table_cpu_s, "measure_s": latency.table["measure_s"],
           "profiles_s": profiles_s, "overhead_ms": latency.overhead_ms,
           "scale": latency.scale, "aligned_scale": latency.aligned_scale, "calibration": latency.table["calibration"],
           "dense_predicted_ms": latency.base, "dense_table_ms": dense_table,
           "dense_before_profiles_ms": dense_before, "dense_after_profiles_ms": dense_after,
           "drift": statistics.fmean([dense_before, dense_after]) / dense_table,
           "uniform_half": {"flops_ratio": flops.ratio(half), "predicted_latency_ratio": latency.ratio(half)},
           "ms": errors(predicted, measured), "ratio": errors(predicted_ratio, measured_ratio),
           "ms_at_table_speed": errors(predicted, at_table_speed),
           "flops_ms": errors(by_flops, measured),
           "flops_ratio": errors([flops.ratio(w) for w in profiles], measured_ratio),
           "loadavg_before": before, "loadavg_after_table": after_table, "loadavg_after": loadavg(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
           "cpu": target.environment()["device_name"],
           "rows": [{"flops_ratio": flops.ratio(w), "predicted_ms": p, "units_ms": u, "measured_ms": m,
                     "dense_beside_ms": d, "predicted_ratio": pr, "measured_ratio": r, "widths": w}
                    for w, p, u, m, d, pr, r in zip(profiles, predicted, units, measured, dense_beside,
                                                    predicted_ratio, measured_ratio)]}
    if args.runtime == "onnxruntime":
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    if args.residuals:
        picks = np.unique(np.linspace(0, len(profiles) - 1, args.residuals).round().astype(int))
        out["residuals"] = residuals(space, model, latency, target, [profiles[i] for i in picks], args.grid)
        out["residuals"]["profiles"] = picks.tolist()
    return out


def summary(c: dict) -> str:
    def part(e: dict) -> str:
        return (f"{e['within_10']:.0%} in 10%, {e['within_5']:.0%} in 5%, median {e['median_abs_rel_err']:.1%}, "
                f"max {e['max_abs_rel_err']:.1%}")

    return (f"{c['model']} b{c['batch']} {c['runtime']} {c['clock']}: table {c['table_s']:.0f} s "
            f"({c['table_cpu_s']:.0f} s CPU); ms {part(c['ms'])}; ms at the table's speed "
            f"{part(c['ms_at_table_speed'])}; ratio {part(c['ratio'])}; "
            f"drift {c['drift']:.3f}; load {c['loadavg_after'].split()[0]}")


def plot(cells: list[dict], path: Path) -> None:
    """Per cell: relative error of the predicted ms and ratio against the profile's FLOPs ratio, +-5% and +-10%."""
    plt = pyplot()
    cols = min(4, len(cells))
    rows = -(-len(cells) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(cells):]:
        ax.axis("off")
    for ax, c in zip(axes.flat, cells):
        x = [r["flops_ratio"] for r in c["rows"]]
        ax.scatter(x, [100 * (r["predicted_ms"] / r["measured_ms"] - 1) for r in c["rows"]], s=12, label="ms")
        ax.scatter(x, [100 * (r["predicted_ratio"] / r["measured_ratio"] - 1) for r in c["rows"]], s=12,
                   marker="x", label="ratio to dense")
        for y, style in ((0, "-"), (5, ":"), (-5, ":"), (10, "--"), (-10, "--")):
            ax.axhline(y, color="k", lw=0.6, linestyle=style)
        ax.set_title(f"{c['model']} b{c['batch']} {c['runtime']}\nms: {c['ms']['within_10']:.0%} in 10%, median "
                     f"{c['ms']['median_abs_rel_err']:.1%}; load {c['loadavg_after'].split()[0]}", fontsize=8)
        ax.set_xlabel("FLOPs ratio")
        ax.set_ylabel("predicted / measured - 1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="cifar_resnet20, batch 1, 8 profiles, grid 3")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--runtime", default="eager", choices=["eager", "onnxruntime"])
    parser.add_argument("--profiles", type=int, default=50)
    parser.add_argument("--flops", nargs=2, type=float, default=[0.05, 0.9], metavar=("LOW", "HIGH"),
                        help="FLOPs budgets of the random profiles, evenly spread")
    parser.add_argument("--divisor", type=int, default=1,
                        help="widths are multiples of this (--divisor of a search): the profiles and the table's grid")
    parser.add_argument("--grid", type=int, default=7, help="grid points per channel axis (latency_grid)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", default="wall", choices=["cpu", "wall"],
                        help="wall: wall-clock (a quiet machine); cpu: this process's CPU time (a shared, loaded one)")
    parser.add_argument("--residuals", type=int, default=0, metavar="K",
                        help="also time every unit alone at the widths of K profiles (per-unit residuals)")
    parser.add_argument("--out-dir", default=None, help=f"default {OUT_DIR} (--quick: {OUT_DIR}-quick)")
    parser.add_argument("--force", action="store_true", help="measure cells that are already in --out-dir again")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.profiles, args.grid = ["cifar_resnet20"], [1], 8, 3
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir or (f"{OUT_DIR}-quick" if args.quick else OUT_DIR))
    out.mkdir(parents=True, exist_ok=True)
    for batch in args.batches:  # batch 1 of every model first: the quick cells
        for name in args.models:
            target = LatencyTarget(batch=batch, runtime=args.runtime)
            align, cold = alignment(target), cold_cache_bytes(target, load_model(name))
            path = out / (f"{name}-b{batch}-{args.runtime}-{args.clock}{f'-a{align}' if align else ''}"
                          f"{f'-d{args.divisor}' if args.divisor > 1 else ''}{'-cold' if cold else ''}.json")
            if path.is_file() and not args.force:
                print(f"{path} is there (--force measures it again)")
                continue
            c = cell(name, batch, args)
            path.write_text(json.dumps(c, indent=1))
            print(summary(c), flush=True)
    cells = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if cells:
        plot(cells, out / "latency.png")
    print(f"cells in {out}, plot {out / 'latency.png'}")


if __name__ == "__main__":
    main()
