"""Wall-clock timing that synchronises CUDA and reports robust statistics."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


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
    if len(times) >= 2:
        q = statistics.quantiles(times, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return Timing(statistics.median(times), iqr, tuple(times))


def interleaved(calls: dict, rounds: int, device) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, timed in turn in every round.

    On a shared machine the speed drifts; ratios taken within one round (seconds
    apart) are far steadier than ratios of separately taken medians.
    """
    for fn in calls.values():  # warm-up
        fn()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(measure(fn, repeats=1, warmup=0, device=device).median)
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of ``a[i] / b[i]``."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def gemm_rate(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    n: int = 4096,
    repeats: int = 5,
) -> float:
    """FLOP/s of one ``n x n`` matrix product on ``device``: the yardstick of a run."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / measure(lambda: a @ b, repeats=repeats, device=device).median
