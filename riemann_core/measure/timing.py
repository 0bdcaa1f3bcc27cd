"""Wall-clock timing that synchronises CUDA and reports robust statistics."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..costs import factor_order
from ..woodbury import cholesky_in_place


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median, interquartile range and every repeat."""

    median: float
    iqr: float
    times: tuple[float, ...]


def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` calls, synchronising ``device``."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return timing_of(times)


def timing_of(times: list[float]) -> Timing:
    """Median, interquartile range and every one of ``times`` (seconds per call)."""
    if len(times) >= 2:
        q = statistics.quantiles(times, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return Timing(statistics.median(times), iqr, tuple(times))


def interleaved(calls: dict, rounds: int, device, warmup: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, timed in turn in every round, each right
    after ``warmup`` untimed calls of its own.

    On a shared machine the speed drifts; ratios taken within one round (seconds
    apart) are far steadier than ratios of separately taken medians. With ``warmup=0``
    a call is timed in the cache state the call before it, of another kind, left; with
    ``warmup=1`` as a call that repeats, say a training step after a training step.
    """
    for fn in calls.values():  # warm-up
        fn()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(measure(fn, repeats=1, warmup=warmup, device=device).median)
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of ``a[i] / b[i]``."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


#: A goal's verdicts on a figure: its whole interval meets the goal, misses it, or straddles
#: it.
MET, MISSED, NOISY = "met", "missed", "too noisy"


#: The fewest rounds whose :func:`median_interval` holds the true median in about 95% of
#: draws (93.7% at 5 rounds, 87% at 4, 75% at 3: the bootstrap median of ``n`` rounds never
#: leaves ``[min, max]``, which misses the median in ``2^(1 - n)`` of draws; found by a
#: simulation of known ratios: at 3 rounds a true 1.30 read met against ``<= 1.25`` in 8%
#: of draws at 20% noise a call, a true 1.25 met or missed in 25%).
MIN_ROUNDS = 5


def verdict_for(low: float, high: float, sense: str, bound: float, rounds: int) -> str:
    """The verdict of the interval ``[low, high]`` of a median over ``rounds`` rounds
    against the goal ``sense bound`` (``"<="`` or ``">="``): :data:`MET` where all of it
    meets the goal, :data:`MISSED` where none does, :data:`NOISY` where it straddles the
    goal or ``rounds`` are fewer than :data:`MIN_ROUNDS` (their interval is no 95% one)."""
    if rounds < MIN_ROUNDS:
        return NOISY
    meets = [r <= bound if sense == "<=" else r >= bound for r in (low, high)]
    return MET if all(meets) else MISSED if not any(meets) else NOISY


def median_interval(values, n_boot: int = 2000) -> tuple[float, float, float]:
    """``(median, low, high)``: the median of ``values`` (per-round ratios) and the 95%
    bootstrap interval of that median (seeded: a rerun on the same figures agrees)."""
    vs = np.atleast_1d(np.asarray(values, dtype=float))
    if vs.size == 0 or not np.isfinite(vs).all():
        raise ValueError(
            f"median_interval needs one finite value per round and at least one round, got "
            f"{vs.tolist()}"
        )
    boot = np.random.default_rng(0).integers(0, vs.size, (n_boot, vs.size))
    low, high = np.percentile(np.median(vs[boot], axis=1), [2.5, 97.5])
    return float(np.median(vs)), float(low), float(high)


def in_place_cholesky(spd: Tensor, calls: int) -> Callable[[], object]:
    """A call that factorises in place the next of ``calls`` copies of the positive definite
    ``spd``, all made now, in the column-major memory LAPACK works on: the fastest Cholesky
    the package runs (:func:`riemann_core.woodbury.cholesky_in_place`, no copy and no
    cleared triangle; ``torch.linalg.cholesky`` adds both: 1.39x its time at order 4104 on
    a 2-core CPU), with no copy timed. A call past the ``calls`` copies raises."""
    copies = [spd.clone().mT for _ in range(calls)]  # symmetric: the transpose is spd
    return lambda: cholesky_in_place(copies.pop())


#: Kinds of operation whose best rate a device is measured at (:func:`device_rates`).
RATE_KINDS = ("products", "cholesky", "triangular")


def device_rates(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    n: int = 4096,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, list[float]]:
    """FLOP/s of each of :data:`RATE_KINDS` at size ``n``, one figure per timed call.

    ``products``: an ``n x n`` by ``n x n`` GEMM (``2 n^3``); ``cholesky``: Cholesky of an
    ``m x m`` positive definite matrix in place (``m^3 / 3``, :func:`in_place_cholesky`);
    ``triangular``: a triangular solve
    of order ``m`` with ``m`` right-hand sides (``m^3``), where ``m`` is
    :func:`~riemann_core.costs.factor_order` of ``n``: ``n + 8`` for a multiple of 64, an
    order at which LAPACK's Cholesky (MKL's) runs up to 2x slower, and at which the
    layerwise metric never factorises. At a large ``n`` (2048-4096 on a CPU, 16384 on a GPU)
    these are the best rates the device reaches for each kind: the yardsticks of the speed
    of light. The inputs come from a generator on ``device``.
    """
    generator = torch.Generator(device).manual_seed(seed)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    m = factor_order(n)
    c = torch.randn(m, m, device=device, dtype=dtype, generator=generator)
    spd = c @ c.T
    spd.diagonal().add_(m)
    lower = torch.linalg.cholesky(spd)
    calls = {
        "products": (lambda: a @ b, 2 * n**3),
        "cholesky": (in_place_cholesky(spd, calls=1 + repeats), m**3 / 3),
        "triangular": (lambda: torch.linalg.solve_triangular(lower, c, upper=False), m**3),
    }
    return {
        kind: [flops / t for t in measure(fn, repeats=repeats, device=device).times]
        for kind, (fn, flops) in calls.items()
    }
