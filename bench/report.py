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


def quality_section(q: dict, folder: Path) -> list[str]:
    by = defaultdict(list)
    for row in q["rows"]:
        if "error" not in row:
            by[(row["budget"], row["method"])].append(row)
    lines = [f"## Quality at equal budgets ({q['mode']} run, {q['date']})", "",
             f"{q['model']} on `{q['data']}`; base test accuracy {q['base']['test_acc']:.4f} "
             f"({q['base']['epochs']} epochs, {q['base']['train_s']:.0f} s). Every searcher: {q['trials']} Tune "
             f"trials of {q['finetune_steps']} fine-tune steps; its best row within the budget on the validation "
             f"score is retrained {q['retrain_epochs']} epoch(s); the torch-pruning peers get the same retrain."
             + _load_note(q), "",
             "| budget | method | seeds | test acc (mean ± std) | FLOPs ratio | params | CPU batch 1 (ms) | "
             "CPU batch 64 (ms) |", "|---|---|---|---|---|---|---|---|"]
    for (budget, method), rows in sorted(by.items()):
        acc, std = _mean_std([r["test_acc"] for r in rows])
        lines.append(f"| {budget} | {method} | {len(rows)} | {acc:.4f} ± {std:.4f} | "
                     f"{statistics.fmean(r['flops_ratio'] for r in rows):.3f} | "
                     f"{statistics.fmean(r['params'] for r in rows):,.0f} | "
                     f"{statistics.fmean(r['batch1_ms'] for r in rows):.2f} | "
                     f"{statistics.fmean(r['batch64_ms'] for r in rows):.1f} |")
    failed = [r for r in q["rows"] if "error" in r]
    lines += [f"* {r['method']} at {r['budget']}, seed {r['seed']}: {r['error']}" for r in failed]
    for budget in sorted({b for b, _ in by}):
        mean = {m: _mean_std([r["test_acc"] for r in rows])[0] for (b, m), rows in by.items() if b == budget}
        searchers = {m: a for m, a in mean.items() if not m.startswith("tp-") and m != "uniform"}
        if searchers and "uniform" in mean and "tp-magnitude" in mean:
            best = max(searchers, key=searchers.get)
            lines.append(f"\nAt {budget}: best searcher {best} {searchers[best]:.4f}; vs uniform "
                         f"{searchers[best] - mean['uniform']:+.4f} (goal +0.01), vs tp-magnitude "
                         f"{searchers[best] - mean['tp-magnitude']:+.4f} (goal +0.005).")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method in sorted({m for _, m in by}):
        pts = sorted((b, *_mean_std([r["test_acc"] for r in rows]), statistics.fmean(r["flops_ratio"] for r in rows))
                     for (b, m), rows in by.items() if m == method)
        ax.errorbar([p[3] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=method)
    ax.set_xlabel("FLOPs / base FLOPs")
    ax.set_ylabel("test accuracy after retrain")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_flops.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.4))
    for (budget, method), rows in sorted(by.items()):
        if rows[0].get("keep_ratios"):
            ax.plot(rows[0]["keep_ratios"], marker=".", label=f"{method} @ {budget} (seed {rows[0]['seed']})")
    ax.set_xlabel("channel group (model order)")
    ax.set_ylabel("channels kept / base")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "profiles.png", dpi=110)
    plt.close(fig)
    return lines + ["", f"![accuracy vs FLOPs]({folder.name}/accuracy_vs_flops.png) "
                        f"![width profiles]({folder.name}/profiles.png)", ""]


def fidelity_section(f: dict, folder: Path) -> list[str]:
    lines = [f"## Proxy fidelity ({f['mode']} run, {f['date']})", "",
             f"{len(f['profiles'])} random profiles of {f['model']} at FLOPs ratio <= {f['budget']}; target: test "
             f"accuracy after a {f['retrain_epochs']}-epoch retrain from the pruned weights." + _load_note(f), "",
             "| fine-tune steps k | Spearman | Kendall | score cost / retrain cost |", "|---|---|---|---|"]
    lines += [f"| {r['k']} | {r['spearman']:.3f} | {r['kendall']:.3f} | {r['cost_fraction']:.2%} |"
              for r in f["fidelity"]]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot([100 * r["cost_fraction"] for r in f["fidelity"]], [r["spearman"] for r in f["fidelity"]], "o-",
            label="Spearman")
    ax.plot([100 * r["cost_fraction"] for r in f["fidelity"]], [r["kendall"] for r in f["fidelity"]], "s-",
            label="Kendall")
    for r in f["fidelity"]:
        ax.annotate(f"k={r['k']}", (100 * r["cost_fraction"], r["spearman"]))
    ax.axhline(0.8, color="gray", linestyle=":")
    ax.set_xlabel("score cost, % of the retrain")
    ax.set_ylabel("rank correlation with retrained accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "fidelity.png", dpi=110)
    plt.close(fig)
    return lines + ["", f"![fidelity]({folder.name}/fidelity.png)", ""]


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
    for name, section in (("quality", quality_section), ("fidelity", fidelity_section)):
        data = _load(folder, name)
        if data:
            lines += section(data, folder)
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
