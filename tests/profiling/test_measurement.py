"""The shared measurement layer: timing, memory, environment, atomic output."""

import json

import pytest
import torch

from riemann_core.profiling import environment, memory, output, targets, timing


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


def test_interleaved_times_each_call_once_per_round_after_a_warm_up():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = targets.interleaved(calls, rounds=3, device="cpu")
    assert order == ["a", "b"] * 4  # warm-up, then three rounds in turn
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_median_ratio_pairs_rounds():
    # per-round ratios 2, 4, 3 -> 3; the ratio of medians would be 4 / 1 = 4
    assert targets.median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0


def test_environment_record_names_what_a_report_needs():
    env = environment.environment("cpu")
    for key in ("commit", "torch", "device_name", "cpu", "threads", "blas", "python"):
        assert env[key] not in ("", None)
    assert env["torch"] == torch.__version__


def test_host_peak_is_positive_and_cuda_peak_needs_cuda():
    assert memory.host_peak_rss_bytes() > 0
    with pytest.raises(ValueError, match="needs a CUDA device"):
        memory.cuda_peak_bytes(lambda: None, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_sees_an_allocation():
    n = 1 << 20
    peak = memory.cuda_peak_bytes(lambda: torch.empty(n, device="cuda"), "cuda")
    assert peak >= 4 * n


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    path = output.write_json(tmp_path, "r.json", {"a": 1})
    with pytest.raises(TypeError):
        output.write_json(tmp_path, "r.json", {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        path = output.write_json(tmp_path, "r.json", {"a": 1})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
