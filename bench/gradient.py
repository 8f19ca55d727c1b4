"""Gradient searcher on cifar_resnet20 / cifar10-5k: the profile reached for each penalty lam,
its FLOPs and val accuracy (after adaptive BN and a short fine-tune), and the wall time per trial.

Runs the searcher in Pareto mode (lam spread log-uniformly), so every trial is one gate
optimisation for one lam.

    python -m bench.gradient [--quick] [--data npz:PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from bench.common import DEFAULT_DATA, base_checkpoint
from widthsearch import Search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--points", type=int, default=5)
    args = parser.parse_args()
    epochs, steps, finetune = (3, 60, 20) if args.quick else (15, 300, 200)
    ckpt, info = base_checkpoint("cifar_resnet20", args.data, epochs)
    print(f"base cifar_resnet20 ({epochs} epochs): val acc {info['val_acc']:.4f}, test acc {info['test_acc']:.4f}")
    with tempfile.TemporaryDirectory() as storage:
        run = Search(name="gradient", storage=storage, model="cifar_resnet20", checkpoint=str(ckpt),
                     data=args.data, searcher="gradient", pareto=True, num_samples=args.points, concurrency=2,
                     finetune_steps=finetune,
                     searcher_options={"steps": steps, "lr": 0.2 if args.quick else 0.05, "points": args.points,
                                       "lam_min": 0.03, "lam_max": 3.0})
        start = time.time()
        table = run.fit(progress=False)
        wall = time.time() - start
        groups = json.loads(table.schema.metadata[b"widthsearch.groups"])
    rows = sorted(table.to_pylist(), key=lambda r: json.loads(r["payload"])["lam"])
    print(f"\n{len(rows)} trials, {wall:.0f}s wall (concurrency 2); {steps} gate steps, {finetune} fine-tune steps\n")
    print(f"groups: {groups}\n")
    print("| lam | expected ratio | flops ratio | MFLOPs | params | val acc | gate s | trial s | widths |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = json.loads(r["payload"])
        print(f"| {p['lam']:.3g} | {p['expected_ratio']:.4f} | {r['flops_ratio']:.4f} | {r['flops'] / 1e6:.2f} "
              f"| {r['params']} | {r['val_acc']:.4f} | {p['gate_s']:.1f} | {r['wall_s']:.1f} | {r['widths']} |")


if __name__ == "__main__":
    main()
