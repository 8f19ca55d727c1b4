"""The decisive benchmark: every method at the same budget and the same retrain, per-image test results.

Cells: base x method x budget x seed, one JSON each in bench/results/quality/BASE_ID/RECIPE/ (BASE_ID: the digest
of the base's checkpoint, bench/common.py base_id; RECIPE: the retrain recipe, EPOCHSxLR; cells of two bases or two
recipes do not pair; the first table's cells, of bases no checkout has any more, lie directly in quality/).
Resumable: a finished cell is skipped, a cell asked for more retrain seeds than it holds gets them (with its own
recipe: a cell is never extended with another); commit cells as they land.

Methods that do not search: `uniform` (the largest uniform keep ratio within the budget, L1 channels),
widthsearch's `global` (one global L1 ranking, its candidates scored on val), and torch-pruning's own
global pruner (`MetaPruner`, `global_pruning=True`, stepped until its FLOPs count is within the budget) with
`tp-l1`, `tp-taylor` and `tp-bnscale`. Searchers: `optuna`, `gradient`, `aofp`, `metapruning` and the
`random` control, each a real widthsearch search (Ray Tune trials) on the bench base, validation split only,
in two rows: METHOD (the options widthsearch had as defaults before the FLOPs-0.1 benchmark, DEFAULTS_BEFORE)
and METHOD-tuned (TUNED: the options chosen on the validation split, now the defaults). Every search of a
row gets the same trial count on every base (SEARCH); its trial CPU-seconds are recorded next to the base's
training CPU-seconds. `uniform-fill` and `optuna-fill` (FILLED): rows uniform and optuna-widthexp (optuna's
defaults) with `--fill-budget`, every profile widened into what rounding to whole channels left of the budget.

A cell's `seed` is its search seed (the pruning seed for the methods that do not search, whose profile does
not depend on it: they run seed 0 only); the chosen profile (the row `Search.best` picks, pruned as
`widthsearch retrain` prunes it) is retrained once per retrain seed with the recipe (bench/common.py
`retrain_cell`, SGD cosine from the pruned weights; `--recipe`, by default QUALITY_RECIPE: 40 epochs at lr 0.05,
chosen for its seed noise, see bench/common.py) and evaluated on the test split image
by image (`test_correct`, one hex mask per retrain seed, for paired statistics). Searches are kept in
bench/cache/searches/MODEL/BASE_ID/ (git-ignored), so more retrain seeds never rerun a search.

    python -m bench.quality [--model cifar_resnet20] [--methods ...] [--budgets 0.1] [--seeds 0 1 2]
                            [--retrain-seeds 0 1 2] [--recipe 40x0.05] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import time
from pathlib import Path

import torch
import torch_pruning as tp

from bench import common
from bench.common import (CACHE, DEFAULT_DATA, QUALITY_RECIPE, RESULTS, SPLIT_SEED, VAL_FRACTION, bench_base,
                          cell_recipe, check_same_base, machine_load, parse_recipe, recipe_name, retrain_cell)
from widthsearch import Search, SearchConfig, load_search, prune
from widthsearch.export import measure_latency
from widthsearch.models import classifier_of
from widthsearch.results import load_metadata, ranked
from widthsearch.storage import filesystem
from widthsearch.training import set_threads

PEERS = {"tp-l1": lambda: tp.importance.MagnitudeImportance(p=1),
         "tp-taylor": lambda: tp.importance.TaylorImportance(),
         "tp-bnscale": lambda: tp.importance.BNScaleImportance()}
NON_SEARCH = ("uniform", "global", *PEERS)           # methods that do not search
SEARCHERS = ("optuna", "gradient", "aofp", "metapruning", "random")
# Candidate options measured against the METHOD rows before any of them becomes a default: row -> (searcher,
# searcher options over the METHOD row's). "optuna-spread3": keep ratios sampled log-uniformly within a factor 3;
# "optuna-floor8": within a factor 8, no group narrower than 8 channels or its uniform width where that is fewer.
# "optuna-startup7": 7 trials before TPE models the results (the 3 warm starts + 4 random) instead of 4 (the warm
# starts + 1 random), at the default spread 3. "optuna-widthexp": two more warm starts, keep ratios proportional to
# full width^-0.5 and ^-1 (as many channels in every group). "gradient-scaled": gradient's code after 2026-12-06 (a
# gate profile above the budget scaled onto it as a whole; lam found by a secant search), default options, measured at
# commit 38cb037; "gradient-ranked": the same with the channels ordered by their gate logits (after 38cb037 they were
# ordered by float32 probabilities that tie at 1, so the lowest-numbered channels were kept). "optuna-synflow": the
# optuna-widthexp row with 3 more warm starts, the best by synflow of 32 random proposals (synflow ranked the 24
# profiles of bench/fidelity.py at FLOPs 0.1 at Spearman 0.55 against 0.27 for the 50-step trial score).
VARIANTS: dict[str, tuple[str, dict]] = {"optuna-spread3": ("optuna", {"spread": 3.0}),
                                         "optuna-floor8": ("optuna", {"spread": 8.0, "min_channels": 8}),
                                         "optuna-startup7": ("optuna", {"spread": 3.0, "startup_trials": 7}),
                                         "optuna-widthexp": ("optuna", {"spread": 3.0, "width_exponents": [0.5, 1.0]}),
                                         "optuna-synflow": ("optuna", {"spread": 3.0, "width_exponents": [0.5, 1.0],
                                                                       "synflow_warm_starts": 3}),
                                         "gradient-scaled": ("gradient", {}),
                                         "gradient-ranked": ("gradient", {})}
# The row that measures each searcher as users get it today (its searcher's current defaults; a test keeps this
# true): optuna's synflow warm starts became the default after the optuna-synflow row (2026-12-08).
DEFAULT_ROWS = {"optuna": "optuna-synflow"}
# Rows with the budget fill (SearchConfig.fill_budget, off by default: uniform-fill on cifar_resnet20 retrained within
# 0.2 points of uniform at 0.05 and 0.1, 2026-12-07): METHOD-fill is row METHOD with every profile widened into what
# rounding to whole channels left of the budget.
FILLED = {"uniform-fill": "uniform", "optuna-fill": "optuna-widthexp"}
PLAIN = (*NON_SEARCH, *(m for m, row in FILLED.items() if row in NON_SEARCH))  # every row that does not search
METHODS = (*NON_SEARCH, *SEARCHERS, *(f"{s}-tuned" for s in SEARCHERS), *VARIANTS, *FILLED)
TOP = 6  # the best distinct rows of a search kept in its cell (the choice study retrains them)

# Trial settings every search of the bench shares (SearchConfig fields): one trial at a time on one core, so
# that two bench jobs share this 2-core machine (compute is counted in trial CPU-seconds, which concurrency
# does not change; sequential trials also make a search's order, and so its result, independent of timing).
COMMON = dict(concurrency=1, cpus_per_trial=1, seed=0)
# widthsearch's defaults before the FLOPs-0.1 benchmark (the "METHOD" rows), pinned so the rows keep their meaning.
DEFAULTS_BEFORE = dict(finetune_steps=50, finetune_lr=0.01, bn_batches=20, score="val_acc", asha=False,
                       rescore_top=0)
# ... and each searcher's options that changed since (optuna's spread became 3 after the optuna-spread3 row, its
# width_exponents 0.5 and 1 after the optuna-widthexp row, its synflow_warm_starts 3 after the optuna-synflow row;
# every variant row pins what it does not set).
OPTIONS_BEFORE = {"optuna": {"spread": None, "width_exponents": None, "synflow_warm_starts": 0}}
# The trials each searcher gets with its default options, the same on every base (so the compute follows the
# base's size): about 10% of the base's training compute where the default options allow it (16 scoring trials
# of 50 steps; 3 gradient trials of 100 gate steps); aofp (one round of 2 x 250 batches costs about 30%) and
# metapruning (2,000 PruningNet steps) cannot be made that cheap with their defaults: they run their smallest
# search (one aofp round, one PruningNet) and their cost is reported.
SEARCH = {
    "global": dict(num_samples=3),
    "optuna": dict(num_samples=16),
    "random": dict(num_samples=16),
    "gradient": dict(num_samples=3),
    "aofp": dict(num_samples=7),
    "metapruning": dict(num_samples=33),
}
# Options chosen on the validation split (the "-tuned" rows; see bench/RESULTS.md): a cheaper trial score with
# more room for a re-scoring stage that decides among the best profiles on a longer fine-tune (the earlier
# fidelity study ranked best at 200 steps; at FLOPs 0.1 the 50-step score chose 2.2 points below the best of
# its six best rows), within ~10% of the base's training compute.
TUNED: dict[str, dict] = {
    "optuna": dict(num_samples=20, finetune_steps=25, rescore_top=3, rescore_steps=200),
    "random": dict(num_samples=20, finetune_steps=25, rescore_top=3, rescore_steps=200),
    # gates learnt in 30 steps (of 100), 5 bisection trials; the best 2 re-scored
    "gradient": dict(num_samples=5, finetune_steps=25, rescore_top=2, rescore_steps=200,
                     searcher_options={"steps": 30}),
    # a PruningNet trained 300 steps on widths around the budget, then 4 x 8 candidates
    "metapruning": dict(num_samples=33, rescore_top=2, rescore_steps=200,
                        searcher_options={"train_steps": 300, "train_flops_min": 0.03, "train_flops_max": 0.3,
                                          "population": 8, "generations": 4}),
    # decisions on 2 x 10 batches, epsilon relaxed as needed (the default); at most 10 rounds
    "aofp": dict(num_samples=31, finetune_steps=50, searcher_options={"window": 10}),
}


def method_config(method: str) -> dict:
    """SearchConfig fields of a method's searches: its searcher, trials and options."""
    if method in FILLED:
        return {**method_config(FILLED[method]), "fill_budget": True}
    searcher, variant = VARIANTS.get(method, (method.removesuffix("-tuned"), {}))
    options = {**COMMON, **DEFAULTS_BEFORE, **SEARCH.get(searcher, {})}
    if method.endswith("-tuned"):
        options.update(TUNED.get(searcher, {}))
    searcher_options = {**OPTIONS_BEFORE.get(searcher, {}), **options.get("searcher_options", {}), **variant}
    if searcher_options:
        options["searcher_options"] = searcher_options
    return {"searcher": searcher, **options}


def peer_prune(model: torch.nn.Module, data, budget: float, importance: str, seed: int) -> torch.nn.Module:
    """torch-pruning's global pruner, one small step at a time until torch-pruning counts the FLOPs within budget."""
    model = copy.deepcopy(model)
    example = data.example_input
    base = tp.utils.count_ops_and_params(model, example)[0]
    pruner = tp.pruner.MetaPruner(model, example, importance=PEERS[importance](), global_pruning=True,
                                  pruning_ratio=0.99, iterative_steps=1000,
                                  ignored_layers=[model.get_submodule(classifier_of(model))])
    batches = data.stream("train", 128, seed=seed, augment=False)  # CPU: torch-pruning steps are not the cost
    for _ in range(1000):
        if importance == "tp-taylor":
            x, y = next(batches)
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        pruner.step()
        if tp.utils.count_ops_and_params(model, example)[0] <= budget * base:
            break
    model.zero_grad()
    return model


def trial_compute(rows: list[dict], cpus_per_trial: float) -> dict:
    """A search's trial count and trial CPU-seconds (measured, else wall x CPUs per trial)."""
    return {"trials": len(rows),
            "trial_cpu_s": sum(r.get("cpu_s") or (r["wall_s"] or 0.0) * cpus_per_trial for r in rows),
            "trial_wall_s": sum(r["wall_s"] or 0.0 for r in rows),
            "cpu_measured": all(r.get("cpu_s") is not None for r in rows)}


def failed_search_cost(args, method: str, budget: float, seed: int) -> dict:
    """What a search that ended without a row within the budget spent and how close it came (for its failed
    cell): its trials and trial CPU-seconds, the smallest cost ratio among its rows; {} where it never started."""
    storage, name = search_dir(args, method, budget, seed)
    exp = Path(storage, name)
    if not _started(exp):
        return {}
    cost_path = _cost_path(storage, name)
    cost = json.loads(cost_path.read_text()) if cost_path.is_file() else {}
    rows = load_search(str(exp)).results().to_pylist()
    ratios = [r["cost_ratio"] for r in rows if r.get("cost_ratio") is not None]
    return {**cost, **trial_compute(rows, method_config(method)["cpus_per_trial"]),
            "smallest_ratio": min(ratios) if ratios else None}


def cell_folder(base_id: str, recipe: str, quick: bool = False) -> Path:
    """Where the quality cells of one base and one retrain recipe lie: bench/results/quality/BASE_ID/RECIPE/."""
    return RESULTS / ("quality-quick" if quick else "quality") / base_id / recipe


def cells_of_base(base_id: str, pattern: str, results: Path | None = None) -> list[Path]:
    """The quality cells of a base whose file names match `pattern`, in every recipe's folder (a search is the
    same whatever recipe retrains its profile), under `results` (default: the bench's RESULTS)."""
    return sorted(((results or RESULTS) / "quality" / base_id).glob(f"*/{pattern}"))


def check_same_recipe(cell: dict, epochs: int, lr: float, path: Path) -> None:
    """Refuse to extend a cell (`path`, its JSON `cell`) retrained with another recipe: its seeds would not pair."""
    old = cell_recipe(cell)
    if "error" not in cell and old != (epochs, lr):
        raise SystemExit(f"{path} was retrained with {recipe_name(*old)}, not {recipe_name(epochs, lr)}: a cell is "
                         "never extended with another recipe (each recipe has its own folder)")


def search_dir(args, method: str, budget: float, seed: int) -> tuple[str, str]:
    """(storage, name) of a cell's search, kept in bench/cache/searches/MODEL/BASE_ID/."""
    return str(CACHE / "searches" / args.model / args.base_id), f"{method}-b{budget}-s{seed}"


def _cost_path(storage: str, name: str) -> Path:
    """Where a finished search's wall time, driver CPU and load are kept, beside its experiment."""
    return Path(storage, f"{name}.json")


def _started(exp: str | Path) -> bool:
    """Whether a search's experiment exists (so it can be loaded or resumed)."""
    return Path(exp, "widthsearch", "experiment.json").is_file()


def search_cell(method: str, budget: float, seed: int, args, ckpt: Path, base, space) -> tuple[torch.nn.Module, dict]:
    """Run (or reuse, or resume) one widthsearch search; the pruned model of its chosen row and what it cost."""
    options = method_config(method)
    if common.DEVICE.startswith("cuda"):  # same trials and fidelities; only more of them at once on one GPU
        options.update(concurrency=args.concurrency, gpus_per_trial=1 / args.concurrency)
    storage, name = search_dir(args, method, budget, seed)
    options["seed"] = seed
    cfg = SearchConfig(name=name, storage=storage, model=args.model, checkpoint=str(ckpt), data=args.data,
                       val_fraction=VAL_FRACTION, split_seed=SPLIT_SEED, budget=budget, **options)
    exp = f"{cfg.resolved().storage}/{name}"
    info_path = _cost_path(storage, name)
    if info_path.is_file():
        cost = json.loads(info_path.read_text())
    else:
        resume = _started(exp)
        start, cpu = time.time(), time.process_time()
        (load_search(exp) if resume else Search(cfg)).fit(progress=False)
        cost = {"search_s": time.time() - start, "driver_cpu_s": time.process_time() - cpu,
                "resumed": resume, "loadavg_1m": machine_load()}
        info_path.write_text(json.dumps(cost))
    run = load_search(exp)
    table = run.results()
    rows = table.to_pylist()
    row = run.best(budget)
    model = pruned_from_row(row, base, space, cfg.criterion)
    main = top_rows(table, budget)
    info = {**cost, **trial_compute(rows, cfg.cpus_per_trial),
            "val_score": row["score"], "val_finetune_steps": row["steps_reached"], "trial_id": row["trial_id"],
            "search_config": load_metadata(exp)["config"], "options": method_config(method),
            "top_rows": main,
            "rescored": [{k: r[k] for k in KEYS} for r in rows if r["run"] == "rescore"],
            "phase_s": _phase_totals(rows)}
    return model, info


KEYS = ("trial_id", "widths", "score", "val_acc", "val_loss", "steps_reached", "cost_ratio", "payload", "run")


def top_rows(table, budget: float) -> list[dict]:
    """The search's own TOP best distinct rows within the budget (ranked before any re-scoring), their KEYS."""
    import pyarrow.compute as pc

    own = table.filter(pc.equal(pc.fill_null(table["run"], "search"), "search"))
    return [{k: r[k] for k in KEYS} for r in ranked(own, budget)[:TOP]]


def _phase_totals(rows: list[dict]) -> dict:
    """Seconds per trial phase, summed over the search's trials (where its trials report them)."""
    out: dict[str, float] = {}
    for r in rows:
        for key, value in (r.get("phase_s") or []):
            out[key] = out.get(key, 0.0) + value
    return out


def pruned_from_row(row: dict, base, space, criterion: str) -> torch.nn.Module:
    """The chosen row's pruned model, as `widthsearch retrain` builds it: its own channels (and weights) when the
    searcher chose them, else the criterion on the base weights."""
    payload = json.loads(row["payload"]) if row.get("payload") else {}
    if isinstance(payload, dict) and "keep" in payload:
        model = copy.deepcopy(base)
        if row.get("checkpoint"):
            fs, path = filesystem(row["checkpoint"])
            with fs.open_input_stream(path) as f:
                state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state))
        return prune(model, space, keep=payload["keep"])
    return prune(base, space, space.from_vector(row["widths"]), criterion)


def group_widths(model: torch.nn.Module, space) -> list[int]:
    """The width of every group of `space` in a pruned copy of its model (its root layer's output channels)."""
    out = []
    for g in space.groups:
        layer = model.get_submodule(g.name)
        out.append(int(getattr(layer, "out_channels", getattr(layer, "out_features", 0))))
    return out


def prune_cell(method: str, budget: float, seed: int, args, ckpt: Path, base, space, cost, data) -> tuple:
    """The pruned model of a cell and what finding it cost."""
    start, cpu = time.time(), time.process_time()
    extra: dict = {}
    if method in ("uniform", "uniform-fill"):
        from searchers import make_searcher

        widths = make_searcher("uniform", space, cost, budget=budget,
                               fill_budget=method in FILLED).suggest("u")["widths"]
        model = prune(base, space, space.from_vector(widths), "l1")
    elif method in PEERS:
        model = peer_prune(base, data, budget, method, seed)
    else:
        model, extra = search_cell(method, budget, seed, args, ckpt, base, space)
    return model, {"prune_or_search_s": time.time() - start, "prune_cpu_s": time.process_time() - cpu, **extra}


def run_cell(method: str, budget: float, seed: int, retrain_seeds: list[int], args, ckpt: Path, info: dict,
             base, space, cost, data, old: dict | None) -> dict:
    """A cell: the method's pruned model at `budget`, retrained once per retrain seed (earlier retrains kept)."""
    model, found = prune_cell(method, budget, seed, args, ckpt, base, space, cost, data)
    if old is not None:  # keep what the first run measured (its search cost and latency)
        found = {**found, **{k: old[k] for k in found if k in old}}
        latency = {"batch1_ms": old["batch1_ms"], "batch64_ms": old["batch64_ms"]}
    else:
        latency = measure_latency(copy.deepcopy(model), data.example_input)
    flops, params = tp.utils.count_ops_and_params(model, data.example_input)
    retrains = []
    for r in retrain_seeds:
        cell = retrain_cell(ckpt.stem, copy.deepcopy(model), data, seed=r, epochs=args.retrain_epochs,
                            lr=args.retrain_lr, label=f"quality {method} {budget} s{seed} r{r}")
        retrains.append({k: cell[k] for k in ("seed", "key", "test_acc", "val_acc", "test_correct", "train_s",
                                              "loadavg_1m", "date")})
    accs = [r["test_acc"] for r in retrains]
    return {"method": method, "budget": budget, "seed": seed, "model": args.model, "base": ckpt.stem,
            "base_info": info, "flops_ratio": flops / cost.base_flops, "params": params,
            "group_widths": group_widths(model, space),
            "conv_widths": [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)],
            **found, "retrain_epochs": args.retrain_epochs, "retrain_lr": args.retrain_lr,
            "retrains": retrains, "retrain_seeds": [r["seed"] for r in retrains],
            "test_acc": sum(accs) / len(accs), "test_correct": [r["test_correct"] for r in retrains],
            "retrain_s": sum(r["train_s"] for r in retrains) / len(retrains), **latency,
            "threads": torch.get_num_threads(), "loadavg_1m": machine_load(), "device": common.device_name(),
            "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="search seeds (methods that do not search: seed 0 only)")
    parser.add_argument("--retrain-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--recipe", default=QUALITY_RECIPE, metavar="EPOCHSxLR",
                        help="the retrain of every chosen profile (cells of each recipe in their own folder)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: bases, retrains and search trials")
    parser.add_argument("--concurrency", type=int, default=4, help="trials at once on one GPU (--device cuda)")
    parser.add_argument("--quick", action="store_true", help="uniform and tp-l1 at 0.5, one seed, 1-epoch retrain")
    args = parser.parse_args()
    try:  # a malformed recipe fails before the base loads
        args.retrain_epochs, args.retrain_lr = parse_recipe(args.recipe)
    except ValueError as exc:
        parser.error(f"--recipe: {exc}")
    if args.quick:
        args.methods, args.budgets, args.seeds, args.retrain_seeds = ["uniform", "tp-l1"], [0.5], [0], [0]
        args.retrain_epochs = 1
        args.recipe = recipe_name(args.retrain_epochs, args.retrain_lr)
    set_threads(args.threads)
    common.use_device(args.device)
    ckpt, info, data, base, space, cost = bench_base(args.model, args.data)
    # one folder per base (bench/common.py base_id) and recipe: cells of two bases or recipes do not pair; the first
    # table's cells, of a base no checkout has any more, are the ones directly in quality/
    folder = cell_folder(info["base_id"], args.recipe, args.quick)
    folder.mkdir(parents=True, exist_ok=True)
    args.base_id = info["base_id"]
    (CACHE / "searches" / args.model / args.base_id).mkdir(parents=True, exist_ok=True)
    print(f"base {args.model}: val {info['val_acc']:.4f}, test {info['test_acc']:.4f}", flush=True)
    for budget in args.budgets:
        for seed in args.seeds:
            for method in args.methods:
                if method in PLAIN and seed != 0:  # their profile does not depend on the seed
                    continue
                path = folder / f"{args.model}-{method}-b{budget}-s{seed}.json"
                old = json.loads(path.read_text()) if path.is_file() else None
                if old is not None:
                    check_same_base(old, info, path)
                    check_same_recipe(old, args.retrain_epochs, args.retrain_lr, path)
                if old is not None and ("error" in old or set(args.retrain_seeds) <= set(old.get("retrain_seeds", []))):
                    continue
                seeds = sorted(set(args.retrain_seeds) | set(old.get("retrain_seeds", []) if old else []))
                try:
                    cell = run_cell(method, budget, seed, seeds, args, ckpt, info, base, space, cost, data, old)
                except Exception as exc:  # a failed cell is recorded, not fatal: the table lists it
                    cell = {"method": method, "budget": budget, "seed": seed, "model": args.model,
                            "error": f"{type(exc).__name__}: {exc}", "date": time.strftime("%Y-%m-%d"),
                            "base_info": info}
                    if method not in PLAIN:
                        cell.update(failed_search_cost(args, method, budget, seed))
                path.write_text(json.dumps(cell, indent=1))
                print(f"{method} {budget} s{seed}: " + (cell.get("error") or
                      f"test {cell['test_acc']:.4f} over {len(cell['retrains'])} retrain(s), "
                      f"flops {cell['flops_ratio']:.3f}"), flush=True)


if __name__ == "__main__":
    main()
