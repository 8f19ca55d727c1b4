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
from .latency import MEASURED


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
    """Validation score against latency: every trial at its predicted latency, the profiles timed after the
    search at their measured latency (joined to their prediction)."""
    plt = pyplot()
    key = meta.get("latency", {}).get("key", {})
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ok = table.filter(pc.is_valid(table["latency_ms"]))
    ax.scatter(ok["latency_ms"].to_pylist(), ok["score"].to_pylist(), s=18, alpha=0.4, label="trials (predicted)")
    for i, row in enumerate((measured or {}).get("rows", [])):
        ax.plot([row["predicted_ms"], row["measured_ms"]], [row["score"]] * 2, "-", color="C3", lw=0.8)
        ax.scatter([row["measured_ms"]], [row["score"]], marker="D", s=30, color="C3",
                   label="best, measured" if i == 0 else None)
    if meta.get("base_val_acc") is not None and meta.get("latency"):
        ax.scatter([meta["latency"]["base_ms"]], [meta["base_val_acc"]], marker="*", s=120, color="k",
                   label="base model (predicted)")
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


def _html(meta: dict, front: pa.Table, best: pa.Table, latency: bool = False) -> str:
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
{'<h2>Score against latency</h2><img src="latency.png" alt="score against latency">' if latency else ''}
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
    latency = meta.get("constraint") == "latency"
    if latency:
        measured = results.ResultsStore(exp_dir).read_bytes(MEASURED)
        paths.append(os.path.join(out_dir, "latency.png"))
        plot_latency(table, json.loads(measured) if measured else None, meta, paths[-1])
    with open(paths[2], "w") as f:
        f.write(_html(meta, front, best, latency))
    return paths
