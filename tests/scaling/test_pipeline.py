"""The command-line pipeline on a tiny grid: run, the exit codes, bad options and files."""

import errno
import json
import re
import shlex
import socket
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from riemann_core import cli
from riemann_core.measure.environment import git_commit
from riemann_core.measure.flops import KINDS
from riemann_core.methods import layerwise
from riemann_core.scaling import sweep as sw
from riemann_core.scaling.worker import physical_device

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
    "--time-budget",
    "2",
]


@pytest.fixture(autouse=True)
def small_rates(monkeypatch):
    """Device rates at size 256: the pipeline's checks need rates, not good ones."""
    monkeypatch.setitem(sw.QUICK, "rate_size", 256)


def test_run_writes_results_fits_claims_figures_and_report(tmp_path, capsys):
    code = cli.main(["run", "--quick", "--out", str(tmp_path), *TINY])
    for name in (
        "results.csv",
        "sweep.json",
        "fits.csv",
        "time_model.csv",
        "rates.csv",
        "claims.json",
        "report.md",
        "time.png",
        "flops.png",
        "memory.png",
        "crossover.png",
        "achieved_rate.png",
        "time_model.png",
    ):
        assert (tmp_path / name).exists(), name
    report = (tmp_path / "report.md").read_text()
    assert f"riemann-bench report --out {tmp_path}" in report
    assert "riemann-bench run --quick" in report  # the sweep's own command line
    document = json.loads((tmp_path / "claims.json").read_text())
    record = json.loads((tmp_path / "sweep.json").read_text())
    # what produced them (found by a hunt: a bare list named nothing)
    assert document["command"] == f"riemann-bench run --quick --out {tmp_path} " + " ".join(TINY)
    assert document["seed"] == 0 and document["sweep"] == record["sweep"]
    assert document["sweep_commands"] == [record["command"]]
    # and the code that judged them, which may be later than the sweep's (found by review)
    assert document["commit"] == git_commit() != "" and f"commit {git_commit()})" in report
    claims = document["claims"]
    assert {c["id"] for c in claims} >= {"flops-match-model", "crossover-width"}
    flops = next(c for c in claims if c["id"] == "flops-match-model")
    assert flops["verdict"] == "pass"
    # the K-FAC users run by default, kept apart from the exact one in every stage
    default = {"linear-in-depth-kfac-default", "time-explained-kfac-default", "kfac-default-w"}
    assert {c["id"] for c in claims} >= default | {"linear-in-depth-kfac", "kfac-w"}
    for name in ("results.csv", "fits.csv"):
        methods = pd.read_csv(tmp_path / name)["method"]
        assert {"kfac", "kfac-default"} <= set(methods), name
    assert "kfac-default" in report
    assert all(c["detail"] for c in claims)
    # the claims' intervals depend on the seed: a report drawn with another names it in
    # the command that regenerates it (found by review: it read the default's)
    assert cli.main(["report", "--out", str(tmp_path), "--seed", "5"]) == 0
    assert (
        f"`riemann-bench report --out {tmp_path} --seed 5`" in (tmp_path / "report.md").read_text()
    )
    # counted FLOPs are exact: no claim on them fails (on time, a loaded machine may)
    assert all(c["verdict"] != "fail" for c in claims if c["basis"] == "flops")
    assert code == int(any(c["verdict"] == "fail" for c in claims))
    # through the local cluster (the default): the rates are measured in its worker
    meta = json.loads((tmp_path / "sweep.json").read_text())
    (device,) = meta["devices"].values()
    assert [s["when"] for s in device["device_rates"]] == ["start", "grid", "end"]
    assert all(r > 0 for s in device["device_rates"] for r in s["products"])
    if Path("/proc/stat").is_file():  # the load of other processes, read in the worker
        assert all(0 <= s["outside_cores"] <= s["cpus_read"] for s in device["device_rates"])
    here = physical_device(torch.device("cpu"))  # cpu (pinned, or a container: its cores)
    assert device["environment"]["torch"] and device["workers"] == [
        f"{socket.gethostname()} {here}"
    ]


def test_a_planted_cubic_step_in_layerwise_fails_its_claim_and_the_run(tmp_path, monkeypatch):
    solve = layerwise.solve

    def with_an_extra_step(problem, opts):  # an n_a x n_a Cholesky per block: O(n^3)
        for handler in problem.handlers:
            torch.linalg.cholesky(torch.eye(handler.block.n_params))
        return solve(problem, opts)

    monkeypatch.setattr(layerwise, "solve", with_an_extra_step)  # in this process only
    options = ["--workers", "0", "--methods", "layerwise", "--kernels", "structured", *TINY]
    assert cli.main(["run", "--quick", "--out", str(tmp_path), *options]) == 1
    claims = {c["id"]: c for c in json.loads((tmp_path / "claims.json").read_text())["claims"]}
    assert claims["layerwise-structured-n"]["verdict"] == "fail"
    assert claims["layerwise-structured-n"]["measured"] > 2
    assert claims["flops-match-model"]["verdict"] == "fail"
    assert claims["time-explained-full"]["verdict"] == "not measured"
    assert (tmp_path / "report.md").exists()  # the report is written before the exit code


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
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    ok = df["status"] == "ok"
    for column in ("flops", *(f"flops_{kind}" for kind in KINDS)):  # the total and its kinds
        df.loc[ok, column] = (df.loc[ok, column].astype(float) * 1.05).map(repr)
    df.to_csv(path, index=False)  # counted FLOPs 5% above the model: a planted violation
    assert cli.main(["validate", "--out", str(tmp_path)]) == 1
    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    assert next(c for c in claims if c["id"] == "flops-match-model")["verdict"] == "fail"


@pytest.mark.parametrize(
    "options,message",
    [
        (["--widths", "0,4"], "positive integers"),
        (["--methods", "newton"], "unknown method"),
        (["--base", "4,1"], "--base needs 4 integers"),
        # as a method given twice is (it was measured once, the repeat dropped silently)
        (["--widths", "8,8"], "--widths: 8 given more than once"),
        (["--batches", "4,8,4"], "--batches: 4 given more than once"),
        # found by a hunt: the first point was timed without end
        (["--repeats", str(10**12)], f"--repeats {10**12} is more than 1000"),
    ],
    ids=["width", "method", "base", "width-twice", "batch-twice", "repeats"],
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


def test_a_sweep_that_fails_to_start_leaves_no_directory_it_made(tmp_path, capsys):
    """The cluster is refused after --out is made: the directories made for it go again,
    one that was there stays."""
    out = tmp_path / "new" / "sweep"
    argv = ["sweep", "--quick", "--workers", "100000", *TINY]
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert "need 100000 cores" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert cli.main([*argv, "--out", f"{tmp_path}/x/../y/sweep"]) == 2  # x made on the way
    assert list(tmp_path.iterdir()) == []
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    assert tmp_path.is_dir()


def test_missing_results_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["fit", "--out", str(tmp_path)]) == 2
    assert "results.csv" in capsys.readouterr().err


def test_run_with_two_dtypes_is_refused_before_any_work(tmp_path, capsys):
    code = cli.main(["run", "--quick", "--out", str(tmp_path), "--dtypes", "float32,float64"])
    assert code == 2
    assert "one dtype at a time" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["sweep", "fit", "validate", "report", "run"])
def test_out_that_is_a_file_is_one_clear_sentence(tmp_path, capsys, command):
    target = tmp_path / "a_file"
    target.write_text("x")
    for out in (target, target / "sub"):
        with pytest.raises(SystemExit) as exit:
            cli.main([command, "--out", str(out)])
        assert exit.value.code == 2
        assert "a file, not a directory; pass a directory" in capsys.readouterr().err
    assert target.read_text() == "x"


@pytest.mark.parametrize("command", ["fit", "validate", "report"])
def test_the_analysis_commands_name_a_corrupted_results_file(tmp_path, capsys, command):
    (tmp_path / "results.csv").write_text("not,a,results\n1,2,3\n")
    (tmp_path / "sweep.json").write_text("{}")
    assert cli.main([command, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "results.csv") in err and "missing columns" in err


@pytest.mark.parametrize("command", ["fit", "validate", "report"])
def test_options_the_analysis_commands_would_ignore_are_refused(tmp_path, capsys, command):
    assert cli.main([command, "--quick", "--out", str(tmp_path)]) == 2
    assert "--quick only chooses the default directory" in capsys.readouterr().err
    # found by a hunt: --device cpu, the default's name, was ignored without a word
    assert cli.main([command, "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "--device only chooses the default directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--widths", "0,8"], "--widths needs positive integers, got [0]\n"),
        # found by a hunt: argparse took "-8,16" for an option ("expected one argument")
        (["--widths", "-8,16"], "--widths needs positive integers, got [-8]\n"),
        (["--repeats", "0"], "error: --repeats must be at least 1, got 0\n"),
        # found by a hunt: recorded as a skipped point, then every resume, fit and report of
        # that --out broke off with an OverflowError (the axes are read as int64)
        (
            ["--widths", "8,99999999999999999999"],
            f"--widths takes values up to {2**62}, got [{10**20 - 1}]\n",
        ),
        (
            ["--base", "8,1,4,99999999999999999999"],
            f"--base takes values up to {2**62}, got [{10**20 - 1}]\n",
        ),
    ],
)
def test_a_bad_option_is_named_alone(tmp_path, capsys, options, message):
    assert cli.main(["sweep", "--quick", "--out", str(tmp_path), *options]) == 2
    assert capsys.readouterr().err.endswith(message)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny sweep, measured once for the module (with its fits and report)."""
    out = tmp_path_factory.mktemp("finished")
    assert cli.main(["sweep", "--quick", "--workers", "0", "--out", str(out), *TINY]) == 0
    assert cli.main(["report", "--out", str(out)]) == 0
    return out


def test_an_unfinished_sweep_is_said_so_by_every_analysis(finished, tmp_path, capsys):
    """Found by a hunt: an interrupted sweep's regimes "not reached" and lines of too few
    points read as findings, with nothing said."""
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    record = json.loads((out / "sweep.json").read_text())
    (out / "sweep.json").write_text(json.dumps({**record, "finished": False}))
    for command in ("fit", "validate"):
        assert cli.main([command, "--out", str(out)]) in (0, 1)
        err = " ".join(capsys.readouterr().err.split())
        assert f"note: the sweep in {out} did not finish (interrupted?)" in err
        # the directory fitted, not the one the sweep was copied from (found by a hunt)
        resume = shlex.split(err.split("Resume it with `")[1].split("`")[0])
        assert resume[:2] == ["riemann-bench", "sweep"] and resume[-2:] == ["--out", str(out)]
        assert str(finished) not in resume
    assert cli.main(["report", "--out", str(out)]) == 0
    report = " ".join((out / "report.md").read_text().split())
    assert f"**An unfinished sweep**: The sweep in {out} did not finish" in report
    (out / "sweep.json").write_text(json.dumps(record))  # finished: nothing said
    assert cli.main(["report", "--out", str(out)]) == 0
    assert "An unfinished sweep" not in (out / "report.md").read_text()
    assert "did not finish" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, unit", [("fit", "fit"), ("validate", "claim"), ("report", "step")]
)
def test_analysis_commands_show_their_progress(
    finished, tmp_path, capsys, monkeypatch, command, unit
):
    """fit, validate and report take seconds to tens of seconds on a real sweep (the
    bootstrap, the figures): each shows a progress bar on stderr, gone when it ends. (tqdm
    redraws at most every 0.1 s; on this tiny sweep every step is drawn, or a fast run
    shows none: the test failed once so.)"""
    import shutil

    import tqdm

    class EveryStep(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, mininterval=0, miniters=1, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", EveryStep)  # progress_bar imports it when called

    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    assert cli.main([command, "--out", str(out)]) in (0, 1)
    assert re.search(rf"{command}: +[1-9]\d*{unit} \[", capsys.readouterr().err)


def _edit_row(column, value):
    def edit(out):
        df = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
        ok = df.index[df["status"] == "ok"][0]
        df.loc[ok, column] = value
        df.to_csv(out / "results.csv", index=False)
        return ok + 2  # the line: the header is line 1

    return edit


def _field_too_many(out):
    """results.csv with a field past the header's on its first row (was: "incomplete")."""
    path = out / "results.csv"
    lines = path.read_text().splitlines()
    lines[1] += ",extra"
    path.write_text("\n".join(lines) + "\n")


def _column_twice(out):
    """results.csv with its time_median_s column repeated, the first copy edited."""
    path = out / "results.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    at = header.index("time_median_s")
    rows = [line.split(",") for line in lines]  # no quoted commas before the times column
    out_lines = [",".join([*r[:at], "9" if i else r[at], *r[at:]]) for i, r in enumerate(rows)]
    path.write_text("\n".join(out_lines) + "\n")


def _edit_row_unnamed(column, value):
    """:func:`_edit_row` of a figure checked for the whole file (the file is named, not a
    line)."""

    def edit(out):
        _edit_row(column, value)(out)

    return edit


def _another_cost_model(out):
    """Another version's modelled FLOPs at a point (the file is named, not a line)."""
    _edit_row("flops_model", "12345")(out)


def _every_row_skipped(out):
    df = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    df["status"], df["reason"] = "skipped", "over the FLOP budget"
    df.to_csv(out / "results.csv", index=False)


def _duplicate_row(out):
    df = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    ok = df.index[df["status"] == "ok"][0]
    pd.concat([df, df.loc[[ok]]]).to_csv(out / "results.csv", index=False)
    return None  # named as two lines


def _duplicate_row_unnamed(out):
    df = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    copy = df.loc[[df.index[df["status"] == "ok"][0]]].assign(device_name="")
    pd.concat([df, copy]).to_csv(out / "results.csv", index=False)


def _failed_row_with_text(out):
    """A point not measured (status error) whose time holds text."""
    df = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    ok = df.index[df["status"] == "ok"][0]
    df.loc[ok, "status"], df.loc[ok, "time_median_s"] = "error", "garbage"
    df.to_csv(out / "results.csv", index=False)
    return ok + 2


def _edit_record(change):
    def edit(out):
        record = json.loads((out / "sweep.json").read_text())
        change(record)
        (out / "sweep.json").write_text(json.dumps(record))

    return edit


def _first_rates_list(values):
    def change(record):
        device = next(iter(record["devices"].values()))
        device["device_rates"][0]["products"] = values

    return change


def _first_rates(value):
    return _first_rates_list([value, value])


def _first_load(cores, cpus, **more):
    def change(record):
        device = next(iter(record["devices"].values()))
        load = {"outside_cores": cores, "cpus_read": cpus, **more}
        device["device_rates"][0].update({k: v for k, v in load.items() if v is not None})
        for key in [k for k, v in load.items() if v is None]:  # a key left out
            device["device_rates"][0].pop(key, None)

    return change


def _no_rates(record):
    for device in record["devices"].values():
        device["device_rates"] = []


def _first_device(change):
    def edit(record):
        change(next(iter(record["devices"].values())))

    return edit


def _without_cholesky_rates(device):
    for session in device["device_rates"]:
        session.pop("cholesky")


def _emptied(out):
    (out / "results.csv").write_text("")


def _header_only(out):
    text = (out / "results.csv").read_text()
    (out / "results.csv").write_text(text.splitlines()[0] + "\n")


def _record(text):
    def edit(out):
        (out / "sweep.json").write_text(text)

    return edit


def _record_of_another_grid(out):
    """``sweep.json`` of a grid around another base point: its rows are not this one's."""
    record = json.loads((out / "sweep.json").read_text())
    record["base"] = {"width": 6, "depth": 2, "out_dim": 3, "batch": 4}
    (out / "sweep.json").write_text(json.dumps(record))
    return 2  # the first row, at the base point (4, 1, 3, 2) of the sweep that measured it


CORRUPTIONS = {
    "header-only": (_header_only, "holds no points"),
    # found by a hunt: "not a results file of this version (missing columns [all of them])"
    "empty-file": (_emptied, "results.csv is empty"),
    "unknown-status": (_edit_row("status", "done"), "unknown status 'done'"),
    "unknown-method": (_edit_row("method", "bogus"), "unknown method 'bogus'"),
    "width-text": (_edit_row("width", "abc"), "width is 'abc', not a positive integer"),
    "width-huge": (_edit_row("width", str(2**64)), f"width is '{2**64}', more than {2**62}"),
    "time-nan": (_edit_row("time_median_s", "nan"), "a measured point with time_median_s = 'nan'"),
    "time-negative": (_edit_row("time_median_s", "-0.5"), "time_median_s = '-0.5'"),
    "flops-empty": (_edit_row("flops", ""), "a measured point with flops = ''"),
    # found by review: these columns went unchecked and changed verdicts, or crashed
    "cholesky-flops-text": (_edit_row("flops_cholesky", "abc"), "flops_cholesky = 'abc'"),
    "products-flops-negative": (_edit_row("flops_products", "-1"), "flops_products = '-1'"),
    "d-text": (_edit_row("d", "x"), "a measured point with d = 'x'"),
    "sol-text": (_edit_row("sol_products", "abc"), "sol_products = 'abc'"),
    "peak-text": (_edit_row("peak_bytes", "lots"), "peak_bytes = 'lots'"),
    "times-not-json": (_edit_row("times_s", "[0.1, 0.2"), "times_s is '[0.1, 0.2', not a list"),
    "times-negative": (_edit_row("times_s", "[0.1, -2]"), "not a list of positive times"),
    "unknown-kernel": (_edit_row("kernel", "fancy"), "unknown kernel 'fancy'"),
    "slow-paths-text": (_edit_row("slow_paths", "{{{"), "slow_paths holds ['{{{']"),
    "interleaved-text": (_edit_row("interleaved", "sideways"), "interleaved holds ['sideways']"),
    "remeasured-text": (_edit_row("remeasured", "yes"), "remeasured is 'yes', not 0 or 1"),
    "stretches-zero": (_edit_row("stretches", "0"), "stretches is '0', not a positive integer"),
    "stretches-uneven": (_edit_row("stretches", "1000"), "which its 1000 stretches do not share"),
    "duplicate-point": (_duplicate_row, "hold the same point"),
    # found by a hunt: a copy with a blank device_name was read as another device's point,
    # then named the sweep's device and fitted twice
    "duplicate-point-unnamed": (_duplicate_row_unnamed, "a blank device_name stands for it"),
    "record-without-axes": (_edit_record(lambda r: r.pop("axes")), "the values of every axis"),
    "record-rates-text": (_edit_record(_first_rates("fast")), "rates of device"),
    "record-rates-negative": (_edit_record(_first_rates(-1.0)), "not FLOP/s"),
    "record-without-rates": (_edit_record(_no_rates), "records no device rates"),
    "record-list": (_record("[1, 2]"), "sweep.json is not the record of a sweep"),
    "record-garbage": (_record("{not json"), "sweep.json cannot be parsed"),
    "record-base-text": (_record('{"base": "x"}'), "sweep.json is not the record of a sweep"),
    "record-of-another-grid": (_record_of_another_grid, "the two files come from different sweeps"),
    # found by review: accepted, then crashed a later stage without naming the file
    "time-zero": (_edit_row("time_median_s", "0"), "a measured point with time_median_s = '0'"),
    "peak-inf": (_edit_row("peak_bytes", "inf"), "a measured point with peak_bytes = 'inf'"),
    "record-rates-empty": (_edit_record(_first_rates_list([])), "rates of device"),
    # the load of other processes read beside the rates: a rule on time reads it
    "record-outside-cores-text": (
        _edit_record(_first_load("busy", 2)),
        "says other processes kept 'busy' of its 2 CPUs busy",
    ),
    "record-cpus-read-zero": (_edit_record(_first_load(0.0, 0)), "read the load of 0 CPUs"),
    # found by review: a missing key read "the load of None CPUs"; the physical cores read
    "record-cpus-read-missing": (
        _edit_record(_first_load(0.5, 2, cpus_read=None)),
        "records outside_cores but no cpus_read",
    ),
    "record-cores-read-too-many": (
        _edit_record(_first_load(0.5, 2, cores_read=3)),
        "says its 2 CPUs make up 3 physical cores",
    ),
    "record-rounding-cores-negative": (
        _edit_record(_first_load(0.5, 2, rounding_cores=-1.0)),
        "says the rounding of its 2 CPUs' counters may add -1.0 CPUs",
    ),
    "record-grid-text": (_edit_record(lambda r: r.update(grid="x")), "grid is 'x', not a mapping"),
    "record-growth-list": (_edit_record(lambda r: r.update(growth=[1])), "growth is [1], not a"),
    # found by review: a TypeError, or accepted and given fixes that argparse refuses
    "time-text": (_edit_row("time_median_s", "abc"), "time_median_s = 'abc'"),
    "unknown-device": (_edit_row("device", "tpu"), "unknown device 'tpu'"),
    "unknown-dtype": (_edit_row("dtype", "float16"), "unknown dtype 'float16'"),
    "unknown-output-metric": (_edit_row("output_metric", "bogus"), "unknown output_metric"),
    "none-measured": (_every_row_skipped, "holds no measured point (every one skipped)"),
    "unrecorded-device": (
        _edit_row("device_name", "Other CPU"),
        "sweep.json does not record (it records",
    ),
    # found by a hunt: another sweep's sweep.json beside these rows changed a verdict
    "row-of-another-sweep": (_edit_row("sweep", "0123abcd"), "a point of sweep 0123abcd, and"),
    "record-of-another-sweep": (
        _edit_record(lambda r: r.update(sweep="0123abcd")),
        "records sweep 0123abcd: the two files come from different sweeps",
    ),
    "record-sweep-number": (_edit_record(lambda r: r.update(sweep=5)), "sweep is 5, not the id"),
    "record-growth-rule-number": (
        _edit_record(lambda r: r.update(growth_rule=5)),
        "growth_rule is 5, not the text of a growth rule",
    ),
    "record-earlier-growth-rules-list": (
        _edit_record(lambda r: r.update(earlier_growth_rules=["x"])),
        "earlier_growth_rules is ['x'], not a mapping of growth decisions",
    ),
    "record-finished-text": (
        _edit_record(lambda r: r.update(finished="yes")),
        "finished is 'yes', not true or false",
    ),
    # found by a hunt: fit left the row out, validate blamed another version's cost model
    "device-of-another-kind": (_edit_row("device", "cuda:0"), "records as a cpu device"),
    # found by review: columns that disagree with each other changed verdicts, silently
    "times-zero": (_edit_row("times_s", "[0.0, 0.0, 0.0]"), "not a list of positive times"),
    "median-not-of-times": (_edit_row("time_median_s", "5.0"), ", the median of times_s"),
    "flops-not-summed": (_edit_row("flops", "1"), "flops is 1, not"),
    "n-params-edited": (_edit_row("n_params", "123"), "n_params is 123, not"),
    "rows-edited": (_edit_row("d", "7"), "d is 7, not"),
    "another-cost-model": (_another_cost_model, "with another cost model"),
    # found by a hunt: accepted, and the speed-of-light ratios moved (44.7 -> 57.7)
    "sol-edited": (_edit_row_unnamed("sol_products", "1"), "sol_products 1 recorded"),
    # found by review: a traceback in report, or a format error naming neither file nor
    # field; rates without a Cholesky rate were accepted by validate and refused by fit
    "record-environment-list": (
        _edit_record(_first_device(lambda d: d.update(environment=[]))),
        "is [], not a mapping",
    ),
    # found by a hunt: accepted by fit, validate and report; a resume crashed (exit 3)
    "record-workers-text": (
        _edit_record(_first_device(lambda d: d.update(workers="node1 cpu"))),
        "are 'node1 cpu', not a list of names",
    ),
    "record-sweep-s-text": (_edit_record(lambda r: r.update(sweep_s="258")), "sweep_s is '258'"),
    "record-overhead-text": (
        _edit_record(lambda r: r["grid"].update(overhead_target="0.2")),
        "grid.overhead_target is '0.2'",
    ),
    "record-commands-text": (
        _edit_record(lambda r: r.update(commands="riemann-bench run")),
        "commands is 'riemann-bench run', not a list",
    ),
    "record-grids-text": (
        _edit_record(lambda r: r.update(grids=["riemann-bench run"])),
        "grids is not a list of the grids that filled the directory",
    ),
    "record-without-cholesky-rates": (
        _edit_record(_first_device(_without_cholesky_rates)),
        "has no cholesky",
    ),
    # found by review: a TypeError traceback (exit 3), a resume crashed in sorted(), and a
    # report "produced by `5`"
    "failed-row-text": (_failed_row_with_text, "a point not measured (error) with time_median_s"),
    "record-axis-null": (
        _edit_record(lambda r: r["axes"].update(width=[None, 8])),
        "as lists of positive integers",
    ),
    # fit said 'no device rates (an older sweep?)', then blamed the memory model
    "mixed-dtype": (
        _edit_row("dtype", "float64"),
        "a point measured with dtype float64, which the grid of",
    ),
    "record-command-number": (
        _edit_record(lambda r: r.update(command=5)),
        "command is 5, not the command that ran the sweep",
    ),
    # found by a hunt: numbers float() reads but pandas does not (a traceback in validate
    # and report), values no measurement has (an overflow in the memory figure), a column
    # named twice (csv checked its last copy, the analysis read its first), a device kind
    # that is not text (a traceback)
    "flops-underscore": (_edit_row("flops_products", "35_840"), "flops_products = '35_840'"),
    "peak-full-width": (_edit_row("peak_bytes", "\uff14\uff10\uff19\uff16"), "peak_bytes = "),
    "peak-huge": (_edit_row("peak_bytes", "1e300"), "peak_bytes = '1e300'"),
    "time-tiny": (_edit_row("time_median_s", "1e-300"), "time_median_s = '1e-300'"),
    "column-twice": (_column_twice, "names the columns ['time_median_s'] more than once"),
    "field-too-many": (_field_too_many, "line 2 has more fields than the header"),
    "record-device-number": (
        _edit_record(_first_device(lambda d: d["environment"].update(device=5))),
        "names its device 5, not cpu or cuda",
    ),
    # found by a hunt: a TypeError where the rows are checked against the grid (exit 3)
    "record-output-metric-null": (
        _edit_record(lambda r: r["grid"].update(output_metric=None)),
        "grid.output_metric is None, not exact or sampled",
    ),
    "record-dtypes-null": (
        _edit_record(lambda r: r["grid"].update(dtypes=[None])),
        "grid.dtypes is [None], not a list of float32 or float64",
    ),
}


@pytest.mark.parametrize(
    "corruption, command",
    [
        (corruption, command)
        for corruption in CORRUPTIONS
        for command in ("fit", "validate", "report", "sweep")
        # a sweep starts from no rows, and measures the rates again
        if command != "sweep"
        or corruption not in ("header-only", "record-without-rates", "none-measured")
    ],
    ids=lambda v: v,
)
def test_a_corrupted_sweep_is_named_and_nothing_is_rewritten(
    finished, tmp_path, capsys, command, corruption
):
    """Each analysis command, and a resumed sweep, refuses a results file or record it
    cannot trust (naming the file, and the line of a bad row) before writing anything."""
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    edit, message = CORRUPTIONS[corruption]
    message = message[command] if isinstance(message, dict) else message
    line = edit(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    extra = ["--quick", "--workers", "0", *TINY] if command == "sweep" else []
    assert cli.main([command, "--out", str(out), *extra]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err
    if line is not None:
        assert f"results.csv line {line}:" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_memory_model_is_read_as_this_version_s(finished, tmp_path):
    """``peak_bytes_model`` is the cost model's estimate, which decided only which points a
    memory budget skipped: a file written with an earlier memory model (found by an audit:
    the layerwise one read 4-42x low), or edited there, is read with this version's."""
    import shutil

    from riemann_core.scaling import fit

    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    _edit_row("peak_bytes_model", "7")(out)
    df, _ = fit.read_sweep(out)
    ok = [r for r in sw.read_results(out / "results.csv") if r["status"] == "ok"]
    now = [sw.model_peak_bytes(sw.run_of(r)) for r in ok]
    assert df.loc[df["status"] == "ok", "peak_bytes_model"].tolist() == now
    assert 7 not in now


def test_rows_a_resumed_sweep_kept_are_its_own(finished, tmp_path):
    """A sweep resumed with a smaller grid records that grid and keeps the rows measured
    before, other methods and widths: they are not taken for another sweep's."""
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    record = json.loads((out / "sweep.json").read_text())
    record["axes"]["width"], record["grid"]["methods"] = [4], ["layerwise"]
    (out / "sweep.json").write_text(json.dumps(record))
    assert cli.main(["validate", "--out", str(out)]) in (0, 1)


def test_results_without_their_record_are_not_resumed(finished, tmp_path, capsys):
    """Without sweep.json nothing says which grid measured results.csv: a sweep into it
    would mix two grids."""
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    (out / "sweep.json").unlink()
    before = (out / "results.csv").read_bytes()
    assert cli.main(["sweep", "--quick", "--workers", "0", "--out", str(out), *TINY]) == 2
    assert "has no sweep.json beside it" in capsys.readouterr().err
    assert (out / "results.csv").read_bytes() == before


def _full_disk_at(name):
    """``write_atomic`` that fails like a full disk when it writes ``name``."""
    from riemann_core.measure import output

    write = output.write_atomic

    def write_atomic(path, text):
        if path.name == name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, text)

    return "riemann_core.measure.output.write_atomic", write_atomic


def _claims_fail():
    """Claims that fail to compute, after the report has drawn its figures."""

    def validate(*args, **kwargs):
        raise ValueError("the claims failed")

    return "riemann_core.scaling.validate.validate", validate


@pytest.mark.parametrize(
    "command, names, plant, message",
    [
        ("fit", ("fits.csv", "time_model.csv", "rates.csv"), _full_disk_at("time_model.csv"),
         "No space left on device"),
        ("report", ("report.md", "time.png", "flops.png", "memory.png"), _claims_fail(),
         "the claims failed"),
    ],
    ids=["fit-disk-full", "report-fails-after-figures"],
)  # fmt: skip
def test_a_command_that_fails_half_way_leaves_every_output_as_it_was(
    finished, tmp_path, capsys, monkeypatch, command, names, plant, message
):
    """Not new fits.csv beside old time_model.csv and rates.csv, nor new figures beside an
    old report.md: each command's outputs are written all together, or not at all."""
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    for name in names:
        (out / name).write_text(f"the previous {name}\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with monkeypatch.context() as planted:
        planted.setattr(*plant)
        assert cli.main([command, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert cli.main([command, "--out", str(out)]) == 0
    assert all((out / name).read_bytes() != before[name] for name in names)
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no staging left behind
