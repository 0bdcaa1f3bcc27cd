"""The preconditioner beside ``torch.amp.GradScaler`` (``grad_scaler=``): the direction of
the scaled loss is the scaled oracle direction, and a step whose scaled gradient overflowed
is left to the scaler to skip, with nothing of the preconditioner's state changed."""

from __future__ import annotations

import copy
import warnings

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
            # NaN in every .grad, as the scaled backward leaves inf in some: an optimiser
            # holding only finite ones would step them unpreconditioned (found by review)
            assert all(p.grad.isnan().all() for p in model.parameters())
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


class WithAuxiliaryHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.aux = half_precision_problem()[0], nn.Linear(5, 5)

    def forward(self, x):
        return self.net(x)


class WithCalledAuxiliaryHead(WithAuxiliaryHead):
    def forward(self, x):
        self.aux_out = self.aux(self.net(x))  # called, left out of the loss
        return self.net(x)


@pytest.mark.parametrize("network", [WithAuxiliaryHead, WithCalledAuxiliaryHead])
def test_an_overflow_fills_only_the_parameters_the_loss_reaches(network):
    """Found by review: NaN written into every trainable .grad, also of a module the
    forward pass does not call, which no optimiser zeroes: every later step read it as an
    overflow and was skipped; and then into every module the pass called, also an
    auxiliary head the loss leaves out (None after loss.backward()), which
    zero_grad(set_to_none=False) then zeroes and AdamW's decay moves."""
    model = network()
    _, x, y = half_precision_problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=HUGE)
    pre = rc.RiemannianPreconditioner(model, grad_scaler=scaler)
    for _ in range(2):  # the first call (autograd's path) and a fused one
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            pre.backward(scaler.scale(F.cross_entropy(model(x), y)) * HUGE)
        assert pre.overflowed and model.aux.weight.grad is None
        assert all(p.grad.isnan().all() for p in model.net.parameters())


def test_many_overflowed_steps_in_a_row_warn_but_micro_batches_count_once():
    """A parameter that no optimiser zeroes keeps the NaN of an overflowed step, and every
    later step overflows: after 32 scales in a row, a warning says so. The micro-batches of
    one step (gradient accumulation) share a scale and count once (found by review: each
    warned, and four overflowed steps of eight micro-batches warned of 32)."""
    model, x, y = half_precision_problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=HUGE)
    pre = rc.RiemannianPreconditioner(model, grad_scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning while micro-batches accumulate
        for _ in range(4):
            opt.zero_grad()
            for part in x.chunk(8):
                with torch.autocast("cpu", dtype=torch.float16):
                    pre.backward(scaler.scale(F.cross_entropy(model(part), y[: len(part)])))
            assert pre.overflowed
            scaler.step(opt)
            scaler.update()
    stuck = torch.optim.SGD(model[2].parameters(), lr=0.1)  # model[0] is in no optimiser
    with pytest.warns(RuntimeWarning, match="32 steps in a row overflowed and were skipped"):
        for _ in range(28):  # 4 scales above, 28 here, each half the one before
            stuck.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                scaler.scale(F.cross_entropy(model(x), y)).backward()
            pre.step()
            assert pre.overflowed
            scaler.step(stuck)
            scaler.update()


def scaled_backward_with_an_optimiser_per_layer():
    """``(model, scaler, pre, optimisers)`` after ``scaler.scale(loss).backward()`` at a
    scale that does not overflow, an SGD optimiser per Linear layer (as torch's AMP
    examples have)."""
    model, x, y = half_precision_problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    pre = rc.RiemannianPreconditioner(model, grad_scaler=scaler)
    opts = [torch.optim.SGD(model[i].parameters(), lr=0.1) for i in (0, 2)]
    with torch.autocast("cpu", dtype=torch.float16):
        scaler.scale(F.cross_entropy(model(x), y)).backward()
    return model, scaler, pre, opts


def test_pre_step_after_unscale_is_refused():
    """Found by review: with an optimiser per layer, unscale_ had recorded no overflow for
    the first when pre.step() found one in the second and wrote NaN into every .grad: the
    first stepped NaN into its parameters."""
    model, scaler, pre, opts = scaled_backward_with_an_optimiser_per_layer()
    scaler.unscale_(opts[0])
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"pre.step\(\) after scaler.unscale_\(opt\)"):
        pre.step()
    assert_unchanged(model, before)


def test_an_overflowed_step_draws_nothing_from_the_generator():
    """Found by review: the sampled metric's draws of a skipped step moved the generator,
    so the steps after it differed from those of a run that never saw it."""
    model, x, y = half_precision_problem()
    generator = torch.Generator().manual_seed(3)
    scaler = torch.amp.GradScaler("cpu", init_scale=HUGE)
    pre = rc.RiemannianPreconditioner(
        model, grad_scaler=scaler, output_metric="sampled", generator=generator
    )
    for _ in range(2):  # the first call (autograd's path) and a fused one
        state = generator.get_state()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            pre.backward(scaler.scale(F.cross_entropy(model(x), y)))
        assert pre.overflowed and torch.equal(generator.get_state(), state)


def test_the_token_level_check_reads_a_valid_loss_at_a_small_scale():
    """Found by review: read at seed 1, a float16 gradient scaled by 2^-4 underflowed and a
    valid mean cross-entropy over 8000 classes was refused."""
    torch.manual_seed(43)
    model = nn.Sequential(nn.Linear(16, 8000))
    x, y = torch.randn(2, 256, 16), torch.randint(0, 8000, (2, 256))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-4)
    pre = rc.RiemannianPreconditioner(
        model, grad_scaler=scaler, output_metric="sampled", damping=0.1
    )
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x).reshape(-1, 8000), y.reshape(-1))
    pre.backward(scaler.scale(loss))
    assert not pre.overflowed and all(p.grad.isfinite().all() for p in model.parameters())


def test_the_token_level_check_reads_a_scaled_loss():
    """Found by review: the check of a token-level cross-entropy scaled the float16 loss
    again, which a GradScaler had scaled already: it overflowed and refused nothing, so a
    loss leaving out padded positions passed at the default scale."""
    torch.manual_seed(42)
    model = nn.Sequential(nn.Linear(6, 11))
    x, y = torch.randn(4, 6, 6), torch.randint(0, 11, (4, 6))
    y[:, 4:] = -100  # padding: positions the loss leaves out
    scaler = torch.amp.GradScaler("cpu")  # the default scale, 2^16
    pre = rc.RiemannianPreconditioner(model, grad_scaler=scaler)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
            loss = F.cross_entropy(out.reshape(-1, 11), y.reshape(-1), ignore_index=-100)
        with pytest.raises(ValueError, match="the loss leaves out 8 of the 24 positions"):
            pre.backward(scaler.scale(loss))


def test_overflowed_is_reset_by_the_next_call():
    model, x, y = half_precision_problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=HUGE)
    pre = rc.RiemannianPreconditioner(model, grad_scaler=scaler)
    with torch.autocast("cpu", dtype=torch.float16):
        pre.backward(scaler.scale(F.cross_entropy(model(x), y)))
    assert pre.overflowed
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="the loss contains"):
        pre.backward(F.cross_entropy(model(x), y) * float("nan"))
    assert not pre.overflowed


def test_an_overflow_in_one_grad_leaves_every_grad_nan_for_every_optimiser():
    """Found by review: pre.step() left the .grad as they were, so with an optimiser per
    layer (as torch's AMP examples have) the one whose .grad stayed finite stepped them
    unpreconditioned."""
    model, scaler, pre, opts = scaled_backward_with_an_optimiser_per_layer()
    model[0].weight.grad[0, 0] = float("inf")  # the first layer's alone overflowed
    before = [p.detach().clone() for p in model.parameters()]
    pre.step()
    assert pre.overflowed and all(p.grad.isnan().all() for p in model.parameters())
    for opt in opts:
        scaler.step(opt)
    assert all(map(torch.equal, before, model.parameters()))


#: a scale at which the float32 direction of the network below overflows at damping 1e-4
#: while its scaled loss and gradient (1.3e37 at most) do not
GRAND = 2.0**126


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("method", ("layerwise", "full", "natural", "kfac"))
def test_a_scaled_direction_that_overflows_is_left_to_the_scaler_to_skip(method, call):
    """A scale grown large (bfloat16 autocast never overflows, so the scaler doubles it
    unchecked) can make the scaled direction ``S G^{-1} g`` overflow float32 where the
    scaled gradient did not: the scaler skips the step and lowers the scale, as for an
    overflowed gradient (found by a hunt: a ``FloatingPointError`` advising more damping
    stopped training). At a scale of 1 the scale is not the cause: the error stands."""
    model, x, y = half_precision_problem()
    twin = copy.deepcopy(model)
    kw = dict(method=method, damping=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=GRAND)
    pre = rc.RiemannianPreconditioner(model, grad_scaler=scaler, **kw)
    plain = rc.RiemannianPreconditioner(twin, **kw)  # the same steps, never overflowed
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).mul(GRAND).backward()
    assert all(p.grad.isfinite().all() for p in model.parameters())  # only the direction
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(torch.ones(()))
    for scale in (GRAND, 2.0**8):
        scaler.update(scale)
        before = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(pre.state_dict())
        scaled_step(pre, model, x, y, scaler, call)
        if scale == GRAND:
            assert pre.overflowed and pre.diagnostics == []
            assert all(p.grad.isnan().all() for p in model.parameters())
            assert same_state(pre.state_dict(), state)
            scaler.step(opt)
            assert all(map(torch.equal, before, model.parameters()))
            scaler.update()
            assert scaler.get_scale() == GRAND * scaler.get_backoff_factor()
            continue
        assert not pre.overflowed  # as if never skipped (float32 at damping 1e-4: the
        # fused and autograd paths' round-off differs by eps cond(G), 8e-5 here)
        twin.zero_grad(set_to_none=True)
        plain.backward(F.cross_entropy(twin(x), y) * scale)
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert (p.grad - q.grad).norm() <= 1e-3 * q.grad.norm(), name
    # at a scale of 1 a direction that overflows is refused, .grad left as it was
    scaler.update(1.0)
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y) * GRAND  # the scale is not what overflows
    if call == "backward":
        before = snapshot(model)
        with pytest.raises(FloatingPointError, match="non-finite direction"):
            pre.backward(scaler.scale(loss))
    else:
        scaler.scale(loss).backward()
        before = snapshot(model)
        with pytest.raises(FloatingPointError, match="non-finite direction"):
            pre.step()
    assert_unchanged(model, before)
    assert not pre.overflowed


@pytest.mark.parametrize("method", EXACT + ("kfac",), ids=lambda m: f"method={m}")
def test_a_scaled_loss_past_the_largest_float_with_a_finite_gradient_is_taken(method):
    """Found by a hunt: at a scale a long run grows to (GradScaler keeps it below float32's
    largest number), ``S * loss`` of a summed loss overflows where its gradient ``S g``
    does not; ``loss.backward()`` and ``pre.step()`` took the step, ``pre.backward``
    refused it as a NaN/inf loss naming the data. It goes on, on the first call
    (autograd's path) and the fused one, with the scaled direction of the loss."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    scale, damping = 2.0**122, 10.0
    # the float64 direction of the summed loss, 64 times the mean's (the metric the mean's)
    want = rc.direction(
        copy.deepcopy(model).double(), x.double(), y, method=method, damping=damping
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    pre = rc.RiemannianPreconditioner(model, method=method, damping=damping, grad_scaler=scaler)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss = scaler.scale(F.cross_entropy(model(x), y, reduction="sum"))
        assert loss.isinf()
        pre.backward(loss)
        assert not pre.overflowed
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                p.grad.double() / scale, 64 * want[name], rtol=1e-5, atol=1e-7
            )


def test_overflows_in_a_row_from_an_infinite_loss_name_the_data():
    """Found by review of 03de032: a loss infinite because of the data (log(0)) under an
    enabled scaler is skipped at every scale; the warning after 32 of them named only a
    stale .grad or the damping as causes, not the data."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    scaler = torch.amp.GradScaler("cpu")
    pre = rc.RiemannianPreconditioner(model, damping=1e-2, grad_scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    caught = []
    for _ in range(32):
        opt.zero_grad()
        p = model(x).softmax(-1)
        mask = torch.ones_like(p)
        mask[0, y[0]] = 0  # the target's probability of sample 0 is 0: log(0)
        loss = -torch.log((p * mask)[torch.arange(8), y]).mean()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            pre.backward(scaler.scale(loss))
        caught += [str(a.message) for a in w if issubclass(a.category, RuntimeWarning)]
        scaler.step(opt)
        scaler.update()
    assert len(caught) == 1 and "check the data" in caught[0]
