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


def nested_paired_difference(a: dict, b: dict, reps: int = REPS, seed: int = 0) -> dict:
    """Method a minus reference b on the same test images, with a 95% interval.

    `a[search_seed][retrain_seed]` and `b[retrain_seed]` are per-image correctness arrays (a method that does
    not search has one "search seed"). Every retrain of both counts: the pairing is on the images, not on the
    retrain seed, since seed r of one pruned model is not coupled to seed r of another, and pairing by seed
    would drop the reference's extra retrains (a headline reference has 10, a search seed 3) and let the few
    that happen to share a seed decide the difference. The interval is a three-level bootstrap: search seeds
    resampled, then each one's retrains and the reference's retrains, then images (the same images for both),
    so it carries the search-seed, retrain-seed and test-sampling noise of both sides. Also returns the mean
    difference per search seed (`per_search_seed`: what a user running one search gets, on average over
    retrains).
    """
    searches = [s for s in sorted(a) if a[s]]
    if not searches or not b:
        raise ValueError("a method without retrains")
    ours = {s: np.stack([np.asarray(m, dtype=float) for _, m in sorted(a[s].items())]) for s in searches}
    ref = np.stack([np.asarray(m, dtype=float) for _, m in sorted(b.items())])  # retrains x images
    images = ref.shape[1]
    rng = np.random.default_rng(seed)
    draws = np.empty(reps)
    for k in range(reps):
        chosen = rng.integers(0, len(searches), len(searches))
        idx = rng.integers(0, images, images)
        mine = np.mean([ours[searches[c]][np.ix_(rng.integers(0, len(ours[searches[c]]), len(ours[searches[c]])),
                                                  idx)].mean() for c in chosen])
        draws[k] = mine - ref[np.ix_(rng.integers(0, len(ref), len(ref)), idx)].mean()
    low, high = np.percentile(draws, [2.5, 97.5])
    per = {s: float(ours[s].mean() - ref.mean()) for s in searches}
    return {"diff": float(np.mean(list(per.values()))), "low": float(low), "high": float(high),
            "search_seeds": len(searches), "retrains": sum(len(ours[s]) for s in searches),
            "reference_retrains": len(ref), "per_search_seed": per}


def spearman_ceiling(seed_accs: list[list[float]], reps: int = REPS, seed: int = 0) -> float | None:
    """The Spearman a perfect score can reach against a ground truth that is each profile's mean over noisy retrain
    seeds (`seed_accs`: one list of seed accuracies per profile), by simulation: true accuracies with the spread the
    means have less what their seed noise adds (the means shrunk toward their average by the square root of the
    reliability, 1 - seed variance of a mean / variance of the means), each observed again as the mean of as many
    seeds with the pooled seed variance; the mean Spearman of truth and observation over `reps` draws. Rank-based:
    one outlying profile counts as one rank. 0 where the noise exceeds the spread; None with fewer than 3 profiles of
    >= 2 seeds each."""
    accs = [np.asarray(a, dtype=float) for a in seed_accs if len(a) >= 2]
    if len(accs) < 3:
        return None
    seed_var = float(np.mean([np.var(a, ddof=1) for a in accs]))
    sizes = np.array([len(a) for a in accs])
    means = np.array([a.mean() for a in accs])
    spread = float(np.var(means, ddof=1))
    reliability = 1 - float(np.mean(seed_var / sizes)) / spread if spread > 0 else 0.0
    if reliability <= 0:
        return 0.0
    truth = means.mean() + (means - means.mean()) * reliability ** 0.5
    rng = np.random.default_rng(seed)
    draws = truth + rng.normal(size=(reps, len(truth))) * (seed_var / sizes) ** 0.5
    return float(np.mean([stats.spearmanr(truth, d).statistic for d in draws]))
