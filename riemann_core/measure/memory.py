"""Peak memory of a call: CUDA through the caching allocator, host through the peak RSS."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..woodbury import release_workspace


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak CUDA bytes allocated while ``fn()`` runs, above what was allocated before.

    Uses ``reset_peak_memory_stats`` / ``max_memory_allocated`` around the call.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"cuda_peak_bytes needs a CUDA device, got {device}")
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def host_peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss``), in bytes: since it
    started, or since :func:`host_peak_bytes` last reset the peak."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def release_free_memory() -> bool:
    """Return the C allocator's free memory to the system (glibc's ``malloc_trim(0)``);
    False where there is no glibc."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    trim(0)
    return True


def reset_host_peak() -> bool:
    """Start the process's peak resident memory (``VmHWM``, and ``getrusage``'s
    ``ru_maxrss`` that asv's ``peakmem`` reads) afresh from what is resident now, Linux's
    ``5`` written to ``/proc/self/clear_refs``; first what an earlier call kept for reuse
    (the Gram buffer and its mirror, the masks made once per size) is freed
    (:func:`riemann_core.woodbury.release_workspace`) and the C
    allocator's free memory returned to the system (:func:`release_free_memory`), so that
    what runs next shows its allocations as a rise rather than reusing memory freed before.
    False where the interface is missing."""
    release_workspace()
    release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def host_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak rise of resident memory while ``fn()`` runs, above the resident memory before
    (:func:`reset_host_peak` first). Under glibc's default policy a lower bound: memory the
    allocator keeps between ``fn``'s own allocations is counted once. Under the policy that
    keeps freed memory (:func:`riemann_core.measure.allocator.keep_freed_memory`, which
    ``riemann-bench`` and the benchmark suites set), a block larger than any freed within
    ``fn`` grows the heap instead of reusing them, so the figure can exceed the peak of the
    live tensors (on a 2-core CPU: 6.1-7.3 MiB against 5.1-5.8 under the default policy for
    the natural-gradient direction of a width-256 depth-2 MLP at batch 64, 31.0 against
    29.4 MiB for the full one of a width-32 MLP). ``None`` where the
    interface is missing.
    """
    if not reset_host_peak():
        return None
    before = _status_bytes("VmRSS")
    fn()
    return max(_status_bytes("VmHWM") - before, 0)
