"""The runs of an experiment, each a Ray Tune experiment under its folder: the search (and its re-scoring stage and
the latency timing of its best profiles), and the retraining of a chosen profile."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from .. import results
from ..errors import WidthSearchError
from ..importance import criterion_batches
from ..latency import MEASURED, measure_profiles
from ..training import evaluate
from .experiment import Experiment, job_fields, metadata, on_target, trial_resources
from .tuning import init_ray, tune_run

RESCORE_RUN = "rescore"


def search(exp: Experiment, resume: bool = False, progress: bool = True) -> pa.Table:
    """Run (or, with `resume`, continue) the experiment's search, then its re-scoring stage and, under a latency
    constraint, the timing of its best profiles; return its table. Joins or starts Ray (tuning.init_ray)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from searchers import make_searcher
    from trainables import trial_job

    cfg = exp.config
    batches = criterion_batches(cfg.criterion, exp.data, batch_size=cfg.batch_size, count=cfg.importance_batches,
                                seed=cfg.seed)
    searcher = make_searcher(cfg.searcher, exp.space, exp.cost, budget=None if cfg.pareto else cfg.budget,
                             seed=cfg.seed, model=exp.model, criterion=cfg.criterion, measure=exp.measure,
                             batches=batches, num_samples=cfg.num_samples, exp_dir=exp.exp_dir, **cfg.searcher_options)
    store = results.ResultsStore.create(exp.exp_dir, metadata(exp), resume=resume)
    scheduler = None
    if cfg.asha and len(cfg.rungs()) > 1:
        if searcher.promotes:
            scheduler = ASHAScheduler(time_attr="steps_reached", max_t=cfg.finetune_steps,
                                      grace_period=cfg.min_finetune_steps, reduction_factor=cfg.reduction_factor)
        elif progress:
            print(f"note: searcher {cfg.searcher!r} scores its own trials; asha (promotion) does not apply",
                  file=sys.stderr)
    trainable, job = trial_job(searcher.trainable, cfg, exp.exp_dir, job_fields(exp))
    init_ray(cfg.address)
    tune_run(trainable, job, name=cfg.name, storage_path=cfg.storage, resources=trial_resources(cfg),
             max_failures=cfg.max_failures, resume=resume, progress=progress,
             tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=cfg.num_samples,
                                         search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.concurrency),
                                         scheduler=scheduler, reuse_actors=True),
             callbacks=[results.ResultsCallback(store, cfg.name, cfg.searcher, exp.space.widths.tolist())])
    table = results.load(exp.exp_dir)
    if cfg.rescore_top > 0 and not cfg.pareto:
        rescore(exp, table, resume, progress)
        table = results.load(exp.exp_dir)
    if cfg.constraint == "latency" and cfg.latency_top > 0:
        measure_top(exp, table, progress)
    return table


def rescore(exp: Experiment, table: pa.Table, resume: bool = False, progress: bool = True) -> None:
    """The re-scoring stage: the best `rescore_top` distinct profiles of the search (within the budget, ranked by
    `results.ranked`) each get one more trial with `rescore_steps` of fine-tuning, as a follow-up Tune run
    (RESCORE_RUN) in the same experiment; their rows (run RESCORE_RUN) rank first, so the final choice is made
    on the longer fine-tune (multi-fidelity: many short trials explore, a few long ones decide).

    Channels a searcher chose itself (payload "keep") are re-scored as `retrain` builds them.
    """
    from ray import tune

    from trainables import trial_job

    cfg = exp.config
    main = table.filter(pc.invert(pc.equal(pc.fill_null(table["run"], results.MAIN_RUN), RESCORE_RUN)))
    rows = results.ranked(main, cfg.budget)[:cfg.rescore_top]
    if len(rows) < 2:
        return  # nothing to choose between
    candidates = [{"widths": [int(w) for w in r["widths"]], **results.chosen_channels(r),
                   "payload": json.dumps({"rescore_of": r["trial_id"], "score": r["score"],
                                          "steps_reached": r["steps_reached"]})} for r in rows]
    longer = dataclasses.replace(cfg, finetune_steps=cfg.rescore_steps, asha=False, rescore_top=0)
    trainable, job = trial_job("score", longer, exp.exp_dir, job_fields(exp, longer))
    if progress:
        print(f"re-scoring the best {len(rows)} profiles with {cfg.rescore_steps} fine-tune steps", file=sys.stderr)
    callback = results.ResultsCallback(results.ResultsStore(exp.exp_dir), cfg.name, cfg.searcher,
                                       exp.space.widths.tolist(), run=RESCORE_RUN)
    tune_run(trainable, job, name=RESCORE_RUN, storage_path=exp.exp_dir, resources=trial_resources(cfg),
             max_failures=cfg.max_failures, resume=resume, progress=progress,
             param_space={"candidate": tune.grid_search(candidates)},
             tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=cfg.concurrency,
                                         reuse_actors=True),
             callbacks=[callback])


def measure_top(exp: Experiment, table: pa.Table, progress: bool = True) -> dict | None:
    """Time the best `latency_top` profiles whole on the latency target; write widthsearch/latency/measured.json
    (per profile: predicted and measured ms, and measured_ratio, its time over the dense model's timed beside it).

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
    out = {"key": exp.measure.table["key"], "loadavg": list(os.getloadavg()), "rows": [
        {"trial_id": r["trial_id"], "widths": r["widths"], "score": r["score"], "cost_ratio": r["cost_ratio"],
         "predicted_ms": exp.measure.of(r["widths"]), "measured_ms": m["ms"], "measured_ratio": m["ratio"]}
        for r, m in zip(rows, measured)]}
    results.ResultsStore(exp.exp_dir).write_bytes(MEASURED, json.dumps(out, indent=1).encode())
    if progress:
        print(f"measured latency of the best {len(rows)} profile(s): "
              + ", ".join(f"{r['trial_id']} {r['measured_ms']:.3f} ms (predicted {r['predicted_ms']:.3f})"
                          for r in out["rows"]), file=sys.stderr)
    return out


def retrain(exp: Experiment, row: dict, *, epochs: int = 30, lr: float = 0.05, from_scratch: bool = False,
            cpus: float | None = None, gpus: float | None = None,
            timeout_s: float | None = None, progress: bool = True) -> tuple[nn.Module, dict]:
    """Retrain the profile of `row` (a row of the experiment's table) as a Tune trial that resumes from its last
    epoch; return the trained model (CPU, eval mode) and its figures (test accuracy among them)."""
    from trainables.retrain import RetrainJob, build_pruned, retrain_profile

    cfg = exp.config
    job = RetrainJob(**job_fields(exp), widths=list(row["widths"]), epochs=epochs, lr=lr, from_scratch=from_scratch,
                     model_source=cfg.model, num_classes=exp.data.num_classes, in_channels=exp.data.in_channels,
                     trial_timeout_s=timeout_s, **results.chosen_channels(row))
    init_ray(cfg.address)
    name = f"retrain-{row['trial_id']}-e{epochs}" + ("-scratch" if from_scratch else "")
    result = tune_run(retrain_profile, job, name=name, storage_path=exp.exp_dir,
                      resources=trial_resources(cfg, cpus, gpus), max_failures=cfg.max_failures, resume=True,
                      progress=progress)[0]
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
        "base_params": exp.cost.base_params,
    }
    return model.eval(), metrics
