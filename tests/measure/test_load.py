"""The load of other processes on this process's CPUs, read off ``/proc/stat``."""

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from riemann_core.measure import load

#: /proc/stat at one moment: cpu0 and cpu1 read, cpu2 outside the affinity
STAT = """cpu  9000 90 900 90000 90 0 90 90 0 0
cpu0 1000 10 100 5000 40 0 20 30 500 0
cpu1 2000 20 200 6000 50 0 30 40 0 0
cpu2 4000 40 400 7000 60 0 40 50 0 0
intr 123 0 0
ctxt 456
"""


def test_busy_time_counts_user_nice_system_irq_softirq_and_steal_of_the_cpus_read():
    """Idle and iowait are idle; guest time is counted in user already; a CPU outside the
    affinity, or offline (no line), counts nothing."""
    cpu0 = 1000 + 10 + 100 + 0 + 20 + 30
    cpu1 = 2000 + 20 + 200 + 0 + 30 + 40
    assert load.busy_seconds(STAT, {0, 1}, 100) == (cpu0 + cpu1) / 100
    assert load.busy_seconds(STAT, {0, 7}, 100) == cpu0 / 100
    assert load.busy_seconds(STAT, set(), 100) == 0


def test_the_outside_load_is_the_cpus_busy_time_less_this_process_s_over_the_wall_time():
    before = load.CpuReading(busy_s=100.0, own_s=5.0, wall_s=10.0, cpus=frozenset({0, 1}))
    after = load.CpuReading(busy_s=103.0, own_s=6.0, wall_s=12.0, cpus=frozenset({0, 1}))
    assert load.outside_cores(before, after) == pytest.approx(1.0)  # (3 - 1) s over 2 s
    own_more = load.CpuReading(busy_s=103.0, own_s=8.5, wall_s=12.0, cpus=frozenset({0, 1}))
    assert load.outside_cores(before, own_more) == 0  # the ticks' rounding: not negative
    lots = load.CpuReading(busy_s=110.0, own_s=5.0, wall_s=12.0, cpus=frozenset({0, 1}))
    assert load.outside_cores(before, lots) == 2  # at most the CPUs read


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux: the affinity")
def test_the_reading_takes_its_file_and_is_empty_where_it_cannot_read_it(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(load, "TOPOLOGY", tmp_path / "no-topology")  # a core per CPU
    reading = load.read_cpus(stat)
    assert reading.cpus == {0, 1}
    assert reading.busy_s == load.busy_seconds(STAT, {0, 1}, os.sysconf("SC_CLK_TCK"))
    with load.outside_load(stat) as measured:
        pass
    # did not move; a block this short tells nothing: the counters' rounding is every CPU
    expected = {"outside_cores": 0.0, "cpus_read": 2, "cores_read": 2, "rounding_cores": 2.0}
    assert measured == expected
    with load.outside_load(tmp_path / "missing") as measured:
        pass
    assert measured == {}  # unknown, not zero


@pytest.mark.skipif(not load.STAT.is_file(), reason="Linux: /proc/stat")
def test_a_process_spinning_beside_an_idle_one_reads_as_a_busy_cpu():
    """A real reading: a child process spinning for a second while this one waits keeps
    one CPU busy (more where the machine is loaded already; never less, whatever else
    runs: a spinner that does not get a CPU waits behind load that counts too)."""
    spin = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1: pass"
    with load.outside_load() as measured:
        subprocess.run([sys.executable, "-c", spin], check=True)
    assert 0.7 <= measured["outside_cores"] <= measured["cpus_read"]


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="Linux, two CPUs at least: a thread bound to one of them",
)
def test_the_cpus_read_are_those_of_every_thread_not_the_one_that_reads():
    """Found by review: under OMP_PROC_BIND the thread that measures the rates is bound to
    one CPU while torch's other threads run on the others; a reading of its CPU alone,
    less the CPU time of all of them, read 0.00 where the process's two CPUs read
    0.65-0.98 (0.29-0.32 against 0.90-1.35 beside a spinning process). A thread bound to
    one CPU reads the CPUs of the whole process."""
    everywhere = frozenset(os.sched_getaffinity(0))
    seen = {}

    def bound():
        os.sched_setaffinity(0, {min(everywhere)})  # this thread alone (Linux)
        seen["own"] = os.sched_getaffinity(0)
        seen["reading"] = load.read_cpus()

    thread = threading.Thread(target=bound)
    thread.start()
    thread.join()
    assert seen["own"] == {min(everywhere)}
    assert seen["reading"].cpus == everywhere


def test_the_cpus_read_make_up_as_many_cores_as_their_distinct_core_ids(tmp_path):
    """Hyperthreads (one package and core id) are one core; a CPU without a topology is
    one of its own."""
    for cpu, core in ((0, 0), (1, 1), (2, 0), (3, 1)):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert load.cores_of({0, 1, 2, 3}, tmp_path) == 2
    assert load.cores_of({0, 2}, tmp_path) == 1
    assert load.cores_of({0, 1, 2, 3, 9}, tmp_path) == 3


def test_the_counters_rounding_is_a_tick_of_each_cpu_over_the_wall_time():
    """Found measuring per point: /proc/stat counts whole ticks, and blocks of 2-10 ms
    read 0.00-2.00 of 2 CPUs where 1 s blocks read 1.00-1.02 beside the same load."""
    before = load.CpuReading(busy_s=0.0, own_s=0.0, wall_s=10.0, cpus=frozenset({0, 1}))
    after = load.CpuReading(busy_s=0.0, own_s=0.0, wall_s=10.5, cpus=frozenset({0, 1}))
    assert load.rounding_cores(before, after, 100) == pytest.approx(0.04)  # 2 ticks in 0.5 s
    short = load.CpuReading(busy_s=0.0, own_s=0.0, wall_s=10.001, cpus=frozenset({0, 1}))
    assert load.rounding_cores(before, short, 100) == 2  # at most the CPUs read
    assert load.rounding_cores(before, before, 100) == 2  # no time: nothing known


def _reading(outside, cpus=2, cores=2, rounding=0.0):
    return {
        "outside_cores": outside,
        "cpus_read": cpus,
        "cores_read": cores,
        "rounding_cores": rounding,
    }


def test_a_reading_is_loaded_past_the_cpus_left_free_and_the_slack_less_its_rounding():
    """The one rule of the sweep's session check and of its points: the CPUs of the cores
    the threads leave unused are free, the slack a quarter CPU per two cores used (a
    quarter at least), and the reading is taken less what the counters' rounding may add."""
    assert load.is_loaded(_reading(0.3), threads=2)
    assert not load.is_loaded(_reading(0.2), threads=2)
    assert not load.is_loaded(_reading(1.0), threads=1)  # one core left free: 1 + 0.25
    assert load.is_loaded(_reading(1.3), threads=1)
    assert not load.is_loaded(_reading(1.0, cpus=4, cores=4), threads=2)  # two left free
    assert load.is_loaded(_reading(1.0, cpus=4, cores=2), threads=2)  # hyperthreads: none
    assert load.is_loaded(_reading(0.3), threads=None)  # not known: on all
    assert not load.is_loaded(_reading(0.3, rounding=0.1), threads=2)  # 0.2 at least
    assert load.is_loaded(_reading(0.5, rounding=0.1), threads=2)
    assert not load.is_loaded({}, threads=2)  # not read: unknown
    legacy = {"outside_cores": 0.3, "cpus_read": 2}  # before cores and rounding: one a core
    assert load.is_loaded(legacy, threads=2)
    assert load.crowding(_reading(1.5, cpus=64, cores=64), threads=64) == load.Crowding(
        free=0.0, slack=8.0, excess=-6.5
    )


def test_the_cores_of_a_set_of_cpus_are_read_once_per_process(tmp_path):
    """Their sysfs files, two per CPU, took 0.07 of a reading's 0.11 ms, and the sweep
    reads around every point."""
    for cpu in (0, 1):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text("0\n")
    assert load.cores_of({0, 1}, tmp_path) == 1
    for cpu in (0, 1):
        (tmp_path / f"cpu{cpu}" / "topology" / "core_id").write_text(f"{cpu}\n")
    assert load.cores_of({0, 1}, tmp_path) == 1  # as read first
    assert load.cores_of({0}, tmp_path) == 1 and load.cores_of({0, 1, 2}, tmp_path) == 3


#: no control group to read: the fake blocks' readings are not the machine's quota's
NO_CGROUP = Path("/nonexistent/cgroup")


def _tasks(root, waits_ns, ran_ns=None):
    """A ``/proc/self/task`` of threads whose ``schedstat`` read ``waits_ns`` waiting, each
    having run ``ran_ns`` (by thread; the clock's nanoseconds where not given: running
    all along)."""
    for thread, wait in waits_ns.items():
        ran = (ran_ns or {}).get(thread, time.monotonic_ns())
        (root / str(thread)).mkdir(exist_ok=True)
        (root / str(thread) / "schedstat").write_text(f"{ran} {wait} 7\n")


def test_the_threads_wait_is_the_sum_of_their_schedstat_run_queue_waits(tmp_path):
    _tasks(tmp_path, {11: 2_000_000, 12: 500_000})
    (tmp_path / "13").mkdir()  # a thread that ended between the listing and the read
    assert load.waited_seconds(tmp_path) == pytest.approx(0.0025)
    assert load.waited_seconds(tmp_path / "missing") is None  # unknown, not zero
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load.waited_seconds(empty) is None


def test_the_waiting_threads_are_their_wait_over_the_block_s_wall_time(tmp_path):
    """Read only over a block of :data:`WAIT_BLOCK_S` at least: a slice of the scheduler
    more or less decides a shorter one."""
    _tasks(tmp_path, {11: 0, 12: 0})
    with load.run_queue_wait(tmp_path, NO_CGROUP) as wait:
        time.sleep(0.05)
        _tasks(tmp_path, {11: 20_000_000, 12: 5_000_000})  # 25 ms waited in ~50 ms
    assert 0.3 <= wait["waiting_threads"] <= 0.5
    with load.run_queue_wait(tmp_path, NO_CGROUP) as wait:
        time.sleep(0.02)
        _tasks(tmp_path, {11: 0})  # thread 12 ended, and its wait with it
    assert wait["waiting_threads"] == 0
    with load.run_queue_wait(tmp_path, NO_CGROUP) as wait:
        _tasks(tmp_path, {11: 20_000_000})
    assert wait == {}  # too short to tell
    with load.run_queue_wait(tmp_path / "missing", NO_CGROUP) as wait:
        time.sleep(0.02)
    assert wait == {}


def test_a_kernel_without_scheduler_statistics_reads_unknown_not_quiet(tmp_path):
    """Such a kernel reads ``0 0 0`` for every thread: no time on a CPU either."""
    for thread in (11, 12):
        (tmp_path / str(thread)).mkdir()
        (tmp_path / str(thread) / "schedstat").write_text("0 0 0\n")
    assert load.waited_seconds(tmp_path) is None
    with load.run_queue_wait(tmp_path, NO_CGROUP) as wait:
        time.sleep(0.02)
    assert wait == {}


def test_a_thread_ending_during_a_block_takes_only_its_own_wait_with_it(tmp_path):
    """Thread 12 waited 5 s before the block and ended in it; thread 11 waited half of the
    block: 0.5 threads waiting, not 0."""
    _tasks(tmp_path, {11: 0, 12: 5_000_000_000})
    with load.run_queue_wait(tmp_path, NO_CGROUP) as wait:
        time.sleep(0.05)
        shutil.rmtree(tmp_path / "12")
        _tasks(tmp_path, {11: 25_000_000, 13: 5_000_000})  # 13 started in the block
    assert 0.45 <= wait["waiting_threads"] <= 0.6
    assert load.is_loaded({**_reading(0.0, rounding=2.0), **wait}, threads=2)


def test_the_wait_of_a_thread_that_barely_ran_in_the_block_is_not_read(tmp_path):
    """An event loop's thread, waking for a heartbeat while the measurement's threads hold
    the cores, waits for them without slowing them: only the threads that ran
    :data:`RAN_SHARE` of the block at least count."""
    _tasks(tmp_path, {11: 0, 12: 0, 13: 0}, {13: 1_000_000})
    with load.run_queue_wait(tmp_path, NO_CGROUP) as wait:
        time.sleep(0.05)
        # 13 (the event loop) ran 0.2 ms of ~50 and waited 12 ms; 11 and 12 ran throughout
        _tasks(tmp_path, {11: 500_000, 12: 500_000, 13: 12_000_000}, {13: 1_200_000})
    assert wait["waiting_threads"] <= 0.03
    assert not load.is_loaded({**_reading(0.0, rounding=2.0), **wait}, threads=2)
    assert load.waited_between(
        {"11": (0, 0), "13": (0, 0)}, {"11": (30_000_000, 1), "13": (200_000, 10**7)}, 0.005
    ) == pytest.approx(1e-9)


def _cgroup(tmp_path, line, stats):
    """A ``/proc/self/cgroup`` of one ``line`` and a cgroup tree whose ``cpu.stat`` files
    (``stats``: path under the tree -> text) read as given."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cgroup").write_text(line + "\n")
    for path, text in stats.items():
        (tmp_path / "fs" / path).mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / path / "cpu.stat").write_text(text)
    return tmp_path / "cgroup", tmp_path / "fs"


def test_the_throttled_time_of_the_group_and_those_above_it_is_read(tmp_path):
    v2 = _cgroup(
        tmp_path / "v2",
        "0::/pod/box",
        {
            "pod/box": "usage_usec 9\nnr_throttled 2\nthrottled_usec 300000\n",
            "pod": "throttled_usec 200000\n",
            "other": "throttled_usec 999000000\n",  # not this process's
        },
    )
    assert load.throttled_seconds(*v2) == pytest.approx(0.5)
    v1 = _cgroup(
        tmp_path / "v1",
        "4:cpu,cpuacct:/box",
        {"cpu,cpuacct/box": "throttled_time 250000000\n", "cpu,cpuacct": "throttled_time 0\n"},
    )
    assert load.throttled_seconds(*v1) == pytest.approx(0.25)
    none = _cgroup(tmp_path / "none", "3:memory:/box", {"memory/box": "throttled_time 5\n"})
    assert load.throttled_seconds(*none) is None
    assert load.throttled_seconds(tmp_path / "missing", tmp_path) is None


def test_a_wait_the_cpu_quota_made_is_not_read_as_another_process_s_load(tmp_path):
    """Threads held off the CPUs by their group's quota count as waiting in ``schedstat``
    (found by review: 2-thread GEMM blocks under a quota of 1.5 CPUs read 0.41-0.51
    threads waiting, loaded); a block the quota did not throttle is read as before."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _tasks(tasks, {11: 0, 12: 0})
    group = tmp_path / "fs" / "box"
    cgroup, root = _cgroup(tmp_path, "0::/box", {"box": "throttled_usec 0\n"})
    with load.point_load(tmp_path / "no-stat", tasks, cgroup, root) as reading:
        time.sleep(0.05)
        _tasks(tasks, {11: 20_000_000, 12: 20_000_000})
        (group / "cpu.stat").write_text("throttled_usec 20000\n")
    assert "waiting_threads" not in reading and reading["throttled_s"] == 0.02
    assert not load.is_loaded({**_reading(0.0, rounding=2.0), **reading}, threads=2)
    with load.point_load(tmp_path / "no-stat", tasks, cgroup, root) as reading:
        time.sleep(0.05)
        _tasks(tasks, {11: 40_000_000, 12: 40_000_000})
    assert 0.6 <= reading["waiting_threads"] <= 0.9 and "throttled_s" not in reading


def test_threads_kept_waiting_past_the_slack_read_loaded_where_they_fit_in_the_cores():
    """Short blocks, whose /proc/stat reading is all rounding, are read by the wait."""
    short = _reading(0.0, rounding=2.0)
    assert load.is_loaded({**short, "waiting_threads": 0.5}, threads=2)
    assert not load.is_loaded({**short, "waiting_threads": 0.2}, threads=2)
    assert load.is_loaded({**short, "waiting_threads": 0.5}, threads=None)
    # more threads than cores wait for each other: not judged
    assert not load.is_loaded({**short, "waiting_threads": 0.9}, threads=4)
    slack = 0.25 * 4  # a quarter CPU for every two of 8 cores used
    assert not load.is_loaded({**_reading(0.0, 8, 8, 8.0), "waiting_threads": slack}, 8)
    assert load.is_loaded({**_reading(0.0, 8, 8, 8.0), "waiting_threads": slack + 0.1}, 8)
    assert not load.is_loaded({"waiting_threads": 0.9}, threads=2)  # no cores read


@pytest.mark.skipif(
    load.waited_seconds() is None or not hasattr(os, "sched_setaffinity"),
    reason="Linux with scheduler statistics: a thread bound beside a process",
)
def test_a_thread_sharing_its_cpu_with_a_spinning_process_reads_as_waiting():
    """A real reading: a thread of this process spinning on the CPU a child process spins
    on gets about half of it (more where the machine is loaded already)."""
    cpu = min(os.sched_getaffinity(0))
    spin = (
        f"import os, time\nos.sched_setaffinity(0, {{{cpu}}})\nt = time.monotonic()\n"
        "while time.monotonic() - t < 2: pass"
    )
    child = subprocess.Popen([sys.executable, "-c", spin])
    found = {}

    def bound():
        os.sched_setaffinity(0, {cpu})  # this thread alone (Linux)
        time.sleep(0.3)  # the child started spinning
        with load.point_load() as reading:
            start = time.monotonic()
            while time.monotonic() - start < 0.5:
                pass
        found.update(reading)

    thread = threading.Thread(target=bound)
    thread.start()
    thread.join()
    child.wait()
    assert found["waiting_threads"] >= 0.3
    assert load.is_loaded(found, threads=1)
