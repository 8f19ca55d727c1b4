"""Budget projection: scale a keep-ratio direction onto a budget of any Measure (the one repair every searcher
and the gate extraction share)."""

from __future__ import annotations

import numpy as np

from .cost import CostModel, Measure
from .errors import WidthSearchError
from .space import WidthSpace


def as_measure(cost: CostModel | Measure) -> Measure:
    """A Measure as is; a CostModel stands for its FLOPs."""
    return cost if isinstance(cost, Measure) else cost.measure("flops")


def _widths_at(scales: np.ndarray, ratios: np.ndarray, full: np.ndarray, low: np.ndarray,
               divisor: np.ndarray) -> np.ndarray:
    """Vectorised ChannelGroup.round(s * ratio * W): rows = scales x profiles, int64."""
    channels = scales[..., None] * ratios * full
    rounded = np.rint(channels / divisor) * divisor
    widths = np.where(channels >= full, full, np.clip(rounded, low, full))
    return widths.astype(np.int64)


def project_to_budget(space: WidthSpace, cost: CostModel | Measure, ratios: np.ndarray, target: float,
                      *, iterations: int = 6, grid: int = 33, low: np.ndarray | None = None) -> np.ndarray:
    """Scale keep-ratio direction(s) onto a budget of `cost` (a Measure; a CostModel means FLOPs).

    ``widths(s) = clip(round(s * ratios * W to multiples of the divisor), min, W)``; returns
    the widths at the largest ``s`` whose measure ratio is <= ``target`` (int64; one row per
    row of ``ratios`` when it is 2-D). The search is a vectorised bisection: each round
    evaluates ``grid`` scales per row in one ``measure.many`` call and keeps the bracket
    around the feasibility boundary (the measure grows monotonically with ``s``). A direction that
    fits entirely gives the full widths; one that cannot meet the target (even at ``s = 0``)
    falls back to the floor widths (`low`, legal widths per group; default: the groups' minimum widths), or to
    the minimum widths where the floor itself does not fit.
    """
    return project_with_scale(space, cost, ratios, target, iterations=iterations, grid=grid, low=low)[0]


def project_with_scale(space: WidthSpace, cost: CostModel | Measure, ratios: np.ndarray, target: float,
                       *, iterations: int = 6, grid: int = 33,
                       low: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | float]:
    """`project_to_budget` that also returns the scale(s) ``s`` found."""
    ratios = np.asarray(ratios, dtype=np.float64)
    single = ratios.ndim == 1
    r = np.atleast_2d(ratios)
    if r.shape[1] != len(space):
        raise WidthSearchError(f"expected {len(space)} ratios per profile, got {r.shape[1]}")
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise WidthSearchError("keep ratios must be finite and non-negative")
    full = space.widths.astype(np.float64)
    low = (space.min_widths if low is None else np.maximum(low, space.min_widths)).astype(np.float64)
    div = np.array([g.divisor for g in space.groups], dtype=np.float64)
    measure = as_measure(cost)
    n = len(r)

    def feasible(widths: np.ndarray) -> np.ndarray:
        return measure.ratio_many(widths.reshape(-1, len(space))).reshape(widths.shape[:-1]) <= target

    # Scale at which every group with a positive ratio reaches its full width.
    positive = np.where(r > 0, r, np.inf)
    hi = np.where(np.isfinite(positive.min(axis=1)), 1.0 / positive.min(axis=1), 0.0) * 1.000001 + 1e-12
    lo = np.zeros(n)
    steps = np.linspace(0.0, 1.0, grid)
    for _ in range(iterations):
        scales = lo[:, None] + (hi - lo)[:, None] * steps  # (n, grid)
        ok = feasible(np.stack([_widths_at(scales[:, k], r, full, low, div) for k in range(grid)], axis=1))
        # Largest feasible grid index per row (-1 when none is feasible, not even s = lo).
        last = np.where(ok.any(axis=1), grid - 1 - np.argmax(ok[:, ::-1], axis=1), -1)
        new_lo = np.where(last >= 0, scales[np.arange(n), np.maximum(last, 0)], lo)
        nxt = np.minimum(last + 1, grid - 1)
        new_hi = np.where(last < grid - 1, scales[np.arange(n), nxt], hi)
        lo, hi = new_lo, new_hi
    widths = _widths_at(lo, r, full, low, div)
    # Rows infeasible even at s = lo (only possible when the target is below the floor profile's
    # cost): fall back to the floor widths, or the minimal ones where the floor does not fit.
    bad = ~feasible(widths)
    floor = low.astype(np.int64)
    widths[bad] = floor if feasible(floor[None])[0] else space.min_widths
    lo = np.where(bad, 0.0, lo)
    return (widths[0], float(lo[0])) if single else (widths, lo)


def fill_budget(space: WidthSpace, cost: CostModel | Measure, widths: np.ndarray, target: float,
                ratios: np.ndarray | None = None) -> np.ndarray:
    """Spend what rounding left of the budget: widen one group by one step (its divisor) at a time while the
    profile stays within `target`, each time the group furthest below its share of the direction `ratios`
    (keep ratios; default the profile's own), so the profile keeps its shape.

    `project_to_budget` scales a whole direction, so integer widths leave part of the budget unused (uniform
    pruning of cifar_resnet20 to FLOPs 0.05 lands at 0.047, its groups at 3 to 14 channels; cifar_resnet56 to
    0.03 at 0.023). A group of ratio 0 and a group at its full width are never widened. Returns new int64 widths (one row per row of `widths` when 2-D); a profile
    already over `target` is returned as it is.
    """
    widths = np.asarray(widths, dtype=np.int64)
    single = widths.ndim == 1
    rows = np.atleast_2d(widths).copy()
    shares = np.atleast_2d(rows / space.widths if ratios is None else np.asarray(ratios, dtype=np.float64))
    shares = np.broadcast_to(shares, rows.shape)
    full = space.widths.astype(np.int64)
    step = np.array([g.divisor for g in space.groups], dtype=np.int64)
    measure = as_measure(cost)
    eye = np.eye(len(space), dtype=np.int64)
    for row, share in zip(rows, shares):
        if measure.ratio(row) > target:
            continue
        while True:
            grow = np.flatnonzero((share > 0) & (row < full))
            if not len(grow):
                break
            candidates = np.minimum(row + eye[grow] * step[grow, None], full)
            fits = measure.ratio_many(candidates) <= target
            if not fits.any():
                break
            grow, candidates = grow[fits], candidates[fits]
            # furthest below its share: the smallest width per unit of the direction (a ratio above 1 is capped)
            behind = row[grow] / (np.minimum(share[grow], 1.0) * full[grow])
            row[:] = candidates[int(np.argmin(behind))]
    return rows[0] if single else rows
