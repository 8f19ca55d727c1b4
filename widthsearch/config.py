"""Search configuration: every key has a default, a type and a check; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError


CONSTRAINTS = ("flops", "params", "latency")
SCORES = ("val_acc", "val_loss")


@dataclass
class SearchConfig:
    """What `widthsearch search` runs. YAML keys and CLI flags have the same names (flags use dashes)."""

    name: str = ""                      # experiment name; default: MODEL-SEARCHER-TIMESTAMP
    storage: str = "runs"               # folder (or URI) holding experiments
    model: str = "small_cnn"            # model source: builtin, torchvision:NAME, package.module:factory
    checkpoint: str | None = None       # base weights; without one a base model is trained first
    data: str = "digits"                # data source: digits, npz:PATH, cifar10:ROOT, imagefolder:ROOT
    val_fraction: float = 0.1
    split_seed: int = 0                 # seeds the train/val carve; a --checkpoint must come from the same split
    seed: int = 0                       # seeds the searcher, fine-tuning and channel scoring
    searcher: str = "optuna"
    searcher_options: dict = field(default_factory=dict)
    budget: float = 0.5                 # max cost as a fraction of the base model's (see constraint)
    constraint: str = "flops"           # what the budget bounds: flops, params or latency (measured, see latency_*)
    max_latency_ms: float | None = None  # with constraint latency: the budget in ms (replaces budget)
    latency_device: str = "cpu"         # the device latency is measured on: cpu or cuda (where the trials run)
    latency_threads: int = 1
    latency_batch: int = 1
    latency_dtype: str = "fp32"         # fp32; fp16 or bf16 on cuda
    latency_runtime: str = "eager"      # eager (PyTorch) or onnxruntime (CPU)
    latency_clock: str = "wall"         # wall, or cpu (process CPU time: 1 thread on a shared CPU)
    latency_grid: int = 7               # timed widths per channel axis of every layer
    latency_top: int = 5                # after the search, the best N profiles are timed whole
    pareto: bool = False                # search the accuracy-FLOPs front instead of one budget
    num_samples: int = 16               # trials to run
    concurrency: int = 2                # trials at once
    finetune_steps: int = 50            # fine-tuning steps per trial before scoring on val
    finetune_lr: float = 0.01
    rescore_top: int = 0                # after the search, re-score the best N distinct profiles with a longer fine-tune
    rescore_steps: int = 200            # fine-tune steps of that re-scoring (more than finetune_steps)
    score: str = "val_acc"              # the trial score: val_acc, or val_loss (score = -loss)
    batch_size: int = 128
    bn_batches: int = 20                # adaptive-BN batches after pruning
    criterion: str = "l1"               # which channels go: l1, bn_scale, taylor, frs, random
    importance_batches: int = 4         # batches for data-driven criteria (taylor, frs)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    allow_cpu: bool = False             # run a GPU config on CPU when no GPU is present
    asha: bool = False                  # promotion: all trials get min_finetune_steps, the best go on (ASHA)
    min_finetune_steps: int = 10        # with asha: the cheapest fidelity (ASHA's grace period)
    reduction_factor: int = 4           # with asha: 1 in this many trials is promoted at each rung
    base_epochs: int = 8                # epochs of base training when no checkpoint is given
    base_lr: float = 0.05
    max_failures: int = 1               # retries of a crashed trial
    trial_timeout_s: float | None = None  # a trial running longer fails with a TimeoutError; None: no limit
    min_width: int = 1
    divisor: int = 1                    # widths rounded to multiples of this (e.g. 8)
    frozen: list = field(default_factory=list)  # module names never pruned
    address: str | None = None          # Ray cluster address; default RAY_ADDRESS or a local Ray

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> "SearchConfig":
        """Type- and range-check every field; raise ConfigError naming the key and the value."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, _coerce(f.name, value, f.type))
        _require(0 < self.budget <= 1, "budget", self.budget, "a fraction of the base model's cost in (0, 1]")
        _require(0 < self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "in (0, 0.5]")
        _require(self.num_samples >= 1, "num_samples", self.num_samples, "at least 1")
        _require(self.concurrency >= 1, "concurrency", self.concurrency, "at least 1")
        for key in ("finetune_steps", "bn_batches", "importance_batches", "base_epochs", "max_failures"):
            _require(getattr(self, key) >= 0, key, getattr(self, key), "at least 0")
        for key in ("finetune_lr", "base_lr", "cpus_per_trial"):
            _require(getattr(self, key) > 0, key, getattr(self, key), "positive")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")
        _require(self.rescore_top >= 0, "rescore_top", self.rescore_top, "at least 0")
        if self.rescore_top > 0:
            _require(self.rescore_steps > self.finetune_steps, "rescore_steps", self.rescore_steps,
                     f"more than finetune_steps ({self.finetune_steps}) with rescore_top > 0")
        _require(self.constraint in CONSTRAINTS, "constraint", self.constraint, f"one of: {', '.join(CONSTRAINTS)}")
        _require(self.max_latency_ms is None or self.max_latency_ms > 0, "max_latency_ms", self.max_latency_ms,
                 "positive (milliseconds) or empty")
        _require(self.max_latency_ms is None or self.constraint == "latency", "max_latency_ms", self.max_latency_ms,
                 f"empty unless constraint is latency (constraint is {self.constraint!r})")
        _require(self.latency_grid >= 2, "latency_grid", self.latency_grid, "at least 2")
        _require(self.latency_top >= 0, "latency_top", self.latency_top, "at least 0")
        self.latency_target()
        _require(self.score in SCORES, "score", self.score, f"one of: {', '.join(SCORES)}")
        _require(self.reduction_factor >= 2, "reduction_factor", self.reduction_factor, "at least 2")
        if self.asha:
            _require(1 <= self.min_finetune_steps <= self.finetune_steps, "min_finetune_steps",
                     self.min_finetune_steps, f"between 1 and finetune_steps ({self.finetune_steps}) with asha")
        _require(self.gpus_per_trial >= 0, "gpus_per_trial", self.gpus_per_trial, "at least 0")
        _require(self.trial_timeout_s is None or self.trial_timeout_s > 0, "trial_timeout_s", self.trial_timeout_s,
                 "positive (seconds) or empty")
        _require(self.min_width >= 1 and self.divisor >= 1, "min_width/divisor", (self.min_width, self.divisor),
                 "at least 1")
        if self.name and (os.sep in self.name or self.name.startswith(".")):
            raise ConfigError(f"name {self.name!r} must be a plain folder name")
        return self

    def latency_target(self):
        """The widthsearch.latency.LatencyTarget of the latency_* keys (checked: ConfigError naming the key)."""
        from .latency import LatencyTarget

        return LatencyTarget(device=self.latency_device, threads=self.latency_threads, batch=self.latency_batch,
                             dtype=self.latency_dtype, runtime=self.latency_runtime, clock=self.latency_clock)

    def rungs(self) -> list[int]:
        """Fine-tune steps at which a scoring trial reports: with asha, min_finetune_steps x reduction_factor^i
        up to finetune_steps (always the last); else finetune_steps alone."""
        steps, out = self.min_finetune_steps, []
        while self.asha and steps < self.finetune_steps:
            out.append(steps)
            steps *= self.reduction_factor
        return out + [self.finetune_steps]

    def resolved(self) -> "SearchConfig":
        """A copy with derived defaults filled in (name, absolute storage path)."""
        name = self.name or f"{self.model.replace(':', '_').replace('.', '_')}-{self.searcher}-{time.strftime('%Y%m%d-%H%M%S')}"
        storage = self.storage if "://" in self.storage else str(Path(self.storage).expanduser().resolve())
        return dataclasses.replace(self, name=name, storage=storage)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


HELP = {  # one line per SearchConfig field: the --help of its flag (`widthsearch search --help`)
    "name": "experiment name, a folder under --storage (empty: MODEL-SEARCHER-TIMESTAMP)",
    "storage": "folder, shared path or URI (s3://, gs://) that holds the experiments",
    "model": "model source: small_cnn, cifar_resnet20|32|56|110, cifar_vgg16, cifar_mobilenetv2, "
             "torchvision:NAME or package.module:factory",
    "checkpoint": "base model weights; without them a base model is trained first (--base-epochs)",
    "data": "data source: digits, npz:PATH, cifar10:ROOT, cifar100:ROOT or imagefolder:ROOT",
    "val_fraction": "share of the train split held out for validation, on which candidates are scored",
    "split_seed": "seed of the train/val carve; a --checkpoint must come from the same split (train-base records it)",
    "seed": "random seed of the base training, the searcher and the trials (not of the train/val split)",
    "searcher": "optuna, aofp, metapruning, gradient, or the baselines uniform, random, global",
    "searcher_options": "a searcher option KEY=VALUE (repeatable; see the README's Searchers section)",
    "budget": "largest cost allowed (see --constraint), as a fraction of the base model's",
    "constraint": "what the budget bounds: flops, params, or latency (measured; README: Latency budgets)",
    "max_latency_ms": "with --constraint latency: the budget in milliseconds per forward (replaces --budget)",
    "latency_device": "device latency is measured on: cpu or cuda (on a cluster: a node that runs the trials)",
    "latency_threads": "CPU threads of the latency measurements",
    "latency_batch": "batch size of the latency measurements (images per forward)",
    "latency_dtype": "number type of the latency measurements: fp32, or fp16/bf16 on cuda",
    "latency_runtime": "runtime of the latency measurements: eager (PyTorch) or onnxruntime (CPU, fp32)",
    "latency_clock": "wall (wall-clock median), or cpu (fastest process CPU time; 1 thread on a shared CPU)",
    "latency_grid": "timed widths per channel axis of each layer (more: slower to measure, closer fit)",
    "latency_top": "with --constraint latency: after the search, time the best N profiles whole (0: none)",
    "pareto": "search the front of score against the constraint's cost (FLOPs by default) instead of one budget",
    "num_samples": "number of trials (for aofp and metapruning: the most trials)",
    "concurrency": "trials running at once",
    "finetune_steps": "fine-tuning steps of each trial before it is scored on validation",
    "finetune_lr": "learning rate of the trials' fine-tuning",
    "rescore_top": "after the search, re-score the best N distinct profiles within the budget with --rescore-steps "
                   "of fine-tuning (rows of run 'rescore'; the best is then chosen among them; 0: off)",
    "rescore_steps": "fine-tune steps of the re-scoring stage (more than --finetune-steps)",
    "score": "the trial score: val_acc, or val_loss (score = -loss)",
    "batch_size": "batch size of base training, fine-tuning and BatchNorm recalibration",
    "bn_batches": "train batches that re-estimate BatchNorm statistics after pruning (adaptive BN)",
    "criterion": "which channels a pruned layer keeps: l1, bn_scale, taylor, frs or random",
    "importance_batches": "batches that score channels for the data-driven criteria (taylor, frs)",
    "cpus_per_trial": "CPUs each trial reserves (and its torch threads)",
    "gpus_per_trial": "GPUs each trial reserves; a fraction such as 0.5 shares one",
    "allow_cpu": "run a configuration with gpus_per_trial > 0 on CPUs when there is no GPU",
    "asha": "promotion (ASHA): every trial gets --min-finetune-steps, the best go on to --finetune-steps",
    "min_finetune_steps": "with --asha: the cheapest fidelity every trial gets (ASHA's grace period)",
    "reduction_factor": "with --asha: one trial in this many is promoted at each rung",
    "base_epochs": "epochs of base training when no --checkpoint is given",
    "base_lr": "learning rate of that base training",
    "max_failures": "retries of a trial that crashes (e.g. its node died)",
    "trial_timeout_s": "seconds after which a running trial fails with a TimeoutError (None: no limit)",
    "min_width": "fewest channels a pruned layer keeps",
    "divisor": "widths are rounded to multiples of this (e.g. 8 for tensor cores)",
    "frozen": "comma-separated names of modules that are never pruned",
    "address": "Ray cluster address to join (None: RAY_ADDRESS, else a local Ray)",
}

_TYPES = {"str": str, "float": float, "int": int, "bool": bool, "dict": dict, "list": list}


def _coerce(key: str, value: Any, annotation: str) -> Any:
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r} must not be empty")
    kind = _TYPES[annotation.split("|")[0].strip()]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"config key {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} must be {what}, got {value!r}")


KEYS = [f.name for f in dataclasses.fields(SearchConfig)]


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> SearchConfig:
    """Read a YAML config (optional), apply overrides (e.g. CLI flags), check everything."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys to values")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; known keys: {', '.join(KEYS)}")
    return SearchConfig(**values)
