"""What every trainable shares: the job description, thread/device setup, data cache."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from widthsearch.cost import CostModel, Measure
from widthsearch.data import DataSplits, load_data
from widthsearch.importance import criterion_batches
from widthsearch.space import WidthSpace
from widthsearch.storage import filesystem
from widthsearch.surgery import prune
from widthsearch.training import pick_device, set_threads


@dataclass
class Job:
    """Everything a trial needs besides its config; shipped once through the object store."""

    model: nn.Module            # base model, CPU
    space: WidthSpace
    cost: CostModel
    measure: Measure            # what the budget bounds (FLOPs, params or latency)
    data: str
    val_fraction: float
    split_seed: int             # seeds the train/val carve (fixed for an experiment and its base model)
    seed: int                   # seeds fine-tuning, importance batches, searchers
    criterion: str
    importance_batches: int
    bn_batches: int
    batch_size: int

    def splits(self) -> DataSplits:
        """The experiment's data splits, loaded once per worker process."""
        return cached_data(self.data, self.val_fraction, self.split_seed)


@functools.lru_cache(maxsize=2)
def cached_data(source: str, val_fraction: float, seed: int) -> DataSplits:
    """Load a data source once per worker process (trials reuse actors)."""
    return load_data(source, val_fraction=val_fraction, seed=seed)


def setup_trial() -> tuple[torch.device, str]:
    """Torch threads = CPUs of this trial; CUDA when it has a GPU. Returns (device, node as "IP/NODE_ID")."""
    import ray
    from ray import tune

    resources = tune.get_context().get_trial_resources().required_resources
    set_threads(resources.get("CPU", 1))
    node = f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()}"
    return pick_device(resources.get("GPU", 0)), node


def begin_trial(job: Job) -> tuple[torch.device, str, DataSplits, float]:
    """What every trial does first: torch threads = its CPUs, its device and node ("IP/NODE_ID"), the
    experiment's data splits (cached per worker), and its start time."""
    started = time.time()
    device, node = setup_trial()
    return device, node, job.splits(), started


@dataclass
class Phases:
    """Seconds a trial spent in each of its phases (reported as `phase_s`: where a trial's wall time goes), and
    the CPU-seconds its process used since the trial began (`cpu_s`: its compute, whatever the machine's load)."""

    seconds: dict[str, float] = field(default_factory=dict)
    cpu_start: float = field(default_factory=time.process_time)

    def cpu_s(self) -> float:
        """CPU-seconds of this process (all its threads) since the trial began."""
        return time.process_time() - self.cpu_start

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the block and add its seconds to phase `name`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def run_with_deadline(seconds: float | None, body: Callable[[], None]) -> None:
    """Run `body`; if it is still running after `seconds`, raise TimeoutError naming trial_timeout_s.

    The body runs in a daemon thread, so even a call stuck in C code cannot hold the trial past its
    deadline; Tune discards the actor of a failed trial, and the stuck thread with it.
    """
    if seconds is None:
        body()
        return
    errors: list[BaseException] = []

    def target() -> None:
        try:
            body()
        except BaseException as exc:  # handed to the trial's own thread below
            errors.append(exc)

    worker = threading.Thread(target=target, name="widthsearch-trial", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"trial exceeded trial_timeout_s={seconds:g}")
    if errors:
        raise errors[0]


def pruned_model(job: Job, widths, data: DataSplits, device: torch.device, keep: dict | None = None,
                 weights: str | None = None) -> nn.Module:
    """A profile's pruned model: exactly the channels `keep` (of `weights`, a dense-shaped state dict's path or
    URI, else the base weights) when a searcher chose them, else the job's criterion on the base weights."""
    if keep is not None:
        model = job.model
        if weights:
            fs, path = filesystem(weights)
            with fs.open_input_stream(path) as f:
                saved = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
            model = copy.deepcopy(job.model)
            model.load_state_dict(saved["state_dict"])
        return prune(model, job.space, keep=keep).to(device)
    batches = criterion_batches(job.criterion, data, batch_size=job.batch_size, count=job.importance_batches,
                                seed=job.seed, device=device)
    return prune(job.model, job.space, job.space.from_vector(widths), job.criterion, batches, seed=job.seed).to(device)


def profile_fields(job: Job, widths, criterion: str, node: str, started: float,
                   payload: Mapping | str | None) -> dict:
    """The report fields every scoring trial shares: widths, their FLOPs/params, the constraint's ratio (cost_ratio),
    the predicted latency (latency_ms, under a latency constraint), criterion, node, start, payload (the searcher's,
    stored as JSON text)."""
    profile = job.space.from_vector(widths)
    return {"widths": [int(w) for w in widths], "flops": job.cost.flops(profile), "params": job.cost.params(profile),
            "flops_ratio": job.cost.flops_ratio(profile), "cost_ratio": job.measure.ratio(widths),
            "latency_ms": job.measure.of(widths) if job.measure.name == "latency" else None,
            "criterion": criterion, "node": node,
            "started_at": started, "payload": payload}
