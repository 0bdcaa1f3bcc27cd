"""Where a call's wall-clock time goes, by kind of operation (on a CPU or a GPU).

:func:`time_by_kind` runs a call under ``torch.profiler`` and attributes the self time of
every aten operation to the kind of the nearest operation, itself or an enclosing one,
that :data:`KIND_OF_OP` names: ``products`` (GEMMs, in place and accumulating ones too,
BLAS ``syrk``, matrix-vector products),
``cholesky`` (LAPACK's ``potrf`` called directly, ``riemann_core.woodbury.potrf_``;
``linalg_cholesky_ex`` with the copies and the triangle it clears),
``triangular`` (triangular solves); every other operation is ``other ops`` (elementwise
kernels, reductions, copies, the rest of the linear algebra). ``overhead`` is the rest
of the call's wall-clock time, timed without the profiler: Python, module hooks,
autograd's bookkeeping, the dispatcher. On CPU an operation's time is its wall-clock time
on the calling thread (intra-op threads included), so the kinds add up to the call.

On a GPU (``device`` CUDA) an operation's time is that of the kernels it launched, and
``overhead`` is the time the GPU is idle during the call: waiting for the host to launch
the next kernel (Python, hooks, dispatch, the launches) or for a host sync. Kernels no
aten operation launched count as ``other ops``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from .timing import synchronize

#: Operation -> kind: every one that :data:`riemann_core.measure.flops.LINALG` counts as a
#: product, a Cholesky or a triangular solve, and the GEMMs ``FlopCounterMode`` counts, so
#: that a kind's time and its counted FLOPs are of the same operations (found by an audit:
#: the accumulating products, ``addmm_`` forming a dense metric from the samples' Grams,
#: were timed as other operations while their FLOPs counted as products).
KIND_OF_OP = {
    "aten::mm": "products",
    "aten::addmm": "products",
    "aten::addmm_": "products",
    "aten::bmm": "products",
    "aten::baddbmm": "products",
    "aten::baddbmm_": "products",
    "aten::addbmm": "products",
    "aten::addbmm_": "products",
    "aten::mv": "products",
    "aten::addmv": "products",
    "aten::addmv_": "products",
    "aten::addr": "products",
    "aten::addr_": "products",
    "aten::dot": "products",
    "aten::vdot": "products",
    "riemann_core::syrk_": "products",
    "aten::linalg_cholesky_ex": "cholesky",
    "riemann_core::potrf_": "cholesky",
    "aten::linalg_solve_triangular": "triangular",
    "aten::cholesky_solve": "triangular",
    "aten::cholesky_inverse": "triangular",
}
KINDS = ("products", "cholesky", "triangular", "other ops", "overhead")


def _kind(event) -> str:
    while event is not None:
        kind = KIND_OF_OP.get(event.name)
        if kind is not None:
            return kind
        event = event.cpu_parent
    return "other ops"


def time_by_kind(
    call: Callable[[], object], calls: int = 3, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Seconds per call of ``call()`` on ``device`` by kind (:data:`KINDS`, see the
    module docstring): the operations' averaged over ``calls`` profiled calls; the
    overhead is the median wall-clock time of as many unprofiled calls less that (the
    profiler costs several microseconds per operation, which would otherwise count as
    overhead), or 0 where the machine slowed down between the two."""
    gpu = torch.device(device).type == "cuda"

    def timed():
        start = time.perf_counter()
        call()
        synchronize(device)
        return time.perf_counter() - start

    timed()
    walls = [timed() for _ in range(calls)]
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * gpu
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        synchronize(device)
    seconds = dict.fromkeys(KINDS, 0.0)
    ops = [e for e in prof.events() if e.name.startswith("aten::") or e.name in KIND_OF_OP]
    for event in ops:
        own = event.self_device_time_total if gpu else event.self_cpu_time_total
        seconds[_kind(event)] += own * 1e-6 / calls
    if gpu:  # kernels launched outside an aten operation
        busy = sum(k.duration for e in prof.events() for k in e.kernels) * 1e-6 / calls
        seconds["other ops"] += max(busy - sum(seconds.values()), 0.0)
    seconds["overhead"] = max(statistics.median(walls) - sum(seconds.values()), 0.0)
    return seconds
