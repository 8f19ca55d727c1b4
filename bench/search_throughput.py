"""Trials per hour and Ray overhead at concurrency 1 and 2 (cifar_resnet20 on cifar10-5k).

overhead = 1 - (sum of trial compute time) / (span x concurrency), where a trial's compute
time is the wall_s it reports (from entering the trainable to its last report) and the span
runs from the first trial's start to the last trial's end (Ray start-up and preparing the
experiment excluded; they are reported separately as "setup s").

    python -m bench.search_throughput [--quick] [--data npz:PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.common import DEFAULT_DATA, RESULTS, base_checkpoint
from widthsearch import Search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--out", default=str(RESULTS / "throughput.json"))
    args = parser.parse_args()
    trials, steps, epochs = (6, 20, 3) if args.quick else (16, 100, 15)
    ckpt, info = base_checkpoint(args.model, args.data, epochs)
    print(f"base {args.model}: test acc {info['test_acc']:.4f}, trained in {info['train_s']:.0f}s")
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for concurrency in (1, 2):
            run = Search(name=f"throughput-c{concurrency}", storage=storage, model=args.model,
                         checkpoint=str(ckpt), data=args.data, searcher="random", budget=0.5,
                         num_samples=trials, concurrency=concurrency, finetune_steps=steps, cpus_per_trial=1)
            start = time.time()
            table = run.fit(progress=False)
            total = time.time() - start
            began = min(table.column("started_at").to_pylist())
            ended = max(table.column("finished_at").to_pylist())
            span = (ended - began).total_seconds()
            compute = sum(table.column("wall_s").to_pylist())
            rows.append((concurrency, table.num_rows, total - span, span, compute, 3600 * table.num_rows / span,
                         1 - compute / (span * concurrency)))
    keys = ("concurrency", "trials", "setup_s", "span_s", "trial_s", "trials_per_hour", "overhead")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "mode": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%d"), "loadavg_1m": os.getloadavg()[0], "model": args.model,
        "data": args.data, "finetune_steps": steps, "base": info, "rows": [dict(zip(keys, r)) for r in rows]}, indent=1))
    print(f"\n{trials} trials of {steps} fine-tune steps each, {args.model}, data {args.data}\n")
    print("| concurrency | trials | setup s | span s | summed trial s | trials/hour | Ray overhead |")
    print("|---|---|---|---|---|---|---|")
    for c, n, setup, span, compute, per_hour, overhead in rows:
        print(f"| {c} | {n} | {setup:.1f} | {span:.1f} | {compute:.1f} | {per_hour:.0f} | {overhead:.1%} |")


if __name__ == "__main__":
    main()
