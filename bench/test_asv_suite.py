"""The asv suite (``bench/benchmarks.py``) measures what its names say: the phases run the
direction's own routines, a timed call reuses the memory the warm-up freed, and a counted
call does all of its phase's work every time."""

from __future__ import annotations

import itertools
import math

import pytest

from riemann_core.measure.flops import flop_counter

from . import benchmarks

SIZE = (64, 2, 10, 32)


@pytest.fixture(autouse=True)
def _skipped_where_the_device_is_missing(device):
    """Skipped, as the benchmarks are, where RIEMANN_BENCH_DEVICE names a CUDA device
    torch lacks (the ``device`` fixture): the cases raised asv's NotImplementedError."""


def counted(call) -> dict[str, int]:
    with flop_counter() as counter:
        call()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def test_the_solve_phase_forms_the_gradient_at_every_call(monkeypatch):
    """Found by review: a generic block cached ``g_a`` on the problem, so every call after
    the warm-up skipped forming it (8% of the phase's FLOPs)."""
    case = benchmarks.LayerwisePhase()
    case.setup("solve", "generic", *SIZE)
    handler = type(benchmarks._pulled("generic", *SIZE, case.device).handlers[0])
    formed = []
    gradient = handler.gradient
    monkeypatch.setattr(handler, "gradient", lambda self: formed.append(1) or gradient(self))
    blocks = len(benchmarks._pulled("generic", *SIZE, case.device).handlers)
    for calls in (1, 2):
        case.time_phase()
        assert len(formed) == calls * blocks


def test_the_factorisation_phase_runs_the_directions_cholesky():
    """Found by review: the phase timed ``woodbury.cholesky`` (a copy, ``cholesky_ex`` per
    block, the triangle cleared) where the direction factorises its padded buffer in place
    (LAPACK's ``potrf`` from order 512): a regression there never showed."""
    case = benchmarks.LayerwisePhase()
    case.setup("factorisation", "structured", 256, 2, 10, 64)  # d = 576: potrf
    phase = counted(case.call)
    direction = benchmarks.Direction()
    direction.setup("layerwise", 256, 2, 10, 64)
    whole = counted(direction.call)
    cholesky = {op: n for op, n in whole.items() if "potrf" in op or "cholesky" in op}
    assert cholesky and phase == cholesky


@pytest.mark.parametrize("kernel", benchmarks.KERNELS)
@pytest.mark.parametrize("batch", benchmarks.BATCHES)
def test_the_phases_take_the_blocks_the_direction_solves_by_woodbury(batch, kernel, monkeypatch):
    """Found by an audit: the phases took every block by Woodbury, where the direction
    factorises a block's own metric when that costs fewer FLOPs (the output layer at batch
    64, both layers at batch 128, width 32): there the factorisation phase ran 2.6x the
    direction's Cholesky FLOPs on Grams the direction never forms. The phases' groups are
    the direction's Woodbury groups; a size with none skips its phases, not the pullback."""
    from riemann_core.methods import layerwise

    size = (benchmarks.WIDTHS[0], benchmarks.DEPTHS[0], benchmarks.OUT_DIMS[0], batch)
    solved = []
    woodbury = layerwise._woodbury
    monkeypatch.setattr(
        layerwise,
        "_woodbury",
        lambda p, indices, o: solved.append(indices) or woodbury(p, indices, o),
    )
    direction = benchmarks.Direction()
    direction.setup(f"layerwise-{kernel}", *size)
    solved.clear()
    direction.call()
    problem = benchmarks._pulled(kernel, *size, direction.device)
    assert benchmarks._groups(problem) == solved
    for phase in benchmarks.PHASES:
        case = benchmarks.LayerwisePhase()
        if solved or phase == "pullback":
            case.setup(phase, kernel, *size)
        else:
            with pytest.raises(NotImplementedError, match="solves no block by Woodbury"):
                case.setup(phase, kernel, *size)


@pytest.mark.parametrize("phase", benchmarks.PHASES)
def test_time_benchmarks_keep_the_memory_their_warm_up_freed(phase, monkeypatch):
    """Found by review: ``setup`` (which asv runs before every timed call) restarted the
    peak memory, returning free memory to the system: every timed call paid the page
    faults of fresh memory, 18-37% of a direction at width 128. Only ``peakmem_`` does."""
    resets = []
    monkeypatch.setattr(benchmarks, "reset_host_peak", lambda: resets.append(1))
    for case, args in (
        (benchmarks.Direction(), ("layerwise", *SIZE)),
        (benchmarks.LayerwisePhase(), (phase, "structured", *SIZE)),
    ):
        case.setup(*args)
        (case.time_direction if hasattr(case, "time_direction") else case.time_phase)(*args)
        assert resets == []
        (case.peakmem_direction if hasattr(case, "peakmem_direction") else case.peakmem_phase)(
            *args
        )
        assert resets == [1]
        resets.clear()


def test_every_timed_benchmark_warms_its_call_in_setup(monkeypatch):
    """Found by review: Overhead and KFAC made no call in setup, so without asv's own
    warm-up (--quick) their first timed call paid the process's first call (710 ms against
    0.7 ms after)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)

    monkeypatch.setattr(benchmarks.rc, "direction", counting)
    benchmarks.Overhead().setup(benchmarks.METHODS[0])
    assert len(calls) == 1
    monkeypatch.setattr(benchmarks, "_kfac_call", lambda *a: (counting, "cpu"))
    benchmarks.KFAC().setup(benchmarks.KFAC_VARIANTS[0], "ours", *SIZE)
    assert len(calls) == 2


def test_the_host_memory_track_reads_the_calls_own_memory(monkeypatch):
    """Found by review: ``peakmem_direction`` reads the process's peak, ~275 MiB of torch
    beside a direction's few MiB, so a call's memory doubling moved it by ~3%, under the
    gate's factor of 1.1. The track reads the call's rise alone: full's dense n x n metric
    against euclidean's gradient. On the CPU, whose memory holds the metric (with
    RIEMANN_BENCH_DEVICE=cuda it is on the GPU: 8 KiB of host memory, seen on an H200)."""
    monkeypatch.setenv("RIEMANN_BENCH_DEVICE", "cpu")
    size = (32, 1, 10, 32)
    readings = {}
    for method in ("euclidean", "full"):
        case = benchmarks.DirectionHostMemory()
        case.setup(method, *size)
        readings[method] = case.track_host_peak_bytes(method, *size)
    n = sum(p.numel() for p in case.call.args[0].parameters())
    assert readings["euclidean"] < 2**20
    assert readings["full"] >= 4 * n * n  # the float32 metric alone


@pytest.mark.parametrize("method", benchmarks.METHODS)
def test_the_overhead_benchmark_does_not_time_the_coupling_probe(method, monkeypatch):
    """Found by review: on one sample every call probed again (a batch of one cannot show
    coupling), 1.7-2x the per-call overhead it claims to time."""
    from riemann_core import coupling

    case = benchmarks.Overhead()
    case.setup(method)
    probes = []
    register = coupling.register
    monkeypatch.setattr(coupling, "register", lambda *a: probes.append(1) or register(*a))
    case.time_overhead(method)
    assert probes == []


def test_every_targets_track_reads_a_figure_of_a_recorded_run(monkeypatch):
    """``Targets``: each track is a ratio of the run ``riemann-bench targets`` records, the
    lean and training-run references of both networks among them."""
    import json
    from pathlib import Path

    from riemann_core.scaling import targets

    record = json.loads((Path(__file__).parents[1] / "reports/cpu/targets.json").read_text())
    monkeypatch.setattr(targets, "measure_targets", lambda **kwargs: record)
    suite = benchmarks.Targets()
    figures = suite.setup_cache()
    tracks = [name for name in dir(suite) if name.startswith("track_")]
    ratios = {f["id"]: f["ratio"] for f in record["figures"]}
    ratios |= {
        ("small_" if r["network"] == list(targets.SMALL_NETWORK) else "") + r["id"]: r["ratio"]
        for r in record["references"]
    }
    read = {getattr(suite, name)(figures) for name in tracks}
    # full over layerwise inverted, the smallest of its networks' (asv: lower is better)
    assert read <= {*ratios.values(), 1 / min(f["ratio"] for f in record["small"])}
    assert len(tracks) == 11 and len(read) == 11  # every figure, each read by one track


def test_every_timed_setup_synchronises_after_its_warm_up(monkeypatch):
    """Found by an audit: asv runs ``setup`` before every timed call and starts the clock as
    it returns; the warm-up call ended ``setup`` unsynchronised, so on CUDA its queued
    kernels ran inside the timed call (whose closing synchronisation waited for them)."""
    events = []
    monkeypatch.setattr(benchmarks.common, "synchronize", lambda device: events.append(device))

    def call(*args, **kwargs):
        events.append("call")

    monkeypatch.setattr(benchmarks.rc, "direction", call)
    monkeypatch.setattr(benchmarks, "_pullback", call)
    monkeypatch.setattr(benchmarks, "_kfac_call", lambda *args: (call, "cpu"))
    for case, args in (
        (benchmarks.Direction(), ("layerwise", *SIZE)),
        (benchmarks.Overhead(), ("layerwise",)),
        (benchmarks.LayerwisePhase(), ("pullback", "structured", *SIZE)),
        (benchmarks.KFAC(), (benchmarks.KFAC_VARIANTS[0], "ours", *SIZE)),
    ):
        events.clear()
        case.setup(*args)
        assert events[-2:] == ["call", case.device], type(case).__name__


#: asv's kinds of benchmark, by the prefix of their names (asv_runner's name patterns)
ASV_PREFIXES = ("time_", "timeraw_", "mem_", "peakmem_", "track_")


def asv_benchmarks() -> list:
    """Every benchmark asv finds in ``bench/benchmarks.py``, as ``(class, method name)``."""
    return [
        pytest.param(suite, name, id=f"{suite.__name__}.{name}")
        for suite in vars(benchmarks).values()
        if isinstance(suite, type) and suite.__module__ == benchmarks.__name__
        if not suite.__name__.startswith("_")
        for name in dir(suite)
        if name.startswith(ASV_PREFIXES)
    ]


@pytest.mark.parametrize(("suite", "name"), asv_benchmarks())
def test_every_asv_benchmark_runs_at_its_first_parameters(suite, name, monkeypatch):
    """Found by an audit: CI runs ``asv check`` (imports and signatures) and this suite, and
    no test ran ``KFAC.time_kfac``, ``KFACRatio.track_ours_over_curvlinops``, the FLOP
    tracks or ``Environment``'s: a benchmark broken there would rot unseen. Each runs
    once as asv runs it (``setup_cache``, ``setup``, the benchmark), at the first of its
    parameters (the base point, never in ``skip_params``); ``Targets`` reads a recorded run
    (``measure_targets`` takes minutes). Skipped where asv skips it (no CUDA, curvlinops)."""
    import json
    from pathlib import Path

    from riemann_core.scaling import targets

    params = next(itertools.product(*getattr(suite, "params", ())))
    assert params not in getattr(suite, "skip_params", [])
    case, cached = suite(), ()
    if hasattr(case, "setup_cache"):
        record = json.loads((Path(__file__).parents[1] / "reports/cpu/targets.json").read_text())
        monkeypatch.setattr(targets, "measure_targets", lambda **kwargs: record)
        cached = (case.setup_cache(),)
    try:
        if hasattr(case, "setup"):
            case.setup(*params)
        result = getattr(case, name)(*cached, *params)
    except NotImplementedError as skip:  # asv's skip
        pytest.skip(str(skip))
    if name.startswith("track_"):
        assert getattr(suite, name).unit
        assert math.isfinite(result) and result >= 0, result
    else:
        assert result is None
