"""``python -m bench.cluster``'s overhead measurement and report, on a tiny sweep (a smoke
test of the script: what it measures is only meaningful on the quick grid)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from riemann_core.scaling import sweep as sw

from . import cluster

TINY = dict(
    base={"width": 4, "depth": 1, "out_dim": 3, "batch": 4},
    axes={"width": (4, 6), "depth": (1,), "out_dim": (3,), "batch": (4,)},
    repeats=1,
    methods=("euclidean", "layerwise"),
)


def test_the_interleaved_measurement_reports_wall_and_timed_ratios(tmp_path):
    sw.sweep(sw.Grid(**TINY), tmp_path / "tiny", progress=False)
    chunks = cluster.interleaved(rounds=1, chunk=2, results=tmp_path / "tiny")
    (chunk,) = chunks
    assert chunk["points"] == len(sw.read_results(tmp_path / "tiny" / "results.csv"))
    assert chunk["here"] > 0 and chunk["dask"] > 0 and chunk["fixed"] > 0
    assert math.isfinite(chunk["timed_ratio"]) and chunk["timed_ratio"] > 0
    assert min(chunk[part] for part in cluster.FIXED_PARTS) > 0
    empty = chunk["empty_point"]
    assert empty["points"] == cluster.EMPTY_POINTS
    assert empty["wall_s"] > 0 and empty["client_cpu_s"] > 0 and empty["worker_cpu_s"] > 0
    record = {
        "command": "python -m bench.cluster",
        "environment": {"device_name": "cpu", "threads": 1, "torch": "2.13.0", "commit": "abc"},
        "point_seconds": 0.2,
        "results": str(tmp_path / "tiny"),
        **cluster.sweep_of(tmp_path / "tiny"),
        "interleaved": chunks,
        "end_to_end": [],
        "throughput": [],
    }
    record["summary"] = cluster.summary(record)
    json.dumps(record)  # what cluster.json holds
    cluster.write(tmp_path, record)
    text = (tmp_path / "cluster.md").read_text()
    timed = record["summary"]["timed_ratio"]["median"]
    assert "timed medians on the worker over those in this process" in text
    assert f"{timed:.3f}" in text and (tmp_path / "throughput.png").exists()
    # (found by an audit: the sweep of --results, in /tmp, was named only by its path)
    assert record["results_points"] == [sw.run_of(r) for r in sw.read_results(tmp_path / "tiny" / "results.csv")]  # fmt: skip
    assert "(grown ones included; the points are listed in `cluster.json`)" in text
    record["results_commands"] = ["riemann-bench run --quick --out tiny"]
    cluster.write(tmp_path, record)
    text = " ".join((tmp_path / "cluster.md").read_text().split())
    assert "made by `riemann-bench run --quick --out tiny`; the points are listed" in text
    ratio = record["summary"]["interleaved_ratio"]["median"]
    verdict = "met" if ratio <= cluster.GOAL_RATIO else "missed"
    assert f"Goal (<= {cluster.GOAL_RATIO:.2f}): **{verdict}** ({ratio:.3f})" in text
    wall = 1e3 * record["summary"]["empty_point"]["wall_s"]
    assert (
        f"empty point (its row returned at once) through the same runner on the same worker takes {wall:.1f} ms"
        in " ".join(text.split())
    )


def test_the_report_is_written_again_from_its_record_or_refused_naming_the_fix(tmp_path, capsys):
    """Found by review: the committed report stated its goal and missed it without a word;
    ``--report-only`` writes it again, with the verdict, from ``cluster.json``."""
    assert "**missed** (1.500); the points alone meet it" in cluster._verdict(1.5, 1.01)
    assert cluster._verdict(1.01, 1.0) == "Goal (<= 1.05): **met** (1.010)."
    (tmp_path / "cluster.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit:
        cluster.main(["--out", str(tmp_path), "--report-only"])
    assert exit.value.code == 2
    assert "measure it first (python -m bench.cluster --out" in capsys.readouterr().err
    assert not (tmp_path / "cluster.md").exists()


def test_results_without_a_sweep_are_refused_before_any_work_naming_the_file(
    tmp_path, capsys, monkeypatch
):
    """Found by review: ``--results DIR`` without a ``sweep.json`` died with a bare
    traceback, and without a ``results.csv`` (taken as empty) interleaved no point, then
    died in a round's subprocess. A directory that holds no sweep is refused before any
    work, naming the missing, corrupted or empty file and how to make a sweep there."""
    for work in ("interleaved", "end_to_end", "throughput"):
        monkeypatch.setattr(cluster, work, lambda *args, work=work: pytest.fail(f"{work} ran"))
    root = Path(__file__).resolve().parent.parent / "reports" / "cpu"
    results, out = tmp_path / "sweep", tmp_path / "out"
    results.mkdir()
    header = (root / "results.csv").read_text().splitlines()[0]
    for files, wrong in [
        ({}, "sweep.json: no such file"),
        ({"sweep.json": (root / "sweep.json").read_text()}, "results.csv: no such file"),
        ({"results.csv": "width,depth\n4,1\n"}, "results.csv is not a results file"),
        ({"results.csv": header + "\n"}, "results.csv holds no point"),
        ({"sweep.json": "{not json", "results.csv": (root / "results.csv").read_text()},
         "sweep.json cannot be parsed"),
    ]:  # fmt: skip
        for name, text in files.items():
            (results / name).write_text(text)
        with pytest.raises(SystemExit) as exit:
            cluster.main(["--out", str(out), "--results", str(results)])
        assert exit.value.code == 2
        error = " ".join(capsys.readouterr().err.split())
        assert f"{results}/{wrong}" in error, error
        assert f"make one with riemann-bench run --quick --out {results}" in error, error
    assert not out.exists()


def test_a_failed_round_shows_its_own_error(tmp_path, capfd):
    """Found by review: a round's process ran with its stderr captured and dropped, so a
    failure read ``CalledProcessError ... exit status 1`` alone. Its traceback now reaches
    the terminal (here a ``results.csv`` corrupted after the check before any work)."""
    (tmp_path / "results.csv").write_text("width,depth\n4,1\n")
    with pytest.raises(subprocess.CalledProcessError):
        cluster.interleaved(1, 10, tmp_path)
    error = capfd.readouterr().err
    assert f"{tmp_path}/results.csv is not a results file" in " ".join(error.split()), error


def _recorded_throughput(out: Path) -> None:
    """A ``cluster.json`` in ``out`` with two rounds of throughput and nothing else."""
    rounds = [
        {"round": r, "workers": w, "points": 126, "startup_s": 1.0, "seconds": 126 / (4.9 * w),
         "points_per_s": 4.9 * w, "ideal_points_per_s": 5.0 * w}
        for r in range(2)
        for w in cluster.WORKERS
    ]  # fmt: skip
    record = {
        "command": "python -m bench.cluster --out x",
        "environment": {"device_name": "cpu", "threads": 1, "torch": "2.13.0", "commit": "abc"},
        "point_seconds": 0.2,
        "results": None,
        "interleaved": [],
        "end_to_end": [],
        "throughput": rounds,
    }
    record["summary"] = cluster.summary(record)
    (out / "cluster.json").write_text(json.dumps(record))


def test_the_redrawn_throughput_figure_puts_every_cluster_size_at_its_number(tmp_path, monkeypatch):
    """Found by redrawing the committed report: read back from ``cluster.json``, the
    summary's cluster sizes are text, drawn as categories at 0, 1, 2 while each round's dots
    stood at 1, 2, 4."""
    from riemann_core.measure import output

    _recorded_throughput(tmp_path)
    figures = []
    monkeypatch.setattr(output, "save_figure", lambda fig, path: figures.append(fig))
    assert cluster.main(["--out", str(tmp_path), "--report-only"]) == 0
    (fig,) = figures
    ideal, dots, median = fig.axes[0].lines
    assert list(dots.get_xydata()[:, 0]) == [1, 2, 4, 1, 2, 4]
    for line in (ideal, median):
        assert list(line.get_xydata()[:, 0]) == [1, 2, 4]
    assert list(median.get_xydata()[:, 1]) == pytest.approx([4.9, 9.8, 19.6])


def test_the_report_names_the_torch_that_measured_it(tmp_path):
    """Found by an audit of the committed reports: ``cluster.md`` named the device, threads
    and commit, but its torch only in ``cluster.json``, unlike every other report."""
    _recorded_throughput(tmp_path)
    assert cluster.main(["--out", str(tmp_path), "--report-only"]) == 0
    text = (tmp_path / "cluster.md").read_text()
    assert "on cpu (1 torch threads, torch 2.13.0, commit abc)" in text
