"""The command-line pipeline on a tiny grid: run, validate's exit code, bad options."""

import json
import sys

import pytest

from riemann_core import cli

TINY = [
    "--widths",
    "4,6,8",
    "--depths",
    "1,2",
    "--out-dims",
    "3",
    "--batches",
    "2,4",
    "--base",
    "4,1,3,2",
    "--repeats",
    "1",
]


def test_run_writes_results_fits_claims_figures_and_report(tmp_path, capsys):
    assert cli.main(["run", "--quick", "--out", str(tmp_path), *TINY]) == 0
    for name in (
        "results.csv",
        "sweep.json",
        "fits.csv",
        "joint_fit.csv",
        "claims.json",
        "report.md",
        "time.png",
        "flops.png",
        "memory.png",
        "crossover.png",
        "achieved_rate.png",
    ):
        assert (tmp_path / name).exists(), name
    report = (tmp_path / "report.md").read_text()
    assert f"riemann-bench report --out {tmp_path}" in report
    assert "riemann-bench run --quick" in report  # the sweep's own command line
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert {c["id"] for c in claims} >= {"flops-match-model", "crossover-width"}
    flops = next(c for c in claims if c["id"] == "flops-match-model")
    assert flops["verdict"] == "pass"
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert meta["gemm_flops_per_s"] > 0 and meta["environment"]["torch"]


def test_validate_exits_non_zero_on_a_failed_claim(tmp_path):
    assert (
        cli.main(
            [
                "sweep",
                "--quick",
                "--out",
                str(tmp_path),
                "--workers",
                "0",
                "--methods",
                "layerwise",
                *TINY,
            ]
        )
        == 0
    )
    path = tmp_path / "results.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    flops = header.index("flops")
    planted = [lines[0]]
    for line in lines[1:]:  # counted FLOPs 5% above the model: a planted violation
        cells = line.split(",")
        cells[flops] = str(float(cells[flops]) * 1.05)
        planted.append(",".join(cells))
    path.write_text("\n".join(planted) + "\n")
    assert cli.main(["validate", "--out", str(tmp_path)]) == 1
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert next(c for c in claims if c["id"] == "flops-match-model")["verdict"] == "fail"


@pytest.mark.parametrize(
    "options,message",
    [
        (["--widths", "0,4"], "positive integers"),
        (["--methods", "newton"], "unknown method"),
        (["--base", "4,1"], "--base needs 4 integers"),
    ],
    ids=["width", "method", "base"],
)
def test_bad_grid_options_exit_2_before_any_work(tmp_path, capsys, options, message):
    assert cli.main(["sweep", "--quick", "--out", str(tmp_path), *options]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "options,message",
    [
        (["--workers", "-1"], "--workers needs 0"),
        (["--threads-per-worker", "0"], "--threads-per-worker needs 1"),
        (["--scheduler", "tcp://127.0.0.1:9", "--workers", "2"], "pass one or the other"),
        (["--workers", "0", "--threads-per-worker", "2"], "--workers 0 has none"),
    ],
    ids=["workers", "threads", "scheduler-and-workers", "threads-without-workers"],
)
def test_contradictory_cluster_options_exit_2_before_any_work(tmp_path, capsys, options, message):
    assert cli.main(["sweep", "--quick", "--out", str(tmp_path), *options]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_without_dask_the_sweep_says_how_to_measure_anyway(tmp_path, capsys, monkeypatch):
    import riemann_core.scaling

    monkeypatch.setitem(sys.modules, "riemann_core.scaling.dispatch", None)  # not importable
    monkeypatch.delattr(riemann_core.scaling, "dispatch", raising=False)
    assert cli.main(["sweep", "--quick", "--out", str(tmp_path), *TINY]) == 2
    assert "--workers 0" in capsys.readouterr().err


def test_missing_results_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["fit", "--out", str(tmp_path)]) == 2
    assert "results.csv" in capsys.readouterr().err


def test_run_with_two_dtypes_is_refused_before_any_work(tmp_path, capsys):
    code = cli.main(["run", "--quick", "--out", str(tmp_path), "--dtypes", "float32,float64"])
    assert code == 2
    assert "one dtype at a time" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert cli.main(["sweep", "--quick", "--out", str(target / "sub"), *TINY]) == 2
    assert "riemann-bench sweep: error" in capsys.readouterr().err
    assert target.read_text() == "x"
