"""``riemann-bench sweep``: time, FLOPs and memory over a grid of MLPs, resumably.

The grid varies one axis at a time (width, depth, output dimension, batch) around a
base point, for every method, kernel, dtype and device. The MLP is ``width`` inputs,
``depth`` hidden tanh layers of ``width`` units and ``out_dim`` outputs, so
``n ~ depth width^2`` and ``d = batch * r``. Each point gets a warm-up, ``repeats``
timed calls (median and IQR), one FLOP-counted call and one memory-measured call, and a
status: ``ok``, ``oom``, ``skipped`` (over the memory or FLOP budget, by the cost
model) or ``error`` (with the reason).

The points run in this process one after another, or on a dask cluster
(:mod:`riemann_core.scaling.dispatch`); either way this process alone writes
``results.csv``, atomically after every point, in the grid's order, so a killed sweep loses
at most the points it was on; a rerun skips the points already measured (``ok``) and
measures the others again (a larger budget, a fixed error). Each row says where it was
measured (``host``, ``device_name``, ``physical_device``), and ``sweep.json`` holds the
record of every device that measured points (``devices``: environment and GEMM rate).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import statistics
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

import riemann_core as rc

from .. import costs
from ..arguments import check_device
from ..measure.flops import flop_counter
from ..measure.memory import cuda_peak_bytes, host_peak_bytes
from ..measure.output import write_atomic
from ..measure.problems import mlp, widths
from ..measure.timing import measure
from .worker import measure_here

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
    "flops_model",
    "peak_bytes",
    "peak_bytes_model",
    "status",
    "reason",
    "host",
    "device_name",
    "physical_device",
)
#: where a point was measured; blank in results written before these were recorded
WHERE = ("host", "device_name", "physical_device")
KEY = ("method", "kernel", "width", "depth", "out_dim", "batch", "device", "dtype", "output_metric")
#: Methods measured with the generic kernel as well as the structured one.
GENERIC_METHODS = ("layerwise",)


class ResultsFileError(ValueError):
    """An existing results file cannot be read; it is left untouched."""


@dataclass(frozen=True)
class Grid:
    """One-axis-at-a-time grid around ``base``; see the module docstring."""

    base: dict[str, int]
    axes: dict[str, tuple[int, ...]]
    methods: tuple[str, ...] = rc.METHODS
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
    """Reject bad options before any work, naming the option and the fix."""
    if set(grid.base) != set(AXES) or set(grid.axes) != set(AXES):
        raise ValueError(f"base and axes must name exactly {AXES}")
    for axis in AXES:
        values = (grid.base[axis], *grid.axes[axis])
        if not grid.axes[axis] or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values
        ):
            flag = AXIS_OPTIONS[axis].replace("_", "-")
            raise ValueError(f"--{flag} needs positive integers, got {values}")
    for name, values, allowed in (
        ("method", grid.methods, rc.METHODS),
        ("kernel", grid.kernels, ("structured", "generic")),
        ("dtype", grid.dtypes, tuple(DTYPES)),
        ("output metric", (grid.output_metric,), ("exact", "sampled")),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"unknown {name} {bad or values}; choose from {', '.join(allowed)}")
    for device in grid.devices:
        if torch.device(device).type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N')")
    if grid.repeats < 1 or grid.warmup < 0 or not grid.damping > 0:
        raise ValueError("repeats must be >= 1, warmup >= 0 and damping > 0")


#: The default grid (``riemann-bench run``): about 2 minutes on 2 CPU cores. The base
#: point is large enough (n_a ~ 16k, d = 320) for compute, not call overhead, to dominate.
DEFAULT = dict(
    base={"width": 128, "depth": 2, "out_dim": 10, "batch": 32},
    axes={
        "width": (8, 12, 16, 24, 32, 48, 64, 128, 256, 512),
        "depth": (1, 2, 3, 4, 6, 8),
        "out_dim": (2, 4, 6, 10, 16, 24, 32),
        "batch": (4, 8, 16, 32, 64, 128, 256, 512),
    },
    repeats=7,
)
#: ``--quick``: a few minutes on 2 CPU cores.
QUICK = dict(
    base={"width": 32, "depth": 2, "out_dim": 10, "batch": 16},
    axes={
        "width": (8, 16, 32, 64, 128, 256),
        "depth": (1, 2, 4),
        "out_dim": (2, 5, 10, 20),
        "batch": (4, 8, 16, 32, 64),
    },
    repeats=3,
)


def shape_of(run: dict) -> costs.MLPShape:
    rows = run["out_dim"] if run["output_metric"] == "exact" else 1
    layer_widths = widths(run["width"], run["depth"], run["out_dim"])
    return costs.MLPShape(layer_widths, run["batch"], rows)


def blank_row(run: dict, grid: Grid) -> dict:
    """The row of ``run`` before it is measured: the cost model's figures, NaN measurements."""
    shape = shape_of(run)
    itemsize = torch.finfo(DTYPES[run["dtype"]]).bits // 8
    kernel = run["kernel"]
    return {
        **run,
        "n_params": shape.n_params,
        "d": shape.d,
        "time_median_s": math.nan,
        "time_iqr_s": math.nan,
        "times_s": "[]",
        "flops": math.nan,
        "flops_model": costs.flops(run["method"], shape, kernel)["total"],
        "peak_bytes": math.nan,
        "peak_bytes_model": costs.peak_bytes(run["method"], shape, kernel, itemsize),
        "status": "ok",
        "reason": "",
    }


def measure_point(run: dict, grid: Grid) -> dict:
    """One row of ``results.csv`` for ``run`` (never raises for the point's own failure)."""
    row = blank_row(run, grid)
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
        # memory first: the host reading is a lower bound that warm-up calls lower further
        peak = cuda_peak_bytes(call, device) if device.type == "cuda" else host_peak_bytes(call)
        timing = measure(call, repeats=grid.repeats, warmup=grid.warmup, device=device)
        with flop_counter() as counter:
            call()
    except torch.cuda.OutOfMemoryError as err:  # torch.OutOfMemoryError only from 2.5
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "status": "oom", "reason": str(err).splitlines()[0][:200]}
    except Exception as err:  # noqa: BLE001  (recorded; the sweep goes on)
        return {**row, "status": "error", "reason": f"{type(err).__name__}: {err}"[:300]}
    return {
        **row,
        "time_median_s": timing.median,
        "time_iqr_s": timing.iqr,
        "times_s": json.dumps([round(t, 9) for t in timing.times]),
        "flops": counter.get_total_flops(),
        "peak_bytes": math.nan if peak is None else peak,
    }


def _direction_call(run: dict, grid: Grid, device: torch.device) -> Callable[[], object]:
    torch.manual_seed(grid.seed)
    dtype = DTYPES[run["dtype"]]
    model = mlp(widths(run["width"], run["depth"], run["out_dim"])).to(device, dtype)
    x = torch.randn(run["batch"], run["width"], device=device, dtype=dtype)
    y = torch.randint(0, run["out_dim"], (run["batch"],), device=device)
    generator = torch.Generator(device).manual_seed(grid.seed)

    def call():
        return rc.direction(
            model,
            x,
            y,
            method=run["method"],
            kernel=run["kernel"],
            damping=grid.damping,
            output_metric=run["output_metric"],
            generator=generator,
        )

    return call


def read_results(path: Path) -> list[dict]:
    """Rows of an existing ``results.csv``; a file that is not one raises
    :class:`ResultsFileError` and is never modified."""
    if not path.exists():
        return []
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = set(COLUMNS) - set(WHERE) - set(reader.fieldnames or ())
            if missing:
                raise ResultsFileError(
                    f"{path} is not a riemann-bench results file (missing columns "
                    f"{sorted(missing)}); move it away or pass another --out"
                )
            rows = list(reader)
    except (csv.Error, UnicodeDecodeError) as err:
        raise ResultsFileError(
            f"{path} cannot be parsed ({err}); move it away or pass another --out"
        ) from err
    for i, row in enumerate(rows, start=2):
        if any(row.get(c) in (None, "") for c in KEY + ("status",)):
            raise ResultsFileError(
                f"{path} line {i} is incomplete (a truncated or hand-edited file?); "
                "repair or remove that line, or pass another --out"
            )
        for column in WHERE:
            row[column] = row.get(column) or ""
    return rows


def write_results(path: Path, rows: list[dict]) -> None:
    from io import StringIO

    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: row[c] for c in COLUMNS} for row in rows)
    write_atomic(path, buffer.getvalue())


def key_of(row: dict) -> tuple[str, ...]:
    return tuple(str(row[k]) for k in KEY)


@dataclass
class SweepResult:
    rows: list[dict]
    measured: int
    resumed: int
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PointLost:
    """A point that a runner could not measure (its worker died), with the reason."""

    reason: str


class Runner(Protocol):
    """Runs ``task(run)`` for every run and yields ``(run, result)`` as each completes, or
    ``(run, PointLost(reason))``. ``placed``: a point runs on a device the runner chooses,
    of the kind the grid names (see :mod:`riemann_core.scaling.worker`)."""

    placed: bool

    def __call__(
        self, task: Callable[[dict], object], runs: Sequence[dict]
    ) -> Iterator[tuple[dict, object]]: ...


class InProcess:
    """The :class:`Runner` that measures the points one after another in this process,
    each on the device the grid names."""

    placed = False

    def __call__(
        self, task: Callable[[dict], object], runs: Sequence[dict]
    ) -> Iterator[tuple[dict, object]]:
        for run in runs:
            yield run, task(run)


def sweep(
    grid: Grid,
    out: Path,
    *,
    progress: bool = True,
    meta: dict | None = None,
    runner: Runner | None = None,
    measure: Callable[[dict, Grid], dict] | None = None,
    gemm_size: int | None = None,
) -> SweepResult:
    """Measure every run of ``grid`` not yet in ``out/results.csv``; write ``sweep.json``.

    ``runner`` runs the points (default: :class:`InProcess`; a dask cluster through
    :func:`riemann_core.scaling.dispatch.runner`), ``measure`` is the unit of work
    (default :func:`measure_point`), and ``gemm_size``, when given, has every process that
    measures points record its GEMM rate at that size once (``sweep.json``'s ``devices``).
    """
    runner = runner or InProcess()
    if not runner.placed:  # on a cluster, the workers' devices count
        for device in grid.devices:
            check_device(torch.device(device))
    path = out / "results.csv"
    rows = read_results(path)  # before any work: a corrupted file stops the sweep here
    previous = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else {}
    if rows and previous.get("base", grid.base) != grid.base:
        raise ValueError(
            f"{out} holds a sweep around the base point {previous['base']}, not {grid.base}; "
            "fits need one base point per directory: pass another --out"
        )
    # finished points are kept; skipped, failed and out-of-memory ones are measured again
    done = {key_of(r) for r in rows if r["status"] == "ok"}
    todo = [r for r in grid.runs() if key_of(r) not in done]
    again = {key_of(r) for r in todo}
    order = {key_of(r): i for i, r in enumerate(grid.runs())}
    rows = [r for r in rows if key_of(r) not in again]
    record = {"grid": asdict(grid), "base": grid.base, "axes": grid.axes, **(meta or {})}
    devices = dict(previous.get("devices", {}))
    for name in ("gemm_flops_per_s", "environment"):  # of a sweep written before ``devices``
        if not devices and name in previous:
            record[name] = previous[name]
    write_sweep_json(out, record, devices)
    seen: set[tuple[str, str]] = set()
    task = functools.partial(
        measure_here,
        measure or measure_point,
        grid=grid,
        session=uuid.uuid4().hex,
        gemm_size=gemm_size,
        placed=runner.placed,
    )
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="sweep", unit="point", disable=not progress, leave=False)
    with bar:
        for run, outcome in runner(task, todo):
            if isinstance(outcome, PointLost):
                row = {**blank_row(run, grid), **dict.fromkeys(WHERE, "")}
                row.update(status="error", reason=outcome.reason)
            else:
                row, device = outcome
                worker = (device["host"], device["physical_device"])
                if worker not in seen:  # a worker's first point in this sweep
                    seen.add(worker)
                    add_device(devices, device)
                    write_sweep_json(out, record, devices)
            rows.append(row)
            rows.sort(key=lambda r: order.get(key_of(r), len(order)))
            write_results(path, rows)
            bar.update()
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return SweepResult(rows, len(todo), len(done), statuses)


def add_device(devices: dict[str, dict], record: dict) -> None:
    """Enter the device record of a worker (see
    :func:`~riemann_core.scaling.worker.device_record`) in ``devices``, by device name:
    the environment, each worker's GEMM rate and their median."""
    entry = devices.setdefault(record["device_name"], {"workers": {}})
    entry["workers"][f"{record['host']} {record['physical_device']}"] = record["gemm_flops_per_s"]
    rates = [r for r in entry["workers"].values() if r is not None]
    entry["gemm_flops_per_s"] = statistics.median(rates) if rates else None
    entry["environment"] = record["environment"]


def write_sweep_json(out: Path, record: dict, devices: dict[str, dict]) -> None:
    """``sweep.json``: the grid, ``meta``, ``devices``, and at the top level the GEMM rate
    and environment of the first device (those of each device are under ``devices``)."""
    first = next(iter(devices.values()), {})
    top = {k: first[k] for k in ("gemm_flops_per_s", "environment") if first.get(k) is not None}
    text = json.dumps({**record, **top, "devices": devices}, indent=2) + "\n"
    write_atomic(out / "sweep.json", text)
