"""Sweep points on dask.distributed: exclusive devices, nothing lost or measured twice, clear
errors instead of hangs. CPU only, loopback only; the workers' "devices" are resources."""

import contextlib
import functools
import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import dask
import pytest
from distributed import Client, LocalCluster
from synthetic import known_time_row, recorded_bars

from riemann_core.measure import allocator
from riemann_core.measure.timing import RATE_KINDS
from riemann_core.scaling import dispatch, worker
from riemann_core.scaling import sweep as sw

TINY = dict(
    base={"width": 4, "depth": 1, "out_dim": 3, "batch": 4},
    axes={"width": (4, 6), "depth": (1, 2), "out_dim": (3,), "batch": (2, 4)},
    repeats=1,
    methods=("euclidean", "natural"),
)
#: columns that differ between two measurements of the same point
#: (flag and remeasured too: a point read loaded by other processes is timed again, and
#: flagged where it reads loaded again)
TIMING = ("time_median_s", "time_iqr_s", "times_s", "peak_bytes", "flag", "remeasured")


def logged(log, run, grid):
    """``measure_point`` that appends when and where it ran to the file ``log``."""
    start = time.time()
    row = sw.measure_point(run, grid)
    with open(log, "a") as f:
        f.write(json.dumps({"key": sw.key_of(run), "pid": os.getpid(), "start": start}) + "\n")
        f.write(json.dumps({"key": sw.key_of(run), "pid": os.getpid(), "end": time.time()}) + "\n")
    return row


def killer(log, victim, run, grid):
    """A row as if measured, at once (:func:`synthetic.known_time_row`); on the point
    ``victim``, kills its own process a second into the point (mid-point: the client has
    long fetched the worker's previous result, which would otherwise die with the worker
    and be measured again)."""
    with open(log, "a") as f:
        f.write(json.dumps({"key": sw.key_of(run), "pid": os.getpid()}) + "\n")
    if list(sw.key_of(run)) == victim:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    return known_time_row(run)


def entries(log):
    with open(log) as f:
        return [json.loads(line) for line in f]


def comparable(rows):
    """The rows without their times and sweep ids (each sweep has its own)."""
    return {sw.key_of(r): {k: v for k, v in r.items() if k not in (*TIMING, "sweep")} for r in rows}


# -- the local cluster's workers -------------------------------------------------------------


def test_a_cpu_host_gets_one_unpinned_worker_with_this_process_threads(monkeypatch):
    monkeypatch.setattr("torch.get_num_threads", lambda: 6)
    assert dispatch.local_workers("cpu") == [dispatch.WorkerSpec(threads=6)]


def test_cpu_workers_get_cores_of_their_own(monkeypatch):
    # four cores of two hyperthreads each: a worker takes whole cores, never a sibling
    monkeypatch.setattr(dispatch, "physical_cores", lambda: [(0, 4), (1, 5), (2, 6), (3, 7)])
    two = dispatch.local_workers("cpu", workers=2)
    assert [w.cores for w in two] == [(0, 4, 1, 5), (2, 6, 3, 7)]
    assert [w.threads for w in two] == [2, 2]
    one = dispatch.local_workers("cpu", workers=3, threads=1)
    assert [w.cores for w in one] == [(0, 4), (1, 5), (2, 6)]
    with pytest.raises(dispatch.ClusterError, match="2 thread.*need 6 cores"):
        dispatch.local_workers("cpu", workers=3, threads=2)
    # (found by a hunt: a list of 10**20 workers was made first, an OverflowError)
    with pytest.raises(dispatch.ClusterError, match=f"{10**20} worker.*this host has 4"):
        dispatch.local_workers("cpu", workers=10**20)


def test_one_worker_per_gpu_pinned_through_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 3)
    monkeypatch.setattr(dispatch, "physical_cores", lambda: [(c,) for c in range(6)])
    assert [w.gpu for w in dispatch.local_workers("cuda")] == [0, 1, 2]
    assert [w.threads for w in dispatch.local_workers("cuda")] == [2, 2, 2]
    assert [w.gpu for w in dispatch.local_workers("cuda:2")] == [2]
    assert [w.gpu for w in dispatch.local_workers("cuda", workers=2)] == [0, 1]
    with pytest.raises(dispatch.ClusterError, match="two workers on one GPU"):
        dispatch.local_workers("cuda", workers=4)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(dispatch.ClusterError, match="needs a GPU"):
        dispatch.local_workers("cuda")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_the_local_cluster_pins_its_workers_and_leaves_retries_to_the_runner():
    specs = dispatch.local_workers("cpu", workers=2)
    task = functools.partial(worker.measure_here, _threads_and_cores, grid=None, session="s")
    with dispatch.start_cluster(specs) as cluster, Client(cluster, set_as_default=False) as client:
        assert client.run_on_scheduler(dispatch._allowed_failures) == 0
        rows = client.gather(
            [
                client.submit(
                    task, {"device": "cpu"}, placed=True, resources={"device": 1}, pure=False
                )
                for _ in range(4)
            ]
        )
    seen = {(row["threads"], row["cores"]) for row, _ in rows}
    assert seen == {(spec.threads, spec.cores) for spec in specs}


def _threads_and_cores(run, grid):
    import torch

    cores = tuple(sorted(os.sched_getaffinity(0)))
    return {"status": "ok", "threads": torch.get_num_threads(), "cores": cores}


# -- checks before any point is submitted ----------------------------------------------------


@pytest.fixture
def in_process():
    """An in-process cluster of workers declaring ``devices`` device resources each."""
    clusters = []

    def start(workers=1, devices=1):
        resources = {dispatch.RESOURCE: devices} if devices else None
        cluster = LocalCluster(
            n_workers=workers,
            processes=False,
            threads_per_worker=2,
            resources=resources,
            dashboard_address=":0",  # a free port: 8787 may be taken
            silence_logs=logging.ERROR,
        )
        clusters.append(cluster)
        return Client(cluster, set_as_default=False)

    yield start
    for cluster in clusters:
        cluster.close()


def test_no_worker_offering_the_resource_is_a_clear_error_not_a_hang(in_process):
    client = in_process(devices=0)
    start = time.monotonic()
    with pytest.raises(dispatch.ClusterError, match="offers the 'device' resource"):
        dispatch.check_workers(client, "cpu", timeout=0.5)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    "workers,devices,device,match",
    [
        (1, 2, "cpu", "declares 2 devices on a CPU host"),
        (2, 1, "cpu", "on the same cores"),
        (1, 1, "cuda", "sees 0 GPU"),
    ],
    ids=["two-cpu-devices", "shared-cores", "cuda-without-gpu"],
)
def test_workers_that_would_corrupt_timings_are_refused(
    in_process, workers, devices, device, match
):
    if device == "cuda" and dispatch.torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    with pytest.raises(dispatch.ClusterError, match=match):
        dispatch.check_workers(in_process(workers, devices), device, timeout=5)


def test_a_worker_running_other_code_is_refused_before_any_point(in_process, monkeypatch):
    """Found by a hunt: a worker with another version of riemann_core was accepted; its
    rows, counted by another cost model, made fit refuse the whole sweep afterwards (and
    another version of the timed code alone would have gone unseen)."""
    facts = dispatch._worker_facts

    def elsewhere():
        return {**facts(), "code": "0123456789ab", "package": "/elsewhere/riemann_core"}

    monkeypatch.setattr(dispatch, "_worker_facts", elsewhere)
    with pytest.raises(dispatch.ClusterError, match="runs other riemann_core code") as err:
        dispatch.check_workers(in_process(), "cpu", timeout=5)
    assert "/elsewhere/riemann_core, sources 0123456789ab" in str(err.value)
    assert dispatch.code_fingerprint() in str(err.value)


def test_a_lone_cpu_worker_passes_the_checks_with_a_warning_about_dask_defaults(in_process):
    with pytest.warns(UserWarning, match="run dask's profiler"):  # dask's default
        facts = dispatch.check_workers(in_process(), "cpu", timeout=5)
    assert len(facts) == 1
    assert next(iter(facts.values()))["cores"] == sorted(os.sched_getaffinity(0))


def test_a_scheduler_file_connects_and_a_scheduler_retrying_too_often_is_named(
    in_process, tmp_path
):
    client = in_process()
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps({"address": client.scheduler.address}))
    options = dispatch.ClusterOptions(scheduler=str(path))
    with pytest.warns(UserWarning, match="retries a point that kills its worker 3 time"):
        with dispatch.cluster(options, "cpu") as connected:
            assert connected.scheduler.address == client.scheduler.address


def test_an_unreachable_scheduler_is_a_clear_error_at_once():
    """Found by a hunt: a port where nothing listens took dask's 30 s of retries."""
    start = time.monotonic()
    with pytest.raises(dispatch.ClusterError, match="cannot reach a dask scheduler.*refused"):
        dispatch.connect("tcp://127.0.0.1:9", timeout=30)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("address", ["ucx://127.0.0.1:9", "inproc://127.0.0.1/1/2"])
def test_a_protocol_that_cannot_connect_is_not_read_as_another_service(address):
    """Found by review: ucx (not installed) and a foreign inproc address failed to connect,
    and the error said something other than a scheduler answered, a dashboard's port."""
    with pytest.raises(dispatch.ClusterError, match="cannot reach a dask scheduler") as refused:
        dispatch.connect(address, timeout=2)
    assert "dashboard" not in str(refused.value)


@pytest.mark.parametrize("service", ["http", "worker"])
def test_a_service_other_than_a_scheduler_is_named_not_waited_on(in_process, monkeypatch, service):
    """Found by a hunt: `--scheduler` naming an HTTP server's port (the dashboard's, 8787)
    left riemann-bench waiting until killed (13 minutes); a worker's address took 60 s."""
    monkeypatch.setattr(dispatch, "ANSWER_S", 1.0, raising=False)
    if service == "http":
        server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        address = f"tcp://127.0.0.1:{server.server_address[1]}"
    else:
        address = next(iter(in_process().scheduler_info()["workers"]))
    outcome = []

    def connect():
        try:
            outcome.append(dispatch.connect(address, timeout=30))
        except Exception as err:  # noqa: BLE001  (the outcome is checked below)
            outcome.append(err)

    thread = threading.Thread(target=connect, daemon=True)  # (without the check: forever)
    thread.start()
    thread.join(timeout=20)
    assert outcome, f"connect({address!r}) still waiting after 20 s"
    assert isinstance(outcome[0], dispatch.ClusterError)
    assert "is not a dask scheduler" in str(outcome[0])


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "is neither a scheduler file nor an address"),
        ("{not json", "is not a dask scheduler file"),
        ('{"id": "x"}', "is not a dask scheduler file"),
    ],
    ids=["missing-file", "garbage", "no-address"],
)
def test_a_bad_scheduler_file_is_named_at_once(tmp_path, content, match):
    """No dask traceback and no minute-long wait for a file that is not one."""
    path = tmp_path / "scheduler.json"
    if content is not None:
        path.write_text(content)
    start = time.monotonic()
    with pytest.raises(dispatch.ClusterError, match=match):
        dispatch.connect(str(path), timeout=30)
    assert time.monotonic() - start < 5


def test_an_address_without_a_port_is_named_before_a_client_starts(monkeypatch):
    """Found by review: the Client refused it, then its close waited 60 s at exit."""
    monkeypatch.setattr(dispatch, "Client", None)  # not called
    with pytest.raises(dispatch.ClusterError, match="is not a scheduler's address.*port"):
        dispatch.connect("tcp://127.0.0.1", timeout=30)


def test_a_runner_without_workers_gives_up_instead_of_waiting_forever(in_process, monkeypatch):
    monkeypatch.setattr(dispatch, "CHECK_EVERY", 0.1)
    runner = dispatch.DaskRunner(in_process(devices=0), patience=0.5)
    with pytest.raises(dispatch.ClusterError, match="2 point.*not measured"):
        list(runner(_identity, [{"a": 1}, {"a": 2}]))


def test_a_task_that_raises_comes_back_as_a_lost_point(in_process):
    runner = dispatch.DaskRunner(in_process())
    outcomes = dict(
        (run["a"], result) for run, result in runner(_fails_on_two, [{"a": 1}, {"a": 2}])
    )
    assert outcomes[1] == 1
    assert isinstance(outcomes[2], sw.PointLost)
    assert "RuntimeError on the worker: planted" in outcomes[2].reason


@pytest.mark.parametrize("joins", ["between-rounds", "mid-round"])
def test_a_worker_that_joins_after_the_checks_is_checked_before_its_points_count(
    in_process, monkeypatch, joins
):
    """Found by a hunt: a worker running other riemann_core code that joined a cluster after
    check_workers (a batch job starting late) measured 10 of a sweep's 38 points,
    unrefused. Mid-round it is caught by the first result it returns (the periodic check
    of the workers put off)."""
    client = in_process()
    with pytest.warns(UserWarning, match="run dask's profiler"):  # dask's default
        facts = dispatch.check_workers(client, "cpu", timeout=5)
    monkeypatch.setattr(dispatch, "CHECK_EVERY", 600.0)
    runner = dispatch.DaskRunner(client, device="cpu", checked=facts)
    points = runner(_identity, [{"a": a} for a in range(4)])
    if joins == "mid-round":
        assert next(points) == ({"a": 0}, 0)
    # the first worker leaves, and one with other code, on cores of its own, takes its place
    elsewhere = {"code": "0123456789ab", "package": "/elsewhere/riemann_core", "cores": []}
    monkeypatch.setattr(dispatch, "_worker_facts", lambda: {**facts[first], **elsewhere})
    first = next(iter(facts))
    client.cluster.scale(2)
    client.wait_for_workers(2)
    client.retire_workers([first])
    # (the point sent before may have run on the first worker: the next ones run on the new)
    with pytest.raises(dispatch.ClusterError, match="runs other riemann_core code"):
        list(points)


def test_a_worker_gone_before_its_check_is_left_out_not_a_stopped_sweep(in_process):
    """Found by review: a worker that left between the scheduler's list of workers and its
    check (killed, its host gone) failed the check unreachable, and the sweep stopped,
    telling to install riemann-bench. It is left out (its results are measured again)."""
    client = in_process()
    with pytest.warns(UserWarning, match="run dask's profiler"):  # dask's default
        facts = dispatch.check_workers(client, "cpu", timeout=5)
    runner = dispatch.DaskRunner(client, device="cpu", checked=facts)
    gone = "tcp://127.0.0.1:9"  # listed as offering, unreachable at its check
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):  # (else 30 s)
        runner._admit({**dispatch._offering(client), gone: 1})
    assert sorted(runner.checked) == sorted(facts)


def test_a_lost_scheduler_is_a_clear_error_not_a_point_recorded_lost(in_process):
    """Found by a hunt: a killed scheduler left the running point recorded ``error``
    ("cancelled by the dask scheduler before it ran"), and 31 s later the sweep broke off
    with ``KeyError: 'workers'`` and a traceback (exit code 3). The client's connection is
    cut here (dask cancels every future it held, then reconnects), and then closed."""
    client = in_process()
    runner = dispatch.DaskRunner(client)
    points = runner(_sleeps, [{"a": 0}, {"a": 1.5}, {"a": 0}])
    assert next(points) == ({"a": 0}, 0)  # the next point is running
    client.loop.add_callback(lambda: client.scheduler_comm.comm.abort())
    start = time.monotonic()
    with pytest.raises(
        dispatch.ClusterError,
        match="lost the connection to the dask scheduler.*finished points are kept",
    ):
        next(points)
    assert time.monotonic() - start < 10
    client.close()
    with pytest.raises(dispatch.ClusterError, match="lost the connection to the dask scheduler"):
        dispatch._offering(client)


def test_a_scheduler_lost_while_a_result_is_fetched_is_the_same_clear_error(
    in_process, monkeypatch
):
    """Found by review: a scheduler killed after a point finished and before the client,
    not told yet, fetched its result failed that fetch (one kill -9 in five): the sweep
    ended with "error: in <TCP (closed) ConnectionPool.gather ...>: Stream is closed"."""
    from distributed.comm import CommClosedError

    client = in_process()
    runner = dispatch.DaskRunner(client)
    points = runner(_sleeps, [{"a": 0}, {"a": 0}])
    assert next(points) == ({"a": 0}, 0)

    async def gather_fails(*args, **kwargs):
        raise CommClosedError("in <TCP (closed) ConnectionPool.gather>: Stream is closed")

    monkeypatch.setattr(client, "_gather_remote", gather_fails)
    with pytest.raises(
        dispatch.ClusterError,
        match="lost the connection to the dask scheduler.*finished points are kept",
    ):
        next(points)
    runner = dispatch.DaskRunner(client)
    with pytest.raises(dispatch.ClusterError, match="lost the connection to the dask scheduler"):
        runner.everywhere(lambda device: [device], ["cpu"], "lost")


def test_a_lost_scheduler_leaves_no_traceback_of_dask_reconnecting(caplog):
    """Found by review: after the clear error, closing the client logged dask's traceback
    of its reconnection, cancelled by the close (30 lines above the error)."""
    scheduler = LocalCluster(
        n_workers=0, processes=False, dashboard_address=":0", silence_logs=logging.ERROR
    )
    options = dispatch.ClusterOptions(scheduler=scheduler.scheduler_address)
    with pytest.raises(dispatch.ClusterError, match="lost the connection"):
        with dispatch.cluster(options, "cpu") as client:
            scheduler.close()
            deadline = time.monotonic() + 10
            while client.status == "running" and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # reconnecting
            dispatch.check_connected(client)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[0].getMessage()


def _sleeps(run):
    time.sleep(run["a"])
    return run["a"]


def _identity(run):
    return run["a"]


def _fails_on_two(run):
    if run["a"] == 2:
        raise RuntimeError("planted")
    return run["a"]


# -- two worker processes, one fake device each ---------------------------------------------


@contextlib.contextmanager
def devices_here():
    """Two worker processes with two threads and one device each: only the resource keeps
    two points from running at once on one worker. Under the configuration of
    riemann-bench's own clusters: dask's default one makes the nannies set
    MALLOC_TRIM_THRESHOLD_ in this process, which every later test's workers inherit."""
    # without the policy's variables here (riemann-bench's main puts them into this
    # process's environment, which the workers would inherit): they come from QUIET
    saved = {name: os.environ.pop(name) for name in allocator.KEEP if name in os.environ}
    try:
        with fake_devices(workers=2, threads=2) as client:
            client.wait_for_workers(2, timeout=WORKERS_S)
            yield client
    finally:
        for name in allocator.KEEP:
            os.environ.pop(name, None)
        os.environ.update(saved)


#: How long a test waits for both workers (found by CI under load: a worker killed by an
#: earlier test on the shared cluster never came back, and an unbounded wait hung the run
#: for its whole limit; the tests that kill a worker now have a cluster of their own).
WORKERS_S = 180


@pytest.fixture(scope="module")
def two_devices():
    """The module's cluster (:func:`devices_here`); no test kills its workers."""
    with devices_here() as client:
        yield client


@pytest.fixture
def own_two_devices():
    """A cluster for one test (:func:`devices_here`), whose points kill workers."""
    with devices_here() as client:
        yield client


@contextlib.contextmanager
def fake_devices(workers, threads):
    """A client of ``workers`` local worker processes with one ``device`` resource each,
    under riemann-bench's dask configuration; the scheduler retries nothing, as its own."""
    with (
        dask.config.set(dispatch.QUIET),
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=True,
            resources={dispatch.RESOURCE: 1},
            scheduler_kwargs={"allowed_failures": 0},
            host="127.0.0.1",
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        yield client


def test_workers_under_riemann_bench_configuration_keep_freed_memory(two_devices):
    """The workers start with glibc told to keep what it frees (measure.allocator), and
    the check of a running cluster finds nothing that slows their points."""
    assert set(two_devices.run(allocator.policy).values()) == {"keep freed"}
    assert not any(fact["noisy"] for fact in two_devices.run(dispatch._worker_facts).values())


def test_every_point_runs_once_one_at_a_time_per_worker_as_in_process(two_devices, tmp_path):
    log = tmp_path / "log.jsonl"
    grid = sw.Grid(**TINY)
    runner = dispatch.DaskRunner(two_devices)
    measure = functools.partial(logged, str(log))
    result = sw.sweep(grid, tmp_path / "dask", runner=runner, measure=measure, progress=False)
    assert result.statuses == {"ok": len(list(grid.runs()))}
    starts = [e for e in entries(log) if "start" in e]
    assert sorted(tuple(e["key"]) for e in starts) == sorted(sw.key_of(r) for r in grid.runs())
    intervals = {}
    for e in entries(log):
        intervals.setdefault((e["pid"], tuple(e["key"])), {}).update(e)
    by_worker = {}
    for (pid, _), span in intervals.items():
        by_worker.setdefault(pid, []).append((span["start"], span["end"]))
    assert len(by_worker) == 2  # both devices measured
    for spans in by_worker.values():
        spans.sort()
        assert all(end <= later for (_, end), (later, _) in zip(spans, spans[1:]))
    here = sw.sweep(grid, tmp_path / "here", progress=False)
    assert comparable(result.rows) == comparable(here.rows)
    assert [sw.key_of(r) for r in result.rows] == [sw.key_of(r) for r in grid.runs()]


@pytest.mark.parametrize("queued", [0, 1])
def test_a_point_that_kills_its_worker_is_retried_once_then_recorded(
    own_two_devices, tmp_path, queued
):
    log = tmp_path / "log.jsonl"
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",)})
    runs = list(grid.runs())
    victim = list(sw.key_of(runs[1]))
    measure = functools.partial(killer, str(log), victim)
    runner = dispatch.DaskRunner(own_two_devices, queued=queued)
    result = sw.sweep(grid, tmp_path, runner=runner, measure=measure, progress=False)
    attempts = [tuple(e["key"]) for e in entries(log)]
    assert attempts.count(tuple(victim)) == dispatch.RETRIES + 1
    assert sorted(set(attempts)) == sorted(sw.key_of(r) for r in runs)
    assert all(attempts.count(k) == 1 for k in set(attempts) if list(k) != victim)
    rows = {sw.key_of(r): r for r in sw.read_results(tmp_path / "results.csv")}
    assert len(rows) == len(runs)
    lost = rows[tuple(victim)]
    assert lost["status"] == "error" and "killed its worker 2 times" in lost["reason"]
    assert {r["status"] for k, r in rows.items() if list(k) != victim} == {"ok"}
    assert result.statuses == {"ok": len(runs) - 1, "error": 1}


def test_points_waiting_behind_one_that_kills_their_worker_are_run_once_unblamed(tmp_path):
    """One worker, one device: at both deaths of the victim the next point waits on the same
    worker behind it, so dask fails both; only the victim is blamed."""
    log = tmp_path / "log.jsonl"
    runs = list(sw.Grid(**{**TINY, "methods": ("euclidean",)}).runs())[:3]
    measure = functools.partial(killer, str(log), list(sw.key_of(runs[0])))
    task = functools.partial(worker.measure_here, measure, grid=None, session="s", placed=True)
    with fake_devices(workers=1, threads=1) as client:
        outcomes = {
            sw.key_of(run): outcome
            for run, outcome in dispatch.DaskRunner(client, queued=1)(task, runs)
        }
    attempts = [tuple(e["key"]) for e in entries(log)]
    assert attempts.count(sw.key_of(runs[0])) == dispatch.RETRIES + 1
    assert [attempts.count(sw.key_of(run)) for run in runs[1:]] == [1, 1]
    lost = outcomes[sw.key_of(runs[0])]
    assert isinstance(lost, sw.PointLost) and "killed its worker 2 times" in lost.reason
    assert [outcomes[sw.key_of(run)][0]["status"] for run in runs[1:]] == ["ok", "ok"]


class Failed:
    """A future that dask failed with the death of the worker ``address``."""

    status = "error"

    def __init__(self, address):
        self.address, self.released = address, False

    def exception(self):
        from distributed.scheduler import KilledWorker

        return KilledWorker("key", types.SimpleNamespace(address=self.address), 0)

    def release(self):
        self.released = True


def test_a_dead_worker_with_two_devices_blames_its_two_first_sent_points_only():
    held = {Failed("w"): (5, 0), Failed("w"): (3, 1), Failed("w"): (9, 2)}
    other = Failed("v")  # failed with another worker: not handled with these
    flying = {**held, other: (4, 3)}
    kills = [0, 0, 0, 1]
    assert dispatch._blame(flying, "w", 2, kills) == [2, 0, 1]  # the last sent first
    assert kills == [1, 1, 0, 1] and list(flying) == [other]
    assert all(f.released for f in held) and not other.released


def synthetic(log, victim, run, grid):
    """A row of known time at once, ``t = 1 ms + flops_model / (1 GFLOP/s)``, ten times
    that at the first measurement of the point ``victim``; logs the process it ran in."""
    with open(log, "a") as f:
        f.write(json.dumps({"key": sw.key_of(run), "pid": os.getpid()}) + "\n")
    first = sum(tuple(e["key"]) == sw.key_of(run) for e in entries(log)) == 1
    return known_time_row(run, 10 if first and list(sw.key_of(run)) == victim else 1)


def logged_rates(log, device, dtype):
    """Fixed rates; logs the process that measured them."""
    with open(log, "a") as f:
        f.write(json.dumps({"rates": str(device), "pid": os.getpid()}) + "\n")
    return {kind: [1e9] for kind in RATE_KINDS}


def test_the_grid_its_growth_and_re_measurements_all_run_on_the_workers(two_devices, tmp_path):
    log, rates_log = tmp_path / "log.jsonl", tmp_path / "rates.jsonl"
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",), "grow": {"width": 48}})
    victim = {**next(grid.runs()), "width": 12}  # a grown point, timed 10x too slow once
    measure = functools.partial(synthetic, str(log), list(sw.key_of(victim)))
    rates = functools.partial(logged_rates, str(rates_log))
    runner = dispatch.DaskRunner(two_devices)
    result = sw.sweep(grid, tmp_path, runner=runner, measure=measure, rates=rates, progress=False)
    rows = sw.read_results(tmp_path / "results.csv")
    widths = [int(r["width"]) for r in rows if r["depth"] == "1" and r["batch"] == "4"]
    assert widths == [4, 6, 12, 24, 48]  # the grid's, then the grown ones in their order
    assert "stopped at the cap width=48" in result.growth["euclidean/structured/width"]
    measured = entries(log)
    assert os.getpid() not in {e["pid"] for e in measured}  # every point ran on a worker
    keys = [tuple(e["key"]) for e in measured]
    assert keys.count(sw.key_of(victim)) == 2 and len(keys) == len(rows) + 1
    (again,) = [r for r in rows if sw.key_of(r) == sw.key_of(victim)]
    assert (again["remeasured"], again["flag"]) == ("1", "")  # no outlier the second time
    # every worker measured its device's rates at the start, after the grid and at the end
    (device,) = json.loads((tmp_path / "sweep.json").read_text())["devices"].values()
    whens = sorted(r["when"] for r in device["device_rates"])
    assert whens == ["end", "end", "grid", "grid", "start", "start"]
    workers = {e["pid"] for e in entries(rates_log)}
    assert len(workers) == 2 and os.getpid() not in workers


def _threads_by_worker(marker, task, run):
    """``task(run)`` with ``RIEMANN_BENCH_THREADS`` 2 in the first worker process to run
    one (the one that creates ``marker``) and 1 in every other: a worker in another
    setting on the same host and device (unpinned CPU workers: ``physical_device`` cpu)."""
    with contextlib.suppress(FileExistsError):
        with open(marker, "x") as f:
            f.write(str(os.getpid()))
    saved = os.environ.get(worker.THREADS)
    with open(marker) as f:
        os.environ[worker.THREADS] = "2" if f.read() == str(os.getpid()) else "1"
    try:
        return task(run)
    finally:
        os.environ.pop(worker.THREADS)
        if saved is not None:
            os.environ[worker.THREADS] = saved


class ThreadsByWorker(dispatch.DaskRunner):
    def __init__(self, client, marker):
        super().__init__(client)
        self.marker = marker

    def __call__(self, task, runs):
        return super().__call__(functools.partial(_threads_by_worker, self.marker, task), runs)


def test_a_worker_in_another_setting_in_a_known_place_is_refused_at_its_first_result(
    two_devices, tmp_path
):
    """Found by a hunt: only the first result of each place (host, physical device) was
    checked against the sweep's environment, so a worker that took a dead one's place on
    its host in another setting (threads 1 where the first timed with 2) had its points
    recorded beside the others', into one set of fits, unrefused (the rates measured after
    the grid refused it, its rows already written; a rerun kept them)."""
    grid = sw.Grid(**{**TINY, "methods": ("euclidean",)})
    runner = ThreadsByWorker(two_devices, str(tmp_path / "first"))
    measure = lambda run, grid: known_time_row(run)  # noqa: E731  (at once)
    with pytest.raises(ValueError, match="timed with threads [12]; here threads [12]"):
        sw.sweep(grid, tmp_path / "out", runner=runner, measure=measure, progress=False)
    rows = sw.read_results(tmp_path / "out" / "results.csv")
    assert len(rows) < len(list(grid.runs()))


def test_the_depth_lines_and_top_pairs_are_timed_again_on_the_workers(two_devices, tmp_path):
    """The interleaved timing of the depth lines (and top pairs) runs where the points run,
    and each row of a group takes one worker's times."""
    grid = sw.Grid(
        **{**TINY, "axes": {**TINY["axes"], "depth": (1, 2, 3)}, "methods": ("euclidean",)}
    )
    runner = dispatch.DaskRunner(two_devices)
    sw.sweep(grid, tmp_path, runner=runner, retime=sw.time_lines, progress=False)
    line = [r for r in sw.read_results(tmp_path / "results.csv") if r["interleaved"]]
    points = sorted((int(r["width"]), int(r["depth"]), int(r["batch"])) for r in line)
    # the depth line through the base (width 4, batch 4) and the top pairs along width, batch
    assert points == [(4, 1, 2), (4, 1, 4), (4, 2, 4), (4, 3, 4), (6, 1, 4)]
    assert {r["interleaved"] for r in line} == {"depth width batch"}
    rounds = sw.LINE_ROUNDS_PER_REPEAT * grid.repeats * sw.LINE_STRETCHES  # a depth line's
    assert all(len(json.loads(r["times_s"])) == rounds for r in line)


def test_the_bars_of_the_lines_and_rates_count_every_worker_s_steps(
    two_devices, tmp_path, monkeypatch
):
    """The lines timed again and the rates, on the workers, report each step done to a bar
    here (a dask event each): every worker times every line, so the bar of the lines counts
    both workers' stretches, and ends full."""
    bars = recorded_bars(monkeypatch)
    grid = sw.Grid(
        **{**TINY, "axes": {**TINY["axes"], "depth": (1, 2, 3)}, "methods": ("euclidean",)}
    )
    rates = functools.partial(logged_rates, str(tmp_path / "rates.jsonl"))
    runner = dispatch.DaskRunner(two_devices)
    measure = lambda run, grid: known_time_row(run)  # noqa: E731  (at once)
    sw.sweep(grid, tmp_path, runner=runner, measure=measure, rates=rates, retime=sw.time_lines)
    shown = {desc: (n, total) for desc, n, total in bars if desc != "sweep"}
    assert shown == {
        "device rates before the points": (2, 2),
        "device rates after the grid": (2, 2),
        "lines timed again": (2 * sw.LINE_STRETCHES, 2 * sw.LINE_STRETCHES),
        "device rates at the end": (2, 2),
    }


def rates_that_kill_a_worker(marker, device, dtype):
    """Fixed rates; the first call kills its own process (the one that creates ``marker``:
    an exclusive create, so two workers that start at once cannot both count as second)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        pass
    else:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)  # the dying worker's call comes first
    return {kind: [1e9] for kind in RATE_KINDS}


def test_rates_of_a_worker_that_dies_are_left_out_with_a_warning(own_two_devices, tmp_path):
    runner = dispatch.DaskRunner(own_two_devices)
    task = functools.partial(
        worker.rates_here,
        functools.partial(rates_that_kill_a_worker, str(tmp_path / "killed")),
        dtypes=("float32",),
        session="s",
        placed=True,
    )
    start = time.monotonic()
    with pytest.warns(UserWarning, match="died.*: left out; the other workers' results stand"):
        measured = runner.everywhere(task, ["cpu"], "no device rates were measured at the end")
    assert len(measured) == 1 and measured[0]["rates"]["products"] == [1e9]
    assert time.monotonic() - start < 60  # no wait for a task pinned to a dead worker


def test_a_task_everywhere_waits_for_a_worker_then_warns(monkeypatch):
    """Found by a hunt: while a killed worker restarted no worker offered the resource, and
    the end-of-sweep rates (or the lines' timing again) were skipped without a word. Now
    it waits for one ``patience`` seconds, then warns, naming what that leaves out."""
    offers = iter([{}, {}, {}])
    monkeypatch.setattr(dispatch, "_offering", lambda client: next(offers, {}))
    monkeypatch.setattr(dispatch, "CHECK_EVERY", 0.01)
    runner = dispatch.DaskRunner(client=None, patience=0.05)
    with pytest.warns(UserWarning, match="offered the 'device' resource for 0.05 s: the lines"):
        assert runner.everywhere(lambda device: [device], ["cpu"], "the lines were not") == []
    waited = time.monotonic()  # the next call does not wait again (found by review: the end
    with pytest.warns(UserWarning, match="since the last wait for one: no rates"):  # of a
        assert runner.everywhere(lambda device: [device], ["cpu"], "no rates") == []  # sweep
    assert time.monotonic() - waited < 0.04  # waited twice), until a worker is back


# -- a client killed midway ------------------------------------------------------------------


def test_a_client_killed_midway_resumes_without_losing_or_repeating_points(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "slow_points.py").write_text(
        textwrap.dedent("""
            import time
            from riemann_core.scaling import sweep as sw

            def slow(run, grid):
                time.sleep(0.3)
                return sw.measure_point(run, grid)
        """)
    )
    (tmp_path / "main.py").write_text(
        textwrap.dedent(f"""
            from pathlib import Path
            from riemann_core.scaling import dispatch, sweep as sw
            import slow_points

            if __name__ == "__main__":
                options = dispatch.ClusterOptions()
                with dispatch.runner(options, "cpu") as runner:
                    grid = sw.Grid(**{TINY!r})
                    sw.sweep(grid, Path({str(out)!r}), runner=runner, measure=slow_points.slow)
        """)
    )
    proc = subprocess.Popen([sys.executable, str(tmp_path / "main.py")], start_new_session=True)
    path = out / "results.csv"
    deadline = time.time() + 180
    while time.time() < deadline and not (path.exists() and len(sw.read_results(path)) >= 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = sw.read_results(path)
    grid = sw.Grid(**TINY)
    total = len(list(grid.runs()))
    assert 3 <= len(before) < total  # killed halfway
    with dispatch.runner(dispatch.ClusterOptions(), "cpu") as runner:  # as it ran
        result = sw.sweep(grid, out, progress=False, runner=runner)
    after = sw.read_results(path)
    keys = [sw.key_of(r) for r in after]
    assert len(keys) == len(set(keys)) == total
    assert result.resumed == len(before) and result.measured == total - len(before)
    assert after[: len(before)] == before  # finished points kept as they were
