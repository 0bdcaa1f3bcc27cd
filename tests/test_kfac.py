"""K-FAC: exact for one sample, and each variant's documented damped metric.

The oracle builds ``Gamma = sum_{b,t} Jh_{b,t}^T H_b Jh_{b,t}`` from ``torch.func``
Jacobians of the network output with respect to each layer's output (the sum of the
pulled-back factor rows' outer products, without any factor) and
``A = mean_{b,t} xt xt^T``, forms the damped metric densely (``Gamma (x) A + mu I``, or
the factored ``(Gamma + pi sqrt(mu) I) (x) (A + sqrt(mu) / pi I)``; weight and bias in one
block or apart) and solves it with ``torch.linalg.solve``. The sampled variants use the
oracle's own one-sample Monte Carlo Fisher, drawn from the same seed.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracle import (
    Problem,
    ScaleShift,
    as_float64,
    conv_net,
    custom_net,
    flatten,
    gradient,
    grid,
    kfac_blocks,
    kfac_factors,
    kfac_factors_for,
    kfac_metric,
    loss_hessians,
    matrix_to_params,
    oracle_for,
    output_jacobian_wrt_layer,
    rel_error,
    sampled_hessians,
    solve_blocks,
    solve_kfac,
    solve_kfac_metric,
    unflatten,
)
from torch import nn

import riemann_core as rc
from riemann_core import kronecker
from riemann_core.direction import solve
from riemann_core.methods import Options
from riemann_core.methods import kfac as kfac_method

ONE_SAMPLE = [
    Problem(loss=p.loss, act=p.act, depth=p.depth, bias=p.bias, batch=1)
    for p in grid(act=("tanh", "relu"))
]
BATCH = grid(act=("tanh", "sigmoid"))


@pytest.mark.parametrize("damping", [1e-4, 1e-1, 10.0], ids=lambda d: f"damping={d:g}")
@pytest.mark.parametrize("problem", ONE_SAMPLE, ids=[p.id for p in ONE_SAMPLE])
def test_one_sample_kfac_is_exact_block(problem, damping):
    """``N = 1``: ``K_a^T K_a = Gamma (x) A`` exactly, so kfac == layerwise == oracle blocks."""
    G, g, blocks = oracle_for(problem)
    model, x, y = problem.make()
    kfac = flatten(
        rc.direction(model, x, y, loss=problem.loss_name, method="kfac", damping=damping), model
    )
    assert rel_error(kfac, solve_blocks(G, g, damping, blocks)) < 1e-10
    layerwise = flatten(
        rc.direction(model, x, y, loss=problem.loss_name, method="layerwise", damping=damping),
        model,
    )
    assert rel_error(kfac, layerwise) < 1e-10


@pytest.mark.parametrize("problem", ONE_SAMPLE[:4], ids=[p.id for p in ONE_SAMPLE[:4]])
def test_one_sample_kronecker_matrix_is_the_ggn_block(problem):
    """The oracle's own premise: for ``N = 1`` its ``Gamma (x) A`` is the GGN block."""
    G, _, blocks = oracle_for(problem)
    model, x, y = problem.make()
    for s, M in kfac_blocks(model, x, y, problem.loss_name):
        torch.testing.assert_close(M, G[s][:, s], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("damping", [1e-4, 1e-1, 10.0], ids=lambda d: f"damping={d:g}")
@pytest.mark.parametrize("problem", BATCH, ids=[p.id for p in BATCH])
def test_kfac_solves_damped_kronecker_product(problem, damping):
    """``direction = (Gamma (x) A + mu I)^{-1} g`` per block; ``mu`` is not split between
    the factors (no pi heuristic)."""
    model, x, y = problem.make()
    blocks = kfac_blocks(model, x, y, problem.loss_name)
    g = gradient(model, x, y, problem.loss_name)
    dirs = rc.direction(model, x, y, loss=problem.loss_name, method="kfac", damping=damping)
    assert rel_error(flatten(dirs, model), solve_kfac(blocks, g, damping)) < 1e-10


VARIANTS = [
    pytest.param(scheme, bias, id=f"kfac_damping={scheme}-kfac_bias={bias}")
    for scheme in ("exact", "factored")
    for bias in ("joint", "separate")
]
#: Batch 4 keeps every input factor and the sampled Gammas thin (fewer rows than columns);
#: batch 24 makes every factor dense.
SHAPES = [
    Problem(loss=loss, depth=3, width=8, batch=batch, bias=bias)
    for loss in ("ce", "mse")
    for batch in (4, 24)
    for bias in (True, False)
]


def shape_id(problem):
    return f"{problem.id}-batch={problem.batch}"


@pytest.mark.parametrize(("scheme", "bias"), VARIANTS)
@pytest.mark.parametrize("problem", SHAPES, ids=shape_id)
def test_kfac_variant_solves_its_damped_metric(problem, scheme, bias):
    model, x, y = problem.make()
    factors = kfac_factors_for(problem)
    g = gradient(model, x, y, problem.loss_name)
    for damping in (1e-4, 1.0):
        dirs = rc.direction(
            model, x, y, loss=problem.loss_name, method="kfac", damping=damping,
            kfac_damping=scheme, kfac_bias=bias,
        )  # fmt: skip
        expected = solve_kfac_metric(factors, g, damping, scheme, bias)
        assert rel_error(flatten(dirs, model), expected) < 1e-10, damping


@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("batch", [4, 24], ids=lambda b: f"batch={b}")  # thin and dense
def test_factors_of_one_order_are_eigendecomposed_in_one_call_where_batched(
    batch, bias, monkeypatch
):
    """Where the factors are batched (on a GPU, where each ``torch.linalg.eigh`` call
    waits for the host; forced here on the CPU), those of one order take one call, and
    each direction is still its damped metric's (a deep network of equal widths: one call
    per order, however deep)."""
    problem = Problem(depth=5, width=8, batch=batch)
    model, x, y = problem.make()
    factors = kfac_factors_for(problem)
    g = gradient(model, x, y, problem.loss_name)
    calls, eigh = [], torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(m.shape) or eigh(m))
    monkeypatch.setattr(kronecker, "batched", lambda device: True)
    dirs = rc.direction(model, x, y, method="kfac", damping=1e-3, kfac_bias=bias)
    assert (
        rel_error(flatten(dirs, model), solve_kfac_metric(factors, g, 1e-3, "exact", bias)) < 1e-10
    )
    assert sum(math.prod(s[:-2]) for s in calls) == 2 * problem.depth  # Gamma and A each
    assert len(calls) == len({s[-2:] for s in calls}) < 2 * problem.depth


@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("batch", [4, 24], ids=lambda b: f"batch={b}")  # thin and dense
def test_damped_factors_of_one_order_are_factorised_in_one_call(batch, bias, monkeypatch):
    """Factored damping factorises the damped factors of one order in one batched
    Cholesky (:func:`riemann_core.kronecker.shifted_together`; on every device: the CPU's
    factors are those of each alone, to the bit), and each direction is still its damped
    metric's (a deep network of equal widths: one call per order, however deep)."""
    problem = Problem(depth=5, width=8, batch=batch)
    model, x, y = problem.make()
    factors = kfac_factors_for(problem)
    g = gradient(model, x, y, problem.loss_name)
    calls, cholesky_ex = [], torch.linalg.cholesky_ex
    monkeypatch.setattr(
        torch.linalg, "cholesky_ex", lambda m, **k: calls.append(m.shape) or cholesky_ex(m, **k)
    )
    dirs = rc.direction(
        model, x, y, method="kfac", damping=1e-3, kfac_damping="factored", kfac_bias=bias
    )
    expected = solve_kfac_metric(factors, g, 1e-3, "factored", bias)
    assert rel_error(flatten(dirs, model), expected) < 1e-10
    assert sum(math.prod(s[:-2]) for s in calls) == 2 * problem.depth  # Gamma and A each
    assert len(calls) == len({s[-2:] for s in calls}) < 2 * problem.depth


@functools.cache
def sampled_factors_for(problem):
    model, x, y = problem.make()
    H = sampled_hessians(model(x), problem.loss_name, torch.Generator().manual_seed(7))
    return kfac_factors(model, x, y, problem.loss_name, hessians=H)


@pytest.mark.parametrize(("scheme", "bias"), VARIANTS)
@pytest.mark.parametrize("problem", SHAPES, ids=shape_id)
def test_sampled_kfac_is_the_one_sample_monte_carlo_fisher(problem, scheme, bias):
    """``output_metric="sampled"`` with one probe: ``Gamma`` from the per-sample loss
    gradient at a label drawn from the model (a target drawn around it for MSE)."""
    model, x, y = problem.make()
    factors = sampled_factors_for(problem)
    g = gradient(model, x, y, problem.loss_name)
    dirs = rc.direction(
        model, x, y, loss=problem.loss_name, method="kfac", damping=1e-2,
        output_metric="sampled", generator=torch.Generator().manual_seed(7),
        kfac_damping=scheme, kfac_bias=bias,
    )  # fmt: skip
    expected = solve_kfac_metric(factors, g, 1e-2, scheme, bias)
    assert rel_error(flatten(dirs, model), expected) < 1e-10


@pytest.mark.parametrize(("scheme", "bias"), VARIANTS)
@pytest.mark.parametrize("problem", SHAPES[:2] + SHAPES[4:6], ids=shape_id)
def test_kfac_variant_on_random_vectors(problem, scheme, bias):
    model, x, y = problem.make()
    factors = kfac_factors_for(problem)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    opts = Options(damping=1e-2, loss=problem.loss_name, kfac_damping=scheme, kfac_bias=bias)
    dirs, _ = solve(model, x, y, "kfac", opts, gradient=unflatten(v, model))
    assert (
        rel_error(flatten(dirs, model), solve_kfac_metric(factors, v, 1e-2, scheme, bias)) < 1e-10
    )


def test_conv_kfac_variants_solve_their_damped_metrics():
    model, x, y = conv_net()
    factors = kfac_factors(model, x, y, "cross_entropy")
    g = gradient(model, x, y, "cross_entropy")
    for scheme in ("exact", "factored"):
        for bias in ("joint", "separate"):
            dirs = rc.direction(
                model, x, y, method="kfac", damping=1e-2, kfac_damping=scheme, kfac_bias=bias
            )
            expected = solve_kfac_metric(factors, g, 1e-2, scheme, bias)
            assert rel_error(flatten(dirs, model), expected) < 1e-10, (scheme, bias)


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_factored_damping_of_a_zero_factor_is_its_limit(bias):
    """Zero inputs make the weight's ``A`` zero (``bias="separate"``), so ``pi -> inf``
    and ``(Gamma + pi sqrt(mu) I) (x) (sqrt(mu) / pi I) -> mu I``: the weight's
    direction is ``v / mu``, and the bias's block is ``Gamma + mu I``. With the bias's
    column, ``A`` is not zero."""
    model, _, y = Problem(depth=2).make()
    x = torch.zeros(4, 5, dtype=torch.float64)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    opts = Options(damping=1e-2, kfac_damping="factored", kfac_bias=bias)
    dirs, _ = solve(model, x, y, "kfac", opts, gradient=unflatten(v, model))
    factors = kfac_factors(model, x, y, "cross_entropy")
    if bias == "separate":
        given = unflatten(v, model)
        torch.testing.assert_close(dirs["0.weight"], given["0.weight"] / 1e-2, rtol=1e-12, atol=0)
        Gamma = factors[0][2]
        expected = torch.linalg.solve(
            Gamma + 1e-2 * torch.eye(4, dtype=torch.float64), given["0.bias"]
        )
        torch.testing.assert_close(dirs["0.bias"], expected, rtol=1e-10, atol=0)
    else:
        expected = solve_kfac_metric(factors, v, 1e-2, "factored", bias)
        assert rel_error(flatten(dirs, model), expected) < 1e-10


@pytest.mark.parametrize(("scheme", "bias"), VARIANTS)
def test_a_bias_with_its_weight_frozen_has_gamma_plus_mu(scheme, bias):
    """Bias-only fine-tuning: no input factor to split the damping with, so the bias's
    block is ``Gamma + mu I`` for every variant; the frozen weight gets no direction."""
    model, x, y = Problem(depth=2).make()
    model[0].weight.requires_grad_(False)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    opts = Options(damping=1e-2, kfac_damping=scheme, kfac_bias=bias)
    dirs, _ = solve(model, x, y, "kfac", opts, gradient=v)
    assert "0.weight" not in dirs
    Gamma = kfac_factors(model, x, y, "cross_entropy")[0][2]
    eye = torch.eye(Gamma.shape[0], dtype=torch.float64)
    expected = torch.linalg.solve(Gamma + 1e-2 * eye, v["0.bias"])
    torch.testing.assert_close(dirs["0.bias"], expected, rtol=1e-10, atol=0)


def test_kfac_differs_from_layerwise_for_several_samples():
    """For ``N > 1`` the Kronecker product is an approximation, not the block."""
    model, x, y = Problem(depth=2).make()
    kfac = rc.direction(model, x, y, method="kfac", damping=1e-2)
    layerwise = rc.direction(model, x, y, method="layerwise", damping=1e-2)
    assert rel_error(flatten(kfac, model), flatten(layerwise, model)) > 1e-2


@pytest.mark.parametrize("net", ["conv", "conv-stride2-nobias"], ids=lambda n: f"net={n}")
def test_conv_kfac_solves_damped_kronecker_product(net):
    """KFC for Conv2d: ``Gamma`` sums over output positions, ``A`` averages over patches."""
    kwargs = {} if net == "conv" else dict(bias=False, stride=2, padding=0)
    model, x, y = conv_net(**kwargs)
    blocks = kfac_blocks(model, x, y, "cross_entropy")
    g = gradient(model, x, y, "cross_entropy")
    dirs = rc.direction(model, x, y, method="kfac", damping=1e-2)
    assert rel_error(flatten(dirs, model), solve_kfac(blocks, g, 1e-2)) < 1e-10


@pytest.mark.parametrize(
    "problem", [Problem(depth=3), Problem(loss="mse", bias=False)], ids=lambda p: p.id
)
def test_kfac_on_random_vectors(problem):
    model, x, y = problem.make()
    blocks = kfac_blocks(model, x, y, problem.loss_name)
    torch.manual_seed(3)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    opts = Options(damping=1e-2, loss=problem.loss_name)
    dirs, _ = solve(model, x, y, "kfac", opts, gradient=unflatten(v, model))
    assert rel_error(flatten(dirs, model), solve_kfac(blocks, v, 1e-2)) < 1e-10


@pytest.mark.parametrize("kernel", ["structured", "generic", "auto"], ids=lambda k: f"kernel={k}")
def test_kfac_rejects_module_without_kronecker_structure(kernel):
    """With the structured kernel the refusal named only other kernels, which K-FAC refuses
    too (found by review): every kernel's names the method that handles the module."""
    model, x, y = custom_net()
    assert isinstance(model[1], ScaleShift)
    with pytest.raises(ValueError, match=r"module '1' \(ScaleShift\).*[Uu]se method='layerwise'"):
        rc.direction(model, x, y, method="kfac", kernel=kernel)


def test_kfac_rejects_grouped_conv():
    model, x, y = conv_net(groups=2)
    with pytest.raises(ValueError, match=r"module '0' \(Conv2d: groups=2"):
        rc.direction(model, x, y, method="kfac", kernel="auto")


@pytest.mark.parametrize("network", ["layer norm", "tied"])
def test_pre_backward_refuses_what_kfac_cannot_factorise_before_its_backward_pass(network):
    """Found by a hunt: a LayerNorm was refused once pre.backward's backward pass had
    consumed the user's graph. Refused before it now (a weight tied between two calls too):
    the loss can still be differentiated, ``.grad`` stays ``None``."""
    torch.manual_seed(0)
    if network == "layer norm":
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))
        message = r"module '1' \(LayerNorm\)"
    else:
        layer = nn.Linear(3, 3)
        model = nn.Sequential(layer, nn.Tanh(), layer)
        message = "whose parameters several module calls share"
    model = model.double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    pre = rc.RiemannianPreconditioner(model, method="kfac", kernel="auto")
    loss = F.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match=message):
        pre.backward(loss)
    assert all(p.grad is None for p in model.parameters())
    loss.backward()  # the graph is whole


def test_kfac_with_generic_kernel_uses_layer_structure():
    """``kernel="generic"`` still gives K-FAC for Linear layers (it needs the structure)."""
    model, x, y = Problem(depth=2).make()
    generic = rc.direction(model, x, y, method="kfac", kernel="generic", damping=1e-2)
    structured = rc.direction(model, x, y, method="kfac", damping=1e-2)
    assert rel_error(flatten(generic, model), flatten(structured, model)) < 1e-12


def test_kfac_sequence_linear_matches_oracle_definition():
    """A Linear over positions: ``Gamma`` sums over positions, ``A`` averages over them."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)).double()
    x, y = torch.randn(3, 2, 4, dtype=torch.float64), torch.tensor([1, 0, 2])
    # the oracle's patches for a Linear assume (N, f) inputs: unfold positions by hand
    dirs = rc.direction(model, x, y, method="kfac", damping=1e-2)
    g = gradient(model, x, y, "cross_entropy")
    m64, x64, y64 = as_float64(model, x, y)
    H = loss_hessians(m64(x64), y64, "cross_entropy")
    Jh = output_jacobian_wrt_layer(m64, 0, x64)  # (N, C, T, f_out)
    Gamma = torch.einsum("bcto,bcd,bdtp->op", Jh, H, Jh).contiguous()  # for torch.kron
    X = torch.cat([x64, torch.ones_like(x64[..., :1])], dim=-1).flatten(0, 1)
    A = X.T @ X / X.shape[0]
    P = matrix_to_params(model[0])
    M = P @ torch.kron(Gamma, A) @ P.T
    n0 = sum(p.numel() for p in model[0].parameters())
    expected = torch.linalg.solve(M + 1e-2 * torch.eye(n0, dtype=torch.float64), g[:n0])
    assert rel_error(flatten(dirs, model)[:n0], expected) < 1e-10


@pytest.mark.parametrize("name", ["kfac_denormal_gamma", "kfac_denormal_gamma_nan"])
def test_eigh_of_a_saturated_layer_factor(name):
    # Gammas of the hidden layer of a digits MLP whose tanh units saturated (riemann-bench
    # train, lr=1): float32 with denormal entries, on which float32 LAPACK (torch 2.13.0,
    # MKL) failed to converge or silently returned NaN. K-FAC must still decompose them.
    from pathlib import Path

    from riemann_core.kronecker import eigh

    gamma = torch.load(Path(__file__).parent / "data" / f"{name}.pt")
    check_eigendecomposition(gamma, *eigh(gamma, "Gamma"))


@pytest.mark.parametrize("failure", ["raises", "returns NaN"])
def test_eigh_falls_back_to_float64_when_float32_lapack_fails(failure, monkeypatch):
    from riemann_core import kronecker

    real = torch.linalg.eigh
    calls = []

    def flaky(matrix):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            if failure == "raises":
                raise torch.linalg.LinAlgError("did not converge")
            values, vectors = real(matrix)
            return values * float("nan"), vectors
        return real(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    a = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    gamma = a @ a.T
    values, vectors = kronecker.eigh(gamma, "Gamma")
    assert calls == [torch.float32, torch.float64]
    check_eigendecomposition(gamma, values, vectors)


def test_eigh_failing_in_float64_too_is_a_solve_error(monkeypatch):
    from riemann_core import kronecker

    def broken(matrix):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(rc.SolveError, match="eigendecomposition of the Gamma failed"):
        kronecker.eigh(torch.eye(3), "Gamma")


def check_eigendecomposition(matrix, values, vectors):
    assert values.dtype == vectors.dtype == matrix.dtype
    m = matrix.double()
    scale = m.abs().max()
    assert torch.allclose(values.double(), torch.linalg.eigvalsh(m), atol=1e-6 * scale)
    q = vectors.double()
    assert torch.allclose(q.T @ q, torch.eye(len(m), dtype=torch.float64), atol=1e-5)
    assert ((q * values.double()) @ q.T - m).abs().max() <= 1e-6 * scale


@pytest.mark.parametrize("kernel", ["structured", "generic"], ids=lambda k: f"kernel={k}")
def test_float64_solve_of_a_float32_model(kernel):
    """``solve_dtype=torch.float64`` forms the factors in float64 on either kernel: the
    same direction as the float64 K-FAC oracle of the float32 weights, to float32 data
    accuracy."""
    problem = Problem(depth=3)
    model, x, y = problem.make(torch.float32)
    dirs = rc.direction(
        model, x, y, method="kfac", kernel=kernel, damping=1e-2, solve_dtype=torch.float64
    )
    assert all(d.dtype == torch.float32 for d in dirs.values())
    g = oracle_for(problem, torch.float32)[1]
    expected = solve_kfac(kfac_blocks(model, x, y, "cross_entropy"), g, 1e-2)
    assert rel_error(flatten(dirs, model), expected) < 1e-5


@pytest.mark.parametrize(("scheme", "bias"), VARIANTS)
def test_kfac_variant_diagnostics(scheme, bias):
    """One entry per module, with the residual of its own damped metric and the largest
    condition number among its Kronecker blocks (the module, or its weight and bias
    apart), as the oracle's damped metrics have them."""
    problem = SHAPES[0]
    model, x, y = problem.make()
    _, diagnostics = rc.direction(
        model, x, y, method="kfac", damping=1e-2, kfac_damping=scheme, kfac_bias=bias,
        return_diagnostics=True,
    )  # fmt: skip
    assert [d.name for d in diagnostics] == ["0", "2", "4"]
    solver = "kronecker" if scheme == "exact" else "kronecker-factored"
    assert {d.solver for d in diagnostics} == {solver}
    assert all(d.residual < 1e-12 for d in diagnostics)
    for d, (_, module, Gamma, A) in zip(diagnostics, kfac_factors_for(problem), strict=True):
        M = kfac_metric(module, Gamma, A, 1e-2, scheme, bias)
        n_weight = module.weight.numel()
        parts = [M] if bias == "joint" else [M[:n_weight, :n_weight], M[n_weight:, n_weight:]]
        expected = max(float(torch.linalg.cond(P)) for P in parts)
        assert d.condition == pytest.approx(expected, rel=1e-6)
        assert d.params == sum(p.numel() for p in module.parameters())


def test_direction_checks_kfac_options():
    model, x, y = Problem().make()
    with pytest.raises(ValueError, match=r"unknown kfac_damping 'eigen'; choose one of"):
        rc.direction(model, x, y, method="kfac", kfac_damping="eigen")
    with pytest.raises(ValueError, match=r"kfac_bias='separate' is an option of method='kfac'"):
        rc.direction(model, x, y, method="natural", kfac_bias="separate")


@pytest.mark.parametrize(("scheme", "bias"), VARIANTS)
def test_overflowing_factors_are_a_solve_error(scheme, bias):
    """A factor whose entries overflow is refused, never damped into a finite direction."""
    model, x, y = Problem(depth=2).make()

    def huge(outputs, targets):
        return torch.full((outputs.shape[0], 1, outputs.shape[1]), 1e300, dtype=outputs.dtype)

    with pytest.raises(rc.SolveError, match="NaN or inf"):
        rc.direction(
            model, x, y, method="kfac", output_metric=huge, kfac_damping=scheme, kfac_bias=bias
        )


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_a_failed_float32_eigendecomposition_takes_the_slow_path(bias, monkeypatch):
    """float32 LAPACK failing inside a call (as on saturated layers): the deferred
    decomposition flags it, the module is decomposed again in float64, and the direction
    is the one a working LAPACK gives."""
    model, x, y = Problem(depth=3, width=8).make(torch.float32)
    kw = dict(method="kfac", damping=1e-2, kfac_bias=bias)
    expected = rc.direction(model, x, y, **kw)
    real = torch.linalg.eigh

    def flaky(matrix):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    got = rc.direction(model, x, y, **kw)
    assert rel_error(flatten(got, model), flatten(expected, model)) < 1e-5


@pytest.mark.parametrize("kernel", ["structured", "auto"])
def test_kfac_on_a_convolution_it_cannot_factorise_names_what_it_takes(kernel):
    """Found by a hunt: the structured kernel's refusal sent K-FAC users to kernel='auto',
    which K-FAC refused again."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(48, 3))
    x, y = torch.randn(4, 2, 4, 4), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError) as err:
        rc.direction(model, x, y, method="kfac", kernel=kernel)
    message = str(err.value)
    assert "(groups=1, zero padding)" in message
    assert kernel == "auto" or "with method='kfac' no kernel helps" in message


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own
@pytest.mark.parametrize("scheme,bias", VARIANTS)
def test_kfac_of_same_padding_is_that_of_the_padded_input(scheme, bias):
    """``padding='same'`` with an even kernel pads one more zero after than before: KFC's
    patches are those of a convolution without padding on the input padded so."""
    torch.manual_seed(0)
    same = nn.Sequential(
        nn.Conv2d(2, 3, (2, 3), padding="same"), nn.Tanh(), nn.Flatten(), nn.Linear(60, 3)
    ).double()
    padded = nn.Sequential(nn.ZeroPad2d((1, 1, 0, 1)), nn.Conv2d(2, 3, (2, 3)).double(), *same[1:])
    padded[1].load_state_dict(same[0].state_dict())
    x, y = torch.randn(4, 2, 4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    torch.testing.assert_close(same(x), padded(x), rtol=0, atol=0)
    kw = dict(method="kfac", damping=1e-2, kfac_damping=scheme, kfac_bias=bias)
    got, expected = rc.direction(same, x, y, **kw), rc.direction(padded, x, y, **kw)
    for (name, a), b in zip(got.items(), expected.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=name)


def test_the_exact_damping_s_condition_of_a_singular_float32_factor_is_not_rounded_up():
    """Found by a hunt: cross-entropy's Gamma is singular, and float32's eigh read its zero
    eigenvalue as ~3.7e-8, so at damping 1e-10 the reported condition was 370x low (the
    figure behind the accuracy warning). Only the last bias trains: its block is Gamma's."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    model[0].requires_grad_(False)
    model[2].weight.requires_grad_(False)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    gamma = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    damping = 1e-10
    eigenvalues = torch.linalg.eigvalsh(gamma)
    true = float((eigenvalues[-1] + damping) / (eigenvalues[0].clamp_min(0) + damping))
    for m, xx in ((model, x), (copy.deepcopy(model).float(), x.float())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rc.AccuracyWarning)
            _, diags = rc.direction(
                m, xx, y, method="kfac", damping=damping, return_diagnostics=True
            )
        assert diags[0].condition == pytest.approx(true, rel=0.05)


def test_the_exact_damping_s_condition_of_a_wide_float32_layer_is_not_read_high():
    """Found by review: taking each smallest eigenvalue at the low end of ``n eps`` times
    the largest read a float32 layer of 512 inputs spread over 1e2 in scale 300x
    ill-conditioned (5.4e6 against 1.7e4), with a false accuracy warning."""
    torch.manual_seed(0)
    model = nn.Linear(512, 4)
    x = torch.randn(2048, 512) * torch.logspace(0, 2, 512)
    y = torch.randn(2048, 4)
    conditions = []
    for dtype in (torch.float32, torch.float64):
        with warnings.catch_warnings():
            warnings.simplefilter("error", rc.AccuracyWarning)  # none here: eps cond ~ 2e-3
            _, diags = rc.direction(
                copy.deepcopy(model).to(dtype), x.to(dtype), y.to(dtype), loss="mse",
                method="kfac", damping=1e-3, return_diagnostics=True,
            )  # fmt: skip
        conditions.append(diags[0].condition)
    assert conditions[0] == pytest.approx(conditions[1], rel=0.1)


@pytest.mark.parametrize(("scheme", "bias"), VARIANTS)
def test_thin_factors_of_large_inputs_at_a_matching_damping(scheme, bias):
    """A float32 layer on inputs of 1e11 at damping 1e19 (``cond(G)`` ~ 1e3, the same
    problem as at scale 1): the thin factors' correction is divided by ``g a^T + mu`` and
    by ``mu`` in turn, whose product (1e41) overflows float32 (found by a hunt: the
    correction read zero and the direction ``g / mu``, 24x off without a word)."""
    problem = Problem(loss="mse", act="relu")  # batch 4 under 6 and 5 patch columns: thin
    model, x, y = problem.make(torch.float32)
    x, y, damping = x * 1e11, y * 1e11, 1e19
    dirs = rc.direction(
        model, x, y, loss="mse", method="kfac", damping=damping,
        kfac_damping=scheme, kfac_bias=bias,
    )  # fmt: skip
    factors = kfac_factors(model, x, y, "mse")
    expected = solve_kfac_metric(factors, gradient(model, x, y, "mse"), damping, scheme, bias)
    assert rel_error(flatten(dirs, model), expected) < 1e-3


def test_a_residual_read_for_the_diagnostics_alone_is_held_to_the_bound(monkeypatch):
    """A Kronecker solve of a well-conditioned metric reads no residual (``eps cond(G)``
    proves it), except for the diagnostics; one read there is held to the bound as any
    other (found by a hunt: the overflowed thin algebra above reported a residual of 9.6e2
    at ``cond(G)`` ~ 1e3, and the direction came back without a word). Here the solve is
    made to return ``g / mu``, the direction that overflow left (refinement, which
    solves with it too, cannot repair it)."""
    model, x, y = Problem(loss="mse", act="relu").make(torch.float32)
    monkeypatch.setattr(kfac_method, "exact_solve", lambda V, G, A, damping: V / damping)
    rc.direction(model, x, y, loss="mse", method="kfac", damping=1e-3)  # no residual read
    with pytest.raises(rc.SolveError, match=r"block '0' did not solve: relative residual"):
        rc.direction(model, x, y, loss="mse", method="kfac", damping=1e-3, return_diagnostics=True)
