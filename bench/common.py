"""Seeded, cached problems shared by the benchmark suites (asv imports this module too).

A problem is a tanh MLP with ``depth`` hidden layers of ``width`` units on ``width``
inputs and ``out_dim`` classes, a seeded batch of ``batch`` inputs and class targets.
Importing it tells glibc to keep the memory it frees, as ``riemann-bench`` does
(:mod:`riemann_core.measure.allocator`).

Environment variables, read at import so that asv's discovery and its runs agree:

* ``RIEMANN_BENCH_DEVICE``: ``cpu`` (default) or ``cuda``;
* ``RIEMANN_BENCH_FULL=1``: the full parameter grid instead of the cheap default one;
* ``RIEMANN_BENCH_BUDGET_GIB``: memory a combination may need by
  :func:`riemann_core.costs.peak_bytes` before it is skipped (default 2);
* ``RIEMANN_BENCH_THREADS``: torch's intra-op threads (default: torch's own, the cores it
  sees, or ``OMP_NUM_THREADS``). Set at import, so that every benchmark of a run, and runs
  of two commits, take the same count (on a shared, loaded 2-core host the base point's SGD step
  took 28 ms on torch's two threads against 0.14 ms on one).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from riemann_core import costs
from riemann_core.measure.allocator import keep_freed_memory
from riemann_core.measure.environment import environment
from riemann_core.measure.problems import mlp, widths
from riemann_core.measure.timing import synchronize
from riemann_core.scaling import worker

__all__ = [
    "BUDGET_BYTES",
    "DAMPING",
    "FULL",
    "THREADS",
    "device",
    "environment",
    "mlp",
    "problem",
    "require_device",
    "require_feasible",
    "shape",
    "synchronize",
    "widths",
]

keep_freed_memory()  # timed as riemann-bench times: without glibc's page-faulting policy
FULL = os.environ.get("RIEMANN_BENCH_FULL") == "1"
BUDGET_BYTES = float(os.environ.get("RIEMANN_BENCH_BUDGET_GIB", "2")) * 2**30


def _threads() -> int:
    """``RIEMANN_BENCH_THREADS`` as torch's thread count, set only where given: even with
    torch's own count, ``torch.set_num_threads`` turns MKL's dynamic threading off for the
    whole process (riemann_core/woodbury.py), so the default would not be torch's own."""
    given = os.environ.get(worker.THREADS, "").strip()
    if not given:
        return torch.get_num_threads()
    if not (given.isascii() and given.isdigit()) or int(given) < 1:
        raise ValueError(f"{worker.THREADS} must be a positive integer, got {given!r}")
    torch.set_num_threads(int(given))
    return int(given)


#: torch's intra-op threads for every benchmark (``RIEMANN_BENCH_THREADS``; the sweep's
#: workers read the same variable), else torch's default, which asv does not record
THREADS = _threads()
DAMPING = 1e-3


def device() -> str:
    """The device the benchmarks run on: ``RIEMANN_BENCH_DEVICE``, default ``"cpu"``."""
    return os.environ.get("RIEMANN_BENCH_DEVICE", "cpu")


def shape(width: int, depth: int, out_dim: int, batch: int) -> costs.MLPShape:
    """The cost model's view of a problem: exact cross-entropy has ``r = out_dim - 1`` rows."""
    return costs.MLPShape(widths(width, depth, out_dim), batch, rows=costs.minimal_rows(out_dim))


@functools.lru_cache(maxsize=16)
def problem(
    width: int,
    depth: int,
    out_dim: int,
    batch: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(model, inputs, targets)``, the same for the same arguments (seeded, cached).

    The global random state is left as it was. Callers must not change the model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = mlp(widths(width, depth, out_dim))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, width, generator=generator)
    y = torch.randint(0, out_dim, (batch,), generator=generator)
    return model.to(device, dtype), x.to(device, dtype), y.to(device)


def require_device(name: str) -> None:
    """Raise ``NotImplementedError`` (asv: skip) when ``name`` is a CUDA device torch lacks."""
    if torch.device(name).type == "cuda" and not torch.cuda.is_available():
        raise NotImplementedError(f"device {name!r} asked for, but CUDA is not available")


def require_feasible(
    method: str, kernel: str, width: int, depth: int, out_dim: int, batch: int, itemsize: int = 4
) -> None:
    """Raise ``NotImplementedError`` (asv: skip) when the cost model's peak memory of the
    direction exceeds :data:`BUDGET_BYTES` (``full`` at large ``n``, ``generic`` at
    large ``n d``)."""
    need = costs.peak_bytes(
        method, shape(width, depth, out_dim, batch), kernel, itemsize, device=device()
    )
    if need > BUDGET_BYTES:
        raise NotImplementedError(
            f"method={method!r} kernel={kernel!r} needs ~{need / 2**30:.2f} GiB by "
            f"costs.peak_bytes, over the budget of {BUDGET_BYTES / 2**30:.2f} GiB "
            "(RIEMANN_BENCH_BUDGET_GIB)"
        )
