"""Latency- vs FLOPs-constrained search at equal latency: does budgeting measured latency find a better profile?

For a latency budget L (a fraction of the dense model's latency on this CPU: `--latency-batch`, 1 thread):

* `flops` cell: the searcher under `--constraint flops` at the FLOPs budget F that uniform pruning needs to
  reach latency L (the FLOPs ratio of the uniform profile whose predicted latency ratio is L) - what a user
  who budgets FLOPs for a latency target would set;
* `latency` cell: the same searcher, seed and trial count under `--constraint latency --budget L`.

Each winner (the search's own choice within its budget, on the validation score) is pruned from the base,
retrained with bench/common.py `retrain_cell` (the bench recipe) and timed whole on this CPU. One JSON per
(constraint, seed) under bench/results/latency_search/ (a present one is skipped; an interrupted search
resumes from bench/cache/latency_search/). Compare test accuracy at the measured latency of the winners.

    python -m bench.latency_search [--quick] [--seeds 0 1 2] [--latency-budget 0.5] [--searcher optuna]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from bench.common import (
    CACHE,
    DEFAULT_DATA,
    RESULTS,
    RETRAIN_EPOCHS,
    SPLIT_SEED,
    VAL_FRACTION,
    base_checkpoint,
    bench_data,
    machine_load,
    retrain_cell,
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


def run_cell(constraint: str, seed: int, budgets: dict, args, ckpt: Path, data) -> dict:
    """Search, pick the winner within the budget, retrain it, time it; the cell's JSON record."""
    name = f"{args.model}-{args.searcher}-{constraint}-L{args.latency_budget}-s{seed}{'-quick' if args.quick else ''}"
    storage = str(CACHE / "latency_search")
    settings = dict(name=name, storage=storage, model=args.model, checkpoint=str(ckpt), data=args.data,
                       val_fraction=VAL_FRACTION, split_seed=SPLIT_SEED, seed=seed, searcher=args.searcher,
                       budget=budgets[constraint], constraint=constraint, num_samples=args.trials,
                       concurrency=args.concurrency, finetune_steps=args.finetune_steps, cpus_per_trial=1,
                       latency_batch=args.latency_batch, latency_clock=args.clock, latency_grid=args.grid,
                       latency_top=0)
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
                             label=f"latency_search {constraint} L{args.latency_budget}")
    return {"constraint": constraint, "seed": seed, "model": args.model, "searcher": args.searcher,
            "latency_budget": args.latency_budget, "flops_budget": budgets["flops"], "budget": run.config.budget,
            "trials": table.num_rows, "finetune_steps": args.finetune_steps, "search_s": search_s,
            "trial_id": row["trial_id"], "widths": row["widths"], "val_score": row["score"],
            "flops_ratio": row["flops_ratio"], "cost_ratio": row["cost_ratio"],
            "predicted_latency_ms": row["latency_ms"],
            "measured_latency_ms": measured["ms"], "measured_latency_ratio": measured["ratio"],
            "latency": {"batch": args.latency_batch, "threads": 1, "clock": args.clock},
            "retrain_key": retrained["key"], "retrain_epochs": retrained["epochs"], "test_acc": retrained["test_acc"],
            "retrained_val_acc": retrained["val_acc"], "loadavg": Path("/proc/loadavg").read_text().strip(),
            "loadavg_1m": machine_load(), "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2-epoch base, 3 trials, 1-epoch retrain")
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--searcher", default="optuna")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--latency-budget", type=float, default=0.5)
    parser.add_argument("--latency-batch", type=int, default=1)
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"], help="see widthsearch latency_clock")
    parser.add_argument("--grid", type=int, default=5)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--retrain-epochs", type=int, default=RETRAIN_EPOCHS)
    args = parser.parse_args()
    base_epochs = None
    if args.quick:
        base_epochs, args.seeds, args.trials, args.finetune_steps, args.retrain_epochs, args.grid = 2, [0], 3, 5, 1, 2
    os.environ.setdefault("WIDTHSEARCH_CACHE", str(CACHE))  # latency tables: bench/cache/latency/
    set_threads(1)
    ckpt, info = base_checkpoint(args.model, args.data, base_epochs)
    data = bench_data(args.data)
    base = load_model(args.model, data.num_classes, checkpoint=str(ckpt), in_channels=data.in_channels)
    space = build_space(base, data.example_input)
    target = LatencyTarget(batch=args.latency_batch, clock=args.clock)
    budgets = {"latency": args.latency_budget,
               "flops": flops_budget_for(space, base, target, args.latency_budget, args.grid)}
    print(f"base {args.model} ({ckpt.name}): test {info['test_acc']:.4f}; latency budget {budgets['latency']} "
          f"<-> FLOPs budget {budgets['flops']} (uniform profile)", flush=True)
    folder = RESULTS / ("latency_search-quick" if args.quick else "latency_search")
    folder.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for constraint in ("flops", "latency"):
            path = folder / f"{args.model}-{args.searcher}-{constraint}-L{args.latency_budget}-s{seed}.json"
            if path.is_file():
                continue
            cell = run_cell(constraint, seed, budgets, args, ckpt, data)
            path.write_text(json.dumps(cell, indent=1))
            print(f"{constraint} seed {seed}: test {cell['test_acc']:.4f}, measured latency "
                  f"{cell['measured_latency_ms']:.2f} ms ({cell['measured_latency_ratio']:.3f} of dense), "
                  f"FLOPs {cell['flops_ratio']:.3f}", flush=True)


if __name__ == "__main__":
    main()
