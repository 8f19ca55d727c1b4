"""Turn bench/results/*.json into bench/RESULTS.md and PNG plots (accuracy vs FLOPs, profiles, fidelity).

    python bench/report.py [--results bench/results] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS  # noqa: E402

from widthsearch.report import pyplot  # noqa: E402


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _load_note(data: dict) -> str:
    """What the machine's load was when a run ended (timings under load are not comparable)."""
    load = data.get("loadavg_1m")
    return "" if load is None else f" Load average at the end of the run: {load:.1f} (2 cores)."


QUALITY_MODELS = ("cifar_resnet20", "cifar_resnet56")
QUALITY_BUDGETS = (0.5, 0.3)
QUALITY_SEEDS = (0, 1, 2)
RESNET56_FACTOR = 1.8  # resnet56 / resnet20 seconds per training epoch, measured here (34.7 s vs 19.2 s, 2 threads)


def _cells(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _mask(cell: dict):
    from common import unpack_mask

    return unpack_mask(cell["test_correct"], 1017)


def quality_section(folder: Path) -> list[str]:
    """The decisive table from bench/results/quality/*.json: per model and budget, every method's test accuracy
    over seeds, its paired difference to uniform with a 95% interval, cost, size and latency; missing cells."""
    from quality import METHODS, SEARCH_NOTE
    from stats import paired_difference

    cells = [c for c in _cells(folder / "quality") if "error" not in c]
    failed = [c for c in _cells(folder / "quality") if "error" in c]
    lines = ["## The decisive benchmark: searchers vs uniform and torch-pruning (bench/quality.py)", ""]
    if not cells:
        return lines + ["No cell has finished yet.", ""]
    first = cells[0]
    lines += [f"Protocol: bases trained on the bench split (bench/common.py: 4,068 train / 1,017 val images of "
              f"cifar10-5k, {first['base_info']['epochs']} epochs); test = the 1,017 CIFAR-10 test images, used only "
              f"here. Every pruned model gets the same retrain ({first['retrain_epochs']} epochs, SGD lr 0.05 cosine, "
              "from the pruned weights, seed = the cell's seed). Searchers choose on the validation split only; "
              f"search budget: {SEARCH_NOTE}. 'vs uniform' is the paired difference on the same images, mean over "
              "seeds, with a 95% hierarchical bootstrap interval (seeds and images resampled). Latency: CPU, 1 thread, "
              "median of 20 runs, measured in the cell under the load shown (timings under load are not comparable).",
              ""]
    by = defaultdict(list)
    for c in cells:
        by[(c["model"], c["budget"], c["method"])].append(c)
    for model in QUALITY_MODELS:
        for budget in QUALITY_BUDGETS:
            group = {m: sorted(by[(model, budget, m)], key=lambda c: c["seed"]) for m in METHODS if by[(model, budget, m)]}
            if not group:
                continue
            base = next(iter(group.values()))[0]["base_info"]
            lines += [f"### {model} at FLOPs {budget} (base test accuracy {base['test_acc']:.4f})", "",
                      "| method | seeds | test acc (mean ± std) | vs uniform (95% CI) | FLOPs ratio | params | "
                      "search s (trials) | retrain s | CPU b1 ms | CPU b64 ms | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            uniform = {c["seed"]: _mask(c) for c in group.get("uniform", [])}
            summary = {}
            for method, rows in group.items():
                acc, std = _mean_std([r["test_acc"] for r in rows])
                paired = [r for r in rows if r["seed"] in uniform]
                versus = "-"
                if method != "uniform" and paired:
                    d = paired_difference([_mask(r) for r in paired], [uniform[r["seed"]] for r in paired])
                    versus = f"{100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
                    summary[method] = d
                search = statistics.fmean(r.get("search_s", r.get("prune_or_search_s", 0.0)) for r in rows)
                trials = statistics.fmean(r.get("trials", 0) for r in rows)
                lines.append(f"| {method} | {len(rows)} | {acc:.4f} ± {std:.4f} | {versus} | "
                             f"{statistics.fmean(r['flops_ratio'] for r in rows):.3f} | "
                             f"{statistics.fmean(r['params'] for r in rows):,.0f} | {search:.0f}"
                             + (f" ({trials:.0f})" if trials else "") + f" | "
                             f"{statistics.fmean(r['retrain_s'] for r in rows):.0f} | "
                             f"{statistics.fmean(r['batch1_ms'] for r in rows):.2f} | "
                             f"{statistics.fmean(r['batch64_ms'] for r in rows):.1f} | "
                             f"{statistics.fmean(r['loadavg_1m'] for r in rows):.1f} |")
            lines += ["", *_goal_lines(group, uniform), ""]
    lines += _missing_cells(cells, METHODS)
    lines += [f"* failed: {c['model']} {c['method']} at {c['budget']}, seed {c['seed']}: {c['error']}" for c in failed]
    lines += _quality_plots(cells, folder)
    return lines


def _goal_lines(group: dict, uniform: dict) -> list[str]:
    """The issue's goal: the best searcher vs the best method that does not search, paired, with an interval."""
    from quality import SEARCHERS
    from stats import paired_difference

    def mean(m):
        return statistics.fmean(c["test_acc"] for c in group[m])

    searched = [m for m in group if m in SEARCHERS]
    plain = [m for m in group if m not in SEARCHERS]
    if not searched or not plain:
        return []
    best_s, best_p = max(searched, key=mean), max(plain, key=mean)
    a = {c["seed"]: _mask(c) for c in group[best_s]}
    b = {c["seed"]: _mask(c) for c in group[best_p]}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return []
    d = paired_difference([a[s] for s in seeds], [b[s] for s in seeds])
    verdict = "met" if d["diff"] >= 0.01 and d["low"] > 0 else "missed"
    return [f"Goal (best searcher >= best non-searching method + 1.0 point, interval excluding 0): best searcher "
            f"{best_s}, best non-searching {best_p}: {100 * d['diff']:+.2f} points [{100 * d['low']:+.2f}, "
            f"{100 * d['high']:+.2f}] over {len(seeds)} seed(s): {verdict}."]


def _missing_cells(cells: list[dict], methods) -> list[str]:
    """Cells not finished yet, with the time each needs (from finished cells of the same method and model)."""
    done = {(c["model"], c["method"], c["budget"], c["seed"]) for c in cells}
    cost = defaultdict(list)
    for c in cells:
        cost[(c["model"], c["method"])].append(c.get("prune_or_search_s", 0.0) + c["retrain_s"])
    hours = []
    for model in QUALITY_MODELS:
        for method in methods:
            todo = [(b, s) for b in QUALITY_BUDGETS for s in QUALITY_SEEDS if (model, method, b, s) not in done]
            if not todo:
                continue
            known = cost.get((model, method)) or [x * (RESNET56_FACTOR if model != "cifar_resnet20" else 1)
                                                   for x in cost.get(("cifar_resnet20", method), [])]
            each = statistics.fmean(known) if known else None
            hours.append((model, method, len(todo), each))
    if not hours:
        return ["All cells are filled.", ""]
    lines = ["Missing cells (time per cell from finished cells of the same method; resnet56 = resnet20 x "
             f"{RESNET56_FACTOR}, plus its base: 80 epochs x ~35 s = ~47 min, on this 2-core CPU, 1 thread per cell):", ""]
    for model, method, n, each in hours:
        lines.append(f"* {model} {method}: {n} cell(s)" + (f", ~{each / 60:.0f} min each" if each else ", no estimate yet"))
    total = sum(n * each for _, _, n, each in hours if each)
    return lines + ["", f"Estimated total for the cells with an estimate: ~{total / 3600:.1f} CPU-hours.", ""]


def _quality_plots(cells: list[dict], folder: Path) -> list[str]:
    plt = pyplot()
    models = sorted({c["model"] for c in cells})
    fig, axes = plt.subplots(1, len(models), figsize=(6.4 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in sorted({c["method"] for c in cells if c["model"] == model}):
            pts = []
            for budget in sorted({c["budget"] for c in cells}):
                rows = [c for c in cells if (c["model"], c["method"], c["budget"]) == (model, method, budget)]
                if rows:
                    acc, std = _mean_std([r["test_acc"] for r in rows])
                    pts.append((statistics.fmean(r["flops_ratio"] for r in rows), acc, std))
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        label=method)
        ax.set_title(model)
        ax.set_xlabel("FLOPs / base FLOPs")
        ax.set_ylabel("test accuracy after the same retrain (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_flops.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), squeeze=False)
    for ax, budget in zip(axes[0], QUALITY_BUDGETS):
        for c in cells:
            if c["budget"] == budget and c["seed"] == 0 and c["model"] == "cifar_resnet20":
                ax.plot(c["conv_widths"], marker=".", label=c["method"])
        ax.set_title(f"cifar_resnet20 at FLOPs {budget}, seed 0")
        ax.set_xlabel("conv layer (model order)")
        ax.set_ylabel("output channels kept")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "profiles.png", dpi=110)
    plt.close(fig)
    return ["", f"![accuracy vs FLOPs]({folder.name}/accuracy_vs_flops.png) ![widths found]({folder.name}/profiles.png)",
            ""]


def fidelity_section(folder: Path) -> list[str]:
    """Rank correlations of every score variant with retrained test accuracy, from bench/results/fidelity/*.json."""
    from stats import rank_correlations

    cells = _cells(folder / "fidelity")
    lines = ["## Does the trial score rank profiles? (bench/fidelity.py)", ""]
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
        for metric, sign in (("val_acc", 1), ("val_loss", -1), ("val10_acc", 1), ("val10_loss", -1)):
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


def latency_section(folder: Path) -> list[str]:
    """The latency model's error on random profiles (bench/latency.py) and flops- vs latency-constrained winners
    (bench/latency_search.py)."""
    lines = []
    data = _load(folder, "latency")
    if data:
        lines += ["## Latency model: predicted vs measured (bench/latency.py)", "",
                  f"{data['mode']} run, {data['date']}, torch {data['torch']}; per cell a fresh table, then random "
                  "profiles pruned and timed whole, each beside the dense model. Error: |predicted - measured| / "
                  "measured, of the ms and of the ratio to the dense model (what a budget bounds); 'FLOPs' is the "
                  "guess latency proportional to FLOPs. Goal: median <= 10%, max <= 20%.", "",
                  "| model | batch | clock | profiles | table s | uniform 0.5: FLOPs / latency | ms median / max "
                  "| ratio median / max | FLOPs ratio median / max | load |", "|---" * 10 + "|"]
        for c in data["cells"]:
            errs = [c[k] for k in ("model_errors", "model_ratio_errors", "flops_ratio_errors")]
            half = c["uniform_half"]
            lines.append(f"| {c['model']} | {c['batch']} | {c['clock']} | {len(c['rows'])} | {c['table_s']:.0f} | "
                         f"{half['flops_ratio']:.3f} / {half['measured_latency_ratio']:.3f} | "
                         + " | ".join(f"{e['median_abs_rel_err']:.1%} / {e['max_abs_rel_err']:.1%}" for e in errs)
                         + f" | {c['loadavg_after'].split()[0]} |")
        lines += ["", f"![latency]({folder.name}/latency.png)", ""]
    cells = _cells(folder / "latency_search")
    if cells:
        lines += ["## Latency- vs FLOPs-constrained search (bench/latency_search.py)", "",
                  "| constraint | seed | budget | FLOPs ratio | measured latency ratio | test acc |", "|---" * 6 + "|"]
        lines += [f"| {c['constraint']} | {c['seed']} | {c['budget']:g} | {c['flops_ratio']:.3f} | "
                  f"{c['measured_latency_ratio']:.3f} | {c['test_acc']:.4f} |"
                  for c in sorted(cells, key=lambda c: (c["seed"], c["constraint"]))] + [""]
    return lines


def optuna_params_section(folder: Path) -> list[str]:
    """Best and top-3 validation score per Optuna parameterisation (bench/optuna_params.py), with what is missing."""
    from optuna_params import BUDGET, SEARCH, VARIANTS

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
    lines = ["# Benchmark results", "", "Written by `python bench/report.py` from `bench/results/*.json`; the "
             "commands are in bench/run_all.py. Figures from a --quick run are smoke-test sized, not conclusions.", ""]
    lines += quality_section(folder)
    lines += fidelity_section(folder)
    lines += latency_section(folder)
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
