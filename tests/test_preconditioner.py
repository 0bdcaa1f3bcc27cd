"""``RiemannianPreconditioner`` beside a torch optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import Problem, assert_unchanged, mlp, snapshot

import riemann_core as rc
from riemann_core.direction import solve
from riemann_core.methods import SOLVERS

FACTOR_METHODS = ("layerwise", "full", "natural", "kfac")


def loss_fn(loss):
    return F.cross_entropy if loss == "cross_entropy" else F.mse_loss


@pytest.mark.parametrize("method", rc.METHODS, ids=lambda m: f"method={m}")
@pytest.mark.parametrize("problem", [Problem(depth=3), Problem(loss="mse")], ids=lambda p: p.id)
def test_step_replaces_grad_with_direction(problem, method):
    """After ``loss.backward()``, ``pre.step()`` leaves exactly ``rc.direction`` in ``.grad``."""
    model, x, y = problem.make()
    kw = dict(method=method, damping=1e-2, loss=problem.loss_name)
    expected = rc.direction(model, x, y, **kw)
    pre = rc.RiemannianPreconditioner(model, **kw)
    loss_fn(problem.loss_name)(model(x), y).backward()
    params = snapshot(model)["params"]
    pre.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-12, atol=1e-14)
        assert torch.equal(p.detach(), params[name])  # step changes .grad only


@pytest.mark.parametrize("method", FACTOR_METHODS, ids=lambda m: f"method={m}")
def test_step_is_linear_in_the_gradient(method):
    """The metric does not depend on ``.grad``: scaling the loss scales the direction."""
    model, x, y = Problem().make()
    pre = rc.RiemannianPreconditioner(model, method=method, damping=1e-2)
    (3.0 * F.cross_entropy(model(x), y)).backward()
    pre.step()
    expected = rc.direction(model, x, y, method=method, damping=1e-2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 3.0 * expected[name], rtol=1e-10, atol=1e-12)


def test_step_uses_the_last_forward_batch():
    model, x, y = Problem().make()
    x2, y2 = torch.randn_like(x), torch.tensor([2, 2, 0, 1])
    pre = rc.RiemannianPreconditioner(model, damping=1e-2)
    model(x)
    F.cross_entropy(model(x2), y2).backward()
    pre.step()
    expected = rc.direction(model, x2, y2, damping=1e-2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-12, atol=1e-14)


def test_preconditioned_sgd_lowers_loss_faster_than_sgd():
    """Same model, batch and learning rate: 20 steps of SGD with and without the metric.

    With ``damping=0.1`` and ``lr=0.3`` the preconditioned runs end near 0.07 - 0.11,
    plain SGD at 0.92 (a damping of 1 dwarfs this GGN and gives back plain SGD).
    """

    def train(method):
        torch.manual_seed(0)
        model = mlp(8, 16, 3, depth=3, act="tanh")
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        pre = rc.RiemannianPreconditioner(model, method=method, damping=0.1) if method else None
        with torch.no_grad():
            start = float(F.cross_entropy(model(x), y))
        for _ in range(20):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if pre is not None:
                pre.step()
            opt.step()
        with torch.no_grad():
            return start, float(F.cross_entropy(model(x), y))

    start, sgd = train(None)
    assert sgd < start
    for method in ("layerwise", "natural", "kfac"):
        _, preconditioned = train(method)
        assert preconditioned < 0.5 * sgd, method


def test_step_before_forward_raises():
    model, _, _ = Problem().make()
    pre = rc.RiemannianPreconditioner(model)
    with pytest.raises(RuntimeError, match=r"needs the batch of a forward pass"):
        pre.step()


def test_parameter_without_grad_counts_as_zero_and_stays_none():
    """Like torch.optim: a parameter without .grad took no part; it stays None and enters
    the solve as a zero vector."""
    model, x, y = Problem(depth=3).make()
    pre = rc.RiemannianPreconditioner(model)
    F.cross_entropy(model(x), y).backward()
    model[2].bias.grad = None
    gradient = {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
        for n, p in model.named_parameters()
    }
    expected, _ = solve(model, x, None, "layerwise", pre.options, gradient=gradient)
    pre.step()
    assert model[2].bias.grad is None
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, expected[n])


def test_step_without_any_grad_raises():
    model, x, y = Problem().make()
    pre = rc.RiemannianPreconditioner(model)
    model(x)
    with pytest.raises(RuntimeError, match="no parameter has a .grad"):
        pre.step()


def test_step_checks_the_outputs_like_direction():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1)).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    pre = rc.RiemannianPreconditioner(model)
    model(x).sum().backward()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"needs outputs of shape \(N, C\)"):
        pre.step()
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_grad_raises_and_leaves_grads(bad):
    model, x, y = Problem().make()
    pre = rc.RiemannianPreconditioner(model)
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[1, 1] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"the .grad of '0.weight' contains 1 NaN or inf"):
        pre.step()
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", FACTOR_METHODS, ids=lambda m: f"method={m}")
def test_solver_failure_leaves_grads(method, monkeypatch):
    """If the solve fails, no ``.grad`` has changed (directions exist before any copy)."""

    def failing(problem, opts):
        raise rc.SolveError("injected failure")

    monkeypatch.setattr(SOLVERS[method], "solve", failing)
    model, x, y = Problem().make()
    pre = rc.RiemannianPreconditioner(model, method=method)
    F.cross_entropy(model(x), y).backward()
    before = snapshot(model)
    with pytest.raises(rc.SolveError, match="injected failure"):
        pre.step()
    assert_unchanged(model, before)


def test_overflowing_metric_leaves_grads():
    """A custom factor whose Gram overflows: SolveError, every ``.grad`` intact."""
    model, x, y = Problem().make()

    def huge(outputs, targets):
        return torch.full((outputs.shape[0], 1, outputs.shape[1]), 1e300, dtype=outputs.dtype)

    pre = rc.RiemannianPreconditioner(model, output_metric=huge, method="full")
    F.cross_entropy(model(x), y).backward()
    before = snapshot(model)
    with pytest.raises(rc.SolveError, match="contains NaN or inf"):
        pre.step()
    assert_unchanged(model, before)


def test_custom_output_metric_receives_no_targets():
    model, x, y = Problem().make()
    seen = []

    def factor(outputs, targets):
        seen.append(targets)
        p = torch.softmax(outputs, dim=1)
        return torch.diag_embed(p.sqrt()) - p.sqrt()[:, :, None] * p[:, None, :]

    pre = rc.RiemannianPreconditioner(model, output_metric=factor, damping=1e-2)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert seen == [None]
    expected = rc.direction(model, x, y, damping=1e-2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12)


def hook_counts(model):
    """The forward (pre-)hooks registered on every module of ``model``."""
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


def test_remove_detaches_the_hooks():
    model, x, y = Problem().make()
    hooks = hook_counts(model)
    pre = rc.RiemannianPreconditioner(model, damping=1e-2)
    assert hook_counts(model) != hooks
    F.cross_entropy(model(x), y).backward()
    pre.remove()
    assert hook_counts(model) == hooks
    model(torch.randn_like(x))  # no longer recorded: the step still uses x
    pre.step()
    expected = rc.direction(model, x, y, damping=1e-2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-12, atol=1e-14)


def test_context_manager_removes_the_hooks():
    model, x, y = Problem().make()
    hooks = hook_counts(model)
    with rc.RiemannianPreconditioner(model) as pre:
        pre.backward(F.cross_entropy(model(x), y))
        F.cross_entropy(model(x), y).backward()
        pre.step()
    assert hook_counts(model) == hooks


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_step_keeps_training_flag(training):
    model, x, y = Problem().make()
    model.train(training)
    pre = rc.RiemannianPreconditioner(model)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert all(m.training is training for m in model.modules())


def test_diagnostics_are_kept_per_step():
    model, x, y = Problem(depth=3).make()
    pre = rc.RiemannianPreconditioner(model, diagnostics=True, damping=1e-2)
    assert pre.diagnostics == []
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert [d.name for d in pre.diagnostics] == ["0", "2", "4"]
    assert all(d.residual < 1e-8 for d in pre.diagnostics)


@pytest.mark.parametrize("change", ["optimizer-step", "input"])
def test_step_refuses_what_changed_since_the_forward_pass(change):
    """The metric would be that of other parameters, or of another batch, than the
    gradient's: refused, ``.grad`` untouched."""
    model, x, y = Problem().make()
    pre = rc.RiemannianPreconditioner(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    if change == "optimizer-step":
        opt.step()
    else:
        x.add_(1.0)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="changed in place after the forward pass"):
        pre.step()
    assert_unchanged(model, before)
