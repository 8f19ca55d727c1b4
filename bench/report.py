"""Turn bench/results/*.json into bench/RESULTS.md and PNG plots (accuracy vs FLOPs, profiles, fidelity).

    python -m bench.report [--results bench/results] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from bench.common import RESULTS
from widthsearch.report import pyplot


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _load_note(data: dict) -> str:
    """What the machine's load was when a run ended (timings under load are not comparable)."""
    load = data.get("loadavg_1m")
    return "" if load is None else f" Load average at the end of the run: {load:.1f} (2 cores)."


QUALITY_MODELS = ("cifar_resnet20", "cifar_resnet56", "cifar_vgg16")
HEADROOM = (0.1, 0.05)      # the budgets where widths matter (plus each base's own, PLAN below)
NO_HEADROOM = (0.3, 0.5)    # the earlier budgets, kept as the "no headroom" rows
QUALITY_SEEDS = (0, 1, 2)
# The cells the benchmark plans (bench/quality.py): per base, its budgets; every method at seed 0, the searchers
# at seeds 0-2; each with retrain seeds 0-2 (the headline cells at FLOPs 0.1: more, see the section text).
# cifar_resnet56 at 0.02: its base (test 0.675) loses nothing under uniform pruning to 0.1 with the 40-epoch retrain
# and 2.2 points at 0.05 (two retrain seeds), 13 at 0.02 (five), 2026-12-07.
PLAN = {"cifar_resnet20": (0.1, 0.05), "cifar_resnet56": (0.1, 0.05, 0.02), "cifar_vgg16": (0.1, 0.05, 0.02)}
IMAGES = 1017


def _cells(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _retrain_masks(cell: dict) -> dict:
    """retrain seed -> per-image test correctness (cells of the earlier format: one retrain, seed = the cell's)."""
    from bench.common import unpack_mask

    if isinstance(cell["test_correct"], str):
        return {cell["seed"]: unpack_mask(cell["test_correct"], IMAGES)}
    return {seed: unpack_mask(mask, IMAGES) for seed, mask in zip(cell["retrain_seeds"], cell["test_correct"])}


def _accs(cell: dict) -> list[float]:
    """The cell's test accuracy per retrain seed."""
    return [r["test_acc"] for r in cell["retrains"]] if "retrains" in cell else [cell["test_acc"]]


def _versus(a: list[dict], b: list[dict]):
    """Nested paired difference of method a's cells against method b's (bench/stats.py), or None."""
    from bench.stats import nested_paired_difference

    ref = {}
    for c in b:
        ref.update(_retrain_masks(c))
    if not ref:
        return None
    try:
        return nested_paired_difference({c["seed"]: _retrain_masks(c) for c in a}, ref)
    except ValueError:
        return None


def _ci(d) -> str:
    return "-" if d is None else f"{100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"


def quality_section(folder: Path) -> list[str]:
    """The decisive table from bench/results/quality/*.json: per base and budget (FLOPs 0.1 first), every method's
    test accuracy over search and retrain seeds, its paired difference to uniform and to the best method that
    does not search, with 95% intervals, its compute against the base's, size and latency; the goals; what is
    missing."""
    from bench.quality import DEFAULT_ROWS, FILLED, OPTIONS_BEFORE, PLAIN, SEARCH, TUNED, VARIANTS

    quality = folder / "quality"  # quality/ (the first table), quality/BASE_ID/RECIPE/ (bench/quality.py)
    every = [json.loads(p.read_text()) for p in sorted(quality.rglob("*.json"))] if quality.is_dir() else []
    cells = [c for c in every if "error" not in c]
    failed = [c for c in every if "error" in c]
    lines = ["## The decisive benchmark: searchers vs uniform and torch-pruning (bench/quality.py)", ""]
    if not cells:
        return lines + ["No cell has finished yet.", ""]
    lines += ["Protocol: bases trained once on the bench split (bench/common.py: 4,068 train / 1,017 val images of "
              "cifar10-5k, 80 epochs (cifar_vgg16: 30), SGD lr 0.1 cosine, 1 thread); test = the 1,017 CIFAR-10 test images, used only "
              "here. Every pruned model of a table gets the same retrain (the recipe in its title, EPOCHSxLR: SGD "
              "cosine, batch 128, from the pruned weights), once per retrain seed. Searchers choose on the validation split only. 'seeds' = search "
              "seeds x retrain seeds (methods that do not search: one profile). 'vs uniform' and 'vs best plain' (the "
              "best method that does not search): paired difference on the same test images (every retrain of "
              "both sides, not only the retrain seeds they share), in points, with a 95% three-level bootstrap "
              "interval (search seeds, retrain seeds of both, images). "
              "'worst seed': the search seed that gained least against the best plain method. Compute: the search's "
              "trial CPU-seconds (trial wall x CPUs per trial) as a share of the base's training CPU-seconds, same "
              "machine. Trials: " + ", ".join(f"{m} {o['num_samples']}" for m, o in SEARCH.items())
              + "; METHOD rows use widthsearch's defaults before this benchmark (50 fine-tune steps, no re-scoring)"
              + "".join(f" with {m} options {o}" for m, o in OPTIONS_BEFORE.items()) + "; "
              "METHOD-tuned rows " + (", ".join(f"{m}: {o}" for m, o in TUNED.items()) or "(none yet)") + "; "
              + "; ".join(f"{v}: {s} with options {o}" if o else f"{v}: {s} at its defaults after a change of its code "
                        f"(row {s}: before it; bench/quality.py names each such row's commit)" for v, (s, o) in VARIANTS.items()) + "; "
              + "; ".join(f"{v}: row {m} with --fill-budget" for v, m in FILLED.items()) + "; "
              + "; ".join(f"{s} as users get it today (its current defaults): row {r}" for s, r in DEFAULT_ROWS.items())
              + ". "
              "Latency: CPU, 1 thread, batch 1, median of 20 runs, under the load shown.", ""]
    by = defaultdict(list)
    for c in cells:
        by[(c["model"], c["budget"], _table_key(c), c["method"])].append(c)
    budgets = sorted({c["budget"] for c in cells}, key=lambda b: (b in NO_HEADROOM, b != 0.1, -b))
    bases = sorted({_table_key(c) for c in cells})  # "" (the first table's bases) first, then per base its recipes
    for budget in budgets:
        for model in QUALITY_MODELS:
            for base in bases:
                group = {m: sorted(v, key=lambda c: c["seed"]) for (mo, b, k, m), v in by.items()
                         if (mo, b, k) == (model, budget, base)}
                if group:
                    lines += _quality_table(model, budget, group, PLAIN)
    lines += _missing_cells(cells, failed)
    lines += [_failed_line(c) for c in failed]
    plotted = {m: max(bases, key=lambda k: sum(_table_key(c) == k for c in cells if c["model"] == m))
               for m in QUALITY_MODELS}  # per model the base and recipe with the most cells
    lines += _quality_plots([c for c in cells if _table_key(c) == plotted[c["model"]]], folder)
    return lines


def _base_folders(folder: Path) -> list[Path]:
    """A bench script's folders of one base each (FOLDER/BASE_ID/); the first table's cells lie in FOLDER/."""
    return [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []


def _base_key(cell: dict) -> str:
    """Which base a quality cell was measured on: its base_id, "" for the first table's (which had none)."""
    return (cell.get("base_info") or {}).get("base_id", "")


def _recipe(cell: dict) -> str:
    """The retrain recipe of a quality cell, EPOCHSxLR (cells before the recipe became an option: 20x0.05)."""
    from bench.common import cell_recipe, recipe_name

    return recipe_name(*cell_recipe(cell))


def _table_key(cell: dict) -> tuple[str, str]:
    """The cells that pair, one table each: same base and same retrain recipe."""
    return _base_key(cell), _recipe(cell)


def _quality_table(model: str, budget: float, group: dict, non_search) -> list[str]:
    info = next(iter(group.values()))[0]["base_info"]
    base_cpu = _base_cpu_s(info)

    def mean(m):
        return statistics.fmean(a for c in group[m] for a in _accs(c))

    plain = [m for m in group if m in non_search]
    searched = [m for m in group if m not in non_search]
    best_plain = max(plain, key=mean) if plain else None
    title = (f"### {model} at FLOPs {budget}" + (f", base {info['base_id']} ({info.get('cpu', '-')})"
                                                  if info.get("base_id") else "")
             + f", retrain {_recipe(next(iter(group.values()))[0])}")
    if budget in NO_HEADROOM:
        title += (" (no headroom: every sound profile retrains to within about a point of every other, so no "
                  "search can show a win here)")
    lines = [title, "", f"Base: val {info['val_acc']:.4f}, test {info['test_acc']:.4f}, {info['epochs']} epochs in "
             f"{info['train_s']:.0f} s ({base_cpu:.0f} CPU-s) at load {info['loadavg_1m']:.1f}.", "",
             "| method | seeds | test acc (mean ± std) | per search seed | vs uniform | vs best plain | worst seed | "
             "FLOPs ratio | params | search CPU-s (trials) | % of base | retrain s | CPU b1 ms | load |",
             "|" + "---|" * 14]
    summary = {}
    for method in sorted(group, key=lambda m: (m not in non_search, -mean(m))):
        rows = group[method]
        accs = [a for c in rows for a in _accs(c)]
        acc, std = _mean_std(accs)
        per = ", ".join(f"{statistics.fmean(_accs(c)):.3f}" for c in rows) if method not in non_search else "-"
        vs_u = _versus(rows, group["uniform"]) if method != "uniform" and "uniform" in group else None
        vs_p = _versus(rows, group[best_plain]) if best_plain and method != best_plain else None
        worst = (f"{100 * min(vs_p['per_search_seed'].values()):+.2f}" if vs_p and method not in non_search else "-")
        summary[method] = vs_p
        cpu = statistics.fmean(c.get("trial_cpu_s", 0.0) for c in rows)
        trials = statistics.fmean(c.get("trials", 0) for c in rows)
        lines.append(f"| {method} | {len(rows)} x {len(_accs(rows[0]))} | {acc:.4f} ± {std:.4f} | {per} | {_ci(vs_u)} | "
                     f"{_ci(vs_p)} | {worst} | {statistics.fmean(c['flops_ratio'] for c in rows):.3f} | "
                     f"{statistics.fmean(c['params'] for c in rows):,.0f} | "
                     + (f"{cpu:.0f} ({trials:.0f})" if trials else "-") + " | "
                     + (f"{100 * cpu / base_cpu:.1f}%" if trials else "-") + f" | "
                     f"{statistics.fmean(c['retrain_s'] for c in rows):.0f} | "
                     f"{statistics.fmean(c['batch1_ms'] for c in rows):.2f} | "
                     f"{statistics.fmean(c['loadavg_1m'] for c in rows):.1f} |")
    if "uniform" in group:
        lines += ["", f"Headroom: uniform pruning loses {100 * (info['test_acc'] - mean('uniform')):.1f} points against "
                  "the dense base."]
    if searched and best_plain:
        best = max(searched, key=mean)
        d = summary.get(best)
        if d is not None:
            worst = min(d["per_search_seed"].values())
            cpu = statistics.fmean(c.get("trial_cpu_s", 0.0) for c in group[best]) / base_cpu
            ok = d["diff"] >= 0.03 and d["low"] > 0 and worst >= 0.02 and d["search_seeds"] >= 3 and cpu <= 0.10
            lines += ["", f"Goal (best searcher >= best plain + 3.0 points, interval excluding 0, worst search seed "
                      f">= +2.0, >= 3 search seeds, search <= 10% of the base's compute): best searcher {best}, best "
                      f"plain {best_plain}: {_ci(d)} over {d['search_seeds']} search seed(s) and {d['retrains']} "
                      f"retrains, worst seed {100 * worst:+.2f}, compute {100 * cpu:.1f}%: "
                      + ("met." if ok else "missed.")]
    return lines + [""]


def _base_cpu_s(info: dict) -> float:
    """The base's training CPU-seconds (measured, else its wall time x its threads)."""
    return info.get("cpu_s") or info["train_s"] * info.get("threads", 2)


def _failed_line(cell: dict) -> str:
    """A failed cell: its error, and for a search what it spent (against the base's training) and how close it came."""
    line = f"* failed: {cell['model']} {cell['method']} at {cell['budget']}, seed {cell['seed']}: {cell['error']}"
    if cell.get("trial_cpu_s") is not None:
        base_cpu = _base_cpu_s(cell["base_info"]) if cell.get("base_info") else None
        share = f" = {100 * cell['trial_cpu_s'] / base_cpu:.0f}% of the base's training" if base_cpu else ""
        smallest = cell.get("smallest_ratio")
        line += (f" (search: {cell['trials']} trials, {cell['trial_cpu_s']:,.0f} trial CPU-s{share}; smallest "
                 f"cost ratio reached {'none' if smallest is None else f'{smallest:.3f}'}; "
                 f"load {cell.get('loadavg_1m', float('nan')):.1f})")
    return line


def _missing_cells(cells: list[dict], failed: list[dict]) -> list[str]:
    """Planned cells neither finished nor failed yet, with the time each needs (from finished cells of the same
    method and model, else of the same method on cifar_resnet20 scaled by the bases' training times)."""
    from bench.common import QUALITY_RECIPE, current_base_id
    from bench.quality import NON_SEARCH, SEARCHERS

    current = {model: current_base_id(model) for model in PLAN}  # cells of other bases or recipes cannot be extended
    done = {(c["model"], c["method"], c["budget"], c["seed"]) for c in (*cells, *failed)
            if current.get(c["model"]) and _table_key(c) == (current[c["model"]], QUALITY_RECIPE)}
    cost, base_s = defaultdict(list), {}
    for c in cells:
        cost[(c["model"], c["method"])].append(c.get("prune_or_search_s", 0.0) + c["retrain_s"] * len(_accs(c)))
        base_s[c["model"]] = c["base_info"]["train_s"]
    todo = []
    for model, budgets in PLAN.items():
        for method in (*NON_SEARCH, *SEARCHERS):
            seeds = (0,) if method in NON_SEARCH else QUALITY_SEEDS
            n = sum(1 for b in budgets for s in seeds if (model, method, b, s) not in done)
            if not n:
                continue
            known = cost.get((model, method))
            if not known and cost.get(("cifar_resnet20", method)) and model in base_s and "cifar_resnet20" in base_s:
                known = [x * base_s[model] / base_s["cifar_resnet20"] for x in cost[("cifar_resnet20", method)]]
            todo.append((model, method, n, statistics.fmean(known) if known else None))
    if not todo:
        return ["All planned cells are filled.", ""]
    lines = ["Missing cells on the bases the bench would use now (bench/checkpoints/ or bench/cache/: "
             + "; ".join(f"{m} {current[m] or 'none yet, to be trained'}" for m in PLAN)
             + f"; retrain {QUALITY_RECIPE}; cells of another base or recipe do not pair with them) (budgets "
             + "; ".join(f"{m}: {', '.join(map(str, b))}" for m, b in PLAN.items())
             + "; time per cell from finished cells, 1 thread per cell on this 2-core CPU):", ""]
    lines += [f"* {model} {method}: {n} cell(s)" + (f", ~{each / 60:.0f} min each" if each else ", no estimate yet")
              for model, method, n, each in todo]
    total = sum(n * each for _, _, n, each in todo if each)
    return lines + ["", f"Estimated total for the cells with an estimate: ~{total / 3600:.1f} CPU-hours.", ""]


def _labels(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _quality_plots(cells: list[dict], folder: Path) -> list[str]:
    plt = pyplot()
    models = [m for m in QUALITY_MODELS if any(c["model"] == m for c in cells)]
    fig, axes = plt.subplots(1, len(models), figsize=(6.4 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in sorted({c["method"] for c in cells if c["model"] == model}):
            pts = []
            for budget in sorted({c["budget"] for c in cells}):
                rows = [c for c in cells if (c["model"], c["method"], c["budget"]) == (model, method, budget)]
                if rows:
                    acc, std = _mean_std([a for r in rows for a in _accs(r)])
                    pts.append((statistics.fmean(r["flops_ratio"] for r in rows), acc, std))
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        label=method)
        ax.set_xscale("log")
        _labels(ax, model, "FLOPs / base FLOPs (log)", "test accuracy after the same retrain (mean ± std)")
    _save(plt, fig, folder / "accuracy_vs_flops.png")
    budgets = [b for b in HEADROOM if any(c["budget"] == b and c["model"] == "cifar_resnet20" for c in cells)]
    if budgets:
        fig, axes = plt.subplots(1, len(budgets), figsize=(6.4 * len(budgets), 4.4), squeeze=False)
        for ax, budget in zip(axes[0], budgets):
            for c in cells:
                if c["budget"] == budget and c["seed"] == 0 and c["model"] == "cifar_resnet20":
                    ax.plot(c["conv_widths"], marker=".", label=c["method"])
            _labels(ax, f"cifar_resnet20 at FLOPs {budget}, seed 0", "conv layer (model order)", "output channels kept")
        _save(plt, fig, folder / "profiles.png")
    return ["", f"![accuracy vs FLOPs]({folder.name}/accuracy_vs_flops.png) ![widths found]({folder.name}/profiles.png)",
            ""]


FIDELITY_METRICS = (("val_acc", 1), ("val_loss", -1), ("val10_acc", 1), ("val10_loss", -1))


def fidelity_budget_section(folder: Path, budget: float, base: str = "", recipe: str = "") -> list[str]:
    """The one-budget fidelity study (bench/fidelity.py --budget) on one base (`base`: its base_id, "" for the first
    table's, whose cells lie directly in fidelity/) and ground-truth recipe (`recipe`: its folder under the base's,
    "" for the cells from before the recipe became an option: 20x0.05): every score variant's rank correlation with
    the retrained accuracy (test: the goal; val: what options are chosen on), its cost, and the final choice among
    each quality search's best rows."""
    from bench.stats import rank_correlations, spearman_ceiling

    cells = [c for c in _cells(folder / "fidelity" / base / recipe) if c.get("study") == f"b{budget}"]
    lines = [f"## Does the trial score rank profiles at FLOPs {budget}{f', base {base}' if base else ''}"
             f"{f', retrain {recipe}' if recipe else ''}? (bench/fidelity.py --budget {budget})", ""]
    if base and not cells:
        return []
    if len(cells) < 4:
        return lines + [f"{len(cells)} profile(s) finished; the table needs at least 4.", ""]
    first = cells[0]
    info = first["base_info"]
    sources = defaultdict(int)
    for c in cells:
        sources[c["source"]] += 1
    lines += [f"{len(cells)} profiles of {first['model']} at FLOPs {budget} (" + ", ".join(
              f"{n} {s}" for s, n in sorted(sources.items())) + f"; base val {info['val_acc']:.4f}, test "
              f"{info['test_acc']:.4f}), FLOPs {min(c['flops_ratio'] for c in cells):.3f}-"
              f"{max(c['flops_ratio'] for c in cells):.3f}. Ground truth: accuracy after the bench retrain "
              f"({first['retrain_epochs']} epochs from the pruned weights), mean of retrain seeds "
              f"{', '.join(map(str, first.get('retrain_seeds', [0])))}, on test (the goal) and on val (what options "
              "are chosen on). Score: adaptive BN (20 batches) + k fine-tune steps (kK: lr 0.01, kKlr0.05: lr 0.05, "
              "one cosine schedule over k; scratchKlr0.05: K steps at lr 0.05 from re-initialised weights, no "
              "adaptive BN) on val (1,017 images) or its first half (508, a 10% split); 'k200@25' is the model 25 "
              "steps into the 200-step schedule; '(no training)': scores of the pruned model alone (bench/fidelity.py "
              "proxies). Intervals: 95% bootstrap over profiles. Cost: score seconds / the profile's retrain seconds "
              "(a retrain reused from a quality cell: as timed there).", "",
              "| score variant | Spearman with test (95% CI) | Spearman with retrained val | Kendall with test | cost |",
              "|---|---|---|---|---|"]
    rows = []
    test = [c["test_acc"] for c in cells]
    val = [c["retrain_val_acc"] for c in cells]
    variants = [v for v in first["scores"] if all(v in c["scores"] for c in cells)]
    proxies = [k for k in first.get("proxies", {}) if all(k in c.get("proxies", {}) for c in cells)]

    def add_row(name: str, label: str, score: list[float], cost: float) -> None:
        r, rv = rank_correlations(score, test), rank_correlations(score, val, reps=0)
        rows.append((name, label, r, rv, cost))
        sp, kd = r["spearman"], r["kendall"]
        lines.append(f"| {name} {label} | {sp[0]:.3f} [{sp[1]:.2f}, {sp[2]:.2f}] | {rv['spearman'][0]:.3f} | "
                     f"{kd[0]:.3f} | {cost:.1%} |")

    for variant in variants:
        for metric, sign in FIDELITY_METRICS:
            add_row(variant, metric, [sign * c["scores"][variant][metric] for c in cells],
                    statistics.fmean(c["scores"][variant]["seconds"] / c["retrain_s"] for c in cells))
    for proxy in proxies:  # scores with no training (bench/fidelity.py proxies): higher = predicted better
        add_row(proxy, "(no training)", [c["proxies"][proxy]["score"] for c in cells],
                statistics.fmean(c["proxies"][proxy]["seconds"] / c["retrain_s"] for c in cells))
    good = [r for r in rows if r[2]["spearman"][0] >= 0.8 and r[4] <= 0.10]
    pick = min(good, key=lambda r: r[4]) if good else max(rows, key=lambda r: r[2]["spearman"][0])
    lines += ["", ("Cheapest variant with Spearman >= 0.8 at <= 10% of a retrain: " if good else
                   "No variant reaches Spearman 0.8 at <= 10% of a retrain; the best: ")
              + f"{pick[0]} on {pick[1]} (Spearman {pick[2]['spearman'][0]:.3f}, cost {pick[4]:.1%}).", ""]
    ceiling = spearman_ceiling([c.get("test_accs", []) for c in cells])
    if ceiling is not None:
        lines += [f"What the ground truth allows: with its retrain seeds' noise, a score that knew every profile's true "
                  f"accuracy would reach a Spearman of about {ceiling:.2f} with the mean test accuracy "
                  "(bench/stats.py spearman_ceiling).", ""]
    lines += _headroom_lines(cells)
    skipped = sorted({v for c in cells for v in [*c["scores"], *c.get("proxies", {})]} - {*variants, *proxies})
    if skipped:
        lines += [f"Left out, not measured on every profile yet (bench/fidelity.py --fill adds them): "
                  f"{', '.join(skipped)}.", ""]
    lines += _choice_lines(folder, cells, budget, base, recipe)
    return lines


def _headroom_lines(cells: list[dict]) -> list[str]:
    """How much any profile of the study beats `uniform` by, on the same retrain seeds: the one a perfect score would
    pick on validation (the best retrained val accuracy), and the best on test (an upper bound: chosen on test)."""
    uniform = next((c for c in cells if c["source"] == "uniform"), None)
    if uniform is None:
        return []
    by_val = max(cells, key=lambda c: c["retrain_val_acc"])
    by_test = max(cells, key=lambda c: c["test_acc"])

    def name(c: dict) -> str:
        return c["source"] + (f" s{c['search_seed']} row {c['rank']}" if "rank" in c else "")

    return [f"Room above uniform among these profiles (test, the same retrain seeds; uniform: "
            f"{uniform['test_acc']:.3f}): the profile with the best retrained val accuracy ({name(by_val)}) "
            f"retrains to {by_val['test_acc']:.3f} ({100 * (by_val['test_acc'] - uniform['test_acc']):+.2f} points), "
            f"the best on test ({name(by_test)}; an upper bound, chosen on test) to {by_test['test_acc']:.3f} "
            f"({100 * (by_test['test_acc'] - uniform['test_acc']):+.2f}). A searcher that ranked these profiles "
            "perfectly on validation would gain the first figure.", ""]


def _choice_lines(folder: Path, cells: list[dict], budget: float, base: str = "", recipe: str = "") -> list[str]:
    """Per quality search at `budget`: its six best rows retrained (the fidelity profiles), the one it chose, and
    how far the chosen one is from the best of the six (goal: within 1 point)."""
    from bench.common import profile_key

    by_key = {profile_key(c["widths"], c.get("keep")): c for c in cells}
    lines = []
    from bench.quality import cells_of_base

    # a base's searches, each once though every recipe's folder holds it; the first table's lie in quality/
    pattern = f"*-b{budget}-s*.json"
    paths: dict[str, Path] = {}
    found = cells_of_base(base, pattern, folder) if base else sorted((folder / "quality").glob(pattern))
    for p in sorted(found, key=lambda p: p.parent.name != recipe):  # the ground truth's recipe first, where there
        paths.setdefault(p.name, p)
    for _, path in sorted(paths.items()):
        cell = json.loads(path.read_text())
        tops = []
        for row in cell.get("top_rows", []):
            payload = json.loads(row["payload"]) if row.get("payload") else {}
            keep = payload.get("keep") if isinstance(payload, dict) else None
            tops.append(by_key.get(profile_key(row["widths"], keep)))
        if not tops or any(t is None for t in tops):
            continue
        chosen = by_key.get(profile_key(cell["group_widths"]))  # the same retrain seeds as the six, when there
        chosen_acc = chosen["test_acc"] if chosen else statistics.fmean(_accs(cell))
        best = max(t["test_acc"] for t in tops)
        lines.append(f"| {cell['model']} {cell['method']} s{cell['seed']} | "
                     + ", ".join(f"{t['test_acc']:.3f}" for t in tops)
                     + f" | {chosen_acc:.3f} | {100 * (best - chosen_acc):+.2f} |")
    if not lines:
        return []
    return ["The final choice among a search's six best rows (test accuracy of each after the bench retrain, mean "
            "of the fidelity study's retrain seeds, in the search's ranking order; the chosen profile after the "
            "quality cell's retrains; goal: the chosen one within 1 point of the best of the six):", "",
            "| search | six best rows, in rank order | chosen | best of six - chosen (points) |", "|---|---|---|---|",
            *lines, ""]


def fidelity_section(folder: Path) -> list[str]:
    """Rank correlations of every score variant with retrained test accuracy, from bench/results/fidelity/*.json
    (the earlier study over FLOPs 0.25-0.6)."""
    from bench.stats import rank_correlations

    cells = [c for c in _cells(folder / "fidelity") if c.get("study", "mixed") == "mixed"]
    lines = ["## Does the trial score rank profiles over FLOPs 0.25-0.6? (bench/fidelity.py, the earlier study)", ""]
    if len(cells) < 4:
        return lines + [f"{len(cells)} profile(s) finished; the table needs at least 4.", ""]
    first = cells[0]
    info = first["base_info"]
    lines += [f"{len(cells)} of 30 profiles of {first['model']} (base val {info['val_acc']:.4f}, test "
              f"{info['test_acc']:.4f}; {info['epochs']} epochs in {info['train_s']:.0f} s at load "
              f"{info['loadavg_1m']:.1f}), FLOPs {min(c['flops_ratio'] for c in cells):.2f}-"
              f"{max(c['flops_ratio'] for c in cells):.2f}. Ground truth: test accuracy after the bench retrain "
              f"({first['retrain_epochs']} epochs from the pruned weights). Score: adaptive BN (20 batches) + k "
              "fine-tune steps (lr 0.01, one cosine schedule over k), on val (1,017 images) or its first half (508, "
              "a 10% split); 'k200@25' is the model 25 steps into the 200-step schedule (what promotion sees). "
              "Intervals: 95% bootstrap over profiles. 'at 0.3' / 'at 0.5': only the profiles of that budget "
              "(the ranking a searcher needs). Cost: score seconds / retrain seconds, same process and threads.", "",
              "| score variant | Spearman (95% CI) | Kendall (95% CI) | Spearman at 0.3 | Spearman at 0.5 | cost |",
              "|---|---|---|---|---|---|"]
    rows = []
    truth = [c["test_acc"] for c in cells]
    for variant in first["scores"]:
        for metric, sign in FIDELITY_METRICS:
            score = [sign * c["scores"][variant][metric] for c in cells]
            r = rank_correlations(score, truth)
            focus = {}
            for budget in (0.3, 0.5):
                sub = [(sign * c["scores"][variant][metric], c["test_acc"]) for c in cells
                       if c["target"] == budget]
                focus[budget] = rank_correlations(*zip(*sub))["spearman"] if len(sub) > 3 else (float("nan"),) * 3
            cost = statistics.fmean(c["scores"][variant]["seconds"] / c["retrain_s"] for c in cells)
            rows.append((variant, metric, r, focus, cost))
            sp, kd = r["spearman"], r["kendall"]
            lines.append(f"| {variant} {metric} | {sp[0]:.3f} [{sp[1]:.2f}, {sp[2]:.2f}] | {kd[0]:.3f} [{kd[1]:.2f}, "
                         f"{kd[2]:.2f}] | {focus[0.3][0]:.2f} | {focus[0.5][0]:.2f} | {cost:.1%} |")
    good = [r for r in rows if r[2]["spearman"][0] >= 0.8]
    pick = min(good, key=lambda r: r[4]) if good else max(rows, key=lambda r: r[2]["spearman"][0])
    lines += ["", ("Cheapest variant with Spearman >= 0.8: " if good else "No variant reaches Spearman 0.8; the best: ")
              + f"{pick[0]} on {pick[1]} (Spearman {pick[2]['spearman'][0]:.3f}, cost {pick[4]:.1%} of a retrain).", ""]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for metric, marker in (("val_acc", "o"), ("val_loss", "s")):
        pts = [(r[4], r[2]["spearman"][0], r[0]) for r in rows if r[1] == metric]
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker, label=f"score on {metric}")
        for p in pts:
            ax.annotate(p[2], (100 * p[0], p[1]), fontsize=6)
    ax.axhline(0.8, color="gray", linestyle=":")
    ax.set_xlabel("score cost, % of the retrain")
    ax.set_ylabel("Spearman with retrained test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "fidelity.png", dpi=110)
    plt.close(fig)
    return lines + [f"![fidelity]({folder.name}/fidelity.png)", ""]


def _model_label(cell: dict) -> str:
    """A latency cell's model, with the divisor its widths are multiples of where that is above 1, and whether its
    table has cold timings (widthsearch.latency.COLD)."""
    return (cell["model"] + (f" (divisor {cell['divisor']})" if cell.get("divisor", 1) > 1 else "")
            + (" (cold weights)" if cell.get("cache_bytes") else ""))


def latency_section(folder: Path) -> list[str]:
    """The latency model's error on random profiles (bench/latency.py: one JSON per model, batch and runtime under
    latency/) and latency- vs FLOPs-constrained winners at equal measured latency (bench/latency_search.py)."""
    lines = []
    cells = _cells(folder / "latency")
    if cells:
        lines += ["## Latency model: predicted vs measured (bench/latency.py)", "",
                  "Per cell a fresh table, then random profiles (FLOPs 0.05-0.9) pruned and timed whole, each beside "
                  "the dense model. Error: predicted / measured - 1, of the ms and of the ratio to the dense model "
                  "(what a budget bounds). Goal: >= 95% of profiles within +-10% of the measured ms and a median "
                  "error <= 3%, every model at batch 1 and 64; a table built in <= 60 s on one core. 'drift': the "
                  "dense model's time during the profiles over its time at the table (a loaded machine's speed "
                  "moves every measured ms). 'ms at table speed': each measured ms scaled by the dense model's time in the "
                  "table over its time right beside the profile (the machine's speed when the table was timed). "
                  "'align': the input-channel modulus whose multiples get their own grid (0: none). 'dense repeats "
                  "in 10%': the share of the dense model's own timings (one beside each profile) within 10% of their "
                  "median: how steady the machine measured, a ceiling on what any prediction can reach in 'ms in "
                  "10%'. '(cold weights)': a table whose units were also timed with their weights out of the cache "
                  "and mixed by each profile's weight bytes (widthsearch.latency, COLD).", "",
                  "| model | batch | runtime | clock | align | profiles | table s (CPU s) | ms: in 10% / in 5% / median "
                  "/ max | ms at table speed | dense repeats in 10% | ratio: in 10% / in 5% / median / max | "
                  "FLOPs-proportional ratio median | drift | load | CPU | date |",
                  "|---" * 16 + "|"]

        def part(e: dict) -> str:
            return (f"{e['within_10']:.0%} / {e['within_5']:.0%} / {e['median_abs_rel_err']:.1%} / "
                    f"{e['max_abs_rel_err']:.1%}")

        for c in sorted(cells, key=lambda c: (c["runtime"], c["batch"], c["model"])):
            table_speed = part(c["ms_at_table_speed"]) if "ms_at_table_speed" in c else "-"
            dense = [r["dense_beside_ms"] for r in c["rows"] if "dense_beside_ms" in r]
            mid = statistics.median(dense) if dense else 0.0
            steady = f"{sum(abs(d / mid - 1) <= 0.10 for d in dense) / len(dense):.0%}" if dense else "-"
            lines.append(f"| {_model_label(c)} | {c['batch']} | {c['runtime']} | {c['clock']} | {c.get('align', 0)} | "
                         f"{len(c['rows'])} | {c['table_s']:.0f} ({c['table_cpu_s']:.0f}) | {part(c['ms'])} | "
                         f"{table_speed} | {steady} | {part(c['ratio'])} | {c['flops_ratio']['median_abs_rel_err']:.1%} | "
                         f"{c['drift']:.3f} | {c['loadavg_after'].split()[0]} | {c.get('cpu', '-')} | {c['date']} |")
        lines += ["", f"![latency]({folder.name}/latency/latency.png)", ""]
    lines += composition_lines([c for sub in ("latency", "latency-residuals") for c in _cells(folder / sub)])
    summary = _load(folder / "latency_search", "summary")
    if summary and summary["comparisons"]:
        lines += ["## Latency- vs FLOPs-constrained search (bench/latency_search.py)", "",
                  f"{summary['model']}: per searcher, latency budget and seed, the latency-budget winner against the "
                  "FLOPs front (the same searcher at FLOPs budgets around the uniform-matched one): the front's test "
                  "accuracy interpolated at the latency winner's measured latency ratio, and the front's measured "
                  "ratio interpolated at the latency winner's accuracy ('-': the front does not bracket it). "
                  "'timing': joint = every winner timed again together in one process (bench/latency_search.py "
                  "--retime), own = each at the end of its own cell. Last row: the latency winners minus the front "
                  "at the same latency, paired by seed and test image, 95% interval.", "",
                  "| searcher | latency budget | seed | latency winner: ratio, test acc | FLOPs front (factor: ratio, "
                  "acc) | front acc at same ratio | front ratio at same acc | timing |", "|---" * 8 + "|"]
        for c in summary["comparisons"]:
            for s in c["seeds"]:
                front = ", ".join(f"{k:g}: {r:.3f}, {a:.3f}" for k, r, a in s["flops_front"])
                at_acc = s.get("flops_ratio_at_same_accuracy")
                at_ratio = s["flops_test_acc_at_same_latency"]
                lines.append(f"| {c['searcher']} | {c['latency_budget']:g} | {s['seed']} | "
                             f"{s['latency_measured_ratio']:.3f}, {s['latency_test_acc']:.3f} | {front} | "
                             f"{'-' if at_ratio is None else f'{at_ratio:.3f}'} | "
                             f"{'-' if at_acc is None else f'{at_acc:.3f}'} | {', '.join(s.get('timing', ['own']))} |")
            d = c["latency_minus_flops_at_same_latency"]
            diff = (f"{100 * d['diff']:+.2f} points [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] over "
                    f"{c['paired_seeds']} seed(s)" if d else "no seed where the front brackets the latency winner")
            lines.append(f"| {c['searcher']} | {c['latency_budget']:g} | all | latency minus FLOPs at the same "
                         f"latency: {diff} | | | | |")
        lines += ["", f"![latency search]({folder.name}/latency_search/latency_search.png)", ""]
    return lines


def composition_lines(cells: list[dict]) -> list[str]:
    """Per cell timed with --residuals: each such profile's whole-model time against the sum of its units timed
    alone at its exact widths, beside its weight bytes (whether the composition misses where the weights outgrow
    the caches), and against the units mixed with their cold timings where the table has them."""
    cells = [c for c in cells if c.get("residuals")]
    if not cells:
        return []
    lines = ["Composition (bench/latency.py --residuals): per profile, the whole model's time against the sum of "
             "its units, each timed alone at the profile's exact widths in the same passes (so neither the grid nor "
             "a drift of the machine's speed enters), beside the pruned model's weight bytes ('-': a cell timed "
             "before they were recorded).", "",
             "| model | batch | runtime | FLOPs ratio | weights MiB | units alone ms | whole ms | whole / units | "
             "cold share | units mixed ms | whole / mixed | date |", "|---" * 12 + "|"]
    for c in sorted(cells, key=lambda c: (c["runtime"], c["batch"], c["model"], c["date"])):
        for i, w in zip(c["residuals"]["profiles"], c["residuals"]["whole"]):
            mb = f"{w['weight_mb']:.1f}" if "weight_mb" in w else "-"
            mixed = (f"{w['cold_share']:.2f} | {w['units_mixed_ms']:.3f} | {w['measured_ms'] / w['units_mixed_ms']:.2f}"
                     if "units_mixed_ms" in w else "- | - | -")
            lines.append(f"| {_model_label(c)} | {c['batch']} | {c['runtime']} | {c['rows'][i]['flops_ratio']:.2f} | "
                         f"{mb} | {w['units_exact_ms']:.3f} | {w['measured_ms']:.3f} | "
                         f"{w['measured_ms'] / w['units_exact_ms']:.2f} | {mixed} | {c['date']} |")
    return lines + [""]


def optuna_params_section(folder: Path) -> list[str]:
    """Best and top-3 validation score per Optuna parameterisation (bench/optuna_params.py), with what is missing."""
    from bench.optuna_params import BUDGET, SEARCH, VARIANTS

    cells = _cells(folder / "optuna_params")
    if not cells:
        return []
    lines = ["## Optuna: which parameterisation helps (bench/optuna_params.py)", "",
             f"cifar_resnet20 bench base, FLOPs {BUDGET}, {SEARCH['num_samples']} trials of {SEARCH['finetune_steps']} "
             "fine-tune steps each, score = val accuracy (validation only). Higher is better; seeds are search seeds.", "",
             "| variant | seeds | best val score (mean ± std) | top-3 mean | search s (mean) | load |", "|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        group = [c for c in cells if c["variant"] == variant]
        if not group:
            continue
        best, top3 = _mean_std([c["best_score"] for c in group]), _mean_std([c["top3_mean"] for c in group])
        lines.append(f"| {variant} | {len(group)} | {best[0]:.4f} ± {best[1]:.4f} | {top3[0]:.4f} ± {top3[1]:.4f} | "
                     f"{statistics.fmean(c['search_s'] for c in group):.0f} | "
                     f"{statistics.fmean(c['loadavg_1m'] for c in group):.1f} |")
    seconds = statistics.fmean(c["search_s"] for c in cells)
    missing = [f"{v} s{s}" for v in VARIANTS for s in QUALITY_SEEDS
               if not any(c["variant"] == v and c["seed"] == s for c in cells)]
    if missing:
        lines += ["", f"Missing: {', '.join(missing)} (~{seconds / 60:.0f} min each)."]
    return lines + [""]


def retrain_noise_section(folder: Path) -> list[str]:
    """How far retrain seeds move one profile under each recipe (bench/retrain_noise.py), per base and budget."""
    files = sorted((folder / "retrain_noise").glob("*/*.json"))
    if not files:
        return []
    lines = ["## Retrain seed noise per recipe (bench/retrain_noise.py)", "",
             "The same pruned profiles retrained once per seed with each recipe (EPOCHSxLR: SGD, cosine, from the "
             "pruned weights, batch 128, 1 thread). 'pooled std': the within-profile std over seeds, pooled over "
             "the profiles (the noise one retrain adds to a cell). Issue 20 asks for <= 1 point; choose on val.", ""]
    tables: dict[tuple, list[dict]] = defaultdict(list)  # one file per recipe; a table per base, model and budget
    for path in files:
        d = json.loads(path.read_text())
        tables[d["base_info"]["base_id"], d["model"], d["budget"]].append(d)
    for (base_id, model, budget), recipes in sorted(tables.items()):
        cpu = recipes[0]["base_info"].get("cpu", "?")
        lines += [f"### {model} at FLOPs {budget:g}, base {base_id} ({cpu})", "",
                  "| recipe | profile | seeds | val mean ± std | val min | test mean ± std | test min | retrain s "
                  "| load | date |", "|---|---|---|---|---|---|---|---|---|---|"]
        for d in sorted(recipes, key=lambda d: (d["epochs"], -d["lr"])):
            recipe = d["recipe"]
            for profile, rs in d["runs"].items():
                val, test = [r["val_acc"] for r in rs], [r["test_acc"] for r in rs]
                lines.append(f"| {recipe} | {profile} | {len(rs)} | {_pm(val)} | {min(val):.4f} | {_pm(test)} | "
                             f"{min(test):.4f} | {statistics.mean(r['train_s'] for r in rs):.0f} | "
                             f"{statistics.mean(r['loadavg_1m'] for r in rs):.1f} | {rs[-1]['date']} |")
            pooled = d["summary"]
            lines.append(f"| {recipe} | pooled std | | {_pct(pooled['val_acc']['pooled_std'])} | | "
                         f"{_pct(pooled['test_acc']['pooled_std'])} | | | | |")
        lines.append("")
    return lines


def _pm(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.4f} ± {std:.4f}"


def _pct(std: float | None) -> str:
    return "-" if std is None else f"{100 * std:.2f} points"


def trial_time_section(folder: Path) -> list[str]:
    """Where a trial's wall time goes (bench/trial_time.py): per setting, the phases summed over a search's trials."""
    cells = _cells(folder / "trial_time")
    if not cells:
        return []
    phases = ("start", "setup", "prune", "bn", "finetune", "eval", "finish")
    lines = ["## Where a trial's time goes (bench/trial_time.py)", "",
             "An Optuna search's trials, phase by phase (seconds summed over its trials; `start`: the driver started "
             "the trial -> its body ran, i.e. actor start and job transfer; `setup`: threads, device, data; "
             "`finish`: last report -> row written). 'train+eval' = finetune + eval (+ bn: adaptive-BN "
             "recalibration, also scoring work); 'slots used': the trials' time over the Tune run's wall time x "
             "concurrency (the rest: the driver between trials). Goal: a trial spends >= 80% of its wall time "
             "fine-tuning and evaluating (CPU, cifar_resnet20 at FLOPs 0.1).", "",
             "| setting | trials | steps | " + " | ".join(phases) + " | train+eval (with bn) | slots used | median "
             "trial s | trial CPU-s (% of base) | load | date |", "|" + "---|" * (len(phases) + 9)]
    for c in sorted(cells, key=lambda c: c["setting"]):
        share = c["share"]
        lines.append(f"| {c['setting']} | {c['trials']} | {c['config']['finetune_steps']} | "
                     + " | ".join(f"{c['phase_s'].get(p, 0.0):.1f} ({100 * share.get(p, 0.0):.0f}%)" for p in phases)
                     + f" | {100 * c['train_and_eval_share']:.0f}% ({100 * c['with_bn_share']:.0f}%) | "
                     f"{100 * c.get('slot_use', float('nan')):.0f}% | {c['median_trial_wall_s']:.2f} | "
                     f"{_cpu_share(c)} | {c['loadavg_1m']:.1f} | {c['date']} |")
    return lines + [""]


def _cpu_share(c: dict) -> str:
    """A trial-time cell's trial CPU-seconds, and their share of the base's training CPU-seconds where known."""
    if c.get("trial_cpu_s") is None:
        return "-"
    share = f" ({100 * c['trial_cpu_s'] / c['base_cpu_s']:.1f}%)" if c.get("base_cpu_s") else ""
    return f"{c['trial_cpu_s']:.0f}{share}"


def throughput_section(t: dict) -> list[str]:
    lines = [f"## Cost and scale ({t['mode']} run, {t['date']})", "",
             f"Random searcher, {t['model']}, {t['finetune_steps']} fine-tune steps per trial, 1 CPU per trial."
             + _load_note(t), "",
             "| concurrency | trials | setup s | span s | summed trial s | trials/hour | Ray overhead |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['trials']} | {r['setup_s']:.1f} | {r['span_s']:.1f} | {r['trial_s']:.1f} | "
              f"{r['trials_per_hour']:.0f} | {r['overhead']:.1%} |" for r in t["rows"]]
    single = t["rows"][0]
    per_trial = single["trial_s"] / single["trials"]
    overhead = max(r["overhead"] for r in t["rows"])
    lines += ["", f"Projection to N workers: N x 3600 / {per_trial:.1f} s x (1 - {overhead:.1%}) trials/hour, "
              "assuming one trial per worker, this machine's per-trial time (a GPU shortens it by a factor the CPU "
              "run cannot measure), the worst overhead measured here, and storage and the driver's searcher not "
              "being bottlenecks: " + ", ".join(f"N={n}: {n * 3600 / per_trial * (1 - overhead):.0f}"
                                               for n in (1, 4, 16, 64)) + ".", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    args = parser.parse_args()
    folder = Path(args.results)
    lines = ["# Benchmark results", "", "Written by `python -m bench.report` from `bench/results/*.json`; the "
             "commands are in bench/run_all.py. Figures from a --quick run are smoke-test sized, not conclusions.", ""]
    lines += quality_section(folder)
    lines += retrain_noise_section(folder)
    for budget in HEADROOM:
        for base in ["", *sorted(p.name for p in _base_folders(folder / "fidelity"))]:
            recipes = sorted(p.name for p in _base_folders(folder / "fidelity" / base)) if base else []
            for recipe in ["", *recipes]:
                lines += fidelity_budget_section(folder, budget, base, recipe)
    lines += fidelity_section(folder)
    lines += latency_section(folder)
    lines += trial_time_section(folder)
    lines += optuna_params_section(folder)
    throughput = _load(folder, "throughput")
    if throughput:
        lines += throughput_section(throughput)
    for name, title in (("cost_model", "Cost model speed and pruned-model latency"),
                        ("aofp", "AOFP trajectory and loss evaluations (bench/aofp.py)")):
        text = folder / f"{name}.md"
        if text.is_file():
            lines += [f"## {title}", "", text.read_text()]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
