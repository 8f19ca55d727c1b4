"""Score fidelity: does a trial's cheap score rank width profiles the way a full retrain does?

Profiles (cifar_resnet20 bench base, 30 in all, FLOPs 0.25-0.6): at FLOPs 0.3 and at 0.5 each, the
`uniform` profile, the `global` searcher's candidates (L1, normalisers mean and max) and random
profiles from the `random` searcher (10 per budget: the set a searcher must rank at one budget);
plus uniform profiles at 0.25, 0.35, 0.4, 0.45, 0.55, 0.6 and 4 random ones at random budgets in
[0.25, 0.6] (the spread). Every profile is pruned with L1 channels, then:

* scored like a trial: adaptive BN (20 batches of 128), a fine-tune of k steps (SGD lr 0.01, one
  cosine schedule) for k in 0, 25, 50, 100, 200, then accuracy and loss on the validation split
  (20% of train = 1,017 images; and on its first half, 508 images, standing for a 10% split);
  during the 200-step fine-tune the model is also evaluated after 25, 50 and 100 steps (what a
  promotion scheduler sees mid-schedule);
* retrained from the same pruned weights with the bench recipe (bench/common.py: 20 epochs, lr 0.05)
  and evaluated on the test split: the ground truth.

One JSON per profile in bench/results/fidelity/ (resumable; rerun to continue); retrains are cached
in bench/results/retrain/. bench/report.py computes Spearman and Kendall with bootstrap intervals.

    python bench/fidelity.py [--model cifar_resnet20] [--threads 1] [--limit N] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import (DEFAULT_DATA, RESULTS, RETRAIN_EPOCHS, bench_base, machine_load,  # noqa: E402
                    profile_key, retrain_cell)

from searchers import make_searcher  # noqa: E402
from widthsearch import prune  # noqa: E402
from widthsearch.training import StepTrainer, TrainConfig, evaluate, recalibrate_bn, set_threads  # noqa: E402

KS = (0, 25, 50, 100, 200)
SNAPSHOTS = (25, 50, 100)          # evaluations inside the 200-step fine-tune
FOCUS = (0.3, 0.5)                 # budgets with 10 profiles each
SPREAD = (0.25, 0.35, 0.4, 0.45, 0.55, 0.6)
FINETUNE_LR = 0.01
BN_BATCHES = 20


def profiles(model, space, cost, quick: bool) -> list[dict]:
    """The profile set: {"widths", "source", "target"}, in a fixed order."""
    out, seen = [], set()

    def add(widths, source, target):
        key = tuple(int(w) for w in widths)
        if key not in seen:
            seen.add(key)
            out.append({"widths": list(key), "source": source, "target": target})

    focus, per_budget = ((0.5,), 3) if quick else (FOCUS, 10)
    for budget in focus:
        add(make_searcher("uniform", space, cost, budget=budget).suggest("u")["widths"], "uniform", budget)
        glob = make_searcher("global", space, cost, budget=budget, model=model, normalizers=["mean", "max"])
        while (config := glob.suggest("g")) not in (None, "FINISHED"):
            add(config["widths"], "global", budget)
        rand = make_searcher("random", space, cost, budget=budget, seed=int(budget * 100))
        while sum(p["target"] == budget for p in out) < per_budget:
            add(rand.suggest(f"r{len(out)}")["widths"], "random", budget)
    if not quick:
        for budget in SPREAD:
            add(make_searcher("uniform", space, cost, budget=budget).suggest("u")["widths"], "uniform", budget)
        rng = np.random.default_rng(7)
        for i, budget in enumerate(rng.uniform(0.25, 0.6, 4)):
            budget = round(float(budget), 3)
            add(make_searcher("random", space, cost, budget=budget, seed=100 + i).suggest("r")["widths"],
                "random", budget)
    return out


def interleaved(todo: list[dict]) -> list[tuple[int, dict]]:
    """(index, profile) taking the 0.3 set, the 0.5 set and the spread in turn, so that a partial run already
    covers the whole FLOPs range (the index, which seeds the scoring, is the profile's place in `profiles`)."""
    sets = [[(i, p) for i, p in enumerate(todo) if p["target"] == 0.3],
            [(i, p) for i, p in enumerate(todo) if p["target"] == 0.5],
            [(i, p) for i, p in enumerate(todo) if p["target"] not in (0.3, 0.5)]]
    return [item for row in itertools.zip_longest(*sets) for item in row if item is not None]


def score_variants(base, space, widths, data, seed: int, ks=KS) -> dict:
    """Val accuracy/loss (full val and its first half) after adaptive BN + k fine-tune steps, and seconds."""
    half = len(data.val) // 2
    halves = _half_view(data, half)
    out = {}
    for k in ks:
        start = time.time()
        model = prune(base, space, space.from_vector(widths), "l1")
        recalibrate_bn(model, data, num_batches=BN_BATCHES, seed=seed, device=common.DEVICE)
        trainer = StepTrainer(model, data, k, TrainConfig(lr=FINETUNE_LR), seed=seed, device=common.DEVICE)
        stops = sorted({s for s in SNAPSHOTS if s < k} | {k}) if k == max(ks) else [k]
        for stop in stops:
            trainer.run(stop - trainer.done)
            acc, loss = evaluate(model, data, "val", device=common.DEVICE)
            acc_half, loss_half = evaluate(model, halves, "val", device=common.DEVICE)
            name = f"k{k}" if stop == k else f"k{k}@{stop}"
            out[name] = {"val_acc": acc, "val_loss": loss, "val10_acc": acc_half, "val10_loss": loss_half,
                         "seconds": time.time() - start}
    return out


def _half_view(data, n: int):
    """The same splits with val cut to its first n images (the 10% stand-in; a subset, so no leakage)."""
    import dataclasses

    from widthsearch.data import Split

    return dataclasses.replace(data, val=Split(data.val.x[:n], data.val.y[:n]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (scores and retrains; recorded per cell)")
    parser.add_argument("--limit", type=int, help="stop after this many new profiles")
    parser.add_argument("--quick", action="store_true", help="3 profiles, k in 0/25, a 1-epoch retrain (smoke test)")
    args = parser.parse_args()
    set_threads(args.threads)
    device = common.use_device(args.device)
    ckpt, info, data, base, space, cost = bench_base(args.model, args.data)
    folder = RESULTS / ("fidelity-quick" if args.quick else "fidelity")
    folder.mkdir(parents=True, exist_ok=True)
    todo = profiles(base, space, cost, args.quick)
    print(f"base {args.model}: val {info['val_acc']:.4f}, test {info['test_acc']:.4f}; {len(todo)} profiles", flush=True)
    done = 0
    for i, p in interleaved(todo):
        path = folder / f"{args.model}-{profile_key(p['widths'])}.json"
        if path.is_file():
            continue
        if args.limit is not None and done >= args.limit:
            break
        scores = score_variants(base, space, p["widths"], data, seed=i, ks=(0, 25) if args.quick else KS)
        model = prune(base, space, space.from_vector(p["widths"]), "l1")
        retrain = retrain_cell(ckpt.stem, model, data, seed=0, epochs=1 if args.quick else RETRAIN_EPOCHS,
                               label=f"fidelity {p['source']} {p['target']}")
        cell = {**p, "index": i, "model": args.model, "base": ckpt.stem, "base_info": info,
                "flops_ratio": cost.flops_ratio(space.from_vector(p["widths"])), "scores": scores,
                "retrain_key": retrain["key"], "retrain_epochs": retrain["epochs"], "retrain_s": retrain["train_s"],
                "test_acc": retrain["test_acc"], "retrain_val_acc": retrain["val_acc"],
                "threads": args.threads, "device": device, "loadavg_1m": machine_load(), "date": time.strftime("%Y-%m-%d")}
        path.write_text(json.dumps(cell, indent=1))
        done += 1
        print(f"{i}: {p['source']} {p['target']} flops {cell['flops_ratio']:.3f} k0 {scores['k0']['val_acc']:.4f} "
              f"-> test {cell['test_acc']:.4f} (retrain {cell['retrain_s']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
