"""The environment record attached to every measurement."""

from __future__ import annotations

import datetime
import functools
import hashlib
import platform
import re
import reprlib
import shlex
import subprocess
import unicodedata
from collections.abc import Mapping
from pathlib import Path

import torch

from .._precision import precision_knobs
from .allocator import policy


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def blas() -> str:
    match = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return match.group(1) if match else "unknown"


@functools.cache
def code_fingerprint(package: Path | None = None) -> str:
    """The first 12 hex digits of the SHA-256 of the package's Python sources (each
    file's path and bytes, in order): two processes give the same exactly when they run
    the same code, whatever :func:`git_commit` reads there (``unknown`` outside a checkout,
    a ``-dirty`` tree)."""
    package = package or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_commit(package: Path | None = None) -> str:
    """The commit of the working tree this package runs from, or ``"unknown"``: also where
    it was installed (not editable) into an environment inside another checkout, whose
    commit is not that of the code (``package``, its directory, for tests)."""
    package = package or Path(__file__).resolve().parents[1]
    root = package.parent
    try:
        subprocess.run(  # the package's own files tracked by the enclosing repository
            ["git", "-C", str(root), "ls-files", "--error-unmatch", "--", f"{package.name}/"],
            capture_output=True,
            timeout=10,
            check=True,
        )
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            # reports/ is where results are written: not a change to the code measured
            [
                "git",
                "-C",
                str(root),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!reports",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def precision_settings() -> dict[str, str | bool | int]:
    """float32 product precision (TF32 / bf16) and cuDNN's settings, which change what a
    convolution or matmul computes and how fast (``riemann_core`` itself computes its
    directions at full precision whatever they are)."""
    try:
        matmul = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch refuses the legacy reading once the new knobs are set
        matmul = "see fp32_precision.*"
    cudnn = torch.backends.cudnn
    record: dict[str, str | bool | int] = {
        "float32_matmul_precision": matmul,
        "cudnn_enabled": cudnn.enabled,
        "cudnn_benchmark": cudnn.benchmark,
        "cudnn_deterministic": cudnn.deterministic,
        "cudnn_version": cudnn.version() or 0 if cudnn.is_available() else 0,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    for name, knob in precision_knobs():
        record[f"fp32_precision.{name}"] = knob.fp32_precision
    return record


def summary(env: dict) -> str:
    """Where and from what a run was measured, in one line, from its :func:`environment`:
    ``NVIDIA H200 (16 threads, torch 2.11.0+cu130, commit edf1aabd4659, 2026-12-04)``."""
    threads = env["threads"]
    return (
        f"{env['device_name']} ({threads} thread{'s' if threads != 1 else ''}, torch "
        f"{env['torch']}, commit {env['commit']}, {env['time_utc'][:10]})"
    )


def environment(device: torch.device | str = "cpu") -> dict[str, str | int]:
    """Commit, torch version, device, CPU model, thread count, BLAS, Python, time, the C
    allocator's policy (:func:`riemann_core.measure.allocator.policy`), and the float32
    precision and cuDNN settings (:func:`precision_settings`)."""
    return {
        "commit": git_commit(),
        "torch": torch.__version__,
        "device": str(torch.device(device)),
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "blas": blas(),
        "malloc": policy(),
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **precision_settings(),
    }


#: The entries of :func:`environment` that the pages drawn from a record read (those of
#: :func:`summary` and ``device``), each with the kind :func:`environment` writes there:
#: every record a command has written holds them (the oldest committed, from 8a5bf94 on).
DRAWN = {
    "commit": "text",
    "torch": "text",
    "device": "cpu[:N] or cuda[:N]",
    "device_name": "text",
    "threads": "a whole number >= 1",
    "time_utc": "text",
}
#: A recorded value as a refusal names it: bounded (a corrupted one may be huge), commands
#: whole up to a long line.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = 120
#: ``environment.device`` as :func:`environment` writes it (``str(torch.device(...))``).
DEVICE = re.compile(r"(cpu|cuda)(:[0-9]+)?")


def on_one_line(text: str) -> bool:
    """``text`` holds no control character, line or paragraph separator: drawn on a page,
    a line break would end the code span or table row it is in, and what follows it
    would be read as Markdown of its own (a ``# heading``)."""
    return not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def _device_given(argv: list[str]) -> str | None:
    """The value of the last ``--device`` in ``argv`` (argparse takes the last; an
    unambiguous abbreviation such as ``--dev`` too, as argparse did when it ran), ``""``
    where one lacks its value, ``None`` where none is given."""
    given = None
    for i, token in enumerate(argv):
        name, eq, value = token.partition("=")
        if len(name) >= 3 and "--device".startswith(name):
            given = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return given


def provenance_problem(record: Mapping, command: str) -> str | None:
    """What makes the ``command`` and ``environment`` of a recorded run (``record``, as
    ``command``, e.g. ``riemann-bench targets``, writes it) unfit to be drawn on its pages,
    or ``None``. The command must be text on one line (no control character) that
    ``shlex`` splits into ``command`` and its options (what ``riemann-bench`` records: the
    invocation, :func:`shlex.join`-ed); the environment a mapping that holds the entries
    the pages read (:data:`DRAWN`) of the kinds :func:`environment` writes, and every
    other entry text on one line, a whole number or true/false (the studies' pages table
    them all); and the command's ``--device`` (``cpu`` where none is given, every
    subcommand's default) of the kind of ``environment.device``. Found by a hunt: a
    command ``rm -rf /``, another subcommand's, a newline and a ``# heading`` in it (which
    rewrote the page), an empty environment (a broken table, a ``KeyError``) and a CUDA
    command beside a CPU environment were all drawn. The command's other options are not
    compared with the record (its ``--out`` may name where the directory was before it
    moved)."""
    shown = _SHOWN.repr
    if not isinstance(record, Mapping):
        return f"the record is {shown(record)}, not a mapping"
    if "command" not in record:
        return "lacks command"
    text = record["command"]
    if not isinstance(text, str):
        return f"command is {shown(text)}, not text"
    if not on_one_line(text):
        return f"command {shown(text)} holds a control character (a line break?)"
    expected = shlex.split(command)
    try:
        argv = shlex.split(text)
    except ValueError:  # an unclosed quote
        argv = []
    if argv[: len(expected)] != expected:
        return f"command is {shown(text)}, not a command line of {command}"
    if "environment" not in record:
        return "lacks environment"
    env = record["environment"]
    if not isinstance(env, Mapping):
        return f"environment is {shown(env)}, not a mapping"
    for key, kind in DRAWN.items():
        if key not in env:
            return f"environment lacks {key}"
        value = env[key]
        if key == "device":
            usable = isinstance(value, str) and DEVICE.fullmatch(value) is not None
        elif key == "threads":
            usable = type(value) is int and value >= 1
        else:
            usable = isinstance(value, str) and value != "" and on_one_line(value)
        if not usable:
            return f"environment.{key} is {shown(value)}, not {kind}"
    for key, value in env.items():
        if not (on_one_line(key) and isinstance(value, str | int) and on_one_line(str(value))):
            return (
                f"environment entry {shown(key)} is {shown(value)}, not text on one line, a "
                "whole number or true/false"
            )
    given = _device_given(argv[len(expected) :])
    if given is not None and DEVICE.fullmatch(given) is None:
        return f"command gives --device {shown(given)}, not cpu[:N] or cuda[:N]"
    if DEVICE.fullmatch(given or "cpu").group(1) != DEVICE.fullmatch(env["device"]).group(1):
        said = "gives no --device (so cpu)" if given is None else f"gives --device {given}"
        return f"command {said}, but environment.device is {env['device']!r}"
    return None
