"""Timing a call: the one clock behind the latency model's tables (widthsearch.latency) and an export's
latency figures (widthsearch.export)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_ms(call: Callable[[], object], sync: Callable[[], None] = lambda: None, *, clock: str = "wall",
            warmup: int = 3, repeats: int = 15, min_repeats: int = 5, budget_s: float = 1.0,
            min_sample_s: float = 0.01) -> float:
    """Milliseconds per `call()`: up to `warmup` calls (0.1 s of them is enough), then samples of enough calls
    for >= min_sample_s each, `repeats` of them, or fewer (at least `min_repeats`) once they add up to `budget_s`.

    clock "wall": the median sample of time.perf_counter (what a user of the device sees). clock "cpu": the
    fastest sample of this process's CPU time (time.process_time): other processes only add to it (by
    thrashing caches), never take from it, so the minimum is the forward's time on an idle core.
    """
    now = time.process_time if clock == "cpu" else time.perf_counter
    elapsed = 0.0
    for i in range(max(1, warmup)):  # a long call warms up in fewer calls
        start = now()
        call()
        sync()
        elapsed = now() - start
        if elapsed * (i + 1) >= 0.1:
            break
    inner = max(1, min(1000, int(min_sample_s / max(elapsed, 1e-7))))
    samples: list[float] = []
    while len(samples) < repeats and (len(samples) < min_repeats or sum(samples) * inner < budget_s):
        start = now()
        for _ in range(inner):
            call()
        sync()
        samples.append((now() - start) / inner)
    return (min(samples) if clock == "cpu" else statistics.median(samples)) * 1e3
