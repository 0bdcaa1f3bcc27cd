"""Slopes of ``riemann-bench stability``'s distances against damping and training-set size.

Reads the pairs that :mod:`riemann_core.studies.stability` trained (``pairs.csv``) and fits
``log D`` against ``log mu`` and ``log n`` by least squares, with 95% intervals from a
cluster bootstrap over the pair seeds, setting each slope beside the stability bound's
exponent (``D ~ mu^-1 n^-1/2``).

The fits take the grid points (method, damping, size) where every pair trained
(:func:`complete_points`): where some did not, the ones that did are those that happened
to train, and their distances are no sample of the method's at that point (on a 2-core
run, the one pair of five that trained at ``mu = 1e-3, n = 1200`` gave that point's
"median", and the size slope at ``mu = 1e-3`` read -1.54, falling faster than the bound,
where all pairs' distances grew with ``n``: the larger sets blew up). Every fit says how
many points it left out.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas is imported where it is used: `riemann-bench` runs without it
    import pandas as pd

#: the distances measured between the two models of a pair
METRICS = ("param_distance", "prediction_distance", "loss_gap")
#: the bound's exponents: distance ~ mu^-1 n^-1/2
PREDICTED = {"damping": -1.0, "size": -0.5}


#: bootstrap resamples of a slope's interval (or fewer: :func:`exact_bootstrap`)
N_BOOT = 2000


def exact_bootstrap(k: int, n_boot: int = N_BOOT) -> bool:
    """Whether ``k`` pair seeds take the exact bootstrap (:func:`cluster_fit`): at most
    ``n_boot`` distinct resamples, ``C(2k - 1, k)``."""
    return math.comb(2 * k - 1, k) <= n_boot


#: the columns of a grid point
POINT = ["method", "damping", "size"]


def point_counts(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per grid point: its pairs and how many of them trained (status ``ok``)."""
    return (
        pairs.assign(ok=pairs["status"] == "ok")
        .groupby(POINT, sort=False)
        .agg(pairs=("pair", "nunique"), trained=("ok", "sum"))
        .reset_index()
    )


def complete_points(pairs: pd.DataFrame) -> pd.DataFrame:
    """The pairs of the grid points where every pair trained: those the fits take."""
    counts = point_counts(pairs)
    complete = counts.loc[counts["trained"] == counts["pairs"], POINT]
    return pairs[pairs["status"] == "ok"].merge(complete, on=POINT)


def _left_out(points: pd.DataFrame, group: pd.DataFrame) -> int:
    """How many of the grid points ``points`` (of one fit) ``group`` lacks."""
    kept = set(map(tuple, group[POINT].drop_duplicates().to_numpy().tolist()))
    return sum(tuple(p) not in kept for p in points[POINT].to_numpy().tolist())


def slopes(pairs: pd.DataFrame, *, seed: int = 0, n_boot: int = N_BOOT) -> pd.DataFrame:
    """Log-log slope of every metric along ``damping`` (at each ``size``) and along ``size``
    (at each ``damping``), per method: least squares over the pairs of the grid points
    where every pair trained, a 95% interval from resampling the pair seeds, the verdict
    against the bound's exponent, and how many grid points of the line were left out (a
    line with too few such points gets a row that says so)."""
    import pandas as pd

    ok, counts = complete_points(pairs), point_counts(pairs)
    rows = []
    for method, by_method in counts.groupby("method", sort=False):
        for axis, other in (("damping", "size"), ("size", "damping")):
            for fixed, line in by_method.groupby(other):
                group = ok[(ok["method"] == method) & (ok[other] == fixed)]
                for metric in METRICS:
                    fit = cluster_fit(group, metric, (axis,), seed=seed, n_boot=n_boot)
                    rows.append(
                        {
                            "method": method,
                            "axis": axis,
                            "at": f"{'n' if other == 'size' else 'mu'}={fixed:g}",
                            "metric": metric,
                            **(_judged(fit, 1, axis) if fit else _not_fitted(axis, (axis,))),
                            "points left out": _left_out(line, group),
                        }
                    )
    return pd.DataFrame(rows)


def joint_slopes(pairs: pd.DataFrame, *, seed: int = 0, n_boot: int = N_BOOT) -> pd.DataFrame:
    """``log D = a + b log mu + c log n`` by least squares over the pairs of a method at the
    grid points where every pair trained, with 95% intervals from resampling the pair seeds
    (each seed's whole grid kept together), and how many grid points were left out (a
    method with too few such points gets rows that say so)."""
    import pandas as pd

    ok, counts = complete_points(pairs), point_counts(pairs)
    rows = []
    for method, points in counts.groupby("method", sort=False):
        group = ok[ok["method"] == method]
        left_out = _left_out(points, group)
        for metric in METRICS:
            fit = cluster_fit(group, metric, ("damping", "size"), seed=seed, n_boot=n_boot)
            for i, axis in ((1, "damping"), (2, "size")):
                rows.append(
                    {
                        "method": method,
                        "metric": metric,
                        "axis": axis,
                        **(
                            _judged(fit, i, axis) if fit else _not_fitted(axis, ("damping", "size"))
                        ),
                        "points left out": left_out,
                    }
                )
    return pd.DataFrame(rows)


def _not_fitted(axis: str, axes: tuple[str, ...]) -> dict:
    """The row of a fit along ``axes`` with fewer than two values of one of them to fit."""
    return {
        "slope": math.nan,
        "low": math.nan,
        "high": math.nan,
        "predicted": PREDICTED[axis],
        "verdict": f"not fitted: fewer than two values of {' or of '.join(axes)} where every "
        "pair trained (at a positive distance)",
    }


#: Pair seeds a bootstrap interval needs: resampling ``k`` seeds gives ``C(2k - 1, k)``
#: distinct resamples (3 for 2 seeds, 10 for 3, 126 for 5), too few below 5 to bound a
#: slope (with 2 seeds the interval is the two seeds' own slopes).
MIN_PAIRS = 5


def cluster_fit(
    data: pd.DataFrame, metric: str, axes: tuple[str, ...], *, seed: int, n_boot: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """Least squares of ``log metric`` on ``1, log axes...`` over the pairs with a positive
    distance, and bootstrap coefficient vectors, each refitted on a resample of the pair
    seeds with all of a seed's points kept together (a pair's ``S``, ``S'`` is shared across
    the grid, so its points are not independent); none with fewer than :data:`MIN_PAIRS`
    seeds. ``None`` when the points span fewer than two values of an axis.

    Where the ``k`` seeds have at most ``n_boot`` distinct resamples (``C(2k - 1, k)``: 126
    for 5 seeds, 1716 for 7), each is fitted once, with its weight, the number of the
    ``k^k`` equally likely draws that give it (``k! / prod m_i!`` for counts ``m_i``): the
    exact bootstrap distribution (found by a hunt: 2,000 random draws from 126 resamples
    put an interval's end on either side of a verdict's bound, seed by seed). Otherwise
    ``n_boot`` random resamples, weights ``None``."""
    data = data[data[metric] > 0]
    if any(data[axis].nunique() < 2 for axis in axes):
        return None
    design = np.column_stack([np.ones(len(data)), *(np.log(data[axis]) for axis in axes)])
    target = np.log(data[metric].to_numpy())
    coef = np.linalg.lstsq(design, target, rcond=None)[0]
    pair = data["pair"].to_numpy()
    rows_of = [np.flatnonzero(pair == p) for p in np.unique(pair)]
    k = len(rows_of)
    exact = exact_bootstrap(k, n_boot)
    if k < MIN_PAIRS:
        draws, weights = [], []
    elif exact:
        draws = list(itertools.combinations_with_replacement(range(k), k))
        weights = [
            math.factorial(k) / math.prod(math.factorial(draw.count(i)) for i in set(draw))
            for draw in draws
        ]
    else:
        rng = np.random.default_rng(seed)
        draws, weights = [rng.integers(0, k, k) for _ in range(n_boot)], [1.0] * n_boot
    boots, kept = [], []
    for draw, weight in zip(draws, weights, strict=True):
        take = np.concatenate([rows_of[i] for i in draw])
        if np.linalg.matrix_rank(design[take]) == design.shape[1]:
            boots.append(np.linalg.lstsq(design[take], target[take], rcond=None)[0])
            kept.append(weight)
    boots = np.array(boots).reshape(-1, design.shape[1])
    return coef, boots, np.array(kept) if exact else None


def weighted_percentiles(values: np.ndarray, weights: np.ndarray | None, q) -> np.ndarray:
    """``np.percentile(values, q)`` of the sample in which each value appears ``weights``
    times (whole numbers; ``None``: once each), without writing that sample out."""
    if weights is None:
        return np.percentile(values, q)
    order = np.argsort(values, kind="stable")
    v, ends = values[order], np.cumsum(weights[order])
    position = np.asarray(q, dtype=float) / 100 * (ends[-1] - 1)
    below, above = np.floor(position), np.ceil(position)
    at = lambda p: v[np.searchsorted(ends, p, side="right")]  # noqa: E731 (0-based position p)
    return at(below) + (position - below) * (at(above) - at(below))


def _judged(fit: tuple[np.ndarray, np.ndarray, np.ndarray | None], i: int, axis: str) -> dict:
    coef, boots, weights = fit
    low, high = (
        weighted_percentiles(boots[:, i], weights, [2.5, 97.5]) if len(boots) else (math.nan,) * 2
    )
    predicted = PREDICTED[axis]
    return {
        "slope": coef[i],
        "low": low,
        "high": high,
        "predicted": predicted,
        "verdict": verdict(coef[i], low, high, predicted),
    }


def local_slopes(pairs: pd.DataFrame) -> pd.DataFrame:
    """Slopes between neighbouring grid values, to show where a power law holds (at the
    grid points where every pair trained).

    Along ``damping`` the same ``S``, ``S'`` are trained at every ``mu``, so the slope is the
    median over the pairs (and sizes) of ``log(D(mu') / D(mu)) / log(mu' / mu)``; along
    ``size`` the training sets differ, so it is the slope between the median distances at
    each ``mu``, then the median over the ``mu``.
    """
    import pandas as pd

    ok = complete_points(pairs)
    rows = []
    for method, group in ok.groupby("method", sort=False):
        for metric in METRICS:
            data = group[group[metric] > 0]
            for axis, paired_by, across in (
                ("damping", ["pair", "size"], None),
                ("size", None, "damping"),
            ):
                if paired_by is not None:
                    table = data.pivot_table(index=paired_by, columns=axis, values=metric)
                else:
                    table = data.pivot_table(
                        index=across, columns=axis, values=metric, aggfunc="median"
                    )
                grid = list(table.columns)
                for lo, hi in zip(grid, grid[1:]):
                    ratio = np.log(table[hi] / table[lo]).dropna() / math.log(hi / lo)
                    rows.append(
                        {
                            "method": method,
                            "metric": metric,
                            "axis": axis,
                            "from": f"{lo:g}",
                            "to": f"{hi:g}",
                            "slope": ratio.median(),
                        }
                    )
    return pd.DataFrame(rows)


#: an interval wider than this (in units of the exponent) cannot tell the bound's rate apart
MAX_WIDTH = 1.0


def verdict(slope: float, low: float, high: float, predicted: float) -> str:
    """Where the measured exponent lies against the bound's: the interval holds it and is at
    most ``MAX_WIDTH`` wide (agrees), holds it but is wider (inconclusive), or lies wholly
    below (the distance falls faster) or above it (falls slower)."""
    if math.isnan(low):
        return f"no interval (fewer than {MIN_PAIRS} pair seeds)"
    if high < predicted:
        return "falls faster than the bound"
    if low > predicted:
        return "falls slower than the bound"
    return "agrees with the bound" if high - low <= MAX_WIDTH else "inconclusive"
