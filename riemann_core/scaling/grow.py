"""Where a sweep's grid grows, and which of its points are measured once more.

**Growth.** A time claim needs points where the per-call overhead is a small part of the
time and the achieved rates have stopped climbing with size. After each round of a sweep,
:func:`plan` fits the time model (:func:`~riemann_core.scaling.fit.fit_time_model`) of every
method and kernel on the rows so far (as the claims, without points that took a slow path)
and, on every axis of ``grid.grow``, doubles the
axis's top value while the overhead is more than ``grid.overhead_target`` of the time there,
while it has fewer than two such compute-bound points, while its top segment adds too
little work to judge, while the time grows more slowly than the work there (the
achieved rates still climb: :func:`~riemann_core.scaling.fit.axis_regime`), or while the
time grows faster than the work over the top segment alone, by no more than
:data:`~riemann_core.scaling.fit.EDGE_DROP` times, not over the one below it
(:attr:`~riemann_core.scaling.fit.AxisRegime.top_alone`: a rate that drops past a size, a
cache edge, bends only the segment across it, work the FLOP count misses every segment past
its onset; the claim fails only on both). An axis stops
growing where its top segment is in that regime, where it reached its cap, where the top
point was over the FLOP or memory budget (or failed), where it took a slow path (its time is
not the cost model's, and a larger point, whose ``cond(G)`` is usually larger, would take it
too), or where measuring the next point would overrun
``grid.time_budget_s``; :class:`Plan`'s ``decisions`` say which, per method, kernel and axis.

**Outliers.** A point whose median lies a factor :data:`~.sweep.NEIGHBOUR_FACTOR` or more
off the log-log interpolation of its two neighbours on an axis (:func:`outliers`) is
measured once more by the sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import fit
from .sweep import AXES, KEY, NEIGHBOUR_FACTOR, OPTIONAL, Grid, key_of, model_flops, run_of


def rule(overhead_target: float) -> str:
    """How an axis grows, in the words a sweep's record keeps (``sweep.json``'s
    ``growth_rule``) for its report: a sweep of another version grew by its own rule
    (found by an audit: a report redrawn by a later version described that version's)."""
    return (
        "Width and batch grow per method, within the budgets, until the top two points are "
        f"compute-bound (overhead at most {overhead_target:.0%} of the time), add enough work "
        "to judge, and the achieved rates no longer climb between them (where the time grows "
        "faster than the work between them, until it does so over the segment below too: a "
        "rate that drops past a cache edge bends one segment)."
    )


#: calls a measured point costs besides its repeats: memory, warm-up (at least 1) and FLOPs
EXTRA_CALLS = 3


@dataclass
class Plan:
    """Runs of the next round, and the state of every growing axis (``method/kernel/axis``)."""

    runs: list[dict] = field(default_factory=list)
    decisions: dict[str, str] = field(default_factory=dict)


def frame(rows: list[dict]) -> pd.DataFrame:
    """The sweep's rows (numbers or the text read back from ``results.csv``) as numbers."""
    df = pd.DataFrame(rows)
    for column in df.columns:
        if column not in ("times_s", "flag", "reason", *KEY, "status", *OPTIONAL):
            df[column] = pd.to_numeric(df[column], errors="coerce")
    for column in OPTIONAL:
        df[column] = df[column].fillna("").astype(str) if column in df else ""
    for axis in AXES:
        df[axis] = df[axis].astype(int)
    return df


def _stopped(on_axis: pd.DataFrame, axis: str) -> str:
    """Why an axis whose largest point was not measured stops: the first point not measured
    above the last one measured (found by an audit: the largest point's reason was given,
    "stopped at width=512: modelled peak 1049 GiB", where full stopped at 64 for its FLOPs,
    measured up to 48)."""
    measured = on_axis.loc[on_axis["status"] == "ok", axis]
    last = measured.max() if len(measured) else None
    above = on_axis[(on_axis["status"] != "ok") & (on_axis[axis] > (last or 0))]
    first = above.loc[above[axis].idxmin()]
    upto = f"measured up to {axis}={last}" if last is not None else "no point measured"
    return f"stopped at {axis}={first[axis]} ({upto}): {first['reason']}"


def plan(rows: list[dict], grid: Grid, *, elapsed: float) -> Plan:
    """The next round of growth after ``elapsed`` seconds of measuring (module docstring)."""
    out = Plan()
    if not rows or not grid.grow:
        return out
    df = frame(rows)
    models = fit.time_models(df)
    budget_left = grid.time_budget_s - elapsed
    keys = ["method", "kernel", *fit.SETTINGS]
    measured = {key_of(r): r for r in rows}
    several = df["device_name"].nunique() > 1
    for key, group in df.groupby(keys, sort=True):
        model = models.get(key)
        for axis, cap in grid.grow.items():
            on_axis = fit.axis_points(group, grid.base, axis, ok_only=False)
            if on_axis.empty:
                continue
            name = f"{key[0]}/{key[1]}/{axis}"
            if several:  # a cluster with several kinds of device grows each on its own
                name += f" on {key[2 + fit.SETTINGS.index('device_name')]}"
            top = on_axis.loc[on_axis[axis].idxmax()]
            if top["status"] != "ok":
                out.decisions[name] = _stopped(on_axis, axis)
                continue
            if top["slow_paths"]:
                out.decisions[name] = (
                    f"stopped at {axis}={top[axis]}: it took a slow path ({top['slow_paths']}), "
                    "whose time the claims leave out, and a larger point would most likely "
                    "take it too"
                )
                continue
            if model is None:
                out.decisions[name] = (
                    f"not grown: no time model of {key[0]} ({key[1]}) (too few ok points, or points "
                    "that do not tell its coefficients apart), "
                    "which decides whether an axis reached its regime; add points to the grid"
                )
                continue
            # the points the claims judge: a slow path's time is not the cost model's
            ok = on_axis[(on_axis["status"] == "ok") & ~fit.took_slow_path(on_axis)]
            regime = fit.axis_regime(ok, model, target=grid.overhead_target, n_boot=200)
            # a top segment faster than its work is reached once the one below is too: a
            # rate that drops past a size (a cache edge) bends only the segment across it
            # (found by a hunt: the grid stopped on such a segment, and its claim failed)
            if regime.state not in ("overhead", "flat", "climbing") and not regime.top_alone:
                out.decisions[name] = f"reached: {regime.describe(axis)}"
                continue
            why = regime.describe(axis)
            if regime.top_alone:
                why += (
                    "; the top segment alone grows faster than its work: one more step tells "
                    "a rate change (cache edge) from work the FLOP count misses"
                )
            value = int(top[axis]) * 2
            if value > cap:
                out.decisions[name] = f"stopped at the cap {axis}={cap}: {why}"
                continue
            run = run_of(top) | {axis: value}
            if key_of(run) in measured:  # a point is measured once, wherever it ran
                elsewhere = measured[key_of(run)].get("device_name") or "another device"
                out.decisions[name] = (
                    f"stopped at {axis}={top[axis]}: {axis}={value} was measured on {elsewhere}"
                )
                continue
            cost = _predicted_seconds(top, run, grid)
            if cost > budget_left:
                out.decisions[name] = (
                    f"stopped at {axis}={top[axis]}: {axis}={value} would take about "
                    f"{cost:.0f} s, over the time budget ({max(budget_left, 0):.0f} s left); "
                    f"{why}"
                )
                continue
            budget_left -= cost
            out.runs.append(run)
            out.decisions[name] = f"growing to {axis}={value}: {why}"
    return out


def _predicted_seconds(top: pd.Series, run: dict, grid: Grid) -> float:
    """Seconds to measure ``run``: ``top``'s time scaled by the cost model's FLOPs."""
    flops = [model_flops(r)["total"] for r in (top.to_dict(), run)]
    per_call = float(top["time_median_s"]) * max(flops[1] / flops[0], 1.0)
    return per_call * (grid.repeats + grid.warmup + EXTRA_CALLS)


def outliers(rows: list[dict]) -> list[dict]:
    """Ok rows whose median is :data:`~.sweep.NEIGHBOUR_FACTOR` or more off the log-log
    interpolation of their two neighbours on some axis around the sweep's base point."""
    return [r for r in rows if r["status"] == "ok" and is_outlier(rows, r)]


def is_outlier(rows: list[dict], row: dict, axes: tuple[str, ...] = AXES) -> bool:
    """Whether, on some axis of ``axes`` through ``row``, its median is
    :data:`NEIGHBOUR_FACTOR` or more off the interpolation of its neighbours among the ok
    ``rows``, and more off than they are from theirs (a spike also pulls its neighbours'
    interpolations). ``row`` may be a new measurement of a point of ``rows``: its median
    replaces the point's."""
    group = _group(row)
    same = [r for r in rows if r["status"] == "ok" and _group(r) == group]
    for axis in axes:
        others = [a for a in AXES if a != axis]
        line = {
            int(r[axis]): float(r["time_median_s"])
            for r in same
            if all(int(r[a]) == int(row[a]) for a in others)
        }
        x = int(row[axis])
        xs = sorted(line)
        if x not in line or not 0 < xs.index(x) < len(xs) - 1:
            continue
        i = xs.index(x)
        log_t = np.log([line[v] for v in xs])
        log_t[i] = math.log(float(row["time_median_s"]))
        off = _deviations(np.log(xs), log_t)
        if off[i] >= math.log(NEIGHBOUR_FACTOR) and off[i] >= max(off[i - 1], off[i + 1]):
            return True
    return False


def _group(row: dict) -> tuple[str, ...]:
    """What a point shares with the points it is compared with: method, kernel, settings."""
    return tuple(str(row.get(k, "")) for k in ("method", "kernel", *fit.SETTINGS))


def _deviations(log_x: np.ndarray, log_t: np.ndarray) -> np.ndarray:
    """``|log t_i - interpolation of its neighbours|`` at interior points, 0 at the ends."""
    off = np.zeros_like(log_t)
    w = (log_x[1:-1] - log_x[:-2]) / (log_x[2:] - log_x[:-2])
    off[1:-1] = np.abs(log_t[1:-1] - (log_t[:-2] + w * (log_t[2:] - log_t[:-2])))
    return off
