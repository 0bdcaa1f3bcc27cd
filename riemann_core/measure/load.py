"""How busy other processes keep the CPUs this process runs on, read around a measurement.

A load that lasts a whole sweep slows every measurement of the device's rates alike, so
their spread does not show it (found by a hunt: another process spinning on one of two
cores held the GEMM at 110-141 GFLOP/s against 205-220 quiet, its readings 3-17% apart).
It is read directly instead: Linux's ``/proc/stat`` counts, per CPU, the time it was busy
since boot; over the CPUs this process may run on (its affinity), the busy time between
two readings less this process's own CPU time is the time other processes took, steal
time (a hypervisor running another guest on the CPU) included. Over the wall time between
the readings, the mean number of CPUs they kept busy. Two file reads per measurement.
Where the platform has no ``/proc/stat`` nothing is read: the load is unknown, not zero.

The CPUs read are those any thread of this process may run on (found by review: under
``OMP_PROC_BIND`` the thread that measures is bound to one CPU while torch's other threads
run on the others, and a reading of that CPU alone, less the CPU time of all of them, read
0.00 where the process's two CPUs read 0.65-0.98). With them, how many physical cores they
make up (``cores_read``: two hyperthreads of a core are one), so that a CPU beside a core
the points run on is not taken for a free one.

The counters count whole ticks (``SC_CLK_TCK``, 100 a second), so over a short block their
rounding alone moves the reading by up to a tick of each CPU read over the block's wall
time (``rounding_cores``): on a 2-core machine, blocks of 2-10 ms of a 2-thread GEMM read
0.00-2.00 where 1 s blocks read 1.00-1.02 beside the same load. Whether a reading is loaded
(:func:`is_loaded`) is judged on the least the reading allows, the reading less its
rounding, so that a point timed in a few milliseconds is not taken for a loaded one.

Such a block is read another way too (:func:`run_queue_wait`): Linux's scheduler counts,
per thread, the nanoseconds it waited for a CPU while runnable (``schedstat``); over the
block's wall time, the mean number of this process's threads kept waiting. Where the
measurement's threads fit in the cores, they wait only for other work: on a 2-core
machine, 14-120 ms blocks of 2-thread GEMMs and directions read 0.00-0.04 quiet, and
10-120 ms blocks 0.39-0.97 beside one spinning process. A block a few of the scheduler's time slices long is not read this way
(:data:`WAIT_BLOCK_S`): one slice more or less decides it (3 ms blocks read 0.00 or 0.57
beside the same spinner), and a block of microseconds reads any preemption as a load.
:func:`point_load` reads a block both ways.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

#: the per-CPU counters, in clock ticks since boot
STAT = Path("/proc/stat")
#: the fields of a ``cpuN`` line that count busy time: user, nice, system, irq, softirq,
#: steal (guest and guest_nice are counted in user and nice already; idle and iowait are
#: idle)
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


#: this process's threads, each with its scheduler statistics (``schedstat``: nanoseconds on
#: a CPU, nanoseconds runnable but waiting for one, time slices)
TASKS = Path("/proc/self/task")


@dataclass(frozen=True)
class CpuReading:
    """One reading: the busy seconds of the CPUs ``cpus`` since boot, this process's CPU
    seconds and the wall clock, at one moment."""

    busy_s: float
    own_s: float
    wall_s: float
    cpus: frozenset[int]
    #: the physical cores ``cpus`` make up (:func:`cores_of`)
    cores: int | None = None


def busy_seconds(text: str, cpus: Collection[int], ticks_per_s: float) -> float:
    """The busy time of ``cpus`` in ``/proc/stat``'s ``text``, in seconds (a CPU without
    a line, offline, counts nothing)."""
    busy = 0
    for line in text.splitlines():
        name, _, counters = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            fields = [int(v) for v in counters.split()]
            busy += sum(fields[i] for i in BUSY_FIELDS if i < len(fields))
    return busy / ticks_per_s


#: the topology of each CPU (``cpuN/topology/physical_package_id`` and ``core_id``)
TOPOLOGY = Path("/sys/devices/system/cpu")


def process_cpus() -> frozenset[int]:
    """The CPUs any thread of this process may run on: the union of their affinities (a
    thread bound to one CPU, as ``OMP_PROC_BIND`` binds the one that starts torch's
    threads, does not narrow the others'); the calling thread's where the threads cannot be
    listed."""
    cpus: set[int] = set()
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        threads = []
    for thread in threads:
        try:
            cpus |= os.sched_getaffinity(int(thread))
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue
    return frozenset(cpus or os.sched_getaffinity(0))


def cores_of(cpus: Collection[int], root: Path | None = None) -> int:
    """How many physical cores ``cpus`` make up: the CPUs that share a package and core id
    are hyperthreads of one core (a CPU whose topology cannot be read is a core of its
    own). Read once per process and set of CPUs (:func:`_cores_of`)."""
    return _cores_of(frozenset(cpus), root or TOPOLOGY)


@functools.lru_cache(maxsize=64)
def _cores_of(cpus: frozenset[int], root: Path) -> int:
    """:func:`cores_of`, cached: a CPU's core does not move, and its two sysfs files per CPU
    took 0.07 of a reading's 0.11 ms, read around every point."""
    cores = set()
    for cpu in cpus:
        topology = root / f"cpu{cpu}" / "topology"
        try:
            key = tuple(
                (topology / f).read_text().strip() for f in ("physical_package_id", "core_id")
            )
        except OSError:
            key = (f"cpu{cpu}",)
        cores.add(key)
    return len(cores)


def read_cpus(path: Path = STAT) -> CpuReading | None:
    """A reading of the CPUs this process may run on (:func:`process_cpus`); ``None``
    where ``path`` or the affinity cannot be read (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = process_cpus()
    try:
        text = path.read_text()
    except OSError:
        return None
    busy = busy_seconds(text, cpus, clock_ticks_per_s())
    return CpuReading(busy, time.process_time(), time.monotonic(), cpus, cores_of(cpus))


def outside_cores(before: CpuReading, after: CpuReading) -> float:
    """The mean number of CPUs other processes kept busy between two readings: the CPUs'
    busy time less this process's own, over the wall time, within ``[0, cpus]`` (the
    counters tick in hundredths of a second, this process's time does not)."""
    wall = after.wall_s - before.wall_s
    if wall <= 0:
        return 0.0
    taken = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    return min(max(taken / wall, 0.0), float(len(after.cpus)))


def rounding_cores(before: CpuReading, after: CpuReading, ticks_per_s: float) -> float:
    """How many CPUs the counters' rounding alone may add to :func:`outside_cores` between
    two readings: a tick of each CPU read over the wall time, at most the CPUs read (a
    block shorter than a tick tells nothing)."""
    wall, cpus = after.wall_s - before.wall_s, len(after.cpus)
    return min(cpus / (ticks_per_s * wall), cpus) if wall > 0 else float(cpus)


@contextmanager
def outside_load(path: Path = STAT) -> Iterator[dict]:
    """A dict filled, when the block ends, with ``outside_cores`` (:func:`outside_cores`
    over the block, to 0.01), ``cpus_read`` (the CPUs read), ``cores_read`` (the physical
    cores they make up) and ``rounding_cores`` (:func:`rounding_cores`, up to 0.01); left
    empty where the CPUs cannot be read, or their number changed (the affinity moved)
    during the block."""
    load: dict = {}
    before = read_cpus(path)
    yield load
    after = read_cpus(path)
    if before is not None and after is not None and before.cpus == after.cpus:
        rounding = rounding_cores(before, after, clock_ticks_per_s())
        load.update(
            outside_cores=round(outside_cores(before, after), 2),
            cpus_read=len(after.cpus),
            cores_read=after.cores or len(after.cpus),
            rounding_cores=math.ceil(rounding * 100) / 100,  # up: it bounds the reading
        )


def thread_waits(root: Path = TASKS) -> dict[str, tuple[int, int]] | None:
    """The nanoseconds each of this process's threads, those alive, has run on a CPU and
    waited for one while runnable since it started (``(ran, waited)``), by thread id;
    ``None`` where no thread's ``schedstat`` can be read (not Linux), or where the kernel
    keeps no scheduler statistics: it reads ``0 0 0`` for every thread then, no time on a
    CPU either (found by review: read as no wait, such a kernel (before 5.14, built without
    ``CONFIG_SCHEDSTATS``, delay accounting off) would read every block quiet, and fail the
    real-spinner test, which is skipped only on ``None``)."""
    try:
        threads = os.listdir(root)
    except OSError:
        return None
    times = {}
    for thread in threads:
        try:
            fields = (root / thread / "schedstat").read_text().split()
            times[thread] = (int(fields[0]), int(fields[1]))
        except (OSError, IndexError, ValueError):  # a thread that ended meanwhile
            continue
    return times if any(ran for ran, _ in times.values()) else None


def waited_seconds(root: Path = TASKS) -> float | None:
    """How long this process's threads, those alive, have waited for a CPU while runnable
    since they started, in seconds; ``None`` where it cannot be read (:func:`thread_waits`)."""
    times = thread_waits(root)
    return None if times is None else sum(wait for _, wait in times.values()) / 1e9


#: The share of a block a thread must have run on a CPU for its wait to count
#: (:func:`waited_between`): the measurement's threads run most of it, even beside a few
#: spinning processes (half of it beside one per core); a thread that wakes now and then
#: (an event loop, a heartbeat, a monitor) runs a few percent of it, and its wait for the
#: cores the measurement's threads hold is no other process's load.
RAN_SHARE = 0.1


def waited_between(
    before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]], least_ran_s=0.0
) -> float:
    """The seconds the threads of ``after`` waited since ``before`` (:func:`thread_waits`),
    thread by thread, of those that ran ``least_ran_s`` at least meanwhile (found by
    review: in a dask worker timing 2 torch threads on 2 cores, its event loop's thread
    waited 4.1 of a 25 ms block's 6.3 ms for the cores they held, and a quiet block read
    0.26 threads waiting, loaded). A thread that ended between them takes its wait with
    it, without taking it off the others' (found by review: summed over the threads alive
    at each reading, a thread ending during a block took its whole life's wait off the
    block's, and a block of 0.5 threads waiting read 0.00); a thread started meanwhile, or
    a thread id taken again by a new thread (its counts went back), counts all it counts."""
    waited = 0
    for thread, (ran, wait) in after.items():
        ran_before, wait_before = before.get(thread, (0, 0))
        if ran < ran_before or wait < wait_before:
            ran_before = wait_before = 0
        if (ran - ran_before) / 1e9 >= least_ran_s:
            waited += wait - wait_before
    return waited / 1e9


#: The shortest block whose threads' wait for a CPU is read (:func:`run_queue_wait`).
WAIT_BLOCK_S = 0.01

#: this process's control groups (``hierarchy:controllers:path``), and where their files lie
CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def throttled_seconds(cgroup: Path = CGROUP, root: Path = CGROUP_ROOT) -> float | None:
    """How long the CPU quota of this process's control group, or of one above it, has held
    its threads off the CPUs (``cpu.stat``: ``throttled_usec`` under cgroup v2,
    ``throttled_time`` in nanoseconds under v1's ``cpu`` controller), summed over those
    groups; ``None`` where no group's ``cpu.stat`` can be read (:func:`_throttle_counters`).
    A thread held off by the quota counts as waiting in its ``schedstat``, though no other
    process took its CPU."""
    counters = _throttle_counters(cgroup, root)
    throttled = 0.0
    for stat, key, unit in counters:
        try:
            for line in stat.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    throttled += int(value) * unit
        except (OSError, ValueError):
            continue
    return throttled if counters else None


@functools.lru_cache(maxsize=8)
def _throttle_counters(cgroup: Path, root: Path) -> tuple[tuple[Path, str, float], ...]:
    """The ``cpu.stat`` files of this process's control groups (``cgroup``: v2's ``0::path``
    line, v1's line whose controllers hold ``cpu``) and of the groups above them, under
    ``root``, that count throttled time, with its key and unit. Found once per process (it
    took 0.05 of a reading's 0.09 ms, read around every point; a process is seldom moved)."""
    try:
        lines = cgroup.read_text().splitlines()
    except OSError:
        return ()
    counters = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            bases, key, unit = [root], "throttled_usec", 1e-6
        elif "cpu" in controllers.split(","):
            bases, key, unit = [root / controllers, root / "cpu"], "throttled_time", 1e-9
        else:
            continue
        for base in bases:
            found, group = [], base / path.strip("/")
            while True:
                try:
                    text = (group / "cpu.stat").read_text()
                except OSError:
                    text = ""
                if any(line.partition(" ")[0] == key for line in text.splitlines()):
                    found.append((group / "cpu.stat", key, unit))
                if group == base:
                    break
                group = group.parent
            if found:
                counters += found
                break
    return tuple(counters)


@contextmanager
def run_queue_wait(
    root: Path = TASKS, cgroup: Path = CGROUP, cgroup_root: Path = CGROUP_ROOT
) -> Iterator[dict]:
    """A dict filled, when the block ends, with ``waiting_threads``: the mean number of this
    process's threads runnable but kept waiting for a CPU over the block (their waits over
    its wall time, to 0.01, of the threads that ran :data:`RAN_SHARE` of it at least:
    :func:`waited_between`); left empty where it
    cannot be read, or the block lasted under :data:`WAIT_BLOCK_S`. Where the CPU quota of
    the process's control group held its threads off the CPUs during the block
    (:func:`throttled_seconds`), their wait is the quota's, not another process's: the dict
    holds ``throttled_s`` instead (found by review: under a quota of 1.5 CPUs, 2-thread
    GEMM blocks of 100-300 ms read 0.41-0.51 threads waiting, 39 of 40 loaded, /proc/stat
    none)."""
    wait: dict = {}
    throttled_before = throttled_seconds(cgroup, cgroup_root)
    before, start = thread_waits(root), time.monotonic()
    yield wait
    after, wall = thread_waits(root), time.monotonic() - start
    throttled_after = throttled_seconds(cgroup, cgroup_root)
    if before is None or after is None or wall < WAIT_BLOCK_S:
        return
    if throttled_before is not None and throttled_after is not None:
        if throttled_after > throttled_before:
            wait["throttled_s"] = round(throttled_after - throttled_before, 6)
            return
    waited = waited_between(before, after, RAN_SHARE * wall)
    wait["waiting_threads"] = round(waited / wall, 2)


@contextmanager
def point_load(
    stat: Path = STAT, tasks: Path = TASKS, cgroup: Path = CGROUP, cgroup_root: Path = CGROUP_ROOT
) -> Iterator[dict]:
    """A dict filled, when the block ends, with :func:`outside_load`'s reading and
    :func:`run_queue_wait`'s, for :func:`is_loaded`."""
    reading: dict = {}
    with outside_load(stat) as outside, run_queue_wait(tasks, cgroup, cgroup_root) as wait:
        yield reading
    reading.update(outside, **wait)


def clock_ticks_per_s() -> float:
    """The clock ticks a second ``/proc/stat`` counts in."""
    return os.sysconf("SC_CLK_TCK")


#: CPUs other processes may keep busy beyond those a measurement leaves free, for every
#: two cores it uses (this at least), before it reads as loaded: a quarter of a CPU taken
#: from a measurement running a thread on each of 2 cores slows it by 1/8 where it spreads
#: evenly over them, under the sweep's spread limit (20%). On a 2-core CPU, around the
#: quick grid's rate measurements on 2 threads, the reading was 0.00-0.07 quiet and
#: 0.68-0.74 beside a process spinning on one core (the GEMM 136-142 GFLOP/s against 196-225)
OUTSIDE_SLACK = 0.25


class Crowding(NamedTuple):
    """A reading of :func:`outside_load` against the CPUs a measurement left free."""

    #: the CPUs of the physical cores the measurement's threads did not use
    free: float
    #: what other processes may take beyond them (:data:`OUTSIDE_SLACK` per two cores)
    slack: float
    #: the least they took (the reading less its rounding) beyond both: loaded above 0
    excess: float


def crowding(reading: Mapping, threads: int | None) -> Crowding | None:
    """How the ``reading`` of :func:`outside_load` around a measurement on ``threads``
    threads (``None``: on all the CPUs read) stands against the CPUs it left free;
    ``None`` where nothing was read.

    Free: the CPUs of the physical cores its threads did not use, ``cores_read`` of the
    ``cpus_read`` (a hyperthread beside a core a thread runs on is not free; a reading
    without ``cores_read``, one CPU a core). The slack: :data:`OUTSIDE_SLACK` of a CPU for
    every two cores used (an eighth of their speed), a quarter at least. The reading is
    taken less its ``rounding_cores`` (none where not recorded)."""
    if "outside_cores" not in reading:
        return None
    cpus = reading["cpus_read"]
    cores = reading.get("cores_read", cpus)
    used = cores if threads is None else min(threads, cores)
    free = (cores - used) * cpus / cores
    slack = OUTSIDE_SLACK * max(1.0, used / 2)
    least = reading["outside_cores"] - reading.get("rounding_cores", 0.0)
    return Crowding(free, slack, least - free - slack)


def is_loaded(reading: Mapping, threads: int | None) -> bool:
    """Whether other processes kept busy more CPUs than a measurement on ``threads``
    threads left free, by more than the slack, in the ``reading`` around it
    (:func:`crowding`), or, where the reading holds :func:`run_queue_wait`'s
    ``waiting_threads``, whether more of this process's threads than the slack waited for
    a CPU on average (judged only where ``threads`` fit in the ``cores_read``, else they
    wait for each other); not where nothing was read (unknown)."""
    found = crowding(reading, threads)
    if found is not None and found.excess > 0:
        return True
    if "waiting_threads" not in reading or "cores_read" not in reading:
        return False
    cores = reading["cores_read"]
    if threads is not None and threads > cores:
        return False
    used = cores if threads is None else threads
    return reading["waiting_threads"] > OUTSIDE_SLACK * max(1.0, used / 2)
