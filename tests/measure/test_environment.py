"""The environment record."""

import pytest
import torch

from riemann_core.measure import environment


def test_environment_record_names_what_a_report_needs():
    env = environment.environment("cpu")
    for key in ("commit", "torch", "device_name", "cpu", "threads", "blas", "python"):
        assert env[key] not in ("", None)
    assert env["torch"] == torch.__version__


def test_the_commit_is_unknown_for_a_copy_installed_inside_another_checkout(tmp_path):
    """Found by review: a package installed (not editable) into an environment inside a
    checkout was recorded as that checkout's HEAD, clean, whatever code it held."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    tracked = tmp_path / "riemann_core"
    tracked.mkdir()
    (tracked / "__init__.py").write_text("")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    installed = tmp_path / ".venv" / "site-packages" / "riemann_core"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    assert environment.git_commit(installed) == "unknown"
    commit = environment.git_commit(tracked)
    assert len(commit) == 12 and int(commit, 16) >= 0


def test_the_code_fingerprint_follows_the_sources_alone(tmp_path):
    """Equal for copies of the same sources (wherever they lie, with or without compiled
    caches beside them), different once one byte of one module changes."""
    copies = []
    for name in ("a", "b"):
        package = tmp_path / name / "riemann_core"
        (package / "sub").mkdir(parents=True)
        (package / "__init__.py").write_text("x = 1\n")
        (package / "sub" / "m.py").write_text("y = 2\n")
        copies.append(package)
    (copies[1] / "sub" / "m.cpython-311.pyc").write_bytes(b"\0cache")
    assert environment.code_fingerprint(copies[0]) == environment.code_fingerprint(copies[1])
    (copies[1] / "sub" / "m.py").write_text("y = 3\n")
    environment.code_fingerprint.cache_clear()
    assert environment.code_fingerprint(copies[0]) != environment.code_fingerprint(copies[1])
    assert len(environment.code_fingerprint()) == 12  # this package's own


def test_provenance_takes_every_committed_record_and_the_commands_riemann_bench_records():
    """Every committed record (each study's command and environment) is drawn as before; so
    is a command whose --out names where the directory was (moved since), and one whose
    --device is given as argparse takes it (``--device=cuda:1``, ``--dev cuda``)."""
    import json
    from pathlib import Path

    reports = Path(__file__).resolve().parents[2] / "reports"
    records = {"targets.json": "targets", "training.json": "train",
               "stability.json": "stability", "run.json": "distributed"}  # fmt: skip
    found = 0
    for name, sub in records.items():
        for path in reports.glob(f"**/{name}"):
            record = json.loads(path.read_text())
            assert environment.provenance_problem(record, f"riemann-bench {sub}") is None, path
            found += 1
    assert found >= 5
    env = environment.environment("cpu")
    for command, device in [
        ("riemann-bench targets --out /somewhere/else", "cpu"),
        ("riemann-bench targets --device=cuda:1 --out 'a dir'", "cuda:1"),
        ("riemann-bench targets --dev cuda", "cuda"),
        ("riemann-bench targets --device cuda --device cpu", "cpu"),  # the last, as argparse
    ]:
        record = {"command": command, "environment": env | {"device": device}}
        assert environment.provenance_problem(record, "riemann-bench targets") is None, command


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"command": "rm -rf /"}, "command is 'rm -rf /', not a command line of riemann-bench targets"),
        ({"command": "riemann-bench train --out x"}, "not a command line of riemann-bench targets"),
        ({"command": ""}, "command is '', not a command line of"),
        ({"command": "riemann-bench targets 'open"}, "not a command line of"),
        ({"command": 5}, "command is 5, not text"),
        ({"command": "riemann-bench targets\n# Hacked"}, "holds a control character"),
        ({"command": "riemann-bench targets\r"}, "holds a control character"),
        ({"command": "riemann-bench targets\u2028x"}, "holds a control character"),
        ({"environment": {}}, "environment lacks commit"),
        ({"environment": None}, "environment is None, not a mapping"),
        ({"threads": "2"}, "environment.threads is '2', not a whole number >= 1"),
        ({"threads": 0}, "environment.threads is 0, not a whole number >= 1"),
        ({"threads": True}, "environment.threads is True, not a whole number >= 1"),
        ({"device_name": ["x"]}, "environment.device_name is ['x'], not text"),
        ({"commit": "abc\n# x"}, "environment.commit is 'abc\\n# x', not text"),
        ({"device": "mps"}, "environment.device is 'mps', not cpu[:N] or cuda[:N]"),
        ({"blas": {"a": 1}}, "environment entry 'blas' is {'a': 1}, not text on one line"),
        ({"python": None}, "environment entry 'python' is None, not text"),
        ({"device": "cuda"}, "command gives no --device (so cpu), but environment.device is 'cuda'"),
        ({"command": "riemann-bench targets --device cuda"}, "command gives --device cuda, but environment.device is 'cpu'"),
        ({"command": "riemann-bench targets --device"}, "command gives --device '', not cpu[:N]"),
    ],
)  # fmt: skip
def test_provenance_refuses_a_command_or_environment_no_run_records(edit, message):
    """Found by a hunt: a foreign or empty command, a newline and a heading in it, an empty
    environment or one of the wrong kinds, and a command of another device than its
    environment's were all drawn on the pages."""
    record = {"command": "riemann-bench targets --out x", "environment": environment.environment()}
    for key, value in edit.items():
        if key in ("command", "environment"):
            record[key] = value
        else:
            record["environment"][key] = value
    problem = environment.provenance_problem(record, "riemann-bench targets")
    assert problem is not None and message in problem
    del record["command"]
    assert environment.provenance_problem(record, "riemann-bench targets") == "lacks command"
