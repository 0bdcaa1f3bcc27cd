"""The lean reference step sets the .grad that pre.backward sets, given the same probes
(pre.backward is checked against the dense oracle in tests/test_backward.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import riemann_core as rc
from riemann_core.measure.lean import PULLBACKS, LeanStep


def _mlp(widths, bias, activation=nn.Tanh):
    layers = []
    for f_in, f_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(f_in, f_out, bias=bias), activation()]
    return nn.Sequential(*layers[:-1]).double()


@pytest.mark.parametrize("pullback", PULLBACKS)
@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU], ids=lambda a: a.__name__)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("widths", "N"), [((6, 5, 4, 3), 16), ((7, 9, 3), 64)])
def test_lean_step_is_pre_backward(widths, N, bias, activation, pullback):
    """At N = 64 the Grams are factorised padded to 72 (off LAPACK's slow orders)."""
    torch.manual_seed(0)
    model = _mlp(widths, bias, activation)
    lean_model = copy.deepcopy(model)
    x, y = torch.randn(N, widths[0], dtype=torch.float64), torch.randint(0, widths[-1], (N,))
    generator = torch.Generator()
    pre = rc.RiemannianPreconditioner(
        model, output_metric="sampled", damping=1e-3, generator=generator
    )
    for _ in range(2):  # the first call probes and replays the forward, the second is fused
        generator.manual_seed(5)
        model.zero_grad()
        pre.backward(F.cross_entropy(model(x), y))
        want = [p.grad.clone() for p in model.parameters()]
        opt = torch.optim.SGD(lean_model.parameters(), lr=0.0)
        lean = LeanStep(lean_model, opt, damping=1e-3, generator=generator, pullback=pullback)
        generator.manual_seed(5)
        lean(x, y)
        for got, expected in zip(lean_model.parameters(), want, strict=True):
            torch.testing.assert_close(got.grad, expected, rtol=1e-9, atol=1e-12)
    pre.remove()
    assert min(float(g.abs().max()) for g in want) > 0
    generator.manual_seed(6)  # other probes, another direction: the comparison can fail
    lean(x, y)
    assert not torch.allclose(lean_model[0].weight.grad, want[0])


def test_lean_step_refuses_other_layers():
    with pytest.raises(ValueError, match="nn.Sequential of nn.Linear"):
        LeanStep(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), None)


def test_the_pullback_by_hand_refuses_an_activation_whose_derivative_it_does_not_know():
    with pytest.raises(ValueError, match=r"not of \['GELU'\]: take pullback='two passes'"):
        LeanStep(
            nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)), None, pullback="by hand"
        )
    with pytest.raises(ValueError, match=r"the in-place \['ReLU'\] overwrite"):
        LeanStep(nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)), None)
    with pytest.raises(ValueError, match="pullback must be one of"):
        LeanStep(nn.Sequential(nn.Linear(3, 4)), None, pullback="batch")
