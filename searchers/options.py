"""Every registered searcher's options, declared once: default, type, range and one line of help (`Option`), with
the rules across them and against the number of trials. Light to import (no Ray, no torch), so that
`widthsearch search --help` lists them and a configuration is checked without loading any searcher; each searcher
reads its own through `WidthSearcher.options` (a searcher without an entry has none).

A new searcher's options: one entry in `OPTIONS` (and, for rules across them, one in `RULES`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from widthsearch.errors import ConfigError
from widthsearch.options import Option, check_options, options_help

SAMPLERS = ("tpe", "nsga2", "random")                 # optuna
PARAMETERIZATIONS = ("group", "stage", "depth")       # optuna
NORMALIZERS = ("mean", "max", "sum", "none")          # global
PAPER_POPULATION, PAPER_GENERATIONS = 50, 20          # metapruning: the authors' search.py (population_num, max_iters)
SYNFLOW_WARM_STARTS = 3                               # optuna: the default K where the model is given


def _positive(default: float, text: str) -> Option:
    return Option(default, float, text, low=0, low_open=True)


OPTIONS: dict[str, dict[str, Option]] = {
    "uniform": {
        "points": Option(8, int, "Pareto mode: how many uniform ratios", low=1),
    },
    "random": {
        "max_tries": Option(100, int, "resamples before a repeated profile is accepted", low=1),
    },
    "global": {
        "normalizers": Option(["mean", "max", "none"], list, "per-group score normalisers, one candidate each",
                              choices=NORMALIZERS),
        "targets": Option([0.3, 0.5, 0.7], list, "Pareto mode: budget targets", low=0, high=1, low_open=True),
    },
    "optuna": {
        "sampler": Option(None, str, "tpe, nsga2 or random (default: tpe; nsga2 with --pareto)", choices=SAMPLERS,
                          optional=True),
        "parameterization": Option("stage", str, "keep ratios per group, per stage, or a depth profile",
                                   choices=PARAMETERIZATIONS),
        "knots": Option(3, int, "depth parameterization: keep ratios per kind of group", low=2),
        "spread": Option(3.0, float, "budget mode: largest ratio between two sampled keep ratios, each sampled "
                         "log-uniformly in [1/spread, 1] before the budget scales them (empty: each uniformly from "
                         "its group's minimum to 1)", low=1, optional=True, empty="for no limit"),
        "min_channels": Option(None, int, "budget mode: no group narrower than this many channels, or than its "
                               "width in the uniform profile at the budget where that is fewer",
                               low=1, optional=True, empty="for no floor"),
        "warm_start": Option(True, bool, "first evaluate the uniform and global-ranking profiles"),
        "width_exponents": Option([0.5, 1.0], list, "budget mode, with warm_start: one more warm start per "
                                  "exponent a, keep ratios proportional to full width^-a before the budget scales "
                                  "them (1: every group as many channels)", low=0, optional=True, empty="for none"),
        "synflow_warm_starts": Option(None, int, "budget mode, with warm_start: K more warm starts, the K profiles "
                                      "of highest synflow (no training) among synflow_pool random proposals "
                                      f"(automatic: {SYNFLOW_WARM_STARTS} where the searcher has the model, as the "
                                      "application always gives it, else 0)", low=0, optional=True),
        "synflow_pool": Option(32, int, "random proposals that synflow_warm_starts picks from", low=1),
        "startup_trials": Option(None, int, "trials before TPE models the results, the warm starts included "
                                 "(default: a quarter of the trials, 2 to 10, at least the warm starts)", low=0,
                                 optional=True),
        "population_size": Option(None, int, "NSGA-II population (default: a quarter of the trials, 4 to 50)",
                                  low=2, optional=True),
        "max_cached": Option(20, int, "repaired repeats answered from the history in a row", low=0),
    },
    "aofp": {
        "epsilon": Option(0.01, float, "damage threshold (after the next layer's BN and ReLU) below which a half is "
                          "pruned", low=0, low_open=True),
        "probes": Option(2, int, "probe trials per round; they share the round's batches", low=1),
        "window": Option(250, int, "batches of pruning attempts per probe trial (a decision rests on probes x window "
                         "batches; the base path trains on them)", low=1),
        "lr": Option(1e-3, float, "constant learning rate of the base path", low=0, low_open=True),
        "relax": Option(2.0, float, "with a budget not yet met: a group whose pass fails, or prunes less than a "
                        "quarter of its filters, has its epsilon multiplied by this (1: fixed epsilon, as the "
                        "authors)", low=1),
        "patience": Option(3, int, "failed passes in a row (no filter below epsilon at k = 1) after which a group "
                           "stops", low=1),
        "stagger": Option(0, int, "rounds between the starts of consecutive groups (0: all at once)", low=0),
        "max_rounds": Option(100, int, "most rounds", low=1),
    },
    "gradient": {
        "steps": Option(100, int, "gate optimisation steps per trial", low=1),
        "lr": _positive(0.1, "Adam learning rate of the gate logits"),
        "init_logit": Option(3.0, float, "initial gate logit (keep probability sigmoid(3) = 0.95)"),
        "tau": _positive(1.0, "sampling temperature at the start"),
        "tau_end": _positive(0.1, "sampling temperature at the end"),
        "temp": _positive(1.0, "architecture temperature at the start"),
        "temp_end": _positive(0.1, "architecture temperature at the end"),
        "complexity": Option("budget", str, "penalised quantity: what the budget bounds (flops, params or latency), "
                             "or flops or params", choices=("budget", "flops", "params")),
        "lam0": _positive(1.0, "first penalty weight of the search"),
        "expand": Option(10.0, float, "largest factor between two penalty weights before the budget is bracketed",
                         low=1, low_open=True),
        "lam_min": _positive(0.01, "Pareto mode: smallest penalty weight"),
        "lam_max": _positive(100.0, "Pareto mode: largest penalty weight"),
        "points": Option(5, int, "Pareto mode: penalty weights tried", low=1),
        "tol": _positive(0.02, "stop when the ratio is within budget and this (relative) below it"),
        "max_trials": Option(12, int, "most trials of the search for lam", low=1),
    },
    "metapruning": {
        "train_steps": Option(2000, int, "PruningNet training steps", low=1),
        "lr": Option(0.01, float, "PruningNet learning rate", low=0, low_open=True),
        "hidden": Option(32, int, "hidden units of each meta block", low=1),
        "checkpoint_every": Option(100, int, "PruningNet steps between checkpoints", low=1),
        "train_flops_min": Option(0.0, float, "smallest FLOPs ratio sampled in training", low=0, high=1),
        "train_flops_max": Option(1.0, float, "largest FLOPs ratio sampled in training", low=0, high=1),
        "population": Option(None, int, "profiles per generation (automatic: sized from num_samples)", low=1,
                             optional=True),
        "generations": Option(None, int, "generations, the random one included (automatic: from num_samples)",
                              low=1, optional=True),
        "topk": Option(None, int, "parents kept over all generations (automatic: population / 5, at least 2)",
                       low=1, optional=True),
        "mutation_prob": Option(0.1, float, "probability of changing each gene of a mutant", low=0, high=1),
        "bn_batches": Option(20, int, "BN recalibration batches per candidate", low=1),
    },
}


def evolution_plan(options: dict, num_samples: int | None) -> dict[str, int]:
    """{"population", "generations", "topk"}: the options, with unset ones sized from `num_samples`.

    Raises ConfigError when `num_samples` (one training trial + the candidates) does not cover
    explicit sizes, or leaves automatic sizing no generation after the random one.
    """
    population, generations = options["population"], options["generations"]
    if num_samples is None:
        population, generations = population or PAPER_POPULATION, generations or PAPER_GENERATIONS
    else:
        room = num_samples - 1  # the PruningNet training trial comes first
        if population is None and generations is None and room >= PAPER_POPULATION * PAPER_GENERATIONS:
            population, generations = PAPER_POPULATION, PAPER_GENERATIONS
        elif population is None and generations is None:  # the paper's 5:2, leaving room for a second generation
            population = max(2, min(int(math.sqrt(2.5 * room)), room // 2))
        if population is None:
            population = room // generations
            if population < 1:
                raise ConfigError(
                    f"searcher 'metapruning': num_samples {num_samples} leaves {room} candidate trials after the "
                    f"PruningNet training trial, fewer than 'generations' ({generations}); give num_samples >= "
                    f"{1 + generations} or fewer generations")
        automatic = generations is None
        generations = generations or room // population
        if population * generations > room:
            raise ConfigError(
                f"searcher 'metapruning': num_samples {num_samples} does not cover 1 + population x generations = "
                f"1 + {population} x {generations} = {1 + population * generations} trials (the PruningNet training "
                "trial, then the candidates); raise num_samples or lower population/generations")
        if automatic and generations < 2:
            left = "only its random generation" if generations else "no generation"
            raise ConfigError(
                f"searcher 'metapruning': num_samples {num_samples} leaves the evolution {left} "
                f"(population {population} x generations {generations}); give num_samples >= "
                f"{1 + 2 * population} for one generation of mutation and crossover, or set 'generations'")
    topk = options["topk"] or min(population, max(2, round(population / 5)))
    if topk > population:
        raise ConfigError(f"searcher 'metapruning': option 'topk' ({topk}) exceeds 'population' ({population})")
    return {"population": int(population), "generations": int(generations), "topk": int(topk)}


def _gradient(options: dict, num_samples: int | None) -> None:
    if options["lam_min"] >= options["lam_max"]:
        raise ConfigError(f"searcher 'gradient': lam_min ({options['lam_min']}) must be below lam_max "
                          f"({options['lam_max']})")


def _optuna(options: dict, num_samples: int | None) -> None:
    if (options["synflow_warm_starts"] or 0) > options["synflow_pool"]:
        raise ConfigError(f"searcher 'optuna': option 'synflow_warm_starts' ({options['synflow_warm_starts']}) "
                          f"exceeds 'synflow_pool' ({options['synflow_pool']}), the proposals it picks from")


def _metapruning(options: dict, num_samples: int | None) -> None:
    if not options["train_flops_min"] < options["train_flops_max"]:
        raise ConfigError(f"searcher 'metapruning': option 'train_flops_min' ({options['train_flops_min']:g}) must "
                          f"be below 'train_flops_max' ({options['train_flops_max']:g})")
    evolution_plan(options, num_samples)


# Rules across a searcher's options and against the search's number of trials (None: not known); raise ConfigError.
RULES: dict[str, Callable[[dict, int | None], None]] = {"gradient": _gradient, "metapruning": _metapruning,
                                                        "optuna": _optuna}


def check(searcher: str, given: Mapping[str, Any], num_samples: int | None = None) -> dict[str, Any]:
    """Searcher `searcher`'s declared defaults overlaid with `given`, each checked (ConfigError naming the option),
    then checked together and against the search's number of trials."""
    checked = check_options(searcher, OPTIONS.get(searcher, {}), given)
    if searcher in RULES:
        RULES[searcher](checked, num_samples)
    return checked


def help_text(names: list[str]) -> str:
    """Every named searcher's options, one line each (for `widthsearch search --help` and the README)."""
    lines = []
    for name in names:
        declared = OPTIONS.get(name, {})
        lines.append(f"{name}:" + ("" if declared else " (no options)"))
        lines += [f"  {line}" for line in options_help(declared)]
    return "\n".join(lines)
