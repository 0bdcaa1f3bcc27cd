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
