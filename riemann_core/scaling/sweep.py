"""``riemann-bench sweep``: time, FLOPs and memory over a grid of MLPs, resumably.

The grid varies one axis at a time (width, depth, output dimension, batch) around a
base point, for every method, kernel, dtype and device. The methods are ``rc.METHODS``
and ``kfac-default``, K-FAC as its users run it by default (:data:`KFAC_VARIANTS`), a
run of its own beside the exact ``kfac`` with its own cost and memory models. The MLP is
``width`` inputs, ``depth`` hidden tanh layers of ``width`` units and ``out_dim`` outputs, so
``n ~ depth width^2`` and ``d = batch * r``. Each point gets a memory-measured call, a
warm-up, ``repeats`` timed calls (median and IQR), one FLOP-counted call (FLOPs by kind of
operation, :mod:`riemann_core.measure.flops`) and a status: ``ok``, ``oom``, ``skipped``
(over the memory or FLOP budget, by the cost model) or ``error`` (with the reason).
``slow_paths`` names the data-dependent slow paths the counted call took (``condition``,
``jitter``, ``residual``, ``refine``: :func:`riemann_core.methods.recording_slow_paths`), whose work
the cost models leave out.

Measuring a point is the pure function :func:`measure_point`; :func:`sweep` is the loop
over points, in rounds:

1. the grid's points;
2. growth (:mod:`.grow`): an axis of ``grid.grow`` is extended, per method, while the
   per-call overhead is more than ``grid.overhead_target`` of the time at its top point,
   within the FLOP, memory and time budgets;
3. points whose median lies far from both neighbours on an axis are measured once more
   (a point whose repeats spread widely, or that read loaded, is re-timed at once, in
   :func:`measure_point`);
4. the lines along :data:`INTERLEAVED_AXES` (depth) through the base point, and the top
   two points of those along :data:`TOP_PAIR_AXES` (width, batch), are timed again, their
   points in turn in every round (:func:`time_lines`, where ``sweep`` is given it, as
   ``riemann-bench run`` and ``sweep`` do): the claims on depth judge a line's shape to a
   few percent, the claims on time the ratio of a top pair, which the machine's drift
   between points measured minutes apart would bend. A depth line is timed in
   :data:`LINE_STRETCHES` stretches of time, the other lines between them, and its claim
   judged in each.

The points run in this process one after another, or on a dask cluster
(:mod:`riemann_core.scaling.dispatch`), a round at a time: each round is a list of runs
sent to the runner, and this process decides the next round from the rows it has. Either
way this process alone writes ``results.csv``, atomically after every point, in the grid's
order, so a killed sweep loses at most the points it was on; a rerun skips the points
already measured (``ok``) and decides the others again (a larger budget, a fixed error).
Each row says where it was measured (``host``, ``device_name``, ``physical_device``), and
``sweep.json`` holds the record of every device that measured points (``devices``: its
environment, workers and rates, :func:`add_device`).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import inspect
import io
import json
import math
import os
import re
import shlex
import shutil
import statistics
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

import riemann_core as rc

try:  # POSIX: the lock of a directory a sweep writes into (:func:`writing`)
    import fcntl
except ImportError:  # Windows: not taken
    fcntl = None

from .. import costs
from ..arguments import MAX_REPEATS, check_at_most, check_device, check_distinct
from ..factors import OUTPUT_METRICS
from ..measure.flops import KINDS, flop_counter, flops_by_kind
from ..measure.load import is_loaded, point_load
from ..measure.memory import cuda_peak_bytes, host_peak_bytes
from ..measure.output import check_writable, write_atomic
from ..measure.problems import mlp, widths
from ..measure.public_kfac import DEFAULT as KFAC_DEFAULT
from ..measure.public_kfac import Variant
from ..measure.timing import Timing, interleaved, measure, timing_of
from ..methods import SLOW_PATHS, recording_slow_paths
from .worker import device_record, lines_here, measure_here, rates_here

AXES = ("width", "depth", "out_dim", "batch")
#: Axis -> the command-line option (and ``argparse`` dest) that lists its values.
AXIS_OPTIONS = {"width": "widths", "depth": "depths", "out_dim": "out_dims", "batch": "batches"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
COLUMNS = (
    "method",
    "kernel",
    "width",
    "depth",
    "out_dim",
    "batch",
    "device",
    "dtype",
    "output_metric",
    "n_params",
    "d",
    "time_median_s",
    "time_iqr_s",
    "times_s",
    "flops",
    *(f"flops_{kind}" for kind in KINDS),
    "flops_model",
    "sol_products",
    "sol_cholesky",
    "peak_bytes",
    "peak_bytes_model",
    "spread",
    "flag",
    "slow_paths",
    "remeasured",
    "interleaved",
    "stretches",
    "status",
    "reason",
    "host",
    "device_name",
    "physical_device",
    "sweep",
)
#: where a point was measured; blank in results written before these were recorded
WHERE = ("host", "device_name", "physical_device")
#: text columns a results file may lack (written before they were recorded): blank then.
#: ``sweep`` is the id of the sweep whose directory the row was written in, which its
#: ``sweep.json`` records
OPTIONAL = (*WHERE, "slow_paths", "interleaved", "stretches", "sweep")
KEY = ("method", "kernel", "width", "depth", "out_dim", "batch", "device", "dtype", "output_metric")
#: Sweep-only methods: a K-FAC variant by its label. ``kfac-default`` is the K-FAC users run
#: by default (one-sample Monte Carlo Fisher, factored damping, weight and bias apart); its
#: Fisher is its own, whatever the grid's output metric (the row's ``output_metric`` stays
#: the sweep's setting, which the other methods follow). ``kfac`` is the exact variant.
KFAC_VARIANTS: dict[str, Variant] = {"kfac-default": KFAC_DEFAULT}
#: Methods the sweep measures: ``rc.METHODS`` and :data:`KFAC_VARIANTS`.
METHODS = (*rc.METHODS, *KFAC_VARIANTS)
#: Methods measured with the generic kernel as well as the structured one.
GENERIC_METHODS = ("layerwise",)
#: A point whose repeats have an IQR above this fraction of their median is re-timed once,
#: and flagged ``spread`` if it still is.
SPREAD_LIMIT = 0.2
#: A point whose median is this factor or more off the log-log interpolation of its two
#: neighbours on an axis is measured once more, and flagged ``outlier`` if it still is.
NEIGHBOUR_FACTOR = 1.5
#: Axes whose line through the base point is timed again at the end of a sweep, its points
#: interleaved (:func:`time_lines`): the depth claims judge the line's shape to a few
#: percent, which the machine's drift between points measured minutes apart bends.
INTERLEAVED_AXES = ("depth",)
#: Axes whose top pair (the two largest ok points of the line through the base point: the
#: top segment the claims on time judge) is timed again the same way. Two points measured
#: minutes apart carry the machine's drift into their ratio: a quick CPU sweep once judged
#: ``time-explained-layerwise-generic`` "fail" on batch 256 -> 512 taking 2.75x the time
#: for 1.93x the FLOPs, where the same two points timed alternately took 1.6-1.7x.
TOP_PAIR_AXES = ("width", "batch")
#: Rounds of a line's interleaved timing, per repeat of a point: a line of a few
#: milliseconds per point takes seconds, and its shape needs each point's median to a few
#: percent (at 7 rounds on a shared 2-core CPU, the quadratic term's interval was 0.2-1.3
#: wide).
LINE_ROUNDS_PER_REPEAT = 3
#: Stretches of time a line along :data:`INTERLEAVED_AXES` is timed in, the other groups'
#: lines between them (where there are others) (``stretches``: its ``times_s`` hold them one after another, each of
#: ``LINE_ROUNDS_PER_REPEAT * repeats`` rounds). The depth claims judge each stretch alone
#: and pass or fail only where all agree: a stretch carries a state of the machine that
#: slows the deep points alike in every round of it, which interleaving does not cancel (a
#: CPU sweep failed euclidean's line at a quadratic share of 0.255 [0.162, 0.384], where
#: two sweeps minutes later, same code, passed it at 0.05, and the line timed alone in
#: fresh processes read 0.04 to 0.22 over nine stretches).
LINE_STRETCHES = 2


class ResultsFileError(ValueError):
    """An existing results file cannot be read; it is left untouched."""


@dataclass(frozen=True)
class Grid:
    """One-axis-at-a-time grid around ``base``; see the module docstring."""

    base: dict[str, int]
    axes: dict[str, tuple[int, ...]]
    methods: tuple[str, ...] = METHODS
    kernels: tuple[str, ...] = ("structured", "generic")
    dtypes: tuple[str, ...] = ("float32",)
    devices: tuple[str, ...] = ("cpu",)
    output_metric: str = "exact"
    repeats: int = 5
    warmup: int = 1
    damping: float = 1e-3
    memory_budget_bytes: float = 4 * 2**30
    flop_budget: float = 2e11  # about a second per call on a 2-core CPU
    seed: int = 0
    #: axis -> the largest value growth may extend it to (axes not named do not grow)
    grow: dict[str, int] = field(default_factory=dict)
    #: growth stops where the per-call overhead is at most this fraction of the time
    overhead_target: float = 0.2
    #: seconds the sweep may spend measuring; growth stops before it would run over
    time_budget_s: float = math.inf
    #: size of the GEMM, Cholesky and triangular solve that measure the device's rates
    rate_size: int = 2048

    def __post_init__(self):
        check_grid(self)

    def points(self) -> list[dict[str, int]]:
        """Shapes: the base, then each axis's values with the others at the base."""
        seen, out = set(), []
        for axis in AXES:
            for value in self.axes[axis]:
                point = {**self.base, axis: value}
                key = tuple(point[a] for a in AXES)
                if key not in seen:
                    seen.add(key)
                    out.append(point)
        return out

    def selects(self, row: Mapping) -> bool:
        """Whether ``row`` is of a method, kernel, dtype, device and output metric this grid
        measures: a sweep resumed with a smaller grid (fewer methods, kernels or devices;
        other dtypes and output metrics are refused) decides, grows, measures again and
        times again only those, and keeps the others as they were recorded."""
        return (
            row["method"] in self.methods
            and row["kernel"] in self.kernels
            and row["dtype"] in self.dtypes
            and row["device"] in self.devices
            and row["output_metric"] == self.output_metric
        )

    def runs(self) -> Iterator[dict]:
        """Every measurement: shape x method x kernel x dtype x device."""
        for device in self.devices:
            for dtype in self.dtypes:
                for point in self.points():
                    for method in self.methods:
                        for kernel in self.kernels:
                            if kernel == "generic" and method not in GENERIC_METHODS:
                                continue
                            yield {
                                "method": method,
                                "kernel": kernel,
                                **point,
                                "device": device,
                                "dtype": dtype,
                                "output_metric": self.output_metric,
                            }


def check_grid(grid: Grid) -> None:
    """Reject bad options before any work, naming the option, its bad values and the fix."""
    if set(grid.base) != set(AXES) or set(grid.axes) != set(AXES):
        raise ValueError(f"base and axes must name exactly {AXES}")
    bad_base = [v for v in grid.base.values() if not _positive_int(v)]
    if bad_base:
        raise ValueError(
            f"--base needs 4 positive integers (width, depth, out_dim, batch), got "
            f"{tuple(grid.base.values())}"
        )
    for axis in AXES:
        flag = "--" + AXIS_OPTIONS[axis].replace("_", "-")
        bad = [v for v in grid.axes[axis] if not _positive_int(v)]
        if bad or not grid.axes[axis]:
            raise ValueError(f"{flag} needs positive integers, got {bad or list(grid.axes[axis])}")
    # (found by a hunt: --widths 99999999999999999999 was recorded as a skipped point, and
    # every later sweep, resume or report of that --out broke off with an OverflowError:
    # results.csv's axes are read as int64)
    for flag, values in (
        ("--base", grid.base.values()),
        *(("--" + AXIS_OPTIONS[axis].replace("_", "-"), grid.axes[axis]) for axis in AXES),
    ):
        if huge := [v for v in values if v > MAX_AXIS]:
            raise ValueError(f"{flag} takes values up to {MAX_AXIS}, got {huge}")
    # (found by a hunt: one output, a cross-entropy of one class, divided by zero rows)
    single = [v for v in (grid.base["out_dim"], *grid.axes["out_dim"]) if v == 1]
    if single:
        raise ValueError(
            "--out-dims and --base need out_dim >= 2: a cross-entropy over one class is "
            "constant, its metric has no rows; got out_dim 1"
        )
    for name, values, allowed in (
        ("method", grid.methods, METHODS),
        ("kernel", grid.kernels, ("structured", "generic")),
        ("dtype", grid.dtypes, tuple(DTYPES)),
        ("output metric", (grid.output_metric,), OUTPUT_METRICS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"unknown {name} {bad or values}; choose from {', '.join(allowed)}")
        check_distinct(f"{name}s", values)
    if len(grid.dtypes) > 1:  # found by a hunt: fit, validate and report refused the rows
        raise ValueError(
            f"--dtypes {','.join(grid.dtypes)}: fits, claims and the grid's growth compare one "
            "dtype at a time; sweep each dtype into its own --out"
        )
    for device in grid.devices:
        if torch.device(device).type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N')")
    for option, value, least in (
        ("--repeats", grid.repeats, 1),
        ("warmup", grid.warmup, 0),
        ("damping", grid.damping, None),
        ("--memory-budget-gib", grid.memory_budget_bytes / 2**30, None),
        ("--flop-budget", grid.flop_budget, None),
        ("--time-budget", grid.time_budget_s, None),
    ):
        if not (value >= least if least is not None else value > 0):
            need = f"at least {least}" if least is not None else "positive"
            raise ValueError(f"{option} must be {need}, got {value:g}")
    check_at_most("--repeats", grid.repeats, MAX_REPEATS, "the most timed calls a point takes")
    bad_growth = {a: v for a, v in grid.grow.items() if a not in AXES or not _positive_int(v)}
    if bad_growth:
        raise ValueError(f"grow needs axes of {AXES} with positive caps, got {bad_growth}")
    if next(grid.runs(), None) is None:  # only the generic kernel, for methods without one
        raise ValueError(
            f"no point to measure: the generic kernel runs only {', '.join(GENERIC_METHODS)}, "
            f"and --kernels generic is the only kernel for --methods {','.join(grid.methods)}; "
            "add structured to --kernels"
        )


#: The largest value of an axis (results.csv's axis columns are read as int64).
MAX_AXIS = 2**62


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


#: The default grid (``riemann-bench run``): about 20 minutes on 2 CPU cores, growth included.
#: Widths are fine where ``full`` still fits. Depths reach 32 hidden layers: on a 2-core
#: CPU, layerwise's time per layer at the base point climbed from 0.45 ms to 0.79 ms up
#: to depth 12-16 (its working set leaving the caches) and stayed there to 32; a line
#: ending at 16 read a quadratic share of 18-25% in both stretches of its timing, where
#: the claim is about the regime past that climb.
DEFAULT = dict(
    base={"width": 128, "depth": 2, "out_dim": 10, "batch": 32},
    axes={
        "width": (8, 12, 16, 24, 32, 48, 64, 128, 256, 512),
        "depth": (1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
        "out_dim": (2, 4, 6, 10, 16, 24, 32),
        "batch": (4, 8, 16, 32, 64, 128, 256, 512),
    },
    repeats=7,
    grow={"width": 4096, "batch": 4096},
    time_budget_s=1500.0,
    rate_size=4096,
)
#: ``--quick``: at most 5 minutes on 2 CPU cores, growth included.
QUICK = dict(
    base={"width": 32, "depth": 2, "out_dim": 10, "batch": 16},
    axes={
        "width": (8, 16, 24, 32, 64, 128, 256),
        "depth": (1, 2, 4, 8, 16),
        "out_dim": (2, 5, 10, 20),
        "batch": (4, 8, 16, 32, 64),
    },
    repeats=3,
    grow={"width": 2048, "batch": 1024},
    time_budget_s=180.0,
    rate_size=2048,
)
#: The default grid on a GPU: large enough to leave the launch-overhead regime.
DEFAULT_CUDA = dict(
    base={"width": 512, "depth": 2, "out_dim": 10, "batch": 128},
    axes={
        "width": (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
        "depth": (1, 2, 4, 8, 12, 16),
        "out_dim": (2, 4, 10, 16, 32),
        "batch": (16, 32, 64, 128, 256, 512, 1024, 2048),
    },
    repeats=7,
    grow={"width": 16384, "batch": 8192},
    memory_budget_bytes=64 * 2**30,
    flop_budget=1e13,  # eigendecompositions run far below the GEMM rate: K-FAC stops at ~6k
    time_budget_s=1500.0,
    rate_size=16384,
)
#: ``--quick`` on a GPU: about 3 minutes.
QUICK_CUDA = dict(
    base={"width": 256, "depth": 2, "out_dim": 10, "batch": 64},
    axes={
        "width": (16, 32, 64, 128, 256, 1024, 4096),
        "depth": (1, 2, 4, 8, 16),
        "out_dim": (2, 5, 10, 20),
        "batch": (16, 64, 256, 1024),
    },
    repeats=3,
    grow={"width": 16384, "batch": 4096},
    memory_budget_bytes=32 * 2**30,
    flop_budget=2e12,
    time_budget_s=150.0,
    rate_size=8192,
)


def default_grid(device: str, quick: bool) -> dict:
    """The grid for ``device`` (a CPU or a GPU), quick or default, as ``Grid`` arguments."""
    cuda = torch.device(device).type == "cuda"
    return dict((QUICK_CUDA if quick else DEFAULT_CUDA) if cuda else (QUICK if quick else DEFAULT))


def direction_options(run: Mapping) -> dict[str, str]:
    """The options of ``rc.direction`` that ``run`` measures: its ``method`` and
    ``output_metric``, or a K-FAC variant's (:data:`KFAC_VARIANTS`) for its label."""
    variant = KFAC_VARIANTS.get(run["method"])
    if variant is not None:
        return variant.options()
    return {"method": run["method"], "output_metric": run["output_metric"]}


def shape_of(run: Mapping) -> costs.MLPShape:
    """The cost model's view of ``run``: ``r = C - 1`` exact cross-entropy rows (the
    methods use the minimal factor), or 1 probe (the sampled output metric, and
    ``kfac-default``'s one-sample Monte Carlo Fisher)."""
    metric = direction_options(run)["output_metric"]
    rows = costs.minimal_rows(run["out_dim"], output_metric=metric)
    return costs.MLPShape(widths(run["width"], run["depth"], run["out_dim"]), run["batch"], rows)


def model_flops(run: Mapping) -> dict[str, float]:
    """``costs.flops`` of ``run``'s method (and K-FAC variant) at its shape, by phase, for
    its device and dtype."""
    options = direction_options(run)
    variant = {k: options[k] for k in ("kfac_damping", "kfac_bias") if k in options}
    return costs.flops(
        options["method"],
        shape_of(run),
        run["kernel"],
        device=run["device"],
        dtype=DTYPES.get(run.get("dtype")),  # (None: a record without one)
        **variant,
    )


def model_peak_bytes(run: Mapping) -> float:
    """``costs.peak_bytes`` of ``run``'s method at its shape, dtype and device."""
    itemsize = torch.finfo(DTYPES[run["dtype"]]).bits // 8
    method = direction_options(run)["method"]
    return costs.peak_bytes(method, shape_of(run), run["kernel"], itemsize, device=run["device"])


def speed_of_light_of(run: dict, rates: dict[str, float] | None = None) -> dict[str, float]:
    """Minimal FLOPs by kind of the exact layerwise direction at ``run``'s shape and
    output metric (for every method: the yardstick of the point); each layer's route the
    one of fewer FLOPs, or given the device's ``rates`` the one of least time at them
    (:func:`riemann_core.costs.speed_of_light_flops`)."""
    rows = costs.minimal_rows(run["out_dim"], output_metric=run["output_metric"])
    shape = costs.MLPShape(widths(run["width"], run["depth"], run["out_dim"]), run["batch"], rows)
    return costs.speed_of_light_flops(shape, rates)


def blank_row(run: dict) -> dict:
    """The row of ``run`` before it is measured: the cost model's figures and the speed of
    light's minimal FLOPs, NaN measurements."""
    shape = shape_of(run)
    sol = speed_of_light_of(run)
    return {
        **run,
        "n_params": shape.n_params,
        "d": shape.d,
        "time_median_s": math.nan,
        "time_iqr_s": math.nan,
        "times_s": "[]",
        "flops": math.nan,
        **{f"flops_{kind}": math.nan for kind in KINDS},
        "flops_model": model_flops(run)["total"],
        "sol_products": sol["products"],
        "sol_cholesky": sol["cholesky"],
        "peak_bytes": math.nan,
        "peak_bytes_model": model_peak_bytes(run),
        "spread": math.nan,
        "flag": "",
        "slow_paths": "",
        "remeasured": 0,
        "interleaved": "",
        "stretches": "",
        "status": "ok",
        "reason": "",
        "sweep": "",
    }


def measure_point(run: dict, grid: Grid) -> dict:
    """One row of ``results.csv`` for ``run`` (never raises for the point's own failure).

    A pure function of its arguments: the model and batch are seeded from ``grid.seed``
    on generators of their own, and nothing global is read or left changed. A warm-up
    call precedes the memory measurement: the first call on a new model runs the one-time
    check that it treats samples independently (extra backward passes: 80 MiB against a
    model of 0.05 MiB at the first point of a process, 490 MiB against 26 at kfac-default
    width 128 batch 4096), and on CUDA allocates the cuBLAS workspace. Repeats whose IQR
    exceeds :data:`SPREAD_LIMIT` of their median, or, on a CPU, that read loaded
    (:func:`timed`), are timed once more; the row keeps the second set and its ``flag``
    says ``spread`` if that spreads too and ``loaded`` if it reads loaded too.
    """
    row = blank_row(run)
    flops_model, peak_model = row["flops_model"], row["peak_bytes_model"]
    if peak_model > grid.memory_budget_bytes:
        return {
            **row,
            "status": "skipped",
            "reason": (
                f"modelled peak {peak_model / 2**30:.1f} GiB > budget "
                f"{grid.memory_budget_bytes / 2**30:.1f} GiB"
            ),
        }
    if flops_model > grid.flop_budget:
        return {
            **row,
            "status": "skipped",
            "reason": f"modelled {flops_model:.2g} FLOPs > budget {grid.flop_budget:.2g}",
        }
    device = torch.device(run["device"])
    try:
        call = _direction_call(run, grid, device)
        call()
        peak = cuda_peak_bytes(call, device) if device.type == "cuda" else host_peak_bytes(call)
        timing, loaded = timed(call, grid.repeats, grid.warmup, device)
        remeasured = spread_of(timing) > SPREAD_LIMIT or loaded
        if remeasured:
            timing, loaded = timed(call, grid.repeats, 0, device)
        with flop_counter() as counter, recording_slow_paths() as slow_paths:
            call()
    except torch.cuda.OutOfMemoryError as err:  # torch.OutOfMemoryError only from 2.5
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "status": "oom", "reason": str(err).splitlines()[0][:200]}
    except Exception as err:  # noqa: BLE001  (recorded; the sweep goes on)
        return {**row, "status": "error", "reason": f"{type(err).__name__}: {err}"[:300]}
    by_kind = flops_by_kind(counter)
    return {
        **row,
        "time_median_s": timing.median,
        "time_iqr_s": timing.iqr,
        "times_s": json.dumps([round(t, 9) for t in timing.times]),
        "flops": sum(by_kind.values()),
        **{f"flops_{kind}": by_kind[kind] for kind in KINDS},
        "peak_bytes": math.nan if peak is None else peak,
        "spread": spread_of(timing),
        "flag": " ".join(["spread"] * (spread_of(timing) > SPREAD_LIMIT) + ["loaded"] * loaded),
        "slow_paths": " ".join(sorted(set(slow_paths))),
        "remeasured": int(remeasured),
    }


def timed(call: Callable, repeats: int, warmup: int, device: torch.device) -> tuple[Timing, bool]:
    """``repeats`` timed calls of ``call`` after ``warmup`` (:func:`measure`), and whether
    they read loaded (:func:`load_read`)."""
    with load_read(device) as loaded:
        timing = measure(call, repeats=repeats, warmup=warmup, device=device)
    return timing, loaded[0]


@contextlib.contextmanager
def load_read(device: torch.device) -> Iterator[list[bool]]:
    """A list holding, when the block ends, whether other processes kept busy more CPUs
    than it left free meanwhile, or kept this process's threads waiting for one
    (:func:`~riemann_core.measure.load.is_loaded` on the threads torch runs here, those of
    the points it times; ``False`` where the load cannot be read). Not read on a GPU, whose
    times are its own."""
    loaded = [False]
    if device.type != "cpu":
        yield loaded
        return
    with point_load() as reading:
        yield loaded
    loaded[0] = is_loaded(reading, torch.get_num_threads())


def spread_of(timing: Timing) -> float:
    """IQR / median of the repeats."""
    return timing.iqr / timing.median if timing.median > 0 else math.inf


def lines_to_interleave(rows: list[dict], base: Mapping[str, int]) -> list[tuple[str, list[dict]]]:
    """``(axes, runs)`` of every group of points to time again interleaved.

    Per method, kernel, dtype, device and output metric: the line along each of
    :data:`INTERLEAVED_AXES` through ``base`` (the ok points whose other axes sit at the
    base, in order along the axis) where it has three or more points (a shape needs
    three), and the top two points of the line along each of :data:`TOP_PAIR_AXES`. Points
    that took a slow path are left out, as the claims leave them out.
    Lines that share a point are timed as one group, so that every point has one timing
    and every line through it is timed in one stretch; ``axes`` names the group's axes,
    space-separated.
    """
    lines: dict[tuple, list[dict]] = {}
    for axis in (*INTERLEAVED_AXES, *TOP_PAIR_AXES):
        for row in rows:
            if (
                row["status"] == "ok"
                and not row.get("slow_paths")
                and all(int(row[a]) == int(base[a]) for a in AXES if a != axis)
            ):
                group = (axis, *(row[k] for k in KEY if k not in AXES))
                lines.setdefault(group, []).append(run_of(row))
    groups: list[tuple[list[str], dict[tuple, dict]]] = []
    for (axis, *_), line in lines.items():
        line.sort(key=lambda r: r[axis])
        if axis in TOP_PAIR_AXES:
            line = line[-2:]
        if len(line) < (2 if axis in TOP_PAIR_AXES else 3):
            continue
        axes, runs = [axis], {key_of(r): r for r in line}
        for other in [g for g in groups if g[1].keys() & runs.keys()]:
            groups.remove(other)
            axes, runs = [*other[0], *axes], {**other[1], **runs}
        groups.append((axes, runs))
    return [(" ".join(dict.fromkeys(axes)), list(runs.values())) for axes, runs in groups]


def time_lines(
    lines: list[list[dict]],
    grid: Grid,
    device: torch.device,
    progress: Callable[[int, int], object] | None = None,
) -> list[dict]:
    """``{**key, time_median_s, time_iqr_s, times_s, spread, stretches, loaded}`` of every
    point of ``lines`` on ``device``: each line's points timed in turn in each of
    ``LINE_ROUNDS_PER_REPEAT * grid.repeats`` rounds, in :func:`stretches_of` the line
    stretches of time (the second of a depth line after every line's first, their times
    one after another in ``times_s``), each call right after an untimed call
    of its own (:func:`~riemann_core.measure.timing.interleaved`), so that a slow spell of
    the machine slows every point of a round alike instead of bending the line, and each
    point is timed in the cache state its own call leaves, as a point measured alone is:
    timed right after the line's largest point of the round before, the smallest read
    25-30% high and bent the line (layerwise along depth at width 128, batch 32: 3.1-3.2
    against 2.4-2.6 ms at depth 1, a quadratic term of 31% [28%, 36%] failed the linear
    claim). ``loaded``: whether the load read around one of its line's stretches
    (:func:`load_read`) was loaded (two reads a stretch, against its seconds of rounds). A
    line whose point fails here comes back as ``{**key, "error": reason}`` rows: its points
    keep the times of their own measurement, and the caller says why. ``progress(done,
    total)``, where given, is called with the stretches done of all (``total``, the sum of
    the lines' stretches): with 0 first, then after each line's stretch (a failed line's
    stretches to come count done with it), between stretches, outside the timed calls."""
    stretches = [stretches_of(line) for line in lines]
    times: list[dict | str] = [{key_of(run): [] for run in line} for line in lines]
    loaded = [False] * len(lines)
    done, total = 0, sum(stretches)
    if progress is not None:
        progress(done, total)
    for stretch in range(max(stretches, default=0)):
        for i, line in enumerate(lines):
            if stretch >= stretches[i] or isinstance(times[i], str):
                continue
            try:
                calls = {key_of(run): _direction_call(run, grid, device) for run in line}
                with load_read(device) as read:
                    rounds = interleaved(
                        calls, LINE_ROUNDS_PER_REPEAT * grid.repeats, device, warmup=1
                    )
            except Exception as err:  # noqa: BLE001  (its points were measured; reported above)
                times[i] = f"{type(err).__name__}: {err}"[:300]
                done += stretches[i] - stretch
            else:
                loaded[i] = loaded[i] or read[0]
                for key, point_times in rounds.items():
                    times[i][key] += point_times
                done += 1
            if progress is not None:
                progress(done, total)
    out = []
    for line, count, line_times, line_loaded in zip(lines, stretches, times, loaded, strict=True):
        if isinstance(line_times, str):
            out += [{**run, "error": line_times} for run in line]
            continue
        for run in line:
            timing = timing_of(line_times[key_of(run)])
            out.append(
                {
                    **run,
                    "time_median_s": timing.median,
                    "time_iqr_s": timing.iqr,
                    "times_s": json.dumps([round(t, 9) for t in timing.times]),
                    "spread": spread_of(timing),
                    "stretches": count,
                    "loaded": line_loaded,
                }
            )
    return out


def stretch_spread(times: Sequence[float], stretches: int) -> float:
    """How far the stretches of time a point was timed in disagree: the median of the
    slowest stretch over that of the fastest, less 1 (``times`` holds the stretches one
    after another, :func:`time_lines`); 0 for one stretch, nan where ``times`` do not
    split into ``stretches`` equal parts. Above :data:`SPREAD_LIMIT` the point is flagged
    ``stretches``: its pooled median is no time of the point but a mixture of two states of
    the machine, so the time models, the fits and the claims on time leave it out (found by
    an audit: a base point read 0.93 ms in one stretch and 19.5 ms in the other, pooled to
    8.1 ms, which bent the width fit's top segment and its time model)."""
    count = int(stretches) if stretches else 1
    if count <= 1:
        return 0.0
    if not times or len(times) % count:
        return math.nan
    size = len(times) // count
    medians = [statistics.median(times[i * size : (i + 1) * size]) for i in range(count)]
    return max(medians) / min(medians) - 1 if min(medians) > 0 else math.inf


def stretches_of(line: list[dict]) -> int:
    """:data:`LINE_STRETCHES` for a group of points holding a line along one of
    :data:`INTERLEAVED_AXES` (three or more values along it, the rest alike), 1 otherwise
    (a top pair: its claims read the ratio of two points, which a stretch slows alike)."""
    for axis in INTERLEAVED_AXES:
        along = Counter(tuple(run[a] for a in AXES if a != axis) for run in line)
        if max(along.values(), default=0) >= 3:
            return LINE_STRETCHES
    return 1


def _direction_call(run: dict, grid: Grid, device: torch.device) -> Callable[[], object]:
    dtype = DTYPES[run["dtype"]]
    with torch.random.fork_rng(devices=[]):  # the model's initialisation, seeded, no trace
        torch.manual_seed(grid.seed)
        model = mlp(widths(run["width"], run["depth"], run["out_dim"])).to(device, dtype)
    data = torch.Generator(device).manual_seed(grid.seed)
    x = torch.randn(run["batch"], run["width"], device=device, dtype=dtype, generator=data)
    y = torch.randint(0, run["out_dim"], (run["batch"],), device=device, generator=data)
    probes = torch.Generator(device).manual_seed(grid.seed)

    def call():
        return rc.direction(
            model,
            x,
            y,
            kernel=run["kernel"],
            damping=grid.damping,
            generator=probes,
            **direction_options(run),
        )

    return call


def check_a_file(path: Path) -> None:
    """:class:`ResultsFileError` where ``path`` exists but is no file (found by a hunt: a
    directory there gave a bare ``[Errno 21]``)."""
    if path.exists() and not path.is_file():
        raise ResultsFileError(f"{path} is not a file (a directory?); move it away")


def _parsed(reader: csv.DictReader, longest: int) -> list[dict]:
    """The rows of ``reader``, fields up to ``longest`` characters allowed (the csv
    module's limit, 131072 by default, is put back after): found by a hunt, the times of a
    point swept at ``--repeats 10500`` took 135341, and the sweep could not read back its
    own file to resume, fit or report."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, longest))
    try:
        return list(reader)
    finally:
        csv.field_size_limit(limit)


def read_results(path: Path) -> list[dict]:
    """Rows of an existing ``results.csv``; a file that is not one raises
    :class:`ResultsFileError` and is never modified."""
    if not path.exists():
        return []
    check_a_file(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # a spreadsheet's BOM read
            text = f.read()
        if not text.strip():  # a sweep writes the header first (found by a hunt)
            raise ResultsFileError(f"{path} is empty; move it away or pass another --out")
        reader = csv.DictReader(io.StringIO(text))
        names = reader.fieldnames or ()
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # csv keeps a name's last column, pandas its first (found by a hunt)
            raise ResultsFileError(
                f"{path} names the columns {twice} more than once (a hand-edited file?); "
                "keep one column of each name, or pass another --out"
            )
        missing = set(COLUMNS) - set(OPTIONAL) - set(names)
        if missing:
            raise ResultsFileError(
                f"{path} is not a results file of this version of riemann-bench "
                f"(missing columns {sorted(missing)}); move it away or pass another --out"
            )
        # a column this version does not write is a renamed or hand-added one (found by a
        # hunt: "slow_paths" renamed left its points in every fit, "sweep" renamed let
        # another sweep's rows in, "interleaved" renamed turned fails into too noisy; each
        # read as blank, in silence)
        unknown = [n for n in names if n not in COLUMNS]
        if unknown:
            blank = sorted(set(OPTIONAL) - set(names))
            raise ResultsFileError(
                f"{path} has columns this version of riemann-bench does not write {unknown} "
                "(renamed or added by hand?)"
                + (f", and lacks {blank}, which it would read as blank" if blank else "")
                + "; rename or remove them (the header's names are those this version writes) "
                "or pass another --out"
            )
        rows = _parsed(reader, len(text))
    except (csv.Error, UnicodeDecodeError) as err:
        raise ResultsFileError(
            f"{path} cannot be parsed ({err}); move it away or pass another --out"
        ) from err
    first: dict[tuple, int] = {}
    for i, row in enumerate(rows, start=2):
        if None in row:  # DictReader's key of the fields past the header's
            raise ResultsFileError(
                f"{path} line {i} has more fields than the header (a hand-edited file, or a "
                "comma in an unquoted cell?); repair or remove that line, or pass another --out"
            )
        # every row is written whole, ending in a newline: a short row, or a last one
        # without its newline, was cut (DictReader fills missing fields with None)
        cut = None in row.values() or (i == len(rows) + 1 and text[-1] != "\n")
        if cut or any(row.get(c) in (None, "") for c in KEY + ("status",)):
            raise ResultsFileError(
                f"{path} line {i} is incomplete (a truncated or hand-edited file?); "
                "repair or remove that line, or pass another --out"
            )
        problem = _row_problem(row)
        if problem:
            raise ResultsFileError(
                f"{path} line {i}: {problem} (a hand-edited or corrupted file?); repair or "
                "remove that line, or pass another --out"
            )
        seen = first.setdefault((*key_of(row), row.get("device_name") or ""), i)
        if seen != i:  # a point is measured once per device; fits would count it twice
            raise ResultsFileError(
                f"{path} lines {seen} and {i} hold the same point; remove one of them, or pass "
                "another --out"
            )
        for column in OPTIONAL:
            row[column] = row.get(column) or ""
        if row["status"] == "ok":  # an estimate, not a measurement: this version's (an
            # earlier memory model decided only which points were skipped)
            row["peak_bytes_model"] = model_peak_bytes(run_of(row))
    return rows


#: What a row's status may be: measured, or why not.
STATUSES = ("ok", "error", "oom", "skipped")
#: Columns every measured point has: non-negative finite numbers.
MEASURED = (
    "n_params",
    "d",
    "time_median_s",
    "time_iqr_s",
    "flops",
    *(f"flops_{kind}" for kind in KINDS),
    "flops_model",
    "sol_products",
    "sol_cholesky",
    "peak_bytes_model",
)
#: Columns of a measured point that may also be NaN or empty (not measured: a host whose
#: peak memory cannot be read) or, for the spread, inf (a median of zero). A measured
#: time is positive.
MAYBE_MEASURED = ("peak_bytes", "spread")
#: The largest value a measured column can hold: a time of over 30 years, or a peak of
#: over an exbibyte, is an edit (1e300 bytes overflowed the memory figure, 1e300 s gave an
#: infinite rate; found by a hunt). Modelled sweeps in the tests reach 1e7 s.
LIMITS = {"time_median_s": 1e9, "time_iqr_s": 1e9, "peak_bytes": 2.0**60}
#: The shortest time a call can take (seconds): below, a timer does not resolve it.
SHORTEST_TIME = 1e-9
#: The words of a measured point's text columns (space-separated; empty: none).
WORDS = {
    "flag": ("spread", "outlier", "stretches", "loaded"),
    "slow_paths": SLOW_PATHS,
    "interleaved": AXES,
}


def _row_problem(row: dict) -> str | None:
    """What makes a row of ``results.csv`` unusable, or ``None``."""
    if row["status"] not in STATUSES:
        return f"unknown status {row['status']!r} (one of {', '.join(STATUSES)})"
    if row["method"] not in METHODS:
        return f"unknown method {row['method']!r} (one of {', '.join(METHODS)})"
    if row["kernel"] not in ("structured", "generic"):
        return f"unknown kernel {row['kernel']!r} (structured or generic)"
    if row["dtype"] not in DTYPES:
        return f"unknown dtype {row['dtype']!r} ({' or '.join(DTYPES)})"
    if row["output_metric"] not in OUTPUT_METRICS:
        return f"unknown output_metric {row['output_metric']!r} (exact or sampled)"
    if not re.fullmatch(r"(cpu|cuda)(:\d+)?", row["device"]):
        return f"unknown device {row['device']!r} (cpu, cuda or cuda:N)"
    for column in (*AXES, "stretches"):  # (stretches: text in any row made pandas read the
        # whole column as text, and no depth line was judged by stretch; found by review)
        value = row.get(column) or ("1" if column == "stretches" else "")
        if not (value.isascii() and value.isdigit()) or int(value) < 1:
            return f"{column} is {value!r}, not a positive integer"
        if int(value) > MAX_AXIS:
            return f"{column} is {value!r}, more than {MAX_AXIS}"
    if row["status"] != "ok":  # nothing measured, but what is there reads as numbers
        # (found by review: an 'error' row's text time crashed fit with a TypeError)
        return next(
            (
                f"a point not measured ({row['status']}) with {column} = {row[column]!r}"
                for column in MEASURED + MAYBE_MEASURED
                if row.get(column) not in (None, "") and _number(row[column]) is None
            ),
            None,
        )
    for column in MEASURED + MAYBE_MEASURED:
        value = _number(row.get(column))
        if column in MAYBE_MEASURED:
            value = math.nan if row.get(column) == "" else value
            usable = value is not None and (math.isnan(value) or value >= 0)
            usable &= column == "spread" or value != math.inf
        else:
            usable = value is not None and math.isfinite(value) and value >= 0
            usable = usable and (column != "time_median_s" or value > 0)  # times divide
        if usable and value == value and value > LIMITS.get(column, math.inf):
            usable = False  # a float, but no measurement (found by a hunt: a figure's inf)
        if usable and column == "time_median_s" and value < SHORTEST_TIME:
            usable = False
        if not usable:
            return f"a measured point with {column} = {row.get(column)!r}"
    times = _times(row["times_s"])
    if times is None:
        return f"times_s is {row['times_s']!r}, not a list of positive times in seconds"
    median = statistics.median(times)
    if not math.isclose(float(row["time_median_s"]), median, rel_tol=1e-6, abs_tol=1e-9):
        return f"time_median_s is {row['time_median_s']}, not {median:.9g}, the median of times_s"
    counted = sum(float(row[f"flops_{kind}"]) for kind in KINDS)
    if not math.isclose(float(row["flops"]), counted, rel_tol=1e-9):
        return f"flops is {row['flops']}, not {counted:.6g}, the sum of its kinds' columns"
    shape = shape_of(run_of(row))
    for column, value in (("n_params", shape.n_params), ("d", shape.d)):
        if float(row[column]) != value:
            return f"{column} is {row[column]}, not {value}, the network's at this point"
    if row["remeasured"] not in ("0", "1"):
        return f"remeasured is {row['remeasured']!r}, not 0 or 1"
    stretches = row.get("stretches") or "1"
    if len(times) % int(stretches):
        return f"times_s holds {len(times)} times, which its {stretches} stretches do not share"
    for column, words in WORDS.items():
        unknown = set((row.get(column) or "").split()) - set(words)
        if unknown:
            return f"{column} holds {sorted(unknown)} (words of {', '.join(words)})"
    return None


def _number(text: str | None) -> float | None:
    """``text`` as a float (``"nan"`` as NaN), or ``None`` where it is not a number as the
    analysis reads one: Python's float() also takes ``1_000``, full-width digits and
    spaces, which pandas reads as text (found by a hunt: a traceback in validate)."""
    if not isinstance(text, str) or not _PLAIN_NUMBER.fullmatch(text):
        return None
    return float(text)


#: a number as the results file holds one (and pandas reads): ASCII, no ``_`` or spaces
_PLAIN_NUMBER = re.compile(
    r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.I | re.A
)


def _times(text: str) -> list[float] | None:
    """The repeats' times of a ``times_s`` cell, or ``None`` where it is not a JSON list
    of finite positive numbers."""
    try:
        times = json.loads(text)
    except ValueError:
        return None
    numbers = isinstance(times, list) and all(
        type(t) in (int, float) and math.isfinite(t) and t > 0 for t in times
    )
    return times if numbers and times else None


def read_record(path: Path) -> dict:
    """``sweep.json``: the grid, its base point, the devices; a file that is not one
    raises :class:`ResultsFileError` naming it, and is never modified."""
    check_a_file(path)
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # json's parse errors
        raise ResultsFileError(
            f"{path} cannot be parsed ({err}); move it away or pass another --out"
        ) from err
    base = record.get("base") if isinstance(record, dict) else None
    if not isinstance(base, dict) or not all(type(base.get(a)) is int for a in AXES):
        raise ResultsFileError(
            f"{path} is not the record of a sweep (it needs a base point with integer "
            f"{', '.join(AXES)}); move it away or pass another --out"
        )
    axes = record.get("axes")
    if not isinstance(axes, dict) or not all(  # (found by review: [null, 8] crashed a resume)
        isinstance(axes.get(a), list) and all(type(v) is int and v > 0 for v in axes[a])
        for a in AXES
    ):
        raise ResultsFileError(
            f"{path} is not the record of a sweep (it needs the values of every axis, "
            f"{', '.join(AXES)}, as lists of positive integers); move it away or pass "
            "another --out"
        )
    problem = (
        _rates_problem(record)
        or next(
            (
                f"{key} is {record[key]!r}, not a mapping"
                for key in ("grid", "growth", "environment")
                if key in record and not isinstance(record[key], dict)
            ),
            None,
        )
        or _numbers_problem(record)
    )
    if problem:
        raise ResultsFileError(
            f"{path}: {problem} (a hand-edited or corrupted file?); restore it, or rerun the "
            "sweep into another --out"
        )
    return record


def _numbers_problem(record: dict) -> str | None:
    """What makes the numbers a report reads from a sweep's record unusable (found by
    review: a string ``sweep_s`` or ``grid.overhead_target`` failed in the report with a
    format error naming neither the file nor the field), or ``None``."""
    grid = record.get("grid", {})
    for where, value in (("sweep_s", record.get("sweep_s", 0)),
                         ("grid.overhead_target", grid.get("overhead_target", 0.5))):  # fmt: skip
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            return f"{where} is {value!r}, not a non-negative number"
    if not 0 < grid.get("overhead_target", 0.5) < 1:
        return f"grid.overhead_target is {grid['overhead_target']!r}, not a fraction in (0, 1)"
    # (found by a hunt: a null or a number there broke fit, validate, report and a resume
    # off with a TypeError where the rows are checked against the grid's settings)
    dtypes = grid.get("dtypes", [])
    if not isinstance(dtypes, list) or not all(d in DTYPES for d in dtypes):
        return f"grid.dtypes is {dtypes!r}, not a list of {' or '.join(DTYPES)}"
    if grid.get("output_metric", "exact") not in OUTPUT_METRICS:
        return f"grid.output_metric is {grid['output_metric']!r}, not exact or sampled"
    commands = record.get("commands", [])
    if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
        return f"commands is {commands!r}, not a list of the commands that filled the directory"
    grids = record.get("grids", [])
    if not isinstance(grids, list) or not all(
        isinstance(g, dict)
        and isinstance(g.get("command", ""), str)
        and isinstance(g.get("grid", {}), dict)
        for g in grids
    ):
        return "grids is not a list of the grids that filled the directory, each with its command"
    if not isinstance(record.get("command", ""), str):  # (found by review: read as `5`)
        return f"command is {record['command']!r}, not the command that ran the sweep"
    if not isinstance(record.get("growth_rule", ""), str):
        return f"growth_rule is {record['growth_rule']!r}, not the text of a growth rule"
    earlier = record.get("earlier_growth_rules", {})
    if not isinstance(earlier, dict) or not all(
        r is None or isinstance(r, str) for r in earlier.values()
    ):
        return (
            f"earlier_growth_rules is {earlier!r}, not a mapping of growth decisions to the "
            "text of the rule each grew by (or null)"
        )
    if not isinstance(record.get("sweep", ""), str):
        return f"sweep is {record['sweep']!r}, not the id of a sweep"
    if not isinstance(record.get("finished", True), bool):
        return f"finished is {record['finished']!r}, not true or false"
    return None


def unfinished_note(record: Mapping, out: Path) -> str | None:
    """What to say of a sweep that did not finish (interrupted, or still running), whose
    ``sweep.json`` says so; ``None`` for a finished one (or one recorded before sweeps
    said). Its fits and claims are over the points there are: a regime "not reached" or a
    line of too few points may only mean the grid was not measured yet (found by a hunt:
    an interrupted sweep's report read as findings)."""
    if record.get("finished", True):
        return None
    commands = record.get("commands") or [record.get("command", "riemann-bench sweep")]
    return (
        f"the sweep in {out} did not finish (interrupted?): its fits and claims are over the "
        "points measured so far, and the axes, growth and commands of sweep.json may name "
        f"what it had yet to measure. Resume it with `{with_out(commands[-1], out)}`, then "
        "fit, validate and report again"
    )


def with_out(command: str, out: Path) -> str:
    """``command`` (a recorded command line) writing into ``out``: its ``--out`` replaced,
    or added where it had none. A sweep moved or copied since was told to resume the
    directory it came from (found by a hunt)."""
    try:
        words = shlex.split(command)
    except ValueError:  # (not a command line: as recorded)
        return command
    kept, skip = [], False
    for word in words:
        if skip or word.startswith("--out="):
            skip = False
            continue
        skip = word == "--out"
        if not skip:
            kept.append(word)
    return shlex.join([*kept, "--out", str(out)])


#: The kinds of rate every measurement of a device's rates holds (the speed of light and
#: the time models need both).
REQUIRED_RATES = ("products", "cholesky")
#: The keys of a measurement of a device's rates (``device_rates``) that name no kind of
#: rate: when, on which worker and in which dtype it was measured, and how many CPUs other
#: processes kept busy meanwhile, of how many read, making up how many physical cores, and
#: how many CPUs the counters' rounding alone may add to the reading
#: (:mod:`riemann_core.measure.load`; absent where not read: a sweep written before, or a
#: platform without ``/proc/stat``; ``cores_read`` and ``rounding_cores`` absent from
#: sweeps written before them).
SESSION_KEYS = (
    "when",
    "dtype",
    "worker",
    "outside_cores",
    "cpus_read",
    "cores_read",
    "rounding_cores",
)


def _rates_problem(record: dict) -> str | None:
    """What makes the device rates of a sweep's record unusable (each measurement a list
    of positive finite FLOP/s per kind), or ``None``."""
    devices = record.get("devices", {})
    if not isinstance(devices, dict):
        return f"devices is {devices!r}, not a mapping of device names"
    sessions = [(None, s) for s in record.get("device_rates", [])]
    for name, device in devices.items():
        if not isinstance(device, dict) or not isinstance(device.get("device_rates", []), list):
            return f"device {name!r} has no list of device_rates"
        workers = device.get("workers", [])  # (found by a hunt: a resume crashed on a text)
        if not isinstance(workers, list) or not all(isinstance(w, str) for w in workers):
            return f"the workers of device {name!r} are {workers!r}, not a list of names"
        environment = device.get("environment", {})
        if not isinstance(environment, dict):
            return f"the environment of device {name!r} is {environment!r}, not a mapping"
        kind = environment.get("device")  # (found by a hunt: a number crashed the reading)
        if kind is not None and not (
            isinstance(kind, str) and re.fullmatch(r"(cpu|cuda)(:\d+)?", kind)
        ):
            return f"the environment of device {name!r} names its device {kind!r}, not cpu or cuda"
        sessions += [(name, s) for s in device.get("device_rates", [])]
    for name, session in sessions:
        if not isinstance(session, dict):
            return f"a measurement of device {name!r}'s rates is {session!r}"
        missing = [kind for kind in REQUIRED_RATES if kind not in session]
        if missing:
            return (
                f"a measurement of the rates of device {name!r} has no {' and no '.join(missing)}"
            )
        if problem := _load_problem(session):
            return f"a measurement of the rates of device {name!r} {problem}"
        for kind, values in session.items():
            if kind in SESSION_KEYS:
                continue
            if (
                not isinstance(values, list)
                or not values
                or not all(type(v) in (int, float) and math.isfinite(v) and v > 0 for v in values)
            ):
                return f"the {kind} rates of device {name!r} are {values!r}, not FLOP/s"
    return None


def _load_problem(session: dict) -> str | None:
    """What makes the outside load a measurement of rates records unusable
    (``outside_cores`` CPUs of ``cpus_read``, both or neither; ``cores_read``, where
    recorded, the physical cores they make up; ``rounding_cores``, where recorded, CPUs
    the reading may be off by), or ``None``."""
    keys = ("outside_cores", "cpus_read", "cores_read", "rounding_cores")
    if not any(key in session for key in keys):
        return None
    for key in keys[:2]:
        if key not in session:
            other = next(k for k in keys if k in session)
            return f"records {other} but no {key}"
    cpus, cores = session["cpus_read"], session["outside_cores"]
    if type(cpus) is not int or cpus < 1:
        return f"read the load of {cpus!r} CPUs, not a whole positive number of them"
    if type(cores) not in (int, float) or not 0 <= cores <= cpus:
        return f"says other processes kept {cores!r} of its {cpus} CPUs busy"
    physical = session.get("cores_read", cpus)
    if type(physical) is not int or not 1 <= physical <= cpus:
        return f"says its {cpus} CPUs make up {physical!r} physical cores"
    rounding = session.get("rounding_cores", 0.0)
    if type(rounding) not in (int, float) or not 0 <= rounding <= cpus:
        return f"says the rounding of its {cpus} CPUs' counters may add {rounding!r} CPUs"
    return None


def resumable_record(out: Path, rows: list[dict], grid: Grid) -> dict:
    """``sweep.json`` of the sweep in ``out`` (``{}`` for none), refused where measuring
    ``grid`` into it beside ``rows`` (its ``results.csv``) would mix two sweeps: results
    without their record (nothing says which grid measured them), another base point, or
    another setting that fits and claims do not tell apart (:data:`RESUMED_SETTINGS`).
    Devices may differ: each has its own fits and report."""
    record_path = out / "sweep.json"
    previous = read_record(record_path) if record_path.exists() else {}
    if not rows:
        return previous
    if not previous:
        raise ResultsFileError(
            f"{out / 'results.csv'} has no {record_path.name} beside it, so nothing says which "
            "grid measured it; resuming could mix two sweeps. Move results.csv away, or pass "
            "another --out"
        )
    check_rows_of_record(rows, previous, out)
    if previous["base"] != grid.base:
        raise ValueError(
            f"{out} holds a sweep around the base point {previous['base']}, not {grid.base}; "
            "fits need one base point per directory: pass another --out"
        )
    recorded = previous.get("grid", {})
    settings = {  # setting: (what the rows were measured with, what grid measures)
        "output_metric": ({r["output_metric"] for r in rows}, {grid.output_metric}),
        "dtype": ({r["dtype"] for r in rows}, set(grid.dtypes)),
        **{
            s: ({str(recorded[s])}, {str(getattr(grid, s))})
            for s in ("seed", "damping")
            if s in recorded
        },
    }
    for setting, (was, now) in settings.items():
        if not was <= now:
            raise ValueError(
                f"{out} holds points measured with {setting} {', '.join(sorted(was))}, not "
                f"{', '.join(sorted(now))}: resuming would mix them in one set of fits. Pass "
                f"{RESUMED_SETTINGS[setting].format(', '.join(sorted(was)))}, or another --out"
            )
    return previous


#: The settings a resumed sweep must keep (-> how to set them): fits and claims are made
#: per device, but not per output metric, dtype, seed or damping.
RESUMED_SETTINGS = {
    "output_metric": "--output-metric {}",
    "dtype": "--dtypes {}",
    "seed": "--seed {}",
    # (found by a hunt: "Pass Grid(damping=...) None"; the command line has no damping)
    "damping": "riemann_core.scaling.sweep.Grid(damping={}) from Python",
}


#: the name of rows whose device is not known (a lost point of a sweep over several devices)
UNKNOWN = "unknown device"


def device_of_unnamed_rows(record: Mapping) -> str:
    """The device a row with a blank ``device_name`` was measured on: the one device of
    the sweep's record (``record``, ``sweep.json``), :data:`UNKNOWN` where it has several
    (a lost point, which ran nowhere)."""
    recorded = record.get("devices") or {}
    if len(recorded) == 1:
        return next(iter(recorded))
    if not recorded:  # written before devices were recorded
        return record.get("environment", {}).get("device_name", UNKNOWN)
    return UNKNOWN


def check_rows_of_record(rows: list[dict], record: dict, out: Path) -> None:
    """Refuse the rows of ``out/results.csv`` that the grid of ``out/sweep.json``
    (``record``) cannot have measured: every sweep into a directory varies one axis at a
    time around its one base point (:func:`resumable_record`), so a row two axes or more
    away from it comes from another grid, and fits and claims along the record's axes would
    judge the wrong points; so does a point measured on a device the record does not
    list, or on a device of another kind than the one of its ``device_name`` (a ``cuda``
    row named after a CPU). Methods and axis values the record does not list are no sign:
    a sweep resumed with a smaller grid keeps the rows measured before. Nor may a row with
    a blank
    ``device_name`` repeat a point of the device it stands for
    (:func:`device_of_unnamed_rows`): fits would count it twice. Raises
    :class:`ResultsFileError` naming the line; the files are left alone."""
    base, devices = record["base"], record.get("devices") or {}
    unnamed, first = device_of_unnamed_rows(record), {}
    for line, row in enumerate(rows, start=2):
        if row.get("sweep") and row["sweep"] != record.get("sweep"):  # found by a hunt
            recorded = record.get("sweep") or "none (it was written before sweeps had ids)"
            raise ResultsFileError(
                f"{out / 'results.csv'} line {line}: a point of sweep {row['sweep']}, and "
                f"{out / 'sweep.json'} records sweep {recorded}: the two files come from "
                "different sweeps. Put a sweep's results.csv and sweep.json together, or "
                "pass another --out"
            )
        name = row.get("device_name") or ""
        seen = first.setdefault((*key_of(row), name or unnamed), line)
        if seen != line:  # found by a hunt: read as another device's point, fitted twice
            raise ResultsFileError(
                f"{out / 'results.csv'} lines {seen} and {line} hold the same point on "
                f"{name or unnamed!r} (a blank device_name stands for it); remove one of "
                "them, or pass another --out"
            )
        if len(devices) > 1 and row["status"] == "ok" and not name:  # found by a hunt
            raise ResultsFileError(
                f"{out / 'results.csv'} line {line}: a measured point without a device_name, "
                f"in a sweep over {len(devices)} devices ({sorted(devices)}): which one "
                "measured it is not recorded (only a lost point, not measured, has none). "
                "Restore its device_name, or remove the line"
            )
        if devices and row["status"] == "ok" and name and name not in devices:
            raise ResultsFileError(
                f"{out / 'results.csv'} line {line}: a point measured on {name!r}, which "
                f"{out / 'sweep.json'} does not record (it records {sorted(devices)}): the "
                "two files come from different sweeps. Put a sweep's results.csv and "
                "sweep.json together, or pass another --out"
            )
        kind = _device_kind(devices.get(name, {}).get("environment", {}).get("device"))
        if kind and _device_kind(row["device"]) != kind:  # found by a hunt: fitted without it
            raise ResultsFileError(
                f"{out / 'results.csv'} line {line}: a point on device {row['device']!r} "
                f"named {name!r}, which {out / 'sweep.json'} records as a {kind} device: the "
                "row was edited or comes from another sweep. Restore it, or pass another --out"
            )
        grid = record.get("grid", {})
        for setting, recorded in (
            ("dtype", grid.get("dtypes")),
            ("output_metric", [grid["output_metric"]] if "output_metric" in grid else None),
        ):
            if row["status"] == "ok" and recorded and row[setting] not in recorded:
                raise ResultsFileError(  # (a resumed sweep keeps them: RESUMED_SETTINGS)
                    f"{out / 'results.csv'} line {line}: a point measured with {setting} "
                    f"{row[setting]}, which the grid of {out / 'sweep.json'} does not measure "
                    f"({', '.join(recorded)}): the row was edited or comes from another "
                    "sweep. Restore it, or pass another --out"
                )
        off = [a for a in AXES if int(row[a]) != base[a]]
        if len(off) > 1:
            point = ", ".join(f"{a}={row[a]}" for a in AXES)
            raise ResultsFileError(
                f"{out / 'results.csv'} line {line}: the point ({point}) differs in "
                f"{' and '.join(off)} from the base point {base} of {out / 'sweep.json'}, "
                "and a sweep varies one axis at a time: the two files come from different "
                "sweeps. Put a sweep's results.csv and sweep.json together, or pass another --out"
            )


def _device_kind(device: str | None) -> str | None:
    """``"cuda"`` of ``"cuda:1"``; ``None`` of no device."""
    return device.split(":")[0] if device else None


def write_results(path: Path, rows: list[dict]) -> None:
    from io import StringIO

    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    # a row read from a file older than a column of OPTIONAL has it blank
    writer.writerows(
        {c: row.get(c, "") if c in OPTIONAL else row[c] for c in COLUMNS} for row in rows
    )
    write_atomic(path, buffer.getvalue())


def check_same_model(rows: list[dict], path: Path) -> None:
    """Refuse to resume, fit or judge rows whose recorded model figures (``flops_model``,
    the speed of light's ``sol_products`` and ``sol_cholesky``; ``peak_bytes_model`` is
    read as this version's, :func:`read_results`) are not this version's cost model at
    their point (a results file of another version of
    riemann-bench: say, before the cross-entropy factor dropped its null row; or a
    hand-edited one, found by a hunt to move the speed-of-light ratios): fits and claims
    over a mix would compare different algorithms. Raises :class:`ResultsFileError`; the
    file is left alone."""
    stale = []
    for row in rows:
        run = run_of(row)
        sol = speed_of_light_of(run)
        for column, now in (
            ("flops_model", model_flops(run)["total"]),
            ("sol_products", sol["products"]),
            ("sol_cholesky", sol["cholesky"]),
        ):
            recorded = float(row[column])
            if not math.isclose(recorded, now, rel_tol=1e-9):
                stale.append((row, column, recorded, now))
                break
    if stale:
        row, column, recorded, now = stale[0]
        point = ", ".join(f"{k}={row[k]}" for k in KEY)
        raise ResultsFileError(
            f"{path} holds {len(stale)} of {len(rows)} finished points measured with another "
            f"cost model, i.e. another version of riemann-bench, or edited by hand (e.g. "
            f"{point}: {column} {recorded:.6g} recorded, {now:.6g} now); its fits and "
            "claims, or a resumed sweep, would mix the two. Read it with the version that "
            "measured it, restore the file, pass another --out, or move the file away to "
            "measure again"
        )


def key_of(row: dict) -> tuple[str, ...]:
    return tuple(str(row[k]) for k in KEY)


def run_of(row: dict) -> dict:
    """The run a row measured (axes as integers, also in rows read back from the file)."""
    return {k: int(row[k]) if k in AXES else row[k] for k in KEY}


@dataclass
class SweepResult:
    """``measured``: points this run measured for the first time; ``resumed``: finished
    points the file held already; ``again``: points measured once more as outliers;
    ``retimed``: points whose times were replaced by a line timed again in one stretch
    (:func:`interleave_lines`), a resumed sweep's among them."""

    rows: list[dict]
    measured: int
    resumed: int
    again: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    growth: dict[str, str] = field(default_factory=dict)
    retimed: int = 0


@dataclass(frozen=True)
class PointLost:
    """A point that a runner could not measure (its worker died), with the reason."""

    reason: str


class Runner(Protocol):
    """Runs ``task(run)`` for every run and yields ``(run, result)`` as each completes, or
    ``(run, PointLost(reason))``; :meth:`everywhere` runs ``task(device)`` once on every
    device that measures points, for each kind of device in ``devices``, and returns the
    results' items (``lost``: what a device left out means, for the warning that names it).
    With ``report``, it runs ``task(device, report=send)`` instead, and every
    ``send(done, total)`` a task makes calls ``report(place, done, total)`` here while
    the tasks run (``place`` names the task: its worker and device), as :func:`tasks_bar`
    takes it. ``placed``: a point runs on a device the runner chooses, of the kind the grid
    names (see :mod:`riemann_core.scaling.worker`)."""

    placed: bool

    def __call__(
        self, task: Callable[[dict], object], runs: Sequence[dict]
    ) -> Iterator[tuple[dict, object]]: ...

    def everywhere(
        self,
        task: Callable[..., list],
        devices: Sequence[str],
        lost: str,
        report: Callable[[str, int, int], object] | None = None,
    ) -> list: ...


class InProcess:
    """The :class:`Runner` that measures the points one after another in this process,
    each on the device the grid names."""

    placed = False

    def __call__(
        self, task: Callable[[dict], object], runs: Sequence[dict]
    ) -> Iterator[tuple[dict, object]]:
        for run in runs:
            yield run, task(run)

    def everywhere(
        self,
        task: Callable[..., list],
        devices: Sequence[str],
        lost: str,
        report: Callable[[str, int, int], object] | None = None,
    ) -> list:
        if report is None:
            return [item for device in dict.fromkeys(devices) for item in task(device)]
        return [
            item
            for device in dict.fromkeys(devices)
            for item in task(device, report=functools.partial(report, device))
        ]


@contextlib.contextmanager
def tasks_bar(
    desc: str, unit: str, shown: bool
) -> Iterator[Callable[[str, int, int], None] | None]:
    """``report(place, done, total)`` for :meth:`Runner.everywhere`: a bar on stderr (tqdm,
    gone when the block ends) of the steps done of all, summed over the places whose tasks
    reported (each its own count so far: a task that starts later adds its total then);
    ``None`` where not ``shown``, and the tasks report nothing. ``report`` never raises: a
    bar that fails to draw (stderr gone) warns once and draws no more, and the tasks that
    report to it go on (found by review: a failed draw between the lines' stretches ended
    the sweep, its lines untimed and its last rates unmeasured)."""
    if not shown:
        yield None
        return
    from tqdm import tqdm

    counts: dict[str, tuple[int, int]] = {}
    bars: list = []  # the bar, once drawn
    stopped = False

    def draw(step: Callable[[], object]) -> None:
        nonlocal stopped
        if stopped:
            return
        try:
            step()
        except Exception as err:  # noqa: BLE001  (a bar is cosmetic: the measuring goes on)
            stopped = True
            warnings.warn(
                f"the bar {desc!r} stopped drawing ({type(err).__name__}: {err}); the "
                "measurements go on without it",
                stacklevel=3,
            )

    def report(place: str, done: int, total: int) -> None:
        counts[place] = (done, total)

        def step() -> None:
            bars[0].total = sum(t for _, t in counts.values())
            bars[0].n = sum(d for d, _ in counts.values())
            bars[0].refresh()

        draw(step)

    draw(lambda: bars.append(tqdm(desc=desc, unit=unit, leave=False)))
    try:
        yield report
    finally:
        draw(lambda: bars[0].close())


def sweep(
    grid: Grid,
    out: Path,
    *,
    progress: bool = True,
    meta: dict | None = None,
    runner: Runner | None = None,
    measure: Callable[[dict, Grid], dict] | None = None,
    rates: Callable[[torch.device, torch.dtype], dict[str, list[float]]] | None = None,
    retime: Callable[..., list[dict]] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> SweepResult:
    """Measure ``grid`` into ``out/results.csv`` in the rounds of the module docstring.

    ``runner`` runs the points (default :class:`InProcess`; a dask cluster through
    :func:`riemann_core.scaling.dispatch.runner`), a round at a time; ``measure`` is the
    unit of work (default :func:`measure_point`). ``sweep.json`` records the grid,
    ``meta``, the growth decisions and every device that measured points
    (:func:`add_device`): ``grid`` holds this run's settings, ``grids`` every run's into
    ``out`` with its command (:func:`recorded_grids`), ``axes`` the union of their axes.
    Where ``rates`` is given (``rates(device, dtype)`` -> ``{kind: [FLOP/s, ...]}``, e.g.
    :func:`~riemann_core.measure.timing.device_rates`), each
    device's rates in every dtype of the grid, measured where its points run, at the
    start, after the grid's points and at the end, so that their drift over the sweep
    shows. Where ``retime`` is given (e.g. :func:`time_lines`), the lines of
    :func:`lines_to_interleave` are timed again by it at the end, and their rows take
    those times (``interleaved``: the axes of their group), see :func:`interleave_lines`:
    ``retime(lines, grid, device)``, with ``progress=`` for its bar where it takes it.
    ``progress``: bars on stderr of the points, the lines timed again and each measurement
    of the rates (:func:`tasks_bar`: minutes of the default CPU grid went by silent).
    One sweep at a time writes into ``out`` (:func:`writing`); an ``out`` it could not
    write is refused before any measuring (:func:`check_can_write`), and a write that fails
    after (a full disk) keeps the rows elsewhere, in a directory the error names
    (:func:`unwritten`).
    """
    check_can_write(out)
    with writing(out):
        return _sweep(
            grid,
            out,
            progress=progress,
            meta=meta,
            runner=runner,
            measure=measure,
            rates=rates,
            retime=retime,
            clock=clock,
        )


@contextlib.contextmanager
def writing(out: Path):
    """Hold ``out``'s lock (``.riemann-bench.lock``, an exclusive ``flock``) while a sweep
    writes there: two sweeps into one directory each rewrote ``results.csv`` from their own
    rows, and one's points were lost (found by review). Released when the sweep ends, or
    its process does. Not taken where the platform has no ``fcntl`` (Windows)."""
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(out / LOCK_FILE, "a") as lock:
        take_lock(lock, out)
        yield


def take_lock(lock, out: Path) -> None:
    """Hold ``out``'s lock through the open file ``lock`` (released when it closes), or a
    ``ValueError`` where another sweep holds it."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(
            f"another riemann-bench sweep is writing into {out} (it holds "
            f"{out / LOCK_FILE}): wait for it to end, or pass another --out"
        ) from None


#: The lock file of a directory a sweep writes into (:func:`writing`).
LOCK_FILE = ".riemann-bench.lock"
#: The files a sweep writes in its directory (:func:`check_can_write`).
WRITTEN = ("results.csv", "sweep.json", LOCK_FILE)


def check_can_write(out: Path) -> None:
    """An ``OSError`` naming the path and the fix where a sweep could not write its files
    in ``out`` (:data:`WRITTEN`): the directory (a read-only one; it need not exist yet) or
    a file there that cannot be written (read-only, immutable, append-only); a
    ``ValueError`` where another sweep holds its lock (:func:`writing`). Checked before
    any measuring (found by review: an immutable ``results.csv`` stopped the sweep at its
    first write, after the device rates and the first point were measured)."""
    if out.is_dir():
        check_writable(out)
    for name in WRITTEN:
        path = out / name
        if not path.is_file():  # (a place that is no file is refused when it is read)
            continue
        try:  # opened for writing, nothing written (a read-only file, which the rename over
            # it would replace, is refused too: the user marked it so)
            os.close(os.open(path, os.O_WRONLY))
        except OSError as err:
            raise OSError(
                f"cannot write {path} ({err.strerror or err}): make it writable (chmod u+w; "
                "chattr -i or -a where it is immutable or append-only), or pass another --out"
            ) from err
    if fcntl is not None and (out / LOCK_FILE).is_file():  # taken and released: before a
        with open(out / LOCK_FILE, "a") as lock:  # cluster starts (found by review: 4 s)
            take_lock(lock, out)


def unwritten(err: OSError, place: Path, out: Path, rows: list[dict], record: dict) -> OSError:
    """The error of a sweep that could not write ``place`` (``results.csv`` or ``sweep.json``
    in ``out``) once it had measured: its ``rows`` and ``record`` kept in a directory of
    their own (:func:`keep_elsewhere`), and how to put them back and resume. ``out`` is
    left as its last write made it, whole (found by review: a full disk lost every point
    measured since the last write, and the retimed lines of the end)."""
    what = f"cannot write {place} ({err.strerror or err})"
    try:
        kept = keep_elsewhere(out, rows, record)
    except OSError as also:
        return OSError(
            f"{what}, nor keep its rows elsewhere ({also}): the points measured since its last "
            f"write are lost, and {out} holds the others, whole. Free space (or fix the "
            "cause) and run the sweep again to resume"
        )
    command = (record.get("commands") or [record.get("command")])[-1]
    resume = f"`{with_out(command, out)}`" if command else f"the sweep into {out} again"
    files = " ".join(shlex.quote(str(kept / name)) for name in ("results.csv", "sweep.json"))
    return OSError(
        f"{what}: the sweep's {len(rows)} rows, with the points this run measured, are kept "
        f"with its record in {kept}, and {out} is as last written, whole. Free space (or fix "
        f"the cause), then `mv {files} {shlex.quote(str(out))}/` and run {resume} to resume"
    )


def keep_elsewhere(out: Path, rows: list[dict], record: dict) -> Path:
    """A new directory holding ``rows`` and ``record`` as ``results.csv`` and ``sweep.json``,
    beside ``out`` or, where that cannot take them (the same full disk), in the system's
    temporary directory; an ``OSError`` where neither can."""
    errors = []
    out = out.resolve()  # (the parent of ".")
    for parent, prefix in (
        (out.parent, f"{out.name}-unsaved-"),
        (Path(tempfile.gettempdir()), "riemann-bench-unsaved-"),
    ):
        kept = None
        try:
            kept = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
            write_results(kept / "results.csv", rows)
            write_atomic(kept / "sweep.json", json.dumps(record, indent=2) + "\n")
            return kept
        except OSError as err:
            errors.append(f"{kept or parent}: {err.strerror or err}")
            if kept is not None:
                shutil.rmtree(kept, ignore_errors=True)
    raise OSError("; ".join(errors))


def _sweep(
    grid: Grid,
    out: Path,
    *,
    progress: bool,
    meta: dict | None,
    runner: Runner | None,
    measure: Callable[[dict, Grid], dict] | None,
    rates: Callable[[torch.device, torch.dtype], dict[str, list[float]]] | None,
    retime: Callable[[list[list[dict]], Grid, torch.device], list[dict]] | None,
    clock: Callable[[], float],
) -> SweepResult:
    from tqdm import tqdm

    from . import grow

    runner = runner or InProcess()
    if not runner.placed:  # on a cluster, the workers' devices count
        for device in grid.devices:
            check_device(torch.device(device))
    path = out / "results.csv"
    rows = read_results(path)  # before any work: a corrupted file stops the sweep here
    previous = resumable_record(out, rows, grid)
    # finished points are kept; skipped, failed and out-of-memory ones are decided again
    # where this grid measures them (a smaller grid's resume keeps the others as they are)
    # (a point of an earlier, larger grid is kept; a grown one is grown, or not, again)
    planned, earlier = {key_of(run) for run in grid.runs()}, previous.get("axes", {})
    rows = [
        r
        for r in rows
        if r["status"] == "ok"
        or not grid.selects(r)
        or (key_of(r) not in planned and all(int(r[a]) in earlier.get(a, ()) for a in AXES))
    ]
    check_same_model([r for r in rows if r["status"] == "ok"], path)
    resumed = len(rows)
    done = {key_of(r) for r in rows}
    order: dict[tuple[str, ...], int] = {}  # rows are written in the order of their runs
    for run in [*grid.runs(), *rows]:
        order.setdefault(key_of(run), len(order))
    # an infinite budget (none) as null: JSON has no infinity (found by a hunt: "Infinity")
    settings = {k: None if v == math.inf else v for k, v in asdict(grid).items()}
    # the id its rows carry (a resume keeps it: rows of an older sweep, blank, take it)
    sweep_id = previous.get("sweep") or uuid.uuid4().hex
    for r in rows:
        r["sweep"] = sweep_id
    record = {
        "grid": settings,
        "base": grid.base,
        "axes": grid.axes,
        "sweep": sweep_id,
        "finished": False,  # until this sweep ends (see unfinished_note)
        **(meta or {}),
    }
    # this run's grid beside its command: ``grid`` is this run's alone (found by review: a
    # resume with other methods and repeats recorded only its own), ``grids`` every run's
    this_run = {"command": record["command"]} if "command" in record else {}
    record["grids"] = [{**this_run, "grid": settings}]
    if rows and previous:  # a resume: the axes and commands of every sweep into out
        axes = previous["axes"]
        record["axes"] = {a: sorted({*axes[a], *grid.axes[a]}) for a in AXES}
        commands = list(previous.get("commands") or [])
        if not commands and "command" in previous:
            commands = [previous["command"]]
        if "command" in record:
            commands.append(record["command"])
        if commands:
            record["commands"] = commands
        record["grids"] = [*recorded_grids(previous), *record["grids"]]
        # kept until this sweep ends (found by review: an interrupted resume saved a
        # record without them, and the decisions of methods it did not measure were lost)
        # (and the rules those decisions grew by: found by review, an interrupted resume
        # kept the decisions and dropped their rule, and its report said it was not recorded)
        record.update(
            {
                k: previous[k]
                for k in ("growth", "growth_rule", "earlier_growth_rules", "sweep_s")
                if k in previous
            }
        )
    devices = previous_devices(previous)
    session = uuid.uuid4().hex
    # a resumed sweep measures in this process as it did: checked before any write (a
    # cluster's workers are checked as they first report, against the record and each
    # other; hosts alike in every setting may still differ in speed, which the claims
    # judge by the spread of the rates, see fit.rate_spread)
    if rows and not runner.placed:
        for device in grid.devices:
            check_timed_alike(devices, device_record(torch.device(device), session))
    task = functools.partial(
        measure_here, measure or measure_point, grid=grid, session=session, placed=runner.placed
    )
    seen: set[tuple[str, str]] = set()

    def saved(place: Path, write: Callable[[], object]) -> None:
        try:
            write()
        except OSError as err:  # (a full disk): the rows and the record are kept elsewhere
            raise unwritten(err, place, out, rows, {**record, "devices": devices}) from err

    def save_record() -> None:
        text = json.dumps({**record, "devices": devices}, indent=2) + "\n"
        saved(out / "sweep.json", lambda: write_atomic(out / "sweep.json", text))

    def save_rows() -> None:
        saved(path, lambda: write_results(path, rows))

    def measure_rates(when: str) -> None:
        if rates is not None:
            here = functools.partial(
                rates_here, rates, dtypes=grid.dtypes, session=session, placed=runner.placed
            )
            at = {"start": "before the points", "grid": "after the grid", "end": "at the end"}
            lost = (
                f"no device rates were measured {at.get(when, when)}: the speed of light and "
                "the time model use the rates measured at the other times"
            )
            with tasks_bar(f"device rates {at.get(when, when)}", "measurement", progress) as report:
                measured = runner.everywhere(here, grid.devices, lost, report)
            for measured_here in measured:
                check_timed_alike(devices, measured_here)
                add_device(devices, measured_here, when)
        save_record()

    measure_rates("start")
    start = clock()
    todo = [r for r in grid.runs() if key_of(r) not in done]
    measured, again_count = set(), 0
    with tqdm(total=len(todo), desc="sweep", unit="point", disable=not progress) as bar:

        def measure_all(runs: list[dict], remeasure: bool = False) -> None:
            nonlocal again_count
            for run in runs:
                order.setdefault(key_of(run), len(order))
            for run, outcome in runner(task, runs):
                bar.update()
                new_worker = False
                if isinstance(outcome, PointLost):
                    if remeasure:  # its first measurement stands; a rerun tries again
                        continue
                    row = {**blank_row(run), **dict.fromkeys(WHERE, "")}
                    row.update(status="error", reason=outcome.reason)
                else:
                    row, device = outcome
                    # every result, not a place's first alone: a worker that takes a dead one's
                    # place (its host and device) in another setting was let in unchecked, its
                    # rows mixed into the fits (found by a hunt: threads 1 beside threads 2)
                    check_timed_alike(devices, device)  # a worker unlike the others
                    new_worker = (device["host"], device["physical_device"]) not in seen
                    if new_worker:
                        seen.add((device["host"], device["physical_device"]))
                        add_device(devices, device)
                    if remeasure:
                        row["remeasured"] = 1
                        if grow.is_outlier(rows, row):
                            # outlier says more than spread (as in interleave_lines); loaded,
                            # read by measure_point around these very times, may be why: kept
                            loaded = ["loaded"] if "loaded" in row["flag"].split() else []
                            row["flag"] = " ".join(["outlier", *loaded])
                row["sweep"] = sweep_id
                key = key_of(row)
                rows[:] = [r for r in rows if key_of(r) != key] + [row]
                rows.sort(key=lambda r: order[key_of(r)])
                # a new worker's device is recorded before the file holds its rows, and after
                # this row is in rows: a failed write keeps it (:func:`unwritten`)
                if new_worker:
                    save_record()
                save_rows()
                if remeasure:
                    again_count += 1
                else:
                    measured.add(key)

        measure_all(todo)
        measure_rates("grid")
        while True:
            plan = grow.plan([r for r in rows if grid.selects(r)], grid, elapsed=clock() - start)
            if not plan.runs:
                break
            bar.total += len(plan.runs)
            bar.refresh()
            measure_all(plan.runs)
        # measured again once: an outlier still far off then is flagged (a point re-timed
        # for its spread or load, also remeasured, is not one measured again)
        again = [
            r for r in grow.outliers(rows) if grid.selects(r) and "outlier" not in r["flag"].split()
        ]
        bar.total += len(again)
        bar.refresh()
        measure_all([run_of(r) for r in again], remeasure=True)
    retimed = (
        0
        if retime is None
        else interleave_lines(retime, rows, grid, runner, session, progress=progress)
    )
    # the decisions of what this grid does not measure stand as recorded
    kept = {
        name: why
        for name, why in previous.get("growth", {}).items()
        if not (name.split("/")[0] in grid.methods and name.split("/")[1] in grid.kernels)
    }
    record["growth"] = {**kept, **plan.decisions}
    record["growth_rule"] = grow.rule(grid.overhead_target)
    # a kept decision grew by the rule of the run that made it, which may not be this one's
    # (found by review: a resume by a later version, or with another overhead target, said
    # that its rule had made them): the rule of each that differs, null where not recorded
    earlier = {name: earlier_growth_rule(previous, name) for name in kept}
    earlier = {name: r for name, r in earlier.items() if r != record["growth_rule"]}
    record.pop("earlier_growth_rules", None)
    if earlier:
        record["earlier_growth_rules"] = earlier
    record["sweep_s"] = clock() - start
    measure_rates("end")
    if retime is not None:  # after the record names every worker whose times rows now hold
        save_rows()
    # once the rows are written (found by review: a full disk at the last write left a
    # record of a finished sweep beside rows without their times of the lines timed again)
    record["finished"] = True
    save_record()
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return SweepResult(rows, len(measured), resumed, again_count, statuses, plan.decisions, retimed)


def earlier_growth_rule(record: Mapping, name: str) -> str | None:
    """The rule the growth decision ``name`` of the sweep's ``record`` grew by
    (``earlier_growth_rules``' where it names it, else ``growth_rule``), ``None`` where the
    run that made it did not record it."""
    earlier = record.get("earlier_growth_rules", {})
    return earlier[name] if name in earlier else record.get("growth_rule")


def takes_keyword(f: Callable, name: str) -> bool:
    """Whether ``f`` takes the keyword argument ``name`` (by name or through ``**``);
    ``False`` where its signature cannot be read."""
    try:
        parameters = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):  # (some builtins have none)
        return False
    return any(
        p.kind is p.VAR_KEYWORD
        or (p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        for p in parameters
    )


def interleave_lines(
    retime: Callable,
    rows: list[dict],
    grid: Grid,
    runner: Runner,
    session: str,
    *,
    progress: bool = False,
) -> int:
    """Time the lines of :func:`lines_to_interleave` again with ``retime`` (on every
    worker of each kind of device, through ``runner.everywhere``) and give their rows the
    first worker's times, so that each line comes from one device in one stretch of time,
    and flags for those times (``interleaved``: the group's axes); a group that could not be
    timed again keeps its rows, with a warning that says why. Returns the number of rows
    whose times were replaced. ``progress``: a bar of the lines' stretches done, as every
    worker reports them (``retime``'s ``progress``, see :func:`time_lines`): minutes on
    the default CPU grid. A ``retime`` that takes no ``progress`` keyword (``retime(lines,
    grid, device)``, as :func:`sweep` documented it before the bar) is called without it:
    found by review, it ended the sweep in a ``TypeError`` after its points."""
    todo = lines_to_interleave([r for r in rows if grid.selects(r)], grid.base)
    if not todo:
        return 0
    task = functools.partial(
        lines_here,
        retime,
        lines=[line for _, line in todo],
        grid=grid,
        session=session,
        placed=runner.placed,
    )
    again: dict[tuple[str, ...], dict] = {}
    lost = (
        "the lines were not timed again: they keep the times of their own measurements "
        "(rerun the sweep to time them again)"
    )
    shown = progress and takes_keyword(retime, "progress")  # (else timed without a bar)
    with tasks_bar("lines timed again", "stretch", shown) as report:
        timed = runner.everywhere(task, grid.devices, lost, report)
    for row in sorted(timed, key=lambda r: r["worker"]):
        again.setdefault(key_of(row), row)
    axis = {key_of(run): a for a, line in todo for run in line}
    failed = {
        (axis[k], r["method"], r["kernel"], r["error"]) for k, r in again.items() if "error" in r
    }
    for along, method, kernel, reason in sorted(failed):
        warnings.warn(
            f"the points of {method} ({kernel}) along {along.replace(' ', ', ')} could not be "
            f"timed again ({reason}); they keep the times of their own measurements",
            stacklevel=2,
        )
    retimed = {k: r for k, r in again.items() if "error" not in r}
    fields = ("time_median_s", "time_iqr_s", "times_s", "spread", "stretches", *WHERE)
    rows[:] = [
        {**row, **{f: new[f] for f in fields}, "interleaved": axis[key_of(row)]}
        if (new := retimed.get(key_of(row))) is not None
        else row
        for row in rows
    ]
    from . import grow

    for i, row in enumerate(rows):  # flags for the new times, among the new neighbours
        if (new := retimed.get(key_of(row))) is not None:
            spread = "spread" if float(row["spread"]) > SPREAD_LIMIT else ""
            words = ["outlier" if grow.is_outlier(rows, row) else spread]
            apart = stretch_spread(json.loads(row["times_s"]), row["stretches"] or 1)
            words += ["stretches"] if apart > SPREAD_LIMIT else []
            # read around the line's rounds that gave these times (the first worker's): the
            # point's own reading was of times it no longer has. Not timed again for it (a
            # line takes seconds): its points, timed in the same rounds, shared the load, and
            # a fail decided on them reads too noisy (validate)
            words += ["loaded"] if new.get("loaded") else []
            rows[i] = {**row, "flag": " ".join(w for w in words if w)}
    return sum(key_of(row) in retimed for row in rows)


def add_device(devices: dict[str, dict], record: dict, when: str | None = None) -> None:
    """Enter in ``devices``, by device name, a record of a worker's device (see
    :func:`~riemann_core.scaling.worker.device_record`): its ``environment``, the
    ``workers`` (``"host physical_device"``) that measured on a device of that name, and,
    for a record of :func:`~riemann_core.scaling.worker.rates_here` measured at ``when``,
    its rates (``device_rates``: ``{"when", "worker", "dtype", kind: [FLOP/s, ...]}``, with
    ``outside_cores``, ``cpus_read``, ``cores_read`` and ``rounding_cores`` where the load
    of other processes was read: :data:`SESSION_KEYS`)."""
    entry = devices.setdefault(record["device_name"], {"workers": [], "device_rates": []})
    worker = f"{record['host']} {record['physical_device']}"
    if worker not in entry["workers"]:
        entry["workers"].append(worker)
    entry["environment"] = record["environment"]
    if when is not None:
        measured = {"when": when, "worker": worker, "dtype": record["dtype"], **record["rates"]}
        measured.update(record.get("load") or {})
        entry["device_rates"].append(measured)


#: What an environment record may change between the sessions of one sweep: the time, the
#: commit (a changed cost model is refused by :func:`check_same_model`), the device's index.
UNTIMED_ENVIRONMENT = ("time_utc", "commit", "device")


def check_timed_alike(devices: dict[str, dict], record: dict) -> None:
    """Refuse a worker's device ``record`` whose environment differs from the one that
    timed the sweep's points on a device of its name (in ``devices``) in a setting that
    times a point (threads, torch, BLAS, allocator, precision; among those both records
    hold: older ones lack some): a sweep resumed in another setting, or a cluster's worker
    unlike the others (a local cluster started with other threads per worker). The
    records of a device's workers are then alike, and ``devices`` keeps one."""
    old, new = devices.get(record["device_name"], {}).get("environment", {}), record["environment"]
    changed = sorted(
        k for k in old.keys() & new.keys() - set(UNTIMED_ENVIRONMENT) if old[k] != new[k]
    )
    if changed:  # (found by a hunt: "resuming" said of a cluster's two workers, no resume)
        raise ValueError(
            f"the sweep's points on {record['device_name']} were timed with "
            + ", ".join(f"{k} {old[k]!r}" for k in changed)
            + "; here "
            + ", ".join(f"{k} {new[k]!r}" for k in changed)
            + " (a sweep resumed in another setting, or a worker unlike the others): their "
            "times would mix in one set of fits. Measure with the same settings on every "
            "worker (OMP_NUM_THREADS, or --workers and --threads-per-worker for a local "
            "cluster; torch; the allocator's policy), or pass another --out"
        )


def recorded_grids(record: Mapping) -> list[dict]:
    """``grids`` of a sweep's record: every run into its directory in order, as
    ``{"command": its command line, "grid": its settings}`` (each where recorded). A record
    written before ``grids`` holds the last run's settings alone (``grid``), beside every
    run's command (``commands``, or ``command``): the runs before name their command alone."""
    if "grids" in record:
        return list(record["grids"])
    commands = record.get("commands") or ([record["command"]] if "command" in record else [])
    runs = [{"command": command} for command in commands] or [{}]
    if "grid" in record:
        runs[-1]["grid"] = record["grid"]
    return runs


def previous_devices(previous: dict) -> dict[str, dict]:
    """The ``devices`` of an earlier ``sweep.json`` in the same directory: their rows are
    kept, so are their records. A sweep written before ``devices`` had one device, whose
    environment and rates were at the top."""
    if "devices" in previous:
        return previous["devices"]
    environment = previous.get("environment")
    if not environment:
        return {}
    name = environment.get("device_name", "unknown device")
    rates = previous.get("device_rates", [])
    return {name: {"workers": [], "device_rates": rates, "environment": environment}}
