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
    rows = costs.minimal_rows(widths[-1], output_metric=output_metric, samples=samples)
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
    rows = costs.minimal_rows(widths[-1], output_metric=output_metric)
    variant = dict(kfac_damping=kfac_damping, kfac_bias=kfac_bias)
    modelled = costs.flops("kfac", costs.MLPShape(widths, N, rows, bias), **variant)["total"]
    assert counter.get_total_flops() == pytest.approx(modelled, rel=1e-2, abs=2)


def test_speed_of_light_formula_by_hand():
    # one layer 3 -> 2, N = 2, r = 2: d = 4, P = 4, no pullback term
    shape = costs.MLPShape((3, 2), batch=2, rows=2)
    products = 4 * 4 + 16 * 2 + 2 * 4 * 2 + 2 * 2 * 2 * 4
    assert costs.speed_of_light_flops(shape) == pytest.approx(
        {"products": products, "cholesky": 64 / 3}
    )


def test_speed_of_light_keeps_min_r_f_out_rows_per_block():
    # 5 -> 4 -> 3, N = 3, r = 4: the second block keeps 3 rows per sample (d = 9)
    shape = costs.MLPShape((5, 4, 3), batch=3, rows=4)
    pullback = 2 * 3 * 4 * (4 * 3)
    first = 9 * 6 + 12**2 * 4 + 2 * 9 * 4 + 2 * 3 * 4 * 6
    second = 9 * 5 + 9**2 * 3 + 2 * 9 * 3 + 2 * 3 * 3 * 5
    assert costs.speed_of_light_flops(shape) == pytest.approx(
        {"products": pullback + first + second, "cholesky": (12**3 + 9**3) / 3}
    )


def test_speed_of_light_of_the_target_network():
    # 784-1024-1024-10 at N = 128, cross-entropy: r = C - 1 = 9 rows suffice
    rows = costs.minimal_rows(10)
    sol = costs.speed_of_light_flops(costs.MLPShape((784, 1024, 1024, 10), 128, rows))
    assert rows == 9
    assert sol["products"] == pytest.approx(5.76e9, rel=1e-3)
    assert sol["cholesky"] == pytest.approx(1.529e9, rel=1e-3)
    rates = {"products": 1e11, "cholesky": 2e10}
    seconds = sol["products"] / 1e11 + sol["cholesky"] / 2e10
    assert costs.speed_of_light_seconds(sol, rates) == pytest.approx(seconds)
    with pytest.raises(ValueError, match="no positive rate for \\['cholesky'\\]"):
        costs.speed_of_light_seconds(sol, {"products": 1e11})


@pytest.mark.parametrize(
    "kwargs, rows",
    [
        ({}, 9),
        ({"loss": "mse"}, 10),
        ({"output_metric": "sampled", "samples": 3}, 3),
    ],
)
def test_minimal_rows(kwargs, rows):
    assert costs.minimal_rows(10, **kwargs) == rows
