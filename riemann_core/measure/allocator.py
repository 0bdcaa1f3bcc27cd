"""Host memory kept between timed calls: glibc's ``malloc`` told to reuse what it frees.

With glibc's defaults a block above the mmap threshold (adaptive, 128 KiB to 32 MiB) is
mapped at each allocation and unmapped when freed, and free memory at the top of the heap
goes back to the system. A call that allocates tensors of megabytes then maps fresh pages
every time and takes a page fault per 4 KiB page at their first touch: the allocator's
policy, not the algorithm's work, and it bends the scaling fits where a tensor crosses the
threshold. On a 2-core CPU the euclidean direction of an MLP with two hidden layers of
width ``w`` at batch 16 (median of 7 calls, one process each) took, with glibc's defaults
against :data:`KEEP`: 7.9 against 5.9 ms at ``w = 1024`` (2,600 against 1 minor page
faults per call), 34.1 against 16.3 ms at 2048, 146 against 64 ms at 4096 (65,540 faults
against none).

:data:`KEEP` are glibc's settings that keep freed memory for reuse: no mmap for large
blocks, no trimming of the heap's top, one arena for every thread (a thread's own arena
maps its large blocks anyway); free memory at the heap's top beyond 2 GiB is still
returned. ``riemann-bench`` applies them to its processes (:func:`keep_freed_memory`) and
starts the workers of its local cluster with them; the environment record says which
policy a measurement ran under (:func:`policy`). A memory measurement still returns the
free memory first (:func:`riemann_core.measure.memory.release_free_memory`), and so does
the sweep after each point: the memory kept is at most a point's own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: glibc's environment variables that keep freed memory (read when a process starts).
KEEP = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
}
#: the ``mallopt`` parameter of each (glibc's malloc.h: M_ARENA_MAX, M_MMAP_MAX,
#: M_TRIM_THRESHOLD)
_PARAMETER = {"MALLOC_ARENA_MAX": -8, "MALLOC_MMAP_MAX_": -4, "MALLOC_TRIM_THRESHOLD_": -1}


def _tuned() -> bool:
    """Whether ``GLIBC_TUNABLES`` sets malloc's parameters: they override :data:`KEEP`."""
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def _in_environment() -> bool:
    return platform.libc_ver()[0] == "glibc" and all(
        os.environ.get(name) == value for name, value in KEEP.items()
    )


#: whether this process runs with :data:`KEEP`: in its environment when this module was
#: first imported (a worker started with it), or applied by :func:`keep_freed_memory`.
#: Not read from ``os.environ`` later: a dask nanny in this process may set it there for
#: the workers it starts, which changes nothing for this process.
_kept = _in_environment()


def keep_freed_memory() -> bool:
    """Apply :data:`KEEP` to this process (``mallopt``; threads that allocated before keep
    their own arena) and put it in ``os.environ`` for the processes it starts. False,
    changing nothing, where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global _kept
    if not all(mallopt(_PARAMETER[name], int(value)) == 1 for name, value in KEEP.items()):
        return False
    os.environ.update(KEEP)
    _kept = True
    return True


def policy() -> str:
    """The environment record's ``malloc``: ``"keep freed"`` when this process runs with
    :data:`KEEP` (see ``_kept``), ``"tunables"`` when ``GLIBC_TUNABLES`` sets malloc's
    parameters instead (which this package does not read), ``"default"`` with glibc's
    defaults, ``"not glibc"`` under another C library (whose policy is left alone)."""
    if platform.libc_ver()[0] != "glibc":
        return "not glibc"
    if _tuned():
        return "tunables"
    return "keep freed" if _kept else "default"
