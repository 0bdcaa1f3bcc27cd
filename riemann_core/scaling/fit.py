"""Scaling fits of a sweep: log-log slopes with bootstrap intervals, a joint cost-model fit,
and achieved FLOP rates.

A sweep (``results.csv``, one row per measured point) varies one axis of the MLP at a time
around a base point (``sweep.json``'s ``base``); the base point belongs to every axis. The
slope of ``log t`` against ``log x`` over the largest values of ``x`` is the exponent ``k``
of ``t ~ x^k`` in the asymptotic range, the number the cost models predict (docs/methods.md, "Scaling").

Needs numpy, pandas and scipy (the ``bench`` extra); the core of ``riemann_core`` does not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import nnls

#: the four axes of a sweep, as columns of ``results.csv`` and keys of ``sweep.json``'s base
AXES = ("width", "depth", "out_dim", "batch")

#: x of each axis in :func:`fit_table`. ``width``: ``n_params`` (``n ~ w^2``, so the slope is the
#: exponent in ``n`` at fixed ``d``, the paper's variable); ``depth``: ``layers``, the number
#: of Linear modules ``L = depth + 1`` (the paper's ``L``: ``depth`` itself would bend a time
#: linear in ``L`` below slope 1 at small depth); ``out_dim`` and ``batch``: ``d = N r``.
FIT_X = {"width": "n_params", "depth": "layers", "out_dim": "d", "batch": "d"}

#: x a fit may take besides an axis: columns of the results, and ``layers`` (``depth + 1``)
DERIVED_X = ("n_params", "d", "layers")

#: fewest distinct x for a slope in :func:`fit_table`: two points cannot show curvature
MIN_POINTS = 3

#: a sweep may hold several of these; a fit takes one of each (tables group by them);
#: ``device_name``: a sweep on a cluster may hold several kinds of device
SETTINGS = ("device", "device_name", "dtype", "output_metric")


@dataclass(frozen=True)
class SlopeFit:
    """``t ~ x^slope`` over ``points`` distinct x in ``x_range``; ``[low, high]`` a 95% interval."""

    slope: float
    low: float
    high: float
    points: int
    x_range: tuple[float, float]


def read_sweep(directory: str | Path) -> tuple[pd.DataFrame, dict]:
    """``results.csv`` as a DataFrame (``times_s`` and ``reason`` as text) and ``sweep.json``."""
    directory = Path(directory)
    df = pd.read_csv(directory / "results.csv", dtype={"times_s": str, "reason": str})
    if "reason" in df:
        df["reason"] = df["reason"].fillna("")
    return df, json.loads((directory / "sweep.json").read_text())


def axis_points(df: pd.DataFrame, base: Mapping[str, int], axis: str) -> pd.DataFrame:
    """Rows with ``status == "ok"`` whose other three axes equal ``base``: the points of ``axis``."""
    if axis not in AXES:
        raise ValueError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)}")
    require_columns(df, ("status", *AXES))
    missing = [a for a in AXES if a != axis and a not in base]
    if missing:
        raise ValueError(f"base point {dict(base)} lacks {', '.join(missing)}")
    keep = df["status"] == "ok"
    for other in AXES:
        if other != axis:
            keep &= df[other] == base[other]
    return df[keep]


def method_points(
    df: pd.DataFrame, base: Mapping[str, int], method: str, kernel: str, axis: str
) -> pd.DataFrame:
    """:func:`axis_points` of one method and kernel."""
    rows = axis_points(df, base, axis)
    return rows[(rows["method"] == method) & (rows["kernel"] == kernel)]


def x_values(rows: pd.DataFrame, x: str) -> np.ndarray:
    """Column ``x`` of ``rows``, or ``layers = depth + 1`` (the MLP's Linear modules)."""
    column = "depth" if x == "layers" else x
    require_columns(rows, (column,))
    values = rows[column].to_numpy(float)
    return values + 1 if x == "layers" else values


def repeat_times(rows: pd.DataFrame) -> list[np.ndarray]:
    """Each row's repeat times (``times_s``, a JSON list); ``[time_median_s]`` where absent."""
    samples = []
    column = rows["times_s"] if "times_s" in rows else [None] * len(rows)
    for median, times in zip(rows["time_median_s"], column):
        if isinstance(times, str) and times.strip():
            times = json.loads(times)
        values = np.asarray(times if isinstance(times, (list, tuple, np.ndarray)) else [], float)
        samples.append(values if values.size else np.array([median], float))
    return samples


def loglog_slope(
    x: Sequence[float],
    y_samples: Sequence[Sequence[float] | float],
    *,
    tail: int | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> SlopeFit:
    """Slope ``k`` of ``log t = k log x + c`` over the ``tail`` largest x, with a 95% interval.

    ``y_samples[i]`` holds the repeat times at ``x[i]`` (points with equal x are pooled);
    ``t_i`` is their median and ``k`` the least-squares slope of ``log t_i`` on ``log x_i``.
    ``tail`` defaults to the upper half of the distinct x, at least 3 (all, if fewer).

    The interval is the 2.5..97.5 percentile range of ``k`` over ``n_boot`` bootstrap
    replicates, each resampling both levels: the repeat times of every point (with
    replacement, then the median: measurement noise) and the points themselves (pairs
    ``(x_i, t_i)`` with replacement: scatter and curvature about a straight line).
    Replicates that draw a single distinct x have no slope and are dropped.
    Deterministic given ``seed``.

    >>> fit = loglog_slope([1, 2, 4, 8], [[1.0], [8.0], [64.0], [512.0]])
    >>> round(fit.slope, 6), fit.points, fit.x_range
    (3.0, 3, (2.0, 8.0))
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    xs = np.asarray(x, float)
    if xs.ndim != 1 or xs.size != len(y_samples):
        raise ValueError(f"x has {xs.size} values but y_samples has {len(y_samples)} points")
    samples = [np.atleast_1d(np.asarray(s, float)) for s in y_samples]
    if any(s.ndim != 1 or s.size == 0 for s in samples):
        raise ValueError("every point needs at least one time sample (a flat list of seconds)")
    if not (np.isfinite(xs).all() and (xs > 0).all()):
        raise ValueError(f"x must be positive and finite for a log-log fit, got {xs.tolist()}")
    for xi, s in zip(xs, samples):
        if not (np.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"times must be positive and finite, got {s.tolist()} at x={xi:g}")
    distinct = np.unique(xs)
    if distinct.size < 2:
        raise ValueError(f"a slope needs at least 2 distinct x, got {distinct.tolist()}")
    pooled = [np.concatenate([s for xi, s in zip(xs, samples) if xi == u]) for u in distinct]
    if tail is None:
        tail = min(distinct.size, max(3, math.ceil(distinct.size / 2)))
    if not 2 <= tail <= distinct.size:
        raise ValueError(f"tail must be between 2 and {distinct.size} (the distinct x), got {tail}")
    log_x = np.log(distinct[-tail:])
    pooled = pooled[-tail:]
    log_t = np.log([np.median(s) for s in pooled])
    slope = float(np.polyfit(log_x, log_t, 1)[0])

    rng = np.random.default_rng(seed)
    medians = np.empty((n_boot, tail))
    for i, s in enumerate(pooled):
        medians[:, i] = np.median(s[rng.integers(0, s.size, (n_boot, s.size))], axis=1)
    pick = rng.integers(0, tail, (n_boot, tail))
    bx = log_x[pick]
    by = np.log(np.take_along_axis(medians, pick, axis=1))
    bx = bx - bx.mean(axis=1, keepdims=True)
    sxx = (bx * bx).sum(axis=1)
    has_slope = sxx > 1e-12 * (log_x[-1] - log_x[0]) ** 2
    boots = (bx * by).sum(axis=1)[has_slope] / sxx[has_slope]
    low, high = np.percentile(boots, [2.5, 97.5]) if boots.size else (slope, slope)
    return SlopeFit(slope, float(low), float(high), tail, (float(distinct[-tail]), float(xs.max())))


def fit_rows(
    rows: pd.DataFrame, x: str, *, tail: int | None = None, n_boot: int = 2000, seed: int = 0
) -> SlopeFit:
    """:func:`loglog_slope` of ``rows``' repeat times against :func:`x_values` ``x``."""
    if rows.empty:
        raise ValueError("no ok points to fit")
    require_columns(rows, ("time_median_s",))
    for setting in SETTINGS:
        if setting in rows and rows[setting].nunique() > 1:
            raise ValueError(
                f"the points mix {setting}s {sorted(rows[setting].unique())}; "
                f"fit one {setting} at a time"
            )
    return loglog_slope(x_values(rows, x), repeat_times(rows), tail=tail, n_boot=n_boot, seed=seed)


def fit_axis(
    df: pd.DataFrame,
    base: Mapping[str, int],
    method: str,
    kernel: str,
    axis: str,
    x: str = "axis",
    *,
    tail: int | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> SlopeFit:
    """Slope of ``method``/``kernel``'s time along ``axis`` against ``x``.

    ``x`` is ``"axis"`` (the axis value itself) or one of :data:`DERIVED_X`.
    """
    if x not in ("axis", *DERIVED_X):
        raise ValueError(f"unknown x {x!r}; choose 'axis' or one of {', '.join(DERIVED_X)}")
    rows = method_points(df, base, method, kernel, axis)
    if rows.empty:
        raise ValueError(
            f"no ok points of method={method!r} kernel={kernel!r} along {axis!r} "
            f"around the base point {dict(base)}"
        )
    return fit_rows(rows, axis if x == "axis" else x, tail=tail, n_boot=n_boot, seed=seed)


def fit_table(
    df: pd.DataFrame, sweep_meta: Mapping, *, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Slopes of every method/kernel along every swept axis, x per :data:`FIT_X`.

    Columns: method, kernel, the :data:`SETTINGS` present in ``df`` (device, device_name,
    dtype, output_metric), axis, x, slope, low, high, points, x_min, x_max. A combination with
    fewer than :data:`MIN_POINTS` distinct ok x has no row.
    """
    base = sweep_meta["base"]
    axes = [a for a in sweep_meta.get("axes", AXES) if a in AXES]
    keys = _group_keys(df)
    records = []
    for key, group in df[df["status"] == "ok"].groupby(keys, sort=True):
        for axis in axes:
            x = FIT_X[axis]
            rows = method_points(group, base, key[0], key[1], axis)
            if len(np.unique(x_values(rows, x))) < MIN_POINTS:
                continue
            slope = fit_rows(rows, x, n_boot=n_boot, seed=seed)
            records.append(
                {
                    **dict(zip(keys, key)),
                    "axis": axis,
                    "x": x,
                    "slope": slope.slope,
                    "low": slope.low,
                    "high": slope.high,
                    "points": slope.points,
                    "x_min": slope.x_range[0],
                    "x_max": slope.x_range[1],
                }
            )
    columns = [*keys, "axis", "x", "slope", "low", "high", "points", "x_min", "x_max"]
    return pd.DataFrame.from_records(records, columns=columns)


def joint_fit(df: pd.DataFrame) -> pd.DataFrame:
    """Per method/kernel, ``t = a n d^2 + b d^3 + c`` with ``a, b, c >= 0`` over all ok points.

    ``n`` is ``n_params`` and ``d`` the factor rows; depth enters only through ``n`` (the
    ``L d^3`` of layerwise is folded into ``b`` at each depth). Solved by non-negative least
    squares on relative residuals, ``min sum_i ((a n_i d_i^2 + b d_i^3 + c - t_i) / t_i)^2``,
    so a 1 ms point weighs as much as a 1 s one (unweighted, the largest times alone would
    decide all three coefficients). Columns: method, kernel, a, b, c, r2 (``1 - SS_res /
    SS_tot`` of ``t`` on the linear scale; negative where the model describes the times
    worse than their mean), r2_log (the same of ``log t`` against ``log`` of the model: how
    well the fit follows the small times too), points, and the :data:`SETTINGS` present in
    ``df`` after method and kernel. A group with fewer than 3 ok points (one per
    coefficient) has no row.
    """
    require_columns(df, ("method", "kernel", "status", "n_params", "d", "time_median_s"))
    ok = df[(df["status"] == "ok") & (df["time_median_s"] > 0)]
    keys = _group_keys(df)
    records = []
    for key, rows in ok.groupby(keys, sort=True):
        if len(rows) < 3:
            continue
        n = rows["n_params"].to_numpy(float)
        d = rows["d"].to_numpy(float)
        t = rows["time_median_s"].to_numpy(float)
        features = np.column_stack([n * d * d, d**3, np.ones_like(t)])
        weighted = features / t[:, None]
        scale = np.abs(weighted).max(axis=0)
        scale[scale == 0] = 1.0
        coef, _ = nnls(weighted / scale, np.ones_like(t))
        a, b, c = coef / scale
        model = features @ (coef / scale)
        records.append(
            {
                **dict(zip(keys, key)),
                "a": a,
                "b": b,
                "c": c,
                "r2": _r2(t, model),
                "r2_log": _r2(np.log(t), np.log(model)) if (model > 0).all() else math.nan,
                "points": len(rows),
            }
        )
    columns = [*keys, "a", "b", "c", "r2", "r2_log", "points"]
    return pd.DataFrame.from_records(records, columns=columns)


def achieved_rates(df: pd.DataFrame, gemm_flops_per_s: float) -> pd.DataFrame:
    """``df`` with ``flops_per_s = flops / time_median_s`` and ``fraction_of_gemm`` =
    that over the device's GEMM rate (NaN for rows that are not ok or have no time)."""
    if not (isinstance(gemm_flops_per_s, Real) and 0 < gemm_flops_per_s < math.inf):
        raise ValueError(f"gemm_flops_per_s must be positive and finite, got {gemm_flops_per_s!r}")
    require_columns(df, ("status", "flops", "time_median_s"))
    out = df.copy()
    time = out["time_median_s"].where((out["status"] == "ok") & (out["time_median_s"] > 0))
    out["flops_per_s"] = out["flops"] / time
    out["fraction_of_gemm"] = out["flops_per_s"] / gemm_flops_per_s
    return out


def median_ratio(
    numerator: Sequence[float],
    denominator: Sequence[float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``median(numerator) / median(denominator)`` and a 95% bootstrap interval (each set of
    repeat times resampled with replacement)."""
    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    if num.size == 0 or den.size == 0 or (num <= 0).any() or (den <= 0).any():
        raise ValueError("a ratio of times needs non-empty, positive samples")
    rng = np.random.default_rng(seed)
    boot_num = np.median(num[rng.integers(0, num.size, (n_boot, num.size))], axis=1)
    boot_den = np.median(den[rng.integers(0, den.size, (n_boot, den.size))], axis=1)
    low, high = np.percentile(boot_num / boot_den, [2.5, 97.5])
    return float(np.median(num) / np.median(den)), float(low), float(high)


def require_columns(df: pd.DataFrame, columns: Sequence[str]) -> None:
    """Raise a ValueError naming the ``columns`` that ``df`` lacks."""
    missing = [c for c in columns if c not in df]
    if missing:
        raise ValueError(f"results lack the column(s) {', '.join(missing)}")


def _group_keys(df: pd.DataFrame) -> list[str]:
    return ["method", "kernel", *(s for s in SETTINGS if s in df)]


def _r2(y: np.ndarray, model: np.ndarray) -> float:
    total = ((y - y.mean()) ** 2).sum()
    return float(1 - ((y - model) ** 2).sum() / total) if total > 0 else math.nan
