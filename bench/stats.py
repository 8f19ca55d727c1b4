"""Statistics for the bench tables: rank correlations and paired accuracy differences with bootstrap intervals."""

from __future__ import annotations

import numpy as np
from scipy import stats

REPS = 2000


def rank_correlations(x, y, reps: int = REPS, seed: int = 0) -> dict:
    """Spearman and Kendall of x vs y, each with a 95% bootstrap interval (profiles resampled)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    out = {"n": len(x)}
    rng = np.random.default_rng(seed)
    for name, fn in (("spearman", lambda a, b: stats.spearmanr(a, b).statistic),
                     ("kendall", lambda a, b: stats.kendalltau(a, b).statistic)):
        value = float(fn(x, y)) if len(x) > 2 else float("nan")
        draws = []
        for _ in range(reps if len(x) > 3 else 0):
            idx = rng.integers(0, len(x), len(x))
            if len(set(idx)) > 2:
                draws.append(fn(x[idx], y[idx]))
        draws = [d for d in draws if np.isfinite(d)]
        low, high = (np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan")))
        out[name] = (value, float(low), float(high))
    return out


def paired_difference(a: list[np.ndarray], b: list[np.ndarray], reps: int = REPS, seed: int = 0) -> dict:
    """Mean accuracy of method a minus method b over seeds, on the same test images, with a 95% interval.

    `a[s]`, `b[s]` are per-image correctness arrays of seed s (paired by seed and image). The interval is a
    hierarchical bootstrap: seeds resampled, then images resampled (the same images for both methods), so
    it carries both the retrain-seed noise and the test-set sampling noise.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    seeds, images = a.shape
    rng = np.random.default_rng(seed)
    diffs = a - b  # seeds x images
    draws = np.empty(reps)
    for r in range(reps):
        s = rng.integers(0, seeds, seeds)
        i = rng.integers(0, images, images)
        draws[r] = diffs[np.ix_(s, i)].mean()
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"diff": float(diffs.mean()), "low": float(low), "high": float(high), "seeds": seeds,
            "per_seed": diffs.mean(axis=1).tolist()}
