"""Seed noise of the bench's retrain recipe, and whether another recipe is steadier.

Issue 20 asks for a steadier recipe where one cell's retrain seeds spread more than a point (std). This retrains
the chosen profiles of finished quality cells (rebuilt as bench/quality.py builds them; searches reused from
bench/cache, never rerun) with each recipe (EPOCHSxLR, SGD cosine from the pruned weights) once per seed. Retrains
are the bench's cached `retrain_cell`s, so seeds a quality cell already holds cost nothing. Choose on val (the
pooled within-profile std and the mean); test is shown for the record.

    python -m bench.retrain_noise [--model cifar_resnet20] [--budget 0.1] [--profiles uniform:0 optuna-widthexp:2]
                                  [--recipes 20x0.05 20x0.02] [--seeds 0 1 2 3 4]

Writes bench/results/retrain_noise/BASE_ID/MODEL-bBUDGET-RECIPE.json after every retrain (resumable; one file per
recipe; each write merges what another process added meanwhile, so two processes may run at once).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
from pathlib import Path

from bench.common import DEFAULT_DATA, RESULTS, bench_base, check_same_base, parse_recipe, retrain_cell
from bench.quality import cells_of_base, prune_cell
from widthsearch.training import set_threads


def summary(runs: dict[str, list[dict]]) -> dict:
    """Per recipe: mean and std of val and test per profile, and the within-profile std pooled over profiles
    (root of the mean per-profile variance, weighted by degrees of freedom)."""
    out = {}
    for split in ("val_acc", "test_acc"):
        per = {p: [r[split] for r in rs] for p, rs in runs.items() if len(rs) >= 2}
        dof = sum(len(v) - 1 for v in per.values())
        pooled = (sum(statistics.variance(v) * (len(v) - 1) for v in per.values()) / dof) ** 0.5 if dof else None
        out[split] = {"pooled_std": pooled,
                      "profiles": {p: {"n": len(v), "mean": statistics.mean(v), "std": statistics.stdev(v),
                                       "min": min(v)} for p, v in per.items()}}
    return out


def add_run(path: Path, out: dict, profile: str, run: dict) -> dict:
    """`out` with `run` added under `profile`, merged with what the file holds now (another process may have
    added other seeds or profiles of the same recipe since it was read), written atomically; the merged dict."""
    if path.is_file():
        now = json.loads(path.read_text())
        for p, runs in now["runs"].items():
            mine = out["runs"].setdefault(p, [])
            mine += [r for r in runs if all(r["seed"] != m["seed"] for m in mine)]
    runs = out["runs"].setdefault(profile, [])
    if all(r["seed"] != run["seed"] for r in runs):
        runs.append(run)
    for runs in out["runs"].values():
        runs.sort(key=lambda r: r["seed"])
    out["summary"] = summary(out["runs"])
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--profiles", nargs="+", default=["uniform:0"], metavar="METHOD:SEED",
                        help="quality cells whose chosen profile is retrained (search seed after the colon)")
    parser.add_argument("--recipes", nargs="+", default=["20x0.05", "20x0.02"], metavar="EPOCHSxLR")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    try:  # a malformed recipe fails before the base loads
        recipes = {r: parse_recipe(r) for r in args.recipes}
    except ValueError as exc:
        parser.error(f"--recipes: {exc}")
    set_threads(args.threads)
    ckpt, info, data, base, space, cost = bench_base(args.model, args.data)
    args.base_id, args.concurrency = info["base_id"], 1
    folder = RESULTS / "retrain_noise" / info["base_id"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{args.model}-b{args.budget}-{name}.json" for name in recipes}
    outs = {}
    for name, (epochs, lr) in recipes.items():
        path = paths[name]
        outs[name] = json.loads(path.read_text()) if path.is_file() else {
            "model": args.model, "budget": args.budget, "recipe": name, "epochs": epochs, "lr": lr,
            "base_info": info, "runs": {}}
        check_same_base(outs[name], info, path)
    for profile in args.profiles:
        method, seed = profile.split(":")
        name = f"{args.model}-{method}-b{args.budget}-s{seed}.json"
        if not cells_of_base(info["base_id"], name):
            raise SystemExit(f"no quality cell {name} in {RESULTS / 'quality' / info['base_id']}/*/: run "
                             f"bench/quality.py for {profile} first")
        model, _ = prune_cell(method, args.budget, int(seed), args, ckpt, base, space, cost, data)
        for name, (epochs, lr) in recipes.items():
            for s in args.seeds:
                if any(r["seed"] == s for r in outs[name]["runs"].get(profile, [])):
                    continue
                r = retrain_cell(ckpt.stem, copy.deepcopy(model), data, seed=s, epochs=epochs, lr=lr,
                                 label=f"retrain_noise {profile} {name} r{s}")
                run = {k: r[k] for k in ("seed", "val_acc", "test_acc", "train_s", "loadavg_1m", "date")}
                outs[name] = add_run(paths[name], outs[name], profile, run)
                print(f"{profile} {name} r{s}: val {r['val_acc']:.4f} test {r['test_acc']:.4f}", flush=True)
    for name, out in outs.items():
        if "summary" in out:
            print(name, "pooled std: val", out["summary"]["val_acc"]["pooled_std"],
                  "test", out["summary"]["test_acc"]["pooled_std"])


if __name__ == "__main__":
    main()
