"""Latency model accuracy: predicted vs measured latency of random width profiles on this CPU.

For each model and batch size: a fresh latency table (timed, grid `--grid`), then `--profiles` random
profiles (the `random` searcher at FLOPs budgets spread over 0.2-0.9, one profile each), each pruned and
timed whole with the same timer, right after the dense model (3 passes). Reports the median and largest
relative error of the predicted ms and of the predicted ratio to the dense model (what a budget bounds; on a
busy machine steadier than ms, which the load moves between the table's and the profiles' measurement),
the same for the naive "latency proportional to FLOPs" guess, how long the table took to measure, and the
load average (`/proc/loadavg`) before and after: timings under load are noisy.
Untrained models (weights do not change the time).

    python -m bench.latency [--quick] [--clock cpu|wall] [--resume] [--out bench/results/latency.json]
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
from widthsearch import CostModel, build_space, load_model
from widthsearch.latency import LatencyTarget, latency_model, measure_profiles
from widthsearch.report import pyplot, save_figure


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def random_profiles(space, cost, n: int) -> list[list[int]]:
    """One profile of the `random` searcher per budget, budgets evenly spread over 0.2-0.9 (FLOPs)."""
    out = []
    for i, budget in enumerate(np.linspace(0.2, 0.9, n)):
        searcher = make_searcher("random", space, cost, budget=float(budget), seed=i)
        out.append(searcher.suggest(f"p{i}")["widths"])
    return out


def errors(predicted: list[float], measured: list[float]) -> dict:
    rel = [abs(p - m) / m for p, m in zip(predicted, measured)]
    return {"median_abs_rel_err": statistics.median(rel), "max_abs_rel_err": max(rel),
            "mean_signed_rel_err": statistics.fmean((p - m) / m for p, m in zip(predicted, measured))}


def cell(name: str, batch: int, args) -> dict:
    torch.manual_seed(0)
    model = load_model(name).eval()
    space = build_space(model, torch.randn(1, 3, 32, 32))
    cost = CostModel(space)
    flops = cost.measure("flops")
    target = LatencyTarget(threads=args.threads, batch=batch, clock=args.clock)
    before = loadavg()
    with tempfile.TemporaryDirectory() as cache:  # a fresh table: its measure_s is a real measurement
        start = time.time()
        latency = latency_model(space, model, target, grid=args.grid, cache_dir=cache, progress=True)
        table_s = time.time() - start
    profiles = random_profiles(space, cost, args.profiles)
    start = time.time()
    timed = measure_profiles(space, model, target, profiles, paired=True)  # 3 passes, the dense model beside each
    profiles_s = time.time() - start
    measured, measured_ratio = [m["ms"] for m in timed], [m["ratio"] for m in timed]
    predicted = [latency.of(w) for w in profiles]
    dense = next(c["measured_ms"] for c in latency.table["calibration"] if c["ratio"] == 1.0)
    half = next(c["measured_ms"] for c in latency.table["calibration"] if c["ratio"] == 0.5)
    by_flops = [flops.ratio(w) * dense for w in profiles]
    return {"model": name, "batch": batch, "threads": args.threads, "clock": args.clock, "grid": args.grid,
            "groups": len(space), "table_s": table_s, "measure_s": latency.table["measure_s"],
            "profiles_s": profiles_s, "overhead_ms": latency.overhead_ms,
            "calibration": latency.table["calibration"], "dense_measured_ms": dense, "dense_predicted_ms": latency.base,
            "uniform_half": {"flops_ratio": flops.ratio(space.vector(space.uniform(0.5))),
                             "measured_latency_ratio": half / dense},
            "model_errors": errors(predicted, measured), "flops_proportional_errors": errors(by_flops, measured),
            "model_ratio_errors": errors([latency.ratio(w) for w in profiles], measured_ratio),
            "flops_ratio_errors": errors([flops.ratio(w) for w in profiles], measured_ratio),
            "loadavg_before": before, "loadavg_after": loadavg(),
            "rows": [{"flops_ratio": flops.ratio(w), "predicted_ms": p, "measured_ms": m,
                      "predicted_ratio": latency.ratio(w), "measured_ratio": r, "widths": w}
                     for w, p, m, r in zip(profiles, predicted, measured, measured_ratio)]}


def plot(cells: list[dict], path: Path) -> None:
    """Per cell: predicted vs measured ms (top) and latency ratio to the dense model (bottom), y = x and +-10%."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(cells), figsize=(4.2 * len(cells), 8.0), squeeze=False)
    for k, c in enumerate(cells):
        for ax, (what, pred, meas, flops, errs) in zip(axes[:, k], [
                ("ms", "predicted_ms", "measured_ms", lambda r: r["flops_ratio"] * c["dense_measured_ms"],
                 c["model_errors"]),
                ("ratio to dense", "predicted_ratio", "measured_ratio", lambda r: r["flops_ratio"],
                 c["model_ratio_errors"])]):
            measured = [r[meas] for r in c["rows"]]
            ax.scatter(measured, [r[pred] for r in c["rows"]], s=14, label="latency model")
            ax.scatter(measured, [flops(r) for r in c["rows"]], s=10, marker="x", alpha=0.6,
                       label="FLOPs-proportional")
            lo, hi = min(measured) * 0.7, max(measured) * 1.2
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
            for f in (0.9, 1.1):
                ax.plot([lo, hi], [f * lo, f * hi], "k:", lw=0.6)
            ax.set_title(f"{c['model']}, batch {c['batch']}: {what}\nmedian |err| {errs['median_abs_rel_err']:.1%}, "
                         f"max {errs['max_abs_rel_err']:.1%}", fontsize=9)
            ax.set_xlabel(f"measured ({what})")
            ax.set_ylabel(f"predicted ({what})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="cifar_resnet20, batch 1, 6 profiles")
    parser.add_argument("--models", nargs="+", default=["cifar_resnet56", "cifar_mobilenetv2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--profiles", type=int, default=30)
    parser.add_argument("--grid", type=int, default=5, help="grid points per channel axis")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                        help="cpu: this process's CPU time (for a shared, loaded machine); wall: wall-clock")
    parser.add_argument("--out", default=str(RESULTS / "latency.json"))
    parser.add_argument("--resume", action="store_true", help="keep the cells already in --out")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.profiles = ["cifar_resnet20"], [1], 6
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cells = json.loads(out.read_text())["cells"] if args.resume and out.is_file() else []
    for batch in args.batches:  # batch 1 of every model first: the quick cells
        for name in args.models:
            if any(c["model"] == name and c["batch"] == batch for c in cells):
                continue
            cells.append(cell(name, batch, args))
            c = cells[-1]
            print(json.dumps({k: c[k] for k in ("model", "batch", "measure_s", "overhead_ms", "model_errors",
                                                "model_ratio_errors", "flops_proportional_errors", "uniform_half",
                                                "loadavg_after")}),
                  flush=True)
            out.write_text(json.dumps({"mode": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%d"),
                                       "torch": torch.__version__, "cells": cells}, indent=1))
            plot(cells, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
