"""Search settings, each declared once: its type (the annotation), default, checks and help (`setting`).

The checks, the YAML keys, the CLI flags (`--key-name`) and their `--help` lines all come from these
declarations; the names of searchers, criteria, models, data sources and latency targets come from their
registries. Unknown keys and bad values are ConfigErrors that name the key and the value.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..cost import CostModel
from ..data import SOURCES
from ..errors import ConfigError
from ..latency import CLOCKS, DEVICES, DTYPES, RUNTIMES, LatencyTarget
from ..models import BUILTIN_MODELS
from ..options import Option

CONSTRAINTS = (*CostModel.MEASURES, "latency")
SCORES = ("val_acc", "val_loss")
_KINDS = {"str": str, "float": float, "int": int, "bool": bool, "dict": dict, "list": list}


def _searchers() -> list[str]:
    from searchers import SEARCHERS

    return sorted(SEARCHERS)


def _criteria() -> list[str]:
    from ..importance import CRITERIA

    return sorted(CRITERIA)


def setting(default: Any, help: str, **checks: Any) -> Any:
    """A SearchConfig field: its default, one line of help and its checks (the keyword arguments of
    widthsearch.options.Option: low, high, low_open, choices, item, empty). Its type is the field's annotation;
    `X | None` allows None."""
    metadata = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SearchConfig:
    """What a search runs (`widthsearch.Search`, `widthsearch search`). YAML keys and CLI flags have the same
    names (flags use dashes)."""

    name: str = setting("", "experiment name, a folder under --storage (empty: MODEL-SEARCHER-TIMESTAMP)")
    storage: str = setting("runs", "folder, shared path or URI (s3://, gs://) that holds the experiments")
    model: str = setting("small_cnn", f"model source: {', '.join(BUILTIN_MODELS)}, torchvision:NAME or "
                         "package.module:factory")
    checkpoint: str | None = setting(None, "base model weights; without them a base model is trained first "
                                     "(--base-epochs)", empty="to train one")
    data: str = setting("digits", f"data source: {', '.join(SOURCES.values())}")
    val_fraction: float = setting(0.1, "share of the train split held out for validation, on which candidates are "
                                  "scored", low=0, low_open=True, high=0.5)
    split_seed: int = setting(0, "seed of the train/val carve; a --checkpoint must come from the same split "
                              "(train-base records it)")
    seed: int = setting(0, "random seed of the base training, the searcher and the trials (not of the train/val "
                        "split)")
    searcher: str = setting("optuna", "the search algorithm (README: Searchers)", choices=_searchers)
    searcher_options: dict = setting({}, "a searcher option KEY=VALUE (repeatable; listed below)")
    budget: float = setting(0.5, "largest cost allowed (see --constraint), as a fraction of the base model's",
                            low=0, low_open=True, high=1)
    constraint: str = setting("flops", "what the budget bounds (latency: measured; README: Latency budgets)",
                              choices=CONSTRAINTS)
    max_latency_ms: float | None = setting(None, "with --constraint latency: the budget in milliseconds per forward "
                                           "(replaces --budget)", low=0, low_open=True, empty="to use --budget")
    latency_device: str = setting("cpu", "device latency is measured on (on a cluster: a node that runs the trials)",
                                  choices=DEVICES)
    latency_threads: int = setting(1, "CPU threads of the latency measurements", low=1)
    latency_batch: int = setting(1, "batch size of the latency measurements (images per forward)", low=1)
    latency_dtype: str = setting("fp32", "number type of the latency measurements (fp16, bf16: on cuda)",
                                 choices=tuple(DTYPES))
    latency_runtime: str = setting("eager", "runtime of the latency measurements: eager (PyTorch) or onnxruntime "
                                   "(CPU, fp32)", choices=RUNTIMES)
    latency_clock: str = setting("wall", "wall (wall-clock median), or cpu (fastest process CPU time; 1 thread on "
                                 "a shared CPU)", choices=CLOCKS)
    latency_grid: int = setting(5, "timed widths per channel axis of each layer (more: slower to measure, closer "
                                "fit)", low=2)
    latency_top: int = setting(5, "with --constraint latency: after the search, time the best N profiles whole "
                               "(0: none)", low=0)
    pareto: bool = setting(False, "search the front of score against the constraint's cost instead of one budget")
    num_samples: int = setting(16, "number of trials (for aofp and metapruning: the most trials)", low=1)
    concurrency: int = setting(2, "trials running at once", low=1)
    finetune_steps: int = setting(50, "fine-tuning steps of each trial before it is scored on validation (a row's "
                                  "steps_reached says how many it got)", low=0)
    finetune_lr: float = setting(0.01, "learning rate of the trials' fine-tuning", low=0, low_open=True)
    rescore_top: int = setting(0, "after the search, re-score the best N distinct profiles within the budget with "
                               "--rescore-steps of fine-tuning (rows of run 'rescore'; the best is then chosen "
                               "among them; 0: off)", low=0)
    rescore_steps: int = setting(200, "fine-tune steps of the re-scoring stage (more than --finetune-steps)", low=1)
    score: str = setting("val_acc", "the trial score (val_loss: score = -loss)", choices=SCORES)
    batch_size: int = setting(128, "batch size of base training, fine-tuning and BatchNorm recalibration", low=1)
    bn_batches: int = setting(20, "train batches that re-estimate BatchNorm statistics after pruning (adaptive BN)",
                              low=0)
    criterion: str = setting("l1", "which channels a pruned layer keeps", choices=_criteria)
    importance_batches: int = setting(4, "batches that score channels for the data-driven criteria (taylor, frs)",
                                      low=0)
    cpus_per_trial: float = setting(1.0, "CPUs each trial reserves (and its torch threads)", low=0, low_open=True)
    gpus_per_trial: float = setting(0.0, "GPUs each trial reserves; a fraction such as 0.5 shares one", low=0)
    allow_cpu: bool = setting(False, "run a configuration with gpus_per_trial > 0 on CPUs when there is no GPU")
    asha: bool = setting(False, "promotion (ASHA): every trial gets --min-finetune-steps, the best go on to "
                         "--finetune-steps")
    min_finetune_steps: int = setting(10, "with --asha: the cheapest fidelity every trial gets (ASHA's grace "
                                      "period)", low=1)
    reduction_factor: int = setting(4, "with --asha: one trial in this many is promoted at each rung", low=2)
    base_epochs: int = setting(8, "epochs of base training when no --checkpoint is given", low=0)
    base_lr: float = setting(0.05, "learning rate of that base training", low=0, low_open=True)
    max_failures: int = setting(1, "retries of a trial that crashes (e.g. its node died)", low=0)
    trial_timeout_s: float | None = setting(None, "seconds after which a running trial fails with a TimeoutError",
                                            low=0, low_open=True, empty="for no limit")
    min_width: int = setting(1, "fewest channels a pruned layer keeps", low=1)
    divisor: int = setting(1, "widths are rounded to multiples of this (e.g. 8 for tensor cores)", low=1)
    frozen: list = setting([], "comma-separated names of modules that are never pruned", item=str)
    address: str | None = setting(None, "Ray cluster address to join", empty="for RAY_ADDRESS, else a local Ray")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> SearchConfig:
        """Check (and coerce) every field against its declaration, then the rules across fields; raise ConfigError
        naming the key and the value."""
        for key, option in declared().items():
            setattr(self, key, option.check(f"config key {key!r}", getattr(self, key)))
        if self.name and (os.sep in self.name or self.name.startswith(".")):
            raise ConfigError(f"name {self.name!r} must be a plain folder name")
        if self.rescore_top > 0:
            _require(self.rescore_steps > self.finetune_steps, "rescore_steps", self.rescore_steps,
                     f"more than finetune_steps ({self.finetune_steps}) with rescore_top > 0")
        _require(self.max_latency_ms is None or self.constraint == "latency", "max_latency_ms", self.max_latency_ms,
                 f"empty unless constraint is latency (constraint is {self.constraint!r})")
        if self.asha:
            _require(self.min_finetune_steps <= self.finetune_steps, "min_finetune_steps", self.min_finetune_steps,
                     f"between 1 and finetune_steps ({self.finetune_steps}) with asha")
        self.latency_target()
        from searchers import searcher_class

        searcher_class(self.searcher).check_options(self.searcher_options, self.num_samples)
        return self

    def latency_target(self) -> LatencyTarget:
        """The widthsearch.latency.LatencyTarget of the latency_* keys (checked: ConfigError naming the key)."""
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

    def resolved(self) -> SearchConfig:
        """A copy with derived defaults filled in (name, absolute storage path)."""
        name = self.name or f"{self.model.replace(':', '_').replace('.', '_')}-{self.searcher}-{time.strftime('%Y%m%d-%H%M%S')}"
        return dataclasses.replace(self, name=name, storage=absolute(self.storage))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def declared() -> dict[str, Option]:
    """Every SearchConfig key's declaration as an Option (kind and default from the field, the rest from
    `setting`)."""
    out = {}
    for f in dataclasses.fields(SearchConfig):
        kind, _, rest = f.type.partition("|")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out[f.name] = Option(default, _KINDS[kind.strip()], optional="None" in rest, **f.metadata)
    return out


def absolute(storage: str) -> str:
    """A storage folder as an absolute path (`~` expanded); a URI (s3://, file://, ...) as it is."""
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} must be {what}, got {value!r}")


KEYS = [f.name for f in dataclasses.fields(SearchConfig)]


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> SearchConfig:
    """Read a YAML config (optional), apply overrides (e.g. CLI flags; None: not given), check everything."""
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
