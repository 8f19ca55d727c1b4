"""`widthsearch` command line: search, results, retrain, report, train-base (the Python API, parsed and printed).

Exit status: 0 done (a search: it finished and has a best row within its budget, or a front); 1 a search that ran
but found nothing usable (every trial failed, or none within the budget); 2 a bad command, setting or input (the
message says which); 130 interrupted (Ctrl-C or SIGTERM; what finished is kept, and the message says how to go on).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

from ..errors import WidthSearchError

_DASH_VALUE_FLAGS = {"--sort"}  # flags whose value may start with a dash ('-score': descending)
_FLAGS = {"searcher_options": "--option"}  # settings whose flag is not --KEY-NAME
INTERRUPTED, NO_RESULT, BAD_INPUT = 130, 1, 2  # exit statuses (0: done)
_COMMANDS = {  # name -> its one help line; each parser is built only for the command that runs (fast start)
    "search": "search widths (no CONFIG: the embedded demo on digits)",
    "results": "query an experiment's results table",
    "retrain": "retrain a chosen profile and export it",
    "report": "Pareto plot and best width profiles of an experiment (PNG + HTML)",
    "train-base": "train a base model and save a checkpoint",
}


class NoResult(Exception):
    """A command that ran but has nothing to show for it (exit status NO_RESULT); the message says why."""


# ----------------------------------------------------------------------------- search
def _add_search(p: argparse.ArgumentParser) -> None:
    from searchers import searchers_help

    from ..options import value_text
    from .config import declared

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "searcher options (--option KEY=VALUE), with their defaults:\n" + searchers_help()
    p.add_argument("config", nargs="?", help="YAML file with any of the keys below")
    for key, option in declared().items():
        flag = _FLAGS.get(key, "--" + key.replace("_", "-"))
        if option.kind is bool:
            p.add_argument(flag, dest=key, action="store_true", default=None, help=option.help_text())
        elif option.kind is dict:
            p.add_argument(flag, dest=key, action="append", metavar="KEY=VALUE", help=option.help_text())
        else:
            what = option.describe().removeprefix("a string").removeprefix(", or ")
            default = "" if option.default is None else value_text(option.default)
            notes = "; ".join(part for part in (what, default and f"default {default}") if part)
            p.add_argument(flag, dest=key, default=None,
                           help=(option.help_text() + (f" ({notes})" if notes else "")).replace("%", "%%"))
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment --name where it stopped; with a larger --num-samples, extend it "
                        "(only --num-samples, --concurrency and --address may differ from the stored settings)")
    _add_output(p)


def _search_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The search settings given (a YAML file's, then the flags, typed as in YAML: lists comma-separated, --option
    KEY=VALUE)."""
    import yaml

    from .config import declared, read_settings

    flags = {}
    for key, option in declared().items():
        value = getattr(args, key, None)
        if value is None:
            continue
        if option.kind is dict:
            value = dict(_key_value(item) for item in value)
        elif option.kind is list:
            value = [v for v in value.split(",") if v]
        elif option.kind is not str and option.kind is not bool:
            value = yaml.safe_load(value)  # numbers typed as in YAML; checked by SearchConfig
        flags[key] = value
    return read_settings(args.config, flags)


def _key_value(item: str) -> tuple[str, object]:
    import yaml

    if "=" not in item:
        raise WidthSearchError(f"--option takes KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    return key, yaml.safe_load(value)


def cmd_search(args: argparse.Namespace) -> None:
    from .api import Search, load_search
    from .config import SearchConfig, absolute, experiment_dir, resume_changes

    given = _search_settings(args)
    if args.resume:
        if not given.get("name"):
            raise WidthSearchError("--resume needs --name of the experiment to continue")
        run = load_search(experiment_dir(absolute(given.get("storage", "runs")), given["name"]))
        fit = resume_changes(run.config, given)  # only RESUMABLE settings, else a ConfigError naming them
    else:
        run, fit = Search(SearchConfig(**given)), {}
    try:
        table = run.fit(progress=not args.quiet, verbose=args.verbose, **fit)
    except KeyboardInterrupt:
        raise _Interrupted(_interrupted_search(run)) from None
    print("\n".join(_search_summary(run, table)))


class _Interrupted(KeyboardInterrupt):
    """An interrupted command with the line that says what was kept and how to go on."""


def _interrupted_search(run) -> str:
    from .. import results

    cfg = run.config
    if not results.ResultsStore(run.path).exists():
        return "interrupted before the search began: nothing to resume; run the same command again"
    done = results.of_stage(run.results(), results.MAIN_RUN).num_rows
    return (f"interrupted: {done} of {cfg.num_samples} trials finished, kept in {run.path}; resume with: "
            f"widthsearch search --resume --name {cfg.name} --storage {cfg.storage}")


def _search_summary(run, table) -> list[str]:
    """The lines a finished search ends with: trials, the best rows, the chosen one (with its measured latency) and
    what to do next; NoResult when every trial failed or none is within the budget."""
    from .. import results

    cfg, name, storage = run.config, run.config.name, run.config.storage
    search = results.of_stage(table, results.MAIN_RUN)
    status = search.column("status").to_pylist()
    failed, ok = status.count("error"), status.count("ok")
    head = f"{search.num_rows} trials ({ok} ok" + (f", {failed} failed" if failed else "") + f") in {run.path}"
    if not results.ranked(table):
        errors = [e for e in search.column("error").to_pylist() if e]
        raise NoResult(f"{head}: no trial scored a profile" + (f"; the first error: {errors[0].splitlines()[-1]}"
                                                                  if errors else ""))
    budget = run.budget
    if budget is None:
        return [head, results.format_table(run.front()),
                f"\nnext: widthsearch retrain {name} --storage {storage} --best --budget R --epochs 30  "
                f"(R: the {cfg.constraint} ratio you can afford)"]
    try:
        best = run.best()
    except WidthSearchError as exc:
        raise NoResult(f"{head}: {exc}") from None
    lines = [head, f"best profiles within the budget ({cfg.constraint} ratio <= {budget:g}), longest fine-tune first:",
             results.format_table(results.ranked_table(table, budget, limit=10)),
             f"\nbest: trial {best['trial_id']} (score {best['score']:.4f} after {best['steps_reached']} fine-tune "
             f"steps, {cfg.constraint} ratio {best['cost_ratio']:.4f})"]
    if best.get("measured_ratio") is not None:
        lines.append(_measured_line(best, budget))
    lines.append(f"next: widthsearch retrain {name} --storage {storage} --best --epochs 30")
    return lines


def _measured_line(row: dict, budget: float) -> str:
    """A row's measured latency against its prediction and the budget."""
    error = row["measured_ratio"] / row["cost_ratio"] - 1
    verdict = "within" if row["measured_ratio"] <= budget else "over"
    return (f"measured: {row['measured_ms']:.3f} ms (predicted {row['latency_ms']:.3f} ms), latency ratio "
            f"{row['measured_ratio']:.4f} measured against {row['cost_ratio']:.4f} predicted ({error:+.1%}): "
            f"{verdict} the budget {budget:g}")


# ----------------------------------------------------------------------------- results, report
def _add_results(p: argparse.ArgumentParser) -> None:
    from ..results import COSTS

    _add_experiment(p)
    p.add_argument("--pareto", nargs="?", const="cost", choices=[*COSTS, "cost"],
                   help="only the Pareto front of score against a cost: flops, params or latency (as fractions of "
                        "the base model's), or cost, the experiment's constraint (the default)")
    p.add_argument("--max", action="append", metavar="COST=R",
                   help=f"only rows whose COST ({', '.join(COSTS)}) is at most R times the base model's "
                        "(repeatable)")
    p.add_argument("--where", action="append", metavar="CONDITION",
                   help="only rows that satisfy an SQL condition over the columns (DuckDB, extra: sql), e.g. "
                        "\"val_acc >= 0.9\" or \"status = 'ok'\" (repeatable: all must hold)")
    p.add_argument("--sort", help="column, '-column' for descending (default -score)")
    p.add_argument("--limit", type=int, help="at most this many rows")
    p.add_argument("--sql", help="a DuckDB query over the table `results` instead of the filters above, e.g. "
                                 "\"SELECT searcher, max(score) FROM results GROUP BY searcher\" (extra: sql)")
    p.add_argument("--format", default="table", choices=["table", "csv", "json", "parquet"],
                   help="aligned text, CSV, JSON records or Parquet (needs --out) (default table)")
    p.add_argument("--out", help="write to this file instead of standard output")
    _add_debug(p)


def cmd_results(args: argparse.Namespace) -> None:
    from ..results import format_table, load_metadata, query

    run = _experiment(args)
    if args.sql is None:
        table = query(run.results(), load_metadata(run.path), pareto=args.pareto,
                      max=dict(_cost_bound(item) for item in args.max or []), where=args.where or [],
                      sort=args.sort, limit=args.limit)
    else:
        given = [flag for flag, value in [("--pareto", args.pareto), ("--max", args.max), ("--where", args.where),
                                          ("--sort", args.sort), ("--limit", args.limit)] if value is not None]
        if given:
            raise WidthSearchError(f"--sql does not combine with {', '.join(given)}; say it in the query instead")
        table = run.sql(args.sql)
    text = format_table(table, args.format)
    if isinstance(text, bytes):
        if args.out is None:
            raise WidthSearchError("--format parquet needs --out FILE")
        with open(args.out, "wb") as f:
            f.write(text)
        print(f"wrote {table.num_rows} rows to {args.out}")
    elif args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


def _cost_bound(item: str) -> tuple[str, float]:
    """--max COST=R as (COST, R)."""
    from ..results import COSTS

    cost, _, value = item.partition("=")
    try:
        ratio = float(value)
    except ValueError:
        ratio = None
    if cost not in COSTS or ratio is None:
        raise WidthSearchError(f"--max takes COST=R with COST one of {', '.join(COSTS)} and R a number, got {item!r}")
    return cost, ratio


def _add_report(p: argparse.ArgumentParser) -> None:
    _add_experiment(p)
    p.add_argument("--out", help="folder for pareto.png, profiles.png, index.html (default EXP-report)")
    p.add_argument("--top", type=int, default=3, help="how many best candidates to draw")
    _add_debug(p)


def cmd_report(args: argparse.Namespace) -> None:
    print("\n".join(_experiment(args).report(args.out, top=args.top)))


# ----------------------------------------------------------------------------- retrain, train-base
def _add_retrain(p: argparse.ArgumentParser) -> None:
    _add_experiment(p)
    p.add_argument("--trial", help="trial id (default: --best)")
    p.add_argument("--best", action="store_true",
                   help="the best trial by validation score within the budget, at the longest fine-tune reached")
    p.add_argument("--budget", type=float,
                   help="with --best: the largest cost ratio allowed (default: the experiment's budget; "
                        "needed for a Pareto search)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--lr", type=float, default=0.05, help="initial learning rate, cosine schedule (default 0.05)")
    p.add_argument("--from-scratch", action="store_true", help="random init instead of the pruned base weights")
    p.add_argument("--trial-timeout-s", type=float,
                   help="fail the retrain after this many seconds (a rerun continues from its last epoch)")
    p.add_argument("--out", help="export folder (a new one: weights, model.torchscript.pt, model.onnx, metrics, "
                                 "latency, preprocessing) (default: EXP/exports/TRIAL-eEPOCHS)")
    p.add_argument("--address", help="Ray cluster address to join (default: the experiment's, else a local Ray)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs the retraining reserves (default: the search's)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs the retraining reserves (default: the search's)")
    _add_output(p)


def cmd_retrain(args: argparse.Namespace) -> None:
    from ..export import check_export_folder

    if args.best and args.trial:
        raise WidthSearchError("give --trial ID or --best, not both")
    run = _experiment(args, address=args.address)
    row = run.best(args.budget, trial=args.trial)
    out = args.out or run.export_dir(row, args.epochs, args.from_scratch)
    check_export_folder(out)  # before the retrain, not after it
    try:
        model, metrics = run.retrain(row, epochs=args.epochs, lr=args.lr, from_scratch=args.from_scratch,
                                     cpus=args.cpus_per_trial, gpus=args.gpus_per_trial, timeout_s=args.trial_timeout_s,
                                     progress=not args.quiet, verbose=args.verbose)
    except KeyboardInterrupt:
        raise _Interrupted("interrupted: the retrain keeps its last epoch; run the same command again to go on from "
                           "there") from None
    metrics["export"] = run.export(model, out, metrics)
    print(json.dumps(metrics, indent=1))
    print("\n".join(_retrain_summary(metrics)), file=sys.stderr)


def _retrain_summary(metrics: dict) -> list[str]:
    """What a retrain ends with: its test accuracy against the base model's, both recipes, and whether they compare
    alike; where the export went."""
    base, ours = metrics["base_recipe"], metrics["retrain_recipe"]

    def recipe(r: dict) -> str:
        epochs = "? epochs" if r["epochs"] is None else f"{r['epochs']} epoch" + ("" if r["epochs"] == 1 else "s")
        return f"{epochs} at lr {'?' if r['lr'] is None else r['lr']}"

    compare = ("same recipe: the gap is the pruning's" if metrics["equal_recipes"] else
               "not compared at equal epochs and lr: the gap mixes the pruning with the different training")
    return [f"test accuracy {metrics['test_acc']:.4f} (trial {metrics['trial_id']}, FLOPs ratio "
            f"{metrics['flops_ratio']:.4f}) against the base model's {metrics['base_test_acc']:.4f}",
            f"recipes: base {recipe(base)}; retrain {recipe(ours)}"
            + (" from scratch" if ours["from_scratch"] else " from the base weights") + f"; {compare}",
            f"exported to {metrics['export']}"]


def _add_train_base(p: argparse.ArgumentParser) -> None:
    from .config import declared

    settings = declared()
    p.add_argument("--model", default="small_cnn", help=f"{settings['model'].help_text()} (default small_cnn)")
    p.add_argument("--data", default="digits", help=f"{settings['data'].help_text()} (default digits)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    p.add_argument("--lr", type=float, default=0.05, help="initial learning rate, cosine schedule (default 0.05)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help=f"{settings['val_fraction'].help_text()} (default 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help=f"{settings['split_seed'].help_text()} (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    _add_debug(p)


def cmd_train_base(args: argparse.Namespace) -> None:
    from ..data import load_data
    from ..models import save_checkpoint
    from ..training import TrainConfig, evaluate, set_threads, train_base

    set_threads(args.threads)
    data = load_data(args.data, val_fraction=args.val_fraction, seed=args.split_seed)
    model = train_base(args.model, data, epochs=args.epochs, config=TrainConfig(lr=args.lr, batch_size=args.batch_size),
                       seed=args.seed, progress=False if args.quiet else f"train {args.model}")
    acc, loss = evaluate(model, data, "val")
    save_checkpoint(model, args.out, model_source=args.model, data=args.data, epochs=args.epochs, lr=args.lr,
                    val_acc=acc, split=data.split)
    print(f"val accuracy {acc:.4f} (loss {loss:.4f}); saved {args.out} "
          f"(split: val_fraction {args.val_fraction}, split_seed {args.split_seed}; search with the same)")


# ----------------------------------------------------------------------------- parser
def _experiment(args: argparse.Namespace, address: str | None = None):
    """The experiment named by the command's EXPERIMENT and --storage (widthsearch.load_search)."""
    from .api import load_search
    from .config import absolute, experiment_dir

    return load_search(experiment_dir(absolute(args.storage), args.experiment), address=address)


def _add_experiment(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment name (a folder under --storage)")
    p.add_argument("--storage", default="runs", help="folder or URI that holds the experiment (default runs)")


def _add_output(p: argparse.ArgumentParser) -> None:
    """--quiet, --verbose, --debug: how much a command that trains prints."""
    what = p.add_mutually_exclusive_group()
    what.add_argument("--quiet", action="store_true", help="print only the final lines (no progress bar, no notes)")
    what.add_argument("--verbose", action="store_true",
                      help="also Ray's, Tune's and Optuna's own output (logs, status tables, the trials' output)")
    _add_debug(p)


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="on an error, also print its traceback")


_ADD = {"search": _add_search, "results": _add_results, "retrain": _add_retrain, "report": _add_report,
        "train-base": _add_train_base}
COMMANDS = {"search": cmd_search, "results": cmd_results, "retrain": cmd_retrain, "report": cmd_report,
            "train-base": cmd_train_base}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser: every command's options (`command`: only that one's, "" none; the others answer
    their help line only, so that `widthsearch --help` and `widthsearch results` load no registry)."""
    parser = argparse.ArgumentParser(prog="widthsearch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"widthsearch {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, help="what to do (each has its own --help)")
    for name, help_line in _COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        if command is None or command == name:
            _ADD[name](p)
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("widthsearch")
    except metadata.PackageNotFoundError:
        return "unknown"


def _dash_values(argv: Sequence[str]) -> list[str]:
    """Join '--sort -score' into '--sort=-score': argparse alone reads '-score' as an unknown flag."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _DASH_VALUE_FLAGS and arg.startswith("-") and not arg.startswith("--") and arg != "-h":
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `widthsearch` console script; returns the exit status (see the module docstring)."""
    argv = _dash_values(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if arg in COMMANDS), "")
    args = build_parser(command).parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None  # SIGTERM stops it as Ctrl-C does
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:
        print(str(exc) if isinstance(exc, _Interrupted) else "interrupted", file=sys.stderr)
        return INTERRUPTED
    except NoResult as exc:
        _error(args, exc)
        return NO_RESULT
    except WidthSearchError as exc:
        _error(args, exc)
        return BAD_INPUT
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _error(args: argparse.Namespace, exc: Exception) -> None:
    """An expected failure: its one-line message on stderr (and its traceback with --debug)."""
    if getattr(args, "debug", False):
        traceback.print_exception(exc)
    print(f"error: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
