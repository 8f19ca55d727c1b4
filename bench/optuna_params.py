"""Which Optuna parameterisation finds better-scoring profiles with the same trials (issue 12's question)?

Cells: (variant, seed), one JSON each in bench/results/optuna_params/ (resumable). Every variant runs a real
`widthsearch search` on the cifar_resnet20 bench base at FLOPs 0.3 with the same trials (24, 25 fine-tune
steps each, no promotion) and the same score (val accuracy, the default), so the only difference is how
the searcher proposes. Variants: TPE over one keep ratio per group (`group`), per stage (`stage`, the
default) or a smooth depth profile (`depth`), each warm-started with the uniform and global-ranking
profiles; `stage-cold`, the default without the warm start; and the `random` sampler over groups
without warm start as the control. Figures: the best and
the top-3 mean validation score a search reached (validation only: no test split here).

    python -m bench.optuna_params [--variants group stage depth stage-cold random] [--seeds 0 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import (
    DEFAULT_DATA,
    RESULTS,
    SPLIT_SEED,
    VAL_FRACTION,
    base_checkpoint,
    machine_load,
)
from widthsearch import Search
from widthsearch.training import set_threads

VARIANTS = {"group": {"parameterization": "group"}, "stage": {"parameterization": "stage"},
            "depth": {"parameterization": "depth"},
            "stage-cold": {"parameterization": "stage", "warm_start": False},
            "random": {"sampler": "random", "parameterization": "group", "warm_start": False}}
BUDGET = 0.3
SEARCH = dict(num_samples=24, finetune_steps=25, concurrency=2, cpus_per_trial=1, bn_batches=20, score="val_acc")


def run_cell(variant: str, seed: int, ckpt: Path, data: str) -> dict:
    """One search; its best and top-3 validation scores, the best row's FLOPs ratio and what it cost."""
    with tempfile.TemporaryDirectory() as storage:
        run = Search(name=f"{variant}-s{seed}", storage=storage, model="cifar_resnet20", checkpoint=str(ckpt),
                     data=data, val_fraction=VAL_FRACTION, split_seed=SPLIT_SEED, searcher="optuna",
                     budget=BUDGET, seed=seed, searcher_options=VARIANTS[variant], **SEARCH)
        start = time.time()
        table = run.fit(progress=False)
        seconds = time.time() - start
    rows = [r for r in table.to_pylist() if r["status"] == "ok" and r["cost_ratio"] <= BUDGET + 1e-9]
    rows.sort(key=lambda r: -r["score"])
    return {"variant": variant, "seed": seed, "options": VARIANTS[variant], "search": SEARCH, "budget": BUDGET,
            "trials": len(table), "ok_within_budget": len(rows), "best_score": rows[0]["score"],
            "top3_mean": sum(r["score"] for r in rows[:3]) / min(3, len(rows)), "best_cost_ratio": rows[0]["cost_ratio"],
            "best_widths": rows[0]["widths"], "scores": [r["score"] for r in rows], "search_s": seconds,
            "loadavg_1m": machine_load(), "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    ckpt, _ = base_checkpoint("cifar_resnet20", args.data)
    folder = RESULTS / "optuna_params"
    folder.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for variant in args.variants:
            path = folder / f"{variant}-s{seed}.json"
            if path.is_file():
                continue
            cell = run_cell(variant, seed, ckpt, args.data)
            path.write_text(json.dumps(cell, indent=1))
            print(f"{variant} s{seed}: best {cell['best_score']:.4f} top3 {cell['top3_mean']:.4f} "
                  f"({cell['search_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
