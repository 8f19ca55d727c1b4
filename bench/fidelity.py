"""Score fidelity: does a trial's cheap score rank width profiles the way a full retrain does?

Two studies of the cifar_resnet20 bench base (or --model):

* `--budget B` (the FLOPs-0.1 study): profiles at one budget, the set a searcher must rank: the `uniform`
  profile, the `global` searcher's candidates (L1, normalisers mean and max), `--random N` random profiles
  (the `random` searcher) and the best rows the searches of bench/quality.py found at that budget (the
  `top_rows` of every quality cell; channels a searcher chose itself are kept as it chose them). Each is
  retrained with `--retrain-seeds` (mean of at least 2 is the ground truth) and `--recipe` (default the quality
  table's, so that the ground truth is what the table reports; retrains the quality cells already ran are reused).
  Cells go to fidelity/BASE_ID/RECIPE/; `--shard I/N` runs every N-th profile, to run N processes side by side.
* without `--budget` (the earlier study): 30 profiles from FLOPs 0.25 to 0.6, at FLOPs 0.3 and 0.5 each the
  `uniform` profile, the `global` candidates and random profiles (10 per budget), plus uniform profiles at
  0.25, 0.35, 0.4, 0.45, 0.55, 0.6 and 4 random ones at random budgets in [0.25, 0.6]; one retrain seed.

Every profile is pruned (L1 channels, or the searcher's own), then:

* scored like a trial: adaptive BN (20 batches of 128), a fine-tune of k steps (SGD lr 0.01, one
  cosine schedule; also at lr 0.05, the retrain's, for each k in HIGH_LR_KS) for each k in KS, and 200 steps at lr
  0.05 from re-initialised weights (what the architecture alone trains to), then accuracy and loss
  on the validation split (20% of train =
  1,017 images; and on its first half, 508 images, standing for a 10% split); during the longest
  fine-tune the model is also evaluated at the SNAPSHOTS (what a promotion scheduler sees mid-schedule);
* retrained from the same pruned weights (the earlier study: bench/common.py's 20 epochs at lr 0.05; the one-budget
  study: `--recipe`) and evaluated on the test split: the ground truth.

Each one-budget cell also records scores that need no training (`proxies`, see `proxies`; `--fill` adds them to
finished cells): the parameter count, NASWOT and synflow.

One JSON per profile in bench/results/fidelity/BASE_ID/[RECIPE/] (resumable; rerun to continue); retrains are cached
in bench/results/retrain/. bench/report.py computes Spearman and Kendall with bootstrap intervals.

    python -m bench.fidelity [--model cifar_resnet20] [--budget 0.1] [--random 10] [--retrain-seeds 0 1]
                             [--recipe 40x0.05] [--shard 0/2] [--threads 1] [--limit N] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np

from bench import common
from bench.common import (
    DEFAULT_DATA,
    QUALITY_RECIPE,
    RESULTS,
    RETRAIN_EPOCHS,
    RETRAIN_LR,
    bench_base,
    check_same_base,
    machine_load,
    parse_recipe,
    profile_key,
    recipe_name,
    retrain_cell,
)
from bench.quality import cells_of_base
from searchers import make_searcher
from widthsearch import prune
from widthsearch.training import (
    StepTrainer,
    TrainConfig,
    evaluate,
    recalibrate_bn,
    set_threads,
)
from widthsearch.zero_cost import reinitialise, synflow

KS = (0, 10, 25, 50, 100, 200)
SNAPSHOTS = (25, 50, 100)          # evaluations inside the longest fine-tune
HIGH_LR = 0.05                     # fine-tunes also at the retrain's learning rate: "k25lr0.05", ...
HIGH_LR_KS = (10, 25, 50, 100, 200)
SCRATCH_KS = (200,)                # from re-initialised weights, at HIGH_LR
FOCUS = (0.3, 0.5)                 # budgets with 10 profiles each
SPREAD = (0.25, 0.35, 0.4, 0.45, 0.55, 0.6)
FINETUNE_LR = 0.01
BN_BATCHES = 20


def profiles(model, space, cost, quick: bool) -> list[dict]:
    """The profile set: {"widths", "source", "target"}, in a fixed order."""
    out, seen = [], set()

    def add(widths, source, target):
        key = profile_key(widths)
        if key not in seen:
            seen.add(key)
            out.append({"widths": [int(w) for w in widths], "source": source, "target": target})

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


def budget_profiles(model, space, cost, budget: float, n_random: int, model_name: str, base_id: str) -> list[dict]:
    """The profile set of the one-budget study, each once, in this order: uniform, the global candidates, every
    quality search's best rows at `budget` on this base (bench/results/quality/BASE_ID/*/; every search's best
    first, then every search's second, ...), then `n_random` random ones."""
    out, seen = [], set()

    def add(widths, source, keep=None, **extra):
        key = profile_key(widths, keep)
        if key not in seen:
            seen.add(key)
            out.append({"widths": [int(w) for w in widths], "keep": keep, "source": source, "target": budget, **extra})

    add(make_searcher("uniform", space, cost, budget=budget).suggest("u")["widths"], "uniform")
    glob = make_searcher("global", space, cost, budget=budget, model=model, normalizers=["mean", "max"])
    while isinstance(config := glob.suggest("g"), dict):
        add(config["widths"], "global")
    # the quality searches on this base (bench/quality.py), whatever recipe retrained their choice
    cells = [json.loads(p.read_text()) for p in cells_of_base(base_id, f"{model_name}-*-b{budget}-s*.json")]
    ranked_rows = [(rank, cell, row) for cell in cells for rank, row in enumerate(cell.get("top_rows", []))]
    for rank, cell, row in sorted(ranked_rows, key=lambda item: item[0]):
        payload = json.loads(row["payload"]) if row.get("payload") else {}
        keep = payload.get("keep") if isinstance(payload, dict) else None
        add(row["widths"], cell["method"], keep, search_seed=cell["seed"], rank=rank,
            trial_score=row["score"], trial_steps=row.get("steps_reached", row.get("finetune_steps")))
    rand = make_searcher("random", space, cost, budget=budget, seed=int(budget * 1000))
    for i in range(n_random):
        add(rand.suggest(f"r{i}")["widths"], "random")
    return out


def interleaved(todo: list[dict]) -> list[tuple[int, dict]]:
    """(index, profile) taking the 0.3 set, the 0.5 set and the spread in turn, so that a partial run already
    covers the whole FLOPs range (the index, which seeds the scoring, is the profile's place in `profiles`)."""
    sets = [[(i, p) for i, p in enumerate(todo) if p["target"] == 0.3],
            [(i, p) for i, p in enumerate(todo) if p["target"] == 0.5],
            [(i, p) for i, p in enumerate(todo) if p["target"] not in (0.3, 0.5)]]
    return [item for row in itertools.zip_longest(*sets) for item in row if item is not None]


def pruned(base, space, profile: dict):
    """The profile's pruned model: the searcher's own channels ("keep") or L1 channels of the base."""
    if profile.get("keep"):
        return prune(base, space, keep=profile["keep"])
    return prune(base, space, space.from_vector(profile["widths"]), "l1")


def variants(ks=KS, high_lr_ks=HIGH_LR_KS, scratch_ks=SCRATCH_KS) -> list[tuple[str, int, float, bool]]:
    """(name, steps, learning rate, from scratch) of every score variant: k steps at FINETUNE_LR (the trials'
    default) from the pruned weights, again at HIGH_LR, and at HIGH_LR from re-initialised weights ("scratch200lr0.05":
    the architecture's trainability alone, what a long retrain that forgets the inherited weights would reward)."""
    return ([(f"k{k}", k, FINETUNE_LR, False) for k in ks]
            + [(f"k{k}lr{HIGH_LR:g}", k, HIGH_LR, False) for k in high_lr_ks]
            + [(f"scratch{k}lr{HIGH_LR:g}", k, HIGH_LR, True) for k in scratch_ks])


def score_variants(base, space, profile: dict, data, seed: int, ks=KS, high_lr_ks=HIGH_LR_KS, scratch_ks=SCRATCH_KS,
                   skip: set = frozenset()) -> dict:
    """Val accuracy/loss (full val and its first half) after adaptive BN + k fine-tune steps (from scratch: fresh
    weights and BN, no recalibration), and seconds, for every variant not in `skip`; the longest schedule of each
    kind is also evaluated at the SNAPSHOTS before its end ("k200@50")."""
    half = len(data.val) // 2
    halves = _half_view(data, half)
    kinds = variants(ks, high_lr_ks, scratch_ks)
    longest = {(lr, scratch): max(k for _, k, *kind in kinds if kind == [lr, scratch]) for _, _, lr, scratch in kinds}
    out = {}
    for name, k, lr, scratch in kinds:
        if name in skip:
            continue
        start = time.time()
        model = pruned(base, space, profile)
        if scratch:
            reinitialise(model, seed)
        else:
            recalibrate_bn(model, data, num_batches=BN_BATCHES, seed=seed, device=common.DEVICE)
        trainer = StepTrainer(model, data, k, TrainConfig(lr=lr), seed=seed, device=common.DEVICE)
        stops = sorted({s for s in SNAPSHOTS if s < k} | {k}) if k == longest[lr, scratch] else [k]
        for stop in stops:
            trainer.run(stop - trainer.done)
            acc, loss = evaluate(model, data, "val", device=common.DEVICE)
            acc_half, loss_half = evaluate(model, halves, "val", device=common.DEVICE)
            out[name if stop == k else f"{name}@{stop}"] = {"val_acc": acc, "val_loss": loss, "val10_acc": acc_half,
                                                            "val10_loss": loss_half, "seconds": time.time() - start}
    return out


PROXIES = ("params", "naswot", "naswot_init", "synflow")


def proxies(base, space, profile: dict, data, seed: int) -> dict:
    """Scores of the profile's pruned model that need no training, each {"score": higher = predicted better,
    "seconds": its own cost}, one per name in PROXIES:

    * `params`: its parameter count;
    * `naswot`, `naswot_init`: NASWOT (Mellor et al., "Neural Architecture Search without Training", ICML 2021; the
      authors' BayesWatch/nas-without-training, score `hook_logdet`): log|det K| over one training batch of 128,
      K = sum over ReLUs of c c^T + (1 - c)(1 - c)^T, c each image's binary code (input > 0) at that ReLU. The paper
      scores untrained networks (`naswot_init`: the architecture re-initialised
      (`widthsearch.zero_cost.reinitialise`), BN on batch statistics, as there); `naswot` scores the pruned weights
      after adaptive BN, since a trial's model is not untrained (a deviation, recorded beside the paper's setting);
    * `synflow`: synaptic flow of the re-initialised architecture (`widthsearch.zero_cost.synflow`, which names its
      sources and deviations).
    """
    import torch

    device = common.DEVICE
    out = {}

    def timed(name, fn):
        start = time.time()
        out[name] = {"score": float(fn()), "seconds": time.time() - start}

    timed("params", lambda: sum(t.numel() for t in pruned(base, space, profile).parameters()))
    x = next(iter(data.batches("train", 128, shuffle=True, augment=False, seed=seed, device=device)))[0]

    def naswot(fresh: bool) -> float:
        model = pruned(base, space, profile).to(device)
        if fresh:
            reinitialise(model, seed).train()
        else:
            recalibrate_bn(model, data, num_batches=BN_BATCHES, seed=seed, device=device).eval()
        kernel = torch.zeros(len(x), len(x), dtype=torch.float64, device=device)

        def hook(module, inputs, output):
            codes = (inputs[0].detach().flatten(1) > 0).double()  # inplace ReLU: relu(x) > 0 exactly where x > 0
            kernel.add_(codes @ codes.T + (1 - codes) @ (1 - codes).T)

        handles = [m.register_forward_hook(hook) for m in model.modules()
                   if isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6))]
        with torch.no_grad():
            model(x)
        for handle in handles:
            handle.remove()
        return torch.linalg.slogdet(kernel)[1].item()

    timed("naswot", lambda: naswot(fresh=False))
    timed("naswot_init", lambda: naswot(fresh=True))
    timed("synflow", lambda: synflow(pruned(base, space, profile).to(device), x.shape[1:], seed))
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """'1/2' -> (1, 2): the second of two processes; a ValueError naming `text` unless 0 <= I < N."""
    try:
        shard, shards = (int(part) for part in text.split("/"))
    except ValueError:
        shard, shards = -1, 0
    if not 0 <= shard < shards:
        raise ValueError(f"shard {text!r}: expected I/N with 0 <= I < N, like 0/2")
    return shard, shards


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
    parser.add_argument("--budget", type=float, help="the one-budget study at this FLOPs ratio (see above)")
    parser.add_argument("--random", type=int, default=10, help="random profiles of the one-budget study")
    parser.add_argument("--retrain-seeds", nargs="+", type=int, default=[0, 1], help="one-budget study's retrains")
    parser.add_argument("--recipe",
                        help=f"one-budget study's retrain, EPOCHSxLR (default {QUALITY_RECIPE}, the quality table's)")
    parser.add_argument("--shard", default="0/1", type=parse_shard,
                        help="I/N: only the profiles whose index is I modulo N (N processes side by side, started "
                             "together: an index is the profile's place in the list the quality cells on disk make)")
    parser.add_argument("--limit", type=int, help="stop after this many new profiles")
    parser.add_argument("--fill", action="store_true", help="only add the score variants finished profiles lack")
    parser.add_argument("--quick", action="store_true", help="3 profiles, k in 0/25, a 1-epoch retrain (smoke test)")
    args = parser.parse_args()
    if args.recipe and args.budget is None:
        parser.error("--recipe is the one-budget study's (--budget); the earlier study retrains with 20x0.05")
    epochs, lr = parse_recipe(args.recipe or QUALITY_RECIPE) if args.budget is not None else (RETRAIN_EPOCHS, RETRAIN_LR)
    if args.quick:
        epochs = 1
    set_threads(args.threads)
    device = common.use_device(args.device)
    ckpt, info, data, base, space, cost = bench_base(args.model, args.data)
    folder = RESULTS / ("fidelity-quick" if args.quick else "fidelity") / info["base_id"]  # one folder per base
    if args.budget is not None:
        folder = folder / recipe_name(epochs, lr)  # and per recipe: ground truths of two recipes do not mix
    folder.mkdir(parents=True, exist_ok=True)
    if args.budget is None:
        todo, order, seeds, study = profiles(base, space, cost, args.quick), interleaved, [0], "mixed"
    else:
        todo = budget_profiles(base, space, cost, args.budget, 2 if args.quick else args.random, args.model,
                               info["base_id"])
        order, seeds, study = lambda items: list(enumerate(items)), args.retrain_seeds, f"b{args.budget}"
    print(f"base {args.model}: val {info['val_acc']:.4f}, test {info['test_acc']:.4f}; {len(todo)} profiles", flush=True)
    done = 0
    shard, shards = args.shard
    for i, p in order(todo):
        if i % shards != shard:
            continue
        path = folder / f"{args.model}-{profile_key(p['widths'], p.get('keep'))}.json"
        if path.is_file():
            check_same_base(json.loads(path.read_text()), info, path)
        if path.is_file() and args.fill:
            cell = json.loads(path.read_text())
            missing = [name for name, *_ in variants() if name not in cell["scores"]]
            if missing:
                cell["scores"].update(score_variants(base, space, p, data, seed=cell["index"],
                                                     skip=set(cell["scores"])))
            if args.budget is not None and set(cell.get("proxies", {})) != set(PROXIES):  # missing, or of an older set
                cell["proxies"] = proxies(base, space, p, data, seed=cell["index"])
                missing.append("proxies")
            if missing:
                path.write_text(json.dumps(cell, indent=1))
                print(f"{cell['index']}: added {', '.join(missing)}", flush=True)
            continue
        if path.is_file() or args.fill:
            continue
        if args.limit is not None and done >= args.limit:
            break
        scores = score_variants(base, space, p, data, seed=i, ks=(0, 25) if args.quick else KS,
                                high_lr_ks=(25,) if args.quick else HIGH_LR_KS,
                                scratch_ks=(25,) if args.quick else SCRATCH_KS)
        retrains = [retrain_cell(ckpt.stem, pruned(base, space, p), data, seed=r, epochs=epochs, lr=lr,
                                 label=f"fidelity {p['source']} {p['target']}")
                    for r in seeds]
        accs = [r["test_acc"] for r in retrains]
        cell = {**p, "study": study, "index": i, "model": args.model, "base": ckpt.stem, "base_info": info,
                "flops_ratio": cost.flops_ratio(space.from_vector(p["widths"])), "scores": scores,
                "proxies": proxies(base, space, p, data, seed=i) if args.budget is not None else {},
                "retrain_key": retrains[0]["key"], "retrain_epochs": retrains[0]["epochs"], "retrain_lr": lr,
                "retrain_s": sum(r["train_s"] for r in retrains) / len(retrains),
                "retrain_seeds": seeds, "test_accs": accs, "test_acc": sum(accs) / len(accs),
                "retrain_val_acc": sum(r["val_acc"] for r in retrains) / len(retrains),
                "threads": args.threads, "device": device, "loadavg_1m": machine_load(), "date": time.strftime("%Y-%m-%d")}
        path.write_text(json.dumps(cell, indent=1))
        done += 1
        print(f"{i}: {p['source']} {p['target']} flops {cell['flops_ratio']:.3f} k0 {scores['k0']['val_acc']:.4f} "
              f"-> test {cell['test_acc']:.4f} (retrain {cell['retrain_s']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
