"""Ray and Ray Tune set-up, in one place: joining or starting Ray (and shutting down what was started here), how much
of Ray's, Tune's and Optuna's own console output shows, and running a trainable as a Tune experiment that resumes
where it stopped and that Ctrl-C or SIGTERM stops cleanly (its state saved first, then `Interrupted`)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ..errors import ConfigError

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # --verbose: the classic trial table, clearer on a terminal
# The loggers of the libraries whose console output only --verbose shows, and their level otherwise: a trial's
# failure (Tune logs it as an error, with its traceback) is expected and in its row; Ray's own failures raise.
_QUIET = {"ray": logging.CRITICAL, "optuna": logging.ERROR}
_console = {"verbose": False}  # what ray_session was asked for: Ray's, Tune's and Optuna's own output shown


class Interrupted(KeyboardInterrupt):
    """A Tune run stopped by Ctrl-C (SIGINT) or SIGTERM after Tune saved its state: it can be resumed. `run` names
    the Tune experiment (its folder or URI)."""

    def __init__(self, run: str):
        super().__init__(f"interrupted: {run}")
        self.run = run


def init_ray(address: str | None, num_cpus: int | None = None, gpus_per_trial: float = 0.0) -> None:
    """Join `address` (or RAY_ADDRESS); otherwise start a local Ray with this machine's CPUs. A Ray already
    running in this process is used as it is. Ray's own console output (its log lines, the trials' output
    forwarded to the driver) shows only in a verbose `ray_session`.

    Then fail fast (ConfigError) when a trial asks for more GPUs than the whole cluster has.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        verbose = _console["verbose"]
        kwargs = {"include_dashboard": False, "log_to_driver": verbose,
                  "logging_level": logging.INFO if verbose else _QUIET["ray"]}
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
def ray_session(verbose: bool = False) -> Iterator[None]:
    """A block after which the Ray that `init_ray` started (or joined) inside it is shut down (a Ray that was already
    running when the block began is left running), and inside which Ray's, Tune's and Optuna's own console output
    shows only when `verbose`; the loggers' levels are restored after."""
    import optuna.logging  # noqa: F401 (Optuna sets its logger's level when first imported: before it is set here)
    import ray

    running, before = ray.is_initialized(), dict(_console)
    levels = {name: logging.getLogger(name).level for name in _QUIET}
    _console["verbose"] = verbose
    for name, quiet in _QUIET.items():
        logging.getLogger(name).setLevel(logging.INFO if verbose else quiet)
    try:
        yield
    finally:
        if not running and ray.is_initialized():
            ray.shutdown()
        _console.update(before)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def tune_run(trainable: Callable, job: Any, *, name: str, storage_path: str, resources: Mapping[str, float],
             max_failures: int, resume: bool = False, tune_config: Any = None, param_space: dict | None = None,
             callbacks: Sequence = (), max_concurrent: int | None = None) -> Any:
    """Run `trainable` (its job shipped once through the object store) as the Tune experiment STORAGE_PATH/NAME
    on the running Ray, and return Tune's ResultGrid. With `resume`, an experiment that Tune can restore there
    continues (finished trials kept, unfinished and errored ones run again; `max_concurrent` replaces its
    searcher's concurrency limit); else a new one starts. Tune's status tables show only in a verbose
    `ray_session`.

    Ctrl-C (SIGINT) or SIGTERM makes Tune stop the run and save its state, then raises `Interrupted`; a second
    one ends the driver at once (KeyboardInterrupt).
    """
    from ray import tune

    runnable = tune.with_resources(tune.with_parameters(trainable, job=job), dict(resources))
    path = f"{storage_path}/{name}"
    run_config = tune.RunConfig(name=name, storage_path=storage_path, verbose=1 if _console["verbose"] else 0,
                                failure_config=tune.FailureConfig(max_failures=max_failures),
                                callbacks=list(callbacks))
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=runnable, resume_unfinished=True, resume_errored=True)
        _restored_settings(tuner, run_config, max_concurrent)
    else:
        tuner = tune.Tuner(runnable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    with _stopping_on_signals() as stopped:
        grid = tuner.fit()
    if stopped:
        raise Interrupted(path)
    return grid


def _restored_settings(tuner: Any, run_config: Any, max_concurrent: int | None) -> None:
    """Give a restored Tuner this run's console verbosity and callbacks (Tune restores the ones pickled with the
    experiment) and, when given, a new concurrency limit for its searcher. Tune offers no public setter for
    these on a restored experiment, so this is the one place that reaches into the Tuner."""
    internal = tuner._local_tuner
    restored = internal.get_run_config()
    restored.verbose, restored.callbacks = run_config.verbose, run_config.callbacks
    search_alg = internal._tune_config.search_alg
    if max_concurrent is not None and search_alg is not None:
        search_alg.set_max_concurrency(max_concurrent)


@contextlib.contextmanager
def _stopping_on_signals() -> Iterator[list]:
    """Inside the block, SIGINT and SIGTERM ask Tune's loop to stop after saving the experiment's state (through
    the handler Tune installs for SIGUSR1, which it treats as its own stop signal) instead of ending the driver;
    the yielded list is non-empty once one came. A second signal, or one before Tune's loop runs, raises
    KeyboardInterrupt. Outside the main thread (where no handler can be installed) Tune's default applies."""
    stopped: list[int] = []
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        yield stopped
        return

    def ours(signum: int, frame: Any) -> None:
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if stopped or not callable(tune_handler) or tune_handler is ours:
            raise KeyboardInterrupt
        stopped.append(signum)
        tune_handler(signum, frame)

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    disabled = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune keeps its hands off SIGINT: ours forwards it
    for sig in saved:
        signal.signal(sig, ours)
    try:
        yield stopped
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if disabled is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = disabled
