"""Benchmark: CostModel vs torch-pruning's counter, and CPU latency of dense vs pruned ResNet-56.

    python -m bench.cost_model            # cifar_resnet20 + cifar_resnet56
    python -m bench.cost_model --quick    # cifar_resnet20 only, fewer repetitions

Part 1 times `CostModel.flops` (one profile per call, averaged over many calls),
`CostModel.flops_many` (per profile, over a large batch) and
`torch_pruning.utils.count_ops_and_params` on the physically pruned model (and prune +
count, what a searcher without a cost model pays), all measured in the same run, and
checks that they agree. Part 2 measures the median CPU latency (torch.no_grad, eval) of
the dense and the uniform(0.5)-pruned model, with 1 thread and torch's default threads.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch_pruning as tp

from widthsearch import CostModel, build_space, load_model, prune


def random_profiles(space, n: int, seed: int) -> list[dict[str, int]]:
    rng = np.random.default_rng(seed)
    return [{g.name: int(rng.integers(g.min_width, g.width + 1)) for g in space.groups} for _ in range(n)]


def per_call(fn, repeat: int) -> float:
    """Mean seconds per call of fn(i) over `repeat` calls."""
    start = time.perf_counter()
    for i in range(repeat):
        fn(i)
    return (time.perf_counter() - start) / repeat


def cost_rows(name: str, args) -> list[dict]:
    x = torch.randn(1, 3, 32, 32)
    model = load_model(name).eval()
    space = build_space(model, x)
    t = time.perf_counter()
    cost = CostModel(space)
    build_s = time.perf_counter() - t

    profiles = random_profiles(space, max(args.calls, args.prune_calls), seed=0)
    flops_s = per_call(lambda i: cost.flops(profiles[i % len(profiles)]), args.calls)
    stack = np.stack([space.vector(p) for p in random_profiles(space, args.many, seed=1)])
    t = time.perf_counter()
    many = cost.flops_many(stack)
    many_s = (time.perf_counter() - t) / len(stack)

    pruned = [prune(model, space, p) for p in profiles[: args.prune_calls]]
    counts = []
    count_s = per_call(lambda i: counts.append(tp.utils.count_ops_and_params(pruned[i], x)), args.prune_calls)
    prune_count_s = per_call(lambda i: tp.utils.count_ops_and_params(prune(model, space, profiles[i]), x),
                             args.prune_calls)
    exact = all(c == (cost.flops(p), cost.params(p)) for c, p in zip(counts, profiles))
    exact_many = np.array_equal(many[:200], [cost.flops(space.from_vector(w)) for w in stack[:200]])
    return [{
        "model": name, "groups": len(space), "build_s": build_s, "flops_us": flops_s * 1e6,
        "many_us": many_s * 1e6, "count_ms": count_s * 1e3, "prune_count_ms": prune_count_s * 1e3,
        "ratio_count": count_s / flops_s, "ratio_many": count_s / many_s,
        "ratio_prune": prune_count_s / flops_s, "exact": exact and exact_many,
    }]


def median_latency(model, x, runs: int, warmup: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def latency_rows(name: str, args) -> list[dict]:
    dense = load_model(name).eval()
    space = build_space(dense, torch.randn(1, 3, 32, 32))
    cost = CostModel(space)
    profile = space.uniform(0.5)
    pruned = prune(dense, space, profile).eval()
    default_threads = torch.get_num_threads()
    rows = []
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for batch in (1, 64):
            x = torch.randn(batch, 3, 32, 32)
            runs = args.runs if batch == 1 else max(5, args.runs // 5)
            d = median_latency(dense, x, runs, warmup=3)
            p = median_latency(pruned, x, runs, warmup=3)
            rows.append({"threads": threads, "batch": batch, "runs": runs, "dense_ms": d * 1e3,
                         "pruned_ms": p * 1e3, "speedup": d / p})
    torch.set_num_threads(default_threads)
    return rows, cost.flops_ratio(profile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cifar_resnet20 only, fewer repetitions")
    parser.add_argument("--calls", type=int, default=None, help="CostModel.flops calls to average")
    parser.add_argument("--many", type=int, default=10000, help="profiles per flops_many call")
    parser.add_argument("--prune-calls", type=int, default=None, help="pruned models to count")
    parser.add_argument("--runs", type=int, default=None, help="latency runs per setting (batch 64: a fifth)")
    parser.add_argument("--latency-model", default=None, help="model for the latency table")
    args = parser.parse_args(argv)
    args.calls = args.calls or (500 if args.quick else 2000)
    args.prune_calls = args.prune_calls or (3 if args.quick else 5)
    args.runs = args.runs or (20 if args.quick else 50)
    models = ["cifar_resnet20"] if args.quick else ["cifar_resnet20", "cifar_resnet56"]
    latency_model = args.latency_model or ("cifar_resnet20" if args.quick else "cifar_resnet56")

    print(f"torch {torch.__version__}, torch-pruning {tp.__version__}, {platform.processor() or platform.machine()}, "
          f"default threads {torch.get_num_threads()}, python {sys.version.split()[0]}\n")
    rows = [r for name in models for r in cost_rows(name, args)]
    print("### Cost evaluation (1x3x32x32, per profile)\n")
    print("| model | groups | CostModel build (s) | flops() (us) | flops_many (us/profile) | count_ops on pruned (ms) "
          "| prune + count_ops (ms) | speed-up flops() | speed-up flops_many | speed-up vs prune+count | exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['groups']} | {r['build_s']:.2f} | {r['flops_us']:.1f} | {r['many_us']:.3f} "
              f"| {r['count_ms']:.1f} | {r['prune_count_ms']:.1f} | {r['ratio_count']:,.0f}x | {r['ratio_many']:,.0f}x "
              f"| {r['ratio_prune']:,.0f}x | {'yes' if r['exact'] else 'NO'} |")

    lat, ratio = latency_rows(latency_model, args)
    print(f"\n### CPU latency, {latency_model}: dense vs uniform(0.5) (FLOPs ratio {ratio:.3f}); median, no_grad, eval\n")
    print("| threads | batch | runs | dense (ms) | pruned (ms) | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in lat:
        print(f"| {r['threads']} | {r['batch']} | {r['runs']} | {r['dense_ms']:.2f} | {r['pruned_ms']:.2f} "
              f"| {r['speedup']:.2f}x |")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
