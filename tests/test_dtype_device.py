"""Dtype and device are kept, and ``rc.direction`` leaves the model exactly as it was.

CUDA cases run where a GPU is present (``dev=cuda``) and are reported as skipped
elsewhere.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from oracle import (
    Problem,
    assert_unchanged,
    flatten,
    kfac_blocks,
    oracle_direction,
    oracle_for,
    rel_error,
    snapshot,
    solve_kfac,
)
from torch import nn

import riemann_core as rc

DTYPES = [
    pytest.param(torch.float32, id="dtype=float32"),
    pytest.param(torch.float64, id="dtype=float64"),
]


def with_some_grads(model):
    """``.grad`` set on the middle layer only: ``None`` must stay ``None``."""
    for p in model[2].parameters():
        p.grad = torch.randn_like(p)
    return model


@pytest.mark.parametrize("method", rc.METHODS, ids=lambda m: f"method={m}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_direction_keeps_dtype_device_and_model(device, dtype, method):
    model, x, y = Problem(depth=3).make(dtype=dtype, device=device)
    with_some_grads(model)
    before = snapshot(model)
    dirs = rc.direction(model, x, y, method=method, damping=0.1)
    assert list(dirs) == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        d = dirs[name]
        assert (d.dtype, d.device, d.shape) == (p.dtype, p.device, p.shape)
        assert not d.requires_grad
        assert torch.isfinite(d).all()
    assert_unchanged(model, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", rc.METHODS, ids=lambda m: f"method={m}")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_direction_keeps_training_flags(method, training):
    """Mixed flags (a submodule in the other mode) come back as they were."""
    model, x, y = Problem(depth=3).make()
    model.train(training)
    model[1].train(not training)
    before = [m.training for m in model.modules()]
    rc.direction(model, x, y, method=method)
    assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("method", rc.METHODS, ids=lambda m: f"method={m}")
def test_direction_keeps_requires_grad_flags(method):
    model, x, y = Problem(depth=3).make()
    model[2].requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    rc.direction(model, x, y, method=method)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "method", ["layerwise", "full", "natural", "kfac"], ids=lambda m: f"method={m}"
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_direction_on_device_matches_oracle(device, dtype, method):
    """The float64 oracle on the CPU; ``damping=0.1`` keeps float32 within 1e-4."""
    problem = Problem(depth=3)
    model, x, y = problem.make(dtype=dtype, device=device)
    dirs = rc.direction(model, x, y, method=method, damping=0.1)
    if method == "kfac":
        g = oracle_for(problem, dtype)[1]
        expected = solve_kfac(kfac_blocks(model, x, y, "cross_entropy"), g, 0.1)
    else:
        G, g, blocks = oracle_for(problem, dtype)
        expected = oracle_direction(G, g, 0.1, method, blocks)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel_error(flatten(dirs, model), expected) < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_preconditioner_keeps_dtype_and_device(device, dtype):
    model, x, y = Problem(depth=3).make(dtype=dtype, device=device)
    pre = rc.RiemannianPreconditioner(model, damping=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    for p in model.parameters():
        assert (p.grad.dtype, p.grad.device) == (p.dtype, p.device)


def test_solve_dtype_float64_returns_model_dtype():
    model, x, y = Problem().make(dtype=torch.float32)
    dirs = rc.direction(model, x, y, damping=1e-2, solve_dtype=torch.float64)
    assert all(d.dtype == torch.float32 for d in dirs.values())


@pytest.mark.parametrize("method", rc.METHODS, ids=lambda m: f"method={m}")
def test_direction_keeps_batchnorm_running_statistics(method):
    """Buffers are part of the model: a train-mode BatchNorm must not see the extra
    forward pass (whether the method then supports the module or refuses it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    try:
        rc.direction(model, x, y, method=method, kernel="auto")
    except ValueError:
        pass  # refusing a batch-coupled module is fine; touching its statistics is not
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"buffer {n!r} changed"


class MixedDtypes(nn.Module):
    """A float32 layer, then a float64 one."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3).double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.float())).double())


@pytest.mark.parametrize("kernel", ["structured", "generic"], ids=lambda k: f"kernel={k}")
def test_natural_on_a_model_of_two_dtypes_is_full_in_each_dtype(kernel):
    """Found by review: natural's one solve over every block met a float32 and a float64
    block, and raised torch's "expected m1 and m2 to have the same dtype"; the blocks are
    now solved in the wider dtype. Natural and full solve the same damped GGN, so they
    agree to the float32 layer's precision, each direction in its parameter's dtype."""
    torch.manual_seed(36)
    model = MixedDtypes()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0, 2])
    kw = dict(damping=1e-2, kernel=kernel)
    natural = rc.direction(model, x, y, method="natural", **kw)
    full = rc.direction(model, x, y, method="full", **kw)
    for name, p in model.named_parameters():
        assert natural[name].dtype == p.dtype
        torch.testing.assert_close(natural[name], full[name], rtol=1e-4, atol=1e-5, msg=name)


class FrozenHalfBetween(nn.Module):
    """Trained float32 Linears around a frozen ``half`` one (``behind``: the half one first,
    a frozen backbone, where no row is pulled back through it)."""

    def __init__(self, half, behind=False):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(6, 6).to(half), nn.Linear(6, 3)
        self.b.requires_grad_(False)
        self.half, self.behind = half, behind
        if behind:
            self.a = nn.Linear(5, 6).to(half).requires_grad_(False)
            self.b = nn.Linear(6, 6)

    def forward(self, x):
        if self.behind:
            return self.c(torch.tanh(self.b(torch.tanh(self.a(x.to(self.half))).float())))
        h = torch.tanh(self.b(torch.tanh(self.a(x)).to(self.half)))
        return self.c(h.float())


HALF = [
    pytest.param(d, id=f"half={d}".replace("torch.", "")) for d in (torch.bfloat16, torch.float16)
]
METRIC_METHODS = [m for m in rc.METHODS if m != "euclidean"]


class CastBetween(nn.Module):
    """Trained float32 Linears around a bare cast to ``half`` and back: no tensor of the
    model is in half precision."""

    def __init__(self, half):
        super().__init__()
        self.a, self.c, self.half = nn.Linear(5, 6), nn.Linear(6, 3), half

    def forward(self, x):
        return self.c(torch.tanh(self.a(x)).to(self.half).float())


@pytest.mark.parametrize("between", [FrozenHalfBetween, CastBetween], ids=lambda c: c.__name__)
@pytest.mark.parametrize("method", METRIC_METHODS, ids=lambda m: f"method={m}")
@pytest.mark.parametrize("half", HALF)
def test_rows_pulled_back_through_half_precision_bound_the_accuracy(half, method, between):
    """Found by a hunt: a frozen half-precision Linear between trained float32 ones rounds
    the rows pulled back through it to its precision, though they reach every trained
    module in float32: the coupling probe blamed the rounding on a hook that changes
    gradients (ValueError), and with ``check_coupling=False`` the direction came back up to
    41% off the oracle (``full``, bfloat16, damping 1e-4) without the AccuracyWarning that
    the same rows under autocast give; and by review, a bare cast between them, where the
    model holds no half-precision tensor, alike. Now both calls warn, naming the dtype."""
    torch.manual_seed(7)
    model = between(half)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    for check in (True, False):
        with pytest.warns(rc.AccuracyWarning, match=f"pulled back through a module in {half}"):
            rc.direction(model, x, y, method=method, damping=1e-4, check_coupling=check)


@pytest.mark.parametrize("half", HALF)
def test_a_frozen_half_backbone_before_the_trained_modules_does_not_warn(half):
    """No row is pulled back through a half-precision module in front of every trained one:
    the rows are float32 throughout, and the accuracy that of float32."""
    torch.manual_seed(7)
    model = FrozenHalfBetween(half, behind=True)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", rc.AccuracyWarning)
        rc.direction(model, x, y, method="full", damping=1e-2)
