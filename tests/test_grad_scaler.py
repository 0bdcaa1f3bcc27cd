"""The preconditioner beside ``torch.amp.GradScaler`` (``grad_scaler=``): the direction of
the scaled loss is the scaled oracle direction, and a step whose scaled gradient overflowed
is left to the scaler to skip, with nothing of the preconditioner's state changed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import Problem, assert_unchanged, oracle_direction, oracle_for, snapshot, unflatten
from test_checkpoint import same_state
from torch import nn

import riemann_core as rc

DAMPING = 1e-2
EXACT = ("euclidean", "layerwise", "full", "natural")
CALLS = ("backward", "step")
#: a scale at which the float16 backward of the network below overflows
HUGE = 2.0**40


def scaled_step(pre, model, x, y, scaler, call, autocast=False):
    """One step's ``.grad`` from ``scaler.scale(loss)``: ``pre.backward`` or
    ``backward()`` and ``pre.step()``."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        loss = F.cross_entropy(model(x), y)
    if call == "backward":
        pre.backward(scaler.scale(loss))
    else:
        scaler.scale(loss).backward()
        pre.step()


def half_precision_problem():
    torch.manual_seed(41)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5))
    return model, torch.randn(32, 20), torch.randint(0, 5, (32,))


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("method", EXACT, ids=lambda m: f"method={m}")
def test_scaled_direction_is_the_scaled_oracle_direction(method, call):
    """``G`` does not depend on the loss's scale: ``.grad`` is ``S G^{-1} g``, and
    ``scaler.step`` moves the parameters by the unscaled direction."""
    problem = Problem(depth=3)
    model, x, y = problem.make()
    G, g, blocks = oracle_for(problem)
    expected = unflatten(oracle_direction(G, g, DAMPING, method, blocks), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    pre = rc.RiemannianPreconditioner(model, method=method, damping=DAMPING, grad_scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # a first call that probes, then the fused one
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        scaled_step(pre, model, x, y, scaler, call)
        assert not pre.overflowed
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad / 2.0**10, expected[name], rtol=1e-9, atol=1e-11)
        scaler.step(opt)
        for name, p in model.named_parameters():
            torch.testing.assert_close(before[name] - p.detach(), 0.5 * expected[name])
            p.data.copy_(before[name])  # the oracle's point again
        scaler.update()


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("method", EXACT + ("kfac",), ids=lambda m: f"method={m}")
def test_an_overflow_is_left_to_the_scaler_to_skip(method, call):
    """float16 autocast at a scale that overflows, on the first call (autograd's path)
    and on a later one (the fused path): no direction, the scaler skips the step and
    lowers the scale; the next step at a workable scale is the one of a preconditioner
    that never saw the overflowed steps (K-FAC's refreshed factors, running average and
    step count kept)."""
    model, x, y = half_precision_problem()
    twin = copy.deepcopy(model)
    kw = dict(method=method, damping=DAMPING)
    if method == "kfac":
        kw.update(kfac_refresh=3, kfac_decay=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=HUGE)
    pre = rc.RiemannianPreconditioner(model, grad_scaler=scaler, **kw)
    plain = rc.RiemannianPreconditioner(twin, **kw)  # the same steps, never overflowed
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(torch.ones(()))  # the scale exists from here: update(new_scale) sets it
    for scale in (HUGE, 2.0**8, HUGE, 2.0**8):
        scaler.update(scale)
        before = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(pre.state_dict())
        scaled_step(pre, model, x, y, scaler, call, autocast=True)
        if scale == HUGE:
            assert pre.overflowed and pre.diagnostics == []
            grads = [p.grad for p in model.parameters()]
            if call == "backward":  # NaN, as the scaled backward leaves inf
                assert all(g.isnan().all() for g in grads)
            else:  # the scaled backward's own .grad, left as they are
                assert any(not g.isfinite().all() for g in grads)
            assert same_state(pre.state_dict(), state)
            scaler.step(opt)  # skipped: the parameters as they were
            assert all(map(torch.equal, before, model.parameters()))
            scaler.update()
            assert scaler.get_scale() == HUGE * scaler.get_backoff_factor()
            continue
        assert not pre.overflowed
        twin.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(twin(x), y) * scale  # what scaler.scale does
        if call == "backward":
            plain.backward(loss)
        else:
            loss.backward()
            plain.step()
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0, msg=name)
        scaler.step(opt)
        twin.load_state_dict(model.state_dict())


@pytest.mark.parametrize("method", EXACT + ("kfac",), ids=lambda m: f"method={m}")
def test_without_a_scaler_an_overflow_is_refused_with_the_fix(method):
    """On the first call (autograd's path) and a later one (the fused path), ``.grad``
    left as it was."""
    model, x, y = half_precision_problem()
    pre = rc.RiemannianPreconditioner(model, method=method)
    for scale in (1.0, HUGE, 1.0, HUGE):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y) * scale
        if scale == 1.0:
            pre.backward(loss)
            continue
        before = snapshot(model)
        with pytest.raises(ValueError, match="pass the scaler to the RiemannianPreconditioner"):
            pre.backward(loss)
        assert_unchanged(model, before)


def test_a_disabled_scaler_skips_nothing():
    """``scaler.step`` of a disabled scaler steps whatever ``.grad`` holds: an overflow
    is refused as without a scaler, ``.grad`` left as it was."""
    model, x, y = half_precision_problem()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    pre = rc.RiemannianPreconditioner(model, grad_scaler=scaler)
    with torch.autocast("cpu", dtype=torch.float16):
        F.cross_entropy(model(x), y).mul(HUGE).backward()
    before = snapshot(model)
    with pytest.raises(ValueError, match="contains .* NaN or inf"):
        pre.step()
    assert_unchanged(model, before)
    assert not pre.overflowed


def test_bad_grad_scalers_are_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        rc.RiemannianPreconditioner(model, grad_scaler=2.0**16)
    with pytest.raises(ValueError, match="needs a DistributedDataParallel model"):
        rc.RiemannianPreconditioner(
            model, grad_scaler=torch.amp.GradScaler("cpu"), process_group=object()
        )
