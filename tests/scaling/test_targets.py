"""riemann-bench targets: interleaved timing and per-round ratios."""

from riemann_core.scaling import targets


def test_interleaved_times_each_call_once_per_round_after_a_warm_up():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = targets.interleaved(calls, rounds=3, device="cpu")
    assert order == ["a", "b"] * 4  # warm-up, then three rounds in turn
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_median_ratio_pairs_rounds():
    # per-round ratios 2, 4, 3 -> 3; the ratio of medians would be 4 / 1 = 4
    assert targets.median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0
