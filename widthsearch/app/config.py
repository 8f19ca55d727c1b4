"""Search settings, each declared once: its type (the annotation), default, checks and help (`setting`).

The checks, the YAML keys, the CLI flags (`--key-name`) and their `--help` lines all come from these
declarations; the names of searchers, criteria, models, data sources and latency targets come from their
registries, read when a value is checked or a help line listed (so importing this module, or opening a stored
experiment, loads neither torch nor Ray). Unknown keys and bad values are ConfigErrors that name the key and the
value.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..options import Option
from ..target import CLOCKS, DEVICES, DTYPES, RUNTIMES, LatencyTarget

SCORES = ("val_acc", "val_loss")
RESUMABLE = ("num_samples", "concurrency", "address")  # the settings a resumed search may change (num_samples: up)
_KINDS = {"str": str, "float": float, "int": int, "bool": bool, "dict": dict, "list": list}


def _searchers() -> list[str]:
    from searchers import SEARCHERS

    return sorted(SEARCHERS)


def _criteria() -> list[str]:
    from ..importance import CRITERIA

    return sorted(CRITERIA)


def constraints() -> tuple[str, ...]:
    """What a budget can bound: the cost model's measures and the measured latency."""
    from ..cost import CostModel

    return (*CostModel.MEASURES, "latency")


def _model_help() -> str:
    from ..models import BUILTIN_MODELS

    return f"model source: {', '.join(BUILTIN_MODELS)}, torchvision:NAME or package.module:factory"


def _data_help() -> str:
    from ..data import SOURCES

    return f"data source: {', '.join(SOURCES.values())}"


def setting(default: Any, help: str | Callable[[], str], **checks: Any) -> Any:
    """A SearchConfig field: its default, one line of help (or a callable returning it) and its checks (the keyword
    arguments of widthsearch.options.Option: low, high, low_open, choices, item, empty). Its type is the field's
    annotation; `X | None` allows None."""
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
    model: str = setting("small_cnn", _model_help)
    checkpoint: str | None = setting(None, "base model weights; without them a base model is trained first "
                                     "(--base-epochs)", empty="to train one")
    data: str = setting("digits", _data_help)
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
                              choices=constraints)
    max_latency_ms: float | None = setting(None, "with --constraint latency: the budget in milliseconds per forward "
                                           "(replaces --budget)", low=0, low_open=True, empty="to use --budget")
    latency_device: str = setting("cpu", "device latency is measured on (on a cluster: a node that runs the trials)",
                                  choices=DEVICES)
    latency_threads: int = setting(1, "CPU threads of the latency measurements", low=1)
    latency_batch: int = setting(1, "batch size of the latency measurements (images per forward)", low=1)
    latency_dtype: str = setting("fp32", "number type of the latency measurements (fp16, bf16: on cuda)",
                                 choices=DTYPES)
    latency_runtime: str = setting("eager", "runtime of the latency measurements: eager (PyTorch) or onnxruntime "
                                   "(CPU, fp32)", choices=RUNTIMES)
    latency_clock: str = setting("wall", "wall (wall-clock median), or cpu (fastest process CPU time; 1 thread on "
                                 "a shared CPU)", choices=CLOCKS)
    latency_grid: int = setting(7, "timed widths per channel axis of each layer (more: slower to measure, closer "
                                "fit)", low=2)
    latency_top: int = setting(5, "with --constraint latency: after the search, time the best N profiles whole "
                               "(0: none)", low=0)
    fill_budget: bool = setting(False, "widen each proposal, one channel step at a time, into what rounding to "
                                "integer widths left of the budget (the group furthest below its share first)")
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
    bn_batches: int = setting(20, "train batches that re-estimate BatchNorm statistics after pruning (adaptive BN; "
                              "skipped where the fine-tune before the first report leaves them under 1%)",
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
        from searchers import check_options

        check_options(self.searcher, self.searcher_options, self.num_samples)
        return self

    @classmethod
    def stored(cls, values: Mapping[str, Any]) -> SearchConfig:
        """The settings of a stored experiment as they were checked when it was made, not checked again (so that
        opening an experiment to query it loads no registry); keys this version does not know are left out."""
        config = cls.__new__(cls)
        for key, option in declared().items():
            setattr(config, key, copy.deepcopy(values.get(key, option.default)))
        return config

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


def experiment_dir(storage: str, name: str) -> str:
    """Where experiment `name` lives under `storage` (a folder or a URI)."""
    return f"{storage.rstrip('/')}/{name}"


def absolute(storage: str) -> str:
    """A storage folder as an absolute path (`~` expanded); a URI (s3://, file://, ...) as it is."""
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} must be {what}, got {value!r}")


KEYS = [f.name for f in dataclasses.fields(SearchConfig)]


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> SearchConfig:
    """Read a YAML config (optional), apply overrides (e.g. CLI flags; None: not given), check everything."""
    return SearchConfig(**read_settings(path, overrides))


def read_settings(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings given: a YAML config's (optional) with overrides (e.g. CLI flags; None: not given) on top, not
    yet checked; an unknown key is a ConfigError."""
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
    return values


def resume_changes(stored: SearchConfig, given: Mapping[str, Any]) -> dict[str, Any]:
    """The settings `given` for resuming the `stored` search (read_settings) that change it, checked: only RESUMABLE
    ones may (num_samples only upwards, to extend the search); any other that differs is a ConfigError naming each
    one. `name` and `storage` say which experiment and are not compared."""
    options = declared()
    changed = {key: options[key].check(f"config key {key!r}", value) for key, value in given.items()
               if key not in ("name", "storage")}
    changed = {key: value for key, value in changed.items() if value != getattr(stored, key)}
    fixed = [key for key in changed if key not in RESUMABLE]
    if fixed:
        raise ConfigError("--resume cannot change " + ", ".join(
            f"{key} (stored {getattr(stored, key)!r}, given {changed[key]!r})" for key in fixed)
            + f"; these define the search: start a new experiment (another --name) to change them. A resumed search "
            f"may change {', '.join(RESUMABLE)}")
    if changed.get("num_samples", stored.num_samples) < stored.num_samples:
        raise ConfigError(f"--resume cannot lower num_samples (stored {stored.num_samples}, given "
                          f"{changed['num_samples']}): trials that ran are kept; give num_samples >= "
                          f"{stored.num_samples} (above it: more trials)")
    return changed
