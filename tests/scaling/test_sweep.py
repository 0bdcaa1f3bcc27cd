"""The sweep: one row per point, resumable, atomic, and careful with bad input."""

import contextlib
import csv
import errno
import functools
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from synthetic import known_time_row, recorded_bars

from riemann_core import costs
from riemann_core.measure import allocator, public_kfac
from riemann_core.measure.flops import KINDS
from riemann_core.measure.problems import widths
from riemann_core.measure.timing import RATE_KINDS, Timing, device_rates
from riemann_core.scaling import grow, report
from riemann_core.scaling import sweep as sw
from riemann_core.scaling.worker import physical_device
from riemann_core.woodbury import AccuracyWarning

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
        assert float(r["flops"]) == sum(float(r[f"flops_{k}"]) for k in KINDS)
        assert float(r["flops_cholesky"]) > 0 and float(r["sol_products"]) > 0
        assert float(r["time_median_s"]) > 0
    # strict JSON (found by a hunt: the default time budget, none, was written Infinity)
    text = (tmp_path / "sweep.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    record = json.loads(text)
    assert grid.time_budget_s == float("inf") and record["grid"]["time_budget_s"] is None


@pytest.mark.parametrize(("damping", "taken"), [(1.0, ""), (1e-6, "condition refine residual")])
def test_a_point_says_which_slow_paths_its_counted_call_took(damping, taken):
    run = next(r for r in sw.Grid(**TINY).runs() if r["method"] == "natural")
    # the ill-conditioned solve also says its direction is undetermined in float32
    expected = pytest.warns(AccuracyWarning) if taken else contextlib.nullcontext()
    with expected:
        row = sw.measure_point(run, sw.Grid(**{**TINY, "damping": damping}))
    assert row["status"] == "ok" and row["slow_paths"] == taken
    exact = float(row["flops"]) == pytest.approx(float(row["flops_model"]), rel=0.01)
    assert exact == (not taken)  # the cost model counts the algorithm, not its slow paths


def test_the_default_kfac_is_measured_beside_the_exact_one_with_its_own_cost_model(tmp_path):
    grid = sw.Grid(**{**TINY, "methods": ("kfac", "kfac-default")})
    sw.sweep(grid, tmp_path, progress=False)
    rows = rows_of(tmp_path / "results.csv")
    assert len(rows) == 2 * len(grid.points()) and {r["status"] for r in rows} == {"ok"}
    for r in rows:
        exact = r["method"] == "kfac"
        point = {a: int(r[a]) for a in sw.AXES}
        layers = widths(point["width"], point["depth"], point["out_dim"])
        rows = point["out_dim"] - 1 if exact else 1  # the softmax Fisher's C - 1 rows
        shape = costs.MLPShape(layers, point["batch"], rows)
        variant = {} if exact else {"kfac_damping": "factored", "kfac_bias": "separate"}
        model = costs.flops("kfac", shape, **variant)["total"]
        assert float(r["flops_model"]) == model
        assert float(r["flops"]) == pytest.approx(model, rel=0.01)
        assert float(r["peak_bytes_model"]) == costs.peak_bytes("kfac", shape, itemsize=4)
        assert int(r["d"]) == shape.d and r["output_metric"] == "exact"  # the sweep's setting
        # exact damping diagonalises the factors; factored damping factorises them
        assert (float(r["flops_eigh"]) > 0) == exact
        assert (float(r["flops_cholesky"]) > 0) == (not exact)


def test_the_default_kfac_runs_the_options_its_users_run(monkeypatch):
    calls = []
    real = sw.rc.direction

    def spy(*args, **options):
        calls.append(options)
        return real(*args, **options)

    monkeypatch.setattr(sw.rc, "direction", spy)
    grid = sw.Grid(**{**TINY, "methods": ("kfac-default",), "output_metric": "exact"})
    assert sw.measure_point(next(grid.runs()), grid)["status"] == "ok"
    expected = dict(method="kfac", output_metric="sampled", kfac_damping="factored")
    assert calls
    assert all(c.items() >= {**expected, "kfac_bias": "separate"}.items() for c in calls)
    assert all(c.items() >= public_kfac.DEFAULT.options().items() for c in calls)


def test_results_without_the_default_kfac_resume_beside_it(tmp_path):
    path = tmp_path / "results.csv"
    sw.sweep(sw.Grid(**{**TINY, "methods": ("kfac",)}), tmp_path, progress=False)
    before = rows_of(path)
    grid = sw.Grid(**{**TINY, "methods": ("kfac", "kfac-default")})
    result = sw.sweep(grid, tmp_path, progress=False)
    after = rows_of(path)
    assert result.resumed == len(before) and result.measured == len(before)
    assert [r for r in after if r["method"] == "kfac"] == before  # the exact variant's rows
    assert {r["status"] for r in after if r["method"] == "kfac-default"} == {"ok"}


def test_unknown_methods_are_refused_naming_the_choices():
    choices = "euclidean, layerwise, full, natural, kfac, kfac-default"
    with pytest.raises(
        ValueError, match=f"unknown method \\['kfac-fast'\\]; choose from {choices}$"
    ):
        sw.Grid(**{**TINY, "methods": ("kfac", "kfac-fast")})


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
        import torch
        from riemann_core.scaling import sweep as sw
        torch.set_num_threads({torch.get_num_threads()})  # resumed here: timed alike
        real = sw.measure_point
        def slow(run, grid):
            time.sleep(0.3)
            return real(run, grid)
        sw.measure_point = slow
        sw.sweep(sw.Grid(**{TINY!r}), Path({str(tmp_path)!r}), progress=False)
    """)
    # the child's malloc policy as this process's, whatever an earlier test's cluster left
    # in os.environ (a dask nanny sets it for its workers: the resume was refused as timed
    # in another setting where test_dispatch ran first)
    env = {k: v for k, v in os.environ.items() if k not in allocator.KEEP}
    env |= allocator.KEEP if allocator.policy() == "keep freed" else {}
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, env=env)
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


def test_results_of_another_cost_model_are_refused_and_left_alone(tmp_path):
    """Rows whose recorded modelled FLOPs are not this version's at their point (a results
    file of another version) are not resumed: fits would mix two cost models."""
    sw.sweep(sw.Grid(**{**TINY, "methods": ("layerwise",)}), tmp_path, progress=False)
    path = tmp_path / "results.csv"
    rows = rows_of(path)
    rows[1]["flops_model"] = str(float(rows[1]["flops_model"]) * 10 / 9)  # say, C rows, not C-1
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    before = path.read_text()
    point = ", ".join(f"{k}={rows[1][k]}" for k in sw.KEY)
    with pytest.raises(sw.ResultsFileError, match=f"1 of {len(rows)} finished .*{point}"):
        sw.sweep(sw.Grid(**{**TINY, "methods": ("layerwise",)}), tmp_path, progress=False)
    assert path.read_text() == before


@pytest.mark.parametrize(
    "cut",
    [
        lambda line: line.split(",")[0] + "\n",  # a row of one field
        lambda line: line[: len(line) // 2],  # cut mid-row, inside a field
        lambda line: line[:-1],  # inside the last field: every column there, no newline
    ],
    ids=["one-field", "mid-row", "last-field"],
)
def test_truncated_line_is_reported_with_its_number(tmp_path, cut):
    sw.sweep(sw.Grid(**{**TINY, "methods": ("euclidean",)}), tmp_path, progress=False)
    path = tmp_path / "results.csv"
    text = path.read_text().splitlines()
    broken = "\n".join(text[:-1] + [cut(text[-1])])
    path.write_text(broken)
    with pytest.raises(sw.ResultsFileError, match=f"line {len(text)} is incomplete"):
        sw.sweep(sw.Grid(**TINY), tmp_path, progress=False)
    assert path.read_text() == broken


@pytest.mark.parametrize(
    "change,match",
    [
        (
            {"axes": {**TINY["axes"], "width": (0, 8)}},
            r"^--widths needs positive integers, got \[0\]$",
        ),
        ({"axes": {**TINY["axes"], "batch": ()}}, "--batches needs positive integers, got \\[\\]"),
        ({"base": {**TINY["base"], "depth": 0}}, "--base needs 4 positive integers"),
        ({"methods": ("layerwise", "newton")}, "unknown method"),
        ({"methods": ("full", "full")}, "^methods: full given more than once"),
        ({"kernels": ("fast",)}, "unknown kernel"),
        ({"dtypes": ("float16",)}, "unknown dtype"),
        ({"dtypes": ("float32", "float64")}, "compare one dtype at a time"),
        ({"repeats": 0}, r"^--repeats must be at least 1, got 0$"),
        # found by a hunt: 10**12 timed the first point without end
        (
            {"repeats": 1001},
            r"^--repeats 1001 is more than 1000, the most timed calls a point takes: pass "
            r"--repeats 1000 or fewer$",
        ),
        ({"flop_budget": -1.0}, r"^--flop-budget must be positive, got -1$"),
        ({"grow": {"height": 8}}, "grow needs axes"),
        ({"base": {"width": 4}}, "must name exactly"),
        ({"methods": ("full",), "kernels": ("generic",)}, "no point to measure: the generic"),
        # found by a hunt: a ZeroDivisionError (exit 3) after sweep.json was rewritten
        ({"axes": {**TINY["axes"], "out_dim": (3, 1)}}, "need out_dim >= 2"),
    ],
    ids=[
        "zero-width",
        "empty-axis",
        "base",
        "method",
        "method-twice",
        "kernel",
        "dtype",
        "two-dtypes",
        "repeats",
        "repeats-past-bound",
        "flop-budget",
        "grow",
        "base-axes",
        "no-point",
        "one-output",
    ],  # fmt: skip
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


@pytest.mark.parametrize(
    "change, message",
    [
        ({"output_metric": "sampled"}, "output_metric exact, not sampled.*--output-metric exact"),
        ({"dtypes": ("float64",)}, "dtype float32, not float64.*--dtypes float32"),
        ({"seed": 7}, "seed 0, not 7.*--seed 0"),
        ({"damping": 0.1}, r"damping 0.001, not 0.1.*Grid\(damping=0.001\) from Python"),
    ],
    ids=["output-metric", "dtype", "seed", "damping"],
)
def test_resuming_with_other_settings_is_refused(tmp_path, change, message):
    """Found by review: a sweep resumed with another output metric, dtype or seed mixed
    two sweeps in one results file (and the record said only the new setting)."""
    grid = {**TINY, "methods": ("euclidean",)}
    sw.sweep(sw.Grid(**grid), tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=message):
        sw.sweep(sw.Grid(**{**grid, **change}), tmp_path, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    sw.sweep(sw.Grid(**{**grid, "devices": ("cpu",)}), tmp_path, progress=False)  # the same


def test_resuming_under_another_timing_environment_is_refused(tmp_path, monkeypatch):
    """Found by review: a sweep resumed with another thread count kept the rows timed with
    the first and overwrote the record of their environment."""
    grid = {**TINY, "methods": ("euclidean",)}
    sw.sweep(sw.Grid(**grid), tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    wider = {**grid, "axes": {**grid["axes"], "width": (*grid["axes"]["width"], 12)}}
    with pytest.raises(
        ValueError, match=f"timed with threads {threads}; here threads {threads + 1}"
    ):
        sw.sweep(sw.Grid(**wider), tmp_path, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_resume_retries_points_that_were_skipped(tmp_path):
    tight = {**TINY, "methods": ("full",), "flop_budget": 1e3}
    sw.sweep(sw.Grid(**tight), tmp_path, progress=False)
    assert {r["status"] for r in rows_of(tmp_path / "results.csv")} == {"skipped"}
    result = sw.sweep(sw.Grid(**{**tight, "flop_budget": 1e12}), tmp_path, progress=False)
    rows = rows_of(tmp_path / "results.csv")
    assert {r["status"] for r in rows} == {"ok"}
    assert len(rows) == result.measured == len(list(sw.Grid(**tight).runs()))


def test_a_resume_with_a_smaller_grid_keeps_the_other_rows_as_recorded(tmp_path, monkeypatch):
    """Found by review: resumed with fewer methods, a sweep dropped the skipped rows of the
    methods left out (neither kept nor decided again), and measured again, with its own
    repeats, the other methods' points it took for outliers."""
    grid = {**TINY, "methods": ("euclidean", "layerwise", "full"), "kernels": ("structured",)}
    grid.update(flop_budget=1e4, grow={"width": 8})  # full skipped; a growth decision each
    sw.sweep(sw.Grid(**grid), tmp_path, progress=False)
    before = rows_of(tmp_path / "results.csv")
    statuses = {(r["method"], r["status"]) for r in before}
    assert statuses == {("euclidean", "ok"), ("layerwise", "ok"), ("full", "skipped")}
    growth_before = json.loads((tmp_path / "sweep.json").read_text())["growth"]
    monkeypatch.setattr(grow, "is_outlier", lambda rows, row: True)
    smaller = {**grid, "methods": ("euclidean",), "axes": {**TINY["axes"], "width": (4, 5, 6)}}
    sw.sweep(sw.Grid(**smaller), tmp_path, progress=False)
    after = rows_of(tmp_path / "results.csv")
    assert [r for r in after if r["method"] != "euclidean"] == [
        r for r in before if r["method"] != "euclidean"
    ]
    growth = json.loads((tmp_path / "sweep.json").read_text())["growth"]
    assert (
        {n for n in growth if not n.startswith("euclidean/")}
        == {n for n in growth_before if not n.startswith("euclidean/")}
        != set()
    )  # and their growth decisions (found by review: replaced by the smaller grid's)
    euclidean = [r for r in after if r["method"] == "euclidean"]
    assert {r["width"] for r in euclidean} == {"4", "5", "6"}
    assert all(r["remeasured"] == "1" for r in euclidean)  # the grid's own: measured again


def test_a_resume_keeps_the_skipped_points_its_grid_leaves_out_and_records_both(tmp_path):
    """Found by review: resumed with fewer widths, a sweep deleted the skipped row of a
    width it left out, and its record (then the report) named only the last command and
    its axes while the file held both sweeps' points."""
    grid = {**TINY, "methods": ("full",), "kernels": ("structured",), "flop_budget": 1e4}
    grid["axes"] = {**TINY["axes"], "width": (4, 6)}
    sw.sweep(sw.Grid(**grid), tmp_path, progress=False, meta={"command": "first"})
    before = rows_of(tmp_path / "results.csv")
    assert {r["status"] for r in before} == {"skipped"}
    smaller = {**grid, "axes": {**grid["axes"], "width": (4,)}}
    sw.sweep(sw.Grid(**smaller), tmp_path, progress=False, meta={"command": "second"})
    after = rows_of(tmp_path / "results.csv")
    assert sorted(r["width"] for r in after) == sorted(r["width"] for r in before)
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["commands"] == ["first", "second"] and record["command"] == "second"
    assert record["axes"]["width"] == [4, 6]
    assert report.produced_by(record) == "`first`, resumed by `second`"


def test_a_resume_records_the_grid_of_every_run_beside_its_command(tmp_path):
    """Found by review: resumed with other methods and repeats, sweep.json's grid named the
    last run's alone, while its axes were both runs' and results.csv held the points of
    both: the record misdescribed the earlier points. ``grid`` stays the last run's (the
    analysis reads its rate size and overhead target)."""
    first = {**TINY, "methods": ("euclidean",), "kernels": ("structured",), "repeats": 1}
    second = {**first, "methods": ("layerwise",), "repeats": 2}
    second["axes"] = {**TINY["axes"], "width": (4, 8)}
    for grid, command in ((first, "first"), (second, "second")):
        sw.sweep(
            sw.Grid(**grid), tmp_path, measure=known, progress=False, meta={"command": command}
        )
    record = sw.read_record(tmp_path / "sweep.json")
    grids = [(g["command"], g["grid"]["methods"], g["grid"]["repeats"]) for g in record["grids"]]
    assert grids == [("first", ["euclidean"], 1), ("second", ["layerwise"], 2)]
    assert [g["grid"]["axes"]["width"] for g in record["grids"]] == [[4, 6], [4, 8]]
    assert record["axes"]["width"] == [4, 6, 8] and record["grid"] == record["grids"][-1]["grid"]
    assert {r["method"] for r in sw.read_results(tmp_path / "results.csv")} == {
        "euclidean",
        "layerwise",
    }


def test_a_resume_of_a_record_without_grids_keeps_what_it_says_of_the_runs_before(tmp_path):
    """A record written before ``grids`` kept the last run's grid beside every command: the
    runs before it name their command alone, and resuming it works as before."""
    grid = {**TINY, "methods": ("euclidean",), "kernels": ("structured",)}
    sw.sweep(sw.Grid(**grid), tmp_path, measure=known, progress=False, meta={"command": "b"})
    record = json.loads((tmp_path / "sweep.json").read_text())
    last = record.pop("grids")[-1]["grid"]
    (tmp_path / "sweep.json").write_text(json.dumps({**record, "commands": ["a", "b"]}))
    wider = {**grid, "axes": {**grid["axes"], "width": (4, 6, 8)}}
    result = sw.sweep(
        sw.Grid(**wider), tmp_path, measure=known, progress=False, meta={"command": "c"}
    )
    assert result.measured == 1 and result.resumed == len(list(sw.Grid(**grid).runs()))
    grids = sw.read_record(tmp_path / "sweep.json")["grids"]
    assert grids[:2] == [{"command": "a"}, {"command": "b", "grid": last}]
    assert grids[2]["command"] == "c" and grids[2]["grid"]["axes"]["width"] == [4, 6, 8]


def known(run, grid):
    """A point's row at once, from a machine of known speed (no timing)."""
    return known_time_row(run)


@contextlib.contextmanager
def unwritable(path):
    """``path``, a file, made one this process cannot write: read-only, or immutable for
    root, whom a file's mode does not stop (skipped where neither can be had)."""
    path.chmod(0o444)
    immutable = os.access(path, os.W_OK)
    try:
        if immutable:
            chattr = shutil.which("chattr")
            done = chattr and subprocess.run([chattr, "+i", str(path)], capture_output=True)
            if not done or done.returncode:  # (a file system without the attribute)
                immutable = False
                pytest.skip("no file can be made unwritable here (root, without chattr)")
        yield path
    finally:
        if immutable:
            subprocess.run([chattr, "-i", str(path)], check=True)
        path.chmod(0o644)


@pytest.mark.parametrize("name", ["results.csv", "sweep.json"])
def test_a_sweep_whose_files_cannot_be_written_is_refused_before_it_measures(tmp_path, name):
    """Found by review: an immutable results.csv stopped a resumed sweep at its first write,
    after it had measured the device rates and a point (then lost), with a bare [Errno 1]
    naming a temporary file. Refused before any measuring, naming the file and the fix."""
    grid = {**TINY, "methods": ("euclidean",), "kernels": ("structured",)}
    sw.sweep(sw.Grid(**grid), tmp_path, measure=known, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    measured = []

    def measure(run, grid):
        measured.append(run)
        return known_time_row(run)

    def rates(device, dtype):
        measured.append(device)
        return {kind: [1e9] for kind in RATE_KINDS}

    wider = sw.Grid(**{**grid, "axes": {**grid["axes"], "width": (4, 6, 8)}})
    message = f"cannot write {tmp_path / name} (.*): make it writable .* or pass another --out"
    with unwritable(tmp_path / name), pytest.raises(OSError, match=message):
        sw.sweep(wider, tmp_path, measure=measure, rates=rates, progress=False)
    assert measured == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("held", ["unwritable", "locked"])
def test_the_sweep_command_refuses_an_unwritable_or_locked_out_before_its_cluster(
    tmp_path, capsys, monkeypatch, held
):
    """As above, before the command starts the cluster of its points (tens of seconds);
    and a directory another sweep writes into (found by review: refused once its cluster
    had started, 4 s)."""
    from riemann_core import cli

    grid = {**TINY, "methods": ("euclidean",), "kernels": ("structured",)}
    sw.sweep(sw.Grid(**grid), tmp_path, measure=known, progress=False)

    @contextlib.contextmanager
    def cluster(args):
        raise AssertionError("a cluster was started")
        yield

    monkeypatch.setattr("riemann_core.scaling.commands.points_runner", cluster)
    options = ["--widths", "4,6,8", "--depths", "1,2", "--out-dims", "3", "--batches", "2,4"]
    options += ["--base", "4,1,3,4", "--repeats", "1", "--methods", "euclidean"]
    if held == "unwritable":
        context, message = unwritable(tmp_path / "results.csv"), f"cannot write {tmp_path}"
    else:
        context, message = (
            sw.writing(tmp_path),
            f"another riemann-bench sweep is writing into {tmp_path}",
        )
    with context:
        code = cli.main(["sweep", "--quick", "--out", str(tmp_path), *options])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("full", ["out", "file system"])
def test_a_sweep_that_cannot_write_after_it_measured_keeps_its_rows_to_resume(
    tmp_path, monkeypatch, full
):
    """Found by review: a write that failed after measuring (a full disk) broke the sweep
    off, and the points it had measured since its last write were lost (all of them, with
    the retimed lines, when the last write fails). They are kept, with the record, beside
    ``--out`` or else in the temporary directory, which the error names with how to put
    them back; ``--out`` is left as last written."""
    grid = {**TINY, "methods": ("euclidean",), "kernels": ("structured",)}
    disk = tmp_path / "disk"
    out, elsewhere = disk / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    sw.sweep(sw.Grid(**grid), out, measure=known, progress=False, meta={"command": "first"})
    wider = sw.Grid(**{**grid, "axes": {**grid["axes"], "width": (4, 6, 8, 12)}})
    write, writes = sw.write_atomic, []

    def filling(path, text):  # full after the first new point's row
        writes.append(path)
        if writes.count(out / "results.csv") > 1 and path.is_relative_to(
            out if full == "out" else disk
        ):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, text)

    monkeypatch.setattr(sw, "write_atomic", filling)
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    with pytest.raises(OSError, match=f"cannot write {out / 'results.csv'} .No space") as err:
        sw.sweep(wider, out, measure=known, progress=False, meta={"command": "second"})
    monkeypatch.undo()
    (kept,) = (disk if full == "out" else elsewhere).glob("*unsaved-*")
    message = str(err.value)
    assert str(kept) in message and f"run `{sw.with_out('second', out)}` to resume" in message
    everything = {sw.key_of(run) for run in wider.runs()}
    assert {sw.key_of(r) for r in sw.read_results(kept / "results.csv")} == everything
    on_disk = {sw.key_of(r) for r in sw.read_results(out / "results.csv")}
    assert len(everything - on_disk) == 1  # the point whose row could not be written
    for name in ("results.csv", "sweep.json"):  # as the error says
        os.replace(kept / name, out / name)
    result = sw.sweep(wider, out, measure=known, progress=False, meta={"command": "second"})
    assert (result.measured, result.resumed) == (0, len(everything))


def test_a_sweep_whose_last_write_fails_is_not_recorded_finished(tmp_path, monkeypatch):
    """Found by review: a full disk at the last write, of the rows whose lines were timed
    again, left sweep.json saying the sweep finished beside rows without those times (the
    analysis then read it as finished). It says so once the rows are written; the rows,
    with those times, are kept elsewhere, to resume from."""
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",), "kernels": ("structured",)})
    retimed = []

    def retime(lines, grid, device):
        retimed.append(lines)
        times = [1e-3] * 3 * sw.LINE_ROUNDS_PER_REPEAT
        keys = ("time_median_s", "time_iqr_s", "times_s", "spread", "stretches")
        timing = dict(zip(keys, (1e-3, 0.0, json.dumps(times), 0.0, 1), strict=True))
        return [{**run, **timing} for line in lines for run in line]

    write = sw.write_atomic

    def full_once_retimed(path, text):  # the rows, larger than the record, do not fit
        if retimed and path == tmp_path / "out" / "results.csv":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, text)

    monkeypatch.setattr(sw, "write_atomic", full_once_retimed)
    with pytest.raises(OSError, match="No space left on device.*are kept"):
        sw.sweep(grid, tmp_path / "out", measure=known, retime=retime, progress=False)
    monkeypatch.undo()
    assert retimed
    assert sw.read_record(tmp_path / "out" / "sweep.json")["finished"] is False
    (kept,) = tmp_path.glob("out-unsaved-*")
    assert not any(r["interleaved"] for r in sw.read_results(tmp_path / "out" / "results.csv"))
    assert any(r["interleaved"] for r in sw.read_results(kept / "results.csv"))


def test_a_resume_grows_again_through_a_grown_point_that_was_lost(tmp_path):
    """Found by review of the fix above: it kept every failed point outside the grid, grown
    ones too, and growth then stopped at the lost point for good."""
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",), "grow": {"width": 48}})
    victim = sw.key_of({**next(grid.runs()), "width": 24})

    class LosesWidth24:
        placed = False

        def __call__(self, task, runs):
            for run in runs:
                lost = sw.key_of(run) == victim
                yield run, sw.PointLost("planted: its worker died") if lost else task(run)

    def measure(run, grid):
        return known_time_row(run)

    def widths(result):
        on_line = [r for r in result.rows if int(r["depth"]) == 1 and int(r["batch"]) == 4]
        return sorted((int(r["width"]), r["status"]) for r in on_line)

    first = sw.sweep(grid, tmp_path / "a", runner=LosesWidth24(), measure=measure, progress=False)
    assert (24, "error") in widths(first)
    again = sw.sweep(grid, tmp_path / "a", measure=measure, progress=False)
    whole = sw.sweep(grid, tmp_path / "b", measure=measure, progress=False)
    assert widths(again) == widths(whole) and (48, "ok") in widths(again)


def test_points_measured_again_as_outliers_are_counted_once(tmp_path, monkeypatch):
    """Found by review: a sweep reported 34 points measured where its file held 32 (two
    outliers measured again were counted twice), and a resumed point measured again was
    counted as measured and as already there."""
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",)})
    sw.sweep(grid, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(grow, "is_outlier", lambda rows, row: True)
    result = sw.sweep(grid, tmp_path / "fresh", progress=False)
    points = len(rows_of(tmp_path / "fresh" / "results.csv"))
    assert result.measured == points == len(list(grid.runs()))
    assert result.again == points  # every point taken for an outlier
    resumed = sw.sweep(grid, tmp_path / "resumed", progress=False)  # again, none anew
    assert (resumed.measured, resumed.resumed, resumed.again) == (0, points, points)


def test_an_outlier_retimed_for_its_spread_is_still_measured_again(tmp_path):
    """Found by review: a point whose repeats spread (re-timed at once, ``remeasured=1``)
    was taken for an outlier measured again already, so a slow spell there was neither
    measured again nor flagged. Measured again, and flagged where it stays far off."""
    calls = []

    def spiky(run, grid):
        calls.append(run["width"])
        row = known_time_row(run, slower=3.0 if run["width"] == 6 else 1.0)
        if run["width"] == 6 and run["method"] == "euclidean" and calls.count(6) == 1:
            row.update(flag="spread", remeasured=1)  # what measure_point writes
        return row

    grid = {**TINY, "methods": ("euclidean",), "kernels": ("structured",)}
    grid["axes"] = {**TINY["axes"], "width": (4, 6, 8)}
    sw.sweep(sw.Grid(**grid), tmp_path, measure=spiky, progress=False)
    assert calls.count(6) == 2
    (row,) = [r for r in rows_of(tmp_path / "results.csv") if r["width"] == "6"]
    assert (row["remeasured"], row["flag"]) == ("1", "outlier")
    sw.sweep(sw.Grid(**grid), tmp_path, measure=spiky, progress=False)
    assert calls.count(6) == 2  # a resume does not measure a flagged outlier once more


def test_a_sweep_on_cpu_0_reads_its_own_rows_back(tmp_path):
    """Found by review: the row check took only cpu, cuda and cuda:N for a device."""
    grid = {**TINY, "methods": ("euclidean",), "kernels": ("structured",), "devices": ("cpu:0",)}
    sw.sweep(sw.Grid(**grid), tmp_path, progress=False)
    assert {r["device"] for r in sw.read_results(tmp_path / "results.csv")} == {"cpu:0"}


def test_a_sweep_reads_back_times_longer_than_the_csv_modules_field_limit(tmp_path):
    """Found by a hunt: at --repeats 10500 a point's times took 135341 characters, past the
    csv module's 131072, and the sweep could not read its own file to resume, fit or
    report. The limit is raised for the read alone."""
    grid = {**TINY, "methods": ("euclidean",), "kernels": ("structured",)}
    sw.sweep(sw.Grid(**grid), tmp_path, progress=False)
    path = tmp_path / "results.csv"
    rows = rows_of(path)
    median = float(rows[0]["time_median_s"])  # repeated past the limit, however it prints
    repeats = csv.field_size_limit() // (len(json.dumps(median)) + 2) + 100
    rows[0]["times_s"] = json.dumps([median] * repeats)
    rows[0]["time_iqr_s"] = "0.0"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    limit = csv.field_size_limit()
    assert len(rows[0]["times_s"]) > limit
    assert len(sw.read_results(path)) == len(rows)
    assert csv.field_size_limit() == limit


@pytest.mark.parametrize("name", ["results.csv", "sweep.json"])
def test_a_directory_where_a_record_belongs_is_named(tmp_path, name):
    """Found by a hunt: a directory named results.csv read as no results (and a sweep gave
    a bare "[Errno 21]"); sweep.json as a directory was called missing."""
    grid = {**TINY, "methods": ("euclidean",), "kernels": ("structured",)}
    (tmp_path / name).mkdir()
    with pytest.raises(sw.ResultsFileError, match=f"{name} is not a file.*move it away"):
        sw.sweep(sw.Grid(**grid), tmp_path, progress=False)


def test_measure_point_is_a_pure_function_of_its_arguments():
    grid = sw.Grid(**{**TINY, "methods": ("layerwise",), "output_metric": "sampled"})
    run = next(grid.runs())
    state = torch.random.get_rng_state()
    first, second = sw.measure_point(run, grid), sw.measure_point(run, grid)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first["status"] == "ok"  # every column but where it ran (worker.measure_here's)
    assert list(first) == [c for c in sw.COLUMNS if c not in sw.WHERE]
    for column in ("flops", *(f"flops_{k}" for k in KINDS), "sol_products", "n_params"):
        assert first[column] == second[column]


def test_memory_is_measured_after_a_warm_up_call(monkeypatch):
    """Found by review: on the host the memory was measured on a point's first call, which
    on a new model runs the one-time check that it treats samples independently (80 MiB
    against a model of 0.05 MiB at the first point of a process)."""
    calls, measured_after = [], []
    real = sw._direction_call

    def counted(*args):
        call = real(*args)
        return lambda: (calls.append(1), call())[1]

    def peak(fn):
        measured_after.append(len(calls))
        fn()
        return 1

    monkeypatch.setattr(sw, "_direction_call", counted)
    monkeypatch.setattr(sw, "host_peak_bytes", peak)
    grid = sw.Grid(**{**TINY, "methods": ("layerwise",)})
    assert sw.measure_point(next(grid.runs()), grid)["peak_bytes"] == 1
    assert measured_after == [1]


def test_repeats_that_spread_are_timed_once_more(monkeypatch):
    timings = iter([Timing(1.0, 0.5, (0.5, 1.0, 1.5)), Timing(1.0, 0.1, (0.95, 1.0, 1.05))])
    monkeypatch.setattr(sw, "measure", lambda *a, **k: next(timings))
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",)})
    row = sw.measure_point(next(grid.runs()), grid)
    assert (row["remeasured"], row["flag"], row["spread"]) == (1, "", pytest.approx(0.1))
    assert row["times_s"] == "[0.95, 1.0, 1.05]"


def test_repeats_that_still_spread_are_flagged(monkeypatch):
    monkeypatch.setattr(sw, "measure", lambda *a, **k: Timing(1.0, 0.5, (0.5, 1.0, 1.5)))
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",)})
    row = sw.measure_point(next(grid.runs()), grid)
    assert (row["remeasured"], row["flag"]) == (1, "spread")


#: readings of the load around a point's repeats (measure.load.point_load): another
#: process keeping one of two CPUs busy, and a quiet machine
LOADED = {"outside_cores": 1.0, "cpus_read": 2, "cores_read": 2, "rounding_cores": 0.05}
QUIET = {**LOADED, "outside_cores": 0.02}


def fake_loads(monkeypatch, readings):
    """Have the sweep read ``readings`` (an iterable) around its timed blocks, in turn;
    the readings taken, as they were filled, in the list returned."""
    taken, queue = [], iter(readings)

    @contextlib.contextmanager
    def point_load():
        reading = {}
        yield reading
        reading.update(next(queue))
        taken.append(reading)

    monkeypatch.setattr(sw, "point_load", point_load)
    return taken


@pytest.mark.parametrize(
    "readings,remeasured,flag",
    [((LOADED, LOADED), 1, "loaded"), ((LOADED, QUIET), 1, ""), ((QUIET,), 0, "")],
    ids=["loaded-twice", "loaded-once", "quiet"],
)
def test_a_point_timed_while_other_processes_took_its_cpus_is_timed_again(
    monkeypatch, readings, remeasured, flag
):
    """Found by review: the load was read only around the sweep's three measurements of
    the rates, and a load during the points showed only where it spread their repeats (one
    that slows every repeat alike does not). Read around a point's repeats: where other
    processes kept busy more CPUs than its threads left free, it is timed once more, and
    flagged ``loaded`` where that reads loaded too."""
    steady = Timing(1.0, 0.01, (0.99, 1.0, 1.01))  # repeats that do not spread
    timings = []
    monkeypatch.setattr(sw, "measure", lambda *a, **k: (timings.append(k), steady)[1])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the point's: no CPU left free
    taken = fake_loads(monkeypatch, readings)
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",)})
    row = sw.measure_point(next(grid.runs()), grid)
    assert (row["remeasured"], row["flag"]) == (remeasured, flag)
    assert len(timings) == len(taken) == len(readings)
    assert [t["warmup"] for t in timings] == [grid.warmup, 0][: len(readings)]


def test_a_point_is_judged_loaded_on_the_threads_it_ran():
    """One CPU kept busy of two is free for a point on one thread (torch's threads in the
    process that times it), not for one on two."""
    for threads, loaded in ((1, False), (2, True)):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
            fake_loads(patch, [LOADED, LOADED])
            patch.setattr(sw, "measure", lambda *a, **k: Timing(1.0, 0.0, (1.0,)))
            grid = sw.Grid(**{**TINY, "methods": ("euclidean",)})
            row = sw.measure_point(next(grid.runs()), grid)
        assert (row["flag"] == "loaded") == loaded and row["remeasured"] == int(loaded)


def test_a_point_on_a_gpu_is_not_judged_by_the_host_s_load(monkeypatch):
    """A GPU's times are its own: the host's load is not read around its points."""
    taken = fake_loads(monkeypatch, [LOADED, LOADED])
    monkeypatch.setattr(sw, "_direction_call", lambda run, grid, device: lambda: None)
    monkeypatch.setattr(sw, "cuda_peak_bytes", lambda call, device: 1)
    monkeypatch.setattr(sw, "measure", lambda *a, **k: Timing(1.0, 0.0, (1.0,)))
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",)})
    row = sw.measure_point({**next(grid.runs()), "device": "cuda"}, grid)
    assert (row["status"], row["flag"], row["remeasured"]) == ("ok", "", 0)
    assert taken == []


@pytest.mark.skipif(
    not os.path.isfile("/proc/stat") or not 1 <= len(os.sched_getaffinity(0)) <= 8,
    reason="Linux, up to 8 CPUs: enough spinning processes to pass the slack",
)
def test_processes_spinning_beside_a_point_s_repeats_read_loaded(monkeypatch):
    """A real reading: while a point's repeats run (here they wait, leaving the CPUs to
    others), processes spinning on more CPUs than the slack, where the point's threads use
    every core, read loaded (more so where the machine is loaded already)."""
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: cpus)  # no core left free
    spin = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 10: pass"
    spinners = [
        subprocess.Popen([sys.executable, "-c", spin]) for _ in range(1 + math.ceil(cpus / 8))
    ]
    try:
        time.sleep(0.5)  # started
        _, loaded = sw.timed(lambda: time.sleep(0.05), 10, 0, torch.device("cpu"))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert loaded


def test_the_results_reader_takes_the_word_loaded_and_refuses_a_corrupted_one(tmp_path):
    sw.sweep(sw.Grid(**{**TINY, "methods": ("euclidean",)}), tmp_path, progress=False)
    path = tmp_path / "results.csv"
    rows = rows_of(path)

    def with_flag(flag):
        rows[0]["flag"] = flag
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    for flag in ("loaded", "outlier loaded", "spread loaded"):
        with_flag(flag)
        assert sw.read_results(path)[0]["flag"] == flag
    with_flag("loadedd")
    with pytest.raises(sw.ResultsFileError, match=r"flag holds \['loadedd'\]"):
        sw.read_results(path)


def test_an_outlier_measured_again_under_load_keeps_the_word(tmp_path):
    """Measured again, an outlier's flag says ``outlier`` (not ``spread``), and ``loaded``
    where the load read around those very times was (measure_point's reading)."""
    calls = []

    def loaded_spike(run, grid):
        calls.append(run["width"])
        row = known_time_row(run, slower=3.0 if run["width"] == 6 else 1.0)
        if run["width"] == 6:
            row.update(flag="spread loaded" if calls.count(6) == 2 else "", remeasured=1)
        return row

    grid = {**TINY, "methods": ("euclidean",), "kernels": ("structured",)}
    grid["axes"] = {**TINY["axes"], "width": (4, 6, 8)}
    sw.sweep(sw.Grid(**grid), tmp_path, measure=loaded_spike, progress=False)
    assert calls.count(6) == 2
    (row,) = [r for r in rows_of(tmp_path / "results.csv") if r["width"] == "6"]
    assert (row["remeasured"], row["flag"]) == ("1", "outlier loaded")


def test_lines_timed_again_read_the_load_around_each_of_their_stretches(monkeypatch):
    """The times of a line timed again are not those its points' own readings were taken
    around: each stretch of a line's rounds is read, and the line is loaded where one of
    them is (on the threads torch runs)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",), "kernels": ("structured",)})
    run = next(grid.runs())
    depth_line = [{**run, "depth": depth} for depth in (1, 2, 3)]  # two stretches
    top_pair = [{**run, "width": width} for width in (4, 6)]  # one
    # in order: the depth line's first stretch, the pair, the depth line's second stretch
    taken = fake_loads(monkeypatch, [QUIET, QUIET, LOADED])
    timed = sw.time_lines([depth_line, top_pair], grid, torch.device("cpu"))
    assert len(taken) == 3
    assert [r["loaded"] for r in timed] == [True] * 3 + [False] * 2


def instant_call(run, grid, device):
    """A call of ``run`` for the lines timed again that returns at once (or, for the
    method ``unknown``, raises)."""

    def call():
        if run["method"] == "unknown":
            raise ValueError("unknown method")

    return call


def test_lines_timed_again_report_each_stretch_done_between_the_timed_rounds(monkeypatch):
    """``progress(done, total)`` counts the stretches of all lines: 0 first, then one after
    each line's stretch, never within its timed rounds; a line that fails counts its
    stretches to come done with it, so the count still ends at the total."""
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",), "kernels": ("structured",)})
    run = next(grid.runs())
    broken = [{**run, "method": "unknown", "depth": depth} for depth in (1, 2, 3)]  # two
    depth_line = [{**run, "depth": depth} for depth in (1, 2, 3)]  # two stretches
    top_pair = [{**run, "width": width} for width in (4, 6)]  # one
    events = []
    timed = sw.interleaved

    def interleaved(*args, **kwargs):
        events.append("timed")
        return timed(*args, **kwargs)

    monkeypatch.setattr(sw, "interleaved", interleaved)
    monkeypatch.setattr(sw, "_direction_call", instant_call)
    rows = sw.time_lines(
        [broken, depth_line, top_pair],
        grid,
        torch.device("cpu"),
        progress=lambda done, total: events.append((done, total)),
    )
    assert events == [(0, 5), "timed", (2, 5), "timed", (3, 5), "timed", (4, 5), "timed", (5, 5)]
    assert ["error" in row for row in rows] == [True] * 3 + [False] * 5


def test_the_lines_timed_again_and_the_rates_show_bars_of_what_is_done(tmp_path, monkeypatch):
    """Found in use: after the sweep's bar ended, ``riemann-bench run`` printed nothing for
    4-8 minutes (the default CPU grid) while the lines were timed again, nor for the half
    minute of each measurement of the rates. Each now has a bar of the steps done, which
    ends full; none with ``progress=False``."""
    bars = recorded_bars(monkeypatch)
    monkeypatch.setattr(sw, "_direction_call", instant_call)
    axes = {**TINY["axes"], "depth": (1, 2, 3)}
    grid = sw.Grid(**{**TINY, "axes": axes, "methods": ("euclidean",), "kernels": ("structured",)})
    options = dict(
        measure=lambda run, grid: known_time_row(run),
        rates=lambda device, dtype: {kind: [1e9] for kind in RATE_KINDS},
        retime=sw.time_lines,
    )
    result = sw.sweep(grid, tmp_path / "shown", **options)
    assert result.retimed == 5  # one group: the depth line and the top pairs
    shown = {desc: (n, total) for desc, n, total in bars if desc != "sweep"}
    assert shown == {
        "device rates before the points": (1, 1),
        "device rates after the grid": (1, 1),
        "lines timed again": (sw.LINE_STRETCHES, sw.LINE_STRETCHES),
        "device rates at the end": (1, 1),
    }
    bars.clear()
    sw.sweep(grid, tmp_path / "quiet", progress=False, **options)
    assert bars == []


def test_a_retime_of_three_arguments_times_the_lines_without_a_bar(tmp_path, monkeypatch):
    """Found by review: ``retime(lines, grid, device)``, as :func:`sweep` documented it
    before the lines had a bar, was called with ``progress=`` (the default bars) and the
    sweep ended in a ``TypeError`` after its points, its lines untimed. It times them,
    without a bar."""
    bars = recorded_bars(monkeypatch)
    monkeypatch.setattr(sw, "_direction_call", instant_call)
    axes = {**TINY["axes"], "depth": (1, 2, 3)}
    grid = sw.Grid(**{**TINY, "axes": axes, "methods": ("euclidean",), "kernels": ("structured",)})

    def retime(lines, grid, device):
        return sw.time_lines(lines, grid, device)

    result = sw.sweep(grid, tmp_path, measure=lambda run, grid: known_time_row(run), retime=retime)
    assert result.retimed == 5
    assert [desc for desc, _, _ in bars] == ["sweep"]


def test_a_bar_that_fails_to_draw_warns_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """Found by review: a bar of the lines or of the rates that failed to draw (stderr
    gone) raised between the lines' stretches and ended the sweep, its lines untimed and
    its rates at the end unmeasured. The bar warns once and stops; the measuring goes on."""
    import tqdm

    class Broken(tqdm.tqdm):
        def refresh(self, *args, **kwargs):
            if self.desc != "sweep":
                raise BrokenPipeError(32, "Broken pipe")
            return super().refresh(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Broken)
    monkeypatch.setattr(sw, "_direction_call", instant_call)
    axes = {**TINY["axes"], "depth": (1, 2, 3)}
    grid = sw.Grid(**{**TINY, "axes": axes, "methods": ("euclidean",), "kernels": ("structured",)})
    with pytest.warns(UserWarning, match="stopped drawing") as caught:
        result = sw.sweep(
            grid,
            tmp_path,
            measure=lambda run, grid: known_time_row(run),
            rates=lambda device, dtype: {kind: [1e9] for kind in RATE_KINDS},
            retime=sw.time_lines,
        )
    assert result.retimed == 5
    stopped = [str(w.message) for w in caught if "stopped drawing" in str(w.message)]
    assert len(stopped) == 4  # once a bar: the lines' and each measurement of the rates'
    (device,) = json.loads((tmp_path / "sweep.json").read_text())["devices"].values()
    assert [r["when"] for r in device["device_rates"]] == ["start", "grid", "end"]


def test_a_line_timed_again_under_load_is_flagged_loaded(tmp_path, monkeypatch):
    """The flags of the points of a line timed again are decided for their new times:
    ``loaded`` where the reading around the line's rounds was, whatever their own
    measurement read."""
    fake_loads(monkeypatch, itertools.repeat(QUIET))  # the points' own: quiet
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",), "kernels": ("structured",)})

    def retime(lines, grid, device):  # the widest point's line loaded, the others quiet
        timed = []
        for line in lines:
            for run in line:
                timing = sw.timing_of([1e-3] * 6)
                timed.append(
                    {
                        **run,
                        "time_median_s": timing.median,
                        "time_iqr_s": timing.iqr,
                        "times_s": json.dumps(list(timing.times)),
                        "spread": sw.spread_of(timing),
                        "stretches": 1,
                        "loaded": run["width"] == 6,
                    }
                )
        return timed

    sw.sweep(grid, tmp_path, progress=False, retime=retime)
    rows = sw.read_results(tmp_path / "results.csv")
    timed = [r for r in rows if r["interleaved"]]
    assert {r["width"] for r in timed} == {"4", "6"}
    for row in rows:
        assert ("loaded" in row["flag"].split()) == (row["width"] == "6" and row in timed)


def synthetic_rows(overhead, widths=(4, 8, 16), statuses=None):
    """A sweep of one method along width (depth 1) and depth (width 4, the base point):
    FLOPs ``1e3 w^2 depth`` at 1 GFLOP/s after ``overhead`` seconds."""
    grid = sw.Grid(**{**TINY, "methods": ("layerwise",), "kernels": ("structured",)})
    points = [(w, 1) for w in widths] + [(4, depth) for depth in (2, 3)]
    rows = []
    for w, depth in points:
        run = {**next(grid.runs()), "width": w, "depth": depth}
        t = overhead + 1e-6 * w * w * depth
        row = {**run, "time_median_s": t, "times_s": json.dumps([t]), "status": "ok"}
        row.update({f"flops_{k}": 0.0 for k in KINDS}, flops=1e3 * w * w * depth)
        row.update(flops_products=1e3 * w * w * depth, reason="", remeasured=0)
        rows.append(row)
    for w, status in (statuses or {}).items():
        rows.append({**rows[0], "width": w, "status": status, "reason": f"planted {status}"})
    return grid, rows


@pytest.mark.parametrize(
    "overhead, changes, decision",
    [
        (1e-3, {}, "growing to width=32"),
        (1e-6, {}, "reached: width: time ~ work^1"),
        (1e-3, {"grow": {"width": 16}}, "stopped at the cap width=16"),
        (1e-3, {"time_budget_s": 1e-3}, "over the time budget"),
        (
            1e-3,
            {"statuses": {32: "skipped"}},
            "stopped at width=32 (measured up to width=16): planted skipped",
        ),
    ],
    ids=["overhead-dominates", "compute-bound", "cap", "budget", "budget-skipped"],
)
def test_growth_doubles_an_axis_while_the_overhead_dominates(overhead, changes, decision):
    statuses = changes.pop("statuses", None)
    grid, rows = synthetic_rows(overhead, statuses=statuses)
    grid = sw.Grid(**{**TINY, "methods": ("layerwise",), "grow": {"width": 64}, **changes})
    plan = grow.plan(rows, grid, elapsed=0.0)
    assert decision in plan.decisions["layerwise/structured/width"]
    grown = decision.startswith("growing")
    assert [r["width"] for r in plan.runs] == ([32] if grown else [])


def test_growth_stopped_by_skipped_points_names_the_first_of_them():
    """Found by an audit: full's width axis, measured up to 48, its 64 skipped for the FLOP
    budget and 128-512 for memory, read "stopped at width=512: modelled peak 1049 GiB". The
    first point not measured above the last measured one is named; with none measured, the
    smallest."""
    grid, rows = synthetic_rows(1e-3, statuses={32: "skipped", 64: "skipped"})
    for row in rows[-2:]:
        row["reason"] = f"too large at {row['width']}"
    grid = sw.Grid(**{**TINY, "methods": ("layerwise",), "grow": {"width": 128}})
    decision = grow.plan(rows, grid, elapsed=0.0).decisions["layerwise/structured/width"]
    assert decision == "stopped at width=32 (measured up to width=16): too large at 32"
    for row in rows:
        if row["depth"] == 1:
            row.update(status="skipped", reason=f"too large at {row['width']}")
    decision = grow.plan(rows, grid, elapsed=0.0).decisions["layerwise/structured/width"]
    assert decision == "stopped at width=4 (no point measured): too large at 4"


def test_growth_judges_the_regime_without_points_that_took_a_slow_path():
    """As the claims do (found by review: two slow-path points at the top, each 50x its
    cost model's time, read as compute-bound and growing like the work: "reached"). A top
    point that took one stops the axis (found by review: every point grown past it took
    one too, no claim could use them, and the sweep overran its time budget 7.5x)."""
    grid, rows = synthetic_rows(1e-3, widths=(4, 8, 16, 32))
    rows = [{**r, "slow_paths": ""} for r in rows]
    rows[2].update(slow_paths="residual", time_median_s=50 * rows[2]["time_median_s"])  # 16
    grid = sw.Grid(**{**TINY, "methods": ("layerwise",), "grow": {"width": 256}})
    plan = grow.plan(rows, grid, elapsed=0.0)
    assert plan.decisions["layerwise/structured/width"].startswith("growing to width=64")
    assert [r["width"] for r in plan.runs] == [64]
    rows[3].update(slow_paths="refine residual")  # 32, the top
    plan = grow.plan(rows, grid, elapsed=0.0)
    assert plan.decisions["layerwise/structured/width"] == (
        "stopped at width=32: it took a slow path (refine residual), whose time the claims "
        "leave out, and a larger point would most likely take it too"
    )
    assert plan.runs == []


def test_an_axis_without_a_time_model_says_why_it_did_not_grow():
    """Found by review: too few points for a time model, and growth was skipped silently
    (the verdicts then blamed the budgets)."""
    grid, rows = synthetic_rows(1e-3, widths=(4,))
    grid = sw.Grid(**{**TINY, "methods": ("layerwise",), "grow": {"width": 64}})
    plan = grow.plan(rows[:2], grid, elapsed=0.0)
    assert (
        "not grown: no time model of layerwise (structured) (too few ok points"
        in plan.decisions["layerwise/structured/width"]
    )
    assert plan.runs == []
    _, rows = synthetic_rows(1e-3, widths=(4,), statuses={8: "skipped"})  # the budget first
    plan = grow.plan([rows[0], rows[-1]], grid, elapsed=0.0)
    assert (
        plan.decisions["layerwise/structured/width"]
        == "stopped at width=8 (measured up to width=4): planted skipped"
    )


def test_workers_on_one_kind_of_device_may_run_on_hosts_that_differ():
    """A cluster's workers with one device name on hosts of other CPUs or thread counts
    (found by review: a fresh sweep stopped after its first row); only resuming under
    another environment is refused, see above."""
    devices = {}
    for host, threads in (("a", 8), ("b", 16)):
        record = {"device_name": "GPU X", "host": host, "physical_device": "cuda:0"}
        sw.add_device(devices, {**record, "environment": {"threads": threads}})
    assert devices["GPU X"]["workers"] == ["a cuda:0", "b cuda:0"]


def test_growth_stops_where_another_kind_of_device_measured_the_next_point():
    _, rows = synthetic_rows(1e-3)  # would grow to width 32
    rows = [{**r, "device_name": "GPU A"} for r in rows]
    rows.append({**rows[0], "width": 32, "device_name": "GPU B"})
    grid = sw.Grid(**{**TINY, "methods": ("layerwise",), "grow": {"width": 64}})
    plan = grow.plan(rows, grid, elapsed=0.0)
    decision = plan.decisions["layerwise/structured/width on GPU A"]
    assert decision.startswith("stopped at width=16: width=32 was measured on GPU B")
    assert plan.runs == []  # a point is measured once, wherever it ran


def test_a_median_far_from_both_neighbours_is_an_outlier():
    grid, rows = synthetic_rows(1e-3, widths=(4, 8, 16, 32, 64))
    assert grow.outliers(rows) == []
    rows[2]["time_median_s"] *= 3  # width 16: its neighbours look off too, but less
    assert [(r["width"], r["depth"]) for r in grow.outliers(rows)] == [(16, 1)]


def test_a_sweep_grows_its_axes_and_records_why_it_stopped(tmp_path):
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",), "grow": {"width": 12}, "repeats": 2})
    result = sw.sweep(grid, tmp_path, progress=False, rates=lambda device, dtype: {})
    widths = {int(r["width"]) for r in rows_of(tmp_path / "results.csv")}
    record = json.loads((tmp_path / "sweep.json").read_text())
    decision = record["growth"]["euclidean/structured/width"]
    assert result.growth == record["growth"]
    assert record["growth_rule"] == grow.rule(grid.overhead_target)  # the rule it grew by
    # widths 4 and 6, doubled to 12 while a plain gradient this small is all overhead
    assert (widths == {4, 6, 12} and "stopped at the cap" in decision) or (
        decision.startswith("reached") and widths <= {4, 6, 12}
    )
    (device,) = record["devices"].values()
    assert [s["when"] for s in device["device_rates"]] == ["start", "grid", "end"]


@pytest.mark.parametrize("old_rule", ["Width grew by the rule of an earlier version.", None])
def test_a_resume_records_the_rule_of_the_growth_decisions_it_kept(tmp_path, old_rule):
    """Found by review: a resume of other methods by a later version kept the decisions of
    the methods it did not measure and recorded its own rule as the one they grew by."""
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",), "grow": {"width": 8}})
    sw.sweep(grid, tmp_path, progress=False)
    recorded = json.loads((tmp_path / "sweep.json").read_text())
    recorded.pop("growth_rule")
    if old_rule is not None:  # (else a version that recorded none)
        recorded["growth_rule"] = old_rule
    (tmp_path / "sweep.json").write_text(json.dumps(recorded))
    other = sw.Grid(**{**TINY, "methods": ("layerwise",), "grow": {"width": 8}})
    sw.sweep(other, tmp_path, progress=False)
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["growth_rule"] == grow.rule(other.overhead_target)
    assert record["earlier_growth_rules"] == {"euclidean/structured/width": old_rule}
    assert {"euclidean/structured/width", "layerwise/structured/width"} <= set(record["growth"])
    # rerun by this version, they grow by its rule again
    sw.sweep(grid, tmp_path, progress=False)
    assert "earlier_growth_rules" not in json.loads((tmp_path / "sweep.json").read_text())


class Killed(BaseException):
    """The sweep's process killed, as far as its loop can tell."""


def test_a_sweep_killed_during_growth_resumes_its_growth(tmp_path):
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",), "grow": {"width": 48}})
    victim = sw.key_of({**next(grid.runs()), "width": 24})

    def killed_at_width_24(run, grid):
        if sw.key_of(run) == victim:
            raise Killed
        return known_time_row(run)

    with pytest.raises(Killed):
        sw.sweep(grid, tmp_path / "killed", measure=killed_at_width_24, progress=False)
    before = rows_of(tmp_path / "killed" / "results.csv")
    assert {int(r["width"]) for r in before} == {4, 6, 12}  # grown once, killed in the next
    resumed = sw.sweep(
        grid, tmp_path / "killed", measure=lambda r, g: known_time_row(r), progress=False
    )
    whole = sw.sweep(
        grid, tmp_path / "whole", measure=lambda r, g: known_time_row(r), progress=False
    )
    assert resumed.resumed == len(before) and resumed.measured == 2  # widths 24 and 48
    assert [sw.key_of(r) for r in resumed.rows] == [sw.key_of(r) for r in whole.rows]
    assert resumed.growth == whole.growth
    assert "stopped at the cap width=48" in whole.growth["euclidean/structured/width"]


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

    rates = functools.partial(device_rates, n=64, repeats=1)
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",), "dtypes": ("float64",)})
    sw.sweep(grid, tmp_path, progress=False, rates=rates)
    rows = rows_of(tmp_path / "results.csv")
    here = physical_device(torch.device("cpu"))  # cpu (pinned, or a container: its cores)
    assert {(r["host"], r["device_name"], r["physical_device"]) for r in rows} == {
        (socket.gethostname(), device_name("cpu"), here)
    }
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert {r["sweep"] for r in rows} == {meta["sweep"]} and len(meta["sweep"]) == 32
    assert "device_rates" not in meta and "environment" not in meta  # per device only
    record = meta["devices"][device_name("cpu")]
    worker = f"{socket.gethostname()} {here}"
    assert record["workers"] == [worker] and record["environment"]["torch"]
    measured = [(r["when"], r["dtype"], r["worker"]) for r in record["device_rates"]]
    assert measured == [(w, d, worker) for w in ("start", "grid", "end") for d in grid.dtypes]
    assert all(len(r[k]) == 1 and r[k][0] > 0 for r in record["device_rates"] for k in RATE_KINDS)
    if Path("/proc/stat").is_file():  # the load of other processes, read around each
        cpus = len(os.sched_getaffinity(0))
        assert all(r["cpus_read"] == cpus for r in record["device_rates"])
        assert all(0 <= r["outside_cores"] <= cpus for r in record["device_rates"])
        assert all(1 <= r["cores_read"] <= cpus for r in record["device_rates"])


def test_results_written_before_rows_said_where_are_resumed(tmp_path):
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",)})
    sw.sweep(grid, tmp_path, progress=False)
    path = tmp_path / "results.csv"
    rows = rows_of(path)
    old = [c for c in sw.COLUMNS if c not in (*sw.WHERE, "sweep")]
    record = json.loads((tmp_path / "sweep.json").read_text())
    del record["sweep"]  # and its record, before sweeps had ids
    (tmp_path / "sweep.json").write_text(json.dumps(record))
    with path.open("w", newline="") as f:  # the columns of an older riemann-bench
        writer = csv.DictWriter(f, fieldnames=old, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows[:2])
    result = sw.sweep(grid, tmp_path, progress=False)
    assert result.resumed == 2 and result.measured == len(rows) - 2
    after = rows_of(path)
    assert [r["host"] for r in after[:2]] == ["", ""]
    assert all(r["host"] == socket.gethostname() for r in after[2:])
    # the rows written before sweeps had ids take the id the resumed sweep keeps
    assert {r["sweep"] for r in after} == {
        json.loads((tmp_path / "sweep.json").read_text())["sweep"]
    }


def test_the_depth_lines_and_top_pairs_through_the_base_are_the_ones_timed_again():
    """Per method and kernel, the ok points along depth with the other axes at the base (a
    line needs three), and the top two along width and along batch; lines that share a
    point are one group."""
    axes = {"width": (2, 3, 4), "depth": (1, 2, 3), "out_dim": (3,), "batch": (2, 4, 8)}
    grid = sw.Grid(**{**TINY, "axes": axes})  # base: width 4, depth 1, batch 4
    rows = [{**sw.blank_row(run), "status": "ok"} for run in grid.runs()]
    groups = sw.lines_to_interleave(rows, grid.base)
    assert len(groups) == len(grid.methods) + 1  # + layerwise with the generic kernel
    for axes_named, runs in groups:  # every line passes through the base point
        assert axes_named == "depth width batch"
        assert len({(r["method"], r["kernel"]) for r in runs}) == 1
        points = sorted((r["width"], r["depth"], r["batch"]) for r in runs)
        assert points == [(3, 1, 4), (4, 1, 4), (4, 1, 8), (4, 2, 4), (4, 3, 4)]
    # at the bottom of width and batch, the top pairs miss the base: three groups apart
    low = sw.Grid(**{**TINY, "axes": axes, "base": {**TINY["base"], "width": 2, "batch": 2}})
    rows_low = [{**sw.blank_row(run), "status": "ok"} for run in low.runs()]
    groups = sw.lines_to_interleave(rows_low, low.base)
    assert len(groups) == 3 * (len(grid.methods) + 1)
    for axes_named, runs in groups:
        along = [r[axes_named] for r in runs]
        assert along == ([1, 2, 3] if axes_named == "depth" else list(axes[axes_named][1:]))
    for r in rows:  # left: two ok points along depth, one along width and along batch
        if r["depth"] == 3 or r["width"] in (2, 3) or r["batch"] in (2, 8):
            r["status"] = "error"
    assert sw.lines_to_interleave(rows, grid.base) == []


def test_points_that_took_a_slow_path_are_not_timed_again():
    """The claims leave them out, so the top pair is the top two without one (found by
    review: the width pair timed again was two slow-path points, and the pair the claims
    judged was not)."""
    axes = {"width": (2, 3, 4), "depth": (1,), "out_dim": (3,), "batch": (4,)}
    grid = sw.Grid(**{**TINY, "axes": axes, "methods": ("layerwise",)})
    rows = [{**sw.blank_row(run), "status": "ok", "slow_paths": ""} for run in grid.runs()]
    for r in rows:
        if r["width"] == 4:
            r["slow_paths"] = "residual"
    groups = sw.lines_to_interleave(rows, grid.base)
    assert groups and {tuple(r["width"] for r in runs) for _, runs in groups} == {(2, 3)}


def test_a_row_of_any_status_with_stretches_not_a_count_is_refused(tmp_path):
    """Found by review: text in the stretches of a skipped row was accepted, and pandas
    then read the whole column as text: no depth line was judged by stretch."""
    run = next(sw.Grid(**TINY).runs())
    row = {**sw.blank_row(run), "status": "skipped", "reason": "over budget", "stretches": "two"}
    sw.write_results(tmp_path / "results.csv", [row])
    with pytest.raises(sw.ResultsFileError, match="stretches is 'two', not a positive integer"):
        sw.read_results(tmp_path / "results.csv")


def test_a_group_holding_a_depth_line_is_timed_in_stretches():
    """A depth line (three depths or more) is timed in LINE_STRETCHES stretches, whose
    agreement its claim judges; a top pair, or two depths, in one."""
    grid = sw.Grid(**{**TINY, "axes": {**TINY["axes"], "depth": (1, 2, 3)}})
    runs = [r for r in grid.runs() if r["method"] == "euclidean" and r["width"] == 4]
    line = [r for r in runs if r["batch"] == 4]
    assert [r["depth"] for r in line] == [1, 2, 3]
    assert sw.stretches_of(line) == sw.LINE_STRETCHES > 1
    assert sw.stretches_of(line[:2]) == 1
    pair = [r for r in grid.runs() if r["method"] == "euclidean" and r["depth"] == 1][-2:]
    assert sw.stretches_of(pair) == 1


def test_a_sweep_times_its_depth_lines_and_top_pairs_again_interleaved(tmp_path, monkeypatch):
    """With ``retime``, the rows of the depth lines and of the top pairs along width and
    batch take times from rounds in which every point of their group ran in turn (each
    right after an untimed call of its own), and flags
    for them; the other rows keep their own; a group whose point fails to run again keeps
    its first times, with a warning."""
    axes = {"width": (2, 4, 6), "depth": (1, 2, 3), "out_dim": (3,), "batch": (2, 4, 8)}
    grid = sw.Grid(**{**TINY, "axes": axes, "methods": ("layerwise",)})
    order = []
    real = sw._direction_call

    def recording(run, grid, device):
        call = real(run, grid, device)
        if run["kernel"] == "generic":
            raise RuntimeError("cannot build this line again")
        return lambda: (order.append((run["width"], run["depth"], run["batch"])), call())[1]

    sw.sweep(grid, tmp_path, progress=False)
    before = {sw.key_of(r): r for r in rows_of(tmp_path / "results.csv")}
    monkeypatch.setattr(sw, "_direction_call", recording)
    # a loaded machine's noise must not re-measure an outlier here (its new row would fail
    # to build, and its line drop out of the group: CI failed so once)
    monkeypatch.setattr(grow, "outliers", lambda rows: [])
    with pytest.warns(
        UserWarning, match=r"layerwise \(generic\) along depth, width, batch.*cannot"
    ):
        result = sw.sweep(grid, tmp_path, progress=False, retime=sw.time_lines)
    rows = {sw.key_of(r): r for r in rows_of(tmp_path / "results.csv")}
    group = [(4, 1, 4), (4, 2, 4), (4, 3, 4), (6, 1, 4), (4, 1, 8)]  # the base point first
    # a resume that measured nothing says how many times it replaced (found by a hunt)
    assert result.measured == 0 and result.retimed == sum(
        r["interleaved"] != "" for r in rows.values()
    )
    rounds = sw.LINE_ROUNDS_PER_REPEAT * grid.repeats  # after a warm-up, in each round every
    # point right after an untimed call of its own (found measuring: timed after the line's
    # largest point, the smallest read 25-30% high); a group holding a depth line in two
    # stretches, each with its warm-up
    stretch = group + [p for _ in range(rounds) for p in group for _ in (0, 1)]
    assert sw.stretches_of([sw.run_of(rows[k]) for k in rows if rows[k]["interleaved"]]) == 2
    assert order == stretch * sw.LINE_STRETCHES
    for key, row in rows.items():
        point = (int(row["width"]), int(row["depth"]), int(row["batch"]))
        timed_again = point in group and row["kernel"] == "structured"
        assert row["interleaved"] == ("depth width batch" if timed_again else "")
        assert (row["times_s"] == before[key]["times_s"]) != timed_again
        if timed_again:
            assert len(json.loads(row["times_s"])) == rounds * sw.LINE_STRETCHES
            assert row["stretches"] == str(sw.LINE_STRETCHES)
        assert row["host"] == socket.gethostname()
        flags = row["flag"].split()
        if timed_again and "outlier" not in flags:  # the flag is that of the new times
            assert ("spread" in flags) == (float(row["spread"]) > sw.SPREAD_LIMIT)
        if timed_again:  # (a loaded machine may slow one stretch: then flagged)
            apart = sw.stretch_spread(json.loads(row["times_s"]), int(row["stretches"]))
            assert ("stretches" in flags) == (apart > sw.SPREAD_LIMIT)


def test_the_committed_sweep_resumes_with_this_version():
    """``riemann-bench run`` on a fresh clone resumes ``reports/cpu``: its finished points
    follow this version's cost model and its record's grid. A change to the algorithms'
    counted FLOPs needs the committed sweep measured again (or the model kept)."""
    out = Path(__file__).resolve().parents[2] / "reports" / "cpu"
    rows = [r for r in sw.read_results(out / "results.csv") if r["status"] == "ok"]
    assert rows
    sw.check_same_model(rows, out / "results.csv")
    sw.check_rows_of_record(rows, sw.read_record(out / "sweep.json"), out)


def test_every_committed_row_records_this_versions_speed_of_light():
    """The sweep's ``sol_products`` and ``sol_cholesky`` are computed from the shape, at
    every row whatever its status (``rates.csv`` carries them, its ``counted_over_minimal``
    reads them): a review found the rewrite for the dense route's yardstick done at the ok
    rows alone, 3 skipped ones (full and generic layerwise at 128-wide batch 256, 512) left
    at the old one beside ok rows of the same shape."""
    out = Path(__file__).resolve().parents[2] / "reports" / "cpu"
    stale = []
    for row in sw.read_results(out / "results.csv"):
        sol = sw.speed_of_light_of(sw.run_of(row))
        recorded = (float(row["sol_products"]), float(row["sol_cholesky"]))
        if recorded != pytest.approx((sol["products"], sol["cholesky"]), rel=1e-9):
            stale.append((sw.key_of(row), row["status"]))
    assert not stale


class PlacedHere:
    """A runner that measures in this process as a cluster's worker would (``placed``)."""

    placed = True

    def __call__(self, task, runs):
        for run in runs:
            yield run, task(run)


def test_a_workers_other_timing_environment_is_refused(tmp_path, monkeypatch):
    """Found by review: on a cluster, a worker's environment was not checked (a local
    cluster resumed with other threads per worker mixed both timings in one set of fits),
    and sweep.json kept the environment of whichever worker reported last."""
    grid = {**TINY, "methods": ("euclidean",)}
    sw.sweep(sw.Grid(**grid), tmp_path, runner=PlacedHere(), progress=False)
    before = (tmp_path / "results.csv").read_bytes()
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    wider = {**grid, "axes": {**grid["axes"], "width": (*grid["axes"]["width"], 12)}}
    with pytest.raises(
        ValueError, match=f"timed with threads {threads}; here threads {threads + 1}"
    ):
        sw.sweep(sw.Grid(**wider), tmp_path, runner=PlacedHere(), progress=False)
    assert (tmp_path / "results.csv").read_bytes() == before


def test_an_interrupted_resume_keeps_the_recorded_growth_decisions(tmp_path):
    """Found by review: a resume saved its record at the start without the growth decisions
    and the sweep's duration; interrupted, they were gone, and a resume of other methods
    never wrote back those of the methods it did not measure."""
    sw.sweep(sw.Grid(**TINY), tmp_path, progress=False)
    recorded = json.loads((tmp_path / "sweep.json").read_text())
    recorded["growth"] = {"layerwise/structured": "a decision of the first sweep"}
    (tmp_path / "sweep.json").write_text(json.dumps(recorded))

    def interrupted(run, grid):
        raise KeyboardInterrupt

    grid = sw.Grid(**{**TINY, "axes": {**TINY["axes"], "width": (4, 6, 8)}})
    with pytest.raises(KeyboardInterrupt):
        sw.sweep(grid, tmp_path, progress=False, measure=interrupted)
    after = json.loads((tmp_path / "sweep.json").read_text())
    assert after["growth"] == recorded["growth"]
    assert after["sweep_s"] == recorded["sweep_s"]
    # and the rule they grew by (found by review: dropped, the report said not recorded)
    assert after["growth_rule"] == recorded["growth_rule"]
    # and it says it did not finish, until a resume does (found by a hunt: read as done)
    assert recorded["finished"] is True and after["finished"] is False
    sw.sweep(grid, tmp_path, progress=False)
    assert json.loads((tmp_path / "sweep.json").read_text())["finished"] is True


def test_a_second_sweep_into_the_same_directory_is_refused(tmp_path):
    """Found by review: two sweeps into one --out each rewrote results.csv from their own
    rows, both exited 0, and one's points were lost. The second is refused while the
    first holds the directory's lock; nothing is written."""
    with sw.writing(tmp_path):
        with pytest.raises(ValueError, match="another riemann-bench sweep is writing into"):
            sw.sweep(sw.Grid(**TINY), tmp_path, progress=False)
        assert not (tmp_path / "results.csv").exists()
    sw.sweep(sw.Grid(**TINY), tmp_path, progress=False)  # released: the next one runs
    assert len(rows_of(tmp_path / "results.csv")) == len(list(sw.Grid(**TINY).runs()))


@pytest.mark.parametrize(
    ("recorded", "expected"),
    [
        (
            "riemann-bench sweep --quick --out /old/dir",
            "riemann-bench sweep --quick --out '/new dir'",
        ),
        ("riemann-bench sweep --out=/old --quick", "riemann-bench sweep --quick --out '/new dir'"),
        ("riemann-bench run", "riemann-bench run --out '/new dir'"),
    ],
)
def test_the_resume_command_writes_into_the_directory_at_hand(recorded, expected):
    """Found by a hunt: a sweep copied elsewhere was told to resume the one it came from."""
    assert sw.with_out(recorded, Path("/new dir")) == expected


def test_a_point_whose_stretches_disagree_is_flagged_in_the_results(tmp_path):
    """Found by an audit: a base point timed in two stretches read 0.93 ms in one and
    19.5 ms in the other, and the sweep wrote their pooled median (8.1 ms) with no word of
    it. Its row's ``flag`` now says ``stretches``; the other points of its line, whose
    stretches agree, are not flagged, and the file reads back (old files without the word
    too: ``flag`` is optional text)."""
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",), "kernels": ("structured",)})
    base = dict(grid.base)

    def retime(lines, grid, device):  # two stretches of 6 rounds; the base's 20x apart
        timed = []
        for line in lines:
            for run in line:
                at_base = all(run[a] == base[a] for a in sw.AXES)
                times = [1e-3] * 6 + [(20e-3 if at_base else 1.05e-3)] * 6
                timing = sw.timing_of(times)
                timed.append(
                    {
                        **run,
                        "time_median_s": timing.median,
                        "time_iqr_s": timing.iqr,
                        "times_s": json.dumps(times),
                        "spread": sw.spread_of(timing),
                        "stretches": 2,
                    }
                )
        return timed

    sw.sweep(grid, tmp_path, progress=False, retime=retime)
    rows = sw.read_results(tmp_path / "results.csv")
    timed = [r for r in rows if r["interleaved"]]
    assert len(timed) >= 2
    for row in timed:
        at_base = all(int(row[a]) == base[a] for a in sw.AXES)
        assert ("stretches" in row["flag"].split()) == at_base
        apart = sw.stretch_spread(json.loads(row["times_s"]), int(row["stretches"]))
        assert apart == pytest.approx(19.0 if at_base else 0.05)


def test_stretch_spread_is_the_slowest_stretch_over_the_fastest():
    assert sw.stretch_spread([1.0, 1.0, 2.0, 2.0], 2) == 1.0
    assert sw.stretch_spread([2.0, 2.0, 1.0, 1.0], 2) == 1.0
    assert sw.stretch_spread([1.0, 5.0, 9.0], 1) == 0.0  # one stretch: nothing to disagree
    assert math.isnan(sw.stretch_spread([1.0, 2.0, 3.0], 2))  # times that do not split
