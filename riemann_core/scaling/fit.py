"""Fits of a sweep: exponents of counted FLOPs, the time model, slopes, achieved rates.

A sweep (``results.csv``, one row per measured point) varies one axis of the MLP at a time
around a base point (``sweep.json``'s ``base``); the base point belongs to every axis.

- **Exponents of counted FLOPs.** Counted FLOPs are exact and the same on every device;
  their local exponent between neighbouring points, ``log(F_2 / F_1) / log(x_2 / x_1)``,
  is compared with the cost model's at the same points (:func:`local_exponents`).
- **The time model** (:func:`fit_time_model`), per method, kernel and device::

      t = t0 + t_module L + sum over kinds  F_kind / R_kind

  by non-negative least squares on relative residuals over the counted FLOPs by kind
  (:data:`riemann_core.measure.flops.KINDS`): ``t0`` is the per-call overhead,
  ``t_module`` the overhead per module (``L`` Linear modules), ``R_kind`` the achieved
  rate of each kind of operation, at most :data:`RATE_HEADROOM` times the device's best
  rate of that kind measured in the sweep (``best_rate_<kind>`` columns, where the rows
  have them: the median of the rate measurements' samples at the rate size, where the
  device runs that kind best; a single sample may exceed it), and on a CPU at least
  :data:`RATE_FLOOR` times that best rate (a kind the sweep has no rate of, eigh, QR or
  LU, has neither bound). Unbounded, kinds whose FLOPs grow alike along the axes trade time
  freely: a Cholesky fitted at ten times the device's best rate hands its time to the
  triangular solves, and the slope of time against work then judges that mixture, not the
  device; and a kind with few FLOPs, fitted at a rate hundreds of times below any the
  device runs it at, is a second per-call overhead the overhead's bounds do not see.
  A point is *compute-bound* where the overhead ``t0 + t_module L`` is at most a stated
  fraction of its time.
- **Time against work** (:func:`time_exponent`, :func:`axis_regime`): along an axis, the
  slope of ``log(t - overhead)`` against ``log`` of the modelled compute time
  ``sum F_kind / R_kind`` over the top segment of compute-bound points; 1 when the time is
  explained by the FLOPs at stable rates, less while the achieved rates still climb with
  size, more when the time grows faster than the counted work. Above the band, the
  exponent over the segment below tells a rate that drops once past a size (a cache edge:
  the top segment alone) from work the count misses (every segment past its onset); on an
  axis whose top segment adds too little work for an exponent, the growth of the time over
  that of the work (:attr:`AxisRegime.excess`).
- **Curvature in depth** (:func:`quadratic_share`): the share of a quadratic term at the
  deepest point in ``t = a + b L + c L^2``.

Needs numpy, pandas and scipy (the ``bench`` extra); the core of ``riemann_core`` does not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import LinearConstraint, lsq_linear, minimize

from .. import costs
from ..measure.flops import KINDS
from ..measure.output import RECORDS
from . import sweep
from .sweep import (
    AXES,
    ResultsFileError,
    check_a_file,
    check_rows_of_record,
    check_same_model,
    read_record,
    read_results,
)

#: bootstrap resamples of every interval: with 2,000 an interval's end moved by its own
#: Monte Carlo error, so that a verdict whose interval ends near its bound depended on the
#: seed (found by an audit: time-explained-kfac's upper end 1.247 against 1.25 crossed it
#: for 13.5% of 200 seeds); with 20,000 that error is ~3x smaller
N_BOOT = 20_000

#: the fewest repeat times of a point whose median's bootstrap gives an interval: the
#: bootstrap median of two times is either time or their mean, so the 95% interval of a
#: ratio of two such medians held the true ratio in 64% of 1,000 draws (89% with three
#: times, 94% with four; found by a hunt); with fewer the interval is ``nan``, not measured
MIN_BOOT_TIMES = 3

#: x of each axis in :func:`fit_table`. ``width``: ``n_params`` (``n ~ w^2``, so the slope is the
#: exponent in ``n`` at fixed ``d``, the paper's variable); ``depth``: ``layers``, the number
#: of Linear modules ``L = depth + 1`` (the paper's ``L``: ``depth`` itself would bend a time
#: linear in ``L`` below slope 1 at small depth); ``out_dim`` and ``batch``: ``d = N r``.
FIT_X = {"width": "n_params", "depth": "layers", "out_dim": "d", "batch": "d"}

#: a sweep may hold several of these; a fit takes one of each (tables group by them);
#: ``device_name``: a sweep on a cluster may hold several kinds of device
SETTINGS = ("device", "device_name", "dtype", "output_metric")

#: an achieved rate may exceed the device's best measured one by this factor: its
#: measurements during a sweep move by up to 20% before a report calls its speed unsteady
RATE_HEADROOM = 1.25

#: on a CPU, an achieved rate is at least this fraction of the device's best measured one.
#: Measured on a 2-core CPU (float32, 2 threads): triangular solves of order 288-2304 with
#: 1-2 right-hand sides, the layerwise solve's shapes, run at 10-47 GFLOP/s against a best
#: of 145, call overhead included; solves of order below about 100, microseconds of call
#: overhead each, fall below 1/100 of the best. A kind without a measured best has no
#: floor: the small batched QR of the layerwise rows ran at 0.4-1.4 GFLOP/s, under 1/100
#: of the GEMM's best (found by review). Without it the CPU sweep's layerwise model put
#: its triangular solves at 0.39 GFLOP/s: 1.3 ms of constant time at every width, which
#: bent its time exponent along the width. Not on a GPU: there a solve with few right-hand sides runs column by column,
#: bound by latency, at a fraction of the best rate no measurement here has fixed.
RATE_FLOOR = 0.01

#: a time model's term that is below this share of every point's time is set to 0
NEGLIGIBLE_SHARE = 1e-9

#: a point is compute-bound where the overhead ``t0 + t_module L`` is at most this
#: fraction of its time
OVERHEAD_TARGET = 0.2

#: the time against work is explained at stable rates where its exponent is 1 within this
TIME_BAND = 0.25

#: the axes along which a method's time is judged against its work: ``n`` and ``d``
#: (depth adds modules of the same size; the output dimension changes ``d`` as the batch does)
TIMED_AXES = ("width", "batch")

#: columns of the counted FLOPs by kind
FLOP_COLUMNS = tuple(f"flops_{kind}" for kind in KINDS)


@dataclass(frozen=True)
class SlopeFit:
    """``t ~ x^slope`` over ``points`` distinct x in ``x_range``; ``[low, high]`` a 95% interval."""

    slope: float
    low: float
    high: float
    points: int
    x_range: tuple[float, float]


def require_sweep(directory: Path) -> tuple[Path, Path]:
    """``results.csv`` and ``sweep.json`` in ``directory``, or a ``ValueError`` naming the
    one missing and the fix."""
    results, record = needed = directory / "results.csv", directory / "sweep.json"
    for path in needed:  # (found by a hunt: a directory there read as a missing file)
        check_a_file(path)
    if not results.is_file():
        # (found by a hunt: on a train directory it said to run sweep there, which refuses)
        others = [
            f"'riemann-bench {c}'"
            for n, c in RECORDS.items()
            if (directory / n).is_file() and n != record.name
        ]
        if record.is_file():  # (found by a hunt: a sweep stopped before its first point)
            raise ValueError(
                f"{directory} holds a sweep that recorded no point yet ({record.name} without "
                f"{results.name}); run 'riemann-bench sweep' with this --out to measure it"
            )
        if others:
            raise ValueError(
                f"{directory} holds the results of {others[0]}, not a sweep: pass the --out "
                "of a sweep, or run 'riemann-bench sweep' with another --out"
            )
        raise ValueError(f"no sweep at {results}; run 'riemann-bench sweep' with this --out")
    if not record.is_file():  # a sweep would refuse to resume such results too
        raise ValueError(
            f"{results} has no {record.name} beside it, so nothing says which grid measured "
            "it; move results.csv away and run 'riemann-bench sweep' with this --out, or pass "
            "the --out of the sweep that wrote it"
        )
    return needed


def read_sweep(directory: str | Path) -> tuple[pd.DataFrame, dict]:
    """``results.csv`` as a DataFrame (``times_s``, ``flag``, ``slow_paths`` and ``reason``
    as text) and ``sweep.json``; a missing, corrupted or foreign file, or results of
    another grid than the record's, raises a ``ValueError`` naming it."""
    directory = Path(directory)
    path, record = require_sweep(directory)
    # the checks of the sweep itself: columns, parse errors, truncation, impossible values
    rows = read_results(path)
    if not rows:
        raise ResultsFileError(f"{path} holds no points; run 'riemann-bench sweep' with this --out")
    if not any(r["status"] == "ok" for r in rows):
        statuses = sorted({r["status"] for r in rows})
        raise ResultsFileError(
            f"{path} holds no measured point (every one {' or '.join(statuses)}), so no claim "
            "can be judged; its 'reason' column says why each was not measured. Fix that and "
            "run 'riemann-bench sweep' with this --out again"
        )
    meta = read_record(record)
    check_rows_of_record(rows, meta, directory)
    check_same_model([r for r in rows if r["status"] == "ok"], path)
    try:
        text = {"times_s": str, "reason": str, "flag": str, "slow_paths": str, "sweep": str}
        df = pd.read_csv(path, dtype=text, encoding="utf-8-sig")
    except (ValueError, UnicodeDecodeError) as err:  # pandas' parse errors
        raise ResultsFileError(
            f"cannot read the sweep in {directory} ({err}); move it away or rerun the sweep"
        ) from err
    for column in ("reason", "flag", "slow_paths"):
        df[column] = df[column].fillna("") if column in df else ""
    ok = (df["status"] == "ok").to_numpy()
    # this version's memory model, as read_results reads it (rows in the file's order)
    df["peak_bytes_model"] = df["peak_bytes_model"].astype(float)
    df.loc[ok, "peak_bytes_model"] = [r["peak_bytes_model"] for r in rows if r["status"] == "ok"]
    return df, meta


def axis_points(
    df: pd.DataFrame, base: Mapping[str, int], axis: str, *, ok_only: bool = True
) -> pd.DataFrame:
    """Rows whose other three axes equal ``base`` (with ``status == "ok"`` unless
    ``ok_only`` is false): the points of ``axis``."""
    if axis not in AXES:
        raise ValueError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)}")
    require_columns(df, ("status", *AXES))
    missing = [a for a in AXES if a != axis and a not in base]
    if missing:
        raise ValueError(f"base point {dict(base)} lacks {', '.join(missing)}")
    keep = df["status"] == "ok" if ok_only else pd.Series(True, index=df.index)
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


def stretch_times(rows: pd.DataFrame) -> list[list[np.ndarray]]:
    """:func:`repeat_times` of ``rows`` by the stretches of time they were timed in
    (``stretches``: ``riemann_core.scaling.sweep.time_lines`` writes them one after
    another): one list of samples per stretch, the ``i``-th holding each row's ``i``-th
    share of its times. One list, all the times, unless every row has the same number of
    stretches (a row without the column has one)."""
    samples = repeat_times(rows)
    column = rows["stretches"] if "stretches" in rows else [math.nan] * len(rows)
    counts = {int(c) if isinstance(c, Real) and math.isfinite(c) else 1 for c in column}
    k = counts.pop() if len(counts) == 1 else 1
    if k == 1 or any(s.size % k for s in samples):
        return [samples]
    return [[s.reshape(k, -1)[i] for s in samples] for i in range(k)]


def _times_and_stretches(rows: pd.DataFrame) -> Iterator[tuple[np.ndarray, int]]:
    """Per row, its times and the number of stretches of time they were taken in (1 where
    ``stretches`` is blank, or missing: a results file written before it was recorded)."""
    column = rows["stretches"] if "stretches" in rows else pd.Series(1, index=rows.index)
    for times, count in zip(repeat_times(rows), column, strict=True):
        yield times, int(count) if isinstance(count, Real) and math.isfinite(count) else 1


def stretch_times_of_rows(rows: pd.DataFrame) -> list[list[np.ndarray]]:
    """Per row, its times split into the stretches of time it was timed in (``stretches``;
    one part where it has one, or where its times do not split)."""
    return [
        list(times.reshape(count, -1)) if count > 1 and not times.size % count else [times]
        for times, count in _times_and_stretches(rows)
    ]


def loglog_slope(
    x: Sequence[float],
    y_samples: Sequence[Sequence[float] | float],
    *,
    tail: int | None = None,
    n_boot: int = N_BOOT,
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
    Replicates that draw a single distinct x have no slope and are dropped. Over two points
    the interval is the repeats' alone (resampling two points adds no scatter): where one
    of them has fewer than :data:`MIN_BOOT_TIMES` times it is ``nan``, not measured (a single
    time's read zero-width). Deterministic given ``seed``.

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
    if tail == 2 and any(s.size < MIN_BOOT_TIMES for s in pooled):  # noise unmeasured
        low = high = math.nan
    return SlopeFit(slope, float(low), float(high), tail, (float(distinct[-tail]), float(xs.max())))


def quadratic_share(
    x: Sequence[float],
    y_samples: Sequence[Sequence[float]],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    paired: bool = False,
) -> SlopeFit:
    """Share of the quadratic term at the largest x in ``t = a + b x + c x^2``, fitted to
    the medians on relative residuals: ``c x_max^2 / t(x_max)``, 0 for a line.

    The interval resamples each point's repeats and keeps the x: they are a design (the
    depths swept), not a sample, and a share is the curvature over the whole range.
    (Resampling the points as well, as :func:`loglog_slope` does, draws replicates that
    span only part of the range, whose quadratic term at their own top is unstable: over
    8 depths it made every depth claim's interval 1-2 wide, whatever the noise.)
    ``paired``: repeat ``j`` of every point was timed in the same round (the points
    interleaved, equally many repeats), so rounds are resampled whole: a slow round then
    slows every point of a replicate alike, as it did the measurement, instead of bending
    the replicate's curve. Returned as a :class:`SlopeFit` whose ``slope`` is the share;
    its interval is ``nan`` where a point has fewer than :data:`MIN_BOOT_TIMES` times,
    whose spread the resamples do not hold.

    >>> abs(round(quadratic_share([1, 2, 3, 4], [[3.0], [5.0], [7.0], [9.0]]).slope, 9))
    0.0
    """
    xs = np.asarray(x, float)
    samples = [np.atleast_1d(np.asarray(s, float)) for s in y_samples]
    if np.unique(xs).size < 3 or len(samples) != xs.size:
        raise ValueError(f"a quadratic needs 3 distinct x with samples each, got {xs.tolist()}")
    scaled = xs / xs.max()

    def shares(x_, t_):  # batched: rows of x_ and t_ are replicates; at each row's largest x
        A = np.stack([np.ones_like(x_), x_, x_ * x_], axis=-1) / t_[..., None]
        AtA = np.einsum("rpi,rpj->rij", A, A)
        c = np.linalg.solve(AtA, A.sum(axis=1)[..., None])[..., 0]
        top = x_.max(axis=1)
        return c[:, 2] * top**2 / (c[:, 0] + c[:, 1] * top + c[:, 2] * top**2)

    medians = np.array([np.median(s) for s in samples])
    estimate = float(shares(scaled[None], medians[None])[0])
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, xs.size))
    rounds = {s.size for s in samples}
    if paired and len(rounds) != 1:
        raise ValueError(f"paired samples need as many repeats each, got sizes {sorted(rounds)}")
    shared = rng.integers(0, rounds.pop(), (n_boot, samples[0].size)) if paired else None
    for i, s in enumerate(samples):
        draw = shared if paired else rng.integers(0, s.size, (n_boot, s.size))
        boot[:, i] = np.median(s[draw], axis=1)
    boots = shares(np.broadcast_to(scaled, boot.shape), boot)
    low, high = np.percentile(boots, [2.5, 97.5])
    if min(s.size for s in samples) < MIN_BOOT_TIMES:  # (found by review: one time's
        low = high = math.nan  # interval was zero-width; two times' 4 resamples of rounds)
    return SlopeFit(estimate, float(low), float(high), xs.size, (float(xs.min()), float(xs.max())))


def local_exponents(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """``log(y_{i+1} / y_i) / log(x_{i+1} / x_i)`` between neighbours in increasing ``x``
    (one value per distinct x; equal x share the first of their y).

    >>> local_exponents([1, 2, 4], [3, 12, 96]).tolist()
    [2.0, 3.0]
    """
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    distinct, first = np.unique(xs, return_index=True)
    if distinct.size < 2 or (distinct <= 0).any() or (ys[first] <= 0).any():
        raise ValueError(f"exponents need 2 distinct positive x and positive y, got {xs}, {ys}")
    return np.diff(np.log(ys[first])) / np.diff(np.log(distinct))


def model_flops(rows: pd.DataFrame) -> np.ndarray:
    """:func:`~riemann_core.scaling.sweep.model_flops` ``["total"]`` at every row."""
    columns = ["method", "kernel", *AXES, "device", "output_metric"]
    columns += ["dtype"] if "dtype" in rows else []  # (the order of a padded Gram)
    return np.array(
        [sweep.model_flops(r._asdict())["total"] for r in rows[columns].itertuples(index=False)]
    )


@dataclass(frozen=True)
class TimeModel:
    """``t = t0 + t_module L + sum_kind F_kind seconds_per_flop[kind]`` (module docstring)."""

    t0: float
    t_module: float
    seconds_per_flop: dict[str, float]  # 0 where the fit gives a kind no time
    r2_log: float
    median_error: float  # median |t_model / t - 1| over the points
    points: int
    #: kinds whose rate the fit put on a bound: "cap" (RATE_HEADROOM times the device's
    #: best) or "floor" (RATE_FLOOR times it): a figure the bound, not the data, set
    bounded: dict[str, str] = field(default_factory=dict)

    @property
    def rates(self) -> dict[str, float]:
        """Achieved FLOP/s per kind (inf where the fit gives a kind no time)."""
        return {k: 1 / s if s > 0 else math.inf for k, s in self.seconds_per_flop.items()}

    def overhead(self, rows: pd.DataFrame) -> np.ndarray:
        """``t0 + t_module L`` at every row."""
        return self.t0 + self.t_module * x_values(rows, "layers")

    def compute(self, rows: pd.DataFrame) -> np.ndarray:
        """``sum_kind F_kind / R_kind`` at every row."""
        total = np.zeros(len(rows))
        for kind, s in self.seconds_per_flop.items():
            total += rows[f"flops_{kind}"].to_numpy(float) * s
        return total

    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        return self.overhead(rows) + self.compute(rows)


def fit_time_model(rows: pd.DataFrame) -> TimeModel:
    """:class:`TimeModel` of ``rows`` (one method, kernel and device, ok points).

    Minimises ``sum_i ((t_model_i - t_i) / t_i)^2`` with every coefficient >= 0, so a 1 ms
    point weighs as much as a 1 s one, and ``R_kind <= RATE_HEADROOM best`` for each kind
    whose device's best rate ``rows`` carry (``best_rate_<kind>``: see
    :func:`~riemann_core.scaling.devices.named`), on a CPU also ``R_kind >= RATE_FLOOR
    best``. Kinds with no FLOPs at any point are left out. Needs more points than
    coefficients, and points that tell them apart (the weighted features of full rank:
    else a line of fits fits as well, and which one a solver returns says nothing).
    """
    require_columns(rows, ("time_median_s", "depth", *FLOP_COLUMNS))
    t = rows["time_median_s"].to_numpy(float)
    kinds = [k for k in KINDS if (rows[f"flops_{k}"].to_numpy(float) > 0).any()]
    features = np.column_stack(
        [np.ones_like(t), x_values(rows, "layers")]
        + [rows[f"flops_{k}"].to_numpy(float) for k in kinds]
    )
    if len(t) <= features.shape[1] or not (np.isfinite(features).all() and (t > 0).all()):
        raise ValueError(
            f"a time model of {features.shape[1]} coefficients needs more than that many "
            f"points with positive times and counted FLOPs, got {len(t)}"
        )
    weighted = features / t[:, None]
    scale = np.abs(weighted).max(axis=0)
    scale[scale == 0] = 1.0
    # (found by CI: full's 6 points, whose FLOPs of two kinds grow alike, left a line of
    # best fits, and scipy's release chose 1.17 ms + 0.37 ms per module or 1.75 + 0.18)
    rank = np.linalg.matrix_rank(weighted / scale)
    if rank < features.shape[1]:
        raise ValueError(
            f"the {len(t)} points do not tell the time model's {features.shape[1]} "
            f"coefficients apart (rank {rank}: overhead, module count and FLOPs of each kind "
            "vary together): sweep more sizes"
        )
    # seconds per unit of each feature
    lowest, highest = np.zeros(features.shape[1]), np.full(features.shape[1], np.inf)
    # "cpu" or "cpu:N" (found by review: a sweep with --device cpu:0 had no floor)
    cpu = "device" in rows and rows["device"].astype(str).str.split(":").str[0].eq("cpu").all()
    for i, kind in enumerate(kinds, start=2):
        best = _best_rate(rows, kind)
        if best > 0:
            lowest[i] = 1 / (RATE_HEADROOM * best)
            if cpu:
                highest[i] = 1 / (RATE_FLOOR * best)
    coef = _least_squares(
        weighted / scale, (lowest * scale, highest * scale), _overhead_cap(rows, t), scale
    )
    # at its bound 0 the solver leaves a coefficient of ~1e-30, a rate of 1e24 FLOP/s: a
    # term below NEGLIGIBLE_SHARE of every point's time is no time (rate inf)
    negligible = ((features * coef) / t[:, None]).max(axis=0) < NEGLIGIBLE_SHARE
    coef[negligible & (lowest == 0)] = 0.0
    model = features @ coef
    bounded = {
        kind: bound
        for i, kind in enumerate(kinds, start=2)
        for bound, limit in (("cap", lowest[i]), ("floor", highest[i]))
        if 0 < limit < np.inf and math.isclose(coef[i], limit, rel_tol=1e-6)
    }
    return TimeModel(
        t0=float(coef[0]),
        t_module=float(coef[1]),
        seconds_per_flop=dict(zip(kinds, map(float, coef[2:]))),
        r2_log=_r2(np.log(t), np.log(model)) if (model > 0).all() else math.nan,
        median_error=float(np.median(np.abs(model / t - 1))),
        points=len(t),
        bounded=bounded,
    )


def _best_rate(rows: pd.DataFrame, kind: str) -> float:
    """The device's best rate of ``kind`` that ``rows`` carry; 0 where they carry none."""
    best = rows[f"best_rate_{kind}"].iloc[0] if f"best_rate_{kind}" in rows else math.nan
    return float(best) if math.isfinite(best) and best > 0 else 0.0


def _overhead_cap(rows: pd.DataFrame, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(L, fastest)``: each module count of ``rows`` and the fastest time measured there."""
    L = x_values(rows, "layers")
    depths = np.unique(L)
    return depths, np.array([t[L == d].min() for d in depths])


def _least_squares(A: np.ndarray, bounds, cap, scale: np.ndarray) -> np.ndarray:
    """The coefficients minimising ``||A z - 1||`` for ``lowest <= z <= highest``
    (``bounds``), unscaled (``z / scale``), with the overhead ``z0 + z1 L`` (unscaled) at
    most the fastest time at each ``L`` of ``cap`` (:func:`_overhead_cap`): the bounded
    least-squares solution where it holds that already, else the constrained one (SLSQP
    from it, held to the cap)."""
    ones = np.ones(A.shape[0])
    lowest, highest = bounds
    z = lsq_linear(A, ones, bounds=(lowest, highest)).x
    depths, fastest = cap
    rows = np.zeros((len(depths), A.shape[1]))
    rows[:, 0], rows[:, 1] = 1 / scale[0], depths / scale[1]
    if (rows @ z <= fastest).all():
        return z / scale
    start = z.copy()
    start[:2] *= float(np.min(fastest / (rows @ z)))  # the overhead cut to the cap
    solution = minimize(
        lambda v: float(np.sum((A @ v - ones) ** 2)),
        np.clip(start, lowest, highest),
        jac=lambda v: 2 * A.T @ (A @ v - ones),
        bounds=[(low, high if np.isfinite(high) else None) for low, high in zip(lowest, highest)],
        constraints=[LinearConstraint(rows, -np.inf, fastest)],
        method="SLSQP",
        options={"maxiter": 500, "ftol": 1e-12},
    )
    v = solution.x if solution.success else start
    return np.clip(v, lowest, highest) / scale


def took_slow_path(rows: pd.DataFrame) -> pd.Series:
    """Which of ``rows`` took a data-dependent slow path in their counted call
    (``slow_paths``: condition, jitter, residual, refine), whose work the cost models leave out: the
    fits, the time models and the claims take none of them."""
    paths = rows["slow_paths"] if "slow_paths" in rows else pd.Series("", index=rows.index)
    return paths.notna() & (paths.astype(str) != "")  # read back, an empty column is NaN


def stretch_spreads(rows: pd.DataFrame) -> pd.Series:
    """:func:`~riemann_core.scaling.sweep.stretch_spread` of every row, read off its
    ``times_s`` and ``stretches`` (0 for a row of one stretch, or a results file written
    before stretches were recorded; nan where its times do not split)."""
    spreads = [sweep.stretch_spread(t.tolist(), k) for t, k in _times_and_stretches(rows)]
    return pd.Series(spreads, index=rows.index, dtype=float)


def stretches_disagree(rows: pd.DataFrame) -> pd.Series:
    """Which of ``rows`` were timed in stretches of time that disagree by more than
    :data:`~riemann_core.scaling.sweep.SPREAD_LIMIT` (flagged ``stretches`` by the sweep;
    read off the times as well, so that a results file written before the flag is read
    alike): their median pools two states of the machine and is no time of the point, so
    the time models, :func:`fit_table` and the claims on time leave them out."""
    flags = rows["flag"] if "flag" in rows else pd.Series("", index=rows.index)
    flagged = flags.map(lambda f: isinstance(f, str) and "stretches" in f.split())
    # bool, also when empty (an empty object Series would select columns, not rows)
    return (flagged | (stretch_spreads(rows) > sweep.SPREAD_LIMIT)).astype(bool)


def time_models(df: pd.DataFrame) -> dict[tuple, TimeModel]:
    """:func:`fit_time_model` per method, kernel and setting over the ok rows that took no
    slow path and whose stretches of time agree (:func:`stretches_disagree`; groups with
    too few points have none)."""
    ok = df[(df["status"] == "ok") & (df["time_median_s"] > 0) & ~took_slow_path(df)]
    ok = ok[~stretches_disagree(ok)]
    models = {}
    for key, rows in ok.groupby(_group_keys(df), sort=True):
        try:
            models[key] = fit_time_model(rows)
        except ValueError:
            continue
    return models


def time_model_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per :func:`time_models` entry: t0, t_module, the achieved rate of each kind
    (GFLOP/s; empty where the kind has no FLOPs), r2_log, median_error, points."""
    keys = _group_keys(df)
    records = []
    for key, m in time_models(df).items():
        rates = {f"rate_{k}_gflops": m.rates[k] / 1e9 for k in m.rates}
        records.append(
            {
                **dict(zip(keys, key)),
                "t0_s": m.t0,
                "t_module_s": m.t_module,
                **rates,
                "r2_log": m.r2_log,
                "median_error": m.median_error,
                "points": m.points,
            }
        )
    columns = [*keys, "t0_s", "t_module_s", *(f"rate_{k}_gflops" for k in KINDS)]
    columns += ["r2_log", "median_error", "points"]
    return pd.DataFrame.from_records(records, columns=columns)


def overhead_fraction(rows: pd.DataFrame, model: TimeModel) -> np.ndarray:
    """``(t0 + t_module L) / t`` at every row (measured median time)."""
    return model.overhead(rows) / rows["time_median_s"].to_numpy(float)


def time_exponent(
    rows: pd.DataFrame,
    model: TimeModel,
    *,
    target: float = OVERHEAD_TARGET,
    tail: int = 2,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> SlopeFit | None:
    """Slope of ``log(t - overhead)`` against ``log(compute)`` over the ``tail`` largest
    compute-bound points of ``rows`` (one axis of one method; the top segment by default),
    with the bootstrap interval of :func:`loglog_slope` over the repeats; None with fewer
    than 2 such points."""
    rows = rows.assign(_overhead=model.overhead(rows), _compute=model.compute(rows))
    bound = rows[(overhead_fraction(rows, model) <= target) & (rows["_compute"] > 0)]
    if bound["_compute"].nunique() < 2:
        return None
    samples = [
        np.maximum(times - ov, 1e-3 * times)
        for times, ov in zip(repeat_times(bound), bound["_overhead"], strict=True)
    ]
    tail = min(tail, bound["_compute"].nunique())
    return loglog_slope(bound["_compute"], samples, tail=tail, n_boot=n_boot, seed=seed)


def top_segment(
    rows: pd.DataFrame, model: TimeModel, *, target: float = OVERHEAD_TARGET, tail: int = 2
) -> pd.DataFrame:
    """The rows :func:`time_exponent` fits: those of the ``tail`` largest distinct
    modelled compute times among the compute-bound points."""
    compute = model.compute(rows)
    bound = (overhead_fraction(rows, model) <= target) & (compute > 0)
    top = np.unique(compute[bound])[-tail:]
    return rows[bound & np.isin(compute, top)]


#: the top segment must add at least this factor of work to judge time against it (a
#: doubled axis adds up to 2x the work of terms linear in it, more for higher powers)
MIN_WORK_RATIO = 1.5

#: a rate that drops once past a size (a cache edge) is taken to lose at most a third of
#: itself: a top segment whose time grows more than this factor as fast as its work
#: (``work_ratio ** (exponent - 1)``) is no such drop, and needs no segment below to fail
#: (found by review: time ~ work^1.96 [1.93, 1.98] over a width axis's top segment, x3.8
#: the work's growth, read too noisy where the cap left no segment below it)
EDGE_DROP = 1.5


@dataclass(frozen=True)
class AxisRegime:
    """Where one method's points along one axis stand against the time model.

    ``state`` is ``"overhead"`` (fewer than 2 compute-bound points), ``"flat"`` (the top
    compute-bound segment adds less than :data:`MIN_WORK_RATIO` of work, too little to
    judge), ``"climbing"`` (time grows more slowly than the work: the achieved rates still
    climb), ``"faster"`` (time grows faster than the work) or ``"stable"``.

    ``below``: where the top segment reads faster, the exponent over the segment below it
    (the third and second largest compute-bound points; None where there is no third, or
    it adds less than :data:`MIN_WORK_RATIO` of work). A rate that drops once past a size
    (a cache edge) bends the one segment that crosses it; a term that grows faster than the
    counted work does so in every segment past its onset (:attr:`top_alone`).
    ``flat``: on a flat axis, the exponent over its top segment, read as :attr:`excess`.
    """

    compute_bound: int
    overhead_at_top: float
    work_ratio: float
    exponent: SlopeFit | None
    below: SlopeFit | None = None
    flat: SlopeFit | None = None

    @property
    def state(self) -> str:
        if self.compute_bound < 2:
            return "overhead"
        if self.exponent is None:  # the top segment adds less than MIN_WORK_RATIO of work
            return "flat"
        if self.exponent.slope < 1 - TIME_BAND:
            return "climbing"
        return "faster" if self.exponent.slope > 1 + TIME_BAND else "stable"

    @property
    def top_alone(self) -> bool:
        """Whether the top segment reads faster than its work, by no more than a rate that
        drops past a cache edge explains (:data:`EDGE_DROP`), and the one below does not
        (or is not judged): one more doubling of the axis tells a rate change from a
        super-linear term."""
        if self.state != "faster" or self.work_ratio ** (self.exponent.slope - 1) > EDGE_DROP:
            return False
        return self.below is None or self.below.slope <= 1 + TIME_BAND

    @property
    def excess(self) -> tuple[float, float, float] | None:
        """On a flat axis, the growth of the time (less overhead) over that of the modelled
        work over the top segment, with its 95% interval: how far the achieved rate fell
        (``work_ratio ** (exponent - 1)``; an exponent is no measure over so little work,
        this ratio is). None elsewhere."""
        if self.flat is None:
            return None
        f = self.flat
        return tuple(self.work_ratio ** (k - 1) for k in (f.slope, f.low, f.high))

    def describe(self, axis: str) -> str:
        if self.state in ("overhead", "flat"):
            text = (
                f"{axis}: {self.compute_bound} compute-bound points, overhead "
                f"{self.overhead_at_top:.0%} at the top"
            )
            if self.state == "flat":
                text += f", work x{self.work_ratio:.2g} over the top segment"
            if self.excess is not None:
                ratio, low, high = self.excess
                text += (
                    f", time less overhead x{self.work_ratio**self.flat.slope:.3g}: "
                    f"x{ratio:.3g} [{low:.3g}, {high:.3g}] the work's growth"
                )
            return text
        e = self.exponent
        text = f"{axis}: time ~ work^{e.slope:.3g} [{e.low:.3g}, {e.high:.3g}] over the top segment"
        if self.state == "faster":
            b = self.below
            text += (
                f" (the segment below: work^{b.slope:.3g} [{b.low:.3g}, {b.high:.3g}])"
                if b is not None
                else f" (no segment below it adding x{MIN_WORK_RATIO:g} work or more)"
            )
        return text


def axis_regime(
    rows: pd.DataFrame,
    model: TimeModel,
    *,
    target: float = OVERHEAD_TARGET,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> AxisRegime:
    """:class:`AxisRegime` of ``rows``: the ok points of one method along one axis."""
    rows = rows.sort_values("flops")
    fraction = overhead_fraction(rows, model)
    compute = model.compute(rows)
    bound = np.unique(compute[(fraction <= target) & (compute > 0)])
    ratio = float(bound[-1] / bound[-2]) if len(bound) >= 2 else math.nan
    options = {"target": target, "n_boot": n_boot, "seed": seed}
    exponent = below = flat = None
    if ratio >= MIN_WORK_RATIO:
        exponent = time_exponent(rows, model, **options)
        faster = exponent is not None and exponent.slope > 1 + TIME_BAND
        if faster and len(bound) >= 3 and bound[-2] / bound[-3] >= MIN_WORK_RATIO:
            below = time_exponent(rows[compute < bound[-1]], model, **options)
    elif len(bound) >= 2:  # too little work for an exponent, enough to see a rate fall
        flat = time_exponent(rows, model, **options)
    top = float(fraction[-1]) if len(fraction) else math.nan
    return AxisRegime(len(bound), top, ratio, exponent, below, flat)


def fit_table(
    df: pd.DataFrame,
    sweep_meta: Mapping,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Per method/kernel (and setting) and swept axis, against x of :data:`FIT_X`:

    ``points``, ``x_max``; ``flops_exponent`` and ``model_exponent``: the local exponents
    of the counted and the modelled FLOPs over the top segment; ``exponent_gap``: the
    largest ``|counted - modelled|`` over every segment of the axis;
    ``overhead_at_top``, ``compute_bound``, ``work_ratio`` and ``regime``: the axis's
    :class:`AxisRegime`, as the claims judge it; ``time_exponent`` with ``low`` and
    ``high``: its exponent over the top segment (empty where the regime is ``overhead`` or
    ``flat``). The ok points that took no slow path and whose stretches of time agree
    (:func:`stretches_disagree`), as the claims take them. A combination with fewer than 2
    distinct such x has no row. ``progress(label)`` is called after each fit.
    """
    base = sweep_meta["base"]
    axes = [a for a in sweep_meta.get("axes", AXES) if a in AXES]
    keys = _group_keys(df)
    models = time_models(df)
    records = []
    ok = df[(df["status"] == "ok") & ~took_slow_path(df)]
    ok = ok[~stretches_disagree(ok)]
    for key, group in ok.groupby(keys, sort=True):
        for axis in axes:
            x = FIT_X[axis]
            rows = method_points(group, base, key[0], key[1], axis).sort_values(axis)
            xs = x_values(rows, x)
            if len(np.unique(xs)) < 2:
                continue
            counted = local_exponents(xs, rows["flops"])
            modelled = local_exponents(xs, model_flops(rows))
            record = {
                **dict(zip(keys, key)),
                "axis": axis,
                "x": x,
                "points": len(np.unique(xs)),
                "x_max": xs.max(),
                "flops_exponent": counted[-1],
                "model_exponent": modelled[-1],
                "exponent_gap": float(np.abs(counted - modelled).max()),
            }
            model = models.get(key)
            if model is not None:
                regime = axis_regime(rows, model, n_boot=n_boot, seed=seed)
                slope = regime.exponent
                record.update(
                    overhead_at_top=regime.overhead_at_top,
                    compute_bound=regime.compute_bound,
                    work_ratio=regime.work_ratio,
                    regime=regime.state,
                    time_exponent=slope.slope if slope else math.nan,
                    low=slope.low if slope else math.nan,
                    high=slope.high if slope else math.nan,
                )
            records.append(record)
            if progress is not None:
                progress(f"{key[0]} ({key[1]}) along {axis}")
    columns = [*keys, "axis", "x", "points", "x_max", "flops_exponent", "model_exponent"]
    columns += ["exponent_gap", "overhead_at_top", "compute_bound", "work_ratio", "regime"]
    columns += ["time_exponent"]
    columns += ["low", "high"]
    return pd.DataFrame.from_records(records, columns=columns)


def device_rates(sweep_meta: Mapping, dtype: str | None = None) -> dict[str, list[float]]:
    """Every rate the sweep measured (``device_rates``: ``sweep.json``'s, or one device's
    of :func:`~riemann_core.scaling.devices.device_meta`) in ``dtype`` (any when None), by
    kind, over every measurement and every worker of the device."""
    out: dict[str, list[float]] = {}
    for session in sweep_meta.get("device_rates", []):
        if dtype is not None and session.get("dtype") != dtype:
            continue
        for kind, values in session.items():
            if kind not in sweep.SESSION_KEYS:
                out.setdefault(kind, []).extend(values)
    return out


def ok_dtype(df: pd.DataFrame) -> str | None:
    """The dtype of ``df``'s ok rows, None when they have several (or none)."""
    dtypes = df.loc[df["status"] == "ok", "dtype"].unique()
    return str(dtypes[0]) if len(dtypes) == 1 else None


def best_rates(sweep_meta: Mapping, dtype: str | None = None) -> dict[str, float]:
    """The median of each kind's measured rates: the device's rates in the sweep."""
    return {k: float(np.median(v)) for k, v in device_rates(sweep_meta, dtype).items() if v}


def sweep_rates(df: pd.DataFrame, sweep_meta: Mapping) -> dict[str, float]:
    """:func:`best_rates` in the dtype of ``df``'s ok rows; a ``ValueError`` when the sweep
    recorded none."""
    dtype = ok_dtype(df)
    rates = best_rates(sweep_meta, dtype)
    if not rates:  # (found by review: a float64 row in a float32 sweep read 'no rates')
        which = f" in {dtype}" if dtype else ""
        raise ValueError(
            f"sweep.json records no device rates{which} for these points (an older sweep, "
            "or points of a dtype the sweep did not measure rates in?); rerun "
            "'riemann-bench sweep' with their --dtypes"
        )
    return rates


def rate_medians(sweep_meta: Mapping, dtype: str | None = None) -> dict[str, list[float]]:
    """Per kind, the median rate of each measurement (``device_rates``' sessions: start,
    after the grid, end, per worker) in ``dtype`` (any when None)."""
    medians: dict[str, list[float]] = {}
    for session in sweep_meta.get("device_rates", []):
        if dtype is not None and session.get("dtype") != dtype:
            continue
        for kind, values in session.items():
            if kind not in sweep.SESSION_KEYS and values:
                medians.setdefault(kind, []).append(float(np.median(values)))
    return medians


def rate_spread(sweep_meta: Mapping, dtype: str | None = None) -> dict[str, float]:
    """How much the device's speed moved during the sweep (load from other processes,
    frequency scaling), per kind: ``(max - min) / median`` of :func:`rate_medians`; NaN,
    not known, where the rates were measured once (a sweep stopped before it measured
    them again). Each measurement's median, not its single samples, is the speed at that
    time: one slow sample within a measurement is jitter the timings' own medians absorb,
    not drift."""
    return {
        k: (max(v) - min(v)) / float(np.median(v)) if len(v) > 1 else math.nan
        for k, v in rate_medians(sweep_meta, dtype).items()
    }


def achieved_rates(df: pd.DataFrame, rates: Mapping[str, float]) -> pd.DataFrame:
    """``df`` with ``sol_s`` at every row, the phase-wise speed of light of the exact
    layerwise direction at the row's shape and output metric (minimal products at
    ``rates["products"]`` plus minimal Cholesky FLOPs at ``rates["cholesky"]``, each
    layer's route the one of least time at these rates); and at every ok row
    ``flops_per_s`` (counted FLOPs / time), ``time_over_sol`` and ``counted_over_minimal``
    (counted FLOPs / the recorded minimal FLOPs, each layer's route the one of fewer
    FLOPs), these three NaN for rows that are not ok.

    The recorded ``sol_products`` and ``sol_cholesky`` are not divided by the rates: where
    Cholesky runs slower than products, a layer's route of fewer FLOPs can take longer
    than the other, and time / speed of light would flatter (by up to the ratio of the
    rates)."""
    for kind in ("products", "cholesky"):
        rate = rates.get(kind)
        if not (isinstance(rate, Real) and 0 < rate < math.inf):
            raise ValueError(f"the {kind} rate must be positive and finite, got {rate!r}")
    columns = ("status", "flops", "time_median_s", "sol_products", "sol_cholesky")
    require_columns(df, (*columns, *sweep.KEY))
    out = df.copy()
    time = out["time_median_s"].where((out["status"] == "ok") & (out["time_median_s"] > 0))
    out["flops_per_s"] = out["flops"] / time
    out["sol_s"] = [
        costs.speed_of_light_seconds(sweep.speed_of_light_of(sweep.run_of(row), rates), rates)
        for row in out.to_dict("records")
    ]
    out["time_over_sol"] = time / out["sol_s"]
    minimal = out["sol_products"] + out["sol_cholesky"]
    out["counted_over_minimal"] = (out["flops"] / minimal).where(time.notna())
    return out


def median_ratio(
    numerator: Sequence[float],
    denominator: Sequence[float],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``median(numerator) / median(denominator)`` and a 95% bootstrap interval (each set of
    repeat times resampled with replacement); the interval is ``nan`` where a side has
    fewer than :data:`MIN_BOOT_TIMES` times, whose spread the resamples do not hold (found
    by a hunt: a single time's zero-width interval decided claims on one timing each)."""
    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    if num.size == 0 or den.size == 0 or (num <= 0).any() or (den <= 0).any():
        raise ValueError("a ratio of times needs non-empty, positive samples")
    if min(num.size, den.size) < MIN_BOOT_TIMES:
        return float(np.median(num) / np.median(den)), math.nan, math.nan
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
