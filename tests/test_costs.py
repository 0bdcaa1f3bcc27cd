"""costs.py against FLOPs counted by FlopCounterMode (extended with linear algebra)."""

import pytest
import torch
from torch import nn

import riemann_core as rc
from riemann_core import costs
from riemann_core.measure.flops import flop_counter

# (6, 2, 3): n_a <= d, layerwise factorises G_a; (40, 3, 8): 3 < r rows kept per sample
SHAPES = [
    ((20, 30, 16, 5), 8, True),
    ((7, 9, 4), 5, False),
    ((12, 6), 3, True),
    ((6, 2, 3), 10, True),
    ((40, 3, 8), 12, True),
]


def mlp(widths, bias):
    layers = []
    for f_in, f_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(f_in, f_out, bias=bias), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


@pytest.mark.parametrize("kernel", ["structured", "generic"])
@pytest.mark.parametrize("method", rc.METHODS)
@pytest.mark.parametrize(
    "widths,N,bias", SHAPES, ids=[f"widths={'-'.join(map(str, w))}-N={n}" for w, n, _ in SHAPES]
)
@pytest.mark.parametrize("output_metric", ["exact", "sampled"])
def test_counted_flops_match_the_model(widths, N, bias, method, kernel, output_metric):
    """The steady state of a call: the first call for a model also runs the coupling probe,
    and ``damping=1e-2`` keeps every solve well conditioned (no float64 residual check,
    a slow path the model leaves out)."""
    torch.manual_seed(0)
    model = mlp(widths, bias)
    x, y = torch.randn(N, widths[0]), torch.randint(0, widths[-1], (N,))
    samples = 3
    kw = dict(method=method, kernel=kernel, output_metric=output_metric, samples=samples)
    rc.direction(model, x, y, damping=1e-2, **kw)
    with flop_counter() as counter:
        rc.direction(model, x, y, damping=1e-2, **kw)
    rows = widths[-1] if output_metric == "exact" else samples
    modelled = costs.flops(method, costs.MLPShape(widths, N, rows, bias), kernel)["total"]
    assert counter.get_total_flops() == pytest.approx(modelled, rel=1e-2, abs=2)


@pytest.mark.parametrize("kfac_bias", ["joint", "separate"])
@pytest.mark.parametrize("kfac_damping", ["exact", "factored"])
@pytest.mark.parametrize(
    "widths,N,bias", SHAPES, ids=[f"widths={'-'.join(map(str, w))}-N={n}" for w, n, _ in SHAPES]
)
@pytest.mark.parametrize("output_metric", ["exact", "sampled"])
def test_counted_kfac_flops_match_the_model(
    widths, N, bias, output_metric, kfac_damping, kfac_bias
):
    """Every K-FAC variant, with thin and dense factors (``N`` and ``d`` against widths),
    in the steady state (see above)."""
    torch.manual_seed(0)
    model = mlp(widths, bias)
    x, y = torch.randn(N, widths[0]), torch.randint(0, widths[-1], (N,))
    kw = dict(method="kfac", output_metric=output_metric, damping=1e-2)
    kw.update(kfac_damping=kfac_damping, kfac_bias=kfac_bias)
    rc.direction(model, x, y, **kw)
    with flop_counter() as counter:
        rc.direction(model, x, y, **kw)
    rows = widths[-1] if output_metric == "exact" else 1
    variant = dict(kfac_damping=kfac_damping, kfac_bias=kfac_bias)
    modelled = costs.flops("kfac", costs.MLPShape(widths, N, rows, bias), **variant)["total"]
    assert counter.get_total_flops() == pytest.approx(modelled, rel=1e-2, abs=2)


def test_linalg_formulas_are_counted():
    A = torch.randn(30, 30, dtype=torch.float64)
    A = A @ A.T + 30 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, 4, dtype=torch.float64)
    with flop_counter() as counter:
        L = torch.linalg.cholesky(A)
        torch.linalg.solve_triangular(L, b, upper=False)
        torch.linalg.eigh(A)
        torch.linalg.solve(A, b)
        torch.cholesky_inverse(L)
    expected = (
        costs.cholesky_flops(30)
        + costs.triangular_solve_flops(30, 4)
        + costs.eigh_flops(30)
        + costs.lu_solve_flops(30, 4)
        + costs.cholesky_inverse_flops(30)
    )
    assert counter.get_total_flops() == pytest.approx(expected, abs=4)


def test_speed_of_light_formula_by_hand():
    # one layer 3 -> 2, N = 2, r = 2: d = 4, no pullback term
    shape = costs.MLPShape((3, 2), batch=2, rows=2)
    by_hand = 2 * 16 * 2 + 2 * 4 * 4 + 64 / 3 + 2 * 4 * 2 * 2 + 2 * 6 * 2 * 4
    assert costs.speed_of_light_flops(shape) == pytest.approx(by_hand)
