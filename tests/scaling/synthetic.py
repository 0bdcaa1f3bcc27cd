"""Synthetic sweeps: ``results.csv`` and ``sweep.json`` built from the cost model and a
machine of known speed, with the effects real runs have: a per-call overhead, an overhead
per module, rates that climb with the size of the work, noise."""

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from riemann_core import costs
from riemann_core.measure.flops import KINDS
from riemann_core.scaling import fit
from riemann_core.scaling import sweep as sw

BASE = {"width": 64, "depth": 2, "out_dim": 10, "batch": 32}
AXES = {
    "width": (8, 16, 32, 64, 128, 256, 512),
    "depth": (1, 2, 4, 8, 16),
    "out_dim": (2, 5, 10, 20, 40),
    "batch": (4, 8, 16, 32, 64, 128, 256),
}
RUNS = (
    ("euclidean", "structured"),
    ("layerwise", "structured"),
    ("layerwise", "generic"),
    ("full", "structured"),
    ("natural", "structured"),
    ("kfac", "structured"),
    ("kfac-default", "structured"),
)


@dataclass
class Machine:
    """``t = t0 + t_module L + sum_kind F_kind / R_kind(F_kind) + extra(...)``.

    ``R_kind(F) = rates[kind] min(1, F / (L saturation))^climb``: below ``saturation``
    FLOPs of a kind per module the rate climbs with the size of the work, as small GEMMs
    run slower (a deeper network runs more operations of the same size, not larger ones).
    """

    t0: float = 1e-3
    t_module: float = 1e-4
    rates: dict = field(default_factory=lambda: {"products": 5e10, "cholesky": 1e10, "eigh": 3e9})
    saturation: float = 0.0
    climb: float = 0.3
    extra: object = None  # (method, kernel, shape) -> seconds of work the FLOPs do not see

    def time(self, method, kernel, shape, flops):
        L = len(shape.layers)
        t = self.t0 + self.t_module * L
        for kind, f in flops.items():
            if f:
                slow = min(1.0, f / L / self.saturation) ** self.climb if self.saturation else 1
                t += f / (self.rates[kind] * slow)
        return t + (self.extra(method, kernel, shape) if self.extra else 0.0)


@dataclass
class CacheEdge(Machine):
    """A :class:`Machine` whose GEMM rate drops by ``drop`` once a call's products exceed
    ``edge`` FLOPs (a working set past a cache): the time is the counted work at a rate
    that changes once with size, no work the FLOP count misses."""

    drop: float = 0.8
    edge: float = 7e8

    def time(self, method, kernel, shape, flops):
        products = flops.get("products", 0.0)
        if products <= self.edge:
            return super().time(method, kernel, shape, flops)
        slower = {**flops, "products": products / self.drop}
        return super().time(method, kernel, shape, slower)


def flops_by_kind(run):
    """The cost model's phases as kinds: factorisations are Cholesky (eigh for exact kfac)."""
    phases = sw.model_flops(run)
    factor = phases.get("factorisation", 0.0)
    out = dict.fromkeys(KINDS, 0.0)
    out["eigh" if run["method"] == "kfac" else "cholesky"] = factor
    out["products"] = phases["total"] - factor
    return out


def make_sweep(
    machine=None,
    *,
    base=BASE,
    axes=AXES,
    runs=RUNS,
    repeats=5,
    noise=0.03,
    counted=None,
    status_fn=None,
    rate_spread=0.05,
    seed=0,
):
    """A sweep's ``results.csv`` (as a DataFrame) and ``sweep.json``.

    Times follow ``machine`` times lognormal ``noise``; ``counted(method, kernel, shape,
    flops)`` may change the counted FLOPs by kind (a planted step); ``status_fn(method,
    kernel, point)`` returns a status other than "ok" to plant a missing point; the
    device rates recorded at start, after the grid and at the end move by ``rate_spread``.
    """
    machine = machine or Machine()
    rng = np.random.default_rng(seed)
    # the sweep-only K-FAC variants draw their noise apart: the other runs' stay as they were
    variant_rng = np.random.default_rng([seed, 1])
    points = {tuple({**base, axis: v}[a] for a in fit.AXES) for axis in axes for v in axes[axis]}
    rows = []
    for width, depth, out_dim, batch in sorted(points):
        point = dict(width=width, depth=depth, out_dim=out_dim, batch=batch)
        widths = (width,) * (depth + 1) + (out_dim,)
        sol = costs.speed_of_light_flops(costs.MLPShape(widths, batch, out_dim - 1))
        for method, kernel in runs:
            run = dict(method=method, kernel=kernel, **point, device="cpu", dtype="float32")
            run["output_metric"] = "exact"
            shape = sw.shape_of(run)
            status = status_fn(method, kernel, point) if status_fn else "ok"
            kinds = flops_by_kind(run)
            true = dict(kinds)
            if counted:
                kinds = counted(method, kernel, shape, kinds)
            times = []
            if status == "ok":
                t = machine.time(method, kernel, shape, kinds)
                times = (
                    t
                    * (variant_rng if method in sw.KFAC_VARIANTS else rng).lognormal(
                        0.0, noise, repeats
                    )
                ).tolist()
            q1, q3 = np.percentile(times, [25, 75]) if times else (math.nan, math.nan)
            median = float(np.median(times)) if times else math.nan
            rows.append(
                dict(
                    **run,
                    n_params=shape.n_params,
                    d=shape.d,
                    time_median_s=median,
                    time_iqr_s=q3 - q1,
                    times_s=json.dumps(times),
                    flops=sum(kinds.values()) if times else math.nan,
                    **{f"flops_{k}": v if times else math.nan for k, v in kinds.items()},
                    flops_model=sum(true.values()),
                    sol_products=sol["products"],
                    sol_cholesky=sol["cholesky"],
                    peak_bytes=math.nan,
                    peak_bytes_model=sw.model_peak_bytes(run),
                    spread=(q3 - q1) / median if times else math.nan,
                    flag="",
                    slow_paths="",
                    remeasured=0,
                    interleaved="",
                    stretches="",
                    status=status,
                    reason="" if status == "ok" else "planted",
                    host="synthetic-host",
                    device_name="synthetic",
                    physical_device="cpu",
                    sweep="synthetic",
                )
            )
    kinds = {k: r for k, r in machine.rates.items() if k in ("products", "cholesky")}
    sessions = [
        {"when": when, "dtype": "float32", **{k: [r * scale] * 3 for k, r in kinds.items()}}
        for when, scale in (
            ("start", 1 - rate_spread / 2),
            ("grid", 1),
            ("end", 1 + rate_spread / 2),
        )
    ]
    meta = {
        "base": dict(base),
        "axes": {a: list(v) for a, v in axes.items()},
        "device_rates": sessions,
        "environment": {"device_name": "synthetic"},
        "sweep": "synthetic",
    }
    return pd.DataFrame(rows), meta


def known_time_row(run, slower=1.0):
    """The sweep's row of ``run`` at once, as if measured: ``t = 1 ms + flops_model /
    (1 GFLOP/s)`` times ``slower``, the counted FLOPs the model's, all products."""
    from riemann_core.scaling import sweep as sw

    row = sw.blank_row(run)
    t = (1e-3 + row["flops_model"] / 1e9) * slower
    row.update({f"flops_{kind}": 0.0 for kind in KINDS}, flops=row["flops_model"], spread=0.0)
    row.update(flops_products=row["flops_model"], time_median_s=t, time_iqr_s=0.0)
    return {**row, "times_s": json.dumps([t] * 3)}


def recorded_bars(monkeypatch):
    """The tqdm bars that the code under test draws, as ``(desc, n, total)`` when each
    closes (bars disabled, as with ``progress=False``, left out); drawn as ever."""
    import tqdm

    bars = []

    class Recorded(tqdm.tqdm):
        def close(self):
            if not self.disable:
                bars.append((self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    return bars
