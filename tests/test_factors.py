"""Output-metric factors: exact, sampled (in expectation) and user-supplied."""

from __future__ import annotations

import math

import pytest
import torch
from oracle import (
    LOSS_NAMES,
    Problem,
    flatten,
    loss_hessians,
    oracle_direction,
    oracle_for,
    position_hessians,
    rel_error,
)

import riemann_core as rc
from riemann_core import factors
from riemann_core.methods import Options, build_problem

N, C = 3, 4


def logits_and_targets(seed=0):
    torch.manual_seed(seed)
    return 2 * torch.randn(N, C, dtype=torch.float64), torch.tensor([0, 3, 1])


def gram(F):
    """Per-sample ``F_b^T F_b``, ``(N, C, C)``."""
    return F.mT @ F


# ------------------------------------------------------------------------ exact


def test_cross_entropy_factor_gram_is_loss_hessian():
    """``C - 1`` rows (the Fisher's rank) whose Gram is the loss Hessian."""
    z, y = logits_and_targets()
    F = factors.cross_entropy_factor(z)
    assert F.shape == (N, C - 1, C)
    torch.testing.assert_close(gram(F), N * loss_hessians(z, y, "cross_entropy"))


@pytest.mark.parametrize("classes", [1, 2, 3, 50])
def test_cross_entropy_factor_is_stable_for_every_distribution(classes):
    """Saturated logits (one class, the reflected one, or another at probability ~1),
    uniform and random ones: the Gram is ``diag(p) - p p^T`` to round-off everywhere."""
    torch.manual_seed(classes)
    z = torch.randn(6, classes, dtype=torch.float64) * 3
    z[0] = 0.0
    z[1, -1] = z[2, 0] = 200.0
    z[3] = -200.0
    z[3, -1] = 0.0
    F = factors.cross_entropy_factor(z)
    p = torch.softmax(z, dim=1)
    assert F.shape == (6, max(classes - 1, 1), classes)
    assert torch.isfinite(F).all()
    M = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert (gram(F) - M).abs().max() < 1e-15
    z32 = z.float()
    M32 = gram(factors.cross_entropy_factor(z32)).double()
    assert (M32 - M).abs().max() < 1e-6


def test_positions_factor_gram_is_the_token_level_loss_hessian():
    """Cross-entropy over every position of ``(N, T, C)`` logits (classes last): the
    factor's Gram is the Hessian of the mean over the ``N T`` positions, per sample."""
    torch.manual_seed(0)
    z, y = 2 * torch.randn(N, 3, C, dtype=torch.float64), torch.randint(0, C, (N, 3))
    F = factors.positions_cross_entropy_factor(z, sampled=False)
    assert F.shape == (N, 3 * (C - 1), 3 * C)
    torch.testing.assert_close(gram(F), N * position_hessians(z, y))


def test_mse_factor_gram_is_loss_hessian():
    z = torch.randn(N, C, dtype=torch.float64)
    y = torch.randn(N, C, dtype=torch.float64)
    F = factors.mse_factor(z)
    assert F.shape == (N, C, C)
    torch.testing.assert_close(gram(F), N * loss_hessians(z, y, "mse"))


# ---------------------------------------------------------------------- sampled
# In expectation against the oracle's loss Hessian. The mean Gram of ``draws`` batches
# of ``samples`` probes per sample is compared entry by entry with ``N H_b``, in units of
# its standard error estimated from the spread of the batch means: |z| < 5 for an
# unbiased estimator (observed <= 3.5 over seeds 0-5), while a 5% bias reads z >= 18 at
# these sizes. The seeds are fixed, so the tests are deterministic.

DRAWS, SAMPLES = 20, 10_000
SAMPLERS = {"ce": factors.sampled_cross_entropy_factor, "mse": factors.sampled_mse_factor}


def largest_z(sample, loss, draws=DRAWS, samples=SAMPLES, seed=1) -> float:
    """``max |mean Gram - N H_b| / standard error`` over the entries of every sample
    (``loss="positions"``: cross-entropy over 2 positions of ``(N, 2, C)`` logits)."""
    z, y = logits_and_targets()
    if loss == "mse":
        y = torch.randn(N, C, dtype=torch.float64)
    if loss == "positions":
        z, y = torch.stack([z, z.flip(0)], 1), torch.stack([y, y.flip(0)], 1)
    gen = torch.Generator().manual_seed(seed)
    grams = []
    for _ in range(draws):
        F = sample(z, samples, gen)
        assert F.shape == (N, samples, z[0].numel())
        grams.append(gram(F))
    grams = torch.stack(grams)
    mean, se = grams.mean(0), grams.std(0) / math.sqrt(draws)
    if loss == "positions":
        exact = N * position_hessians(z, y)
    else:
        exact = N * loss_hessians(z, y, LOSS_NAMES[loss])
    return float(((mean - exact).abs() / se.clamp_min(1e-12)).max())


def sampled_positions(z, samples, gen):
    return factors.positions_cross_entropy_factor(z, True, samples, gen)


def biased(sample, bias):
    """``sample`` with every row scaled so that its Gram is ``1 + bias`` times as large."""
    return lambda z, samples, gen: sample(z, samples, gen) * math.sqrt(1 + bias)


@pytest.mark.parametrize("loss", ["ce", "mse"], ids=lambda s: f"loss={s}")
def test_sampled_factor_is_unbiased(loss):
    assert largest_z(SAMPLERS[loss], loss) < 5


def test_sampled_positions_factor_is_unbiased():
    """One row per probe holding every position's draw: the blocks between positions,
    zero in the metric, vanish in expectation (the draws are independent, mean zero)."""
    assert largest_z(sampled_positions, "positions") < 5
    assert largest_z(biased(sampled_positions, 0.05), "positions") > 5


@pytest.mark.parametrize("loss", ["ce", "mse"], ids=lambda s: f"loss={s}")
def test_the_unbiasedness_check_catches_a_5_percent_bias(loss):
    assert largest_z(biased(SAMPLERS[loss], 0.05), loss) > 5


def test_the_unbiasedness_check_catches_a_wrong_temperature():
    """Draws from ``softmax(1.05 z)`` instead of ``softmax(z)``: a subtler bias."""

    def tempered(z, samples, gen):
        return factors.sampled_cross_entropy_factor(1.05 * z, samples, gen)

    assert largest_z(tempered, "ce") > 5


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_mse_rows_are_the_float32_draws_rounded(half):
    """Found on torch 2.8-2.11: the rows were drawn in the outputs' dtype, and torch draws
    half-precision normals by another algorithm, so K-FAC's direction under float16
    autocast was another Monte Carlo draw, 5-9% off the float32 one (on 2.12-2.13 still
    where ``N S C`` is not a multiple of 16, as here: 105)."""
    outputs = torch.randn(5, 7)
    eps = torch.randn(5, 3, 7, generator=torch.Generator().manual_seed(0))  # float32
    expected = (eps * math.sqrt(2.0 / (7 * 3))).to(half)
    rows = factors.sampled_mse_factor(outputs.to(half), 3, torch.Generator().manual_seed(0))
    assert rows.dtype == half
    assert torch.equal(rows, expected)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "mse"], ids=lambda s: f"loss={s}")
def test_sampled_factor_is_unbiased_large_sample(loss):
    assert largest_z(SAMPLERS[loss], loss, draws=100, samples=200_000, seed=2) < 5


def test_single_draw_is_not_exact():
    """Guards the tests above against a 'sampled' path that returns the exact factor."""
    z, y = logits_and_targets()
    F = factors.sampled_cross_entropy_factor(z, 1, torch.Generator().manual_seed(0))
    assert (gram(F) - N * loss_hessians(z, y, "cross_entropy")).abs().max() > 1e-3


def draw_probabilities(logits, monkeypatch, steps=64):
    """The exact probability with which ``sampled_cross_entropy_factor`` draws each class
    of one row of ``logits``, by bisection on its uniform: ``torch.rand`` is replaced by
    the grid it draws from (multiples of ``2^-24`` in float32, ``2^-53`` in float64) at
    chosen points ``t in [0, 1)``, and the draw is monotone in ``t`` on ``[0, 1/2)`` and
    on ``[1/2, 1)`` (in ``t`` throughout before the fix), so each class holds one interval
    of each half, found to float64's resolution."""
    C = logits.shape[-1]
    points = {}

    def rand(size, *, dtype, device=None, generator=None):
        bits = 1 - int(math.log2(torch.finfo(dtype).eps))  # 24 in float32, 53 in float64
        return (points["t"] * 2.0**bits).floor().div(2.0**bits).reshape(size).to(dtype)

    monkeypatch.setattr(torch, "rand", rand)

    def drawn(t):
        points["t"] = t
        F = factors.sampled_cross_entropy_factor(logits[None], t.numel())
        return F[0].argmax(1)  # positive at the drawn class only

    c = torch.arange(1, C)
    q = torch.zeros(C, dtype=torch.float64)
    for start, end in ((0.0, 0.5), (0.5, 1.0)):
        lo = torch.full((C - 1,), start, dtype=torch.float64)
        hi = torch.full((C - 1,), end, dtype=torch.float64)
        hi = torch.where(drawn(lo) >= c, lo, hi)  # classes below c never drawn here
        for _ in range(steps):  # hi: the first t of the half drawing c or above
            mid = (lo + hi) / 2
            above = drawn(mid) >= c
            lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
        edges = torch.cat([hi.new_tensor([start]), hi, hi.new_tensor([end])])
        q += edges.diff()
    return q


@pytest.mark.parametrize(
    ("dtype", "search"),
    [(torch.float32, "float64"), (torch.float32, "both ends"), (torch.float64, "float64")],
    ids=str,
)
@pytest.mark.parametrize("classes", [10, 200])
@pytest.mark.parametrize("gap", [10, 14, 18])
def test_every_class_is_drawn_at_its_probability_at_a_confident_gap(
    gap, classes, dtype, search, monkeypatch
):
    """Found by review: float32 uniforms are multiples of ``2^-24``, and after a dominant
    class a forward cumulative sum is ``eps`` off of 1, so the classes of probability
    below ``6e-8`` were drawn at the wrong rate or never (the expected metric was 58% off
    at a gap of 18 over 10 classes). Each class is drawn at its probability up to the
    rounding (float32 at least) of the smaller of the mass up to it and the mass from it
    on (and float64 uniforms' grid, ``2^-53``), so the expected metric
    ``E[(e_y - p)(e_y - p)^T]`` is ``diag(p) - p p^T`` to that rounding relative to it.
    Before the fix (float32 logits, 10 classes): the metric 3.5e-4 of itself off at a gap
    of 10, 0.023 at 14, 2.4 at 18 (7 of the 9 other classes never drawn). Both ways of
    drawing: in float64 (logits up to ``FLOAT64_DRAW_ENTRIES``), from both ends beyond."""
    if search == "both ends":
        monkeypatch.setattr(factors, "FLOAT64_DRAW_ENTRIES", 0)
    torch.manual_seed(0)
    logits = -gap - torch.rand(classes, dtype=torch.float64)
    logits[classes // 3] = 0.0  # the dominant class, with classes on both sides
    logits = logits.to(dtype)
    q = draw_probabilities(logits, monkeypatch)
    p = torch.softmax(logits.double(), 0)
    eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    nearer_end = torch.minimum(p.cumsum(0), p.flip(0).cumsum(0).flip(0))
    off = (q - p).abs() / (eps * nearer_end + 2.0**-52)
    assert off.max() < 8, float(off.max())
    metric = torch.diag(p) - p.outer(p)
    expected = torch.diag(q) - q.outer(p) - p.outer(q) + p.outer(p)
    size = torch.linalg.matrix_norm(metric, 2)
    assert torch.linalg.matrix_norm(expected - metric, 2) < 8 * eps * size + classes * 2.0**-52


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_float64_draw_keeps_its_float64_tensors_to_the_logits_and_uniforms(dtype):
    """Found by review: the float64 draw (up to ``FLOAT64_DRAW_ENTRIES`` logits) formed
    the ``N S C`` rows in float64 too, then copied them to the logits' dtype: with
    ``samples = S`` a float64 tensor ``S`` times the 32 MiB bound, and the rows' peak 3x
    that of rows formed in float32 (as before the float64 draw, and as the out-of-memory
    message counts them). Only ``p``, its cumulative sum (``N C``) and the uniforms
    (``N S``) are float64; the rows are formed in float32 at least."""
    from torch.utils._python_dispatch import TorchDispatchMode

    N, C, S = 8, 10, 50
    sizes = []

    class Float64Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    sizes.append(t.numel())
            return out

    logits = torch.randn(N, C).to(dtype)
    with Float64Sizes():
        F = factors.sampled_cross_entropy_factor(logits, S, torch.Generator().manual_seed(0))
    assert F.dtype == dtype and F.shape == (N, S, C)
    assert sizes and max(sizes) <= N * max(C, S), max(sizes)
    p = torch.softmax(logits.double(), 1)
    drawn = (F.double() * math.sqrt(S) + p[:, None, :]).round()  # e_y, to float16's eps
    assert torch.equal(drawn.sum(2), torch.ones(N, S)) and drawn.min() == 0


def sampled_ggn(problem, samples, seed=0):
    """``K^T K`` of the whole network with the sampled factor, as the methods form it."""
    model, x, y = problem.make()
    opts = Options(
        damping=1.0,
        loss=problem.loss_name,
        output_metric="sampled",
        samples=samples,
        generator=torch.Generator().manual_seed(seed),
    )
    K = torch.cat([h.K() for h in build_problem(model, x, y, opts, needs_factor=True).handlers], 1)
    return K.T @ K


@pytest.mark.parametrize("loss", ["ce", "mse"], ids=lambda s: f"loss={s}")
def test_sampled_ggn_is_unbiased_through_the_pipeline(loss, monkeypatch):
    """The whole path (factor, 1/sqrt(N) scaling, pullback, kernels): 50000 probes per
    sample give the oracle's GGN to 2% (observed 0.2-0.8% over seeds 0-3); the same path
    with a 5% bias in the factor is 5% off, so the check catches it."""
    problem = Problem(loss=loss)
    G = oracle_for(problem)[0]
    assert rel_error(sampled_ggn(problem, 50_000), G) < 0.02
    sampler = "sampled_cross_entropy_factor" if loss == "ce" else "sampled_mse_factor"
    monkeypatch.setattr(factors, sampler, biased(getattr(factors, sampler), 0.05))
    assert rel_error(sampled_ggn(problem, 50_000), G) > 0.03


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


def test_few_rows_of_a_small_network_are_pulled_back_one_pass_after_another(monkeypatch):
    """One probe (two rows with the gradient) of a small network: pass by pass; the exact
    factor's C + 1 rows, or a network over the work limit, vectorised; the same direction
    either way."""
    from riemann_core.methods import _base

    batched, real = [], _base.pullback

    def recording(*args, **kwargs):
        batched.append(kwargs["batched"])
        return real(*args, **kwargs)

    monkeypatch.setattr(_base, "pullback", recording)
    model, x, y = Problem().make()

    def sampled():
        gen = torch.Generator().manual_seed(0)
        dirs = rc.direction(model, x, y, output_metric="sampled", damping=1e-2, generator=gen)
        return flatten(dirs, model)

    one_after_another = sampled()
    rc.direction(model, x, y, damping=1e-2)
    monkeypatch.setattr(_base, "SERIAL_PULLBACK_WORK", 0)
    vectorised = sampled()
    assert batched == [False, True, True]
    assert rel_error(one_after_another, vectorised) < 1e-12


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


@pytest.mark.parametrize("dtype", [torch.complex128, torch.int64, torch.bool])
def test_custom_factor_that_is_not_real_floating_point_raises(dtype):
    """Found by a hunt: a complex factor with F^H F = M was cast to real (its imaginary
    part dropped, the direction 23-108x off), with torch's warning only."""
    model, x, y = Problem().make()

    def factor(out, tgt):
        return (1j * symmetric_sqrt_factor(out, tgt)).to(dtype)

    with pytest.raises(ValueError, match=f"real floating-point factor, got {dtype}"):
        rc.direction(model, x, y, output_metric=factor)


def test_custom_factor_with_nan_raises():
    model, x, y = Problem().make()

    def nan_factor(out, tgt):
        F = symmetric_sqrt_factor(out, tgt)
        F[0, 0, 0] = float("nan")
        return F

    with pytest.raises(ValueError, match="NaN or inf"):
        rc.direction(model, x, y, output_metric=nan_factor)


@pytest.mark.parametrize("method", ["layerwise", "full", "natural", "kfac"])
def test_custom_factor_in_an_autograd_graph_is_data(method):
    """A factor built from tensors that require grad (a learnable output metric) enters
    as data: the direction equals that of its detached copy, with no graph, through
    ``rc.direction`` and ``pre.backward``."""
    model, x, y = Problem().make()
    scale = torch.nn.Parameter(torch.tensor(2.0, dtype=x.dtype))

    def learnable(out, tgt):
        return scale * symmetric_sqrt_factor(out, tgt)

    def fixed(out, tgt):
        return learnable(out, tgt).detach()

    kw = dict(method=method, damping=1e-2)
    want = rc.direction(model, x, y, output_metric=fixed, **kw)
    got = rc.direction(model, x, y, output_metric=learnable, **kw)
    pre = rc.RiemannianPreconditioner(model, output_metric=learnable, **kw)
    for _ in range(2):  # the first call takes the probe's path, the second the fused one
        model.zero_grad()
        pre.backward(torch.nn.functional.cross_entropy(model(x), y))
        for name, p in model.named_parameters():
            assert not got[name].requires_grad and not p.grad.requires_grad
            assert rel_error(got[name], want[name]) < 1e-12
            assert rel_error(p.grad, want[name]) < 1e-10
    pre.remove()


@pytest.mark.parametrize("method", ["layerwise", "full", "natural", "kfac"])
def test_a_custom_factor_written_in_place_changes_neither_direction_nor_outputs(method):
    """Found by a hunt: a factor computed with in-place operations on the outputs it is
    given (``out.sub_(out.amax(1, keepdim=True)).exp_()``) edited the outputs themselves:
    rc.direction then took the gradient at the edited outputs (0.07 off), and
    pre.backward's fused path changed the caller's logits."""
    model, x, y = Problem().make()

    def in_place(out, tgt):
        p = out.sub_(out.amax(1, keepdim=True)).exp_()
        return symmetric_sqrt_factor(p.div_(p.sum(1, keepdim=True)).log_(), tgt)

    kw = dict(method=method, damping=1e-2)
    want = flatten(rc.direction(model, x, y, output_metric=symmetric_sqrt_factor, **kw), model)
    got = rc.direction(model, x, y, output_metric=in_place, **kw)
    assert rel_error(flatten(got, model), want) < 1e-10
    pre = rc.RiemannianPreconditioner(model, output_metric=in_place, **kw)
    for _ in range(2):  # the first call takes the probe's path, the second the fused one
        model.zero_grad()
        logits = model(x)
        before = logits.detach().clone()
        pre.backward(torch.nn.functional.cross_entropy(logits, y))
        assert torch.equal(logits, before)
        assert (
            rel_error(flatten({n: p.grad for n, p in model.named_parameters()}, model), want)
            < 1e-10
        )
    pre.remove()


@pytest.mark.parametrize("batched", [True, False], ids=["vmap", "one-after-another"])
@pytest.mark.parametrize("retain_graph", [True, False])
def test_pullback_is_the_chain_rule_for_every_seed(batched, retain_graph):
    """Each seed's cotangent at every target, vectorised or pass by pass; zeros for a
    target the roots do not reach or outside the graph; the graph kept between passes and
    freed after the last unless ``retain_graph``."""
    torch.manual_seed(0)
    dt = torch.float64
    first, second, spare = (torch.nn.Linear(4, 5), torch.nn.Linear(5, 3), torch.nn.Linear(5, 2))
    for m in (first, second, spare):
        m.to(dt)
    x = torch.randn(6, 4, dtype=dt)
    h = first(x)
    out = second(torch.tanh(h))
    dropped = spare(torch.tanh(h))  # discarded: the roots do not reach it
    with torch.no_grad():
        outside = first(x)
    seeds = torch.randn(3, 6, 3, dtype=dt)
    pulled = factors.pullback(
        (out,), (seeds,), [h, out, dropped, outside], retain_graph=retain_graph, batched=batched
    )
    chain = (seeds @ second.weight.detach()) * (1 - torch.tanh(h.detach()) ** 2)
    assert rel_error(pulled[0], chain) < 1e-14
    assert torch.equal(pulled[1], seeds)
    assert pulled[2].shape == (3, 6, 2) and not pulled[2].any()
    assert pulled[3].shape == (3, 6, 5) and not pulled[3].any()
    if retain_graph:
        out.sum().backward()
    else:
        with pytest.raises(RuntimeError, match="second time"):
            out.sum().backward()


def test_another_rank_s_checkpoint_failure_reaches_this_rank_as_it_is():
    """Found by review: the refusal matched any error quoting torch's message, so a
    healthy rank's DistributedError (which quotes the failing rank's) became the
    checkpoint's ValueError, and a caller catching DistributedError missed it."""
    from riemann_core.distributed import DistributedError

    quoted = f"rank 0 of 2 failed: RuntimeError: {factors.REENTRANT_CHECKPOINT} with .grad()"
    with pytest.raises(DistributedError, match="rank 0 of 2 failed"):
        with factors.reentrant_checkpoint_refused():
            raise DistributedError(quoted)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        with factors.reentrant_checkpoint_refused():
            raise RuntimeError(f"{factors.REENTRANT_CHECKPOINT} with .grad() or ...")


@pytest.mark.parametrize("call", ["backward", "step"])
def test_a_custom_factor_that_reads_the_targets_is_refused_by_the_preconditioner_naming_why(call):
    """Found by review: a factor computed from the targets got torch.func's own error
    about vmap over a None under pre.backward: the preconditioner never sees the targets.
    It names that, and leaves every .grad as it was."""
    model, x, y = Problem().make()

    def reads_targets(out, tgt):
        return symmetric_sqrt_factor(out, tgt) * (1 + 0 * tgt[:, None, None])

    pre = rc.RiemannianPreconditioner(model, output_metric=reads_targets, damping=1e-2)
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    if call == "step":
        loss.backward()
    before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="raised while called with targets=None") as err:
        pre.backward(loss) if call == "backward" else pre.step()
    assert "from the outputs alone" in str(err.value)
    for n, p in model.named_parameters():
        assert (p.grad is None) == (before[n] is None)
        assert before[n] is None or torch.equal(p.grad, before[n])
    pre.remove()
