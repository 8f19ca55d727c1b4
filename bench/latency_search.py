"""Latency- vs FLOPs-constrained search at equal measured latency: does budgeting latency find a better model?

For each searcher (`--searchers`, default optuna and gradient), latency budget L (`--latency-budgets`, default
0.5 and 0.3 of the dense model's latency on this CPU: `--latency-batch` 1, 1 thread) and seed (`--seeds`):

* `latency` cell: the searcher under `--constraint latency --budget L`;
* `flops` cells: the same searcher, seed and trial count under `--constraint flops` at FLOPs budgets F x k for
  each k of `--flops-factors` (default 0.8 1 1.25), F the FLOPs ratio of the uniform profile whose
  predicted latency ratio is L (what a user who budgets FLOPs for a latency target would set): a FLOPs
  front around the latency winner's speed.

Each winner (the search's own choice within its budget, on the validation score) is pruned from the base,
retrained with bench/common.py `retrain_cell` (the bench recipe) and timed whole on this CPU (the dense model
beside it, 3 passes). One JSON per cell under bench/results/latency_search/ (a present one is skipped; an
interrupted search resumes from bench/cache/latency_search/).

Each cell times its winner at the end of its own run, beside one dense timing; cells run minutes to days apart,
and this VM's dense model times 10-20% apart between two processes, enough to reorder winners 5% apart. So
after the cells (or with `--retime` alone) every winner in the folder is timed again in one process,
interleaved with the dense model over `--retime-rounds` passes (widthsearch.latency.measure_profiles):
`timing.json`, which the comparison uses where it holds a cell (the cells' own timings otherwise; the summary
says which).

The comparison (`summary.json`, `latency_search.png` in the same folder, rewritten after every cell or with
`--summary`): per searcher, L and seed, the FLOPs front's test accuracy interpolated at the latency winner's
measured latency ratio (linearly between the two FLOPs winners whose measured ratios bracket it, per test
image; none when the front does not bracket it), against the latency winner's; the mean difference over
seeds with a 95% interval (seeds and images resampled, paired), and the measured speed of both.

    python -m bench.latency_search [--quick] [--model cifar_resnet56] [--seeds 0 1 2] [--device cuda] [--summary]
    python -m bench.latency_search --model cifar_resnet20 --retime     # time every winner again, together
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.common import (
    CACHE,
    DEFAULT_DATA,
    RESULTS,
    RETRAIN_EPOCHS,
    SPLIT_SEED,
    VAL_FRACTION,
    base_checkpoint,
    bench_data,
    check_same_base,
    machine_load,
    retrain_cell,
    unpack_mask,
)
from searchers import project_to_budget
from widthsearch import CostModel, Search, build_space, load_model, load_search, prune
from widthsearch.latency import LatencyTarget, latency_model, measure_profiles
from widthsearch.training import set_threads


def flops_budget_for(space, base, target: LatencyTarget, latency_budget: float, grid: int) -> float:
    """The FLOPs ratio of the uniform profile whose predicted latency ratio is `latency_budget`."""
    latency = latency_model(space, base, target, grid=grid)
    widths = project_to_budget(space, latency, np.ones(len(space)), latency_budget)
    return round(CostModel(space, base).measure("flops").ratio(widths), 4)


def cell_name(args, searcher: str, constraint: str, latency_budget: float, factor: float | None, seed: int) -> str:
    flops = f"-f{factor:g}" if constraint == "flops" else ""
    return f"{args.model}-{searcher}-{constraint}-L{latency_budget:g}{flops}-s{seed}"


def run_cell(searcher: str, constraint: str, latency_budget: float, budget: float, factor: float | None, seed: int,
             args, ckpt: Path, data) -> dict:
    """Search, pick the winner within the budget, retrain it, time it; the cell's JSON record."""
    name = cell_name(args, searcher, constraint, latency_budget, factor, seed) + ("-quick" if args.quick else "")
    storage = str(CACHE / "latency_search")
    settings = dict(name=name, storage=storage, model=args.model, checkpoint=str(ckpt), data=args.data,
                    val_fraction=VAL_FRACTION, split_seed=SPLIT_SEED, seed=seed, searcher=searcher,
                    budget=budget, constraint=constraint, num_samples=args.trials,
                    concurrency=args.concurrency, finetune_steps=args.finetune_steps, cpus_per_trial=1,
                    latency_batch=args.latency_batch, latency_clock=args.clock, latency_grid=args.grid,
                    latency_top=0,
                    **({"gpus_per_trial": 1 / args.concurrency} if common.DEVICE.startswith("cuda") else {}))
    start = time.time()
    exists = Path(storage, name, "widthsearch", "experiment.json").is_file()
    run = load_search(Path(storage, name)) if exists else Search(**settings)
    table = run.fit(progress=False)
    search_s = time.time() - start
    row = run.best()
    base = load_model(args.model, data.num_classes, checkpoint=str(ckpt), in_channels=data.in_channels)
    space = build_space(base, data.example_input)
    target = LatencyTarget(batch=args.latency_batch, clock=args.clock)
    (measured,) = measure_profiles(space, base, target, [row["widths"]], paired=True)
    model = prune(base, space, space.from_vector(row["widths"]), run.config.criterion)
    retrained = retrain_cell(ckpt.stem, model, data, seed=seed, epochs=args.retrain_epochs,
                             label=f"latency_search {searcher} {constraint} L{latency_budget:g}")
    return {"constraint": constraint, "seed": seed, "model": args.model, "searcher": searcher,
            "latency_budget": latency_budget, "flops_factor": factor, "budget": run.config.budget,
            "trials": table.num_rows, "finetune_steps": args.finetune_steps, "search_s": search_s,
            "trial_id": row["trial_id"], "widths": row["widths"], "val_score": row["score"],
            "flops_ratio": row["flops_ratio"], "cost_ratio": row["cost_ratio"],
            "predicted_latency_ms": row["latency_ms"],
            "measured_latency_ms": measured["ms"], "measured_latency_ratio": measured["ratio"],
            "latency": {"batch": args.latency_batch, "threads": 1, "clock": args.clock, "grid": args.grid},
            "retrain_key": retrained["key"], "retrain_epochs": retrained["epochs"], "test_acc": retrained["test_acc"],
            "retrained_val_acc": retrained["val_acc"], "test_correct": retrained["test_correct"],
            "test_images": len(data.test), "loadavg": Path("/proc/loadavg").read_text().strip(),
            "loadavg_1m": machine_load(), "date": time.strftime("%Y-%m-%d")}


def retime(folder: Path, model_name: str, base, space, rounds: int) -> dict:
    """Time every winner in `folder` (cells of `model_name`, pruned from `base` over `space`) again in this one
    process, interleaved with the dense model (`rounds` passes); written to `timing.json` as {cell name: {ms,
    ratio, dense_ms}} with the load."""
    cells = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*-s*.json"))}
    cells = {name: c for name, c in cells.items() if c["model"] == model_name}
    settings = {(c["latency"]["batch"], c["latency"]["clock"]) for c in cells.values()}
    if len(settings) != 1:
        raise SystemExit(f"--retime: the cells of {model_name} were timed with {len(settings)} settings "
                         f"(batch, clock) {sorted(settings)}; expected one")
    ((batch, clock),) = settings
    target = LatencyTarget(batch=batch, clock=clock)
    before, start = Path("/proc/loadavg").read_text().strip(), time.time()
    measured = measure_profiles(space, base, target, [c["widths"] for c in cells.values()], paired=True,
                                rounds=rounds)
    timing = {"model": model_name, "batch": batch, "clock": clock, "threads": 1, "rounds": rounds,
              "seconds": time.time() - start, "loadavg_before": before,
              "loadavg_after": Path("/proc/loadavg").read_text().strip(), "cpu": target.environment()["device_name"],
              "date": time.strftime("%Y-%m-%d %H:%M"), "cells": dict(zip(cells, measured))}
    (folder / "timing.json").write_text(json.dumps(timing, indent=1))
    return timing


def front_at(front: list[dict], ratio: float):
    """The FLOPs front (cells of one seed) at a measured latency ratio: (per-image correctness, accuracy)
    interpolated linearly between the two cells whose measured ratios (`ratio_used`) bracket `ratio`; None
    outside."""
    points = sorted(front, key=lambda c: c["ratio_used"])
    for lo, hi in zip(points, points[1:]):
        a, b = lo["ratio_used"], hi["ratio_used"]
        if a <= ratio <= b:
            t = 0.0 if b == a else (ratio - a) / (b - a)
            masks = [unpack_mask(c["test_correct"], c["test_images"]).astype(float) for c in (lo, hi)]
            return (1 - t) * masks[0] + t * masks[1], (1 - t) * lo["test_acc"] + t * hi["test_acc"]
    return None


def front_ratio_at(front: list[dict], acc: float) -> float | None:
    """The FLOPs front's measured latency ratio (`ratio_used`) at test accuracy `acc`: linear between the two
    neighbouring cells (in ratio order) whose accuracies bracket it, the fastest such pair; None outside."""
    points = sorted(front, key=lambda c: c["ratio_used"])
    for lo, hi in zip(points, points[1:]):
        a, b = lo["test_acc"], hi["test_acc"]
        if min(a, b) <= acc <= max(a, b):
            t = 0.0 if a == b else (acc - a) / (b - a)
            return (1 - t) * lo["ratio_used"] + t * hi["ratio_used"]
    return None


def summarize(folder: Path) -> dict:
    """Per (searcher, latency budget): the latency winners against the FLOPs front at their measured latency (and
    the front's latency at their accuracy)."""
    from bench.stats import paired_difference

    cells = [{**json.loads(p.read_text()), "name": p.stem} for p in sorted(folder.glob("*-s*.json"))]
    timing_path = folder / "timing.json"
    joint = json.loads(timing_path.read_text())["cells"] if timing_path.is_file() else {}
    for c in cells:  # the joint re-timing where it holds the cell, else the cell's own timing
        c["ratio_used"] = joint[c["name"]]["ratio"] if c["name"] in joint else c["measured_latency_ratio"]
        c["timing_used"] = "joint" if c["name"] in joint else "own"
    out = []
    for searcher, budget in sorted({(c["searcher"], c["latency_budget"]) for c in cells}):
        group = [c for c in cells if c["searcher"] == searcher and c["latency_budget"] == budget]
        pairs, seeds = [], []
        for c in sorted((c for c in group if c["constraint"] == "latency"), key=lambda c: c["seed"]):
            front = [f for f in group if f["constraint"] == "flops" and f["seed"] == c["seed"]]
            at = front_at(front, c["ratio_used"])
            seeds.append({"seed": c["seed"], "latency_test_acc": c["test_acc"],
                          "latency_measured_ratio": c["ratio_used"],
                          "timing": sorted({x["timing_used"] for x in [c, *front]}),
                          "flops_front": [(f["flops_factor"], f["ratio_used"], f["test_acc"])
                                          for f in sorted(front, key=lambda f: f["flops_factor"])],
                          "flops_test_acc_at_same_latency": None if at is None else float(at[1]),
                          "flops_ratio_at_same_accuracy": front_ratio_at(front, c["test_acc"])})
            if at is not None:
                pairs.append((unpack_mask(c["test_correct"], c["test_images"]).astype(float), at[0]))
        diff = paired_difference([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None
        out.append({"searcher": searcher, "latency_budget": budget, "seeds": seeds, "paired_seeds": len(pairs),
                    "latency_minus_flops_at_same_latency": diff})
    summary = {"model": cells[0]["model"] if cells else None, "comparisons": out, "date": time.strftime("%Y-%m-%d")}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    if cells:
        plot(cells, folder / "latency_search.png")
    return summary


def plot(cells: list[dict], path: Path) -> None:
    """Per (searcher, latency budget): test accuracy against measured latency ratio, FLOPs fronts (lines, one per
    seed) and latency winners (stars)."""
    from widthsearch.report import pyplot, save_figure

    plt = pyplot()
    keys = sorted({(c["searcher"], c["latency_budget"]) for c in cells})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.8), squeeze=False)
    for ax, (searcher, budget) in zip(axes[0], keys):
        group = [c for c in cells if c["searcher"] == searcher and c["latency_budget"] == budget]
        for k, seed in enumerate(sorted({c["seed"] for c in group})):
            front = sorted((c for c in group if c["constraint"] == "flops" and c["seed"] == seed),
                           key=lambda c: c["ratio_used"])
            color = f"C{k}"
            ax.plot([c["ratio_used"] for c in front], [c["test_acc"] for c in front], "o-", color=color,
                    ms=4, label=f"FLOPs budgets, seed {seed}")
            for c in group:
                if c["constraint"] == "latency" and c["seed"] == seed:
                    ax.plot(c["ratio_used"], c["test_acc"], "*", color=color, ms=12,
                            label=f"latency budget, seed {seed}")
        ax.axvline(budget, color="gray", linestyle=":")
        ax.set_title(f"{searcher}, latency budget {budget:g}", fontsize=9)
        ax.set_xlabel("measured latency / dense")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: cifar_resnet20, 2-epoch base, optuna, L 0.5, FLOPs factors 0.7 1.4, 3 trials")
    parser.add_argument("--model", default="cifar_resnet56")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--searchers", nargs="+", default=["optuna", "gradient"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--latency-budgets", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--flops-factors", nargs="+", type=float, default=[0.8, 1.0, 1.25],
                        help="FLOPs budgets: the uniform-matched FLOPs ratio times each")
    parser.add_argument("--latency-batch", type=int, default=1)
    parser.add_argument("--clock", default="wall", choices=["cpu", "wall"], help="see widthsearch latency_clock")
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--retrain-epochs", type=int, default=RETRAIN_EPOCHS)
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda: base, search trials and retrains (latency is timed on the CPU regardless)")
    parser.add_argument("--summary", action="store_true", help="only rewrite summary.json and the plot")
    parser.add_argument("--retime", action="store_true",
                        help="only time every winner of --model again, together (timing.json), and summarize")
    parser.add_argument("--retime-rounds", type=int, default=9, help="interleaved passes of the joint re-timing")
    args = parser.parse_args()
    folder = RESULTS / ("latency_search-quick" if args.quick else "latency_search")
    if args.summary:
        print(json.dumps(summarize(folder), indent=1))
        return
    base_epochs = None
    if args.quick:
        args.model, base_epochs, args.searchers, args.latency_budgets, args.flops_factors = (
            "cifar_resnet20", 2, ["optuna"], [0.5], [0.7, 1.4])
        args.seeds, args.trials, args.finetune_steps, args.retrain_epochs, args.grid = [0], 3, 5, 1, 3
    common.use_device(args.device)
    os.environ.setdefault("WIDTHSEARCH_CACHE", str(CACHE))  # latency tables: bench/cache/latency/
    set_threads(1)
    ckpt, info = base_checkpoint(args.model, args.data, base_epochs)
    data = bench_data(args.data)
    base = load_model(args.model, data.num_classes, checkpoint=str(ckpt), in_channels=data.in_channels)
    space = build_space(base, data.example_input)
    target = LatencyTarget(batch=args.latency_batch, clock=args.clock)
    folder.mkdir(parents=True, exist_ok=True)
    for latency_budget in [] if args.retime else args.latency_budgets:
        matched = flops_budget_for(space, base, target, latency_budget, args.grid)
        print(f"base {args.model} ({ckpt.name}): test {info['test_acc']:.4f}; latency budget {latency_budget:g} "
              f"<-> FLOPs budget {matched} (uniform profile)", flush=True)
        for seed in args.seeds:
            for searcher in args.searchers:
                plans = [("latency", latency_budget, None)] + [("flops", min(1.0, round(matched * k, 4)), k)
                                                               for k in args.flops_factors]
                for constraint, budget, factor in plans:
                    path = folder / f"{cell_name(args, searcher, constraint, latency_budget, factor, seed)}.json"
                    if path.is_file():
                        check_same_base(json.loads(path.read_text()), info, path)
                        continue
                    cell = {**run_cell(searcher, constraint, latency_budget, budget, factor, seed, args, ckpt, data),
                            "base_info": info}
                    path.write_text(json.dumps(cell, indent=1))
                    print(f"{searcher} {constraint} {budget:g} seed {seed}: test {cell['test_acc']:.4f}, measured "
                          f"latency {cell['measured_latency_ms']:.2f} ms ({cell['measured_latency_ratio']:.3f} of "
                          f"dense), FLOPs {cell['flops_ratio']:.3f}", flush=True)
                    summarize(folder)
    timing = retime(folder, args.model, base, space, args.retime_rounds)
    print(f"timed {len(timing['cells'])} winners together in {timing['seconds']:.0f} s "
          f"(load {timing['loadavg_before']})", flush=True)
    for c in summarize(folder)["comparisons"]:
        d = c["latency_minus_flops_at_same_latency"]
        print(f"{c['searcher']} L{c['latency_budget']:g}: latency minus FLOPs at the same measured latency: "
              + (f"{100 * d['diff']:+.2f} points [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] over "
                 f"{c['paired_seeds']} seeds" if d else "no seed where the FLOPs front brackets the latency winner"))


if __name__ == "__main__":
    main()
