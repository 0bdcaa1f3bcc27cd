"""``riemann-bench compare``: two versions of the package timed in paired, alternating rounds.

A regression gate that compares medians taken minutes apart (asv's, pytest-benchmark's)
compares the machine's two moments as much as the two versions: on a quiet 2-core VM the
same commit run twice read 60 of 223 benchmarks more than 10% slower (the median of those
34%, the SGD step 92%). Here each side runs in a process of its own (importing its own
``riemann_core``), and the two take turns, case by case, in rounds of ``A B B A`` (so that
a drift within a round, and an advantage of the side timed first, cancel), each timing the
same call on the same data for about 20 ms; a case's figure is the median over rounds of
the ratio ``candidate / baseline`` (a round's: the geometric mean of its two orders') with
the 95% bootstrap interval of that median. The plain
SGD step, torch alone and the same code on both sides, is the control: its interval must
lie within the threshold, or the two processes differ by themselves and no verdict holds.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import queue
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

from ..arguments import Command, ints, positive_int, positive_seconds
from ..measure import paired
from ..measure.output import check_place, pyplot, save_figure, staged, write_json
from ..measure.timing import MIN_ROUNDS, median_interval

#: Verdicts on a case's ratio ``candidate / baseline`` against the threshold ``t``: its
#: whole interval above ``1 + t``, below ``1 / (1 + t)``, within both, or straddling one.
SLOWER, FASTER, UNCHANGED, NOISY = "slower", "faster", "unchanged", "too noisy"

#: The verdict of a case a side raised on (an option its version lacks): that error.
FAILED = "not compared"

#: Rounds of a case, each ``A B B A`` (four timed requests).
ROUNDS, QUICK_ROUNDS = 21, 5
#: seconds a worker may take to answer one request (its import; a case's first call, which
#: builds it, then about 20 ms of calls three times, or one call of more than 0.1 s once)
TIMEOUT = 600.0

#: Seconds each timed run of a request takes, about (its calls are counted from a call of
#: the baseline's after the warm-up).
RUN_SECONDS = 0.02


def verdict(low: float, high: float, threshold: float) -> str:
    """The verdict (:data:`SLOWER` ...) of the interval ``[low, high]`` of a median ratio."""
    if low > 1 + threshold:
        return SLOWER
    if high < 1 / (1 + threshold):
        return FASTER
    if low >= 1 / (1 + threshold) and high <= 1 + threshold:
        return UNCHANGED
    return NOISY


@dataclass
class Side:
    """One version compared: ``spec`` as given, ``root`` the directory holding its
    ``riemann_core``, ``commit`` (a revision's, else ``"working tree"``)."""

    spec: str
    root: Path
    commit: str


def resolve(spec: str, role: str, scratch: Path) -> Side:
    """``spec`` as a directory holding ``riemann_core/``, or else as a revision of the git
    repository of the current directory (run from any directory in it), whose top-level
    ``riemann_core/`` is extracted into ``scratch`` (by ``git archive``: no checkout or
    worktree changes). A name that is both a directory and a revision is refused: which
    was meant cannot be told (found by a hunt: a tag ``old`` beside a directory ``old/``
    timed the directory, unsaid; a branch ``docs`` was refused as "a directory without
    riemann_core")."""
    path = Path(spec)
    git = ["git", "-C", os.getcwd()]
    found = subprocess.run(
        [*git, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{spec}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if path.is_dir():
        if found.returncode == 0:
            raise ValueError(
                f"{role} {spec!r} is both a directory and a revision "
                f"({found.stdout.strip()[:12]}): pass ./{spec} for the directory or "
                f"{spec}^0 for the revision"
            )
        if not (path / "riemann_core" / "__init__.py").is_file():
            raise ValueError(
                f"{role} {spec!r} is a directory without riemann_core/__init__.py: pass the "
                "root of a checkout of this project (or a git revision)"
            )
        return Side(spec, path.resolve(), "working tree")
    if found.returncode != 0:
        raise ValueError(
            f"{role} {spec!r} is neither a directory nor a revision of a git repository at "
            f"{os.getcwd()} (git: {found.stderr.strip() or 'no such commit'}): pass a "
            "commit, branch or tag, or the root of a checkout"
        )
    commit = found.stdout.strip()
    # from the repository's top: git archive takes its paths from the current directory
    # (found by a review: run from docs/, every revision "has no riemann_core/")
    top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    archive = subprocess.run(
        ["git", "-C", top.stdout.strip() or os.getcwd(), "archive", "--format=tar", commit,
         "riemann_core"],
        capture_output=True,
    )  # fmt: skip
    if archive.returncode != 0:
        raise ValueError(
            f"{role} {spec!r} ({commit[:12]}) has no riemann_core/ to compare: "
            f"{archive.stderr.decode(errors='replace').strip()}"
        )
    # resolved: the worker's check that it imported this copy compares resolved paths
    # (a TMPDIR reached through a link, as macOS's /var/folders, refused every revision)
    root = scratch.resolve() / role
    # (extraction filters came with Python 3.10.12 and 3.11.4; the archive is git's own)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root, **safe)
    if not (root / "riemann_core" / "__init__.py").is_file():  # (found by a hunt: a
        # namespace package, whose __file__ is None, broke the worker's check with exit 3)
        raise ValueError(
            f"{role} {spec!r} ({commit[:12]}) has no riemann_core/__init__.py: not a "
            "version of this package to compare"
        )
    return Side(spec, root, commit)


def default_candidate(here: Path) -> Side:
    """The checkout this ``riemann-bench`` runs from, ``here``; refused where the current
    directory is in another checkout of the project, whose revisions the baseline is taken
    from (found by a hunt: run from a second worktree or clone with an editable install
    of the first, ``compare HEAD`` timed the first's working tree as the candidate, and an
    uncommitted 20x slowdown in the current checkout read 1.10, unsaid)."""
    top = subprocess.run(
        ["git", "-C", os.getcwd(), "rev-parse", "--show-toplevel"],
        capture_output=True,
        text=True,
    )
    if top.returncode == 0:
        checkout = Path(top.stdout.strip()).resolve()
        if (checkout / "riemann_core" / "__init__.py").is_file() and checkout != here:
            raise ValueError(
                f"no candidate given, and the current directory is in the checkout "
                f"{checkout}, not in {here}, whose riemann_core this riemann-bench runs "
                f"(the default candidate): pass the candidate ({checkout} for this "
                "checkout's working tree)"
            )
    return Side(str(here), here, "working tree")


class WorkerError(ValueError):
    """A side's worker that ended: its package does not import, or it died in a call (a
    crash, ``os._exit``, the kernel's out-of-memory killer): a fault of that side, said
    in one line with the worker's last error output, not a traceback of this command."""


class WorkerTimeout(WorkerError):
    """A side's worker that gave no answer within its timeout (and was killed)."""


class Worker:
    """A process timing cases in ``side``'s package (:mod:`riemann_core.measure.paired`),
    whose every answer must come within ``timeout`` seconds."""

    def __init__(
        self,
        side: Side,
        role: str,
        threads: int,
        stack: ExitStack,
        cpus: list[int] | None = None,
        timeout: float = TIMEOUT,
    ):
        self.role, self.timeout = role, timeout
        self.reader: threading.Thread | None = None  # (close may run before it starts)
        self.errors = stack.enter_context(tempfile.TemporaryFile("w+"))
        env = dict(os.environ, PYTHONPATH=str(side.root))
        self.process = subprocess.Popen(
            [sys.executable, "-c", Path(paired.__file__).read_text(), str(threads)]
            + ([",".join(map(str, cpus))] if cpus else []),
            cwd=side.root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
        )
        stack.callback(self.close)
        # its answers, read by a thread of their own so that a wait can end (a pipe's
        # readline cannot time out); "" once its output closes
        self.lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=self._forward, daemon=True)
        reader.start()
        self.reader = reader
        try:
            hello = self._read(" while importing its package")
        except WorkerTimeout:  # slow, not failed to import (found by review)
            raise
        except WorkerError as err:  # its package does not import: the side, not a bug here
            raise WorkerError(f"{err}\n(the {role} {side.spec!r} cannot be imported)") from None
        package = Path(hello["package"]).resolve()
        if side.root not in package.parents:  # (an install that shadows PYTHONPATH)
            raise ValueError(
                f"the {role}'s worker imported riemann_core from {package}, not from "
                f"{side.root}: run riemann-bench from an environment without another "
                "riemann_core ahead of PYTHONPATH"
            )

    def _forward(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put("")

    def _read(self, doing: str = "") -> dict:
        try:
            line = self.lines.get(timeout=self.timeout)
        except queue.Empty:  # (found by a hunt: a worker that hung kept the gate waiting)
            self.process.kill()
            raise WorkerTimeout(
                f"the {self.role}'s worker gave no answer within {self.timeout:g} s{doing}: "
                "it hangs (a deadlock, an endless loop), or a call takes longer (pass a larger "
                "--timeout)"
            ) from None
        if not line:
            self.process.wait(timeout=10)  # (its output closed: it is ending)
            self.errors.seek(0)
            tail = self.errors.read()[-2000:].strip()
            raise WorkerError(
                f"the {self.role}'s worker exited (code {self.process.returncode}){doing}:\n{tail}"
            )
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # (found by a hunt: "Expecting value: line 1 column 1")
            raise WorkerError(
                f"the {self.role}'s worker wrote {line.strip()[:200]!r} on its standard "
                f"output{doing}, not an answer: something its Python runs before the worker "
                "(a sitecustomize.py, a .pth file) prints there; remove that print"
            ) from None

    def time(self, case: dict, calls: int, runs: int = paired.RUNS) -> float:
        """Seconds per call of ``case``, the fastest of ``runs`` runs of ``calls`` calls
        (:class:`CaseError` where it raised)."""
        request = {"case": case, "calls": calls, "runs": runs}
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:  # it died: its error, read next
            pass
        answer = self._read(f" while timing {paired.case_name(case)!r}")
        if "error" in answer:
            raise CaseError(f"the {self.role} raised {answer['error']}", self.role)
        return answer["seconds"]

    def close(self) -> None:
        """End the worker (its input closed, it exits; killed after 10 s) and close its
        pipes, also those of a worker that ended first (found by review: left to the
        garbage collector, a ResourceWarning each)."""
        with suppress(BrokenPipeError):  # (a worker that died: its pipe is broken)
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.reader is not None:
            self.reader.join(timeout=2)  # its output closed with it
        # a process it forked may hold that output open, its reader blocked in a read:
        # closing it then would wait for that read (found by review: a forked sleeper held
        # close 20 s); left to the garbage collector
        if self.reader is None or not self.reader.is_alive():
            self.process.stdout.close()


def shared_cpus(threads: int) -> list[int] | None:
    """The CPUs both workers are pinned to, the last ``threads`` of those this process may
    run on (Linux; ``None``, unpinned, elsewhere or with fewer CPUs than ``threads``, where
    they run on every CPU they may anyway): the two sides take turns on the
    same cores. Unpinned, the scheduler placed them apart, and one side's core ran slower
    for seconds: an A/A run read the euclidean direction 0.64-0.86 for 11 rounds in a row,
    then 1.00-1.10 (2-core VM, 2026-12-07)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[-threads:] if len(allowed) >= threads else None


class CaseError(Exception):
    """A case that a side's package raised on (an option it lacks, a refusal); ``role``
    the side's."""

    def __init__(self, message: str, role: str = "baseline"):
        super().__init__(message)
        self.role = role


def compare_case(
    baseline: Worker, candidate: Worker, case: dict, rounds: int, threshold: float
) -> dict:
    """``case`` timed by both in ``rounds`` rounds ``A B B A``: its record (the per-round
    seconds and ratios, the median ratio, its interval and verdict), or, where a side
    raised, the error as a :data:`FAILED` verdict."""
    record = {"case": paired.case_name(case), "spec": case}
    workers = (baseline, candidate)
    seconds = {w.role: [] for w in workers}
    try:
        warm = [w.time(case, 1) for w in (*workers, *workers)]  # each builds it, then runs it
        calls = max(1, math.ceil(RUN_SECONDS / warm[2]))
        runs = 1 if warm[2] > paired.LONG_CALL else paired.RUNS
        for _ in range(rounds):
            for worker in (*workers, *workers[::-1]):  # A B B A
                seconds[worker.role].append(worker.time(case, calls, runs))
    except CaseError as err:
        return record | {"verdict": FAILED, "error": str(err), "raised": err.role}
    # a round's ratio: the geometric mean of its two orders', so that an advantage of the
    # side timed first (or second) cancels within the round
    pairs = [c / b for b, c in zip(seconds["baseline"], seconds["candidate"], strict=True)]
    ratios = [math.sqrt(x * y) for x, y in zip(pairs[::2], pairs[1::2], strict=True)]
    median, low, high = median_interval(ratios)
    return record | {
        "calls": calls,
        "seconds": seconds,
        "ratios": ratios,
        "ratio": median,
        "interval": [low, high],
        "verdict": verdict(low, high, threshold),
    }


def compare(
    baseline: Worker,
    candidate: Worker,
    cases: list[dict],
    rounds: int,
    threshold: float,
    progress: Callable[[str], None] = lambda label: None,
) -> list[dict]:
    """Every case's record (:func:`compare_case`)."""
    records = []
    for case in cases:
        progress(paired.case_name(case))
        records.append(compare_case(baseline, candidate, case, rounds, threshold))
    return records


def control_of(records: list[dict]) -> list[dict]:
    """The control cases among ``records``: the plain SGD steps."""
    return [r for r in records if r["spec"]["kind"] == "sgd"]


def format_records(records: list[dict], threshold: float) -> str:
    """The table ``compare`` prints: each case's median ratio, interval and verdict."""
    width = max(len(r["case"]) for r in records)
    lines = [
        f"{'case':<{width}}  candidate / baseline [95% interval]  verdict "
        f"(threshold {threshold:.0%})"
    ]
    for r in records:
        if r["verdict"] == FAILED:
            figure = f"{'-':<34}"
        else:
            low, high = r["interval"]
            figure = f"{r['ratio']:6.3f} [{low:.3f}, {high:.3f}]".ljust(34)
        control = " (control)" if r["spec"]["kind"] == "sgd" else ""
        note = f": {r['error']}" if r["verdict"] == FAILED else ""
        lines.append(f"{r['case']:<{width}}  {figure} {r['verdict']}{control}{note}")
    return "\n".join(lines)


def plot(records: list[dict], threshold: float, title: str, path: Path) -> Path:
    """Each compared case's median ratio and interval, the band of ``unchanged`` shaded."""
    plt = pyplot()
    shown = [r for r in records if r["verdict"] != FAILED]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(shown) + 1.5))
    ax.axvspan(1 / (1 + threshold), 1 + threshold, color="0.9", label="unchanged")
    ax.axvline(1.0, color="0.5", lw=0.8)
    colours = {SLOWER: "tab:red", FASTER: "tab:green", UNCHANGED: "tab:blue", NOISY: "tab:orange"}
    for y, r in enumerate(shown):
        low, high = r["interval"]
        ax.plot([low, high], [y, y], color=colours[r["verdict"]], lw=2)
        ax.plot(r["ratio"], y, "o", color=colours[r["verdict"]])
    ax.set_yticks(range(len(shown)), [r["case"] for r in shown])
    ax.set_ylim(max(len(shown), 1) - 0.5, -0.5)  # (none shown: every case not compared)
    ax.set_xlabel("time, candidate / baseline (median over rounds, 95% interval)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)


def markdown(payload: dict) -> str:
    """``compare.md``: the command, both sides, the environment, the table and the plot."""
    env = payload["environment"]
    sides = "\n".join(
        f"- {role}: `{s['spec']}` ({s['commit']}, code {s['code']})"
        for role, s in payload["sides"].items()
    )
    cpus = payload["cpus"]
    pinned = (
        f"both pinned to CPUs {','.join(map(str, cpus))}"
        if cpus
        else "unpinned: fewer CPUs than threads, or no CPU affinity on this system"
    )
    return (
        f"# Paired comparison\n\nProduced by `{payload['command']}` on {env['device_name']} "
        f"({env['cpu']}, {env['blas']}, torch {env['torch']}, Python {env['python']}; "
        f"{payload['threads']} torch thread(s) per side, {pinned}), "
        f"{env['time_utc']}.\n\n{sides}\n\n"
        f"{payload['rounds']} rounds A B B A per case; ratio = candidate / baseline.\n\n"
        f"```\n{format_records(payload['records'], payload['threshold'])}\n```\n\n"
        "![ratios](compare.png)\n"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "baseline",
        help="the version to compare against: a git revision of the repository in the "
        "current directory (its riemann_core/ is extracted, nothing checked out) or the "
        "root of a checkout",
    )
    parser.add_argument(
        "candidate",
        nargs="?",
        default=None,
        help="the version compared, as baseline (default: the checkout this riemann-bench "
        "runs from, with its uncommitted changes)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=None,
        help=f"rounds per case, each A B B A (default {ROUNDS}, {QUICK_ROUNDS} with --quick; "
        f"at least {MIN_ROUNDS} for a verdict)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.05,
        help="the relative change a verdict must clear: slower when the whole 95%% interval "
        "of the median ratio is above 1 + threshold (default 0.05)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads of each side's worker (default 1: the steadiest timings)",
    )
    parser.add_argument(
        "--widths",
        type=ints,
        default=None,
        metavar="W0,W1,...",
        help="time on this MLP instead (Linear and Tanh; with --batch), e.g. 784,1024,1024,10",
    )
    parser.add_argument("--batch", type=positive_int, default=None, help="its batch size")
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=TIMEOUT,
        metavar="SECONDS",
        help="the longest a side's worker may take to answer one request (its import, or a "
        f"case's timed calls) before it is taken for hung: exit 2 (default {TIMEOUT:g})",
    )
    parser.add_argument(
        "--cases",
        metavar="REGEX",
        default=None,
        help="compare only the cases whose name matches (re.search), e.g. 'layerwise|step'",
    )


def selected(args) -> list[dict]:
    """The cases ``args`` ask for, after checking the options."""
    if not (math.isfinite(args.threshold) and 0 < args.threshold < 1):
        raise ValueError(
            f"--threshold must be a fraction between 0 and 1 (0.05 is 5%), got {args.threshold}"
        )
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    if rounds < MIN_ROUNDS:
        raise ValueError(
            f"--rounds {rounds}: a verdict needs at least {MIN_ROUNDS} rounds (fewer give no "
            "95% interval of the median)"
        )
    args.rounds = rounds
    if (args.widths is None) != (args.batch is None):
        raise ValueError("--widths and --batch go together: the network and its batch")
    if args.widths is not None and (len(args.widths) < 2 or min(args.widths) < 1):
        raise ValueError(
            f"--widths {','.join(map(str, args.widths))}: positive widths, from the input's "
            "to the output's (two at least)"
        )
    networks = None if args.widths is None else [(args.widths, args.batch)]
    grid = paired.cases(args.quick, str(args.device), args.seed, networks)
    if args.cases is None:
        return grid
    try:
        pattern = re.compile(args.cases)
    except re.error as err:
        raise ValueError(f"--cases {args.cases!r} is no regular expression: {err}") from err
    chosen = [c for c in grid if pattern.search(paired.case_name(c))]
    if not chosen:
        names = "; ".join(paired.case_name(c) for c in grid)
        raise ValueError(f"--cases {args.cases!r} matches none of the cases: {names}")
    # every chosen network's control, chosen or not: no verdict without it
    nets = {(tuple(c["widths"]), c["batch"]) for c in chosen}
    return [
        c
        for c in grid
        if c in chosen or (c["kind"] == "sgd" and (tuple(c["widths"]), c["batch"]) in nets)
    ]


def run(args) -> int:
    from ..measure.environment import code_fingerprint, environment
    from ..measure.output import progress_bar, results_directory

    cases = selected(args)
    if args.out is not None:
        for name in ("compare.json", "compare.md", "compare.png"):
            check_place(args.out / name)
    here = Path(__file__).resolve().parents[2]
    with ExitStack() as stack:
        if args.out is not None:  # made and checked writable before the comparison's minutes
            stack.enter_context(results_directory(args.out))
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rb-compare-")))
        sides = {
            "baseline": resolve(args.baseline, "baseline", scratch),
            "candidate": resolve(args.candidate, "candidate", scratch)
            if args.candidate is not None
            else default_candidate(here),
        }
        # before the workers import it: the code they time, not what a checkout holds
        # minutes later (found by a hunt: taken after the run, an edit made meanwhile)
        codes = {role: code_fingerprint(s.root / "riemann_core") for role, s in sides.items()}
        cpus = shared_cpus(args.threads)
        for role, s in sides.items():  # which code each side is, before the minutes of timing
            what = f"commit {s.commit[:12]}" if s.commit != "working tree" else "working tree"
            print(f"{role}: {s.spec} ({what} at {s.root})", file=sys.stderr)
        workers = [
            Worker(s, role, args.threads, stack, cpus, args.timeout) for role, s in sides.items()
        ]
        with progress_bar("compare", unit="case", total=len(cases), announce=True) as progress:
            records = compare(*workers, cases, args.rounds, args.threshold, progress)
    print(format_records(records, args.threshold))
    payload = {
        "command": args.command_line,
        "environment": environment(args.device),
        "sides": {
            role: {"spec": s.spec, "commit": s.commit, "code": codes[role]}
            for role, s in sides.items()
        },
        "rounds": args.rounds,
        "threshold": args.threshold,
        "threads": args.threads,
        "cpus": cpus,
        "records": records,
    }
    if args.out is not None:
        with staged(args.out) as stage:
            write_json(stage, "compare.json", payload)
            (stage / "compare.md").write_text(markdown(payload))
            title = f"{sides['candidate'].spec} against {sides['baseline'].spec}"
            plot(records, args.threshold, title, stage / "compare.png")
        print(f"wrote {args.out / 'compare.json'}, compare.md and compare.png")
    return exit_code(records, args.threshold)


def exit_code(records: list[dict], threshold: float) -> int:
    """1 where a case is slower, the candidate raised on a case the baseline ran, or the
    control is not unchanged (the processes differ by themselves: no verdict holds), else
    0; what is too noisy or not compared is said (found by a hunt: a candidate whose
    ``rc.direction`` raised on every call passed the gate, every direction "not
    compared"; a case the baseline raises on, an option it lacks, still does not fail)."""

    def cases(verdict: str) -> str:
        return "; ".join(r["case"] for r in records if r["verdict"] == verdict)

    if cases(NOISY):
        print(f"\ntoo noisy (more --rounds, or a quieter machine): {cases(NOISY)}", file=sys.stderr)
    if cases(FAILED):
        print(f"\nnot compared: {cases(FAILED)}", file=sys.stderr)
    off = [r for r in control_of(records) if r["verdict"] != UNCHANGED]
    if off:
        fix = "rerun on a quieter machine or with more --rounds"
        if any(r["verdict"] == FAILED for r in off):  # (no timing to blame the machine for)
            why, fix = "could not be timed (its error above)", "see that error"
        elif all(r["verdict"] == NOISY for r in off):
            why = "is too noisy to vouch for the other verdicts"
        else:
            why = f"is not within {threshold:.0%}: the two processes differ by themselves"
        print(
            f"\nthe control ({'; '.join(r['case'] for r in off)}: torch alone, the same on "
            f"both sides) {why}, so no verdict holds; {fix}",
            file=sys.stderr,
        )
    if cases(SLOWER):
        print(f"\nslower: {cases(SLOWER)}", file=sys.stderr)
    broken = "; ".join(
        r["case"]
        for r in records
        if r["verdict"] == FAILED and r.get("raised") == "candidate" and r not in off
    )
    if broken:
        print(f"\nthe candidate raised where the baseline ran: {broken}", file=sys.stderr)
    return 1 if off or cases(SLOWER) or broken else 0


HELP = "time two versions of the package in paired, alternating rounds: a regression gate"
DESCRIPTION = (
    "Time the same calls with two versions of riemann_core (git revisions or checkouts), "
    "each in a process of its own, taking turns round by round, and give each case the "
    "median ratio candidate / baseline with its 95% interval: slower, faster, unchanged "
    "(within --threshold) or too noisy. The cases: a plain SGD step (the control, torch "
    "alone), training steps with pre.backward (sampled and exact Fisher) and every "
    "method's direction, on an MLP 64-32-32-10 and 784-256-256-10 at batch 128 (--quick: "
    "the first, 5 rounds; --widths and --batch: one MLP of your own). Exits 1 when a case is slower, "
    "when the candidate raises on a case the baseline runs, or when the control is not "
    "unchanged. With --out, writes compare.json, compare.md and compare.png."
)
EXAMPLE = "compare main~1 main --cases layerwise"

COMMAND = Command("compare", run, HELP, DESCRIPTION, EXAMPLE, add_arguments)
