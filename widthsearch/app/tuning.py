"""Ray and Ray Tune set-up, in one place: joining or starting Ray (and shutting down what was started here), and
running a trainable as a Tune experiment that resumes where it stopped."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ..errors import ConfigError

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic trial table: clearer on a terminal


def init_ray(address: str | None, num_cpus: int | None = None, gpus_per_trial: float = 0.0) -> None:
    """Join `address` (or RAY_ADDRESS); otherwise start a local Ray with this machine's CPUs. A Ray already
    running in this process is used as it is.

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
    check_gpus(gpus_per_trial, ray.cluster_resources().get("GPU", 0))


def check_gpus(gpus_per_trial: float, cluster_gpus: float) -> None:
    """Raise ConfigError when a trial's GPUs exceed the cluster's (its trials would wait forever)."""
    if gpus_per_trial > cluster_gpus:
        raise ConfigError(f"gpus_per_trial is {gpus_per_trial:g} but the Ray cluster has {cluster_gpus:g} GPUs; "
                          "start GPU nodes (an autoscaling cluster needs min_workers >= 1 of a GPU node type), "
                          "lower gpus_per_trial, or pass --allow-cpu to run on CPUs")


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """A block after which the Ray that `init_ray` started (or joined) inside it is shut down; a Ray that was
    already running when the block began is left running."""
    import ray

    running = ray.is_initialized()
    try:
        yield
    finally:
        if not running and ray.is_initialized():
            ray.shutdown()


def tune_run(trainable: Callable, job: Any, *, name: str, storage_path: str, resources: Mapping[str, float],
             max_failures: int, resume: bool = False, progress: bool = True, tune_config: Any = None,
             param_space: dict | None = None, callbacks: Sequence = ()) -> Any:
    """Run `trainable` (its job shipped once through the object store) as the Tune experiment STORAGE_PATH/NAME
    on the running Ray, and return Tune's ResultGrid. With `resume`, an experiment that Tune can restore there
    continues (finished trials kept, unfinished and errored ones run again); else a new one starts."""
    from ray import tune

    runnable = tune.with_resources(tune.with_parameters(trainable, job=job), dict(resources))
    path = f"{storage_path}/{name}"
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=runnable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            runnable, param_space=param_space, tune_config=tune_config,
            run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=1 if progress else 0,
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      callbacks=list(callbacks)))
    return tuner.fit()
