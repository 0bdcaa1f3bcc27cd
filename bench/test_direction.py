"""Every method's direction, and every K-FAC variant beside the public one's (curvlinops),
beside one plain SGD step, per size (pytest-benchmark).

Each size is one benchmark group, so its methods are read against its baseline: the
terminal table puts each figure's ratio to the group's fastest in brackets, and a saved
run carries ``median_over_sgd_step`` in every benchmark's ``extra_info`` (see
``conftest.py``). FLOPs (``flop_counter``) and memory are measured outside the timed
call, after an uncounted one (a new model's first call runs a one-time check); the timed
call is only the operation, synchronised on CUDA.

``extra_info`` per benchmark: the problem (``widths``, ``batch``, ``n_params``, ``d``),
``counted_flops``, ``modelled_flops`` (``costs.flops``, by phase as well),
``speed_of_light_flops`` (``costs.speed_of_light_flops``: the minimal products and
Cholesky FLOPs of the exact layerwise direction, the same yardstick for every benchmark
of a size), ``device_rates`` (GEMM, Cholesky and triangular-solve FLOP/s measured in this
run) and ``speed_of_light_s`` (each kind of minimal FLOPs at its rate, summed, each layer
by its route of least time at these rates: ``costs.speed_of_light_flops(shape, rates)``),
``peak_bytes_model_estimate`` (``costs.peak_bytes``, a model, not a
measurement), ``environment``, and the measured memory of one untimed call: on CUDA
``peak_bytes_cuda_measured`` (allocator peak above what was allocated before); on CPU
``host_rss_rise_bytes_measured`` (``memory.host_peak_bytes``: the peak rise of resident
memory once the C allocator's free memory is returned to the system, ``None`` off
Linux; it can exceed the live tensors' peak under the keep-freed-memory policy that the
suites set, ``memory.host_peak_bytes``) and ``host_peak_rss_bytes_process_wide``, the peak resident memory
of the whole process (model, data, torch) read after the timed rounds; Linux restarts that peak at
the measured call, so it spans this benchmark's calls.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import riemann_core as rc
from riemann_core import costs
from riemann_core.measure import public_kfac
from riemann_core.measure.environment import environment
from riemann_core.measure.flops import flop_counter
from riemann_core.measure.memory import cuda_peak_bytes, host_peak_bytes, host_peak_rss_bytes
from riemann_core.measure.timing import synchronize

from .common import DAMPING

LOSS = "cross_entropy"
SGD_LR = 1e-3

#: Every method with its default (structured) kernel, and layerwise with the generic one.
RUNS = [pytest.param(method, "structured", id=f"method={method}") for method in rc.METHODS] + [
    pytest.param("layerwise", "generic", id="method=layerwise-kernel=generic")
]


def test_sgd_step(benchmark, problem, rates):
    """Baseline: forward, backward and ``torch.optim.SGD.step`` on a copy of the model."""
    model = copy.deepcopy(problem.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(problem.inputs), problem.targets)
        loss.backward()
        optimizer.step()
        return loss

    # the modelled FLOPs of forward + backward are those of the plain gradient
    loss = _run(benchmark, problem, step, "sgd_step", "euclidean", "structured", rates)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(("method", "kernel"), RUNS)
def test_direction(benchmark, problem, method, kernel, memory_budget, rates):
    """``rc.direction`` of one method on the problem's batch (exact cross-entropy Fisher)."""
    need = costs.peak_bytes(
        method, problem.size.shape, kernel, _itemsize(problem), device=problem.device.type
    )
    if need > memory_budget:
        pytest.skip(
            f"{method} ({kernel}) at {problem.size.name} needs about {need / 2**30:.1f} GiB "
            f"by costs.peak_bytes, over the budget of {memory_budget / 2**30:.1f} GiB "
            "(RIEMANN_BENCH_BUDGET_GIB)"
        )

    def call():
        return rc.direction(
            problem.model,
            problem.inputs,
            problem.targets,
            loss=LOSS,
            method=method,
            damping=DAMPING,
            kernel=kernel,
        )

    directions = _run(benchmark, problem, call, method, method, kernel, rates)
    assert directions.keys() == dict(problem.model.named_parameters()).keys()
    assert all(torch.isfinite(v).all() for v in directions.values())


@pytest.mark.parametrize("metric", ["exact", "sampled"], ids=lambda m: f"output_metric={m}")
def test_preconditioned_step(benchmark, problem, metric, rates):
    """A training step with ``pre.backward`` (layerwise; the sampled Fisher with one
    probe): ``zero_grad``, forward, the fused preconditioned backward, ``SGD.step``, on a
    copy of the model. Read against ``test_sgd_step`` and the exact direction of the same
    group (``median_over_sgd_step``)."""
    model = copy.deepcopy(problem.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # every round the same model
    pre = rc.RiemannianPreconditioner(
        model, method="layerwise", damping=DAMPING, loss=LOSS, output_metric=metric
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(problem.inputs), problem.targets)
        pre.backward(loss)
        optimizer.step()
        return loss

    step()  # the first call runs the batch-coupling probe, off the clock
    rows = None if metric == "exact" else 1
    loss = _run(benchmark, problem, step, f"pre.backward step ({metric})", None, "structured",
                rates, rows=rows)  # fmt: skip
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


#: Every K-FAC variant, ours and curvlinops' (skipped when curvlinops is not installed).
KFAC_RUNS = [
    pytest.param(v, side, id=f"kfac={v.name}-impl={side}")
    for v in public_kfac.VARIANTS
    for side in ("ours", "curvlinops")
]


@pytest.mark.parametrize(("variant", "implementation"), KFAC_RUNS)
def test_kfac_variant(benchmark, problem, variant, implementation, rates):
    """One K-FAC variant from scratch: gradient, factors, damped inverse, product.

    ``implementation="curvlinops"`` is the same variant of the public K-FAC
    (:mod:`riemann_core.measure.public_kfac`); its FLOPs are counted, not modelled.
    """
    if implementation == "curvlinops" and not public_kfac.available():
        pytest.skip(f"curvlinops is not installed ({public_kfac.INSTALL})")
    make = public_kfac.ours if implementation == "ours" else public_kfac.public
    call = make(problem.model, problem.inputs, problem.targets, variant, damping=DAMPING)
    label = f"kfac {variant.name} ({implementation})"
    modelled = "kfac" if implementation == "ours" else None
    options = dict(kfac_damping=variant.damping, kfac_bias=variant.bias)
    rows = costs.minimal_rows(problem.size.out_dim, output_metric=variant.output_metric)
    directions = _run(
        benchmark, problem, call, label, modelled, "structured", rates,
        flops_options=options, rows=rows,
    )  # fmt: skip
    assert directions.keys() == dict(problem.model.named_parameters()).keys()
    assert all(torch.isfinite(v).all() for v in directions.values())


def _itemsize(problem) -> int:
    return next(problem.model.parameters()).element_size()


def _run(
    benchmark, problem, fn, label, modelled_as, kernel, rates, flops_options=None,
    rows=None,
):  # fmt: skip
    """Attach the FLOP, memory and environment record, then time ``fn`` alone.

    ``modelled_as``: the method whose cost model applies (``None``: none does), with
    ``flops_options`` (K-FAC's variant) and ``rows`` per sample (default: the size's).
    """
    device, shape = problem.device, problem.size.shape
    if rows is not None:
        shape = costs.MLPShape(shape.widths, shape.batch, rows, shape.bias)
    benchmark.group = problem.size.group
    minimal = costs.MLPShape(shape.widths, shape.batch, costs.minimal_rows(problem.size.out_dim))
    sol_flops = costs.speed_of_light_flops(minimal)
    fn()  # the first call on a new model runs its one-time check (independent samples)
    with flop_counter() as counter:
        fn()
    info = {
        "method": label,
        "kernel": kernel,
        "loss": LOSS,
        "damping": DAMPING,
        "dtype": str(next(problem.model.parameters()).dtype).removeprefix("torch."),
        "widths": list(problem.size.widths),
        "batch": problem.size.batch,
        "rows_per_sample": shape.rows,
        "n_params": sum(p.numel() for p in problem.model.parameters()),
        "d": shape.d,
        "counted_flops": counter.get_total_flops(),
        "speed_of_light_flops": sol_flops,
        "device_rates": rates,
        "speed_of_light_s": costs.speed_of_light_seconds(
            costs.speed_of_light_flops(minimal, rates), rates
        ),
        "environment": environment(device),
    }
    if modelled_as is not None:
        dtype = next(problem.model.parameters()).dtype
        options = {"device": device, "dtype": dtype, **(flops_options or {})}
        modelled = costs.flops(modelled_as, shape, kernel, **options)
        info["modelled_flops"] = modelled["total"]
        info["modelled_flops_by_phase"] = modelled
        info["peak_bytes_model_estimate"] = costs.peak_bytes(
            modelled_as, shape, kernel, itemsize=_itemsize(problem), device=device
        )
    # one measured call, which is also the warm-up of the timed rounds
    if device.type == "cuda":
        info["peak_bytes_cuda_measured"] = cuda_peak_bytes(fn, device)
    else:
        info["host_rss_rise_bytes_measured"] = host_peak_bytes(fn)
    benchmark.extra_info.update(info)

    def timed():
        out = fn()
        synchronize(device)
        return out

    result = benchmark(timed)
    if device.type == "cpu":
        benchmark.extra_info["host_peak_rss_bytes_process_wide"] = host_peak_rss_bytes()
    return result
