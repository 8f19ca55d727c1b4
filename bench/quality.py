"""Quality at equal budgets: every searcher and the torch-pruning peer at the same FLOPs budgets.

Search budget: the same number of Tune trials per searcher (`--trials`; for aofp that count
includes its probe trials). Each searcher's best row *within the budget* on the validation
score is retrained for `--retrain-epochs` (from the pruned base weights, same recipe for all);
the peer (torch-pruning's global MagnitudePruner with L1 magnitude, and with Taylor importance)
prunes the base to the same FLOPs and gets the same retrain. Reported: test accuracy (the test
split is used only here, after the choice), FLOPs ratio, params, CPU latency at batch 1 and 64.

    python bench/quality.py [--quick] [--data npz:PATH] [--out bench/results/quality.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch_pruning as tp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_DATA, RESULTS, base_checkpoint  # noqa: E402

from widthsearch import load_data, load_model  # noqa: E402
from widthsearch.config import SearchConfig  # noqa: E402
from widthsearch.export import measure_latency  # noqa: E402
from widthsearch.models import classifier_of  # noqa: E402
from widthsearch.search import run_retrain, run_search  # noqa: E402
from widthsearch.training import TrainConfig, evaluate, set_threads, train  # noqa: E402

SEARCHERS = ("uniform", "random", "global", "optuna", "aofp", "gradient", "metapruning")


def best_within(table, budget: float) -> dict | None:
    """The best-scoring successful row whose FLOPs ratio is within the budget (validation score only)."""
    rows = [r for r in table.to_pylist() if r["status"] == "ok" and r["flops_ratio"] <= budget + 1e-9]
    return max(rows, key=lambda r: (r["score"], -r["flops_ratio"])) if rows else None


def run_searcher(name: str, budget: float, seed: int, args, ckpt: Path, storage: str) -> dict:
    cfg = SearchConfig(name=f"{name}-b{budget}-s{seed}", storage=storage, model=args.model, checkpoint=str(ckpt),
                       data=args.data, searcher=name, budget=budget, num_samples=args.trials,
                       concurrency=args.concurrency, finetune_steps=args.finetune_steps, cpus_per_trial=1, seed=seed)
    start = time.time()
    exp_dir, table = run_search(cfg, progress=False)
    search_s = time.time() - start
    row = best_within(table, budget)
    if row is None:
        return {"method": name, "budget": budget, "seed": seed, "search_s": search_s,
                "error": f"no successful trial within the budget among {table.num_rows}"}
    out = Path(storage) / f"export-{cfg.name}"
    summary = run_retrain(exp_dir, trial=row["trial_id"], epochs=args.retrain_epochs, lr=args.lr, out=str(out),
                          progress=False)
    latency = json.loads((out / "latency.json").read_text())
    return {"method": name, "budget": budget, "seed": seed, "search_s": search_s, "trials": table.num_rows,
            "val_score": row["score"], "test_acc": summary["test_acc"], "flops_ratio": summary["flops_ratio"],
            "params": summary["params"], "keep_ratios": row["keep_ratios"],
            "batch1_ms": latency["pruned"]["batch1_ms"], "batch64_ms": latency["pruned"]["batch64_ms"],
            "dense_batch1_ms": latency["dense"]["batch1_ms"], "dense_batch64_ms": latency["dense"]["batch64_ms"]}


def peer_prune(model: torch.nn.Module, data, budget: float, importance: str, seed: int) -> torch.nn.Module:
    """torch-pruning's global MagnitudePruner, stepped until the FLOPs ratio is within the budget."""
    model = copy.deepcopy(model)
    example = data.example_input
    base = tp.utils.count_ops_and_params(model, example)[0]
    imp = tp.importance.TaylorImportance() if importance == "taylor" else tp.importance.MagnitudeImportance(p=1)
    pruner = tp.pruner.MagnitudePruner(model, example, importance=imp, global_pruning=True, pruning_ratio=0.95,
                                       iterative_steps=200, ignored_layers=[model.get_submodule(classifier_of(model))])
    for _ in range(200):
        if importance == "taylor":
            model.zero_grad()
            x, y = next(data.batches("train", 128, shuffle=True, seed=seed))
            torch.nn.functional.cross_entropy(model(x), y).backward()
        pruner.step()
        if tp.utils.count_ops_and_params(model, example)[0] <= budget * base:
            break
    model.zero_grad()
    return model


def run_peer(importance: str, budget: float, seed: int, args, ckpt: Path) -> dict:
    data = load_data(args.data, seed=seed)
    base = load_model(args.model, data.num_classes, checkpoint=str(ckpt), in_channels=data.in_channels)
    start = time.time()
    model = peer_prune(base, data, budget, importance, seed)
    train(model, data, epochs=args.retrain_epochs, config=TrainConfig(lr=args.lr), seed=seed)
    flops, params = tp.utils.count_ops_and_params(model, data.example_input)
    base_flops = tp.utils.count_ops_and_params(base, data.example_input)[0]
    latency = measure_latency(model, data.example_input)
    return {"method": f"tp-{importance}", "budget": budget, "seed": seed, "search_s": time.time() - start,
            "test_acc": evaluate(model, data, "test")[0], "flops_ratio": flops / base_flops, "params": params,
            "batch1_ms": latency["batch1_ms"], "batch64_ms": latency["batch64_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="resnet20, one budget, one seed, tiny budgets")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--model")
    parser.add_argument("--searchers", nargs="+")
    parser.add_argument("--out", default=str(RESULTS / "quality.json"))
    args = parser.parse_args()
    quick = dict(model="cifar_resnet20", budgets=[0.5], seeds=[0], trials=4, finetune_steps=10, retrain_epochs=1,
                 base_epochs=3, searchers=["uniform", "random", "global", "optuna"], peers=["magnitude"])
    full = dict(model="cifar_resnet56", budgets=[0.5, 0.3], seeds=[0, 1, 2], trials=32, finetune_steps=100,
                retrain_epochs=30, base_epochs=60, searchers=list(SEARCHERS), peers=["magnitude", "taylor"])
    setup = quick if args.quick else full
    args.model = args.model or setup["model"]
    args.searchers = args.searchers or setup["searchers"]
    args.trials, args.finetune_steps, args.retrain_epochs = setup["trials"], setup["finetune_steps"], setup["retrain_epochs"]
    args.concurrency, args.lr = 2, 0.05
    set_threads(2)
    ckpt, base = base_checkpoint(args.model, args.data, setup["base_epochs"])
    print(f"base {args.model}: test acc {base['test_acc']:.4f}, trained in {base['train_s']:.0f}s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for budget in setup["budgets"]:
            for seed in setup["seeds"]:
                for name in args.searchers:
                    rows.append(run_searcher(name, budget, seed, args, ckpt, storage))
                    print(json.dumps(rows[-1]), flush=True)
                for importance in setup["peers"]:
                    rows.append(run_peer(importance, budget, seed, args, ckpt))
                    print(json.dumps(rows[-1]), flush=True)
    out = {"mode": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%d"), "loadavg_1m": os.getloadavg()[0], "model": args.model,
           "data": args.data, "base": base, "trials": args.trials, "finetune_steps": args.finetune_steps,
           "retrain_epochs": args.retrain_epochs, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
