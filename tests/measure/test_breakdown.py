"""``measure.breakdown``: a call's wall-clock time by kind of operation."""

from __future__ import annotations

import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from riemann_core import blas, woodbury
from riemann_core.measure.breakdown import KIND_OF_OP, KINDS, time_by_kind


def test_time_by_kind_attributes_each_operation():
    """A GEMM is a product, a Cholesky a Cholesky, a sum another operation; a call that
    runs no operation is all overhead (its wall-clock time, timed without the profiler)."""
    torch.manual_seed(0)
    a = torch.randn(256, 256)
    spd = a @ a.T + 256 * torch.eye(256)

    def call():
        torch.linalg.cholesky_ex(spd)
        a @ a
        a.sum()

    seconds = time_by_kind(call, calls=2)
    assert set(seconds) == set(KINDS)
    m = woodbury.DIRECT_POTRF_ORDER
    direct = torch.eye(m).mT  # an order LAPACK's potrf is called directly at: Cholesky's
    assert time_by_kind(lambda: woodbury.cholesky_in_place(direct), calls=2)["cholesky"] > 0
    assert seconds["products"] > 0 and seconds["cholesky"] > 0 and seconds["other ops"] > 0
    assert seconds["triangular"] == 0 and seconds["overhead"] >= 0
    idle = time_by_kind(lambda: time.sleep(0.01), calls=2)
    assert idle["overhead"] >= 0.01
    assert all(idle[k] == 0 for k in KINDS if k != "overhead")


def test_an_operation_inside_a_named_one_takes_its_kind():
    """``linalg_cholesky_ex`` clears a triangle by ``tril`` inside itself: Cholesky's
    time; ``tril`` on its own, or inside an unnamed composite, is another operation."""
    from types import SimpleNamespace as Event

    from riemann_core.measure.breakdown import _kind

    cholesky = Event(name="aten::linalg_cholesky_ex", cpu_parent=None)
    assert _kind(Event(name="aten::tril", cpu_parent=cholesky)) == "cholesky"
    linear = Event(name="aten::linear", cpu_parent=None)
    assert _kind(Event(name="aten::addmm", cpu_parent=linear)) == "products"
    assert _kind(linear) == "other ops"
    assert _kind(Event(name="aten::tril", cpu_parent=None)) == "other ops"
    assert KIND_OF_OP["aten::linalg_solve_triangular"] == "triangular"


def test_accumulating_products_are_timed_as_products():
    """Found by an audit: ``addmm_`` (the samples' Grams summed into a dense metric,
    ``LinearHandler.metric_into``: 83% of the layerwise direction's FLOPs on 8-4-3 at batch
    512) was timed as another operation while its FLOPs counted as products."""
    torch.manual_seed(0)
    a, s = torch.randn(256, 256), torch.zeros(256, 256)
    u, a3, s3 = torch.randn(256), a[None], s[None]
    seconds = time_by_kind(lambda: (s.addmm_(a, a), s.addr_(u, u), s3.baddbmm_(a3, a3)), calls=2)
    assert seconds["products"] > 0 and seconds["other ops"] == 0


def test_every_kind_the_flop_counter_counts_is_timed_as_that_kind():
    """Each operation the FLOP counter's table counts as a product, a Cholesky or a
    triangular solve has that kind here, so that a kind's time and FLOPs are of the same
    operations (profiler names: ``aten::mm`` for ``aten.mm``)."""
    from riemann_core.measure.flops import LINALG

    for op, (kind, _) in LINALG.items():
        if kind in KINDS:
            assert KIND_OF_OP.get(str(op).replace(".", "::", 1)) == kind, op


def _potrf():
    woodbury.potrf_(torch.eye(8).mT)


def _syrk():
    blas.syrk_(torch.ones(8, 3), torch.zeros(8, 8), 0.0)


@pytest.mark.parametrize(
    "name, call, available",
    [
        ("riemann_core::potrf_", _potrf, lambda: woodbury._lapack_potrf(torch.float32)),
        ("riemann_core::syrk_", _syrk, lambda: blas.symmetric_products("cpu", torch.float32)),
    ],
    ids=["potrf_", "syrk_"],
)
def test_the_profiler_records_each_call_of_the_packages_operators(name, call, available):
    """Found on torch 2.14.1: its ``custom_op`` calls a Python kernel on a fast path past
    the dispatcher, unseen by the profiler, so ``time_by_kind`` counted LAPACK's potrf,
    called directly, as overhead. Each call is one event of the operator's name, the
    parent of the operations its kernel runs (:func:`riemann_core.blas.profiled`)."""
    if not available():
        pytest.skip("torch exports no LAPACK potrf / BLAS syrk here")
    call()  # (a first call may take another path)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
        call()
    events = [e for e in prof.events() if e.name == name]
    assert len(events) == 2
    inner = [e for e in prof.events() if e.cpu_parent is not None and e.cpu_parent.name == name]
    assert name != "riemann_core::potrf_" or inner  # (the kernel's own aten operations)
