"""`widthsearch` command line: search, results, retrain, report, train-base (the Python API, parsed and printed)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import yaml

from ..errors import WidthSearchError
from ..options import Option, value_text
from .config import declared

_DASH_VALUE_FLAGS = {"--sort"}  # flags whose value may start with a dash ('-score': descending)
_FLAGS = {"searcher_options": "--option"}  # settings whose flag is not --KEY-NAME


def _add_search(sub) -> None:
    from searchers import searchers_help

    p = sub.add_parser("search", help="search widths (no CONFIG: the embedded demo on digits)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="searcher options (--option KEY=VALUE), with their defaults:\n" + searchers_help())
    p.add_argument("config", nargs="?", help="YAML file with any of the keys below")
    for key, option in declared().items():
        flag = _FLAGS.get(key, "--" + key.replace("_", "-"))
        if option.kind is bool:
            p.add_argument(flag, dest=key, action="store_true", default=None, help=option.help)
        elif option.kind is dict:
            p.add_argument(flag, dest=key, action="append", metavar="KEY=VALUE", help=option.help)
        else:
            p.add_argument(flag, dest=key, default=None, help=_flag_help(option))
    p.add_argument("--resume", action="store_true", help="continue the experiment --name")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _flag_help(option: Option) -> str:
    """A setting's --help line: its help, what a valid value is (not "a string") and its default (if any)."""
    what = option.describe().removeprefix("a string").removeprefix(", or ")
    default = "" if option.default is None else value_text(option.default)
    notes = "; ".join(part for part in (what, default and f"default {default}") if part)
    return (option.help + (f" ({notes})" if notes else "")).replace("%", "%%")


def _search_overrides(args: argparse.Namespace) -> dict:
    """The search settings given as flags, typed as in YAML (lists comma-separated, --option KEY=VALUE)."""
    out = {}
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
        out[key] = value
    return out


def _key_value(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise WidthSearchError(f"--option takes KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    return key, yaml.safe_load(value)


def cmd_search(args: argparse.Namespace) -> None:
    from ..results import format_table, ranked_table
    from .api import Search, load_search
    from .config import absolute, load_config
    from .experiment import experiment_dir

    cfg = load_config(args.config, _search_overrides(args))
    if args.resume:
        if not cfg.name:
            raise WidthSearchError("--resume needs --name of the experiment to continue")
        run = load_search(experiment_dir(absolute(cfg.storage), cfg.name), address=cfg.address)
    else:
        run = Search(cfg)
    table = run.fit(progress=not args.quiet)
    name, storage, constraint = run.config.name, run.config.storage, run.config.constraint
    ok = sum(1 for s in table.column("status").to_pylist() if s == "ok")
    print(f"{table.num_rows} trials ({ok} ok) in {run.path}")
    budget = run.budget
    if budget is None:
        print(format_table(run.front()))
        print(f"\nnext: widthsearch retrain {name} --storage {storage} --best --budget R --epochs 30 --out {name}-export"
              f"  (R: the {constraint} ratio you can afford)")
        return
    print(f"best profiles within the budget ({constraint} ratio <= {budget:g}), longest fine-tune first:")
    print(format_table(ranked_table(table, budget, limit=10)))
    try:
        best = run.best()
    except WidthSearchError as exc:
        print(f"\n{exc}")
        return
    print(f"\nbest: trial {best['trial_id']} (score {best['score']:.4f} after {best['steps_reached']} fine-tune steps, "
          f"{constraint} ratio {best['cost_ratio']:.4f})")
    print(f"next: widthsearch retrain {name} --storage {storage} --best --epochs 30 --out {name}-export")


def cmd_results(args: argparse.Namespace) -> None:
    from ..results import format_table, query

    run = _experiment(args)
    if args.sql is None:
        table = query(run.results(), pareto=args.pareto, max_flops=args.max_flops, where=args.where or [],
                      sort=args.sort, limit=args.limit)
    else:
        given = [flag for flag, value in [("--pareto", args.pareto), ("--max-flops", args.max_flops),
                                          ("--where", args.where), ("--sort", args.sort), ("--limit", args.limit)]
                 if value not in (None, False)]
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


def cmd_retrain(args: argparse.Namespace) -> None:
    from ..export import check_export_folder

    if args.best and args.trial:
        raise WidthSearchError("give --trial ID or --best, not both")
    if args.out is not None:
        check_export_folder(args.out)  # before the retrain, not after it
    run = _experiment(args, address=args.address)
    model, metrics = run.retrain(args.trial, epochs=args.epochs, lr=args.lr, from_scratch=args.from_scratch,
                                 budget=args.budget, cpus=args.cpus_per_trial, gpus=args.gpus_per_trial,
                                 timeout_s=args.trial_timeout_s, progress=not args.quiet)
    if args.out is not None:
        run.export(model, args.out, metrics)
        metrics["export"] = str(args.out)
    print(json.dumps(metrics, indent=1))


def cmd_train_base(args: argparse.Namespace) -> None:
    from ..data import load_data
    from ..models import save_checkpoint
    from ..training import TrainConfig, evaluate, set_threads, train_base

    set_threads(args.threads)
    data = load_data(args.data, val_fraction=args.val_fraction, seed=args.split_seed)
    model = train_base(args.model, data, epochs=args.epochs, config=TrainConfig(lr=args.lr, batch_size=args.batch_size),
                       seed=args.seed, progress=False if args.quiet else f"train {args.model}")
    acc, loss = evaluate(model, data, "val")
    save_checkpoint(model, args.out, model_source=args.model, data=args.data, epochs=args.epochs, val_acc=acc,
                    split=data.split)
    print(f"val accuracy {acc:.4f} (loss {loss:.4f}); saved {args.out} "
          f"(split: val_fraction {args.val_fraction}, split_seed {args.split_seed}; search with the same)")


def cmd_report(args: argparse.Namespace) -> None:
    print("\n".join(_experiment(args).report(args.out, top=args.top)))


def _experiment(args: argparse.Namespace, address: str | None = None):
    """The experiment named by the command's EXPERIMENT and --storage (widthsearch.load_search)."""
    from .api import load_search
    from .config import absolute
    from .experiment import experiment_dir

    return load_search(experiment_dir(absolute(args.storage), args.experiment), address=address)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="widthsearch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, help="what to do (each has its own --help)")
    _add_search(sub)

    p = sub.add_parser("results", help="query an experiment's results table")
    _add_experiment(p)
    p.add_argument("--pareto", action="store_true", help="only the accuracy-FLOPs Pareto front")
    p.add_argument("--max-flops", type=float, help="only rows with flops_ratio <= this")
    p.add_argument("--where", action="append", help="filter such as 'val_acc>=0.9' (repeatable)")
    p.add_argument("--sort", help="column, '-column' for descending (default -score)")
    p.add_argument("--limit", type=int, help="at most this many rows")
    p.add_argument("--sql", help="a DuckDB query over the table `results` instead of the filters above, e.g. "
                                 "\"SELECT searcher, max(score) FROM results GROUP BY searcher\" (extra: sql)")
    p.add_argument("--format", default="table", choices=["table", "csv", "json", "parquet"],
                   help="aligned text, CSV, JSON records or Parquet (needs --out) (default table)")
    p.add_argument("--out", help="write to this file instead of standard output")

    p = sub.add_parser("retrain", help="retrain a chosen profile and export it")
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
    p.add_argument("--out", help="export folder: weights, model.torchscript.pt, model.onnx, metrics, latency")
    p.add_argument("--address", help="Ray cluster address to join (default: the experiment's, else a local Ray)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs the retraining reserves (default: the search's)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs the retraining reserves (default: the search's)")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("report", help="Pareto plot and best width profiles of an experiment (PNG + HTML)")
    _add_experiment(p)
    p.add_argument("--out", help="folder for pareto.png, profiles.png, index.html (default EXP-report)")
    p.add_argument("--top", type=int, default=3, help="how many best candidates to draw")

    settings = declared()
    p = sub.add_parser("train-base", help="train a base model and save a checkpoint")
    p.add_argument("--model", default="small_cnn", help=f"{settings['model'].help} (default small_cnn)")
    p.add_argument("--data", default="digits", help=f"{settings['data'].help} (default digits)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    p.add_argument("--lr", type=float, default=0.05, help="initial learning rate, cosine schedule (default 0.05)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--val-fraction", type=float, default=0.1, help=f"{settings['val_fraction'].help} (default 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help=f"{settings['split_seed'].help} (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _add_experiment(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment name (a folder under --storage)")
    p.add_argument("--storage", default="runs", help="folder or URI that holds the experiment (default runs)")


def _dash_values(argv: Sequence[str]) -> list[str]:
    """Join '--sort -score' into '--sort=-score': argparse alone reads '-score' as an unknown flag."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _DASH_VALUE_FLAGS and arg.startswith("-") and not arg.startswith("--") and arg != "-h":
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


COMMANDS = {"search": cmd_search, "results": cmd_results, "retrain": cmd_retrain, "report": cmd_report,
            "train-base": cmd_train_base}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `widthsearch` console script."""
    args = build_parser().parse_args(_dash_values(sys.argv[1:] if argv is None else argv))
    try:
        COMMANDS[args.command](args)
    except WidthSearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
