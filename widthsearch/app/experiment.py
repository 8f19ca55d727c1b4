"""A prepared experiment: its data, base model, width space, cost model and budget measure, after every check that
can be made before a trial starts."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import results
from ..cost import CostModel, Measure
from ..data import DataSplits, check_split, load_data
from ..errors import ConfigError
from ..latency import latency_model, ray_task
from ..models import checkpoint_meta, load_model, save_checkpoint
from ..space import WidthSpace, build_space
from ..training import TrainConfig, evaluate, train_base
from .config import SearchConfig, experiment_dir
from .tuning import init_ray


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
    base_recipe: dict       # how the base model was trained: epochs, lr (None where its checkpoint does not say)


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
        if progress:
            print(f"no --checkpoint: training a base {cfg.model} on {cfg.data} for {cfg.base_epochs} epochs",
                  file=sys.stderr)
        model = train_base(cfg.model, data, epochs=max(1, cfg.base_epochs),
                           config=TrainConfig(lr=cfg.base_lr, batch_size=cfg.batch_size), seed=cfg.seed,
                           progress="base model" if progress else False)
        save_checkpoint(model, local, model_source=cfg.model, data=cfg.data, epochs=max(1, cfg.base_epochs),
                        lr=cfg.base_lr, split=data.split)
        store.write_bytes("base.pt", local.read_bytes())
    return model


def base_recipe(cfg: SearchConfig) -> dict:
    """How the base model was trained (epochs, lr): its checkpoint's record (train-base writes both; None where it
    does not say), or the experiment's own base training."""
    if cfg.checkpoint:
        meta = checkpoint_meta(cfg.checkpoint)
        return {"epochs": meta.get("epochs"), "lr": meta.get("lr")}
    return {"epochs": max(1, cfg.base_epochs), "lr": cfg.base_lr}


def prepare(cfg: SearchConfig, progress: bool = True) -> Experiment:
    """Check what the settings alone cannot (a GPU, the latency target), then load the data, the base model, its
    width space and the budget's measure. The settings themselves were checked when `cfg` was made, before any
    data is read or a base model trained."""
    if cfg.gpus_per_trial > 0 and not torch.cuda.is_available() and not cfg.allow_cpu and not on_cluster(cfg):
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
        return Experiment(cfg, exp_dir, data, model, space, cost, cost.measure(cfg.constraint), base_val_acc,
                          base_recipe(cfg))
    measure = latency_model(space, model, cfg.latency_target(), grid=cfg.latency_grid, exp_dir=exp_dir,
                            progress=progress, on_target=on_target(cfg))
    if cfg.max_latency_ms is not None:
        cfg = dataclasses.replace(cfg, budget=measure.budget_of(cfg.max_latency_ms, space.min_widths))
    if progress:
        print(f"latency on {measure.table['key']['device_name']} ({cfg.latency_device}, batch {cfg.latency_batch}, "
              f"{cfg.latency_threads} thread(s)): dense {measure.base:.3f} ms predicted; table measured in "
              f"{measure.table['measure_s']:.0f} s", file=sys.stderr)
    return Experiment(cfg, exp_dir, data, model, space, cost, measure, base_val_acc, base_recipe(cfg))


def on_cluster(cfg: SearchConfig) -> bool:
    """True when the search joins a Ray cluster (its trials may run on other machines than this one)."""
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


def _check_latency_target(cfg: SearchConfig) -> None:
    """ConfigError when the latency target cannot be measured where it will be (before any expensive work)."""
    target = cfg.latency_target()
    if not on_cluster(cfg):
        target.check_present()
    elif target.device == "cuda" and (cfg.gpus_per_trial <= 0 or cfg.allow_cpu):
        raise ConfigError("latency_device is 'cuda' but the trials reserve no GPU (gpus_per_trial "
                          f"{cfg.gpus_per_trial:g}{', allow_cpu' if cfg.allow_cpu else ''}); the table is measured "
                          "where the trials run: give gpus_per_trial > 0, or latency_device cpu")


def on_target(cfg: SearchConfig):
    """Where latency is measured: on a cluster, a Ray task with a trial's resources (a node that runs trials);
    else here (None)."""
    if not on_cluster(cfg):
        return None
    init_ray(cfg.address, gpus_per_trial=0 if cfg.allow_cpu else cfg.gpus_per_trial)
    return ray_task(max(cfg.cpus_per_trial, cfg.latency_threads), 0 if cfg.allow_cpu else cfg.gpus_per_trial)


def trial_resources(cfg: SearchConfig, cpus: float | None = None, gpus: float | None = None) -> dict[str, float]:
    """What each trial reserves: `cpus`/`gpus` (default: the search's cpus_per_trial, gpus_per_trial; no GPU with
    allow_cpu)."""
    gpus = cfg.gpus_per_trial if gpus is None else gpus
    return {"cpu": cpus or cfg.cpus_per_trial, "gpu": 0 if cfg.allow_cpu else gpus}


def metadata(exp: Experiment) -> dict:
    """The experiment's metadata (widthsearch/experiment.json): groups, base costs, split, config."""
    return {
        "experiment": exp.config.name, "groups": exp.space.names, "widths": exp.space.widths.tolist(),
        "min_widths": exp.space.min_widths.tolist(), "base_flops": exp.cost.base_flops,
        "base_params": exp.cost.base_params, "base_val_acc": exp.base_val_acc,
        "constraint": exp.measure.name, "base_cost": exp.measure.base, "split": exp.data.split,
        "num_classes": exp.data.num_classes, "in_channels": exp.data.in_channels,
        "input_size": list(exp.data.image_size), "config": exp.config.to_dict(),
        **({"latency": exp.measure.describe()} if exp.measure.name == "latency" else {}),
    }


def job_fields(exp: Experiment, cfg: SearchConfig | None = None) -> dict:
    """The fields every trainable's Job shares (trainables.common.Job), from the experiment and `cfg` (default:
    the experiment's settings)."""
    cfg = cfg or exp.config
    return dict(model=exp.model, space=exp.space, cost=exp.cost, measure=exp.measure, data=cfg.data,
                val_fraction=cfg.val_fraction, split_seed=cfg.split_seed, seed=cfg.seed, criterion=cfg.criterion,
                importance_batches=cfg.importance_batches, bn_batches=cfg.bn_batches, batch_size=cfg.batch_size)
