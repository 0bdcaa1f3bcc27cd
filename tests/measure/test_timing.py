"""Timing: repeats, warm-up and order statistics."""

import pytest

from riemann_core.measure import timing


def test_measure_counts_calls_and_reports_order_statistics():
    calls = []
    result = timing.measure(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6
    assert len(result.times) == 4
    assert min(result.times) <= result.median <= max(result.times)
    assert 0 <= result.iqr <= max(result.times) - min(result.times)


@pytest.mark.parametrize("repeats,warmup", [(0, 1), (3, -1)])
def test_measure_rejects_bad_counts(repeats, warmup):
    with pytest.raises(ValueError, match="repeats >= 1 and warmup >= 0"):
        timing.measure(lambda: None, repeats=repeats, warmup=warmup)


def test_device_rates_measure_each_kind_once_per_repeat():
    rates = timing.device_rates("cpu", n=64, repeats=2)
    assert set(rates) == set(timing.RATE_KINDS) == {"products", "cholesky", "triangular"}
    assert all(len(v) == 2 and all(r > 0 for r in v) for v in rates.values())


def test_interleaved_times_each_call_once_per_round_after_a_warm_up():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = timing.interleaved(calls, rounds=3, device="cpu")
    assert order == ["a", "b"] * 4  # warm-up, then three rounds in turn
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_median_ratio_pairs_rounds():
    # per-round ratios 2, 4, 3 -> 3; the ratio of medians would be 4 / 1 = 4
    assert timing.median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0


def test_median_interval_brackets_the_median_and_refuses_no_rounds_or_non_finite():
    median, low, high = timing.median_interval([1.0, 3.0, 2.0, 5.0, 4.0])
    assert median == 3.0 and 1.0 <= low <= median <= high <= 5.0
    for values in ([], [1.0, float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match="one finite value per round and at least one"):
            timing.median_interval(values)


def test_interleaved_times_each_call_right_after_its_own_warm_up_calls():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    times = timing.interleaved(calls, rounds=2, device="cpu", warmup=1)
    assert [len(t) for t in times.values()] == [2, 2]
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 2  # warm-up, then (own, timed) pairs


def test_the_cholesky_yardstick_factorises_copies_in_place_and_no_more():
    """The rate's Cholesky is the package's fastest (in place, column-major; found by review:
    ``torch.linalg.cholesky`` copies and clears a triangle, a yardstick 1.39x slower at
    order 4104), on copies made before timing, each factorised once."""
    import torch

    c = torch.randn(40, 40, dtype=torch.float64)
    spd = c @ c.T + 40 * torch.eye(40, dtype=torch.float64)
    call = timing.in_place_cholesky(spd, calls=2)
    for _ in range(2):
        factor = call().factor
        torch.testing.assert_close(factor.tril(), torch.linalg.cholesky(spd))
    with pytest.raises(IndexError):
        call()
