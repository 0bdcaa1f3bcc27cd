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


def host_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak rise of resident memory while ``fn()`` runs, above the resident memory before.

    The Gram buffer an earlier call kept for reuse is freed
    (:func:`riemann_core.woodbury.release_workspace`) and the C allocator's free memory
    returned to the system (:func:`release_free_memory`), so that what ``fn`` allocates
    shows as a rise rather than reusing memory freed by earlier calls; Linux resets the
    peak (``VmHWM``) when ``5`` is written to ``/proc/self/clear_refs``. Still a lower bound: memory the allocator
    keeps between ``fn``'s own allocations is counted once. ``None`` where the interface
    is missing.
    """
    release_workspace()  # the Gram buffer a last call kept, so fn allocates its own
    release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_bytes("VmRSS")
    except OSError:
        return None
    fn()
    return max(_status_bytes("VmHWM") - before, 0)
