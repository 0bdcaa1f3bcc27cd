"""Random draws of the user's generators and in place, inside a module the generic kernel
evaluates whole: replayed exactly, or refused naming the cause with every generator as
the user's passes left it (riemann_core.draws)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import (
    assert_unchanged,
    block_indices,
    flatten,
    ggn,
    gradient,
    oracle_direction,
    preconditioned,
    rel_error,
    snapshot,
)
from torch import nn

import riemann_core as rc

EXACT = ("layerwise", "full", "natural")
DAMPING = 1e-2

#: a generator no module holds (a global)
SHARED = torch.Generator()


class Drawing(nn.Module):
    """A layer scale owning a child Linear (evaluated whole, one sample at a time) that
    scales by a random mask drawn as ``how`` says, kept as ``last``; ``mask``, where set,
    replaces the draw (the oracle's network, the user's mask fixed)."""

    def __init__(self, how: str, d: int = 4):
        super().__init__()
        self.weight, self.lin = nn.Parameter(torch.linspace(0.5, 1.5, d)), nn.Linear(d, d)
        self.how, self.gen, self.mask = how, torch.Generator().manual_seed(7), None

    def forward(self, x):
        h = self.lin(x) * self.weight
        if self.mask is not None:
            return h * self.mask
        if self.how in ("own", "shared"):
            gen = self.gen if self.how == "own" else SHARED
            m = (torch.rand(h.shape, generator=gen, dtype=h.dtype) > 0.3).to(h.dtype)
        elif self.how == "like, ignored":
            m = torch.empty_like(h)
            m.bernoulli_(0.7)
        elif self.how == "afresh, returned":
            m = torch.empty(h.shape[0], 1, dtype=h.dtype).bernoulli_(0.7)
        else:  # "afresh, ignored"
            m = torch.ones(h.shape[0], 1, dtype=h.dtype)
            m.bernoulli_(0.7)
        self.last = m / 0.7
        return h * self.last


def _network(how: str):
    torch.manual_seed(40)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), Drawing(how), nn.Linear(4, 3)).double()
    return model, torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("call", ["backward", "step"])
@pytest.mark.parametrize("method", EXACT, ids=lambda m: f"method={m}")
@pytest.mark.parametrize("how", ["own", "like, ignored", "afresh, returned"])
def test_draws_of_a_generator_held_or_in_place_are_replayed_exactly(how, method, call):
    """Found by a hunt: a draw from a generator the module holds (``self.gen``) was
    replayed from the state the user's pass left, refused as another output, and the
    generator moved on; an in-place draw whose result is ignored (``m.bernoulli_(q)``,
    then ``x * m``) left ``m`` unfilled, refused as a module that couples the samples.
    Three steps with SGD between: each the oracle's of the network with the user's mask
    fixed, and the generators as the user's passes left them."""
    model, x, y = _network(how)
    pre = rc.RiemannianPreconditioner(model, method=method, damping=DAMPING, kernel="auto")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        twin = copy.deepcopy(model)
        twin[2].mask = model[2].last.detach().clone()
        states = torch.get_rng_state(), model[2].gen.get_state()
        if call == "backward":
            pre.backward(loss)
        else:
            loss.backward()
            pre.step()
        assert torch.equal(torch.get_rng_state(), states[0])
        assert torch.equal(model[2].gen.get_state(), states[1])
        expected = oracle_direction(
            ggn(twin, x, y, "cross_entropy"),
            gradient(twin, x, y, "cross_entropy"),
            DAMPING,
            method,
            block_indices(twin),
        )
        got = flatten({n: p.grad for n, p in model.named_parameters()}, model)
        assert rel_error(got, expected) < 1e-10
        opt.step()


@pytest.mark.parametrize("call", ["direction", "backward", "step"])
def test_a_draw_from_a_generator_no_module_holds_is_refused_leaving_it_as_it_was(call):
    """Found by a hunt: a generator held in a global cannot be started in a replay from
    the state the user's pass found it in; the replay drew from it, moving it on, and was
    refused as another output (``rc.direction`` accepted it, a direction of one draw).
    Refused naming it and the fix, the generators and ``.grad`` as they were."""
    model, x, y = _network("shared")
    SHARED.manual_seed(8)
    pre = rc.RiemannianPreconditioner(model, kernel="auto")
    loss = F.cross_entropy(model(x), y)
    if call == "step":
        loss.backward()
    before, states = snapshot(model), (torch.get_rng_state(), SHARED.get_state())
    fix = r"model\.eval\(\)" if call == "direction" else r"self\.gen = torch\.Generator\(\)"
    with pytest.raises(
        ValueError, match=rf"generator= that no module holds as an attribute \(a global.*{fix}"
    ):
        if call == "direction":
            rc.direction(model, x, y)
        elif call == "backward":
            pre.backward(loss)
        else:
            pre.step()
    assert torch.equal(torch.get_rng_state(), states[0])
    assert torch.equal(SHARED.get_state(), states[1])
    assert_unchanged(model, before)


@pytest.mark.parametrize("call", ["backward", "step"])
def test_an_in_place_draw_into_a_tensor_made_afresh_and_read_is_refused_naming_it(call):
    """Found by a hunt: ``m = torch.ones(n, 1); m.bernoulli_(q)``, then ``x * m``, has
    no sample's dimension one sample at a time and cannot take each sample's mask; it was
    refused as parameters reaching the output outside their modules. Refused naming the
    draw and the fix (``m = m.bernoulli_(q)``, which is replayed exactly)."""
    model, x, y = _network("afresh, ignored")
    pre = rc.RiemannianPreconditioner(model, kernel="auto")
    loss = F.cross_entropy(model(x), y)
    if call == "step":
        loss.backward()
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"module '2' \(Drawing\).*bernoulli_ \(draw 0\) fills in place.*"
        r"m = m\.bernoulli_\(q\)",
    ):
        pre.backward(loss) if call == "backward" else pre.step()
    assert_unchanged(model, before)


class FixedNoise(nn.Module):
    """Noise from a generator its forward makes and seeds: the same at every pass."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(x.shape[0], 4, generator=g, dtype=x.dtype)
        return self.l2(torch.tanh(self.l1(x)) + 0.1 * noise)


@pytest.mark.parametrize("call", ["direction", "backward", "step"])
def test_a_generator_the_forward_makes_and_drops_is_no_cause(call):
    """Found by review: a forward pass drawing from a generator it makes and seeds (fixed
    noise), deterministic, was refused as one no module holds, where it had been exact.
    The oracle's direction, the global generator as it was."""
    torch.manual_seed(40)
    model = FixedNoise().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    expected = oracle_direction(
        ggn(model, x, y, "cross_entropy"),
        gradient(model, x, y, "cross_entropy"),
        DAMPING,
        "layerwise",
        block_indices(model),
    )
    state = torch.get_rng_state()
    if call == "direction":
        got = flatten(rc.direction(model, x, y, damping=DAMPING), model)
    else:
        preconditioned(rc.RiemannianPreconditioner(model, damping=DAMPING), model, x, y, call)
        got = flatten({n: p.grad for n, p in model.named_parameters()}, model)
    assert rel_error(got, expected) < 1e-10
    assert torch.equal(torch.get_rng_state(), state)


class DrawsThenFails(nn.Module):
    """Draws from its own generator, then fails (``how="raise"``) or changes a parameter
    in place (``how="in place"``)."""

    def __init__(self, how: str):
        super().__init__()
        self.lin, self.how, self.gen = nn.Linear(5, 3), how, torch.Generator().manual_seed(7)

    def forward(self, x):
        h = self.lin(x) * (1 + 0.1 * torch.rand(3, generator=self.gen, dtype=x.dtype))
        if self.how == "raise":
            raise RuntimeError("shapes do not match")
        with torch.no_grad():
            self.lin.bias.add_(0)
        return h


@pytest.mark.parametrize("how", ["raise", "in place"])
def test_direction_failing_after_a_draw_from_a_modules_generator_leaves_it_as_it_was(how):
    """Found by review: ``rc.direction``'s pass failing, or refused for a parameter it
    changes in place, after drawing from ``self.gen`` left the generator moved on."""
    model = DrawsThenFails(how).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    state = model.gen.get_state()
    with pytest.raises(ValueError, match="failed on these inputs|changed parameters"):
        rc.direction(model, x, y)
    assert torch.equal(model.gen.get_state(), state)
