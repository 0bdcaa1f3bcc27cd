"""Fixtures of the pytest-benchmark suite: device, problems per size, the device's rates.

Problems come from :mod:`bench.common`, the builders the asv suite uses too, and follow
its environment variables: ``RIEMANN_BENCH_DEVICE`` (``cpu`` by default; a CUDA device
that is not available skips every benchmark) and ``RIEMANN_BENCH_BUDGET_GIB`` (the
modelled peak memory over which a combination is skipped). Everything heavy is built
in fixtures, once per size, never at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from riemann_core import costs
from riemann_core.measure.timing import device_rates

from . import common

DTYPE = torch.float32
SEED = 0


@dataclass(frozen=True)
class Size:
    """A tanh MLP of ``depth`` hidden layers of ``width`` units, ``out_dim`` classes;
    ``axis``: the axis of :data:`SIZES` it varies from the base point (``"base"`` there)."""

    axis: str
    width: int
    depth: int
    out_dim: int
    batch: int

    @property
    def name(self) -> str:
        """Its axis values, as its benchmarks' ids and group name it."""
        return f"width={self.width}-depth={self.depth}-out_dim={self.out_dim}-batch={self.batch}"

    @property
    def widths(self) -> tuple[int, ...]:
        return common.widths(self.width, self.depth, self.out_dim)

    @property
    def shape(self) -> costs.MLPShape:
        return common.shape(self.width, self.depth, self.out_dim, self.batch)

    @property
    def group(self) -> str:
        mlp = "-".join(map(str, self.widths))
        return f"{self.name} ({self.axis}): MLP {mlp}, batch {self.batch}"


#: The base point, then each axis varied alone to two more values (one axis at a time, as
#: the sweep's grid; asv's default grid, ``bench/benchmarks.py``, is the same but for its
#: widths, 128 and 256: each of its sizes also runs the phases and the memory and FLOP
#: tracks). Widths 256 and 768 are those of the earlier medium and large sizes.
BASE = {"width": 32, "depth": 1, "out_dim": 10, "batch": 32}
AXES = {"width": (256, 768), "depth": (2, 3), "out_dim": (20, 30), "batch": (64, 128)}
#: ``full`` fits all but the two widest (``costs.peak_bytes`` against the default budget of
#: 2 GiB); the generic kernel's ``K_a`` fits every size.
SIZES = (
    Size("base", **BASE),
    *(Size(axis, **{**BASE, axis: value}) for axis, values in AXES.items() for value in values),
)


@dataclass(frozen=True)
class Problem:
    size: Size
    model: torch.nn.Module  # shared by every benchmark of the size: never changed
    inputs: torch.Tensor
    targets: torch.Tensor
    device: torch.device


@pytest.fixture(scope="session")
def device() -> torch.device:
    name = common.device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"RIEMANN_BENCH_DEVICE={name!r} but CUDA is not available to this torch")
    return device


@pytest.fixture(scope="session")
def memory_budget() -> float:
    """Bytes a combination may need by ``costs.peak_bytes`` before it is skipped."""
    return common.BUDGET_BYTES


@pytest.fixture(scope="session")
def rates(device) -> dict[str, float]:
    """The device's float32 GEMM, Cholesky and triangular-solve rates (median FLOP/s of 3
    calls each), measured once per run: the yardsticks of the phase-wise speed of light."""
    n = 8192 if device.type == "cuda" else 2048
    return {k: sorted(v)[len(v) // 2] for k, v in device_rates(device, DTYPE, n=n).items()}


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: s.name)
def problem(request, device) -> Problem:
    """Seeded model and batch of one size (cached in :func:`bench.common.problem`)."""
    size = request.param
    model, inputs, targets = common.problem(
        size.width, size.depth, size.out_dim, size.batch, str(device), DTYPE, SEED
    )
    return Problem(size, model, inputs, targets, device)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add each figure as a ratio: to the SGD step of its size, and to its speed of light
    (ratios of medians taken at different moments, which drift on a shared machine; the
    ratios within one run are ``riemann-bench targets``' and asv's ``Targets``')."""
    baseline = {
        b["group"]: b["stats"]["median"]
        for b in output_json["benchmarks"]
        if b["name"].startswith("test_sgd_step")
    }
    for b in output_json["benchmarks"]:
        info, median = b["extra_info"], b["stats"]["median"]
        if b["group"] in baseline:
            info["median_over_sgd_step"] = median / baseline[b["group"]]
        if info.get("speed_of_light_s"):
            info["median_over_speed_of_light"] = median / info["speed_of_light_s"]
