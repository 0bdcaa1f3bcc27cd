"""Output-metric factors: exact, sampled (in expectation) and user-supplied."""

from __future__ import annotations

import math

import pytest
import torch
from oracle import Problem, flatten, loss_hessians, oracle_direction, oracle_for, rel_error

import riemann_core as rc
from riemann_core import factors

N, C = 3, 4


def logits_and_targets(seed=0):
    torch.manual_seed(seed)
    return 2 * torch.randn(N, C, dtype=torch.float64), torch.tensor([0, 3, 1])


def gram(F):
    """Per-sample ``F_b^T F_b``, ``(N, C, C)``."""
    return F.mT @ F


# ------------------------------------------------------------------------ exact


def test_cross_entropy_factor_gram_is_loss_hessian():
    z, y = logits_and_targets()
    F = factors.cross_entropy_factor(z)
    assert F.shape == (N, C, C)
    torch.testing.assert_close(gram(F), N * loss_hessians(z, y, "cross_entropy"))


def test_mse_factor_gram_is_loss_hessian():
    z = torch.randn(N, C, dtype=torch.float64)
    y = torch.randn(N, C, dtype=torch.float64)
    F = factors.mse_factor(z)
    assert F.shape == (N, C, C)
    torch.testing.assert_close(gram(F), N * loss_hessians(z, y, "mse"))


# ---------------------------------------------------------------------- sampled
# Entries of (e_y - p)(e_y - p)^T lie in [-1, 1] (std <= 1), so the mean of n draws is
# within 5 / sqrt(n) of its expectation except with negligible probability; eps eps^T
# entries have std <= sqrt(2). The seeds are fixed, so the tests are deterministic.


def sampled_gram_mean(loss, draws, samples, seed):
    z, _ = logits_and_targets()
    gen = torch.Generator().manual_seed(seed)
    sample = factors.sampled_cross_entropy_factor if loss == "ce" else factors.sampled_mse_factor
    total = torch.zeros(N, C, C, dtype=torch.float64)
    for _ in range(draws):
        F = sample(z, samples, gen)
        assert F.shape == (N, samples, C)
        total += gram(F)
    return z, total / draws


def exact_gram(loss, z):
    F = factors.cross_entropy_factor(z) if loss == "ce" else factors.mse_factor(z)
    return gram(F)


def bound(loss, n):
    return 5 / math.sqrt(n) * (1.0 if loss == "ce" else math.sqrt(2) * 2 / C)


@pytest.mark.parametrize("loss", ["ce", "mse"], ids=lambda s: f"loss={s}")
def test_sampled_factor_is_unbiased(loss):
    draws, samples = 200, 20
    z, mean = sampled_gram_mean(loss, draws, samples, seed=1)
    exact = exact_gram(loss, z)
    assert (mean - exact).abs().max() < bound(loss, draws * samples)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "mse"], ids=lambda s: f"loss={s}")
def test_sampled_factor_is_unbiased_large_sample(loss):
    draws, samples = 1000, 10_000
    z, mean = sampled_gram_mean(loss, draws, samples, seed=2)
    exact = exact_gram(loss, z)
    assert (mean - exact).abs().max() < bound(loss, draws * samples)


def test_single_draw_is_not_exact():
    """Guards the two tests above against a 'sampled' path that returns the exact factor."""
    z, mean = sampled_gram_mean("ce", draws=1, samples=1, seed=0)
    assert (mean - exact_gram("ce", z)).abs().max() > 1e-3


SAMPLED_PROBLEMS = [Problem(), Problem(loss="mse"), Problem(depth=1, bias=False)]


@pytest.mark.parametrize("problem", SAMPLED_PROBLEMS, ids=lambda p: p.id)
def test_sampled_direction_approaches_exact(problem):
    """``samples=2000`` Monte Carlo probes per sample: ``method="full"`` keeps the cost
    at ``n x n`` (``d = 8000`` rows). The relative error scales like ``1 / sqrt(S)``
    (observed 0.01 - 0.045 at ``damping=0.1``; ~0.3 at ``samples=20``)."""
    model, x, y = problem.make()
    G, g, blocks = oracle_for(problem)
    dirs = rc.direction(
        model,
        x,
        y,
        loss=problem.loss_name,
        method="full",
        damping=0.1,
        output_metric="sampled",
        samples=2000,
        generator=torch.Generator().manual_seed(0),
    )
    assert rel_error(flatten(dirs, model), oracle_direction(G, g, 0.1, "full", blocks)) < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("problem", SAMPLED_PROBLEMS, ids=lambda p: p.id)
def test_sampled_direction_approaches_exact_large_sample(problem):
    model, x, y = problem.make()
    G, g, blocks = oracle_for(problem)
    dirs = rc.direction(
        model,
        x,
        y,
        loss=problem.loss_name,
        method="full",
        damping=0.1,
        output_metric="sampled",
        samples=100_000,
        generator=torch.Generator().manual_seed(0),
    )
    assert rel_error(flatten(dirs, model), oracle_direction(G, g, 0.1, "full", blocks)) < 0.015


def test_sampled_direction_follows_the_generator():
    model, x, y = Problem().make()

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return flatten(
            rc.direction(
                model, x, y, output_metric="sampled", samples=3, damping=1e-2, generator=gen
            ),
            model,
        )

    assert torch.equal(run(5), run(5))
    assert rel_error(run(5), run(6)) > 1e-3


# ---------------------------------------------------------------------- custom


def symmetric_sqrt_factor(outputs, targets):
    """Another exact factor: ``M^{1/2}`` (symmetric) of ``M = diag(p) - p p^T``."""
    p = torch.softmax(outputs, dim=1)
    M = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    lam, Q = torch.linalg.eigh(M)
    return (Q * lam.clamp_min(0).sqrt()[:, None, :]) @ Q.mT


@pytest.mark.parametrize(
    "method", ["layerwise", "full", "natural", "kfac"], ids=lambda m: f"method={m}"
)
def test_custom_exact_factor_gives_exact_direction(method):
    model, x, y = Problem(depth=3).make()
    seen = []

    def factor(outputs, targets):
        seen.append(targets)
        return symmetric_sqrt_factor(outputs, targets)

    custom = rc.direction(model, x, y, method=method, damping=1e-3, output_metric=factor)
    exact = rc.direction(model, x, y, method=method, damping=1e-3)
    assert torch.equal(seen[0], y)
    # kfac's Gamma = sum delta delta^T is factor-invariant too (a sum of row outer products)
    assert rel_error(flatten(custom, model), flatten(exact, model)) < 1e-10


def test_custom_factor_with_more_rows():
    """``r`` need not equal ``C``: zero rows appended change nothing."""
    model, x, y = Problem().make()

    def padded(outputs, targets):
        F = symmetric_sqrt_factor(outputs, targets)
        return torch.cat([F, torch.zeros_like(F[:, :2])], dim=1)

    dirs, diags = rc.direction(
        model, x, y, damping=1e-3, output_metric=padded, return_diagnostics=True
    )
    exact = rc.direction(model, x, y, damping=1e-3)
    assert rel_error(flatten(dirs, model), flatten(exact, model)) < 1e-10
    # r = 5 rows per sample; layerwise keeps min(r, m_out) = 4 (hidden), 3 (output)
    assert [row.rows for row in diags] == [x.shape[0] * 4, x.shape[0] * 3]


@pytest.mark.parametrize(
    "bad",
    [
        lambda out: torch.zeros(out.shape[0], out.shape[1], dtype=out.dtype),
        lambda out: torch.zeros(out.shape[0], 2, out.shape[1] + 1, dtype=out.dtype),
        lambda out: torch.zeros(out.shape[0] + 1, 2, out.shape[1], dtype=out.dtype),
        lambda out: "not a tensor",
    ],
    ids=["2d", "wrong-C", "wrong-N", "not-a-tensor"],
)
def test_custom_factor_of_wrong_shape_raises(bad):
    model, x, y = Problem().make()
    with pytest.raises(ValueError, match=r"shape \(N, r, C\)"):
        rc.direction(model, x, y, output_metric=lambda out, tgt: bad(out))


def test_custom_factor_with_nan_raises():
    model, x, y = Problem().make()

    def nan_factor(out, tgt):
        F = symmetric_sqrt_factor(out, tgt)
        F[0, 0, 0] = float("nan")
        return F

    with pytest.raises(ValueError, match="NaN or inf"):
        rc.direction(model, x, y, output_metric=nan_factor)
