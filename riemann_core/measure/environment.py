"""The environment record attached to every measurement."""

from __future__ import annotations

import datetime
import functools
import hashlib
import platform
import re
import subprocess
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
