"""`widthsearch report EXP`: a Pareto plot, the width profiles of the best candidates and, under a latency
constraint, score against predicted and measured latency (PNG + HTML)."""

from __future__ import annotations

import html
import json
import os

import pyarrow as pa
import pyarrow.compute as pc

from . import results
from .errors import WidthSearchError
from .target import MEASURED


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Lay out, write (PNG, 110 dpi) and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def _successful(table: pa.Table) -> pa.Table:
    ok = table.filter(pc.and_(pc.equal(table["status"], "ok"),
                              pc.and_(pc.is_valid(table["score"]), pc.is_valid(table["flops_ratio"]))))
    if ok.num_rows == 0:
        raise WidthSearchError(f"nothing to report: the experiment has {table.num_rows} row(s) and no successful "
                               "trial with a score (see `widthsearch results EXP` for the errors)")
    return ok


def plot_pareto(table: pa.Table, front: pa.Table, meta: dict, path: str) -> None:
    """Validation score against FLOPs ratio for every successful trial, the front joined by a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(table["flops_ratio"].to_pylist(), table["score"].to_pylist(), s=18, alpha=0.5, label="trials")
    ax.plot(front["flops_ratio"].to_pylist(), front["score"].to_pylist(), "o-", color="C3", label="Pareto front")
    if meta.get("base_val_acc") is not None:
        ax.scatter([1.0], [meta["base_val_acc"]], marker="*", s=120, color="k", label="base model")
    ax.set_xlabel("FLOPs / base FLOPs")
    ax.set_ylabel("validation score")
    ax.set_title(f"{meta.get('experiment', '')}: {table.num_rows} successful trials")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_profiles(best: pa.Table, meta: dict, path: str) -> None:
    """Kept fraction of every channel group (group order) for each of the best candidates."""
    plt = pyplot()
    groups = meta["groups"]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.25 * len(groups)), 4.4))
    for row in best.to_pylist():
        ax.plot(range(len(groups)), row["keep_ratios"], marker=".",
                label=f"{row['trial_id']}: score {row['score']:.4f}, FLOPs {row['flops_ratio']:.3f}")
    ax.set_xticks(range(len(groups)), groups, rotation=90, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("channels kept / base channels")
    ax.set_title("width profiles of the best candidates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_latency(table: pa.Table, measured: dict | None, meta: dict, path: str) -> None:
    """Validation score against latency, every point marked as what it is: each trial at its predicted latency
    (hollow), the profiles timed after the search at their measured latency (filled, joined to their prediction),
    the base model at its measured latency where it was timed beside them (else at its predicted one, hollow)."""
    plt = pyplot()
    key = meta.get("latency", {}).get("key", {})
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ok = table.filter(pc.is_valid(table["latency_ms"]))
    ax.scatter(ok["latency_ms"].to_pylist(), ok["score"].to_pylist(), s=18, facecolors="none", edgecolors="C0",
               alpha=0.6, label="trials, predicted")
    for i, row in enumerate((measured or {}).get("rows", [])):
        ax.plot([row["predicted_ms"], row["measured_ms"]], [row["score"]] * 2, "-", color="C3", lw=0.8)
        ax.scatter([row["measured_ms"]], [row["score"]], marker="D", s=30, color="C3",
                   label="best, measured (line: from predicted)" if i == 0 else None)
    if meta.get("base_val_acc") is not None and meta.get("latency"):
        if (measured or {}).get("base_measured_ms") is not None:
            ax.scatter([measured["base_measured_ms"]], [meta["base_val_acc"]], marker="*", s=120, color="k",
                       label="base model, measured")
        else:
            ax.scatter([meta["latency"]["base_ms"]], [meta["base_val_acc"]], marker="*", s=120, facecolors="none",
                       edgecolors="k", label="base model, predicted")
    ax.set_xlabel(f"latency (ms per forward of {key.get('batch', '?')} on {key.get('device_name', '?')}, "
                  f"{key.get('threads', '?')} thread(s))", fontsize=8)
    ax.set_ylabel("validation score")
    ax.set_title(f"{meta.get('experiment', '')}: score vs latency" + ("" if measured else " (none measured yet)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _html_table(table: pa.Table) -> str:
    """Rows as an HTML table of their main columns."""
    columns = ["trial_id", "searcher", "flops_ratio", "params", "score", "val_acc", "val_loss"]
    rows = "\n".join("<tr>" + "".join(f"<td>{html.escape(results.cell_text(r[c]))}</td>" for c in columns) + "</tr>"
                     for r in table.select(columns).to_pylist())
    return f"<table><tr>{''.join(f'<th>{c}</th>' for c in columns)}</tr>\n{rows}</table>"


def _measured_html(measured: dict | None) -> str:
    """The profiles timed after the search: predicted against measured latency, the prediction's error, and the
    measured ratio against the budget."""
    if not measured or not measured.get("rows"):
        return "<p>No profile was timed after the search (latency_top 0, or no row within the budget).</p>"
    budget = measured.get("budget")
    head = ["trial_id", "predicted ms", "measured ms", "predicted ratio", "measured ratio", "error", "budget"]
    rows = []
    for r in measured["rows"]:
        verdict = "-" if budget is None else ("within" if r["measured_ratio"] <= budget else "over")
        cells = [r["trial_id"], f"{r['predicted_ms']:.3f}", f"{r['measured_ms']:.3f}", f"{r['cost_ratio']:.4f}",
                 f"{r['measured_ratio']:.4f}", f"{r['measured_ratio'] / r['cost_ratio'] - 1:+.1%}", verdict]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    base = ""
    if measured.get("base_measured_ms") is not None:
        base = (f" The base model: {measured['base_predicted_ms']:.3f} ms predicted, {measured['base_measured_ms']:.3f} "
                "ms measured.")
    return (f"<p>The best profiles, pruned and timed whole after the search (ratio: over the base model's time, "
            f"timed beside each; error: measured ratio over predicted ratio, minus one; budget "
            f"{'-' if budget is None else f'{budget:g}'}).{base}</p>\n"
            f"<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>\n" + "\n".join(rows) + "</table>")


def _html(meta: dict, front: pa.Table, best: pa.Table, latency: str = "") -> str:
    """The report page; `latency`: the latency section's HTML (a latency experiment), else empty."""
    title = html.escape(f"widthsearch report: {meta.get('experiment', '')}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 8px;text-align:right}}</style></head>
<body><h1>{title}</h1>
<p>Base: {meta.get('base_flops')} FLOPs, {meta.get('base_params')} params, validation accuracy
{meta.get('base_val_acc')}. Scores are on the validation split.</p>
<img src="pareto.png" alt="score against FLOPs">
<h2>Pareto front ({front.num_rows} trials)</h2>
{_html_table(front)}
{'<h2>Score against latency</h2><img src="latency.png" alt="score against latency">' + latency if latency else ''}
<h2>Best {best.num_rows} candidates</h2>
<p>Within the budget, longest fine-tune first, then the best score.</p>
{_html_table(best)}
<img src="profiles.png" alt="width profiles">
</body></html>
"""


def write_report(exp_dir: str, out_dir: str, top: int = 3) -> list[str]:
    """Write pareto.png, profiles.png (the `top` best distinct profiles within the experiment's budget, by
    `results.ranked`), index.html and, under a latency constraint, latency.png (score vs predicted and measured
    latency) for an experiment into out_dir; return their paths."""
    if top < 1:
        raise WidthSearchError(f"--top must be at least 1, got {top}")
    meta = results.load_metadata(exp_dir)
    table = _successful(results.load(exp_dir))
    front = results.pareto_front(table)
    best = results.ranked_table(table, results.budget_of(meta), limit=top)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ("pareto.png", "profiles.png", "index.html")]
    plot_pareto(table, front, meta, paths[0])
    plot_profiles(best, meta, paths[1])
    latency = ""
    if meta.get("constraint") == "latency":
        data = results.ResultsStore(exp_dir).read_bytes(MEASURED)
        measured = json.loads(data) if data else None
        paths.append(os.path.join(out_dir, "latency.png"))
        plot_latency(table, measured, meta, paths[-1])
        latency = _measured_html(measured)
    with open(paths[2], "w") as f:
        f.write(_html(meta, front, best, latency))
    return paths
