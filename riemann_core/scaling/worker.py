"""Where a sweep point is measured: the device it runs on and the record of that device.

The unit of work of a sweep is :func:`~riemann_core.scaling.sweep.measure_point`, a pure
function of the point and the grid. Wherever it runs, in the ``riemann-bench`` process or
on a dask worker, :func:`measure_here` wraps it: it picks the device, adds to the row where
the point ran (``host``, ``device_name``, ``physical_device``) and returns, beside the row,
the record of that device (its environment), made once per sweep in each process.
:func:`rates_here` measures the rates of the devices the points run on (GEMM, Cholesky,
triangular solve: the yardsticks of the achieved rates and of the speed of light) in the
same place, with the same threads, and how busy other processes kept the CPUs meanwhile.

In this process a point runs on the device the grid names (``cuda:1`` is GPU 1). On a
cluster the grid names only the kind of device: each worker runs a point on a device of its
own. A worker pinned to one GPU through ``CUDA_VISIBLE_DEVICES`` sees it as ``cuda:0``;
``physical_device`` names it as the host numbers it. A worker that owns several GPUs (it
declares as many ``device`` resources) lends each running point one of them. A worker runs
torch on :func:`worker_threads` threads: dask's nanny would leave it one. A point that
leaves its GPU unusable (a sticky CUDA error) ends its worker's process, as a crash would.

Needs torch only: the in-process sweep works without dask.
"""

from __future__ import annotations

import functools
import os
import queue
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from ..measure.environment import device_name, environment
from ..measure.load import outside_load
from ..measure.memory import release_free_memory

#: environment variable: the torch threads of a worker (default: :func:`physical_cores`)
THREADS = "RIEMANN_BENCH_THREADS"
#: (sweep session, device) -> that device's record, measured once per sweep in a process
_records: dict[tuple[str, str], dict] = {}
_records_lock = threading.Lock()
_free_gpus: queue.SimpleQueue[int] | None = None
_gpus_lock = threading.Lock()


def measure_here(
    measure: Callable[[dict, object], dict],
    run: dict,
    *,
    grid: object,
    session: str,
    placed: bool = False,
) -> tuple[dict, dict]:
    """``(row, record)``: ``measure(run, grid)`` on this process's device, and its record.

    ``placed``: the point was sent to this process by a cluster, so it runs on a device of
    this process of the kind ``run["device"]`` names, not on that device index, with
    :func:`worker_threads` torch threads. The row keeps the requested ``device`` (the
    sweep's key) and gains ``host``, ``device_name`` and ``physical_device``. ``record``
    (see :func:`device_record`) is made once per sweep ``session`` and device, before
    the device's first point or rate. Afterwards the C allocator's free memory goes back
    to the system: a process that keeps freed memory for its timings
    (:mod:`riemann_core.measure.allocator`) would otherwise hold a point's peak until the
    next point, over dask's pause threshold for a worker near its memory limit (the next
    point's memory measurement returns it first anyway, so its timing is unchanged).
    """
    if placed:
        torch.set_num_threads(worker_threads())
    with _device(run["device"], placed) as device:
        record = device_record(device, session)
        row = measure({**run, "device": str(device)}, grid)
        if placed and row["status"] == "error" and not context_usable(device):
            # a sticky CUDA error fails every later point of this process: die instead, so
            # that the cluster retries the point once on a fresh worker, then records it
            print(f"riemann-bench: {row['reason']} left {device} unusable", file=sys.stderr)
            os._exit(70)
    release_free_memory()
    where = {k: record[k] for k in ("host", "device_name", "physical_device")}
    return {**row, "device": run["device"], **where}, record


def rates_here(
    rates: Callable[[torch.device, torch.dtype], dict[str, list[float]]],
    requested: str,
    *,
    dtypes: Sequence[str],
    session: str,
    placed: bool = False,
    report: Callable[[int, int], object] | None = None,
) -> list[dict]:
    """``rates(device, dtype)`` on each device of this process of the kind ``requested``
    names, in each of ``dtypes``: ``[{**device_record(device), "dtype": ..., "rates":
    {kind: [FLOP/s, ...]}, "load": ...}]``, ``load`` how busy other processes kept this
    process's CPUs meanwhile (:func:`~riemann_core.measure.load.outside_load`: empty where
    it cannot be read). ``report(done, total)``, where given, counts the measurements
    (a device in a dtype) done of all: with 0 first, then after each.

    ``placed``: on a cluster's worker, which runs it while it holds all its ``device``
    resources (no point runs beside it), on every GPU it sees (or its CPU), with
    :func:`worker_threads` torch threads, as its points run; in this process, on
    ``requested`` itself.
    """
    device = torch.device(requested)
    if placed:
        torch.set_num_threads(worker_threads())
    own = [device]
    if placed and device.type == "cuda":
        own = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    measured, total = [], len(own) * len(dtypes)
    if report is not None:
        report(0, total)
    for d in own:
        for dtype in dtypes:
            with outside_load() as load:
                rates_of = rates(d, getattr(torch, dtype))
            record = {**device_record(d, session), "dtype": dtype, "rates": rates_of}
            measured.append({**record, "load": load})
            if report is not None:
                report(len(measured), total)
    release_free_memory()  # as after a point (measure_here)
    return measured


def lines_here(
    time_lines: Callable[..., list[dict]],
    requested: str,
    *,
    lines: list[list[dict]],
    grid: object,
    session: str,
    placed: bool = False,
    report: Callable[[int, int], object] | None = None,
) -> list[dict]:
    """``time_lines(lines, grid, device)`` for the lines of points of the kind of device
    ``requested`` names, on a device of this process of that kind (``placed``: a cluster's
    worker holding all its devices, with :func:`worker_threads` torch threads); each row
    gains the device's ``host``, ``device_name``, ``physical_device`` and the ``worker``
    (they and the process id). ``report``, where given, goes to ``time_lines`` as its
    ``progress`` (:func:`~riemann_core.scaling.sweep.time_lines`)."""
    mine = [line for line in lines if line[0]["device"] == requested]
    if not mine:
        return []
    if placed:
        torch.set_num_threads(worker_threads())
    with _device(requested, placed) as device:
        record = device_record(device, session)
        where = {k: record[k] for k in ("host", "device_name", "physical_device")}
        worker = f"{record['host']} {record['physical_device']} {os.getpid()}"
        progress = {} if report is None else {"progress": report}
        timed = time_lines(mine, grid, device, **progress)
        rows = [{**row, **where, "worker": worker} for row in timed]
    release_free_memory()  # as after a point (measure_here)
    return rows


def device_record(device: torch.device, session: str) -> dict:
    """``host``, ``device_name``, ``physical_device`` and ``environment`` of ``device``,
    cached per ``session`` and device in this process."""
    key = (session, str(device))
    with _records_lock:
        if key not in _records:
            _records[key] = {
                "host": socket.gethostname(),
                "device_name": device_name(device),
                "physical_device": physical_device(device),
                "environment": environment(device),
            }
        return _records[key]


def physical_device(device: torch.device) -> str:
    """``device`` as its host numbers it: ``cuda:N`` through ``CUDA_VISIBLE_DEVICES``
    (or the GPU's UUID where that lists UUIDs); ``cpu`` for the host, ``cpu:0-3,8`` for
    the cores a worker pinned to some of the host's may run on (found by a hunt: two
    workers pinned to one core each were recorded, and reported, as one). (A container
    limited to some cores names them too, and so does a thread OpenMP bound to one,
    ``OMP_PROC_BIND``.)"""
    if device.type == "cpu":
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if not cores or len(cores) >= (os.cpu_count() or 1):
            return "cpu"
        runs = [[cores[0], cores[0]]]
        for c in cores[1:]:
            if c == runs[-1][1] + 1:
                runs[-1][1] = c
            else:
                runs.append([c, c])
        return "cpu:" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    if device.type != "cuda":
        return device.type
    index = torch.cuda.current_device() if device.index is None else device.index
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return f"cuda:{index}"
    entry = [v.strip() for v in visible.split(",")][index]
    return f"cuda:{entry}" if entry.isdigit() else entry


def context_usable(device: torch.device) -> bool:
    """Whether ``device`` still computes: a CUDA error such as an illegal memory access
    poisons the context of the process for good."""
    if device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1).item()
        torch.cuda.synchronize(device)
    except RuntimeError:
        return False
    return True


def worker_threads() -> int:
    """Torch threads of a worker: ``RIEMANN_BENCH_THREADS`` where set, else the cores it
    may run on (its affinity: a batch system's allocation, ``taskset``, a local pinning)."""
    return int(os.environ.get(THREADS) or len(physical_cores()))


@functools.cache
def physical_cores() -> tuple[tuple[int, ...], ...]:
    """The cores this process may run on, each as the logical CPUs (hyperthreads) it holds."""
    if not hasattr(os, "sched_getaffinity"):  # not Linux: no pinning, one CPU per core
        return tuple((cpu,) for cpu in range(os.cpu_count() or 1))
    cores: dict[tuple[str, ...], list[int]] = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = tuple(
                (topology / f).read_text().strip() for f in ("physical_package_id", "core_id")
            )
        except OSError:
            key = (str(cpu),)
        cores.setdefault(key, []).append(cpu)
    return tuple(tuple(cpus) for cpus in cores.values())


@contextmanager
def _device(requested: str, placed: bool) -> Iterator[torch.device]:
    device = torch.device(requested)
    if not placed or device.type != "cuda":
        yield device
        return
    gpus = _gpu_pool()
    index = gpus.get()  # the device resource admits at most as many points as GPUs
    try:
        yield torch.device("cuda", index)
    finally:
        gpus.put(index)


def _gpu_pool() -> queue.SimpleQueue[int]:
    global _free_gpus
    with _gpus_lock:
        if _free_gpus is None:
            count = torch.cuda.device_count()
            if count == 0:
                raise RuntimeError(
                    f"a CUDA point was sent to {socket.gethostname()}, whose worker sees "
                    "no GPU; start workers with the device resource only where GPUs are"
                )
            _free_gpus = queue.SimpleQueue()
            for index in range(count):
                _free_gpus.put(index)
        return _free_gpus
