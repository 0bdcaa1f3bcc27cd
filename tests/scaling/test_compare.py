"""``riemann-bench compare``: paired rounds of two versions of the package, each in its own
worker process, on packages planted with a known slowdown or error."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

import riemann_core
from riemann_core import cli
from riemann_core.measure import paired
from riemann_core.scaling import compare

REPO = Path(riemann_core.__file__).resolve().parents[1]

#: The calls that a planted package's ``rc.direction`` makes first: a sleep of 20 ms (the
#: tiny network's euclidean direction takes about a millisecond on a 2-core CPU), or a
#: refusal of natural.
SLOWED = """
import time as _time
_direction = direction
def direction(*args, **kwargs):
    _time.sleep(0.02)
    return _direction(*args, **kwargs)
"""
REFUSING = """
_direction = direction
def direction(*args, method="layerwise", **kwargs):
    if method == "natural":
        raise ValueError("planted refusal")
    return _direction(*args, method=method, **kwargs)
"""

#: A package whose ``rc.direction`` kills its process on its seventh call (the warm-up's
#: first request makes four), or prints on standard output.
DYING = """
import os as _os
_direction, _calls = direction, []
def direction(*args, **kwargs):
    _calls.append(1)
    if len(_calls) > 6:
        _os._exit(3)
    return _direction(*args, **kwargs)
"""
#: A package whose ``rc.direction`` hangs from its seventh call on.
HANGING = DYING.replace("_os._exit(3)", "__import__('time').sleep(3600)")
PRINTING = """
print("planted: imported")
_direction = direction
def direction(*args, **kwargs):
    print("planted: direction")
    return _direction(*args, **kwargs)
"""


def planted(tmp_path: Path, name: str, code: str) -> Path:
    """A copy of the package whose ``__init__`` ends with ``code``."""
    root = tmp_path / name
    shutil.copytree(REPO / "riemann_core", root / "riemann_core")
    with open(root / "riemann_core" / "__init__.py", "a") as f:
        f.write(code)
    return root


#: A network small enough that every case is a few milliseconds at most.
TINY = ["--widths", "8,4,3", "--batch", "6"]


@pytest.fixture(autouse=True)
def short_runs(monkeypatch):
    monkeypatch.setattr(compare, "RUN_SECONDS", 0.005)


def records(out: Path) -> dict[str, dict]:
    payload = json.loads((out / "compare.json").read_text())
    return {r["case"]: r for r in payload["records"]}


def test_verdicts_need_the_whole_interval_past_the_threshold():
    assert compare.verdict(1.06, 1.2, 0.05) == compare.SLOWER
    assert compare.verdict(0.8, 0.95, 0.05) == compare.FASTER
    assert compare.verdict(0.96, 1.04, 0.05) == compare.UNCHANGED
    assert compare.verdict(1.01, 1.08, 0.05) == compare.NOISY
    assert compare.verdict(0.9, 1.1, 0.05) == compare.NOISY


def test_a_planted_slowdown_reads_slower_and_fails(tmp_path, capsys):
    slow = planted(tmp_path, "slow", SLOWED)
    out = tmp_path / "out"
    argv = ["compare", str(REPO), str(slow), *TINY, "--rounds", "5"]
    code = cli.main([*argv, "--cases", "euclidean", "--out", str(out)])
    got = records(out)
    euclidean = got["direction euclidean 8-4-3 b6"]
    assert euclidean["verdict"] == compare.SLOWER and euclidean["ratio"] > 1.5
    assert len(euclidean["ratios"]) == 5
    assert "sgd step 8-4-3 b6" in got  # the control comes with every selection
    assert code == 1
    assert "slower: direction euclidean" in capsys.readouterr().err
    assert {"compare.md", "compare.png"} <= {p.name for p in out.iterdir()}


def test_a_revision_against_itself_is_not_slower(tmp_path, monkeypatch):
    """``HEAD`` on both sides, each extracted by git archive: the pairing compares like
    with like (a threshold of 50%: what the test checks is the pairing, not the noise)."""
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    argv = ["compare", "HEAD", "HEAD", *TINY, "--rounds", "5", "--threshold", "0.5"]
    cli.main([*argv, "--cases", "layerwise", "--out", str(out)])
    payload = json.loads((out / "compare.json").read_text())
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert {s["commit"] for s in payload["sides"].values()} == {head}
    for record in payload["records"]:
        assert record["verdict"] in (compare.UNCHANGED, compare.NOISY), record


def test_a_case_a_side_raises_is_not_compared_and_the_others_are(tmp_path, capsys):
    refusing = planted(tmp_path, "refusing", REFUSING)
    out = tmp_path / "out"
    argv = ["compare", str(REPO), str(refusing), *TINY, "--rounds", "5"]
    cli.main([*argv, "--threshold", "0.5", "--cases", "natural|euclidean", "--out", str(out)])
    got = records(out)
    natural = got["direction natural 8-4-3 b6"]
    assert natural["verdict"] == compare.FAILED
    assert natural["error"] == "the candidate raised ValueError: planted refusal"
    assert got["direction euclidean 8-4-3 b6"]["verdict"] != compare.FAILED
    assert "not compared: direction natural" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--threshold", "0"], "--threshold must be a fraction between 0 and 1"),
        (["--threshold", "nan"], "--threshold must be a fraction between 0 and 1"),
        (["--rounds", "3"], "a verdict needs at least 5 rounds"),
        (["--cases", "nothing-like-it"], "matches none of the cases: sgd step 64-32-32-10"),
        (["--cases", "("], "is no regular expression"),
        (["--widths", "8,4,3"], "--widths and --batch go together"),
        (["--widths", "8,0,3", "--batch", "6"], "--widths 8,0,3: positive widths"),
        (["--widths", "8", "--batch", "6"], "--widths 8: positive widths"),
    ],
)
def test_bad_options_are_refused_before_any_work(options, message, capsys):
    assert cli.main(["compare", str(REPO), *options]) == 2
    assert message in capsys.readouterr().err


def test_a_side_that_is_neither_a_checkout_nor_a_revision_is_refused(tmp_path, capsys):
    assert cli.main(["compare", "no-such-revision-or-directory", "--quick"]) == 2
    assert "neither a directory nor a revision" in capsys.readouterr().err
    assert cli.main(["compare", str(tmp_path), "--quick"]) == 2
    assert "without riemann_core/__init__.py" in capsys.readouterr().err


def test_a_side_whose_package_does_not_import_is_refused_with_its_error(tmp_path, capsys):
    broken = planted(tmp_path, "broken", "\nraise ImportError('planted')\n")
    assert cli.main(["compare", str(REPO), str(broken), *TINY, "--cases", "euclidean"]) == 2
    err = capsys.readouterr().err
    assert "ImportError: planted" in err and "cannot be imported" in err


def test_a_worker_that_dies_in_a_case_is_a_one_line_error_naming_it(tmp_path, capsys):
    dying = planted(tmp_path, "dying", DYING)
    argv = ["compare", str(REPO), str(dying), *TINY, "--rounds", "5"]
    assert cli.main([*argv, "--cases", "euclidean"]) == 2
    err = capsys.readouterr().err
    assert (
        "the candidate's worker exited (code 3) while timing 'direction euclidean 8-4-3 b6'" in err
    )
    assert "Traceback" not in err


def test_a_worker_that_hangs_is_an_error_naming_it_after_the_timeout(tmp_path, capsys):
    """Found by a hunt: a worker that hung kept the gate waiting for ever (a CI job until
    its own limit); the sides are named before the timing."""
    hanging = planted(tmp_path, "hanging", HANGING)
    argv = ["compare", str(REPO), str(hanging), *TINY, "--rounds", "5", "--timeout", "20"]
    assert cli.main([*argv, "--cases", "euclidean"]) == 2
    err = capsys.readouterr().err
    assert f"baseline: {REPO} (working tree at {REPO})" in err
    assert f"candidate: {hanging} (working tree at {hanging})" in err
    assert (
        "the candidate's worker gave no answer within 20 s while timing "
        "'direction euclidean 8-4-3 b6': it hangs" in err
    )
    assert "Traceback" not in err
    # an import slower than the timeout is not one that failed (found by review)
    assert cli.main([*argv[:-1], "0.001", "--cases", "euclidean"]) == 2
    err = capsys.readouterr().err
    assert "gave no answer within 0.001 s while importing its package" in err
    assert "cannot be imported" not in err


def test_what_a_side_prints_does_not_break_the_protocol(tmp_path):
    printing = planted(tmp_path, "printing", PRINTING)
    out = tmp_path / "out"
    argv = ["compare", str(REPO), str(printing), *TINY, "--rounds", "5"]
    code = cli.main([*argv, "--threshold", "0.9", "--cases", "euclidean", "--out", str(out)])
    assert code in (0, 1)
    assert records(out)["direction euclidean 8-4-3 b6"]["verdict"] != compare.FAILED


def test_a_revision_extracted_under_a_linked_temporary_directory_is_accepted(tmp_path, monkeypatch):
    """macOS's temporary directory is reached through a link (/var -> /private/var): the
    worker's check that it imported the extracted copy compares resolved paths."""
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    monkeypatch.chdir(REPO)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    side = compare.resolve("HEAD", "baseline", tmp_path / "link")
    with ExitStack() as stack:
        worker = compare.Worker(side, "baseline", 1, stack)  # refused it before
        assert worker.process.poll() is None


def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    make_file = tempfile.TemporaryFile

    def read_only_out(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out:
            raise PermissionError(13, "Permission denied")
        return make_file(*args, dir=dir, **kwargs)

    def no_worker(*args, **kwargs):
        raise AssertionError("a worker started before --out was checked")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_out)
    monkeypatch.setattr(compare, "Worker", no_worker)
    argv = ["compare", str(REPO), str(REPO), "--quick", "--cases", "euclidean"]
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert f"cannot write into {out}" in capsys.readouterr().err


def test_a_control_that_was_not_compared_is_not_blamed_on_the_machine(capsys):
    control = {"case": "sgd step 8-4-3 b6", "spec": {"kind": "sgd"}}
    failed = control | {"verdict": compare.FAILED, "error": "the candidate raised X: y"}
    assert compare.exit_code([failed], 0.05) == 1
    err = capsys.readouterr().err
    assert "could not be timed" in err
    assert "differ by themselves" not in err and "quieter machine" not in err


def test_rounds_alternate_the_side_timed_first_and_calls_follow_the_baseline():
    """Two warm-up requests each, then rounds A B B A; each run's calls from the
    baseline's second warm-up call (RUN_SECONDS is 5 ms here); a round's ratio is the
    geometric mean of its two candidate / baseline ratios."""
    log = []

    class Fake:
        def __init__(self, role, seconds):
            self.role, self.seconds = role, seconds

        def time(self, case, calls, runs=3):
            log.append((self.role[0], calls, runs))
            return self.seconds

    case = paired.cases(True, "cpu", 0)[0]
    got = compare.compare_case(Fake("baseline", 1e-3), Fake("candidate", 2e-3), case, 5, 0.05)
    assert [entry[:2] for entry in log[:4]] == [("b", 1), ("c", 1), ("b", 1), ("c", 1)]
    assert "".join(side for side, _, _ in log[4:]) == "bccb" * 5
    assert {(calls, runs) for _, calls, runs in log[4:]} == {(5, 3)} and got["calls"] == 5
    assert got["ratios"] == [2.0] * 5 and got["verdict"] == compare.SLOWER
    log.clear()  # a call past LONG_CALL: one call, one run per request
    compare.compare_case(Fake("baseline", 0.2), Fake("candidate", 0.2), case, 5, 0.05)
    assert {(calls, runs) for _, calls, runs in log[4:]} == {(1, 1)}


def test_a_rounds_ratio_is_the_geometric_mean_of_its_two_orders():
    """Each round's ratio from its own two pairs (A B, then B A), the geometric mean of the
    two: an advantage of the side timed first cancels, and rounds are not mixed (the
    constant timings above cannot tell an arithmetic mean, one order alone or a pairing
    across rounds from it)."""
    count = {"n": 0}
    first, rounds = 1.21, 5  # the side timed first in a pair takes 21% longer

    class Fake:
        def __init__(self, role, seconds):
            self.role, self.seconds = role, seconds

        def time(self, case, calls, runs=3):
            i, count["n"] = count["n"] - 4, count["n"] + 1  # after four warm-up requests
            if i < 0:
                return self.seconds
            r, position = divmod(i, 4)  # A B B A: positions 0 and 2 open a pair
            grow = 1 + r if self.role == "candidate" else 1  # round r's true ratio: 2 (1 + r)
            return self.seconds * grow * (first if position in (0, 2) else 1)

    case = paired.cases(True, "cpu", 0)[0]
    got = compare.compare_case(Fake("baseline", 1e-3), Fake("candidate", 2e-3), case, rounds, 0.05)
    assert got["ratios"] == pytest.approx([2.0 * (1 + r) for r in range(rounds)], rel=1e-12)


def test_a_network_of_ones_own_names_its_cases_and_times_full_only_where_it_fits():
    small = paired.cases(False, "cpu", 0, [((8, 4, 3), 6)])
    wide = paired.cases(True, "cpu", 0, [((784, 1024, 1024, 10), 128)])
    assert [paired.case_name(c) for c in small] == [
        f"{kind} 8-4-3 b6"
        for kind in (
            "sgd step",
            "step sampled",
            "step exact",
            *(f"direction {m}" for m in ("euclidean", "layerwise", "full", "natural", "kfac")),
        )
    ]
    assert [c["kind"] for c in wide] == [
        "sgd", "step", "step", "euclidean", "layerwise", "natural", "kfac"
    ]  # fmt: skip
    assert all(c["widths"] == [784, 1024, 1024, 10] and c["batch"] == 128 for c in wide)


def test_both_workers_share_the_last_cpus_or_none_and_compare_md_says_which(monkeypatch):
    """Found by review: unpinned (fewer CPUs than --threads), compare.md read 'pinned to CPUs
    None'; a non-contiguous affinity set gives its last CPUs."""
    monkeypatch.setattr(compare.os, "sched_getaffinity", lambda pid: {7, 0, 5, 2}, raising=False)
    assert compare.shared_cpus(2) == [5, 7] and compare.shared_cpus(4) == [0, 2, 5, 7]
    assert compare.shared_cpus(5) is None
    monkeypatch.delattr(compare.os, "sched_getaffinity", raising=False)  # macOS, Windows
    assert compare.shared_cpus(1) is None
    env = dict.fromkeys(("device_name", "cpu", "blas", "torch", "python", "time_utc"), "x")
    payload = {"command": "c", "environment": env, "sides": {}, "rounds": 5, "threshold": 0.05,
               "threads": 2, "records": [{"case": "sgd step", "verdict": compare.FAILED,
               "spec": {"kind": "sgd"}, "error": "e"}]}  # fmt: skip
    assert "both pinned to CPUs 5,7)" in compare.markdown({**payload, "cpus": [5, 7]})
    unpinned = compare.markdown({**payload, "cpus": None})
    assert "unpinned: fewer CPUs than threads" in unpinned and "None" not in unpinned


def test_every_thread_of_a_pinned_worker_runs_on_its_cpus(tmp_path):
    """Found by review: the worker pinned itself after importing torch, and the threads
    already started then (numpy's BLAS pool among them) kept every CPU."""
    if not hasattr(compare.os, "sched_getaffinity") or not Path("/proc/self/task").exists():
        pytest.skip("no CPU affinity here")
    allowed = sorted(compare.os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("one CPU: nothing to pin to")
    side = compare.Side(str(REPO), REPO, "this checkout")
    with ExitStack() as stack:
        worker = compare.Worker(side, "baseline", 1, stack, allowed[-1:])
        worker.time(paired.cases(True, "cpu", 0, [((8, 4, 3), 6)])[0], 1, 1)
        tasks = Path(f"/proc/{worker.process.pid}/task")
        pinned = {t.name: compare.os.sched_getaffinity(int(t.name)) for t in tasks.iterdir()}
    assert pinned and all(cpus == {allowed[-1]} for cpus in pinned.values()), pinned


@pytest.mark.parametrize("ended", [False, True], ids=["running", "ended first"])
def test_a_closed_worker_leaves_no_pipe_open(ended):
    """Found by review: the pipes of a worker that had ended were left to the garbage
    collector (a ResourceWarning each under python -X dev)."""
    side = compare.Side(str(REPO), REPO, "this checkout")
    with ExitStack() as stack:
        worker = compare.Worker(side, "baseline", 1, stack)
        if ended:
            worker.process.kill()
            worker.process.wait()
    assert worker.process.returncode is not None
    assert worker.process.stdin.closed and worker.process.stdout.closed
    assert not worker.reader.is_alive()


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(cwd), "-c", "user.email=t@t", "-c", "user.name=t", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_a_name_both_a_directory_and_a_revision_is_refused(tmp_path, monkeypatch, capsys):
    """Found by a hunt: a tag ``old`` beside a checkout ``old/`` timed the directory,
    unsaid, and a branch ``docs`` beside a directory ``docs/`` was refused as a directory
    without riemann_core."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "riemann_core", repo / "riemann_core")
    (repo / "docs").mkdir()
    git(repo, "init", "-q")
    git(repo, "add", "riemann_core")
    git(repo, "commit", "-qm", "one")
    git(repo, "branch", "docs")
    monkeypatch.chdir(repo)
    assert cli.main(["compare", "docs", str(repo), "--quick"]) == 2
    assert "'docs' is both a directory and a revision" in capsys.readouterr().err
    side = compare.resolve("docs^0", "baseline", tmp_path / "scratch")  # the fix named
    assert side.commit == git(repo, "rev-parse", "HEAD")


def test_a_revision_without_the_package_init_is_refused_by_name(tmp_path, monkeypatch, capsys):
    """Found by a hunt: a revision whose riemann_core/ had no __init__.py (a namespace
    package, ``__file__`` None) ended in a TypeError traceback, exit 3."""
    repo = tmp_path / "repo"
    (repo / "riemann_core").mkdir(parents=True)
    (repo / "riemann_core" / "old.py").write_text("x = 1\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "one")
    monkeypatch.chdir(repo)
    argv = ["compare", "HEAD", str(REPO), *TINY, "--cases", "euclidean"]
    assert cli.main(argv) == 2
    assert "has no riemann_core/__init__.py" in capsys.readouterr().err


def test_no_candidate_from_another_checkout_of_the_project_is_refused(tmp_path, monkeypatch):
    """Found by a hunt: run from a second clone (the package imported from the first, an
    editable install), ``compare HEAD`` timed the first's working tree as the candidate,
    and the current checkout's uncommitted 20x slowdown read 1.10."""
    other = tmp_path / "other"
    shutil.copytree(REPO / "riemann_core", other / "riemann_core")
    git(other, "init", "-q")
    monkeypatch.chdir(other)
    with pytest.raises(ValueError, match="pass the candidate"):
        compare.default_candidate(REPO)
    assert compare.default_candidate(other.resolve()).root == other.resolve()
    monkeypatch.chdir(tmp_path)  # in no checkout: the one this command runs from
    assert compare.default_candidate(REPO).root == REPO


def test_a_candidate_that_raises_where_the_baseline_ran_fails_the_gate(capsys):
    """Found by a hunt: a candidate whose ``rc.direction`` raised on every call passed the
    gate (exit 0, each direction "not compared"); a case the baseline raises on (an option
    its older version lacks) still does not fail it."""
    control = {"case": "sgd step 8-4-3 b6", "spec": {"kind": "sgd"}, "verdict": compare.UNCHANGED}
    case = {"case": "direction euclidean 8-4-3 b6", "spec": {"kind": "euclidean"}}
    failed = case | {"verdict": compare.FAILED, "error": "e"}
    assert compare.exit_code([control, failed | {"raised": "candidate"}], 0.05) == 1
    assert "candidate raised where the baseline ran: direction euclidean" in capsys.readouterr().err
    assert compare.exit_code([control, failed | {"raised": "baseline"}], 0.05) == 0

    class Raising:
        role = "candidate"

        def time(self, case, calls, runs=3):
            raise compare.CaseError("the candidate raised X: y", "candidate")

    class Fine:
        role = "baseline"

        def time(self, case, calls, runs=3):
            return 1e-3

    record = compare.compare_case(Fine(), Raising(), paired.cases(True, "cpu", 0)[3], 5, 0.05)
    assert record["verdict"] == compare.FAILED and record["raised"] == "candidate"


def test_a_side_whose_python_prints_before_the_worker_is_refused_by_name(tmp_path, capsys):
    """Found by a hunt: a sitecustomize.py printing on standard output at start-up read
    "error: Expecting value: line 1 column 1 (char 0)"."""
    side = planted(tmp_path, "site", "")
    (side / "sitecustomize.py").write_text("print('planted: hello')\n")
    assert cli.main(["compare", str(REPO), str(side), *TINY, "--cases", "euclidean"]) == 2
    err = capsys.readouterr().err
    assert "candidate's worker wrote 'planted: hello' on its standard output" in err


def test_the_code_recorded_is_the_code_the_workers_imported(tmp_path, monkeypatch):
    """Found by a hunt: the code fingerprint was taken after the comparison, so an edit of
    a checkout side made during its minutes was recorded as the code timed."""
    from riemann_core.measure.environment import code_fingerprint

    side = planted(tmp_path, "side", "")
    before = code_fingerprint.__wrapped__(side / "riemann_core")  # (uncached)
    timed = compare.compare

    def edited_meanwhile(*args, **kwargs):
        records = timed(*args, **kwargs)
        with open(side / "riemann_core" / "__init__.py", "a") as f:
            f.write("\n# edited during the run\n")
        code_fingerprint.cache_clear()  # (cached per path: as a fresh process reads it)
        return records

    monkeypatch.setattr(compare, "compare", edited_meanwhile)
    out = tmp_path / "out"
    argv = ["compare", str(REPO), str(side), *TINY, "--cases", "euclidean", "--out", str(out)]
    cli.main([*argv, "--threshold", "0.9"])
    payload = json.loads((out / "compare.json").read_text())
    assert payload["sides"]["candidate"]["code"] == before


def test_a_revision_resolves_from_a_subdirectory_of_the_checkout(tmp_path, monkeypatch):
    """Found by a review: run from a subdirectory of the checkout (``docs/``), every
    revision was refused as having "no riemann_core/ to compare" (git archive took its
    path from the current directory), while the default candidate was found there."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "riemann_core", repo / "riemann_core")
    (repo / "docs").mkdir()
    (repo / "docs" / "x.md").write_text("x\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "one")
    monkeypatch.chdir(repo / "docs")
    side = compare.resolve("HEAD", "baseline", tmp_path / "scratch")
    assert side.commit == git(repo, "rev-parse", "HEAD")
    assert (side.root / "riemann_core" / "__init__.py").is_file()


def test_closing_a_worker_whose_forked_child_holds_its_output_does_not_wait_for_it(tmp_path):
    """Found by review: a process the worker forked (multiprocessing's default on Linux)
    inherits its answer pipe, and close waited for it to end (20 s for a sleeper) where it
    closed that pipe under its reader, blocked in a read."""
    (tmp_path / "riemann_core").mkdir()
    (tmp_path / "riemann_core" / "__init__.py").write_text(
        "import os, time\nif os.fork() == 0:\n    time.sleep(40)\n    os._exit(0)\n"
    )
    side = compare.Side(str(tmp_path), tmp_path, "forks")
    with ExitStack() as stack:
        worker = compare.Worker(side, "baseline", 1, stack)
        start = time.monotonic()
    assert time.monotonic() - start < 15
    assert worker.process.returncode is not None and worker.process.stdin.closed


def test_a_worker_whose_reader_cannot_start_raises_that_error(monkeypatch):
    """Found by review: close, registered before the reader thread was made, raised
    AttributeError 'reader' in place of the error (or Ctrl-C) that stopped __init__."""

    class Unstartable(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(compare.threading, "Thread", Unstartable)
    side = compare.Side(str(REPO), REPO, "this checkout")
    with pytest.raises(RuntimeError, match="can't start new thread"):
        with ExitStack() as stack:
            compare.Worker(side, "baseline", 1, stack)
