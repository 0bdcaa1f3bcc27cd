"""Sweep points dispatched to dask.distributed: one device per point, on an embedded local
cluster or on a cluster of the user's (``--scheduler``).

**Exclusive devices.** Every point asks for one ``device`` resource and every worker
declares as many as it owns devices, so no two points ever share a device: two timed
points on the same GPU, or on the same CPU cores, corrupt each other's timing.

**Rounds.** A sweep sends its points a round at a time (the grid, each round of growth, the
re-measurements: :func:`~riemann_core.scaling.sweep.sweep`), and between rounds has every
worker measure its devices' rates (:meth:`DaskRunner.everywhere`) while it holds all of
them, so that the rates are those of the devices, threads and cores its points run on.

**The local cluster** (:func:`local_workers`, :func:`start_cluster`): one worker process
per GPU, pinned to it through ``CUDA_VISIBLE_DEVICES``; on a CPU host one worker that owns
all the cores, with as many torch threads as this process has. More CPU workers
(``--workers``) each get cores of their own, never shared, and are pinned to them.

**Nothing lost, nothing twice.** The client (this process) is the only writer of the
results; a point reaches it once, as it completes. A point that kills its worker (a
segfault, ``kill -9``, the out-of-memory killer, a poisoned CUDA context) is retried once
(the nanny restarts the worker), then comes back as a
:class:`~riemann_core.scaling.sweep.PointLost` that the sweep records as ``error`` with the
reason; the points that waited on that worker behind it are sent again, unblamed
(:class:`DaskRunner`).

**No silent hang.** Dask waits forever for a resource no worker offers; :func:`check_workers`
fails before any point is submitted when none does (or when a worker cannot run points),
and the :class:`DaskRunner` gives up when no worker has offered it for a while.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import os
import queue
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import dask
import torch
from distributed import (
    Client,
    Future,
    Nanny,
    Scheduler,
    Security,
    SpecCluster,
    WorkerPlugin,
    get_worker,
    system,
)
from distributed.client import ClosedClientError
from distributed.comm import connect as comm_connect
from distributed.comm import parse_address, parse_host_port
from distributed.scheduler import KilledWorker

from ..measure import allocator
from ..measure.environment import code_fingerprint
from .sweep import PointLost
from .worker import THREADS, physical_cores

#: the worker resource a point holds while it runs: one device
RESOURCE = "device"
#: retries of a point that killed its worker, each on a surviving or restarted worker, before
#: it is recorded lost; the runner decides them, so the scheduler must retry nothing itself
RETRIES = 1
#: seconds between the checks, while no point completes, that a worker offers the resource
CHECK_EVERY = 2.0
#: dask's own periodic work in a worker, its nanny and the scheduler, slowed down: each
#: wakes a thread on the cores a point is timed on (the profiler samples every thread's
#: stack every 10 ms; the event loop's latency probe ticks every 20 ms; monitors poll)
QUIET = {
    # the workers keep the memory they free (riemann_core.measure.allocator), where dask's
    # nanny would set MALLOC_TRIM_THRESHOLD_=65536 (every large temporary tensor then
    # costs fresh, page-faulting memory) and OMP_NUM_THREADS=1 (the worker sets torch's
    # threads itself)
    "distributed.nanny.pre-spawn-environ": dict(allocator.KEEP),
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.admin.system-monitor.gil.enabled": False,
    "distributed.worker.memory.monitor-interval": "1s",
}


class ClusterError(ValueError):
    """The cluster cannot measure the sweep; the message names the cause and the fix."""


@dataclass(frozen=True)
class ClusterOptions:
    """Where the points run: a local cluster of ``workers`` processes with
    ``threads_per_worker`` torch threads each (``None``: see :func:`local_workers`), or
    the running cluster whose scheduler has the address (or scheduler file) ``scheduler``."""

    workers: int | None = None
    threads_per_worker: int | None = None
    scheduler: str | None = None


@dataclass(frozen=True)
class WorkerSpec:
    """One worker of a local cluster: its torch ``threads`` (passed as
    ``RIEMANN_BENCH_THREADS``), the ``devices`` resources it declares, the logical CPUs it
    is pinned to (``None``: not pinned) and its GPU (``CUDA_VISIBLE_DEVICES``)."""

    threads: int
    devices: int = 1
    cores: tuple[int, ...] | None = None
    gpu: int | None = None


def local_workers(
    device: str | torch.device, workers: int | None = None, threads: int | None = None
) -> list[WorkerSpec]:
    """The workers of the local cluster for ``device``.

    CUDA: one worker per GPU (the one ``cuda:N`` names, else every visible one; ``workers``
    takes the first ones). CPU: one worker (``workers`` more). A lone worker with
    ``threads`` unset runs as many torch threads as this process, unpinned; otherwise each
    worker gets ``threads`` (default: an equal share) cores of its own, pinned.
    """
    device = torch.device(device)
    cores = physical_cores()
    if device.type == "cuda":
        gpus: list[int | None] = (
            [device.index] if device.index is not None else list(range(torch.cuda.device_count()))
        )
        if not gpus:
            raise ClusterError(f"a local cluster on {device} needs a GPU, and none is visible")
        count = len(gpus) if workers is None else workers
        if count > len(gpus):
            raise ClusterError(
                f"--workers {count} on {len(gpus)} GPU(s): two workers on one GPU corrupt "
                f"each other's timing; pass --workers {len(gpus)} or fewer"
            )
        gpus = gpus[:count]
    else:
        count = 1 if workers is None else workers
        if count > len(cores):  # (before a list of as many: found by a hunt, 10**20 overflowed)
            raise ClusterError(
                f"{count} worker(s) need {count} cores at least and this host has "
                f"{len(cores)}: timed points on shared cores corrupt each other's timing; ask "
                "for fewer --workers"
            )
        gpus = [None] * count
    if count < 1:
        raise ClusterError(f"the local cluster needs at least one worker, got {count}")
    if count == 1 and threads is None:
        return [WorkerSpec(torch.get_num_threads(), gpu=gpus[0])]
    share = threads or len(cores) // count
    if share < 1 or count * share > len(cores):
        if device.type == "cuda":  # more GPUs than cores: their workers share the cores
            return [WorkerSpec(max(share, 1), gpu=gpu) for gpu in gpus]
        raise ClusterError(
            f"{count} worker(s) x {max(share, 1)} thread(s) need {count * max(share, 1)} cores "
            f"and this host has {len(cores)}: timed points on shared cores corrupt each "
            "other's timing; ask for fewer --workers or --threads-per-worker"
        )
    return [
        WorkerSpec(
            share,
            cores=tuple(c for core in cores[i * share : (i + 1) * share] for c in core),
            gpu=gpu,
        )
        for i, gpu in enumerate(gpus)
    ]


class Pinning(WorkerPlugin):
    """Pins every thread of a worker process to ``cores`` (threads started later inherit it)."""

    def __init__(self, cores: tuple[int, ...]):
        self.cores = cores

    def setup(self, worker) -> None:
        for thread in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(thread), self.cores)


def start_cluster(specs: Sequence[WorkerSpec]) -> SpecCluster:
    """A cluster on this host (loopback only): one nanny-supervised process per spec, the
    host's memory shared among them, no retries by the scheduler (the runner decides them:
    :class:`DaskRunner`) and dask's periodic work :data:`QUIET`."""
    memory = system.MEMORY_LIMIT // len(specs)
    workers = {}
    for i, spec in enumerate(specs):
        env = {THREADS: str(spec.threads)}
        if spec.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(spec.gpu)
        workers[f"device-{i}"] = {
            "cls": Nanny,
            "options": {
                "host": "127.0.0.1",
                "nthreads": spec.devices,
                "resources": {RESOURCE: spec.devices},
                "env": env,
                "memory_limit": memory,
                "plugins": () if spec.cores is None else (Pinning(spec.cores),),
                "silence_logs": logging.WARNING,
            },
        }
    scheduler = {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "dashboard": False, "allowed_failures": 0},
    }
    with dask.config.set(QUIET):  # the nannies hand this configuration to their workers
        return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING)


@contextmanager
def cluster(options: ClusterOptions, device: str | torch.device) -> Iterator[Client]:
    """A client of the local cluster that ``options`` describe, or of the running one."""
    if options.scheduler is None:
        specs = local_workers(device, options.workers, options.threads_per_worker)
        with start_cluster(specs) as local, Client(local, set_as_default=False) as client:
            yield client
        return
    client = connect(options.scheduler)
    try:
        failures = client.run_on_scheduler(_allowed_failures)
        if failures:
            warnings.warn(
                f"the scheduler at {options.scheduler} retries a point that kills its worker "
                f"{failures} time(s) itself, with every point waiting on that worker, so "
                "riemann-bench cannot tell which of them ran, and may record one that waited as "
                "the one that crashed; start the scheduler with "
                f"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0 (riemann-bench retries the "
                f"crashing point {RETRIES} time(s) itself)",
                stacklevel=3,
            )
        yield client
    finally:
        if client.status == "running":
            client.close()
        else:  # lost (check_connected says so): not dask's traceback of its reconnection
            # cancelled by this close (found by review: 30 lines of it above the error)
            logger = logging.getLogger("distributed.client")
            level = logger.level
            logger.setLevel(logging.CRITICAL)
            try:
                client.close()
            finally:
                logger.setLevel(level)


def connect(scheduler: str, timeout: float = 30.0) -> Client:
    """A client of the scheduler at the address (``tcp://host:8786``) or scheduler file
    ``scheduler``."""
    how = "start one (dask scheduler) and pass its address tcp://HOST:PORT or its --scheduler-file"
    if Path(scheduler).is_file():
        try:
            address = json.loads(Path(scheduler).read_text()).get("address")
        except (ValueError, UnicodeDecodeError, AttributeError):
            address = None
        if not isinstance(address, str):
            raise ClusterError(
                f"{scheduler} is not a dask scheduler file (JSON with the scheduler's "
                f"'address'); {how}"
            )
    elif "://" not in scheduler and ":" not in scheduler:
        raise ClusterError(f"{scheduler!r} is neither a scheduler file nor an address; {how}")
    else:
        address = scheduler
    # before the Client: one that fails to start waits 60 s for its own close
    check_answers(address, timeout, how)
    try:
        if Path(scheduler).is_file():
            return Client(scheduler_file=scheduler, timeout=timeout, set_as_default=False)
        return Client(scheduler, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        raise ClusterError(
            f"cannot reach a dask scheduler at {scheduler!r} ({type(err).__name__}: {err}); {how}"
        ) from err


#: seconds a dask scheduler takes at most to answer once connected (it takes milliseconds)
ANSWER_S = 10.0


def check_answers(address: str, timeout: float, how: str) -> None:
    """A :class:`ClusterError` naming the cause and the fix (``how``) unless a dask
    scheduler answers at ``address``: one that is no address, where nothing listens
    (refused at once, not after dask's ``timeout`` of retries), nothing connects within
    ``timeout`` s, or something other than a scheduler answers (a worker, or an HTTP server
    such as the dashboard's port 8787, which left the Client waiting forever: found by a
    hunt) or none answers within :data:`ANSWER_S`."""
    try:
        scheme, location = parse_address(address)
        if scheme in ("tcp", "tls"):
            host, port = parse_host_port(location)
    except ValueError as err:
        raise ClusterError(f"{address!r} is not a scheduler's address ({err}); {how}") from err
    within = timeout  # to connect: where something listens, its answer is due at once
    if scheme in ("tcp", "tls"):
        within = ANSWER_S
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as err:
            raise ClusterError(
                f"cannot reach a dask scheduler at {address!r} ({type(err).__name__}: "
                f"{err.strerror or err}); {how}"
            ) from err

    async def identity() -> object:
        args = Security().get_connection_args("client")
        comm = await asyncio.wait_for(comm_connect(address, timeout=within, **args), within)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await asyncio.wait_for(comm.read(), ANSWER_S)
        finally:
            comm.abort()

    try:  # in a thread of its own: the caller may run an event loop (a notebook)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(asyncio.run, identity()).result()
    except Exception as err:  # noqa: BLE001  (a timeout, or garbage read as dask's frames)
        answer = err
    if isinstance(answer, dict) and answer.get("type") == "Scheduler":
        return
    # none connected, over a protocol other than tcp or tls (ucx, inproc: found by review,
    # their errors were read as something else answering, a dashboard's port)
    if within == timeout and isinstance(answer, Exception):
        raise ClusterError(
            f"cannot reach a dask scheduler at {address!r} ({type(answer).__name__}: "
            f"{answer}); {how}"
        )
    if isinstance(answer, dict):
        said = f"a dask {answer.get('type')} answered"
    elif isinstance(answer, TimeoutError):
        said = f"no dask answer within {ANSWER_S:g} s"
    else:
        said = f"its answer is no dask message: {type(answer).__name__}: {answer}"[:200]
    raise ClusterError(
        f"what listens at {address!r} is not a dask scheduler ({said}): a dashboard's port "
        f"(8787) or a worker's? {how}"
    )


def check_workers(client: Client, device: str | torch.device, timeout: float = 60.0) -> dict:
    """The workers that offer the ``device`` resource, once one does, checked to run points.

    Waits up to ``timeout`` seconds for one (a batch system may still be starting them),
    then raises :class:`ClusterError`, as for a worker that cannot import riemann_core or
    runs other code than this process (:func:`code_fingerprint`), a CUDA sweep on a worker with fewer GPUs than the devices it declares, or a CPU sweep
    where two points would share cores (a worker that declares several devices, workers
    on one host pinned to overlapping cores). Returns address -> facts. Workers that join
    later are checked by the :class:`DaskRunner` (:func:`check_joined`).
    """
    deadline = time.monotonic() + timeout
    while not (offering := _offering(client)):
        if time.monotonic() > deadline:
            known = client.scheduler_info(n_workers=-1)["workers"]
            raise ClusterError(
                f"none of the {len(known)} worker(s) of the cluster offers the "
                f"{RESOURCE!r} resource after {timeout:g} s, so no point could ever run; "
                f"start each worker with --resources {RESOURCE}=K (K: the devices it owns, "
                f"1 on a CPU host), e.g. dask worker SCHEDULER --resources {RESOURCE}=1"
            )
        time.sleep(0.2)
    return check_joined(client, device, offering, {})


def check_joined(
    client: Client, device: str | torch.device, joined: dict[str, int], live: dict
) -> dict:
    """The facts of the workers ``joined`` (address -> devices they declare), checked as
    :func:`check_workers` says, beside the ``live`` ones checked before (address -> facts:
    no two may share cores); :class:`ClusterError` where one cannot run points. One that
    could not be reached and no longer offers the resource left during its check: left out
    (found by review: a worker gone between the scheduler's list and its check stopped the
    sweep, told to install riemann-bench); its results are measured again elsewhere."""
    facts = client.run(_worker_facts, workers=list(joined), on_error="return")
    if any(isinstance(fact, OSError) for fact in facts.values()):
        offering = _offering(client)
        facts = {a: f for a, f in facts.items() if not isinstance(f, OSError) or a in offering}
    cuda = torch.device(device).type == "cuda"
    for address, fact in facts.items():
        declared = joined[address]
        if isinstance(fact, BaseException):
            raise ClusterError(
                f"worker {address} cannot run riemann-bench points ({type(fact).__name__}: "
                f"{fact}); install riemann-bench in the workers' environment"
            )
        if fact["code"] != code_fingerprint():  # (found by a hunt: its rows were mixed in)
            raise ClusterError(
                f"worker {address} runs other riemann_core code (from {fact['package']}, "
                f"sources {fact['code']}) than this process (sources {code_fingerprint()}): "
                "its points would be timed and counted by another version; install the same "
                "version in the workers' environment"
            )
        if cuda and fact["gpus"] < declared:
            raise ClusterError(
                f"worker {address} declares {declared} device(s) but sees {fact['gpus']} "
                "GPU(s); declare one device per GPU it sees"
            )
        if not cuda and declared > 1:
            raise ClusterError(
                f"worker {address} declares {declared} devices on a CPU host: its points "
                f"would share cores and corrupt each other's timing; use --resources "
                f"{RESOURCE}=1"
            )
    if not cuda:
        _check_disjoint({**live, **facts})
    noisy = [address for address, fact in facts.items() if fact["noisy"]]
    if noisy:
        warnings.warn(
            f"{len(noisy)} of {len(facts)} workers run dask's profiler or glibc's default "
            "malloc policy (or GLIBC_TUNABLES's; each large tensor then maps fresh, "
            "page-faulting memory), which "
            "slows the points they time; give the workers the dask configuration of "
            "docs/clusters.md",
            stacklevel=2,
        )
    return facts


def _check_disjoint(facts: dict) -> None:
    seen: list[tuple[str, dict]] = []
    for address, fact in facts.items():
        for other, earlier in seen:
            shared = set(fact["cores"]) & set(earlier["cores"])
            if fact["host"] == earlier["host"] and shared:
                raise ClusterError(
                    f"workers {other} and {address} on {fact['host']} may run on the same "
                    f"cores {sorted(shared)}: timed points on shared cores corrupt each "
                    "other's timing; start one worker per host, or pin each to cores of "
                    "its own (taskset)"
                )
        seen.append((address, fact))


def _offering(client: Client) -> dict[str, int]:
    check_connected(client)
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return {
        address: int(info["resources"][RESOURCE])
        for address, info in workers.items()
        if info.get("resources", {}).get(RESOURCE, 0) >= 1
    }


#: the reason dask gives a future it cancels when the client loses its scheduler
LOST_SCHEDULER = "scheduler-connection-lost"


def check_connected(client: Client, future: Future | None = None):
    """A :class:`ClusterError` where ``client`` has lost its scheduler (it died, or the
    network to it did), or ``future`` was cancelled for that: dask cancels every future
    the client held, then retries the connection for its timeout (the scheduler's list of
    workers meanwhile the last one read, then none at all). Found by a hunt: a killed
    scheduler left its running point recorded ``error``, "cancelled by the dask
    scheduler before it ran", and 31 s later a ``KeyError: 'workers'`` with a traceback.
    The message gives no count of the points left: the runner knows only its round's
    (found by review: "1 left" where the rerun measured 8)."""
    lost = client.status != "running"
    if future is not None and future.status == "cancelled":
        try:
            future.result(timeout=1)
        except CancelledError as err:
            lost = lost or getattr(err, "reason", None) == LOST_SCHEDULER
        except Exception:  # noqa: BLE001  (the client closed meanwhile: its status says so)
            lost = lost or client.status != "running"
    if lost:
        raise _lost(client)


def _lost(client: Client) -> ClusterError:
    address = getattr(client.scheduler, "address", None)
    return ClusterError(
        f"lost the connection to the dask scheduler{f' at {address}' if address else ''} "
        "(it stopped, or its host or the network to it did): the finished points "
        "are kept; rerun the sweep with the same --out once the scheduler is back to "
        "measure the others"
    )


def _fetched(client: Client, future: Future) -> object:
    """:func:`_outcome` of ``future``, after :func:`check_connected`; its result fetched
    from the scheduler. A scheduler that dies after the point finished and before its
    result came (the client not told yet) fails that fetch (``CommClosedError``: "Stream is
    closed"), or dask cancels the future during it: the same :class:`ClusterError` (found
    by review: a kill -9 of the scheduler in one sweep of five ended it with "error: in
    <TCP (closed) ConnectionPool.gather ...>: Stream is closed")."""
    check_connected(client, future)
    try:
        return _outcome(future)
    except (OSError, CancelledError) as err:
        check_connected(client, future)  # (cancelled since: the reason says why)
        if isinstance(err, CancelledError):
            return _outcome(future)  # cancelled for another cause: recorded as before
        raise _lost(client) from err


def _cancel(client: Client, futures: list[Future]) -> None:
    """Cancel ``futures`` where the client still holds its scheduler; a connection lost
    and not noticed yet (dask then cancels them all) fails this cancel, an error that
    would take the place of the one that stops the sweep."""
    if client.status == "running":
        with suppress(OSError, ClosedClientError):
            client.cancel(futures)


def _worker_facts() -> dict:
    import riemann_core
    from riemann_core.measure.environment import code_fingerprint
    from riemann_core.scaling import worker  # noqa: F401  (fails where it is not installed)

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return {
        "code": code_fingerprint(),
        "package": str(Path(riemann_core.__file__).parent),
        "host": socket.gethostname(),
        "gpus": torch.cuda.device_count(),
        "cores": cores,
        "noisy": dask.config.get("distributed.worker.profile.enabled")
        or allocator.policy() in ("default", "tunables"),
    }


def _allowed_failures(dask_scheduler) -> int:
    return dask_scheduler.allowed_failures


class DaskRunner:
    """The sweep's :class:`~riemann_core.scaling.sweep.Runner` on a dask cluster: each
    point holds one ``device`` resource, and results are yielded as they complete.

    **Queued points** (``queued``, per device): points waiting on a worker behind the one
    it runs, so that it starts the next the moment one ends instead of a round trip through
    the scheduler and the client later (about 12 ms on a small CPU host). The client's and
    the scheduler's work on each result then runs during the next point: on a CPU host,
    whose cores that point's threads own, that work would share the timed cores (the
    timed medians came out 0.98-1.05x those in-process queued, 0.97-1.05x not:
    ``python -m bench.cluster``), so CPU points are sent one at a time
    (:func:`queued_for`); a GPU point's work is on its GPU.

    **Blame.** When a worker dies, dask fails every point it held, the ones waiting as well
    as the one running. The scheduler retries none of them itself (``allowed_failures=0``):
    a worker starts its points in the order they were sent (their priority says so), so of
    the points it held the first ones sent, as many as it has devices, were running. Each
    of those is blamed and retried :data:`RETRIES` time(s) (every retry runs on a surviving
    or restarted worker) before it is returned as a
    :class:`~riemann_core.scaling.sweep.PointLost`; the others are sent again, unblamed. A point whose result dies with its worker before the client
    fetched it (milliseconds after it ends) is measured again by dask, and still yielded
    once.

    Gives up with :class:`ClusterError` when no worker has offered the resource for
    ``patience`` seconds (the points not yet measured are cancelled; a rerun measures them),
    and at once when the client loses its scheduler (:func:`check_connected`).

    **Workers that join later** (a batch system's jobs starting as the queue lets them, a
    restarted worker) are checked (:func:`check_joined`) before their first result counts
    and before they measure rates: each result comes back with the address of the worker
    that computed it, and one that fails the checks stops the sweep with
    :class:`ClusterError` (found by a hunt: a worker with other riemann_core code that
    joined after :func:`check_workers` measured a quarter of a sweep's points, unrefused).
    ``device``: the kind of device the sweep measures, whose checks the joining workers
    pass (``None``: none are checked, for simulated devices: ``bench.cluster``, the
    tests); ``checked``: the facts of the workers already checked (address -> facts).
    """

    placed = True

    def __init__(
        self,
        client: Client,
        *,
        device: str | torch.device | None = None,
        checked: dict | None = None,
        queued: int = 0,
        patience: float = 120.0,
    ):
        self.client = client
        self.device = device
        self.checked = dict(checked or {})
        self.queued = queued
        self.patience = patience
        self._absent = False  # no worker offered the resource at the last everywhere()

    def _admit(self, offering: dict[str, int]) -> None:
        """Check the workers of ``offering`` (the live ones) not checked yet, beside the
        live ones that were; forgets the dead ones (a restarted worker takes their cores)."""
        if self.device is None:
            return
        self.checked = {a: f for a, f in self.checked.items() if a in offering}
        joined = {a: n for a, n in offering.items() if a not in self.checked}
        if joined:
            self.checked.update(check_joined(self.client, self.device, joined, self.checked))

    def __call__(
        self, task: Callable[[dict], object], runs: Sequence[dict]
    ) -> Iterator[tuple[dict, object]]:
        waiting = list(reversed(range(len(runs))))  # indices into runs; the next is last
        flying: dict[Future, tuple[int, int]] = {}  # future -> (order sent, index)
        kills = [0] * len(runs)
        done: queue.SimpleQueue[Future] = queue.SimpleQueue()
        offering = _offering(self.client)  # address -> devices, of the live workers
        self._admit(offering)  # those that joined since the last round
        self._absent = self._absent and not offering
        declared = dict(offering)  # of every worker seen, dead ones too
        sent = itertools.count()
        seen = checked = time.monotonic()

        def refill() -> None:
            while waiting and len(flying) < (1 + self.queued) * sum(offering.values()):
                index, order = waiting.pop(), next(sent)
                future = self.client.submit(  # a worker starts the highest priority first
                    _where,
                    task,
                    runs[index],
                    resources={RESOURCE: 1},
                    priority=-order,
                    pure=False,
                )
                flying[future] = (order, index)
                future.add_done_callback(done.put)

        try:
            while waiting or flying:
                refill()
                try:
                    future = done.get(timeout=CHECK_EVERY)
                except queue.Empty:
                    future = None  # nothing finished: the workers are still checked below
                if future in flying:  # else: already handled with its dead worker's points
                    check_connected(self.client, future)
                    dead = _killed_on(future)
                    if dead is None:
                        outcome = _fetched(self.client, future)
                        _, index = flying.pop(future)
                        future.release()  # else a worker that dies later loses it: run again
                        if not isinstance(outcome, PointLost):
                            address, outcome = outcome
                            if self.device is not None and address not in self.checked:
                                offering = _offering(self.client)
                                self._admit(offering)
                                declared.update(offering)  # (its devices, should it die)
                                if address not in self.checked:  # gone before its check
                                    waiting.append(index)
                                    continue
                        refill()  # now, not after the sweep has written the row
                        yield runs[index], outcome
                    else:
                        for index in _blame(flying, dead, declared.get(dead, 1), kills):
                            if kills[index] > RETRIES:
                                yield (
                                    runs[index],
                                    PointLost(
                                        f"the point killed its worker {kills[index]} times (last "
                                        f"{dead}): a crash, kill -9, the out-of-memory killer or "
                                        "a poisoned CUDA context; the worker's log says which"
                                    ),
                                )
                            else:
                                waiting.append(index)
                now = time.monotonic()
                if now - checked >= CHECK_EVERY:  # workers come and go
                    checked, offering = now, _offering(self.client)
                    self._admit(offering)
                    self._absent = self._absent and not offering  # (back: found by review)
                    declared.update(offering)
                    if offering:
                        seen = now
                    elif now - seen > self.patience:
                        raise ClusterError(
                            f"no worker has offered the {RESOURCE!r} resource for "
                            f"{self.patience:g} s; {len(flying) + len(waiting)} point(s) not "
                            "measured: rerun to measure them once workers are back"
                        )
        finally:
            _cancel(self.client, list(flying))  # (none where dask cancelled them all)

    def everywhere(
        self,
        task: Callable[..., list],
        devices: Sequence[str],
        lost: str,
        report: Callable[[str, int, int], object] | None = None,
    ) -> list:
        """``task(device)`` on every worker that offers the resource, for each kind of
        device in ``devices``, holding all the worker's devices (no point runs beside it);
        the results' items. A worker that dies or fails meanwhile is left out, with a
        warning that says so and what it means (``lost``; its address goes with it, so a
        task pinned to it would wait forever). Where no worker offers the resource (one
        restarting after a death), it waits ``patience`` seconds for one, then warns (found
        by a hunt: the end-of-sweep rates and the lines' timing again were skipped
        silently while a killed worker restarted). With ``report``, ``task(device,
        report=send)``: ``send(done, total)`` logs a dask event on a topic of this call's
        own, which the client hands to ``report("ADDRESS DEVICE", done, total)`` on its
        event loop (a worker sends its events and its result in order: all have come
        when its result has)."""
        offering, since, waits = _offering(self.client), time.monotonic(), not self._absent
        while not offering and waits and time.monotonic() - since < self.patience:
            time.sleep(CHECK_EVERY)
            offering = _offering(self.client)
        # none back after a wait: the next call does not wait again (found by review)
        self._absent = not offering
        self._admit(offering)
        if not offering:
            waited = f"for {self.patience:g} s" if waits else "since the last wait for one"
            warnings.warn(
                f"no worker offered the {RESOURCE!r} resource {waited}: {lost}", stacklevel=2
            )
            return []
        pending: dict[Future, str] = {}
        done: queue.SimpleQueue[Future] = queue.SimpleQueue()
        topic = f"riemann-bench-progress-{uuid.uuid4().hex}"  # (one cluster, several sweeps)
        if report is not None:  # subscribed before any task is sent: no event is missed
            self.client.subscribe_topic(topic, lambda event: report(*event[1]))
        for address, count in offering.items():
            for device in dict.fromkeys(devices):
                send = (
                    {}
                    if report is None
                    else {"report": functools.partial(_log_event, topic, f"{address} {device}")}
                )
                future = self.client.submit(
                    task,
                    device,
                    **send,
                    workers=[address],
                    allow_other_workers=False,
                    resources={RESOURCE: count},
                    pure=False,
                )
                pending[future] = address
                future.add_done_callback(done.put)
        items, left_out = [], []
        try:
            while pending:
                try:
                    future = done.get(timeout=CHECK_EVERY)
                except queue.Empty:
                    check_connected(self.client)
                    alive = self.client.scheduler_info(n_workers=-1)["workers"]
                    gone = [f for f, address in pending.items() if address not in alive]
                    self.client.cancel(gone)
                    left_out += [f"{pending.pop(f)}: it left the cluster" for f in gone]
                    continue
                address = pending.pop(future, None)
                if address is None:  # cancelled above
                    continue
                outcome = _fetched(self.client, future)
                future.release()
                if isinstance(outcome, PointLost):
                    left_out.append(f"{address}: {outcome.reason}")
                else:
                    items += outcome
        finally:
            _cancel(self.client, list(pending))  # (none where dask cancelled them all)
            if report is not None and self.client.status == "running":
                with suppress(OSError, ClosedClientError):
                    self.client.unsubscribe_topic(topic)
        if left_out:  # (found by review: the others' results stood, the warning said lost)
            then = (
                f"left out; the other workers' results stand (where it was the only worker of "
                f"its device: {lost})"
                if items
                else lost
            )
            warnings.warn(f"{'; '.join(left_out)}: {then}", stacklevel=2)
        return items


def _where(task: Callable[[dict], object], run: dict) -> tuple[str, object]:
    """``(address of this worker, task(run))``: whom a result came from."""
    return get_worker().address, task(run)


def _log_event(topic: str, place: str, done: int, total: int) -> None:
    """``done`` of ``total`` steps of the task at ``place``, as a dask event on ``topic``
    (from the task's thread: the worker sends it from its event loop, while the task goes
    on)."""
    get_worker().log_event(topic, [place, done, total])


def _blame(
    flying: dict[Future, tuple[int, int]], dead: str, devices: int, kills: list[int]
) -> list[int]:
    """Takes out of ``flying`` the points that the worker ``dead`` held (dask fails them all
    in one message), counts a kill against the ``devices`` first sent (they were running)
    and returns the indices of all of them, the last sent first."""
    held = sorted(
        (order, index, future)
        for future, (order, index) in flying.items()
        if _killed_on(future) == dead
    )
    for rank, (_, index, future) in enumerate(held):
        del flying[future]
        future.release()
        kills[index] += rank < devices
    return [index for _, index, _ in reversed(held)]


def _killed_on(future: Future) -> str | None:
    """The address of the worker whose death failed ``future``; ``None`` if it did not."""
    if future.status != "error":
        return None
    err = future.exception()
    return err.last_worker.address if isinstance(err, KilledWorker) else None


def _outcome(future) -> object:
    if future.status == "finished":
        return future.result()
    if future.status == "cancelled":
        return PointLost("cancelled by the dask scheduler before it ran")
    err = future.exception()
    if isinstance(err, KilledWorker):
        return PointLost(
            f"its worker {err.last_worker.address} died: a crash, kill -9, the out-of-memory "
            "killer or a poisoned CUDA context; the worker's log says which"
        )
    return PointLost(f"{type(err).__name__} on the worker: {err}"[:300])


def queued_for(device: str | torch.device) -> int:
    """Points queued behind each running one (:class:`DaskRunner`): one on a GPU, none on a
    CPU host, where the client's work between points would share the timed cores. (Not
    measured on a GPU: none was at hand.)"""
    return 1 if torch.device(device).type == "cuda" else 0


@contextmanager
def runner(options: ClusterOptions, device: str | torch.device) -> Iterator[DaskRunner]:
    """A :class:`DaskRunner` on the cluster ``options`` describe, its workers checked."""
    with cluster(options, device) as client:
        checked = check_workers(client, device)
        yield DaskRunner(client, device=device, checked=checked, queued=queued_for(device))
