"""The decisive benchmark: every method at the same FLOPs budgets and the same retrain, per-image test results.

Cells: base x method x budget x seed, one JSON each in bench/results/quality/ (resumable: finished cells
are skipped; commit them). Methods:

* no search: `uniform` (the largest uniform keep ratio within the budget, L1 channels); torch-pruning's
  own global pruner (`MetaPruner`, `global_pruning=True`, stepped until the FLOPs are within the budget)
  with `tp-l1` (MagnitudeImportance p=1), `tp-taylor` (TaylorImportance, gradients of one train batch
  per step) and `tp-bnscale` (BNScaleImportance);
* widthsearch searchers (`global`, `optuna`, `aofp`, `gradient`, `metapruning`): a real `widthsearch
  search` (Ray Tune trials) on the bench base, validation split only; the row `choose_trial` picks
  (within the budget, longest fidelity) is pruned from the base weights (or the searcher's own weights).

Every pruned model gets the same retrain (bench/common.py `retrain_cell`: 20 epochs, SGD lr 0.05 cosine,
from the pruned weights, seed = the cell's seed) and is then evaluated on the test split, image by
image (stored, for paired statistics). The search seed is the cell's seed too. Search cost is recorded
in wall seconds, CPU-seconds of trials (sum of trial wall time x CPUs) and trials, next to the retrain's.

    python bench/quality.py [--model cifar_resnet20] [--methods ...] [--budgets 0.5 0.3] [--seeds 0 1 2]
                            [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch_pruning as tp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import (DEFAULT_DATA, RESULTS, SPLIT_SEED, VAL_FRACTION, bench_base,  # noqa: E402
                    machine_load, retrain_cell)

from widthsearch import CostModel, prune  # noqa: E402
from widthsearch.config import SearchConfig  # noqa: E402
from widthsearch.export import measure_latency  # noqa: E402
from widthsearch.models import classifier_of  # noqa: E402
from widthsearch.search import choose_trial, run_search  # noqa: E402
from widthsearch.storage import filesystem  # noqa: E402
from widthsearch.training import set_threads  # noqa: E402

PEERS = {"tp-l1": lambda: tp.importance.MagnitudeImportance(p=1),
         "tp-taylor": lambda: tp.importance.TaylorImportance(),
         "tp-bnscale": lambda: tp.importance.BNScaleImportance()}
SEARCHERS = ("global", "optuna", "aofp", "gradient", "metapruning")
METHODS = ("uniform", *PEERS, *SEARCHERS)

# The search each searcher gets (the same compute for all: see SEARCH_NOTE), as SearchConfig fields.
SEARCH = {
    "common": dict(finetune_steps=100, asha=True, min_finetune_steps=25, reduction_factor=4, num_samples=24,
                   concurrency=2, cpus_per_trial=1, bn_batches=20, score="val_acc"),
    "global": dict(num_samples=4),
    "aofp": dict(num_samples=200),
    "gradient": dict(num_samples=12),
    "metapruning": dict(num_samples=201),
}
SEARCH_NOTE = ("every scoring searcher: 24 Tune trials, ASHA from 25 to 100 fine-tune steps (reduction factor 4); "
               "aofp and metapruning: their own trial structure, capped by the same number of trial-seconds")


def peer_prune(model: torch.nn.Module, data, cost: CostModel, budget: float, importance: str,
               seed: int) -> torch.nn.Module:
    """torch-pruning's global pruner, one small step at a time until torch-pruning counts the FLOPs within budget."""
    model = copy.deepcopy(model)
    example = data.example_input
    base = tp.utils.count_ops_and_params(model, example)[0]
    pruner = tp.pruner.MetaPruner(model, example, importance=PEERS[importance](), global_pruning=True,
                                  pruning_ratio=0.95, iterative_steps=400,
                                  ignored_layers=[model.get_submodule(classifier_of(model))])
    batches = data.stream("train", 128, seed=seed, augment=False)  # CPU: torch-pruning steps are not the cost
    for _ in range(400):
        if importance == "tp-taylor":
            x, y = next(batches)
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        pruner.step()
        if tp.utils.count_ops_and_params(model, example)[0] <= budget * base:
            break
    model.zero_grad()
    return model


def search_cell(name: str, budget: float, seed: int, args, ckpt: Path, base, space, data) -> tuple[torch.nn.Module, dict]:
    """Run one widthsearch search; the pruned model of its chosen row and what the search cost."""
    options = {**SEARCH["common"], **SEARCH.get(name, {})}
    if common.DEVICE.startswith("cuda"):  # same trials and fidelities; only more of them at once on one GPU
        options.update(concurrency=args.concurrency, gpus_per_trial=1 / args.concurrency)
    with tempfile.TemporaryDirectory() as storage:
        cfg = SearchConfig(name=f"{name}-b{budget}-s{seed}", storage=storage, model=args.model, checkpoint=str(ckpt),
                           data=args.data, val_fraction=VAL_FRACTION, split_seed=SPLIT_SEED, searcher=name,
                           budget=budget, seed=seed, **options)
        start = time.time()
        exp_dir, table = run_search(cfg, progress=False)
        search_s = time.time() - start
        rows = table.to_pylist()
        row = choose_trial(table, budget=budget)
        model = pruned_from_row(row, base, space, cfg.criterion)
    info = {"search_s": search_s, "trials": len(rows), "trial_cpu_s": sum((r["wall_s"] or 0) * 1.0 for r in rows),
            "val_score": row["score"], "val_finetune_steps": row["finetune_steps"], "trial_id": row["trial_id"],
            "search_config": {k: v for k, v in options.items()},
            "rows_at_fidelity": {str(s): sum(1 for r in rows if r["finetune_steps"] == s)
                                 for s in sorted({r["finetune_steps"] for r in rows if r["finetune_steps"] is not None})}}
    return model, info


def pruned_from_row(row: dict, base, space, criterion: str) -> torch.nn.Module:
    """The chosen row's pruned model: its own channels and weights when the searcher chose them, else the criterion."""
    payload = json.loads(row["payload"]) if row.get("payload") else {}
    if isinstance(payload, dict) and "keep" in payload:
        model = copy.deepcopy(base)
        if row.get("checkpoint"):
            fs, path = filesystem(row["checkpoint"])
            with fs.open_input_stream(path) as f:
                state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state))
        return prune(model, space, keep=payload["keep"])
    return prune(base, space, space.from_vector(row["widths"]), criterion)


def run_cell(method: str, budget: float, seed: int, args, ckpt: Path, info: dict, base, space, cost, data) -> dict:
    start = time.time()
    extra: dict = {}
    if method == "uniform":
        from searchers import make_searcher

        widths = make_searcher("uniform", space, cost, budget=budget).suggest("u")["widths"]
        model = prune(base, space, space.from_vector(widths), "l1")
    elif method in PEERS:
        model = peer_prune(base, data, cost, budget, method, seed)
    else:
        model, extra = search_cell(method, budget, seed, args, ckpt, base, space, data)
    prune_s = time.time() - start
    flops, params = tp.utils.count_ops_and_params(model, data.example_input)
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    latency = measure_latency(copy.deepcopy(model), data.example_input)
    retrain = retrain_cell(ckpt.stem, model, data, seed=seed, label=f"quality {method} {budget} s{seed}",
                           **({"epochs": args.retrain_epochs} if args.retrain_epochs else {}))
    return {"method": method, "budget": budget, "seed": seed, "model": args.model, "base": ckpt.stem,
            "base_info": info, "flops_ratio": flops / cost.base_flops, "params": params, "conv_widths": widths,
            "prune_or_search_s": prune_s, **extra, "retrain_key": retrain["key"], "retrain_s": retrain["train_s"],
            "retrain_epochs": retrain["epochs"], "test_acc": retrain["test_acc"], "val_acc": retrain["val_acc"],
            "test_correct": retrain["test_correct"], "batch1_ms": latency["batch1_ms"],
            "batch64_ms": latency["batch64_ms"], "threads": torch.get_num_threads(), "loadavg_1m": machine_load(),
            "device": common.device_name(), "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: bases, retrains and search trials")
    parser.add_argument("--concurrency", type=int, default=4, help="trials at once on one GPU (--device cuda)")
    parser.add_argument("--quick", action="store_true", help="uniform and tp-l1 at 0.5, one seed, 1-epoch retrain")
    args = parser.parse_args()
    if args.quick:
        args.methods, args.budgets, args.seeds = ["uniform", "tp-l1"], [0.5], [0]
    args.retrain_epochs = 1 if args.quick else None
    set_threads(args.threads)
    common.use_device(args.device)
    ckpt, info, data, base, space, cost = bench_base(args.model, args.data)
    folder = RESULTS / ("quality-quick" if args.quick else "quality")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"base {args.model}: val {info['val_acc']:.4f}, test {info['test_acc']:.4f}", flush=True)
    for budget in args.budgets:
        for seed in args.seeds:
            for method in args.methods:
                path = folder / f"{args.model}-{method}-b{budget}-s{seed}.json"
                if path.is_file():
                    continue
                try:
                    cell = run_cell(method, budget, seed, args, ckpt, info, base, space, cost, data)
                except Exception as exc:  # a failed cell is recorded, not fatal: the table lists it
                    cell = {"method": method, "budget": budget, "seed": seed, "model": args.model,
                            "error": f"{type(exc).__name__}: {exc}", "date": time.strftime("%Y-%m-%d")}
                path.write_text(json.dumps(cell, indent=1))
                print(f"{method} {budget} s{seed}: " + (cell.get("error") or
                      f"test {cell['test_acc']:.4f} flops {cell['flops_ratio']:.3f}"), flush=True)


if __name__ == "__main__":
    main()
