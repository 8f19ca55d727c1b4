"""AOFP on cifar_resnet20 / cifar10-5k, two studies.

Trajectory (default): the accuracy-FLOPs trajectory of committed versions, the final fine-tuned
model, and the loss evaluations spent against what exact oracle pruning would need for the same
widths. Oracle pruning removes one filter at a time and evaluates every remaining candidate of
the layer each time, on as many batches as AOFP spends per round; for a group shrinking from W
to w that is sum_{j=0}^{W-w-1} (W - j) evaluations x batches. AOFP's count is one ablated
evaluation per searched group per batch.

Agreement (``--agreement``): how many batches a halving decision needs. On the cached bench base
(80 epochs), the damage accumulation of a first pass (every group's search space = all its
filters) runs twice with independent seeds (batch order, augmentation, random masks); after N
batches of each run, the per-filter mean damages of a group are compared by Spearman's rank
correlation (filters that a run has not masked yet are left out). JSON in bench/results/aofp/agreement.json. One torch thread; run it under
``nice -n 15`` on a shared machine.

    python -m bench.aofp [--quick] [--data npz:PATH]
    python -m bench.aofp --agreement [--sizes 20,100,200,500] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from bench.common import (
    DEFAULT_DATA,
    RESULTS,
    base_checkpoint,
    bench_data,
    machine_load,
)
from trainables.aofp import probe_damage
from widthsearch import Search, build_space, load_model


def trajectory(args) -> None:
    epochs, options = (3, {"window": 4, "epsilon": 0.05, "max_rounds": 60}) if args.quick else (15, {})
    ckpt, info = base_checkpoint("cifar_resnet20", args.data, epochs)
    print(f"base cifar_resnet20 ({epochs} epochs): val acc {info['val_acc']:.4f}, test acc {info['test_acc']:.4f}")
    with tempfile.TemporaryDirectory() as storage:
        run = Search(name="aofp", storage=storage, model="cifar_resnet20", checkpoint=str(ckpt), data=args.data,
                     searcher="aofp", budget=args.budget, num_samples=5000, concurrency=2, searcher_options=options)
        start = time.time()
        table = run.fit(progress=False)
        wall = time.time() - start
        widths = json.loads(table.schema.metadata[b"widthsearch.widths"])
    rows = [{**r, "phase": json.loads(r["payload"])["phase"]} for r in table.to_pylist() if r["payload"]]
    commits = sorted((r for r in rows if r["phase"] == "commit"), key=lambda r: json.loads(r["payload"])["version"])
    finals = [r for r in rows if r["phase"] == "final"]
    probes = [json.loads(r["payload"]) for r in rows if r["phase"] == "probe"]
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
    for r in finals:
        payload = json.loads(r["payload"])
        print(f"| final ({r['steps_reached']} fine-tune steps) | {r['flops_ratio']:.4f} | {r['params']} "
              f"| {r['val_acc']:.4f} | {r['widths']} |\n\n{payload['stop']}")
    print(f"\nloss evaluations (batch x group): AOFP {aofp_evals}, exact oracle for the same widths {oracle} "
          f"({oracle / max(1, aofp_evals):.1f}x more)")


def _mean_damages(model, space, sizes: list[int], seed: int, batch_size: int, data) -> dict[int, dict]:
    """Per-filter mean damages of a first pass after each of `sizes` batches of one run (seeded stream and masks)."""
    search = {g.name: list(range(g.width)) for g in space.groups}
    stream = data.stream("train", batch_size, seed=seed)
    rng = np.random.default_rng(seed)
    sums = {n: np.zeros(len(s)) for n, s in search.items()}
    counts = {n: np.zeros(len(s)) for n, s in search.items()}
    out, done = {}, 0
    for size in sorted(sizes):
        s, c, _ = probe_damage(model, space, search, itertools.islice(stream, size - done), rng)
        for n in search:
            sums[n] += s[n]
            counts[n] += c[n]
        done = size
        out[size] = {n: np.where(counts[n] > 0, sums[n] / np.maximum(counts[n], 1), np.nan) for n in search}
    return out


def agreement(args) -> None:
    torch.set_num_threads(1)
    sizes = [20, 100] if args.quick else [int(s) for s in args.sizes.split(",")]
    ckpt, info = base_checkpoint("cifar_resnet20", args.data)
    data = bench_data(args.data)
    model = load_model("cifar_resnet20", data.num_classes, ckpt, in_channels=data.in_channels).eval()
    space = build_space(model, data.example_input)
    seeds = (1_000_000, 2_000_000)  # stream epochs are seeded seed + epoch: far apart, the two runs share no batch
    start = time.time()
    runs = [_mean_damages(model, space, sizes, seed, args.batch_size, data) for seed in seeds]
    seconds = time.time() - start
    rho = {size: {n: float(spearmanr(runs[0][size][n], runs[1][size][n], nan_policy="omit").statistic)
                  for n in space.names} for size in sizes}
    result = {"model": "cifar_resnet20", "base": ckpt.name, "base_val_acc": info["val_acc"], "data": args.data,
              "batch_size": args.batch_size, "sizes": sizes, "seeds": list(seeds), "groups": space.names,
              "widths": space.widths.tolist(), "spearman": {str(k): v for k, v in rho.items()},
              "median": {str(k): float(np.median(list(v.values()))) for k, v in rho.items()},
              "seconds": seconds, "threads": torch.get_num_threads(), "loadavg_1m": machine_load(),
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv)}
    folder = RESULTS / "aofp"
    folder.mkdir(parents=True, exist_ok=True)
    name = "agreement-quick.json" if args.quick else "agreement.json"
    (folder / name).write_text(json.dumps(result, indent=1))
    print(f"Spearman of per-filter mean damages, two independent runs, batch {args.batch_size} "
          f"({seconds:.0f}s, load {result['loadavg_1m']:.1f}):\n")
    print("| group (width) | " + " | ".join(f"N={s}" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for n, w in zip(space.names, space.widths):
        print(f"| {n} ({w}) | " + " | ".join(f"{rho[s][n]:.2f}" for s in sizes) + " |")
    print("| **median** | " + " | ".join(f"**{result['median'][str(s)]:.2f}**" for s in sizes) + " |")
    print(f"\nwrote {folder / name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}", help="bench data source")
    parser.add_argument("--budget", type=float, default=0.5, help="trajectory: the FLOPs budget")
    parser.add_argument("--agreement", action="store_true", help="measure the agreement of two damage runs")
    parser.add_argument("--sizes", default="20,100,200,500", help="agreement: batches per run, comma-separated")
    parser.add_argument("--batch-size", type=int, default=128, help="agreement: images per batch")
    args = parser.parse_args()
    agreement(args) if args.agreement else trajectory(args)


if __name__ == "__main__":
    main()
