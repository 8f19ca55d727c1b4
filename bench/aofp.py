"""AOFP on cifar_resnet20 / cifar10-5k: the accuracy-FLOPs trajectory of committed versions, and
the loss evaluations spent against what exact oracle pruning would need for the same widths.

Oracle pruning removes one filter at a time and evaluates every remaining candidate of the
layer each time, on as many batches as AOFP spends per round; for a group shrinking from W
to w that is sum_{j=0}^{W-w-1} (W - j) evaluations x batches. AOFP's count is one ablated
evaluation per searched group per batch.

    python bench/aofp.py [--quick] [--data npz:PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_DATA, base_checkpoint  # noqa: E402

from widthsearch.config import SearchConfig  # noqa: E402
from widthsearch.results import load_metadata  # noqa: E402
from widthsearch.search import run_search  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--budget", type=float, default=0.5)
    args = parser.parse_args()
    epochs, window, steps, eps = (3, 4, 20, 0.05) if args.quick else (15, 10, 100, 0.01)
    ckpt, info = base_checkpoint("cifar_resnet20", args.data, epochs)
    print(f"base cifar_resnet20 ({epochs} epochs): val acc {info['val_acc']:.4f}, test acc {info['test_acc']:.4f}")
    with tempfile.TemporaryDirectory() as storage:
        cfg = SearchConfig(name="aofp", storage=storage, model="cifar_resnet20", checkpoint=str(ckpt), data=args.data,
                           searcher="aofp", budget=args.budget, num_samples=5000, concurrency=2,
                           searcher_options={"window": window, "commit_steps": steps, "epsilon": eps, "probes": 2,
                                             "max_rounds": 60 if args.quick else 200})
        start = time.time()
        exp_dir, table = run_search(cfg, progress=False)
        wall = time.time() - start
        widths = load_metadata(exp_dir)["widths"]
    rows = table.to_pylist()
    commits = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: json.loads(r["payload"])["version"])
    probes = [json.loads(r["payload"]) for r in rows if r["status"] == "probe"]
    aofp_evals = sum(p["loss_evals"] for p in probes)
    batches = sum(p["batches"] for p in probes) // max(1, len(commits))  # per round (all probes)
    final = commits[-1]["widths"] if commits else widths
    oracle = batches * sum(sum(W - j for j in range(W - w)) for W, w in zip(widths, final))
    print(f"\n{len(commits)} committed versions, {len(probes)} probe trials, {wall:.0f}s wall\n")
    print("| version | flops ratio | params | val acc | widths |")
    print("|---|---|---|---|---|")
    print(f"| 0 (base) | 1.0000 | - | {info['val_acc']:.4f} | {widths} |")
    for r in commits:
        print(f"| {json.loads(r['payload'])['version']} | {r['flops_ratio']:.4f} | {r['params']} | {r['val_acc']:.4f} "
              f"| {r['widths']} |")
    print(f"\nloss evaluations (batch x group): AOFP {aofp_evals}, exact oracle for the same widths {oracle} "
          f"({oracle / max(1, aofp_evals):.1f}x more)")


if __name__ == "__main__":
    main()
