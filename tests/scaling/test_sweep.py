"""The sweep: one row per point, resumable, atomic, and careful with bad input."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from riemann_core.scaling import sweep as sw

TINY = dict(
    base={"width": 4, "depth": 1, "out_dim": 3, "batch": 4},
    axes={"width": (4, 6), "depth": (1, 2), "out_dim": (3,), "batch": (2, 4)},
    repeats=1,
)


def rows_of(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_points_vary_one_axis_and_visit_the_base_once():
    grid = sw.Grid(**TINY)
    points = grid.points()
    assert len(points) == len({tuple(p.values()) for p in points}) == 4
    for p in points:
        assert sum(p[a] != grid.base[a] for a in sw.AXES) <= 1
    runs = list(grid.runs())
    assert len(runs) == 4 * (len(grid.methods) + 1)  # + layerwise with the generic kernel


def test_sweep_records_every_run_with_counted_and_modelled_flops(tmp_path):
    grid = sw.Grid(**{**TINY, "methods": ("layerwise", "natural")})
    result = sw.sweep(grid, tmp_path, progress=False)
    rows = rows_of(tmp_path / "results.csv")
    assert len(rows) == result.measured == len(list(grid.runs()))
    assert {r["status"] for r in rows} == {"ok"}
    for r in rows:
        assert float(r["flops"]) == pytest.approx(float(r["flops_model"]), rel=0.01)
        assert float(r["time_median_s"]) > 0
    assert (tmp_path / "sweep.json").exists()


def test_budgets_skip_points_with_the_reason(tmp_path):
    grid = sw.Grid(**{**TINY, "methods": ("full",), "flop_budget": 1e3})
    sw.sweep(grid, tmp_path, progress=False)
    rows = rows_of(tmp_path / "results.csv")
    assert {r["status"] for r in rows} == {"skipped"}
    assert all("FLOPs > budget" in r["reason"] for r in rows)


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    def broken(run, grid, device):
        if run["method"] == "kfac":
            raise RuntimeError("planted failure")
        return lambda: None

    monkeypatch.setattr(sw, "_direction_call", broken)
    sw.sweep(sw.Grid(**{**TINY, "methods": ("kfac", "euclidean")}), tmp_path, progress=False)
    rows = rows_of(tmp_path / "results.csv")
    assert {r["status"] for r in rows if r["method"] == "kfac"} == {"error"}
    assert all("planted failure" in r["reason"] for r in rows if r["method"] == "kfac")
    assert {r["status"] for r in rows if r["method"] == "euclidean"} == {"ok"}


def test_killed_sweep_resumes_without_losing_or_duplicating_points(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from riemann_core.scaling import sweep as sw
        real = sw.measure_point
        def slow(run, grid):
            time.sleep(0.3)
            return real(run, grid)
        sw.measure_point = slow
        sw.sweep(sw.Grid(**{TINY!r}), Path({str(tmp_path)!r}), progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    path = tmp_path / "results.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (path.exists() and len(rows_of(path)) >= 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = rows_of(path)
    total = len(list(sw.Grid(**TINY).runs()))
    assert 3 <= len(before) < total  # killed halfway
    result = sw.sweep(sw.Grid(**TINY), tmp_path, progress=False)
    after = rows_of(path)
    keys = [sw.key_of(r) for r in after]
    assert len(keys) == len(set(keys)) == total
    assert result.resumed == len(before) and result.measured == total - len(before)
    assert after[: len(before)] == before  # finished points kept as they were


@pytest.mark.parametrize(
    "content",
    ["not,a,results\nfile,at,all\n", "method,kernel\nlayerwise,structured\n", "\x00\x01binary"],
    ids=["foreign-csv", "missing-columns", "binary"],
)
def test_corrupted_results_file_is_a_clear_error_and_left_alone(tmp_path, content):
    path = tmp_path / "results.csv"
    path.write_text(content)
    with pytest.raises(sw.ResultsFileError, match="results.csv"):
        sw.sweep(sw.Grid(**TINY), tmp_path, progress=False)
    assert path.read_text() == content


def test_truncated_line_is_reported_with_its_number(tmp_path):
    sw.sweep(sw.Grid(**{**TINY, "methods": ("euclidean",)}), tmp_path, progress=False)
    path = tmp_path / "results.csv"
    text = path.read_text().splitlines()
    broken = "\n".join(text[:-1] + [text[-1].split(",")[0]]) + "\n"
    path.write_text(broken)
    with pytest.raises(sw.ResultsFileError, match=f"line {len(text)} is incomplete"):
        sw.sweep(sw.Grid(**TINY), tmp_path, progress=False)
    assert path.read_text() == broken


@pytest.mark.parametrize(
    "change,match",
    [
        ({"axes": {**TINY["axes"], "width": (0, 4)}}, "positive integers"),
        ({"axes": {**TINY["axes"], "batch": ()}}, "positive integers"),
        ({"methods": ("layerwise", "newton")}, "unknown method"),
        ({"kernels": ("fast",)}, "unknown kernel"),
        ({"dtypes": ("float16",)}, "unknown dtype"),
        ({"repeats": 0}, "repeats must be >= 1"),
        ({"base": {"width": 4}}, "must name exactly"),
    ],
    ids=["zero-width", "empty-axis", "method", "kernel", "dtype", "repeats", "base"],
)
def test_bad_grid_options_fail_before_any_work(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        sw.Grid(**{**TINY, **change})
    assert list(tmp_path.iterdir()) == []


def test_resuming_around_another_base_point_is_refused(tmp_path):
    sw.sweep(sw.Grid(**{**TINY, "methods": ("euclidean",)}), tmp_path, progress=False)
    before = (tmp_path / "results.csv").read_text()
    other = {**TINY, "base": {**TINY["base"], "width": 6}, "methods": ("euclidean",)}
    with pytest.raises(ValueError, match="another --out"):
        sw.sweep(sw.Grid(**other), tmp_path, progress=False)
    assert (tmp_path / "results.csv").read_text() == before


def test_resume_retries_points_that_were_skipped(tmp_path):
    tight = {**TINY, "methods": ("full",), "flop_budget": 1e3}
    sw.sweep(sw.Grid(**tight), tmp_path, progress=False)
    assert {r["status"] for r in rows_of(tmp_path / "results.csv")} == {"skipped"}
    result = sw.sweep(sw.Grid(**{**tight, "flop_budget": 1e12}), tmp_path, progress=False)
    rows = rows_of(tmp_path / "results.csv")
    assert {r["status"] for r in rows} == {"ok"}
    assert len(rows) == result.measured == len(list(sw.Grid(**tight).runs()))


class Backwards:
    """A runner that returns the points in reverse order and loses the second."""

    placed = False

    def __call__(self, task, runs):
        for i, run in reversed(list(enumerate(runs))):
            yield run, (sw.PointLost("planted: its worker died") if i == 1 else task(run))


def test_rows_land_in_grid_order_and_a_lost_point_is_an_error_with_the_reason(tmp_path):
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",)})
    result = sw.sweep(grid, tmp_path, runner=Backwards(), progress=False)
    rows = rows_of(tmp_path / "results.csv")
    assert [sw.key_of(r) for r in rows] == [sw.key_of(r) for r in grid.runs()]
    lost = rows[1]
    assert lost["status"] == "error" and lost["reason"] == "planted: its worker died"
    assert lost["n_params"] and lost["flops_model"]  # the cost model's figures are kept
    assert result.statuses == {"ok": len(rows) - 1, "error": 1}
    again = sw.sweep(grid, tmp_path, progress=False)  # a rerun measures the lost point
    assert again.measured == 1 and again.statuses == {"ok": len(rows)}


def test_rows_say_where_they_were_measured_and_sweep_json_records_the_device(tmp_path):
    from riemann_core.measure.environment import device_name

    sw.sweep(sw.Grid(**{**TINY, "methods": ("euclidean",)}), tmp_path, progress=False, gemm_size=64)
    rows = rows_of(tmp_path / "results.csv")
    assert {(r["host"], r["device_name"], r["physical_device"]) for r in rows} == {
        (socket.gethostname(), device_name("cpu"), "cpu")
    }
    meta = json.loads((tmp_path / "sweep.json").read_text())
    record = meta["devices"][device_name("cpu")]
    assert list(record["workers"]) == [f"{socket.gethostname()} cpu"]
    assert record["gemm_flops_per_s"] > 0 and record["environment"]["torch"]
    assert meta["gemm_flops_per_s"] == record["gemm_flops_per_s"]


def test_results_written_before_rows_said_where_are_resumed(tmp_path):
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",)})
    sw.sweep(grid, tmp_path, progress=False)
    path = tmp_path / "results.csv"
    rows = rows_of(path)
    old = [c for c in sw.COLUMNS if c not in sw.WHERE]
    with path.open("w", newline="") as f:  # the columns of an older riemann-bench
        writer = csv.DictWriter(f, fieldnames=old, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows[:2])
    result = sw.sweep(grid, tmp_path, progress=False)
    assert result.resumed == 2 and result.measured == len(rows) - 2
    after = rows_of(path)
    assert [r["host"] for r in after[:2]] == ["", ""]
    assert all(r["host"] == socket.gethostname() for r in after[2:])
