"""Host-device synchronisations per call, counted on the CPU.

On a GPU every value read back to the host (``.item()``, ``bool(t)``, ``int(t)``,
``.tolist()``) and every op whose output shape depends on the data (``nonzero``, boolean
masks) waits for the device. The counter sees them at the dispatcher
(``_local_scalar_dense``, ops tagged ``data_dependent_output`` or
``dynamic_output_shape``) and at the Python level (``Tensor.tolist`` and ``numpy``,
which read memory directly). ``torch.linalg.eigh`` checks LAPACK's status inside its
kernel, out of the counter's sight: on CUDA, K-FAC pays one more sync per order of its
factors (those of one order are eigendecomposed in one call; counted on a GPU by
tests/test_host_syncs.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import Problem
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import riemann_core as rc
from riemann_core import woodbury
from riemann_core.blas import symmetric_products

DATA_DEPENDENT = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)


@pytest.fixture(autouse=True, scope="module")
def _blas_checked():
    """``syrk``'s one-time check (:mod:`riemann_core.blas`) compares small products on the
    host at its first use in a process, not at each call: done before any count, so the
    counts do not depend on which tests ran before."""
    symmetric_products()


@pytest.fixture(autouse=True)
def _as_on_a_gpu(monkeypatch):
    """The counts stand for a GPU's: choices made on the host where a read is free (the
    CPU's alone, ``woodbury.reads_are_free``) take the path a GPU takes."""
    monkeypatch.setattr(woodbury, "reads_are_free", lambda device: False)


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(tag in func.tags for tag in DATA_DEPENDENT) and not _random_state(args):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _random_state(args) -> bool:
    """torch.equal on random states: byte tensors that live on the host on any device."""
    return all(isinstance(a, torch.Tensor) and a.dtype == torch.uint8 for a in args)


class ReadBack(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            self.counter.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def count_syncs(call) -> list[str]:
    counter = SyncCounter()
    with ReadBack(counter), counter:
        call()
    return counter.seen


def test_the_counter_sees_reads_and_data_dependent_shapes():
    t = torch.randn(5)
    seen = count_syncs(lambda: (bool(t.sum() > 0), t.tolist(), t[t > 0], float(t[0])))
    assert len(seen) == 4, seen


CASES = [
    (method, kernel, metric)
    for method in rc.METHODS
    for kernel in ("structured", "generic")
    for metric in ("exact", "sampled")
    if not (method == "euclidean" and (kernel, metric) != ("structured", "exact"))
]


@pytest.mark.parametrize(
    "method,kernel,metric", CASES, ids=[f"method={m}-kernel={k}-{o}" for m, k, o in CASES]
)
def test_direction_syncs_at_most_twice(method, kernel, metric):
    """Two reads per call: the data checks after the forward pass, the solves' verdicts
    at the end; the same on the first call for a model, which also runs the probe."""
    model, x, y = Problem(depth=3).make(dtype=torch.float32)
    kw = dict(method=method, kernel=kernel, output_metric=metric, samples=2, damping=0.1)
    for _ in range(2):
        seen = count_syncs(lambda: rc.direction(model, x, y, **kw))
        assert len(seen) <= 2, seen


def test_preconditioner_step_syncs_at_most_twice():
    model, x, y = Problem(depth=3).make(dtype=torch.float32)
    pre = rc.RiemannianPreconditioner(model, damping=0.1)
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        seen = count_syncs(pre.step)
        assert len(seen) <= 2, seen


@pytest.mark.parametrize("method", rc.METHODS, ids=lambda m: f"method={m}")
def test_preconditioner_backward_syncs_at_most_twice(method):
    """The fused calls, twice; the first (the probe's fallback, which also reads the data's
    checks before autograd consumes the loss's graph), three times."""
    model, x, y = Problem(depth=3).make(dtype=torch.float32)
    pre = rc.RiemannianPreconditioner(model, method=method, damping=0.1)
    for call in range(3):
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        seen = count_syncs(lambda loss=loss: pre.backward(loss))
        assert len(seen) <= (3 if call == 0 else 2), seen


KFAC_CASES = [
    (scheme, bias, metric, batch)
    for scheme in ("exact", "factored")
    for bias in ("joint", "separate")
    for metric in ("exact", "sampled")
    for batch in (4, 24)
]


@pytest.mark.parametrize(
    "scheme,bias,metric,batch",
    KFAC_CASES,
    ids=[f"kfac_damping={s}-kfac_bias={b}-{m}-batch={n}" for s, b, m, n in KFAC_CASES],
)
def test_kfac_variant_syncs_at_most_twice(scheme, bias, metric, batch):
    """Every K-FAC variant, with thin factors (batch 4 against width 8; sampled
    ``Gamma``) and dense ones (batch 24): the factored damping's traces stay on the
    device too."""
    model, x, y = Problem(depth=3, width=8, batch=batch).make(dtype=torch.float32)
    kw = dict(method="kfac", output_metric=metric, damping=0.1)
    kw.update(kfac_damping=scheme, kfac_bias=bias)
    for _ in range(2):
        seen = count_syncs(lambda: rc.direction(model, x, y, **kw))
        assert len(seen) <= 2, seen


@pytest.mark.parametrize("scheme", ["exact", "factored"], ids=lambda s: f"kfac_damping={s}")
@pytest.mark.parametrize("decay", [0.0, 0.5], ids=lambda d: f"kfac_decay={d:g}")
def test_kfac_preconditioner_steps_sync_at_most_twice(scheme, decay):
    """Steps that factorise, and steps between refreshes that reuse the factorisations
    (without a forward pass when there are no running averages)."""
    model, x, y = Problem(depth=3, width=8).make(dtype=torch.float32)
    pre = rc.RiemannianPreconditioner(
        model, method="kfac", damping=0.1, kfac_damping=scheme, kfac_bias="separate",
        kfac_refresh=2, kfac_decay=decay,
    )  # fmt: skip
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        seen = count_syncs(pre.step)
        assert len(seen) <= 2, seen
    assert pre._kfac.steps == 3


def test_bad_input_still_named_after_deferred_checks():
    """The deferred checks keep the guarantees: a NaN among the inputs is named, though
    the forward pass ran on it."""
    model, x, y = Problem(depth=3).make(dtype=torch.float32)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="inputs contains 1 NaN or inf"):
        rc.direction(model, x, y)
