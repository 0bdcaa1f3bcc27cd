"""``riemann-bench sweep``: time, FLOPs and memory over a grid of MLPs, resumably.

The grid varies one axis at a time (width, depth, output dimension, batch) around a
base point, for every method, kernel, dtype and device. The MLP is ``width`` inputs,
``depth`` hidden tanh layers of ``width`` units and ``out_dim`` outputs, so
``n ~ depth width^2`` and ``d = batch * r``. Each point gets a warm-up, ``repeats``
timed calls (median and IQR), one FLOP-counted call and one memory-measured call, and a
status: ``ok``, ``oom``, ``skipped`` (over the memory or FLOP budget, by the cost
model) or ``error`` (with the reason).

``results.csv`` is rewritten atomically after every point, so a killed sweep loses at
most the point it was on; a rerun skips the points already measured (``ok``) and measures
the others again (a larger budget, a fixed error).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import riemann_core as rc

from .. import costs
from ..measure.flops import flop_counter
from ..measure.memory import cuda_peak_bytes, host_peak_bytes
from ..measure.output import write_atomic
from ..measure.problems import mlp, widths
from ..measure.timing import measure

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
)
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
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
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


def measure_point(run: dict, grid: Grid) -> dict:
    """One row of ``results.csv`` for ``run`` (never raises for the point's own failure)."""
    shape = shape_of(run)
    itemsize = torch.finfo(DTYPES[run["dtype"]]).bits // 8
    kernel = run["kernel"]
    flops_model = costs.flops(run["method"], shape, kernel)["total"]
    peak_model = costs.peak_bytes(run["method"], shape, kernel, itemsize)
    row = {
        **run,
        "n_params": shape.n_params,
        "d": shape.d,
        "time_median_s": math.nan,
        "time_iqr_s": math.nan,
        "times_s": "[]",
        "flops": math.nan,
        "flops_model": flops_model,
        "peak_bytes": math.nan,
        "peak_bytes_model": peak_model,
        "status": "ok",
        "reason": "",
    }
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
            missing = set(COLUMNS) - set(reader.fieldnames or ())
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


def sweep(grid: Grid, out: Path, *, progress: bool = True, meta: dict | None = None) -> SweepResult:
    """Measure every run of ``grid`` not yet in ``out/results.csv``; write ``sweep.json``."""
    path = out / "results.csv"
    rows = read_results(path)  # before any work: a corrupted file stops the sweep here
    previous = out / "sweep.json"
    if rows and previous.exists():
        base = json.loads(previous.read_text()).get("base")
        if base != grid.base:
            raise ValueError(
                f"{out} holds a sweep around the base point {base}, not {grid.base}; "
                "fits need one base point per directory: pass another --out"
            )
    # finished points are kept; skipped, failed and out-of-memory ones are measured again
    done = {key_of(r) for r in rows if r["status"] == "ok"}
    todo = [r for r in grid.runs() if key_of(r) not in done]
    again = {key_of(r) for r in todo}
    rows = [r for r in rows if key_of(r) not in again]
    write_atomic(
        out / "sweep.json",
        json.dumps(
            {"grid": asdict(grid), "base": grid.base, "axes": grid.axes, **(meta or {})}, indent=2
        )
        + "\n",
    )
    from tqdm import tqdm

    for run in tqdm(todo, desc="sweep", unit="point", disable=not progress, leave=False):
        rows.append(measure_point(run, grid))
        write_results(path, rows)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return SweepResult(rows, len(todo), len(done), statuses)
