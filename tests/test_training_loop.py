"""The preconditioner inside training loops: global modes of torch that a loop may run
under, checked against the dense float64 oracle."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import (
    Problem,
    assert_unchanged,
    block_indices,
    flatten,
    ggn,
    gradient,
    kfac_factors,
    oracle_direction,
    oracle_for,
    preconditioned,
    rel_error,
    snapshot,
    solve_kfac_metric,
)

import riemann_core as rc
from riemann_core import preconditioner

DAMPING = 1e-2


@pytest.mark.parametrize("call", ["backward", "step"])
@pytest.mark.parametrize("method", ["layerwise", "natural", "kfac"])
def test_anomaly_mode(method, call):
    """Under ``torch.autograd.set_detect_anomaly(True)`` (debugging a training loop) every
    call was refused, blaming a gradient hook that reads a value to the host: anomaly
    mode's NaN check reads each gradient of the batched backward pass with ``.item()``
    (found by a hunt). The direction is the oracle's, and anomaly mode is left as it was."""
    problem = Problem(depth=3)
    model, x, y = problem.make()
    pre = rc.RiemannianPreconditioner(model, method=method, damping=DAMPING)
    with torch.autograd.set_detect_anomaly(True):
        for _ in range(2):  # the first call's probe and replay, then the fused path
            preconditioned(pre, model, x, y, call)
        assert torch.is_anomaly_enabled() and torch.is_anomaly_check_nan_enabled()
    got = flatten({n: p.grad for n, p in model.named_parameters()}, model)
    assert rel_error(got, oracle_of(problem, model, x, y, method)[0]) < 1e-10


def oracle_of(problem, model, x, y, method):
    """The float64 oracle's direction of ``method`` (K-FAC: exact damping, joint bias) and
    the blocks of the layerwise metric."""
    G, g, blocks = oracle_for(problem)
    if method == "kfac":
        factors = kfac_factors(model, x, y, problem.loss_name)
        return solve_kfac_metric(factors, g, DAMPING, "exact", "joint"), blocks
    return oracle_direction(G, g, DAMPING, method, blocks), blocks


def test_anomaly_mode_direction():
    """``rc.direction`` under anomaly mode too."""
    problem = Problem(depth=3)
    model, x, y = problem.make()
    with torch.autograd.set_detect_anomaly(True):
        dirs = rc.direction(model, x, y, method="layerwise", damping=DAMPING)
    G, g, blocks = oracle_for(problem)
    want = oracle_direction(G, g, DAMPING, "layerwise", blocks)
    assert rel_error(flatten(dirs, model), want) < 1e-10


def _changed_after_forward(model, what):
    """Module '2' of ``Problem(depth=3)``'s MLP unfrozen, its weight replaced, or the
    module swapped for a copy, after a forward pass that ran with it frozen (unfreeze)."""
    if what == "unfrozen":
        model[2].requires_grad_(True)
    elif what == "replaced":
        model[2].weight = torch.nn.Parameter(model[2].weight.detach().clone())
    else:
        model[2] = copy.deepcopy(model[2])


@pytest.mark.parametrize("what", ["unfrozen", "replaced", "swapped"])
@pytest.mark.parametrize("call", ["backward", "step"])
@pytest.mark.parametrize("method", ["layerwise", "full", "natural", "kfac"])
def test_a_parameter_trained_since_the_forward_pass_is_refused_where_coupled(method, call, what):
    """Found by a hunt: a parameter that did not require grad in the forward pass (frozen
    then, unfrozen before the step; replaced, or its module swapped, after it) gets no
    gradient from that pass's graph, and the metric at the model as it is now took it in
    as a zero gradient, silently: under ``full`` 1.9 off the whole direction and 1.7 off
    the others' alone (``pre.step()`` after an unfreeze, ``pre.backward`` after a swap);
    a weight replaced under ``layerwise`` gave its bias a direction of its block with the
    weight's gradient taken as zero. Refused where the metric couples it with parameters
    that have a gradient, every ``.grad`` as it was; a whole block of its own under
    ``layerwise`` and ``kfac`` is left out exactly, as a module without ``.grad`` is."""
    problem = Problem(depth=3)
    model, x, y = problem.make()
    pre = rc.RiemannianPreconditioner(model, method=method, damping=DAMPING)
    for _ in range(2):  # past the first call's probe: the fused path
        preconditioned(pre, model, x, y, call)
    model.zero_grad(set_to_none=True)
    if what == "unfrozen":
        model[2].requires_grad_(False)
    loss = F.cross_entropy(model(x), y)
    if call == "step":
        loss.backward()
    _changed_after_forward(model, what)
    before = snapshot(model)
    coupled = method in ("full", "natural") or what == "replaced"
    if coupled:
        with pytest.raises(ValueError, match=r"\['2.weight'.*train now but did not in the "):
            pre.backward(loss) if call == "backward" else pre.step()
        assert_unchanged(model, before)
        return
    pre.backward(loss) if call == "backward" else pre.step()
    assert all(p.grad is None for p in model[2].parameters())
    # the other blocks: their directions, block-diagonal (layerwise: the oracle's blocks)
    want, blocks = oracle_of(problem, model, x, y, method)
    got = flatten({n: p.grad if p.grad is not None else torch.zeros_like(p)
                   for n, p in model.named_parameters()}, model)  # fmt: skip
    others = torch.cat([blocks[0], blocks[2]])
    assert rel_error(got[others], want[others]) < 1e-10


@pytest.mark.parametrize("call", ["backward", "step"])
@pytest.mark.parametrize("method", ["full", "natural"])
def test_frozen_after_the_forward_pass_is_the_others_direction(method, call):
    """A module frozen between the forward pass and the step: the others' direction under
    their own metric (as frozen before the forward pass), not refused."""
    problem = Problem(depth=3)
    model, x, y = problem.make()
    pre = rc.RiemannianPreconditioner(model, method=method, damping=DAMPING)
    for _ in range(2):
        preconditioned(pre, model, x, y, call)
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if call == "step":
        loss.backward()
    model[2].requires_grad_(False)
    pre.backward(loss) if call == "backward" else pre.step()
    frozen = copy.deepcopy(model)
    G, g = ggn(frozen, x, y, problem.loss_name), gradient(frozen, x, y, problem.loss_name)
    want = oracle_direction(G, g, DAMPING, method, None)
    got = flatten({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, frozen)
    assert rel_error(got, want) < 1e-10


@pytest.mark.parametrize("probe", ["inputs", "backward(inputs=...)"])
@pytest.mark.parametrize("method", ["layerwise", "full", "natural", "kfac"])
def test_an_input_gradient_on_another_batch_before_the_step_is_refused(method, probe):
    """Found by a hunt: a forward pass on another batch whose only backward pass took the
    gradient of its inputs (a saliency map, an adversarial example; ``torch.autograd.grad``
    or ``backward(inputs=...)``), run between ``loss.backward()`` and ``pre.step()``,
    passed for the pass the gradient came from: the first batch's gradient was
    preconditioned with the second's metric, silently (``layerwise`` 1.4 off the oracle,
    ``full`` 2.6). Refused as an evaluation with gradients enabled is, ``.grad`` as it was."""
    model, x, y = Problem(depth=3).make()
    x2 = torch.randn_like(x).requires_grad_(True)
    pre = rc.RiemannianPreconditioner(model, method=method, damping=DAMPING)
    for _ in range(2):
        preconditioned(pre, model, x, y, "step")
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    out = model(x2)
    if probe == "inputs":
        torch.autograd.grad(out.logsumexp(1).sum(), x2)
    else:
        out.logsumexp(1).sum().backward(inputs=[x2])
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"took no parameter's gradient"):
        pre.step()
    assert_unchanged(model, before)


@pytest.mark.parametrize("written", ["assigned", "in place"])
@pytest.mark.parametrize("method", ["layerwise", "full"])
def test_a_gradient_taken_by_autograd_and_written_by_hand_is_taken(method, written):
    """``torch.autograd.grad`` with respect to the parameters, written into ``.grad`` by
    hand (gradient surgery), still counts as the gradient of the last pass: assigned, or
    copied in place into the ``.grad`` zeroed before the pass (no backward pass
    accumulated into it)."""
    problem = Problem(depth=3)
    model, x, y = problem.make()
    pre = rc.RiemannianPreconditioner(model, method=method, damping=DAMPING)
    for _ in range(3):
        model.zero_grad(set_to_none=written == "assigned")
        params = list(model.parameters())
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        for p, g in zip(params, grads, strict=True):
            if p.grad is None or written == "assigned":
                p.grad = g
            else:
                p.grad.copy_(g)
        pre.step()
    G, g, blocks = oracle_for(problem)
    want = oracle_direction(G, g, DAMPING, method, blocks)
    got = flatten({n: p.grad for n, p in model.named_parameters()}, model)
    assert rel_error(got, want) < 1e-10


@pytest.mark.parametrize("call", ["backward", "step"])
def test_checkpoint_sequential_on_the_model_is_refused_naming_it(call):
    """Found by a hunt: ``torch.utils.checkpoint.checkpoint_sequential(model, 2, x)`` calls
    the model's children, never the model, so no pass is recorded; the refusal said only
    "call model(x)", which the user had, in effect. It now names the cause and the fix,
    every ``.grad`` as it was."""
    from torch.utils.checkpoint import checkpoint_sequential

    model, x, y = Problem(depth=3).make()
    pre = rc.RiemannianPreconditioner(model, damping=DAMPING)
    loss = F.cross_entropy(checkpoint_sequential(model, 2, x, use_reentrant=False), y)
    if call == "step":
        loss.backward()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"outside a call of the model.*checkpoint_sequential"):
        pre.backward(loss) if call == "backward" else pre.step()
    assert_unchanged(model, before)
    # a model called as such afterwards is recorded again, with no such words
    preconditioned(pre, model, x, y, call)
    assert pre._capture.outside is None


def test_unscale_of_another_optimiser_is_named_in_the_refusal():
    """Found by a hunt: ``scaler.unscale_(opt_body)`` to clip a body that is not
    preconditioned, then ``pre.step()`` on the head (its own optimiser, not unscaled), is
    refused (the scaler keeps its optimisers by id alone); the message said to call
    ``pre.step()`` before ``scaler.unscale_(opt)``, which the user had, for that
    optimiser. It now says every optimiser of the scaler, and why."""
    torch.manual_seed(0)
    body, head = torch.nn.Linear(5, 6), torch.nn.Linear(6, 3)
    scaler = torch.amp.GradScaler("cpu")
    pre = rc.RiemannianPreconditioner(head, damping=DAMPING, grad_scaler=scaler)
    opt_body = torch.optim.SGD(body.parameters(), lr=0.1)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    scaler.scale(F.cross_entropy(head(torch.tanh(body(x))), y)).backward()
    scaler.unscale_(opt_body)
    before = snapshot(head)
    with pytest.raises(RuntimeError, match=r"every optimiser of this scaler.*by id"):
        pre.step()
    assert_unchanged(head, before)


def _flat_grads(model):
    """Give every parameter a ``.grad`` that is a view of one flat buffer (as apex and
    ``DistributedDataParallel(gradient_as_bucket_view=True)`` do): a write into one moves
    the version of all."""
    params = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype)
    start = 0
    for p in params:
        p.grad = flat[start : start + p.numel()].view_as(p)
        start += p.numel()


@pytest.mark.parametrize("write", [None, "clip_grad_norm_", "flat buffer"])
@pytest.mark.parametrize("method", ["full", "natural"])
def test_a_grad_kept_as_zeros_that_the_backward_pass_did_not_reach_is_refused(method, write):
    """Found by review: after ``opt.zero_grad(set_to_none=False)`` a backward pass restricted
    to the head (``inputs=``) left the body's ``.grad`` zeros, which were taken as its
    gradient (full: the head's direction 9.5 in norm against 5.2 with the body frozen),
    silently; and again (found by the next review) where a write moved the zeros'
    version: an in-place clip after the backward pass, or ``.grad`` that are views of one
    flat buffer (17.2 against 3.1). Refused as a gradient left out, ``.grad`` as it was;
    an ordinary loop that zeroes in place, micro-batches accumulated too, stays exact,
    with the same writes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    model.double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    pre = rc.RiemannianPreconditioner(model, method=method, damping=DAMPING)
    if write == "flat buffer":
        _flat_grads(model)

    def written():
        if write == "clip_grad_norm_":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # scales by ~1

    for _ in range(2):  # .grad allocated, then zeroed in place
        model.zero_grad(set_to_none=False)
        F.cross_entropy(model(x[:3]), y[:3]).backward()  # a micro-batch accumulated
        F.cross_entropy(model(x), y).backward()
        written()
        pre.step()
    model.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward()
    written()
    pre.step()
    want = flatten(rc.direction(model, x, y, method=method, damping=DAMPING), model)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert rel_error(flatten(got, model), want) < 1e-10
    model.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward(inputs=list(model[2].parameters()))
    written()
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"hold a .grad that no backward pass since the forward pass reached"
    ):
        pre.step()
    assert_unchanged(model, before)
    # the preconditioner's own watch on the .grad is no gradient hook pre.backward refuses
    model.zero_grad(set_to_none=False)
    pre.backward(F.cross_entropy(model(x), y))
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert rel_error(flatten(got, model), want) < 1e-10
    pre.remove()


@pytest.mark.parametrize("method", ["full", "natural"])
def test_a_gradient_returned_after_a_restricted_backward_pass_is_taken_its_own(method):
    """Found by review of the post-accumulate-grad watch: only the first backward pass
    through the recorded output told whether one returned a parameter's gradient. After
    ``loss.backward(inputs=head)``, the body's gradient from ``torch.autograd.grad`` copied
    into its zeroed ``.grad`` (gradient surgery on a shared body) was refused as unreached;
    and where the first pass returned the head's gradient alone, ``clip_grad_norm_`` let the
    body's stale zeros pass as its gradient, silently (full: the head's direction 137 in
    norm, against 8.2 with the body frozen). Every pass counts, for the parameters whose
    gradient it returned."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    model.double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    body, head = list(model[0].parameters()), list(model[2].parameters())
    pre = rc.RiemannianPreconditioner(model, method=method, damping=DAMPING)
    F.cross_entropy(model(x), y).backward()  # .grad allocated, then zeroed in place
    for _ in range(2):
        model.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward(inputs=head, retain_graph=True)
        for p, g in zip(body, torch.autograd.grad(loss, body), strict=True):
            p.grad.copy_(g)
        pre.step()
    want = flatten(rc.direction(model, x, y, method=method, damping=DAMPING), model)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert rel_error(flatten(got, model), want) < 1e-10
    model.zero_grad(set_to_none=False)
    loss = F.cross_entropy(model(x), y)
    torch.autograd.grad(loss, head, retain_graph=True)  # returns the head's alone
    loss.backward(inputs=head)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # moves the body's version
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"hold a .grad that no backward pass since the forward pass reached"
    ):
        pre.step()
    assert_unchanged(model, before)
    pre.remove()


def _fused_adam(params):
    return torch.optim.Adam(params, lr=1e-3, fused=True)


@pytest.mark.parametrize(
    "method, options",
    [("layerwise", {}), ("natural", {}), ("kfac", {"kfac_refresh": 3})],
    ids=["layerwise", "natural", "kfac-between-refreshes"],
)
def test_a_fused_optimizer_step_before_the_step_is_refused(method, options):
    """Found by a hunt of training loops: ``opt.step()`` taken before ``pre.step()`` is
    refused by the parameters' version counters, but a fused optimizer (``fused=True``)
    moves none. K-FAC between refreshes, which runs no forward pass, then took the step
    silently (the optimizer had stepped along the raw gradient, and the direction written
    after it went unused); the other methods were refused only by the replay's output
    check, as state not replayed (a float32 network at learning rate 1e-5 with outputs of
    scale 100 passed it, silently). Refused naming the optimizer, every .grad as it was;
    the order the docs give stays exact."""
    problem = Problem(depth=3)
    model, x, y = problem.make()
    pre = rc.RiemannianPreconditioner(model, method=method, damping=DAMPING, **options)
    opt = _fused_adam(model.parameters())
    for _ in range(2):  # the order the docs give: exact, and K-FAC's cache filled
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # before pre.step(): the raw gradient applied
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"Adam.step\(\) stepped parameters .*before opt"):
        pre.step()
    assert_unchanged(model, before)
    # the documented order: exact (K-FAC's cached blocks aside: checked against itself)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    if method != "kfac":
        want = flatten(rc.direction(model, x, y, method=method, damping=DAMPING), model)
        got = flatten({n: p.grad for n, p in model.named_parameters()}, model)
        assert rel_error(got, want) < 1e-10
    pre.remove()


@pytest.mark.parametrize("memory", ["apart", "one buffer"])
def test_another_models_fused_optimizer_between_the_pass_and_the_step_is_taken(memory):
    """A GAN's discriminator stepped by a fused optimizer between the generator's forward
    pass and its ``pre.step()`` changes none of the generator's parameters: exact; also
    where the parameters of both are views of one flat buffer (the discriminator's
    optimizer holding its own views: the generator's memory lies outside them)."""
    torch.manual_seed(9)
    G = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))
    D = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    G.double(), D.double()
    if memory == "one buffer":
        _in_one_buffer(G, D)
    pre_G = rc.RiemannianPreconditioner(G, loss="mse", damping=DAMPING)
    pre_D = rc.RiemannianPreconditioner(D, loss="mse", damping=DAMPING)
    opt_G, opt_D = _fused_adam(G.parameters()), _fused_adam(D.parameters())
    z, ones = torch.randn(8, 3, dtype=torch.float64), torch.ones(8, 1, dtype=torch.float64)
    for _ in range(2):
        opt_D.zero_grad()
        fake = G(z)
        F.mse_loss(D(fake.detach()), 0 * ones).backward()
        opt_D.step()  # the generator's pass is still to be preconditioned
        opt_G.zero_grad()
        loss = F.mse_loss(D(fake), ones)
        names = [n for n, _ in G.named_parameters()]
        grads = torch.autograd.grad(loss, list(G.parameters()), retain_graph=True)
        gradient = flatten(dict(zip(names, grads, strict=True)), G)
        loss.backward()
        pre_G.step()
        # the metric at G's pass (its MSE output metric) applied to the loss's gradient
        metric = ggn(G, z, torch.zeros(8, 4, dtype=torch.float64), "mse")
        want = oracle_direction(metric, gradient, DAMPING, "layerwise", block_indices(G))
        got = flatten({n: p.grad for n, p in G.named_parameters()}, G)
        assert rel_error(got, want) < 1e-10
        opt_G.step()
    pre_G.remove(), pre_D.remove()


@pytest.mark.parametrize("call", ["backward", "step"])
def test_weights_restored_through_data_before_the_step(call):
    """Found by a hunt of SAM loops: the second pass at ``w + e``, then the weights put back
    as a common SAM implementation does, ``p.data = old_p`` (or
    ``torch.nn.utils.vector_to_parameters``), which moves no version counter. ``pre.step()``
    runs that pass again at ``w``, whose output differs: the refusal blamed state not
    replayed (Python's random module, a counter) and now names the parameters given other
    data and the fix. The fused ``pre.backward(loss)`` runs no replay (its graph keeps the
    pass's data): the direction at ``w + e``, exact."""
    problem = Problem(depth=3)
    model, x, y = problem.make()
    pre = rc.RiemannianPreconditioner(model, method="layerwise", damping=DAMPING)
    preconditioned(pre, model, x, y, call)  # past the first call
    model.zero_grad(set_to_none=True)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)  # the ascent step
    perturbed = copy.deepcopy(model)
    loss = F.cross_entropy(model(x), y)
    if call == "step":
        loss.backward()
    for n, p in model.named_parameters():
        p.data = old[n].clone()
    if call == "backward":
        pre.backward(loss)
        want = rc.direction(perturbed, x, y, method="layerwise", damping=DAMPING)
        got = {n: p.grad for n, p in model.named_parameters()}
        assert rel_error(flatten(got, model), flatten(want, model)) < 1e-10
    else:
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"parameters \['0.weight'.*were given other data"):
            pre.step()
        assert_unchanged(model, before)
    pre.remove()


def test_a_module_called_only_in_an_earlier_micro_batch_is_refused_naming_it():
    """Found by a hunt: accumulating micro-batches routed to different heads, the head the
    last pass did not call (the metric is that pass's) was refused with the advice to call
    ``opt.zero_grad()``, which would drop its micro-batch's gradient. The message says it
    may come from an earlier micro-batch, and what to do."""

    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(6, 8)
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

        def forward(self, x, route):
            return (self.a if route == "a" else self.b)(torch.tanh(self.body(x)))

    torch.manual_seed(0)
    model = Routed().double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    pre = rc.RiemannianPreconditioner(model, damping=DAMPING)
    F.cross_entropy(model(x[:8], "b"), y[:8]).backward()
    F.cross_entropy(model(x[8:], "a"), y[8:]).backward()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"b.weight.*earlier micro-batch whose pass called them"):
        pre.step()
    assert_unchanged(model, before)


def test_a_head_optimizer_beside_a_trainable_body_is_refused_naming_which_optimizer():
    """Found by a hunt: fine-tuning the head with an optimizer over it alone, the body left
    trainable, ``opt.zero_grad()`` leaves the body's direction in its ``.grad`` and the next
    backward pass adds to it: refused, rightly, but the message told the user to call
    ``opt.zero_grad()``, which they had. It says which optimizer's."""
    model, x, y = Problem(depth=3).make()
    pre = rc.RiemannianPreconditioner(model, damping=DAMPING)
    opt = torch.optim.SGD(list(model.parameters())[-2:], lr=0.1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"of an optimizer that holds these parameters"):
        pre.step()
    assert_unchanged(model, before)


def _in_one_buffer(*models):
    """Make every parameter of ``models`` a view of one flat buffer (as contiguous
    parameter buffers keep them); returns the buffer as a parameter and each model's
    span of it."""
    params = [p for m in models for p in m.parameters()]
    flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in params]))
    offset, spans = 0, []
    for m in models:
        start = offset
        for p in m.parameters():
            p.data = flat.data[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        spans.append((start, offset))
    return flat, spans


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize(
    "method, options",
    [("layerwise", {}), ("kfac", {"kfac_refresh": 3})],
    ids=["layerwise", "kfac-between-refreshes"],
)
def test_a_step_of_a_flat_buffer_the_parameters_view_before_the_step_is_refused(
    method, options, fused
):
    """Found by review: the model's parameters as views of one flat buffer that the
    optimizer holds as its parameter (a contiguous parameter buffer). Its step moves no
    version counter of the views, fused or not, and it is not one of the model's
    parameters: ``opt.step()`` before ``pre.step()`` went silently under K-FAC between
    refreshes (the weights 8e-3 off the pass's, the direction written after the step),
    and was blamed on state not replayed by the others. Refused naming the optimizer."""
    problem = Problem(depth=3)
    model, x, y = problem.make()
    flat, _ = _in_one_buffer(model)
    params = list(model.parameters())
    pre = rc.RiemannianPreconditioner(model, method=method, damping=DAMPING, **options)
    opt = torch.optim.Adam([flat], lr=1e-2, fused=fused, foreach=None if fused else True)

    def gradient_of_buffer():
        flat.grad = torch.cat([p.grad.flatten() for p in params])

    for _ in range(2):  # the order the docs give, and K-FAC's cache filled
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        gradient_of_buffer()
        opt.step()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    gradient_of_buffer()
    opt.step()  # before pre.step()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"Adam.step\(\) stepped parameters \['0.weight'"):
        pre.step()
    assert_unchanged(model, before)
    pre.remove()


def _by_hand(how, model, flat=None, lr=1e-2):
    """A plain SGD step written by hand through ``.data`` (no version counter moves, no
    optimizer's hook runs)."""
    if how == "flat buffer":
        flat.grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        flat.data.add_(flat.grad, alpha=-lr)
        return
    for p in model.parameters():
        if how == "p.data = ...":
            p.data = p.data - lr * p.grad
        else:
            p.data.add_(p.grad, alpha=-lr)


@pytest.mark.parametrize("read", ["whole", "by rows"])
@pytest.mark.parametrize(
    "how", ["p.data.add_", "p.data.add_, weights transposed", "p.data = ...", "flat buffer"]
)
def test_an_update_through_data_before_the_step_is_refused_between_kfac_refreshes(
    how, read, monkeypatch
):
    """Found by a hunt of training loops: a step written by hand before ``pre.step()``,
    ``p.data.add_(-lr * p.grad)`` (or ``p.data = ...``, or a write to a flat buffer the
    parameters view), moves no version counter and no optimizer's hook sees it. The other
    steps run the pass again and refuse it by its output; K-FAC between refreshes, which
    runs none, took it silently (the step along the raw gradient, the direction written
    after it unused). Refused naming the parameters, every .grad and K-FAC's state as they
    were; the order the docs give goes on reusing the cache. Also for weights laid out
    transposed, whose data is read through a copy (one kept for the next steps would hide
    their change), and for weights read by the sums of their rows, as larger ones are."""
    if read == "by rows":
        monkeypatch.setattr(preconditioner, "_READ_WHOLE", 0, raising=False)
    model, x, y = Problem(depth=3).make()
    flat = _in_one_buffer(model)[0] if how == "flat buffer" else None
    if how.endswith("transposed"):
        for m in model[::2]:
            m.weight = torch.nn.Parameter(m.weight.detach().t().contiguous().t())
    pre = rc.RiemannianPreconditioner(model, method="kfac", damping=DAMPING, kfac_refresh=3)
    taken = []  # the parameters' data read at the forward pass: only before a reuse
    for _ in range(2):  # the order the docs give, and K-FAC's cache filled
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        taken.append(getattr(pre, "_data_at_pass", None) is not None)
        pre.step()
        _by_hand(how, model, flat)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    _by_hand(how, model, flat)  # before pre.step()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"parameters \['0.weight'.* changed after the forwa"):
        pre.step()
    assert_unchanged(model, before)
    assert pre._kfac.steps == 2 and taken == [False, True]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    pre.step()  # the order the docs give: the cache reused, no pass run again
    hook.remove()
    assert pre._kfac.steps == 3 and not calls


def test_kfac_driven_by_backward_reads_no_parameter_data():
    """``pre.backward(loss)`` takes the gradient from the pass's own graph, so no update can
    come before it: a preconditioner it drives reads no parameter data at its forward
    passes (found by review: 0.18 ms a pass of 784-1024-1024-10 for no check); one that
    goes over to ``pre.step()`` reads it again from the pass after that call."""
    model, x, y = Problem(depth=3).make()
    pre = rc.RiemannianPreconditioner(model, method="kfac", damping=DAMPING, kfac_refresh=3)
    read = []
    for call in ["backward"] * 4 + ["step"] * 3:
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        read.append(pre._data_at_pass is not None)
        pre.backward(loss) if call == "backward" else (loss.backward(), pre.step())
    # refreshes at steps 0, 3 and 6 read nothing either: they run the pass again
    assert read == [False, False, False, False, False, True, False]


@pytest.mark.parametrize(
    "between", [None, "same data, other memory", "another model's weights, one buffer"]
)
@pytest.mark.parametrize("optimizer", ["SGD", "Adam fused"])
@pytest.mark.parametrize("read", ["whole", "by rows"])
def test_a_loop_in_the_documented_order_is_not_refused_between_kfac_refreshes(
    read, optimizer, between, monkeypatch
):
    """The check of the parameters' data that K-FAC between refreshes makes in place of a
    pass run again refuses nothing in the order the docs give (the optimizer's step after
    ``pre.step()``), nor data that stayed the same in other memory (``p.data =
    p.data.clone()``), nor a change to another model's weights between the forward pass
    and ``pre.step()`` (a GAN's discriminator, its parameters in one buffer with the
    model's): the steps are those without it, to the bit."""
    if read == "by rows":  # (as larger weights are)
        monkeypatch.setattr(preconditioner, "_READ_WHOLE", 0, raising=False)

    def run(check):
        model, x, y = Problem(depth=3).make()
        other = torch.nn.Linear(3, 2).double()
        if between == "another model's weights, one buffer":
            _in_one_buffer(model, other)
        pre = rc.RiemannianPreconditioner(model, method="kfac", damping=DAMPING, kfac_refresh=3)
        if not check:
            pre._check_data_kept = lambda checks: None
        kind = optimizer.split()[0]
        opts = {"fused": True} if optimizer == "Adam fused" else {}
        opt = getattr(torch.optim, kind)(model.parameters(), lr=1e-2, **opts)
        directions = []
        for _ in range(7):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if between == "same data, other memory":
                for p in model.parameters():
                    p.data = p.data.clone()
            elif between is not None:
                other.weight.data.add_(0.1)
            pre.step()
            directions.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
        assert pre._kfac.steps == 7
        return directions

    for got, want in zip(run(check=True), run(check=False), strict=True):
        assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_removed_preconditioner_keeps_no_parameter_memory_alive():
    """Found by review: the views K-FAC between refreshes reads the parameters' data
    through (kept from step to step) held their memory, so a model moved or given other
    data after ``pre.remove()`` (``model.cpu()`` to save it) left its old copy alive for as
    long as the preconditioner lived."""
    import gc
    import weakref

    import numpy as np

    model, x, y = Problem(depth=3).make()
    arrays = [np.array(p.detach().numpy()) for p in model.parameters()]
    for p, a in zip(model.parameters(), arrays, strict=True):
        p.data = torch.from_numpy(a)  # memory whose release a weak reference sees
    held = [weakref.ref(a) for a in arrays]
    del a, arrays
    pre = rc.RiemannianPreconditioner(model, method="kfac", damping=DAMPING, kfac_refresh=3)
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    assert pre._data_at_pass is not None  # the second step reused the cache: data read
    pre.remove()
    model.float()  # every parameter given other memory
    gc.collect()
    assert all(r() is None for r in held)


@pytest.mark.parametrize("call", ["backward", "step"])
def test_a_removed_preconditioner_keeps_no_batch_alive(call):
    """Found by a hunt: the record of the last forward pass (its inputs, sharing the
    batch's memory, and outputs) stayed with a preconditioner removed, or past the end
    of its with block, for as long as it lived; ``pre.remove()`` frees it."""
    import gc
    import weakref

    import numpy as np

    model, x, y = Problem(depth=3).make()
    with rc.RiemannianPreconditioner(model, method="layerwise", damping=DAMPING) as pre:
        for _ in range(2):
            array = np.array(x.numpy())
            batch = torch.from_numpy(array)  # memory whose release a weak reference sees
            model.zero_grad()
            loss = F.cross_entropy(model(batch), y)
            if call == "step":
                loss.backward()
            pre.backward(loss) if call == "backward" else pre.step()
    held = weakref.ref(array)
    del array, batch, loss
    gc.collect()
    assert held() is None
    assert pre.state_dict()["method"] == "layerwise"


@pytest.mark.parametrize("call", ["backward", "step"])
@pytest.mark.parametrize("method", ["layerwise", "natural", "kfac"])
def test_what_an_optimizer_does_after_the_preconditioner(method, call):
    """As docs/api.md states for the loop beside an optimizer: a penalty written into the
    loss is preconditioned with the loss's gradient, ``G^{-1} (N g + 2 lam theta)`` under
    ``reduction="sum"`` (the metric stays the mean's, whatever the loss's scale); SGD's
    ``weight_decay`` and a clip act on the direction afterwards, per parameter group."""
    problem = Problem(depth=3)
    model, x, y = problem.make()
    theta = flatten(dict(model.named_parameters()), model).detach()
    lam, wd, lr, max_norm = 0.05, 0.1, 0.3, 0.5
    pre = rc.RiemannianPreconditioner(model, method=method, damping=DAMPING)
    names_all, params = zip(*[(n, p.detach().clone()) for n, p in model.named_parameters()])
    names = [n for n in names_all if not n.startswith("4.")]  # the head's group: no decay
    body = [model.get_parameter(n) for n in names]
    opt = torch.optim.SGD(
        [{"params": body, "weight_decay": wd}, {"params": model[4].parameters()}], lr=lr
    )
    loss = F.cross_entropy(model(x), y, reduction="sum")
    loss = loss + lam * sum(p.pow(2).sum() for p in model.parameters())
    if call == "backward":
        pre.backward(loss)
    else:
        loss.backward()
        pre.step()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()

    want, _ = oracle_of(problem, *problem.make(), method)  # G^{-1} g at the mean's metric
    direction = len(x) * want + oracle_of_vector(problem, method, 2 * lam * theta)
    assert direction.norm() > 2 * max_norm  # the clip acts
    direction = direction * max_norm / (direction.norm() + 1e-6)
    decay = flatten({n: wd * p * (n in names) for n, p in zip(names_all, params)}, model)
    got = flatten(dict(model.named_parameters()), model).detach()
    assert rel_error(got, theta - lr * (direction + decay)) < 1e-10


def oracle_of_vector(problem, method, v):
    """``v`` solved with the float64 oracle's metric of ``method`` (as :func:`oracle_of`)."""
    G, _, blocks = oracle_for(problem)
    if method == "kfac":
        model, x, y = problem.make()
        factors = kfac_factors(model, x, y, problem.loss_name)
        return solve_kfac_metric(factors, v, DAMPING, "exact", "joint")
    return oracle_direction(G, v, DAMPING, method, blocks)
