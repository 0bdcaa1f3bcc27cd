"""``riemann-bench train``: a small deterministic study, its tables and its errors."""

import json
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from riemann_core import cli
from riemann_core.studies import digits, training
from riemann_core.studies.training import (
    DEFAULT,
    MAX_EPOCHS,
    MAX_SEEDS,
    check_study,
    check_work,
    choose,
)
from riemann_core.studies.training_report import spread, summary, target_table, to_target

SMALL = ["train", "--quick", "--models", "mlp", "--methods", "sgd,layerwise", "--epochs", "0.5",
         "--seeds", "2", "--lrs", "0.1,0.3", "--dampings", "0.1", "--evaluations", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    assert cli.main([*SMALL, "--out", str(out)]) == 0
    return out


def test_small_study_writes_curves_tables_figures_and_report(study):
    runs = pd.read_csv(study / "runs.csv")
    tuning = pd.read_csv(study / "tuning.csv")
    meta = json.loads((study / "training.json").read_text())
    assert len(tuning) == 2 + 2  # sgd: two lrs; layerwise: two lrs x one damping
    assert set(runs["method"]) == {"sgd", "layerwise"} and set(runs["seed"]) == {0, 1}
    assert meta["tuning_seed"] == 2 and meta["split"] == {
        "train": 1078,
        "validation": 360,
        "test": 359,
    }
    # the same budget of examples for every run, evaluated at the same steps
    last = runs.groupby(["method", "seed"])["step"].max()
    assert (last == meta["steps"]).all() and meta["steps"] == 17
    assert runs.groupby(["method", "seed"]).size().nunique() == 1
    for method in ("sgd", "layerwise"):  # the reported configuration is the tuning winner
        rows = tuning[tuning["method"] == method]
        best = rows.loc[rows["validation_loss"].idxmin()]
        assert (runs.loc[runs["method"] == method, "lr"] == best["lr"]).all()
    report = (study / "report.md").read_text()
    assert meta["command"] == "riemann-bench " + " ".join([*SMALL, "--out", str(study)])
    assert f"`{meta['command']}`" in report
    for name in ("curves_mlp.png", "tuning_mlp.png"):
        assert (study / name).stat().st_size > 10_000 and f"]({name})" in report
    # the setup names what ran, not every model and method (found by a docs walkthrough)
    setup = report.split("## Setup")[1].split("## Environment")[0]
    assert "`mlp` 64-64-10" in setup and "`cnn`" not in setup
    assert "Learning rates `sgd` [0.1, 0.3]; `layerwise` [0.1, 0.3]; dampings [0.1]." in setup


def test_study_repeats_exactly_but_for_the_clock(study, tmp_path):
    assert cli.main([*SMALL, "--out", str(tmp_path)]) == 0
    first, again = (pd.read_csv(d / "runs.csv").drop(columns="time_s") for d in (study, tmp_path))
    pd.testing.assert_frame_equal(first, again)


def test_report_only_redraws_and_corrupted_results_are_refused(
    study, tmp_path, capsys, monkeypatch
):
    for name in ("runs.csv", "tuning.csv", "training.json"):
        (tmp_path / name).write_bytes((study / name).read_bytes())
    assert cli.main(["train", "--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text().startswith("# Training study")
    (tmp_path / "runs.csv").write_text("model,method\nmlp,sgd\n")
    kept = (tmp_path / "report.md").read_text()
    assert cli.main(["train", "--report-only", "--out", str(tmp_path)]) == 2
    assert "lacks columns" in capsys.readouterr().err
    (tmp_path / "training.json").write_text("{not json")
    assert cli.main(["train", "--report-only", "--out", str(tmp_path)]) == 2
    assert "corrupted" in capsys.readouterr().err
    assert (tmp_path / "report.md").read_text() == kept
    assert cli.main(["train", "--report-only", "--out", str(tmp_path / "none")]) == 2
    assert "run 'riemann-bench train'" in capsys.readouterr().err
    # another command's directory: named, not sent to run train there, which refuses it
    # (found by a hunt)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")
    assert cli.main(["train", "--report-only", "--out", str(sweep)]) == 2
    assert "holds the results of 'riemann-bench sweep', not of" in capsys.readouterr().err
    # study options it would ignore: refused (found by a hunt: ignored without a word)
    assert cli.main(["train", "--report-only", "--lrs", "0.1", "--out", str(tmp_path)]) == 2
    assert "--lrs would be ignored with --report-only" in capsys.readouterr().err
    # and the seed, the recorded one's (found by a hunt); a redraw needs no GPU
    assert cli.main(["train", "--report-only", "--seed", "5", "--out", str(tmp_path)]) == 2
    assert "--seed would be ignored with --report-only" in capsys.readouterr().err
    # --device and --quick beside --out, which they would not choose: refused (found by a
    # hunt: ignored without a word); without --out they choose it, and need no GPU
    for option in (["--device", "cuda"], ["--quick"]):
        assert cli.main(["train", "--report-only", *option, "--out", str(tmp_path)]) == 2
        assert f"{option[0]} would be ignored with --report-only" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--report-only", "--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "no results at reports/cuda/quick/training/" in err and "CUDA" not in err


def second(frame: pd.DataFrame, **cells) -> pd.DataFrame:
    """``frame`` with ``cells`` (column -> text) written into its second row (line 3)."""
    frame = frame.copy()
    for column, text in cells.items():
        frame.loc[1, column] = text
    return frame


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("runs.csv", lambda df: df.iloc[:0], "runs.csv holds no rows"),
        ("runs.csv", lambda df: df.assign(test_accuracy="high"), "line 2: test_accuracy is 'high'"),
        ("tuning.csv", lambda df: df.assign(lr="fast"), "line 2: lr is 'fast', not a number"),
        ("runs.csv", lambda df: second(df, test_accuracy=""), "line 3: test_accuracy is blank"),
        ("runs.csv", lambda df: second(df, time_s="inf"), "line 3: time_s is inf, but a row"),
        ("tuning.csv", lambda df: second(df, validation_loss="nan"), "line 3: validation_loss"),
    ],
    ids=["no-rows", "text-accuracy", "text-lr", "blank-accuracy", "inf-time", "nan-loss"],
)
def test_report_only_names_a_table_without_rows_or_numbers(
    study, tmp_path, capsys, name, edit, message
):
    """Instead of a KeyError or TypeError from deep inside the report, and every file left."""
    for file in ("runs.csv", "tuning.csv", "training.json"):
        (tmp_path / file).write_bytes((study / file).read_bytes())
    edit(pd.read_csv(tmp_path / name, dtype=str)).to_csv(tmp_path / name, index=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert cli.main(["train", "--report-only", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def copy_study(source, out):
    """Every file of the study in ``source`` (results, figures and report.md) into ``out``."""
    for path in source.iterdir():
        if path.is_file():
            (out / path.name).write_bytes(path.read_bytes())


def refused(command, out, message, capsys):
    """``command --report-only`` on ``out`` exits 2 naming ``message`` before it writes
    anything: report.md, the figures and the results stay as they were."""
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "report.md" in before
    assert cli.main([command, "--report-only", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def cut_short(path, keep_fields):
    """``path`` cut in its middle row, as by an interrupted copy: after ``keep_fields``
    fields of that row, or (None) one character before its end. Its line number."""
    lines = path.read_text().splitlines(keepends=True)
    middle = len(lines) // 2
    row = lines[middle].rstrip("\n")
    cut = row[:-1] if keep_fields is None else ",".join(row.split(",")[:keep_fields])
    path.write_text("".join(lines[:middle]) + cut)
    return middle + 1


@pytest.mark.parametrize("name", ["runs.csv", "tuning.csv"])
@pytest.mark.parametrize("keep_fields", [2, 6, None], ids=["before-status", "at-status", "last"])
def test_report_only_refuses_a_table_cut_short(study, tmp_path, capsys, name, keep_fields):
    """pandas reads the cut row's missing cells as blanks: a row without a status (or an ok
    one with blank measurements), and the report would be drawn from the rows before it."""
    copy_study(study, tmp_path)
    line = cut_short(tmp_path / name, keep_fields)
    fields = len((study / name).read_text().splitlines()[0].split(","))
    shape = f"has {keep_fields} of {fields} fields" if keep_fields else "ends without a line break"
    fix = "rerun 'riemann-bench train' with this --out, or restore the file"
    refused("train", tmp_path, f"{name} line {line} {shape}: the file is truncated; {fix}", capsys)


STATUSES = "(ok, diverged, solver failed)"


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("runs.csv", lambda df: second(df, status=""), f"line 3: status is blank, not one of those the study records {STATUSES}"),
        ("runs.csv", lambda df: second(df, status="diverged", lr=""), "line 3: lr is blank, but the study records it in every row"),
        ("tuning.csv", lambda df: second(df, method=""), "line 3: method is blank"),
        ("runs.csv", lambda df: second(df, method="adam"), "line 3: method is 'adam', not one of those the study records (sgd, layerwise)"),
        ("tuning.csv", lambda df: second(df, method="rmsprop"), "line 3: method is 'rmsprop', not one"),
        ("runs.csv", lambda df: second(df, model="cnn"), "line 3: model is 'cnn', not one of those the study records (mlp)"),
        ("runs.csv", lambda df: second(df, status="done"), f"line 3: status is 'done', not one of those the study records {STATUSES}"),
        ("tuning.csv", lambda df: second(df, status="finished"), "line 3: status is 'finished', not one"),
    ],
    ids=["blank-status", "blank-lr", "blank-method", "adam", "rmsprop", "model", "done", "finished"],
)  # fmt: skip
def test_report_only_refuses_blank_or_unknown_labels(study, tmp_path, capsys, name, edit, message):
    """Only the study's models and methods and the statuses a run ends with: a row of
    another one would be drawn as a method of its own, or left out as not ok."""
    refused_after_edit(study, tmp_path, capsys, name, edit, message)


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("tuning.csv", lambda df: second(df, lr="-1"), "line 3: lr is -1, but it must be positive and finite"),
        ("tuning.csv", lambda df: second(df, lr="0"), "line 3: lr is 0, but it must be positive"),
        ("tuning.csv", lambda df: second(df, damping="-0.1"), "line 3: damping is -0.1, but it must be positive"),
        ("runs.csv", lambda df: second(df, damping="0"), "line 3: damping is 0, but it must be positive"),
        ("tuning.csv", lambda df: second(df, damping="0.1"), "line 3: damping is 0.1, but method 'sgd' takes none"),
        ("runs.csv", lambda df: second(df, method="layerwise"), "line 3: damping is blank, but method 'layerwise' takes one"),
        ("runs.csv", lambda df: second(df, time_s="-5"), "line 3: time_s is -5, but it must be >= 0"),
        ("runs.csv", lambda df: second(df, test_accuracy="2.5"), "line 3: test_accuracy is 2.5, but it must be within [0, 1]"),
        ("tuning.csv", lambda df: second(df, validation_accuracy="-0.1"), "line 3: validation_accuracy is -0.1, but it must be within [0, 1]"),
        ("runs.csv", lambda df: second(df, train_loss="-0.2"), "line 3: train_loss is -0.2, but it must be >= 0"),
        ("runs.csv", lambda df: second(df, step="2.5"), "line 3: step is 2.5, but it must be a whole number >= 0"),
        ("runs.csv", lambda df: second(df, seed="-1"), "line 3: seed is -1, but it must be a whole number >= 0"),
    ],
    ids=["lr-neg", "lr-zero", "damping-neg", "damping-zero", "damping-sgd", "no-damping",
         "time-neg", "accuracy-2.5", "accuracy-neg", "loss-neg", "step-half", "seed-neg"],
)  # fmt: skip
def test_report_only_refuses_impossible_numbers(study, tmp_path, capsys, name, edit, message):
    """Each number within what a run can write: a negative time or an accuracy above 1
    would flow into the tables and the summary as if measured."""
    refused_after_edit(study, tmp_path, capsys, name, edit, message)


def refused_after_edit(study, tmp_path, capsys, name, edit, message):
    """A copy of ``study`` whose table ``name`` went through ``edit`` is refused."""
    copy_study(study, tmp_path)
    edit(pd.read_csv(tmp_path / name, dtype=str)).to_csv(tmp_path / name, index=False)
    refused("train", tmp_path, f"{name} {message}", capsys)


def set_key(record, key, value):
    """``record`` with ``key`` (``a.b`` for a nested one) set to ``value``, or removed (None)."""
    *parents, last = key.split(".")
    for parent in parents:
        record = record[parent]
    if value is None:
        del record[last]
    else:
        record[last] = value


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("study", "x", "'study' is 'x', but the study records an object there"),
        ("environment", [], "'environment' is [], but the study records an object there"),
        ("study.target_accuracy", "0.95", "'study.target_accuracy' is '0.95', but the study records a finite number there"),
        ("study.methods", ["sgd", 3], "'study.methods' is ['sgd', 3], but the study records a list of names there"),
        ("steps", True, "'steps' is True, but the study records a whole number >= 0 there"),
        ("split", None, "lacks 'split'"),
        ("study.dtype", None, "lacks 'study.dtype'"),
        ("study.evaluations", None, "lacks 'study.evaluations'"),  # (found by review: a TypeError's text)
    ],
)  # fmt: skip
def test_report_only_refuses_a_record_of_the_wrong_kind(
    study, tmp_path, capsys, key, value, message
):
    """Instead of a TypeError or KeyError traceback from the middle of the report."""
    copy_study(study, tmp_path)
    record = json.loads((study / "training.json").read_text())
    set_key(record, key, value)
    (tmp_path / "training.json").write_text(json.dumps(record))
    fix = ": rerun 'riemann-bench train' with this --out"
    refused(
        "train", tmp_path, f"training.json{'' if value is None else ':'} {message}{fix}", capsys
    )


#: (found by a hunt: each was drawn on the report) a command and environment no run of
#: ``riemann-bench <subcommand>`` records, as ``(key, value, message)``; ``SUB`` stands for
#: the subcommand
PROVENANCE = [
    ("command", "rm -rf /", "command is 'rm -rf /', not a command line of riemann-bench SUB"),
    ("command", "riemann-bench targets", "command is 'riemann-bench targets', not a command line of riemann-bench SUB"),
    ("command", "", "command is '', not a command line of riemann-bench SUB"),
    ("command", "riemann-bench SUB\n# Hacked", "command 'riemann-bench SUB\\n# Hacked' holds a control character (a line break?)"),
    ("environment", {}, "environment lacks commit"),
    ("environment.threads", "2", "environment.threads is '2', not a whole number >= 1"),
    ("environment.device_name", None, "environment lacks device_name"),
    ("environment.cpu", {"a": 1}, "environment entry 'cpu' is {'a': 1}, not text on one line, a whole number or true/false"),
    ("environment.device", "cuda", "command gives no --device (so cpu), but environment.device is 'cuda'"),
    ("command", "riemann-bench SUB --device cuda", "command gives --device cuda, but environment.device is 'cpu'"),
]  # fmt: skip


def refused_provenance(sub, source, out, capsys, key, value, message):
    """``sub --report-only`` on a copy of the study in ``source`` whose record's ``key``
    is ``value`` is refused naming the file, ``message`` and the fix, nothing written."""
    copy_study(source, out)
    name = {"train": "training.json", "stability": "stability.json"}[sub]
    record = json.loads((source / name).read_text())
    set_key(record, key, value if not isinstance(value, str) else value.replace("SUB", sub))
    (out / name).write_text(json.dumps(record))
    fix = f": rerun 'riemann-bench {sub}' with this --out"
    refused(sub, out, f"{name}: {message.replace('SUB', sub)}{fix}", capsys)


@pytest.mark.parametrize("key, value, message", PROVENANCE)
def test_report_only_refuses_a_command_or_environment_no_run_records(
    study, tmp_path, capsys, key, value, message
):
    """Found by a hunt: a foreign or empty command, one with a line break and a heading
    after it (which rewrote report.md), an empty environment or one of the wrong kinds,
    and a command of another device than its environment's were all drawn."""
    refused_provenance("train", study, tmp_path, capsys, key, value, message)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("study.models", ["mlp", "xyz"], "'study' holds options the command refuses (unknown model(s) ['xyz']"),
        ("study.lrs.sgd", None, "'study' holds options the command refuses (no learning rates for method(s) ['sgd']"),
        ("study.target_accuracy", 7, "'study' holds options the command refuses (--target-accuracy must lie in (0, 1], got 7): rerun 'riemann-bench train' with this --out"),
        ("study.dtype", "float16", "'study' holds options the command refuses (unknown dtype(s) ['float16']"),
        ("study.lrs.sgd", ["abc"], "but the study records an object of lists of finite numbers there"),
        ("split.train", "x", "but the study records an object of whole numbers >= 0 there"),
        ("seeds", [0, 0], "'seeds' holds options the command refuses (seeds: 0 given more than once"),
    ],
)  # fmt: skip
def test_report_only_refuses_options_the_command_refuses(
    study, tmp_path, capsys, key, value, message
):
    """Found by a hunt: an unknown model or method, or a learning rate missing, stopped the
    report with a KeyError (exit 3); a target accuracy of 7 or a learning rate "abc" were
    printed in the report as recorded."""
    copy_study(study, tmp_path)
    record = json.loads((study / "training.json").read_text())
    set_key(record, key, value)
    (tmp_path / "training.json").write_text(json.dumps(record))
    refused("train", tmp_path, message, capsys)


@pytest.mark.parametrize(
    "key, value, message",
    [
        # found by a hunt: each was reported as the study's
        ("seed", 2**80, f"'seed' is {2**80}, but the study records a seed, a whole number from 0 to {2**64 - 1} there"),
        ("eval_every", 0, "'eval_every' is 0, but the study derives 5 from its options, seed and split there"),
        ("steps", 16, "'steps' is 16, but the study derives 17 from its options"),
        ("examples_per_run", 1, "'examples_per_run' is 1, but the study derives 544 from its options"),
        ("tuning_seed", 0, "'tuning_seed' is 0, but the study derives 2 from its options"),
        ("seeds", [0, 5], "'seeds' is [0, 5], but the study derives [0, 1] from its options"),
        ("study.seeds", 10**20, f"'seeds' lists 2 seeds, but the study's --seeds is {10**20}"),
    ],
)  # fmt: skip
def test_report_only_refuses_a_record_the_study_cannot_have_written(
    study, tmp_path, capsys, key, value, message
):
    """What the study derives from its options, seed and split (the budget in steps, the
    evaluation spacing, the seeds) is what it records; a seed past ``--seed``'s bound, or
    options the command refuses, it cannot have run with."""
    copy_study(study, tmp_path)
    record = json.loads((study / "training.json").read_text())
    set_key(record, key, value)
    (tmp_path / "training.json").write_text(json.dumps(record))
    refused("train", tmp_path, f"training.json: {message}", capsys)


def test_report_only_takes_the_evaluation_spacing_an_earlier_study_wrote(tmp_path, monkeypatch):
    """Before ec66fe2 a study evaluated every max(1, steps // evaluations) steps, not
    max(1, ceil(steps / evaluations)): reports/cpu/training as committed at 8a5bf94 (a real
    default run) records 16 where 17 is derived now. Its record is reported, not refused."""
    derive = training.plan

    def older_plan(study, seed, train_size):
        derived = derive(study, seed, train_size)
        return {**derived, "eval_every": max(1, derived["steps"] // study.evaluations)}

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(training, "plan", older_plan)
        assert cli.main([*SMALL, "--out", str(out)]) == 0
    meta = json.loads((out / "training.json").read_text())
    assert (meta["steps"], meta["eval_every"]) == (17, 4)  # 5 by the current spacing
    assert cli.main(["train", "--report-only", "--out", str(out)]) == 0


def test_report_only_takes_the_blanks_a_run_writes(study, tmp_path):
    """A diverged row may lack measurements and sgd has no damping: neither is refused."""
    for file in ("runs.csv", "tuning.csv", "training.json"):
        (tmp_path / file).write_bytes((study / file).read_bytes())
    tuning = pd.read_csv(tmp_path / "tuning.csv")
    assert tuning["damping"].isna().any()  # sgd's rows
    tuning.loc[0, "status"] = "diverged"
    tuning.loc[0, ["validation_loss", "validation_accuracy"]] = [np.inf, np.nan]
    tuning.to_csv(tmp_path / "tuning.csv", index=False)
    assert cli.main(["train", "--report-only", "--out", str(tmp_path)]) == 0


def test_report_only_that_fails_half_way_leaves_the_last_report(
    study, tmp_path, capsys, monkeypatch
):
    """Not a new curves figure beside the old tuning figure and report.md."""
    from riemann_core.studies import training_report

    for file in ("runs.csv", "tuning.csv", "training.json"):
        (tmp_path / file).write_bytes((study / file).read_bytes())
    for file in ("curves_mlp.png", "tuning_mlp.png", "report.md"):
        (tmp_path / file).write_text(f"the previous {file}\n")
    failing_report_changes_nothing(
        tmp_path, "train", training_report, "tuning_figure", monkeypatch, capsys
    )


def failing_report_changes_nothing(out, command, module, step, monkeypatch, capsys):
    """``command --report-only`` with ``module.step`` failing half way exits 2 naming the
    failure, and every file in ``out`` is as it was (the report is staged)."""
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing(*args):
        raise ValueError(f"{step} failed")

    monkeypatch.setattr(module, step, failing)
    assert cli.main([command, "--report-only", "--out", str(out)]) == 2
    assert f"{step} failed" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    "options, message",
    [
        (["--methods", "sgd,lbfgs"], "unknown method(s) ['lbfgs']; choose from sgd, adam"),
        (["--models", "resnet"], "unknown model(s) ['resnet']"),
        (
            ["--lrs", "0.1,-1"],
            "--lrs must be positive and at most the largest float32 (3.4e+38), got [-1.0]\n",
        ),
        (
            ["--dampings", "0"],
            "--dampings must be positive and at most the largest float32 (3.4e+38), got [0.0]\n",
        ),
        # found by a hunt: a traceback, exit 3, from the optimiser's or the solver's overflow
        (
            ["--lrs", "1e300"],
            "--lrs must be positive and at most the largest float32 (3.4e+38), got [1e+300]\n",
        ),
        (
            ["--dampings", "1e300"],
            "--dampings must be positive and at most the largest float32 (3.4e+38), got [1e+300]\n",
        ),
        (["--lrs", "0.1,0.1"], "--lrs: 0.1 given more than once"),
        (["--models", "mlp,mlp"], "models: mlp given more than once"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--epochs", "0"], "--epochs must be positive and finite"),
        (["--epochs", "inf"], "--epochs must be positive and finite, got inf"),
        (["--target-accuracy", "1.5"], "--target-accuracy must lie in (0, 1]"),
        (["--batch-size", "0"], "--batch-size and --evaluations must be positive"),
        (["--batch-size", "5000"], "--batch-size may be at most the 1078 training examples"),
    ],
)
def test_bad_options_fail_before_any_training(options, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["train", "--quick", *options, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def refused_before_the_data(command, options, message, tmp_path, capsys, monkeypatch):
    """``command --quick options`` exits 2 naming ``message`` before it loads the digits
    (a study that started would fail on them, exit 3, rather than run for days) and leaves
    no ``--out``."""

    def no_digits():
        raise AssertionError("the study loaded the digits: it started its work")

    monkeypatch.setattr(digits, "load_digits_arrays", no_digits)
    out = tmp_path / "out"
    assert cli.main([command, "--quick", *options, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "options, message",
    [
        # found by a hunt: the list of seeds was killed for memory
        (["--seeds", str(10**20)], f"--seeds {10**20} is more than 1000, the most a study trains (each one more run of every model and method): pass --seeds 1000 or fewer\n"),
        # found by a hunt: the first run's steps ran without end
        (["--epochs", "1e300"], "--epochs 1e+300 is more than 1000, the longest budget a study trains for"),
        # found by a hunt: the preconditioner refused it at the first damped run, after
        # the undamped ones were tuned
        (["--dampings", "0.1,1e-320"], "--dampings [1e-320] round to 0 in float32, the dtype the study trains in (its smallest subnormal is 1.4e-45): mu I would vanish; pass larger --dampings, or --dtype float64\n"),
    ],
)  # fmt: skip
def test_counts_past_days_and_vanishing_dampings_are_refused_before_any_work(
    options, message, tmp_path, capsys, monkeypatch
):
    refused_before_the_data("train", options, message, tmp_path, capsys, monkeypatch)


def test_the_bounds_take_their_own_values_and_float64_takes_small_dampings():
    check_work(replace(DEFAULT, seeds=MAX_SEEDS, epochs=MAX_EPOCHS))
    check_work(replace(DEFAULT, dampings=(1e-320,), dtype="float64"))


def test_a_record_of_a_study_past_the_bounds_of_new_ones_is_valid():
    """Found by review: the bounds on new studies refused records that finished (epochs
    past 1000, or a damping that is 0 in float32, its runs recorded as diverged, both taken
    by earlier versions): only a new study is held to them (:func:`check_work`)."""
    past = replace(DEFAULT, seeds=MAX_SEEDS + 1, epochs=2 * MAX_EPOCHS, dampings=(0.1, 1e-320))
    assert check_study(past) is past
    with pytest.raises(ValueError, match="round to 0 in float32"):
        check_work(past)


def test_choose_takes_the_lowest_validation_loss_among_runs_that_did_not_diverge():
    tuning = pd.DataFrame({
        "model": ["mlp"] * 4, "method": ["natural"] * 4, "lr": [0.1, 0.3, 1.0, 3.0],
        "damping": [0.1] * 4, "status": ["ok", "ok", "diverged", "ok"],
        "validation_loss": [0.5, 0.2, 0.01, np.nan],
    })  # fmt: skip
    config = choose(tuning, "mlp", "natural")
    assert (config.lr, config.damping) == (0.3, 0.1)
    tuning["status"] = "diverged"
    assert choose(tuning, "mlp", "natural") is None


def test_steps_and_time_to_target_take_the_first_evaluation_at_target():
    runs = pd.DataFrame({
        "model": "mlp", "method": "sgd", "status": "ok",
        "seed": [0, 0, 0, 1, 1, 1, 2, 2, 2],
        "step": [0, 10, 20] * 3,
        "time_s": [0.0, 1.0, 2.0, 0.0, 3.0, 6.0, 0.0, 1.0, 2.0],
        "test_accuracy": [0.1, 0.96, 0.97, 0.1, 0.5, 0.95, 0.1, 0.5, 0.9],
    })  # fmt: skip
    hits = to_target(runs, 0.95)
    assert hits["steps"].tolist()[:2] == [10, 20] and np.isnan(hits["steps"].iloc[2])
    assert hits["time_s"].tolist()[:2] == [1.0, 6.0]
    row = target_table(runs, 0.95).iloc[0]
    assert row["reached"] == "2/3"
    assert row["steps to target"] == "15 [10, 20]"
    assert row["time to target [s]"] == "3.5 [1, 6]"
    runs.loc[runs["seed"] == 0, "status"] = "diverged"  # it reached the target, then blew up
    assert target_table(runs, 0.95).iloc[0]["reached"] == "1/3"


def test_spread_is_median_and_range():
    assert spread(pd.Series([3.0, 1.0, 2.0])) == "2 [1, 3]"
    assert spread(pd.Series([np.nan, 4.0])) == "4"
    assert spread(pd.Series([], dtype=float)) == "-"


def test_a_study_where_everything_diverges_says_so(tmp_path, capsys):
    options = ["--models", "mlp", "--methods", "sgd", "--lrs", "1e36", "--epochs", "0.2"]
    assert cli.main(["train", "--quick", *options, "--out", str(tmp_path)]) == 2
    assert "every configuration diverged in tuning" in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "tuning.csv")["status"].eq("diverged").all()


def test_grid_edge_flags_winners_on_the_border_of_the_grid():
    from riemann_core.studies.training_report import grid_edge

    group = pd.DataFrame({"lr": [0.1, 0.3, 1.0, 0.1, 0.3, 1.0],
                          "damping": [0.01, 0.01, 0.01, 0.1, 0.1, 0.1]})  # fmt: skip
    assert grid_edge(group, group.iloc[4]) == "mu max"
    assert grid_edge(group, group.iloc[2]) == "lr max, mu min"
    plain = pd.DataFrame({"lr": [0.1, 0.3, 1.0], "damping": [np.nan] * 3})
    assert grid_edge(plain, plain.iloc[1]) == "-"


def test_a_study_interrupted_before_its_first_table_leaves_no_directory(tmp_path, monkeypatch):
    """The --out made for a study goes again when tuning is interrupted before any table
    is written (as a failed sweep's does)."""
    from riemann_core.studies import training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    assert cli.main(["train", "--quick", "--out", str(tmp_path / "new" / "out")]) == cli.INTERRUPTED
    assert list(tmp_path.iterdir()) == []


def test_a_study_stopped_early_leaves_no_earlier_runs_beside_its_record(
    study, tmp_path, monkeypatch
):
    """Found by review: a rerun into the same --out stopped after tuning left the earlier
    study's runs.csv beside the new training.json, and the report mixed the two. And the
    earlier study is kept whole, apart (found by review: deleted by a rerun that then
    failed)."""
    from riemann_core.measure import output

    copy_study(study, tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()}
    write_json = output.write_json

    def stopped(out, name, record):  # interrupted right after the record is written
        write_json(out, name, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(output, "write_json", stopped)
    assert cli.main([*SMALL, "--seed", "5", "--out", str(tmp_path)]) == cli.INTERRUPTED
    assert json.loads((tmp_path / "training.json").read_text())["seed"] == 5
    for name in ("runs.csv", "report.md", "curves_mlp.png", "tuning_mlp.png"):
        assert not (tmp_path / name).exists()
    (earlier,) = tmp_path.glob("earlier-*")
    assert {f.name: f.read_bytes() for f in earlier.iterdir()} == before


@pytest.mark.parametrize("table", ["training.json", "runs.csv"])
def test_ctrl_c_points_to_report_only_only_where_it_can_draw(table, tmp_path, monkeypatch, capsys):
    """Found by a hunt: stopped after tuning, before runs.csv, train said "--report-only
    with the same --out draws the report of what finished", which then refused the --out
    (no runs.csv). Stopped right after ``table`` is written, what it says holds."""
    assert_ctrl_c_hint(SMALL, table, "runs.csv", tmp_path, monkeypatch, capsys)


def assert_ctrl_c_hint(argv, table, drawn_from, tmp_path, monkeypatch, capsys) -> None:
    """The study ``argv`` stopped by Ctrl-C right after ``table`` is written points to
    ``--report-only`` exactly where the table it draws from, ``drawn_from``, is there."""
    from riemann_core.measure import output

    write_atomic = output.write_atomic  # (write_json writes through it)

    def stop_after(path, text):
        write_atomic(path, text)
        if path.name == table:
            raise KeyboardInterrupt

    monkeypatch.setattr(output, "write_atomic", stop_after)
    out = tmp_path / "out"
    assert cli.main([*argv, "--out", str(out)]) == cli.INTERRUPTED
    err = capsys.readouterr().err
    drawn = cli.main([argv[0], "--report-only", "--out", str(out)])
    if table == drawn_from:
        assert "--report-only with the same --out draws the report of what finished" in err
        assert drawn == 0
    else:
        assert f"nothing --report-only could draw was written yet (no {out / drawn_from})" in err
        assert "draws the report" not in err and drawn == cli.USAGE_ERROR


def test_the_summary_does_not_crown_a_method_for_one_lucky_seed():
    """Found by review: medians over the seeds that reached the target let a method that
    reached it in 1 of 2 seeds win "least time". Seeds that never reached it count as
    never: ``fast`` (1 of 2, at 10 steps) has no median, ``steady`` (2 of 2, at 40) wins."""

    def run(method, seed, hit_step):
        return [
            dict(model="mlp", method=method, seed=seed, step=s, time_s=s / 100, status="ok",
                 test_accuracy=0.9 if hit_step is not None and s >= hit_step else 0.5)
            for s in (10, 20, 40, 80)
        ]  # fmt: skip

    runs = pd.DataFrame(
        run("fast", 0, 10) + run("fast", 1, None) + run("steady", 0, 40) + run("steady", 1, 40)
    )
    (line,) = summary(runs, 0.8)
    assert "fewest steps to 0.8 test accuracy: `steady` (40)" in line
    assert "least time: `steady`" in line


def _short_run(df):
    """Every record of the last run past its first two removed: an ok run cut short."""
    last = (df["method"] == df["method"].iloc[-1]) & (df["seed"] == df["seed"].iloc[-1])
    steps = df.loc[last, "step"].astype(int)
    return df[~last | (df["step"].astype(int) <= sorted(steps)[1])]


def _off_grid(df):
    """The second record of the first run a step later."""
    df.loc[1, "step"] = str(int(df.loc[1, "step"]) + 1)
    return df


def _other_choice(df):
    """The tuning of sgd rewritten so that its other learning rate wins."""
    sgd = df.index[df["method"] == "sgd"]
    losses = df.loc[sgd, "validation_loss"].astype(float)
    df.loc[sgd, "validation_loss"] = (losses.max() + losses.min() - losses).map(repr)
    return df


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("runs.csv", lambda df: pd.concat([df, df.iloc[[3]]]), "repeats the model, method, seed, step of an earlier line"),
        ("tuning.csv", lambda df: pd.concat([df, df.iloc[[0]]]), "repeats the model, method, lr, damping"),
        ("runs.csv", _short_run, "is marked ok but its records stop at step"),
        ("tuning.csv", _other_choice, "the two files come from different studies"),
        # found by a hunt: reported with the wrong seeds, or a curve bent off the grid
        ("runs.csv", lambda df: df.assign(seed=df["seed"].replace("1", "7")), "holds a seed that training.json"),
        ("runs.csv", _off_grid, "holds a step off the evaluation grid"),
        # found by a hunt: a run's clock that went back, or started late, was reported
        ("runs.csv", lambda df: second(df, time_s="1e9"), "runs.csv line 4 holds a time_s below that of an earlier step of its run"),
        ("runs.csv", lambda df: df.assign(time_s=df["time_s"].mask(df.index == 0, "5")), "runs.csv line 2 holds a time_s other than 0 at step 0"),
    ],
    ids=["runs-twice", "tuning-twice", "ok-run-cut-short", "tuning-chooses-another",
         "seed-not-recorded", "step-off-grid", "time-back", "time-at-step-0"],
)  # fmt: skip
def test_report_only_refuses_results_the_study_cannot_have_written(
    study, tmp_path, capsys, name, edit, message
):
    """Found by review: duplicated records (counted twice by the curves), an ok run stopping
    before the budget (shown under "end of budget"), and runs trained at another
    configuration than the tuning chooses were drawn into the report, exit 0."""
    copy_study(study, tmp_path)
    edit(pd.read_csv(tmp_path / name, dtype=str)).to_csv(tmp_path / name, index=False)
    refused("train", tmp_path, message, capsys)


def test_an_interrupted_study_is_reported_as_incomplete(study, tmp_path):
    """A study interrupted after its first round of seeds (runs.csv is written after each):
    the report says which seeds were not trained (found by review: it listed every planned
    seed as reported)."""
    copy_study(study, tmp_path)
    runs = pd.read_csv(tmp_path / "runs.csv")
    runs[runs["seed"] == 0].to_csv(tmp_path / "runs.csv", index=False)
    assert cli.main(["train", "--report-only", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "**An incomplete study** (interrupted?): mlp/sgd: seeds [1] not trained" in report
    assert "**An incomplete study**" not in (study / "report.md").read_text()


def test_the_best_final_accuracy_names_ties_and_counts_unfinished_seeds():
    """Found by review: the first of tied methods alone was named, and a method whose
    other seeds diverged won on its one finished seed."""
    from riemann_core.studies.training_report import summary

    rows = []
    for method, accuracies in (("sgd", [0.9, 0.9, 0.9]), ("adam", [0.9, 0.9, 0.9]),
                               ("kfac", [0.99, None, None])):  # fmt: skip
        for seed, accuracy in enumerate(accuracies):
            rows.append({"model": "mlp", "method": method, "seed": seed, "step": 10,
                         "time_s": 1.0, "test_accuracy": accuracy,
                         "status": "ok" if accuracy else "diverged"})  # fmt: skip
    (line,) = summary(pd.DataFrame(rows), target=0.95)
    assert (
        "highest median final test accuracy: `sgd` and `adam` (0.9000; next `kfac` 0.0000: "
        "the seeds' ranges overlap, no method is ahead beyond them)" in line
    )


def final_accuracies(bases, seeds: int, step: float) -> pd.DataFrame:
    """Final rows of ``seeds`` finished seeds per ``(method, accuracy)`` of ``bases``, seed
    ``s`` at ``accuracy + step s``."""
    return pd.DataFrame(
        {
            "model": "mlp",
            "method": method,
            "seed": s,
            "step": 10,
            "time_s": 1.0,
            "test_accuracy": accuracy + step * s,
            "status": "ok",
        }  # fmt: skip
        for method, accuracy in bases
        for s in range(seeds)
    )


@pytest.mark.parametrize("gap", [0.001, 0.05])
def test_a_method_is_called_best_only_where_every_seed_of_it_leads(gap):
    """Found by a hunt: a lead of one test image of 359 (0.9666 against 0.9638, ranges
    overlapping) was called the best final test accuracy."""
    from riemann_core.studies.training_report import summary

    (line,) = summary(final_accuracies((("sgd", 0.9), ("kfac", 0.91 + gap)), 3, 0.01), 0.99)
    if gap > 0.02:  # kfac's lowest seed above sgd's highest
        assert "best final test accuracy: `kfac`" in line and "overlap" not in line
    else:
        assert "highest median final test accuracy: `kfac`" in line
        assert "the seeds' ranges overlap, no method is ahead beyond them" in line


@pytest.mark.parametrize("seeds", [1, 2])
def test_with_fewer_than_three_seeds_no_method_is_called_best(seeds):
    """Found by a hunt: with one seed the ranges are points and never overlap, so a lead of
    one test image of 359 was called the best final test accuracy."""
    from riemann_core.studies.training_report import summary

    final = final_accuracies((("sgd", 0.7772), ("kfac", 0.7799)), seeds, 0.001)
    (line,) = summary(final, target=0.99)
    assert "highest median final test accuracy: `kfac`" in line and "best" not in line
    per = "seed per method" if seeds == 1 else "seeds per method"
    assert f"{seeds} {per}, too few to tell a lead from the seeds' spread (3 or more)" in line


def test_the_summary_names_winners_at_the_grid_edge_and_unequal_tuning():
    """Found by review: the summary's winners sat at the edge of their grid, and the damped
    methods had 3x the tuning tries, which only the tables showed."""
    from riemann_core.studies.training_report import tuning_caveats

    rows = [{"model": "mlp", "method": "sgd", "lr": lr, "damping": np.nan, "status": "ok",
             "validation_loss": loss, "validation_accuracy": 0.9}
            for lr, loss in ((0.1, 0.5), (0.3, 0.4))]  # fmt: skip
    rows += [{"model": "mlp", "method": "layerwise", "lr": lr, "damping": mu, "status": "ok",
              "validation_loss": 0.3 if (lr, mu) == (0.3, 1.0) else 0.6,
              "validation_accuracy": 0.9}
             for lr in (0.1, 0.3, 1.0) for mu in (0.1, 1.0)]  # fmt: skip
    edge, counts = tuning_caveats(pd.DataFrame(rows))
    assert "`mlp/sgd` (lr max); `mlp/layerwise` (mu max)" in edge
    assert counts.endswith("6 for `layerwise`; 2 for `sgd`.")


def test_unequal_tuning_is_named_per_model_where_the_models_differ():
    from riemann_core.studies.training_report import tuning_caveats

    def rows(model, method, lrs):
        return [{"model": model, "method": method, "lr": lr, "damping": np.nan, "status": "ok",
                 "validation_loss": lr, "validation_accuracy": 0.9} for lr in lrs]  # fmt: skip

    tuning = pd.DataFrame(
        rows("mlp", "sgd", (0.1, 0.3, 1.0)) + rows("mlp", "adam", (0.1, 0.3))
        + rows("cnn", "sgd", (0.1, 0.3)) + rows("cnn", "adam", (0.1, 0.3))
    )  # fmt: skip
    (*_, line) = tuning_caveats(tuning)
    assert (
        line
        == "- Configurations tried in tuning for `mlp` (more tries favour a method): 3 for `sgd`; 2 for `adam`."
    )


def test_report_only_refuses_records_after_a_run_ended(study, tmp_path, capsys):
    """Found by a hunt: a record marked diverged followed by ok records of the same run was
    read, and moved a steps-to-target interval; a run ends at its first record not ok."""
    copy_study(study, tmp_path)
    runs = pd.read_csv(study / "runs.csv")
    first = runs.index[(runs["status"] == "ok")]
    run = runs.loc[first[0], ["model", "method", "seed"]]
    same = runs.index[
        (runs["model"] == run["model"]) & (runs["method"] == run["method"])
        & (runs["seed"] == run["seed"])
    ]  # fmt: skip
    runs.loc[same[1], "status"] = "diverged"
    runs.to_csv(tmp_path / "runs.csv", index=False)
    message = f"runs.csv line {same[2] + 2}: the run {run['model']}/{run['method']} seed"
    refused("train", tmp_path, message, capsys)


def test_the_tuning_figure_marks_what_diverged(tmp_path, monkeypatch):
    """A configuration that diverged is a cross at the top edge of its method's panel: a
    method whose every configuration diverged showed an empty panel."""
    from riemann_core.studies import training_report

    tuning = pd.DataFrame(
        {
            "model": "mlp",
            "method": ["sgd"] * 3 + ["layerwise"] * 2,
            "damping": [None, None, None, 1e-3, 1e-3],
            "lr": [0.01, 0.1, 1.0, 0.1, 1.0],
            "validation_loss": [0.9, 0.5, None, None, None],
            "status": ["ok", "ok", "diverged", "diverged", "solver failed"],
        }
    )
    figures = []
    monkeypatch.setattr(training_report, "save_figure", lambda fig, path: figures.append(fig))
    training_report.tuning_figure(tuning, "mlp", tmp_path / "tuning.png")
    (fig,) = figures
    sgd, layerwise = fig.axes

    def points(ax, marker):
        return [len(line.get_xdata()) for line in ax.lines if line.get_marker() == marker]

    assert points(sgd, "o") == [3] and points(sgd, "x") == [1]
    assert points(layerwise, "x") == [2]
    monkeypatch.undo()  # laid out and written without a warning (an empty line of crosses,
    with warnings.catch_warnings():  # where none diverged, defeated tight_layout)
        warnings.simplefilter("error")
        wide = pd.concat([tuning.assign(method=m, status="ok") for m in "abcdef"])
        training_report.tuning_figure(wide, "mlp", tmp_path / "t.png")


def test_report_only_reads_a_run_that_diverged_as_the_study_writes_it(study, tmp_path):
    """Found by a hunt: the study writes a diverged run's status into every record of it,
    and its own report refused that (exit 2, 'the run ended at step 0'), so a study whose
    reported run diverged wrote no report."""
    copy_study(study, tmp_path)
    runs = pd.read_csv(study / "runs.csv")
    run = runs.iloc[0][["model", "method", "seed"]]
    same = (runs[["model", "method", "seed"]] == run).all(axis=1)
    cut = same & (runs["step"] > sorted(runs.loc[same, "step"])[1])
    runs = runs[~cut]
    runs.loc[same[~cut], "status"] = "diverged"
    runs.to_csv(tmp_path / "runs.csv", index=False)
    assert cli.main(["train", "--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() != (study / "report.md").read_text()


@pytest.mark.parametrize("split", [{"validation": 360, "test": 359}, {"train": 0,
                                   "validation": 360, "test": 359}])  # fmt: skip
def test_report_only_refuses_a_split_without_training_examples(study, tmp_path, capsys, split):
    """Found by a hunt: a KeyError or ZeroDivisionError, exit code 3."""
    copy_study(study, tmp_path)
    record = json.loads((tmp_path / "training.json").read_text())
    record["split"] = split
    (tmp_path / "training.json").write_text(json.dumps(record))
    refused("train", tmp_path, "training.json: 'split' is", capsys)
