"""Timing a call: the one clock behind the latency model's tables (widthsearch.latency) and an export's
latency figures (widthsearch.export), with the allocator held steady while it runs (`steady_allocator`)."""

from __future__ import annotations

import ctypes
import functools
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.cache
def steady_allocator() -> bool:
    """Make glibc's malloc keep the memory a forward frees, for the rest of this process; True where it applied
    (glibc), False elsewhere (other C libraries: left as they are).

    Why: glibc serves every block above its mmap threshold (128 KiB, raised by what the process freed before)
    with a fresh mmap and returns it on free, so each large activation costs page faults on every call. A
    cifar_resnet56 forward at batch 64 took ~34,000 minor faults per call under the default and none after
    this; the same dense model timed 193 ms early in a process and 136 ms late in it (bench/latency.py,
    2026-12-06: the table and the profiles it predicted were timed under different allocator states). The
    steady state here is what a serving process reaches with jemalloc or tcmalloc (the allocators PyTorch's CPU
    performance guide recommends) and what ONNX Runtime's arena gives: no mmap for heap blocks
    (M_MMAP_MAX 0) and no trimming of the heap's top (M_TRIM_THRESHOLD 2 GiB). Cost: the process keeps its
    peak heap instead of returning it to the system."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: its C library, without find_library's subprocess
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except OSError:
        return False


@functools.cache
def last_level_cache_bytes() -> int:
    """The size of this CPU's largest cache (Linux sysfs: the highest level's data or unified cache of cpu0); 0
    where it cannot be read."""
    best = (0, 0)
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind in ("Data", "Unified") and size[:-1].isdigit():
            units = {"K": 2**10, "M": 2**20, "G": 2**30}
            best = max(best, (int(level), int(size[:-1]) * units.get(size[-1], 1)))
    return best[1]


@functools.cache
def _eviction_buffer() -> np.ndarray:
    return np.ones(max(2 * last_level_cache_bytes(), 2**26) // 8, dtype=np.int64)


def evict_caches() -> None:
    """Push what the last calls left in this core's caches out to memory: read a buffer of twice the last-level
    cache (at least 64 MiB; allocated on the first call and kept), so the next call finds its weights where a model
    that outgrows the cache leaves them."""
    _eviction_buffer().sum()


def read_ns_per_byte(sizes: list[int], min_s: float = 0.01, rounds: int = 9) -> list[float]:
    """Nanoseconds per byte of reading a buffer of each size (bytes) again and again (the median of `rounds`
    samples of >= `min_s` each, the sizes taken in turn within each round, so that a burst of other work on a
    shared machine touches every size alike instead of bending the curve at one): flat while the buffer stays in
    the caches, rising where it outgrows what the caches hold for this process (on a shared VM, less than the
    cache's nominal size), flat again beyond."""
    steady_allocator()
    buffers = [np.ones(max(1, size // 8), dtype=np.int64) for size in sizes]
    samples: list[list[float]] = [[] for _ in sizes]
    for _ in range(rounds):
        for buffer, out in zip(buffers, samples):
            buffer.sum()
            calls, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < min_s or calls == 0:
                buffer.sum()
                calls += 1
            out.append(elapsed / calls / buffer.nbytes * 1e9)
    return [float(np.median(out)) for out in samples]


def time_ms(call: Callable[[], object], sync: Callable[[], None] = lambda: None, *, clock: str = "wall",
            warmup: int = 3, repeats: int = 15, min_repeats: int = 5, budget_s: float = 1.0,
            min_sample_s: float = 0.01, before: Callable[[], object] | None = None) -> float:
    """Milliseconds per `call()`: up to `warmup` calls (0.1 s of them is enough), then samples of enough calls
    for >= min_sample_s each, `repeats` of them, or fewer (at least `min_repeats`) once they add up to `budget_s`.
    `before`: run before every sample, off the clock, each sample then being one call (e.g. `evict_caches`).

    clock "wall": the median sample of time.perf_counter (what a user of the device sees). clock "cpu": the
    fastest sample of this process's CPU time (time.process_time): other processes only add to it (by
    thrashing caches), never take from it, so the minimum is the forward's time on an idle core.
    The allocator is made steady first (`steady_allocator`).
    """
    steady_allocator()
    now = time.process_time if clock == "cpu" else time.perf_counter
    elapsed = 0.0
    for i in range(max(1, warmup)):  # a long call warms up in fewer calls
        start = now()
        call()
        sync()
        elapsed = now() - start
        if elapsed * (i + 1) >= 0.1:
            break
    inner = 1 if before else max(1, min(1000, int(min_sample_s / max(elapsed, 1e-7))))
    samples: list[float] = []
    while len(samples) < repeats and (len(samples) < min_repeats or sum(samples) * inner < budget_s):
        if before:
            before()
            sync()
        start = now()
        for _ in range(inner):
            call()
        sync()
        samples.append((now() - start) / inner)
    return (min(samples) if clock == "cpu" else statistics.median(samples)) * 1e3
