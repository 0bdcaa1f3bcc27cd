"""Peak memory of a call: CUDA through the caching allocator, host in a fresh process."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable

import torch


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
    """Peak resident set size of this process so far (``ru_maxrss``), in bytes.

    It never decreases, so a per-call peak needs a fresh process (asv's ``peakmem_``
    benchmarks run in one).
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
