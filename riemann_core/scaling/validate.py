"""The paper's scaling claims checked against a sweep: a table of verdicts (``claims.json``).

Verdict rule for a slope claim. The claim expects the log-log slope (see
:func:`~riemann_core.scaling.fit.loglog_slope`) in an acceptance band: the expected
exponent, or range of exponents, widened by :data:`BAND_HALF_WIDTH` on each side. With
the point estimate ``k`` and its 95% bootstrap interval ``[low, high]``:

- ``fail``: the interval lies entirely outside the band;
- ``pass``: otherwise, if ``k`` lies in the band and the interval is at most
  :data:`MAX_INTERVAL_WIDTH` wide (a measurement too noisy to tell slope 1 from slope 2
  confirms nothing);
- ``inconclusive``: otherwise (``k`` outside the band with the interval reaching into it,
  or too wide an interval), and when the sweep has fewer than
  :data:`~riemann_core.scaling.fit.MIN_POINTS` ok points for the claim: missing data
  never crash, they give an inconclusive verdict with the reason.

Claims on other quantities state their own rule in :func:`validate`'s list. A claim's
``expected`` is a readable statement; ``measured``, ``low`` and ``high`` are numbers or null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..costs import MLPShape
from ..measure.output import write_atomic
from ..measure.problems import widths
from . import fit

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"

#: half-width of the acceptance band around an expected exponent
BAND_HALF_WIDTH = 0.25

#: widest 95% interval of a slope that can pass
MAX_INTERVAL_WIDTH = 1.0

#: structured layerwise should beat generic by at least this factor at the largest width
STRUCTURED_FACTOR = 2.0

#: largest relative gap between counted and modelled FLOPs
FLOPS_TOLERANCE = 0.01


@dataclass(frozen=True)
class Claim:
    """One row of ``claims.json``."""

    id: str
    claim: str
    expected: str
    measured: float | None
    low: float | None
    high: float | None
    verdict: str
    detail: str

    def to_dict(self) -> dict:
        """The JSON record; non-finite numbers become null."""
        record = asdict(self)
        for key in ("measured", "low", "high"):
            value = record[key]
            record[key] = float(value) if value is not None and math.isfinite(value) else None
        return record


@dataclass(frozen=True)
class SlopeClaim:
    """A slope claim: ``method``'s time vs ``x`` along ``axis`` has a slope in ``exponents``.

    ``kernel`` None takes structured where the sweep has it; ``woodbury_only`` keeps the
    points with ``d`` at most the largest block's parameter count ``max_a n_a`` (beyond it
    the implementation may factorise the ``n_a x n_a`` block instead, at a cost linear in d).
    """

    id: str
    claim: str
    method: str
    kernel: str | None
    axis: str
    x: str
    exponents: tuple[float, float]
    expected: str
    woodbury_only: bool = False


SLOPE_CLAIMS = (
    SlopeClaim(
        "generic-layerwise-linear-in-n",
        "generic-kernel layerwise time grows like n at fixed d",
        "layerwise", "generic", "width", "n_params", (1, 1), "slope 1 (n d^2)",
    ),
    SlopeClaim(
        "layerwise-d2-to-d3",
        "generic-kernel layerwise time grows like d^2..d^3 as d grows",
        "layerwise", "generic", "batch", "d", (2, 3), "slope 2..3 (n d^2 + d^3)", True,
    ),
    SlopeClaim(
        "structured-layerwise-in-d",
        "structured-kernel layerwise time grows like d^2..d^3 as d grows",
        "layerwise", "structured", "batch", "d", (2, 3), "slope 2..3 (d^2 f_out + d^3)", True,
    ),
    SlopeClaim(
        "full-n3",
        "full time grows like n^3 (like n^2 d until n >> d)",
        "full", None, "width", "n_params", (2, 3), "slope 2..3 (n^2 d + n^3)",
    ),
    SlopeClaim(
        "kfac-w3",
        "kfac time grows like w^3 (like N w^2 at small width)",
        "kfac", None, "width", "width", (2, 3), "slope 2..3 (N w^2 + w^3)",
    ),
    *(
        SlopeClaim(
            f"linear-in-depth-{method}",
            f"{method} time grows linearly in depth",
            method, None, "depth", "layers", (1, 1), "slope 1 in L = depth + 1",
        )
        for method in ("euclidean", "layerwise", "natural", "kfac")
    ),
)  # fmt: skip

#: columns :func:`validate` reads; a ``results.csv`` without them is not a sweep's
REQUIRED_COLUMNS = ("method", "kernel", "status", *fit.AXES, "n_params", "d", "time_median_s")


def band_verdict(estimate: float, low: float, high: float, band: tuple[float, float]) -> str:
    """The slope rule of this module's docstring for the acceptance ``band``."""
    lo, hi = band
    if high < lo or low > hi:
        return FAIL
    if lo <= estimate <= hi and high - low <= MAX_INTERVAL_WIDTH:
        return PASS
    return INCONCLUSIVE


def validate(
    df: pd.DataFrame, sweep_meta: Mapping, *, n_boot: int = 2000, seed: int = 0
) -> list[Claim]:
    """Check the claims against a sweep's ``results.csv`` (as ``df``) and ``sweep.json``.

    Needs ``sweep_meta["base"]`` (the base point: width, depth, out_dim, batch), the
    :data:`REQUIRED_COLUMNS`, and one device (and device name), dtype and output metric
    among the ok rows. The slope claims are :data:`SLOPE_CLAIMS`; then:

    - ``crossover-width``: the smallest width from which on structured layerwise is faster
      than full at every width where both ran (``low`` the width before it, where full
      was faster); pass if it exists; fail if full is faster at the largest width where
      both ran and full ran at every width layerwise did; inconclusive otherwise.
    - ``structured-vs-generic``: generic / structured layerwise time at the largest width
      where both ran, with a bootstrap interval over the repeat times: pass if
      ``low >= STRUCTURED_FACTOR``, fail if ``high < STRUCTURED_FACTOR``, else inconclusive.
    - ``flops-match-model``: ``max |flops - flops_model| / flops_model`` over ok rows:
      pass if at most :data:`FLOPS_TOLERANCE`, else fail.
    """
    if "base" not in sweep_meta:
        raise ValueError("sweep_meta has no 'base' point; pass the sweep's sweep.json")
    fit.require_columns(df, REQUIRED_COLUMNS)
    ok = df[df["status"] == "ok"]
    for setting in fit.SETTINGS:
        if setting in ok and ok[setting].nunique() > 1:
            raise ValueError(
                f"the results mix {setting}s {sorted(ok[setting].unique())}; validate one "
                f"device, dtype and output metric at a time, e.g. df[df.{setting} == ...]"
            )
    base = sweep_meta["base"]
    claims = [_slope_claim(spec, df, base, n_boot=n_boot, seed=seed) for spec in SLOPE_CLAIMS]
    claims += [
        _crossover(df, base),
        _structured_factor(df, base, n_boot=n_boot, seed=seed),
        _flops_match(df),
    ]
    return claims


def write_claims(
    claims: Sequence[Claim], path: str | Path, device_names: Sequence[str] | None = None
) -> Path:
    """Write ``claims`` as a JSON list to ``path`` atomically (a temporary file, then a
    rename); ``device_names``, one per claim, go into the records as ``device_name``."""
    records = [c.to_dict() for c in claims]
    if device_names is not None:
        records = [{"device_name": n, **r} for n, r in zip(device_names, records, strict=True)]
    text = json.dumps(records, indent=2, allow_nan=False) + "\n"
    return write_atomic(Path(path), text)


def exit_code(claims: Sequence[Claim]) -> int:
    """1 if any claim failed, else 0 (inconclusive claims do not fail a run)."""
    return int(any(c.verdict == FAIL for c in claims))


def _slope_claim(
    spec: SlopeClaim, df: pd.DataFrame, base: Mapping[str, int], *, n_boot: int, seed: int
) -> Claim:
    band = (spec.exponents[0] - BAND_HALF_WIDTH, spec.exponents[1] + BAND_HALF_WIDTH)
    expected = f"{spec.expected}; band [{band[0]:g}, {band[1]:g}]"
    kernel = spec.kernel or _kernel(df, spec.method)
    x = spec.x
    subject = f"{spec.method} ({kernel} kernel) along the {spec.axis} axis"
    try:
        rows = fit.method_points(df, base, spec.method, kernel, spec.axis)
        in_all = f" with d <= max_a n_a ({len(rows)} in all)" if spec.woodbury_only else ""
        if spec.woodbury_only:
            rows = _woodbury_range(rows)
        points = len(np.unique(fit.x_values(rows, x)))
        if points < fit.MIN_POINTS:
            reason = f"{points} ok points of {subject}{in_all}; need {fit.MIN_POINTS}"
            return _inconclusive(spec.id, spec.claim, expected, reason)
        slope = fit.fit_rows(rows, x, n_boot=n_boot, seed=seed)
    except ValueError as err:
        return _inconclusive(spec.id, spec.claim, expected, str(err))
    detail = (
        f"Slope of log median time vs log {x} for {subject}, over the largest {slope.points} "
        f"of {points} points{in_all}, {x} {slope.x_range[0]:g}..{slope.x_range[1]:g}."
    )
    verdict = band_verdict(slope.slope, slope.low, slope.high, band)
    return Claim(spec.id, spec.claim, expected, slope.slope, slope.low, slope.high, verdict, detail)


def _woodbury_range(rows: pd.DataFrame) -> pd.DataFrame:
    """Points with ``d`` at most the largest block's parameter count ``max_a n_a``."""
    largest = [
        max(MLPShape(widths(w, L, c), 1, 1).block_params())
        for w, L, c in zip(rows["width"], rows["depth"], rows["out_dim"])
    ]
    return rows[rows["d"].to_numpy() <= np.asarray(largest)]


def _kernel(df: pd.DataFrame, method: str) -> str:
    """``structured`` where the sweep has ok rows of ``method`` with it, else ``generic``."""
    kernels = set(df.loc[(df["method"] == method) & (df["status"] == "ok"), "kernel"])
    return "generic" if kernels == {"generic"} else "structured"


def _crossover(df: pd.DataFrame, base: Mapping[str, int]) -> Claim:
    cid = "crossover-width"
    text = "structured layerwise is faster than full from some width on"
    expected = "a width from which on layerwise beats full"
    kernel = _kernel(df, "full")
    try:
        layerwise = _median_by(fit.method_points(df, base, "layerwise", "structured", "width"))
        full = _median_by(fit.method_points(df, base, "full", kernel, "width"))
    except ValueError as err:
        return _inconclusive(cid, text, expected, str(err))
    both = sorted(set(layerwise) & set(full))
    if not both:
        return _inconclusive(cid, text, expected, "no width where both layerwise and full ran")
    faster = [layerwise[w] < full[w] for w in both]
    widest = both[-1]
    ratio = full[widest] / layerwise[widest]
    subject = (
        f"median times of structured layerwise and full ({kernel} kernel) along the width "
        f"axis at the {len(both)} widths where both ran ({both[0]}..{widest}); "
        f"full / layerwise = {ratio:.3g} at width {widest}"
    )
    if faster[-1]:
        start = len(faster) - faster[::-1].index(False) if False in faster else 0
        crossover = both[start]
        low = both[start - 1] if start > 0 else None
        where = f"between widths {low} and {crossover}" if low else "below the smallest width"
        detail = f"Crossover {where}, from the {subject}."
        return Claim(cid, text, expected, crossover, low, crossover, PASS, detail)
    if max(layerwise) > widest:
        reason = f"Full is faster at width {widest} but did not run beyond it: {subject}."
        return _inconclusive(cid, text, expected, reason)
    if len(both) < 2:
        return _inconclusive(cid, text, expected, f"One width is too few: {subject}.")
    return Claim(cid, text, expected, None, None, None, FAIL, f"Layerwise never wins: {subject}.")


def _structured_factor(
    df: pd.DataFrame, base: Mapping[str, int], *, n_boot: int, seed: int
) -> Claim:
    cid = "structured-vs-generic"
    text = "structured layerwise beats generic layerwise by a factor at large width"
    expected = f">= {STRUCTURED_FACTOR:g}"
    try:
        structured = _samples_by(fit.method_points(df, base, "layerwise", "structured", "width"))
        generic = _samples_by(fit.method_points(df, base, "layerwise", "generic", "width"))
    except ValueError as err:
        return _inconclusive(cid, text, expected, str(err))
    both = sorted(set(structured) & set(generic))
    if not both:
        return _inconclusive(cid, text, expected, "no width where both layerwise kernels ran")
    w = both[-1]
    factor, low, high = fit.median_ratio(generic[w], structured[w], n_boot=n_boot, seed=seed)
    verdict = (
        PASS if low >= STRUCTURED_FACTOR else FAIL if high < STRUCTURED_FACTOR else INCONCLUSIVE
    )
    detail = (
        f"Generic / structured median time of layerwise at width {w}, the largest of the "
        f"{len(both)} widths where both kernels ran ({generic[w].size} and "
        f"{structured[w].size} repeats, bootstrapped)."
    )
    return Claim(cid, text, expected, factor, low, high, verdict, detail)


def _flops_match(df: pd.DataFrame) -> Claim:
    cid = "flops-match-model"
    text = "counted FLOPs match the analytic cost model"
    expected = f"max relative gap <= {FLOPS_TOLERANCE:g}"
    if not {"flops", "flops_model", "status"} <= set(df):
        return _inconclusive(cid, text, expected, "the results have no flops/flops_model columns")
    rows = df[(df["status"] == "ok") & np.isfinite(df["flops"]) & (df["flops_model"] > 0)]
    if rows.empty:
        return _inconclusive(cid, text, expected, "no ok row with both counted and modelled FLOPs")
    gap = (rows["flops"] - rows["flops_model"]).abs() / rows["flops_model"]
    worst = rows.loc[gap.idxmax()]
    where = ", ".join(
        f"{k}={worst[k]}" for k in ("method", "kernel", *fit.AXES) if k in worst.index
    )
    detail = f"Largest |flops - flops_model| / flops_model over {len(rows)} ok rows, at {where}."
    verdict = PASS if gap.max() <= FLOPS_TOLERANCE else FAIL
    return Claim(cid, text, expected, float(gap.max()), None, None, verdict, detail)


def _median_by(rows: pd.DataFrame) -> dict[int, float]:
    """Median time per width (repeats of equal widths pooled)."""
    return {w: float(np.median(s)) for w, s in _samples_by(rows).items()}


def _samples_by(rows: pd.DataFrame) -> dict[int, np.ndarray]:
    """Repeat times per width, equal widths pooled."""
    out: dict[int, list[np.ndarray]] = {}
    for w, s in zip(rows["width"], fit.repeat_times(rows)):
        out.setdefault(int(w), []).append(s)
    return {w: np.concatenate(s) for w, s in out.items()}


def _inconclusive(cid: str, text: str, expected: str, reason: str) -> Claim:
    return Claim(cid, text, expected, None, None, None, INCONCLUSIVE, reason)
