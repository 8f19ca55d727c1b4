"""Orchestration: prepare an experiment, run its trials with Ray Tune, resume it, retrain its winner."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from . import results
from .config import SearchConfig
from .cost import CostModel, Measure
from .data import DataSplits, check_split, load_data
from .errors import ConfigError, WidthSearchError
from .importance import get_criterion
from .latency import MEASURED, latency_model, measure_profiles, ray_task
from .models import checkpoint_meta, load_model, save_checkpoint
from .space import WidthSpace, build_space
from .training import TrainConfig, evaluate, train

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic trial table: clearer on a terminal


@dataclass
class Experiment:
    """A prepared experiment: data, base model, its width space and cost model."""

    config: SearchConfig
    exp_dir: str
    data: DataSplits
    model: nn.Module
    space: WidthSpace
    cost: CostModel
    measure: Measure        # what the budget bounds (config key constraint)
    base_val_acc: float


def experiment_dir(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def _base_model(cfg: SearchConfig, data: DataSplits, exp_dir: str, progress: bool) -> nn.Module:
    """The given checkpoint, or the experiment's own base model (trained once, then reused on resume).

    The own one is EXP_DIR/widthsearch/base.pt, read and written through pyarrow.fs, so EXP_DIR may be a URI.
    A given checkpoint trained on another train/val split is refused (its split is in its metadata).
    """
    if cfg.checkpoint:
        warning = check_split(checkpoint_meta(cfg.checkpoint).get("split"), data.split, cfg.checkpoint)
        if warning:
            warnings.warn(warning, stacklevel=2)
            if progress:
                print(f"warning: {warning}", file=sys.stderr)
        return load_model(cfg.model, data.num_classes, cfg.checkpoint, in_channels=data.in_channels)
    store = results.ResultsStore(exp_dir)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "base.pt"
        saved = store.read_bytes("base.pt")
        if saved is not None:
            local.write_bytes(saved)
            return load_model(cfg.model, data.num_classes, local, in_channels=data.in_channels)
        torch.manual_seed(cfg.seed)
        model = load_model(cfg.model, data.num_classes, in_channels=data.in_channels)
        if progress:
            print(f"no --checkpoint: training a base {cfg.model} on {cfg.data} for {cfg.base_epochs} epochs",
                  file=sys.stderr)
        train(model, data, epochs=max(1, cfg.base_epochs),
              config=TrainConfig(lr=cfg.base_lr, batch_size=cfg.batch_size), seed=cfg.seed,
              progress="base model" if progress else False)
        save_checkpoint(model, local, model_source=cfg.model, data=cfg.data, epochs=cfg.base_epochs, split=data.split)
        store.write_bytes("base.pt", local.read_bytes())
    return model


def prepare(cfg: SearchConfig, progress: bool = True) -> Experiment:
    """Check everything that can be checked before a trial starts; load data, model, space and costs.

    The searcher's name and options and the criterion are checked first, before any data is read
    or a base model trained.
    """
    from searchers import searcher_class

    searcher_class(cfg.searcher).check_options(cfg.searcher_options, cfg.num_samples)
    get_criterion(cfg.criterion)
    if cfg.gpus_per_trial > 0 and not torch.cuda.is_available() and not cfg.allow_cpu and not _on_cluster(cfg):
        raise ConfigError(f"gpus_per_trial is {cfg.gpus_per_trial} but this machine has no CUDA GPU; "
                          "set gpus_per_trial to 0, or pass --allow-cpu to run on the CPU")
    if cfg.constraint == "latency":
        _check_latency_target(cfg)
    exp_dir = experiment_dir(cfg.storage, cfg.name)
    data = load_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    model = _base_model(cfg, data, exp_dir, progress).cpu().eval()
    base_val_acc, _ = evaluate(model, data, "val")
    space = build_space(model, data.example_input, cfg.frozen, cfg.min_width, cfg.divisor)
    cost = CostModel(space, model)
    if cfg.constraint != "latency":
        return Experiment(cfg, exp_dir, data, model, space, cost, cost.measure(cfg.constraint), base_val_acc)
    measure = latency_model(space, model, cfg.latency_target(), grid=cfg.latency_grid, exp_dir=exp_dir,
                            progress=progress, on_target=_on_target(cfg))
    if cfg.max_latency_ms is not None:
        cfg = dataclasses.replace(cfg, budget=measure.budget_of(cfg.max_latency_ms, space.min_widths))
    if progress:
        print(f"latency on {measure.table['key']['device_name']} ({cfg.latency_device}, batch {cfg.latency_batch}, "
              f"{cfg.latency_threads} thread(s)): dense {measure.base:.3f} ms predicted; table measured in "
              f"{measure.table['measure_s']:.0f} s", file=sys.stderr)
    return Experiment(cfg, exp_dir, data, model, space, cost, measure, base_val_acc)


def _on_cluster(cfg: SearchConfig) -> bool:
    """True when the search joins a Ray cluster (its trials may run on other machines than this one)."""
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


def _check_latency_target(cfg: SearchConfig) -> None:
    """ConfigError when the latency target cannot be measured where it will be (before any expensive work)."""
    target = cfg.latency_target()
    if not _on_cluster(cfg):
        target.check_present()
    elif target.device == "cuda" and (cfg.gpus_per_trial <= 0 or cfg.allow_cpu):
        raise ConfigError("latency_device is 'cuda' but the trials reserve no GPU (gpus_per_trial "
                          f"{cfg.gpus_per_trial:g}{', allow_cpu' if cfg.allow_cpu else ''}); the table is measured "
                          "where the trials run: give gpus_per_trial > 0, or latency_device cpu")


def _on_target(cfg: SearchConfig):
    """Where latency is measured: on a cluster, a Ray task with a trial's resources (a node that runs trials);
    else here (None)."""
    if not _on_cluster(cfg):
        return None
    init_ray(cfg.address, gpus_per_trial=0 if cfg.allow_cpu else cfg.gpus_per_trial)
    return ray_task(max(cfg.cpus_per_trial, cfg.latency_threads), 0 if cfg.allow_cpu else cfg.gpus_per_trial)


def measure_top(exp: Experiment, table: pa.Table, progress: bool = True) -> dict | None:
    """Time the best `latency_top` profiles whole on the latency target; write widthsearch/latency/measured.json
    (per profile: predicted and measured ms, and measured_ratio, its time over the dense model's timed beside it).

    The best: successful rows within the budget, longest fine-tune then highest score first (a Pareto search:
    its front, best score first), one per distinct profile. Runs where the table was measured.
    """
    cfg = exp.config
    if cfg.pareto:
        ok = table.filter(pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["score"])))
        rows = results.ranked(results.pareto_front(ok, minimize="cost_ratio"))[:cfg.latency_top]
    else:
        rows = results.ranked(table, cfg.budget)[:cfg.latency_top]
    if not rows:
        return None
    call = _on_target(cfg) or (lambda fn, *args, **kwargs: fn(*args, **kwargs))
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


def init_ray(address: str | None, num_cpus: int | None = None, gpus_per_trial: float = 0.0) -> None:
    """Join `address` (or RAY_ADDRESS); otherwise start a local Ray with this machine's CPUs.

    Then fail fast (ConfigError) when a trial asks for more GPUs than the whole cluster has.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs = {"include_dashboard": False, "log_to_driver": True}
        if address:
            ray.init(address=address, **kwargs)
        else:
            # Ray starts its workers at niceness 15, so any other busy process on the machine starves the
            # trials (the search's actual work); a local search runs them at the driver's priority.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **kwargs)
    _check_gpus(gpus_per_trial, ray.cluster_resources().get("GPU", 0))


def _check_gpus(gpus_per_trial: float, cluster_gpus: float) -> None:
    """Raise ConfigError when a trial's GPUs exceed the cluster's (its trials would wait forever)."""
    if gpus_per_trial > cluster_gpus:
        raise ConfigError(f"gpus_per_trial is {gpus_per_trial:g} but the Ray cluster has {cluster_gpus:g} GPUs; "
                          "start GPU nodes (an autoscaling cluster needs min_workers >= 1 of a GPU node type), "
                          "lower gpus_per_trial, or pass --allow-cpu to run on CPUs")


def _metadata(exp: Experiment) -> dict:
    return {
        "experiment": exp.config.name, "groups": exp.space.names, "widths": exp.space.widths.tolist(),
        "min_widths": exp.space.min_widths.tolist(), "base_flops": exp.cost.base_flops,
        "base_params": exp.cost.base_params, "base_val_acc": exp.base_val_acc,
        "constraint": exp.measure.name, "base_cost": exp.measure.base, "split": exp.data.split, "num_classes": exp.data.num_classes,
        "in_channels": exp.data.in_channels, "input_size": list(exp.data.image_size),
        "config": exp.config.to_dict(),
        **({"latency": exp.measure.describe()} if exp.measure.name == "latency" else {}),
    }


def job_fields(cfg: SearchConfig, exp: Experiment) -> dict:
    """The fields every trainable's Job shares (trainables.common.Job)."""
    return dict(model=exp.model, space=exp.space, cost=exp.cost, measure=exp.measure, data=cfg.data,
                val_fraction=cfg.val_fraction, split_seed=cfg.split_seed, seed=cfg.seed, criterion=cfg.criterion,
                importance_batches=cfg.importance_batches, bn_batches=cfg.bn_batches, batch_size=cfg.batch_size)


def criterion_batches(cfg: SearchConfig, data: DataSplits) -> list | None:
    """Training batches (no augmentation) for a data-driven criterion (taylor, frs); None for the others."""
    if not get_criterion(cfg.criterion).needs_batches:
        return None
    stream = data.stream("train", cfg.batch_size, seed=cfg.seed, augment=False)
    return [next(stream) for _ in range(max(1, cfg.importance_batches))]


def run_search(cfg: SearchConfig, resume: bool = False, progress: bool = True) -> tuple[str, pa.Table]:
    """Run (or resume) a search; return the experiment directory and its results table."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from searchers import make_searcher
    from trainables import trial_job

    cfg = cfg.resolved()
    exp_dir = experiment_dir(cfg.storage, cfg.name)
    if resume:
        stored = results.load_metadata(exp_dir)["config"]  # the stored config is authoritative
        cfg = dataclasses.replace(SearchConfig(**stored), address=cfg.address or stored.get("address"))
    elif results.ResultsStore(exp_dir).exists():
        raise ConfigError(f"experiment {cfg.name!r} already exists in {cfg.storage}; "
                          "pass --resume to continue it or choose another --name")
    exp = prepare(cfg, progress)
    cfg = exp.config  # max_latency_ms became a budget ratio
    searcher = make_searcher(cfg.searcher, exp.space, exp.cost, budget=None if cfg.pareto else cfg.budget,
                             seed=cfg.seed, model=exp.model, criterion=cfg.criterion, measure=exp.measure,
                             batches=criterion_batches(cfg, exp.data), num_samples=cfg.num_samples,
                             exp_dir=exp.exp_dir, **cfg.searcher_options)
    store = results.ResultsStore.create(exp_dir, _metadata(exp), resume=resume)
    trainable_fn, job = trial_job(searcher.trainable, cfg, exp.exp_dir, job_fields(cfg, exp))
    init_ray(cfg.address)
    trainable = tune.with_resources(tune.with_parameters(trainable_fn, job=job),
                                    {"cpu": cfg.cpus_per_trial, "gpu": 0 if cfg.allow_cpu else cfg.gpus_per_trial})
    if resume and tune.Tuner.can_restore(exp_dir):
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = None
        if cfg.asha and len(cfg.rungs()) > 1:
            if searcher.promotes:
                scheduler = ASHAScheduler(time_attr="finetune_steps", max_t=cfg.finetune_steps,
                                          grace_period=cfg.min_finetune_steps, reduction_factor=cfg.reduction_factor)
            elif progress:
                print(f"note: searcher {cfg.searcher!r} scores its own trials; asha (promotion) does not apply",
                      file=sys.stderr)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=cfg.num_samples,
                                        search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.concurrency),
                                        scheduler=scheduler, reuse_actors=True),
            run_config=tune.RunConfig(
                name=cfg.name, storage_path=cfg.storage, verbose=1 if progress else 0,
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                callbacks=[results.ResultsCallback(store, cfg.name, cfg.searcher, exp.space.widths.tolist())]),
        )
    tuner.fit()
    table = results.load(exp_dir)
    if cfg.rescore_top > 0 and not cfg.pareto:
        rescore(exp, table, resume, progress)
        table = results.load(exp_dir)
    if cfg.constraint == "latency" and cfg.latency_top > 0:
        measure_top(exp, table, progress)
    return exp_dir, table


RESCORE_RUN = "rescore"


def rescore(exp: Experiment, table: pa.Table, resume: bool = False, progress: bool = True) -> None:
    """The re-scoring stage: the best `rescore_top` distinct profiles of the search (within the budget, ranked by
    `results.ranked`) each get one more trial with `rescore_steps` of fine-tuning, as a follow-up Tune run
    (RESCORE_RUN) in the same experiment; their rows (run RESCORE_RUN) rank first, so the final choice is made
    on the longer fine-tune (multi-fidelity: many short trials explore, a few long ones decide).

    Channels a searcher chose itself (payload "keep") are re-scored as `widthsearch retrain` builds them.
    """
    from ray import tune

    from trainables import trial_job

    cfg = exp.config
    main = table.filter(pc.invert(pc.equal(pc.fill_null(table["run"], results.MAIN_RUN), RESCORE_RUN)))
    rows = results.ranked(main, cfg.budget)[:cfg.rescore_top]
    if len(rows) < 2:
        return  # nothing to choose between
    candidates = [{"widths": [int(w) for w in r["widths"]], **_chosen_channels(r),
                   "payload": json.dumps({"rescore_of": r["trial_id"], "score": r["score"],
                                          "finetune_steps": r["finetune_steps"]})} for r in rows]
    longer = dataclasses.replace(cfg, finetune_steps=cfg.rescore_steps, asha=False, rescore_top=0)
    trainable_fn, job = trial_job("score", longer, exp.exp_dir, job_fields(longer, exp))
    trainable = tune.with_resources(tune.with_parameters(trainable_fn, job=job),
                                    {"cpu": cfg.cpus_per_trial, "gpu": 0 if cfg.allow_cpu else cfg.gpus_per_trial})
    path = f"{exp.exp_dir}/{RESCORE_RUN}"
    if progress:
        print(f"re-scoring the best {len(rows)} profiles with {cfg.rescore_steps} fine-tune steps", file=sys.stderr)
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        store = results.ResultsStore(exp.exp_dir)
        tuner = tune.Tuner(
            trainable, param_space={"candidate": tune.grid_search(candidates)},
            tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=cfg.concurrency,
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name=RESCORE_RUN, storage_path=exp.exp_dir, verbose=1 if progress else 0,
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                callbacks=[results.ResultsCallback(store, cfg.name, cfg.searcher, exp.space.widths.tolist(),
                                                   run=RESCORE_RUN)]))
    tuner.fit()


def budget_of(meta: dict) -> float | None:
    """The experiment's budget (a ratio of its constraint), or None for a Pareto search."""
    config = meta.get("config", {})
    return None if config.get("pareto") else config.get("budget")


def choose_trial(table: pa.Table, trial: str | None = None, *, budget: float | None = None,
                 constraint: str = "flops") -> dict:
    """The row of `trial`; else the best successful row within `budget` (`results.ranked`: the highest
    fidelity reached, then the best score, ties going to the cheaper profile).

    `budget=None` (a Pareto search without a chosen bound) is refused: there is no single best.
    """
    rows = table.to_pylist()
    if trial is not None:
        match = [r for r in rows if r["trial_id"] == trial]
        if not match:
            raise WidthSearchError(f"no trial {trial!r} in this experiment")
        if match[0]["status"] != "ok":
            raise WidthSearchError(f"trial {trial!r} did not score a profile (status {match[0]['status']}"
                                   f"{': ' + match[0]['error'] if match[0]['error'] else ''}); pick another")
        return match[0]
    ok = results.ranked(table)
    if not ok:
        raise WidthSearchError("this experiment has no successful trial yet")
    if budget is None:
        raise WidthSearchError("this experiment searched a Pareto front, so it has no single best: give --budget R "
                               f"(the best row whose {constraint} ratio is <= R) or --trial ID; "
                               "`widthsearch results EXP --pareto` lists the front")
    within = results.ranked(table, budget)
    if not within:
        smallest = min(results.cost_ratio_of(r) for r in ok)
        raise WidthSearchError(f"no successful trial within the budget {budget:g} ({constraint}): {len(ok)} ok rows, "
                               f"the smallest ratio is {smallest:.4f}; give --trial ID or a larger --budget")
    return within[0]


def _chosen_channels(row: dict) -> dict:
    """keep/weights of a row whose searcher chose the channels itself (its payload has "keep")."""
    payload = json.loads(row["payload"]) if row.get("payload") else {}
    if not isinstance(payload, dict) or "keep" not in payload:
        return {}
    return {"keep": payload["keep"], "weights": row.get("checkpoint")}


def run_retrain(exp_dir: str, *, trial: str | None = None, epochs: int = 30, lr: float = 0.05,
                from_scratch: bool = False, out: str | None = None, address: str | None = None,
                cpus: float | None = None, gpus: float | None = None, budget: float | None = None,
                timeout_s: float | None = None, progress: bool = True) -> dict:
    """Retrain one profile of an experiment as a Tune trial, report test accuracy, export it to `out`.

    Without `trial`, the row `choose_trial` picks within `budget` (default: the experiment's).
    """
    from ray import tune

    from trainables.retrain import RetrainJob, build_pruned, retrain_profile

    from .export import export

    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise WidthSearchError(f"export folder {out} already exists and is not empty")
    meta = results.load_metadata(exp_dir)
    cfg = SearchConfig(**meta["config"])
    row = choose_trial(results.load(exp_dir), trial, budget=budget if budget is not None else budget_of(meta),
                       constraint=cfg.constraint)
    exp = prepare(cfg, progress)
    job = RetrainJob(**job_fields(cfg, exp), widths=list(row["widths"]), epochs=epochs,
                     lr=lr, from_scratch=from_scratch, model_source=cfg.model, num_classes=exp.data.num_classes,
                     in_channels=exp.data.in_channels, trial_timeout_s=timeout_s, **_chosen_channels(row))
    init_ray(address or cfg.address)
    gpus = cfg.gpus_per_trial if gpus is None else gpus
    trainable = tune.with_resources(tune.with_parameters(retrain_profile, job=job),
                                    {"cpu": cpus or cfg.cpus_per_trial, "gpu": 0 if cfg.allow_cpu else gpus})
    name = f"retrain-{row['trial_id']}-e{epochs}" + ("-scratch" if from_scratch else "")
    path = f"{exp_dir}/{name}"
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(num_samples=1),
                           run_config=tune.RunConfig(name=name, storage_path=exp_dir, verbose=1 if progress else 0,
                                                     failure_config=tune.FailureConfig(max_failures=cfg.max_failures)))
    result = tuner.fit()[0]
    if result.error is not None:
        raise WidthSearchError(f"retraining trial {row['trial_id']} failed: {result.error}")
    model = build_pruned(job, torch.device("cpu"))
    with result.checkpoint.as_directory() as folder:
        model.load_state_dict(torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)["model"])
    profile = exp.space.from_vector(row["widths"])
    summary = {
        "experiment": cfg.name, "trial_id": row["trial_id"], "epochs": epochs, "from_scratch": from_scratch,
        "search_val_acc": row["val_acc"], "search_finetune_steps": row["finetune_steps"], "val_acc": result.metrics["val_acc"], "test_acc": result.metrics["test_acc"],
        "base_val_acc": exp.base_val_acc, "base_test_acc": evaluate(exp.model, exp.data, "test")[0],
        "flops": exp.cost.flops(profile), "params": exp.cost.params(profile), "flops_ratio": exp.cost.flops_ratio(profile),
        "base_flops": exp.cost.base_flops, "base_params": exp.cost.base_params,
    }
    if out is not None:
        source = {"model": cfg.model, "num_classes": exp.data.num_classes, "in_channels": exp.data.in_channels,
                  "input_size": list(exp.data.image_size), "frozen": cfg.frozen, "min_width": cfg.min_width,
                  "divisor": cfg.divisor}
        export(model, exp.model, out, profile=profile, source=source, metrics=summary,
               example_input=exp.data.example_input, check_input=exp.data.normalize(exp.data.val.x[:64]),
               preprocessing=exp.data.preprocessing())
        summary["export"] = str(out)
    return summary
