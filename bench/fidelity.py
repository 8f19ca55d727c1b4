"""Proxy fidelity: can the quick trial score rank profiles the way a full retrain does?

Random profiles at the FLOPs budget (random keep-ratio directions projected onto the budget,
as the `random` searcher does) are scored like a trial (L1 prune, adaptive BN, k fine-tune
steps, validation accuracy) for each k, and retrained in full from the same pruned weights
(test accuracy afterwards). Reported per k: Spearman and Kendall rank correlations between
the score and the retrained accuracy, and the score's cost as a fraction of the retrain's.

    python bench/fidelity.py [--quick] [--data npz:PATH] [--out bench/results/fidelity.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_DATA, RESULTS, base_checkpoint  # noqa: E402

from searchers.base import project_to_budget  # noqa: E402
from widthsearch import CostModel, build_space, load_data, load_model, prune  # noqa: E402
from widthsearch.training import TrainConfig, evaluate, recalibrate_bn, set_threads, train  # noqa: E402


def score(base, space, profile, data, steps: int, seed: int) -> tuple[float, float]:
    """A trial's score with `steps` fine-tune steps, and the seconds it took."""
    start = time.time()
    model = prune(base, space, profile, "l1")
    recalibrate_bn(model, data, num_batches=10, seed=seed)
    if steps:
        train(model, data, steps=steps, config=TrainConfig(lr=0.01), seed=seed)
    return evaluate(model, data, "val")[0], time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--out", default=str(RESULTS / "fidelity.json"))
    args = parser.parse_args()
    profiles, ks, epochs, base_epochs = (6, (0, 10, 50), 1, 3) if args.quick else (24, (0, 20, 100, 300), 30, 60)
    set_threads(2)
    ckpt, info = base_checkpoint(args.model, args.data, base_epochs)
    data = load_data(args.data, seed=0)
    base = load_model(args.model, data.num_classes, checkpoint=str(ckpt), in_channels=data.in_channels)
    space = build_space(base, data.example_input)
    cost = CostModel(space)
    rng = np.random.default_rng(0)
    widths = project_to_budget(space, cost, rng.uniform(0.2, 1.0, size=(profiles, len(space))), args.budget)
    rows = []
    for i, w in enumerate(widths):
        profile = space.from_vector(w)
        row = {"widths": w.tolist(), "flops_ratio": cost.flops_ratio(profile), "scores": {}, "score_s": {}}
        for k in ks:
            row["scores"][k], row["score_s"][k] = score(base, space, profile, data, k, seed=i)
        start = time.time()
        model = prune(base, space, profile, "l1")
        train(model, data, epochs=epochs, config=TrainConfig(lr=0.05), seed=i)
        row["retrain_s"], row["test_acc"] = time.time() - start, evaluate(model, data, "test")[0]
        rows.append(row)
        print(json.dumps(row), flush=True)
    target = [r["test_acc"] for r in rows]
    fidelity = []
    for k in ks:
        scores = [r["scores"][k] for r in rows]
        fidelity.append({"k": k, "spearman": stats.spearmanr(scores, target).statistic,
                         "kendall": stats.kendalltau(scores, target).statistic,
                         "cost_fraction": float(np.mean([r["score_s"][k] / r["retrain_s"] for r in rows]))})
        print(json.dumps(fidelity[-1]), flush=True)
    out = {"mode": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%d"), "loadavg_1m": os.getloadavg()[0], "model": args.model,
           "data": args.data, "base": info, "budget": args.budget, "retrain_epochs": epochs, "profiles": rows,
           "fidelity": fidelity}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
