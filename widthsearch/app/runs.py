"""The runs of an experiment, each a Ray Tune experiment under its folder: the search (and its re-scoring stage and
the latency timing of its best profiles), and the retraining of a chosen profile."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import torch
from torch import nn

from .. import results
from ..errors import WidthSearchError
from ..importance import criterion_batches
from ..latency import measure_profiles
from ..storage import filesystem
from ..target import MEASURED
from ..training import evaluate
from .callbacks import EpochProgress, ResultsCallback, TrialProgress
from .experiment import Experiment, job_fields, metadata, on_target, trial_resources
from .tuning import init_ray, tune_run

if TYPE_CHECKING:
    from searchers import WidthSearcher


def search(exp: Experiment, *, resume: bool = False, progress: bool = True,
           changed: dict | None = None) -> pa.Table:
    """Run the experiment's search or, with `resume`, continue it; then its re-scoring stage and, under a latency
    constraint, the timing of its best profiles; return its table. Joins or starts Ray (tuning.init_ray).

    A search is one Tune run or, once extended, several (parts): resuming restores the last part (an unfinished one
    goes on, a finished one returns at once) and, when fewer trials ran than `num_samples` and the searcher can go
    on (`extendable`), starts a new part that runs the missing trials with the searcher's state restored from the
    last part. `changed` (the settings a resume changed) is recorded in the experiment's metadata.
    """
    from searchers import searcher_class

    cfg = exp.config
    parts = _parts(exp.exp_dir) if resume else 0
    first = None if parts else _searcher(exp)  # made before anything is written: its checks come first
    store = results.ResultsStore.create(exp.exp_dir, metadata(exp), resume=resume, changed=changed)
    init_ray(cfg.address)
    if parts:
        _search_part(exp, store, parts, progress=progress)
    missing = cfg.num_samples - results.of_stage(results.load(exp.exp_dir), results.MAIN_RUN).num_rows
    if not parts or (missing > 0 and searcher_class(cfg.searcher).extendable):
        parts += 1
        _search_part(exp, store, parts, trials=cfg.num_samples if parts == 1 else missing, searcher=first,
                     progress=progress)
    table = results.load(exp.exp_dir)
    if cfg.rescore_top > 0 and not cfg.pareto:
        rescore(exp, table, parts, resume=resume, progress=progress)
        table = results.load(exp.exp_dir)
    if cfg.constraint == "latency" and cfg.latency_top > 0:
        measure_top(exp, table)
        table = results.load(exp.exp_dir)
    return table


def _part_dir(exp_dir: str, part: int) -> str:
    """The Tune experiment of part `part` of the search: the experiment's folder itself, then EXP/search-N."""
    return exp_dir if part == 1 else f"{exp_dir}/{results.run_name(results.MAIN_RUN, part)}"


def _parts(exp_dir: str) -> int:
    """How many parts of the search Tune has saved (0: none yet)."""
    from ray import tune

    count = 0
    while tune.Tuner.can_restore(_part_dir(exp_dir, count + 1)):
        count += 1
    return count


def _search_part(exp: Experiment, store: results.ResultsStore, part: int, *, trials: int | None = None,
                 searcher: WidthSearcher | None = None, progress: bool = True) -> None:
    """Part `part` of the search as a Tune run: restored (`trials` None), or new with `trials` trials and `searcher`
    (default: a new one; in a part after the first, its state restored from the part before)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from searchers import searcher_class
    from trainables import trial_job

    cfg = exp.config
    cls = searcher_class(cfg.searcher)
    tune_config = None
    if trials is not None:
        searcher = searcher or _searcher(exp)
        if part > 1:
            searcher.set_state(_searcher_state(exp.exp_dir, part - 1))
            searcher.num_samples = cfg.num_samples
        scheduler = None
        if cfg.asha and len(cfg.rungs()) > 1:
            if cls.promotes:
                scheduler = ASHAScheduler(time_attr="steps_reached", max_t=cfg.finetune_steps,
                                          grace_period=cfg.min_finetune_steps, reduction_factor=cfg.reduction_factor)
            elif progress:
                print(f"note: searcher {cfg.searcher!r} scores its own trials; asha (promotion) does not apply",
                      file=sys.stderr)
        tune_config = tune.TuneConfig(metric="score", mode="max", num_samples=trials, scheduler=scheduler,
                                      search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.concurrency),
                                      reuse_actors=True)
    trainable, job = trial_job(cls.trainable, cfg, exp.exp_dir, job_fields(exp))
    run = results.run_name(results.MAIN_RUN, part)
    done = results.of_stage(results.load(exp.exp_dir), results.MAIN_RUN).num_rows
    storage, name = _part_dir(exp.exp_dir, part).rsplit("/", 1)
    tune_run(trainable, job, name=name, storage_path=storage, resources=trial_resources(cfg),
             max_failures=cfg.max_failures, resume=trials is None, tune_config=tune_config,
             max_concurrent=cfg.concurrency,
             callbacks=[ResultsCallback(store, cfg.name, cfg.searcher, exp.space.widths.tolist(), run=run),
                        TrialProgress(cfg.num_samples, "search", done=done, budget=None if cfg.pareto else cfg.budget,
                                      enabled=progress)])


def _searcher(exp: Experiment):
    """The experiment's searcher, made for its space, measure and settings."""
    from searchers import make_searcher

    cfg = exp.config
    batches = criterion_batches(cfg.criterion, exp.data, batch_size=cfg.batch_size, count=cfg.importance_batches,
                                seed=cfg.seed)
    return make_searcher(cfg.searcher, exp.space, exp.cost, budget=None if cfg.pareto else cfg.budget, seed=cfg.seed,
                         model=exp.model, criterion=cfg.criterion, measure=exp.measure, batches=batches,
                         num_samples=cfg.num_samples, exp_dir=exp.exp_dir, fill_budget=cfg.fill_budget,
                         **cfg.searcher_options)


def _searcher_state(exp_dir: str, part: int) -> dict:
    """The searcher state Tune saved last in part `part` of the search (its searcher-state-*.pkl)."""
    fs, folder = filesystem(_part_dir(exp_dir, part))
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(folder))
                   if i.base_name.startswith("searcher-state-") and i.base_name.endswith(".pkl"))
    if not names:
        raise WidthSearchError(f"cannot extend the search: its part {part} saved no searcher state in {folder}")
    with fs.open_input_stream(f"{folder}/{names[-1]}") as f:
        return pickle.loads(f.read())


def rescore(exp: Experiment, table: pa.Table, part: int = 1, *, resume: bool = False, progress: bool = True) -> None:
    """The re-scoring stage: the best `rescore_top` distinct profiles of the search (within the budget, ranked by
    `results.ranked`) each get one more trial with `rescore_steps` of fine-tuning, as a follow-up Tune run
    (RESCORE_RUN; after part N of an extended search, RESCORE_RUN-N, for the profiles not re-scored yet) in the same
    experiment; their rows rank first, so the final choice is made on the longer fine-tune (multi-fidelity: many
    short trials explore, a few long ones decide).

    Channels a searcher chose itself (payload "keep") are re-scored as `retrain` builds them.
    """
    from ray import tune

    from trainables import trial_job

    cfg = exp.config
    top = results.ranked(results.of_stage(table, results.MAIN_RUN), cfg.budget)[:cfg.rescore_top]
    rescored = {tuple(r["widths"]) for r in results.of_stage(table, results.RESCORE_RUN).to_pylist()}
    rows = [r for r in top if tuple(r["widths"]) not in rescored]
    if len(top) < 2 or not rows:
        return  # nothing to choose between, or every one re-scored already
    candidates = [{"widths": [int(w) for w in r["widths"]], **results.chosen_channels(r),
                   "payload": json.dumps({"rescore_of": r["trial_id"], "score": r["score"],
                                          "steps_reached": r["steps_reached"]})} for r in rows]
    longer = dataclasses.replace(cfg, finetune_steps=cfg.rescore_steps, asha=False, rescore_top=0)
    trainable, job = trial_job("score", longer, exp.exp_dir, job_fields(exp, longer))
    name = results.run_name(results.RESCORE_RUN, part)
    callbacks = [ResultsCallback(results.ResultsStore(exp.exp_dir), cfg.name, cfg.searcher, exp.space.widths.tolist(),
                                 run=name),
                 TrialProgress(len(rows), f"re-scoring ({cfg.rescore_steps} steps)", enabled=progress)]
    tune_run(trainable, job, name=name, storage_path=exp.exp_dir, resources=trial_resources(cfg),
             max_failures=cfg.max_failures, resume=resume,
             param_space={"candidate": tune.grid_search(candidates)},
             tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=cfg.concurrency,
                                         reuse_actors=True),
             callbacks=callbacks)


def measure_top(exp: Experiment, table: pa.Table) -> dict | None:
    """Time the best `latency_top` profiles whole on the latency target; write widthsearch/latency/measured.json
    (per profile: predicted and measured ms, and measured_ratio, its time over the dense model's timed beside it;
    base_measured_ms, the dense model's time) and the measured figures into those profiles' rows (measured_ms,
    measured_ratio).

    The best: `results.ranked` within the budget (a Pareto search: its front, best score first), one per distinct
    profile. Runs where the table was measured.
    """
    cfg = exp.config
    if cfg.pareto:
        ok = table.filter(pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["score"])))
        rows = results.ranked(results.pareto_front(ok, minimize="cost_ratio"))[:cfg.latency_top]
    else:
        rows = results.ranked(table, cfg.budget)[:cfg.latency_top]
    if not rows:
        return None
    call = on_target(exp.config) or (lambda fn, *args, **kwargs: fn(*args, **kwargs))
    measured = call(measure_profiles, exp.space, exp.model, cfg.latency_target(), [r["widths"] for r in rows],
                    paired=True)
    out = {"key": exp.measure.table["key"], "loadavg": list(os.getloadavg()), "budget": cfg.budget,
           "base_predicted_ms": exp.measure.base, "base_measured_ms": statistics.median(m["dense_ms"] for m in measured),
           "rows": [{"trial_id": r["trial_id"], "widths": r["widths"], "score": r["score"], "cost_ratio": r["cost_ratio"],
                     "predicted_ms": exp.measure.of(r["widths"]), "measured_ms": m["ms"], "measured_ratio": m["ratio"]}
                    for r, m in zip(rows, measured)]}
    store = results.ResultsStore(exp.exp_dir)
    store.write_bytes(MEASURED, json.dumps(out, indent=1).encode())
    for row, m in zip(rows, measured):
        store.write_row({**row, "measured_ms": m["ms"], "measured_ratio": m["ratio"]})
    return out


def retrain(exp: Experiment, row: dict, *, epochs: int = 30, lr: float = 0.05, from_scratch: bool = False,
            cpus: float | None = None, gpus: float | None = None, timeout_s: float | None = None,
            progress: bool = True) -> tuple[nn.Module, dict]:
    """Retrain the profile of `row` (a row of the experiment's table) as a Tune trial that resumes from its last
    epoch; return the trained model (CPU, eval mode) and its figures: test accuracy, and the recipes of the base
    model and of this retrain (`base_recipe`, `retrain_recipe`: epochs, lr) with whether they are alike
    (`equal_recipes`: only then does the accuracy gap measure the pruning alone)."""
    from trainables.retrain import RetrainJob, build_pruned, retrain_profile

    cfg = exp.config
    job = RetrainJob(**job_fields(exp), widths=list(row["widths"]), epochs=epochs, lr=lr, from_scratch=from_scratch,
                     model_source=cfg.model, num_classes=exp.data.num_classes, in_channels=exp.data.in_channels,
                     trial_timeout_s=timeout_s, **results.chosen_channels(row))
    init_ray(cfg.address)
    name = f"retrain-{row['trial_id']}-e{epochs}" + ("-scratch" if from_scratch else "")
    result = tune_run(retrain_profile, job, name=name, storage_path=exp.exp_dir,
                      resources=trial_resources(cfg, cpus, gpus), max_failures=cfg.max_failures, resume=True,
                      callbacks=[EpochProgress(epochs, f"retrain {row['trial_id']}", enabled=progress)])[0]
    if result.error is not None:
        raise WidthSearchError(f"retraining trial {row['trial_id']} failed: {result.error}")
    model = build_pruned(job, torch.device("cpu"))
    with result.checkpoint.as_directory() as folder:
        model.load_state_dict(torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)["model"])
    profile = exp.space.from_vector(row["widths"])
    metrics = {
        "experiment": cfg.name, "trial_id": row["trial_id"], "epochs": epochs, "from_scratch": from_scratch,
        "search_val_acc": row["val_acc"], "search_steps_reached": row["steps_reached"],
        "val_acc": result.metrics["val_acc"], "test_acc": result.metrics["test_acc"],
        "base_val_acc": exp.base_val_acc, "base_test_acc": evaluate(exp.model, exp.data, "test")[0],
        "flops": exp.cost.flops(profile), "params": exp.cost.params(profile),
        "flops_ratio": exp.cost.flops_ratio(profile), "base_flops": exp.cost.base_flops,
        "base_params": exp.cost.base_params, "base_recipe": exp.base_recipe,
        "retrain_recipe": {"epochs": epochs, "lr": lr, "from_scratch": from_scratch},
        "equal_recipes": (exp.base_recipe["epochs"], exp.base_recipe["lr"]) == (epochs, lr),
    }
    return model.eval(), metrics
