"""Where a point is measured: the device a worker picks, the row's record of it."""

import os
import threading
import time

import pytest
import torch

from riemann_core.scaling import worker


@pytest.fixture
def fresh(monkeypatch):
    """A process with no device records and no GPU pool yet."""
    monkeypatch.setattr(worker, "_records", {})
    monkeypatch.setattr(worker, "_free_gpus", None)


def echo(run, grid):
    return {"ran_on": run["device"], "grid": grid}


def test_in_process_a_point_runs_on_the_device_named_and_keeps_its_key(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(worker, "environment", lambda device: calls.append(device) or {"e": 1})
    run = {"device": "cpu", "method": "euclidean"}
    for session in ("a", "a", "b"):
        row, record = worker.measure_here(echo, run, grid="G", session=session)
    assert row["ran_on"] == "cpu" and row["device"] == "cpu" and row["grid"] == "G"
    here = worker.physical_device(torch.device("cpu"))  # cpu (or a container's cores)
    assert row["physical_device"] == here and row["device_name"] == record["device_name"]
    assert record["environment"] == {"e": 1}
    assert len(calls) == 2  # once per sweep session


def test_the_free_memory_goes_back_after_each_point_rate_and_line(fresh, monkeypatch):
    """A process keeping freed memory for its timings holds at most one point's: the
    allocator's free memory is returned after each (a dask worker holding a point's peak
    would stay over its pause threshold)."""
    events = []
    monkeypatch.setattr(worker, "release_free_memory", lambda: events.append("released"))

    def measure(run, grid):
        events.append("measured")
        return {"status": "ok"}

    worker.measure_here(measure, {"device": "cpu"}, grid=None, session="s")
    worker.rates_here(
        lambda d, t: events.append("rates") or {}, "cpu", dtypes=("float32",), session="s"
    )
    line = [[{"device": "cpu"}]]
    worker.lines_here(
        lambda l, g, d: events.append("line") or [], "cpu", lines=line, grid=None, session="s"
    )
    assert events == ["measured", "released", "rates", "released", "line", "released"]


def test_rates_are_measured_on_the_device_named_in_each_dtype(fresh):
    def rates(device, dtype):
        return {"products": [float(torch.finfo(dtype).bits)], "on": str(device)}

    measured = worker.rates_here(rates, "cpu", dtypes=("float32", "float64"), session="s")
    assert [(m["dtype"], m["rates"]["products"]) for m in measured] == [
        ("float32", [32.0]),
        ("float64", [64.0]),
    ]
    assert {m["rates"]["on"] for m in measured} == {"cpu"}
    here = worker.physical_device(torch.device("cpu"))
    assert all(m["physical_device"] == here and m["environment"] for m in measured)


def test_the_rates_come_with_the_load_of_other_processes_read_around_them(fresh, monkeypatch):
    """Found by a hunt: a load on for the whole sweep slows every reading of the rates
    alike, which their spread does not show; each measurement records how many CPUs other
    processes kept busy meanwhile (empty where not read), and the sweep's record keeps it
    beside the rates."""
    from contextlib import contextmanager

    from riemann_core.scaling import sweep as sw

    events = []

    @contextmanager
    def outside_load():
        load = {}
        events.append("read")
        yield load
        events.append("read")
        load.update(outside_cores=0.7, cpus_read=2)

    monkeypatch.setattr(worker, "outside_load", outside_load)
    rates = lambda d, t: events.append("rates") or {"products": [1.0], "cholesky": [1.0]}  # noqa: E731
    (measured,) = worker.rates_here(rates, "cpu", dtypes=("float32",), session="s")
    assert events == ["read", "rates", "read"]
    assert measured["load"] == {"outside_cores": 0.7, "cpus_read": 2}
    devices = {}
    sw.add_device(devices, measured, "start")
    (session,) = devices[measured["device_name"]]["device_rates"]
    assert session["outside_cores"] == 0.7 and session["cpus_read"] == 2
    sw.add_device(devices, {**measured, "load": {}}, "end")  # not read: no keys
    assert "outside_cores" not in devices[measured["device_name"]]["device_rates"][1]


def test_a_worker_measures_the_rates_of_every_gpu_it_owns(fresh, monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setattr(worker, "device_record", lambda device, session: _record(device))
    monkeypatch.setenv(worker.THREADS, str(torch.get_num_threads()))

    def rates(device, dtype):
        return {"on": str(device)}

    measured = worker.rates_here(rates, "cuda:1", dtypes=("float32",), session="s", placed=True)
    assert [m["rates"]["on"] for m in measured] == ["cuda:0", "cuda:1"]
    here = worker.rates_here(rates, "cuda:1", dtypes=("float32",), session="s")
    assert [m["rates"]["on"] for m in here] == ["cuda:1"]  # in this process: the one named


@pytest.mark.parametrize(
    "visible,index,name",
    [(None, 1, "cuda:1"), ("3,5", 1, "cuda:5"), ("GPU-8a1f,GPU-77c2", 0, "GPU-8a1f")],
    ids=["all-visible", "pinned", "uuids"],
)
def test_the_physical_device_is_named_as_the_host_numbers_it(monkeypatch, visible, index, name):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert worker.physical_device(torch.device("cuda", index)) == name


def test_a_worker_with_two_gpus_lends_each_running_point_its_own(fresh, monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setattr(worker, "device_record", lambda device, session: _record(device))
    held, lock = [], threading.Lock()

    def hold(run, grid):
        with lock:
            held.append(run["device"])
        time.sleep(0.2)
        return {"status": "ok"}

    rows = []

    def point():
        rows.append(
            worker.measure_here(hold, {"device": "cuda:1"}, grid=None, session="s", placed=True)
        )

    threads = [threading.Thread(target=point) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(held) == ["cuda:0", "cuda:1"]  # on a cluster "cuda:1" means a GPU
    assert sorted(row["physical_device"] for row, _ in rows) == ["cuda:0", "cuda:1"]


def test_a_cuda_point_on_a_worker_without_gpus_says_so(fresh, monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="sees no GPU"):
        worker.measure_here(echo, {"device": "cuda"}, grid=None, session="s", placed=True)


def _record(device):
    return {"host": "h", "device_name": "GPU", "physical_device": str(device)}


def test_a_worker_runs_torch_on_its_cores_unless_told(monkeypatch):
    monkeypatch.delenv(worker.THREADS, raising=False)
    assert worker.worker_threads() == len(worker.physical_cores())
    monkeypatch.setenv(worker.THREADS, "3")
    assert worker.worker_threads() == 3


def test_a_worker_whose_gpu_a_point_poisoned_exits_instead_of_failing_every_later_point(
    fresh, monkeypatch
):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    monkeypatch.setattr(worker, "device_record", lambda device, session: _record(device))
    monkeypatch.setattr(worker, "context_usable", lambda device: False)

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(worker.os, "_exit", exit_)

    def illegal(run, grid):
        return {"status": "error", "reason": "AcceleratorError: an illegal memory access"}

    with pytest.raises(SystemExit, match="70"):
        worker.measure_here(illegal, {"device": "cuda"}, grid=None, session="s", placed=True)
    # in this process the error is recorded as it is (a rerun starts a fresh process)
    row, _ = worker.measure_here(illegal, {"device": "cuda"}, grid=None, session="s")
    assert row["status"] == "error"


def test_the_cpu_is_always_usable():
    assert worker.context_usable(torch.device("cpu"))


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two cores to pin to",
)
def test_a_pinned_cpu_worker_names_its_cores():
    """Found by a hunt: two workers pinned to one core each were recorded, and reported, as
    one worker ``cpu``; one that may run on every core is still ``cpu``."""
    allowed = os.sched_getaffinity(0)
    cores = sorted(allowed)
    try:
        os.sched_setaffinity(0, {cores[-1]})
        assert worker.physical_device(torch.device("cpu")) == f"cpu:{cores[-1]}"
        if len(cores) > 2 and cores[1] == cores[0] + 1:
            os.sched_setaffinity(0, set(cores[:2]))
            assert worker.physical_device(torch.device("cpu")) == f"cpu:{cores[0]}-{cores[1]}"
    finally:
        os.sched_setaffinity(0, allowed)
    unpinned = "cpu" if len(allowed) == os.cpu_count() else None  # (a container: its cores)
    assert unpinned is None or worker.physical_device(torch.device("cpu")) == unpinned
