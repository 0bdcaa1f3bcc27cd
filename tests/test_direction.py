"""``rc.direction`` for every method against the dense float64 oracle of ``oracle.py``.

``layerwise`` is the block-diagonal solve of the damped GGN (one block per module, a
Linear's weight and bias together); ``full`` and ``natural`` the dense solve of the
whole damped GGN.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracle import (
    Problem,
    assert_unchanged,
    block_indices,
    damped,
    flatten,
    ggn,
    gradient,
    grid,
    oracle_direction,
    oracle_for,
    rel_error,
    snapshot,
    solve_blocks,
    solve_dense,
    unflatten,
)

import riemann_core as rc
from riemann_core import costs
from riemann_core.direction import solve
from riemann_core.methods import Options

EXACT = ("layerwise", "full", "natural")
DAMPINGS = (1e-8, 1e-4, 1e-1, 10.0)
EPS64 = torch.finfo(torch.float64).eps

PROBLEMS = grid()
IDS = [p.id for p in PROBLEMS]


def metric(G, method, blocks):
    """The matrix ``method`` solves with (before damping)."""
    return torch.block_diag(*[G[s][:, s] for s in blocks]) if method == "layerwise" else G


def tolerance(G, damping) -> float:
    """1e-10, or the perturbation bound ``10 eps cond`` of any stable float64 solve.

    For ``damping >= 1e-4`` this is 1e-10 on every problem here. At ``damping=1e-8``
    the GGN is singular (softmax shift invariance, ``n > d``) and ``cond(G + mu I)``
    reaches ~3e8: there the oracle itself is only accurate to ``~eps cond``
    (``linalg.solve`` and ``eigh`` differ by up to 2e-8, see test_oracle.py).
    """
    return max(1e-10, 10 * EPS64 * float(torch.linalg.cond(damped(G, damping))))


@pytest.mark.parametrize("damping", DAMPINGS, ids=lambda d: f"damping={d:g}")
@pytest.mark.parametrize("method", EXACT, ids=lambda m: f"method={m}")
@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
def test_matches_dense_oracle(problem, method, damping):
    G, g, blocks = oracle_for(problem)
    model, x, y = problem.make()
    dirs = rc.direction(model, x, y, loss=problem.loss_name, method=method, damping=damping)
    expected = oracle_direction(G, g, damping, method, blocks)
    assert rel_error(flatten(dirs, model), expected) <= tolerance(
        metric(G, method, blocks), damping
    )


# layerwise factorises G_a itself where that is cheaper (few parameters, many rows):
# batch 15 mixes both algebras across blocks (cross-entropy, r = C - 1 = 2 rows per
# sample), batch 20 uses the dense one throughout, as does MSE (r = C = 3) at batch 10.
PATHS = [
    Problem(batch=15, depth=3),
    Problem(batch=10, depth=3, loss="mse", bias=False),
    Problem(batch=20, depth=3, act="relu"),
]


@pytest.mark.parametrize("kernel", ["structured", "generic"], ids=lambda k: f"kernel={k}")
@pytest.mark.parametrize("damping", DAMPINGS, ids=lambda d: f"damping={d:g}")
@pytest.mark.parametrize("problem", PATHS, ids=[f"{p.id}-batch={p.batch}" for p in PATHS])
def test_layerwise_dense_and_woodbury_paths(problem, damping, kernel):
    G, g, blocks = oracle_for(problem)
    model, x, y = problem.make()
    dirs, diags = rc.direction(
        model, x, y, loss=problem.loss_name, damping=damping, kernel=kernel, return_diagnostics=True
    )
    assert "dense" in {row.solver for row in diags}
    expected = oracle_direction(G, g, damping, "layerwise", blocks)
    tol = tolerance(metric(G, "layerwise", blocks), damping)
    assert rel_error(flatten(dirs, model), expected) <= tol


@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
def test_euclidean_is_the_gradient(problem):
    _, g, _ = oracle_for(problem)
    model, x, y = problem.make()
    dirs = rc.direction(model, x, y, loss=problem.loss_name, method="euclidean")
    assert rel_error(flatten(dirs, model), g) < 1e-14


ONE_LAYER = grid(depth=(1,))


@pytest.mark.parametrize("damping", [1e-4, 1.0], ids=lambda d: f"damping={d:g}")
@pytest.mark.parametrize("problem", ONE_LAYER, ids=[p.id for p in ONE_LAYER])
def test_one_layer_layerwise_equals_full_equals_natural(problem, damping):
    model, x, y = problem.make()
    dirs = {
        m: flatten(
            rc.direction(model, x, y, loss=problem.loss_name, method=m, damping=damping), model
        )
        for m in EXACT
    }
    assert rel_error(dirs["layerwise"], dirs["full"]) < 1e-10
    assert rel_error(dirs["natural"], dirs["full"]) < 1e-10


@pytest.mark.parametrize(
    "problem", [Problem(depth=3), Problem(loss="mse", depth=2)], ids=lambda p: p.id
)
def test_layerwise_differs_from_full_on_deep_networks(problem):
    """The block-diagonal metric is a different matrix as soon as there are two blocks."""
    model, x, y = problem.make()
    kw = dict(loss=problem.loss_name, damping=1e-2)
    lw = flatten(rc.direction(model, x, y, method="layerwise", **kw), model)
    full = flatten(rc.direction(model, x, y, method="full", **kw), model)
    assert rel_error(lw, full) > 1e-2


@pytest.mark.parametrize("method", EXACT, ids=lambda m: f"method={m}")
def test_nested_module_names(method):
    """Names are those of ``model.named_parameters()`` for nested containers too."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh())
            self.head = torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(3)
    model = Net().double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    dirs = rc.direction(model, x, y, method=method, damping=1e-3)
    assert list(dirs) == [n for n, _ in model.named_parameters()]
    G, g = ggn(model, x, y, "cross_entropy"), gradient(model, x, y, "cross_entropy")
    expected = oracle_direction(G, g, 1e-3, method, block_indices(model))
    assert rel_error(flatten(dirs, model), expected) < 1e-10


@pytest.mark.parametrize("method", EXACT, ids=lambda m: f"method={m}")
def test_mse_with_multidimensional_outputs(method):
    """``F.mse_loss`` averages over all ``N x 2 x 3`` entries: ``M_b = (2 / 6) I``."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 6)
            )

        def forward(self, x):
            return self.body(x).reshape(-1, 2, 3)

    torch.manual_seed(5)
    model = Net().double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    G, g = ggn(model, x, y, "mse"), gradient(model, x, y, "mse")
    dirs = rc.direction(model, x, y, loss="mse", method=method, damping=1e-3)
    expected = oracle_direction(G, g, 1e-3, method, block_indices(model))
    assert rel_error(flatten(dirs, model), expected) < 1e-10


# ------------------------------------------------------------- arbitrary vectors


@pytest.mark.parametrize("damping", [1e-3, 1.0], ids=lambda d: f"damping={d:g}")
@pytest.mark.parametrize("method", EXACT, ids=lambda m: f"method={m}")
@pytest.mark.parametrize(
    "problem",
    [Problem(depth=2), Problem(loss="mse", depth=3, act="relu", bias=False), PATHS[-1]],
    ids=lambda p: f"{p.id}-batch={p.batch}",
)
def test_random_vectors_match_dense_solve(problem, method, damping):
    """The solves are right for any vector, not only gradients in the row space of ``K``."""
    G, _, blocks = oracle_for(problem)
    model, x, y = problem.make()
    torch.manual_seed(7)
    v = torch.randn(G.shape[0], dtype=torch.float64)
    opts = Options(damping=damping, loss=problem.loss_name)
    dirs, _ = solve(model, x, y, method, opts, gradient=unflatten(v, model))
    if method == "layerwise":
        expected = solve_blocks(G, v, damping, blocks)
    else:
        expected = solve_dense(G, v, damping)
    assert rel_error(flatten(dirs, model), expected) < 1e-10


# ------------------------------------------------------------------------ float32

FLOAT32 = grid(act=("tanh", "relu"))


@pytest.mark.parametrize("damping", [1e-1, 1.0], ids=lambda d: f"damping={d:g}")
@pytest.mark.parametrize("method", EXACT, ids=lambda m: f"method={m}")
@pytest.mark.parametrize("problem", FLOAT32, ids=[p.id for p in FLOAT32])
def test_float32_matches_float64_oracle(problem, method, damping):
    """A float32 model against the float64 oracle of the same weights.

    ``damping >= 0.1`` keeps ``cond(G + mu I)`` below ~1e2, so float32 round-off
    (eps 1.2e-7) stays well under 1e-4 (observed <= 2e-6).
    """
    model, x, y = problem.make(dtype=torch.float32)
    G, g, blocks = oracle_for(problem, torch.float32)
    dirs = rc.direction(model, x, y, loss=problem.loss_name, method=method, damping=damping)
    assert all(d.dtype == torch.float32 for d in dirs.values())
    expected = oracle_direction(G, g, damping, method, blocks)
    assert rel_error(flatten(dirs, model), expected) <= 1e-4


@pytest.mark.parametrize("method", EXACT, ids=lambda m: f"method={m}")
@pytest.mark.parametrize("problem", FLOAT32, ids=[p.id for p in FLOAT32])
def test_float32_with_float64_solve(problem, method):
    """``solve_dtype=torch.float64`` at ``damping=1e-2``.

    The factorisation runs in float64, but ``K`` and ``g`` still come from the float32
    network (relative error ~1e-7), which the solve amplifies by ``cond <~ 1e3``;
    observed <= 1.2e-5.
    """
    damping = 1e-2
    model, x, y = problem.make(dtype=torch.float32)
    G, g, blocks = oracle_for(problem, torch.float32)
    dirs = rc.direction(
        model,
        x,
        y,
        loss=problem.loss_name,
        method=method,
        damping=damping,
        solve_dtype=torch.float64,
    )
    assert all(d.dtype == torch.float32 for d in dirs.values())
    expected = oracle_direction(G, g, damping, method, blocks)
    assert rel_error(flatten(dirs, model), expected) <= 1e-4


# ------------------------------------------------------------------ grad mode


@pytest.mark.parametrize("method", rc.METHODS, ids=lambda m: f"method={m}")
def test_direction_under_no_grad(method):
    """Called inside ``torch.no_grad()`` (as in an optimizer step), same result."""
    problem = Problem()
    model, x, y = problem.make()
    expected = rc.direction(model, x, y, method=method, damping=1e-2)
    with torch.no_grad():
        dirs = rc.direction(model, x, y, method=method, damping=1e-2)
        assert not torch.is_grad_enabled()  # the caller's mode is restored
    assert rel_error(flatten(dirs, model), flatten(expected, model)) < 1e-12


# ------------------------------------------------------------------- stability


@pytest.mark.parametrize("problem", [Problem(), Problem(loss="mse")], ids=lambda p: p.id)
def test_full_is_backward_stable_at_tiny_damping(problem):
    """Dense Cholesky: residual ``||(G + mu I) x - g|| / ||g||`` at round-off, mu = 1e-8."""
    G, g, _ = oracle_for(problem)
    model, x, y = problem.make()
    dirs = rc.direction(model, x, y, loss=problem.loss_name, method="full", damping=1e-8)
    d = flatten(dirs, model)
    assert (damped(G, 1e-8) @ d - g).norm() / g.norm() < 1e-12


@pytest.mark.parametrize("method", ["layerwise", "natural"], ids=lambda m: f"method={m}")
def test_refinement_makes_woodbury_backward_stable_at_tiny_damping(method):
    """(g - K^T t) / mu cancels: without refinement the residual is ~ eps ||g|| / mu
    (~5e-8 at mu = 1e-8); one step of iterative refinement brings it to round-off."""
    plain, refined = [], []
    for problem in grid(act=("tanh",)):
        G, g, blocks = oracle_for(problem)
        model, x, y = problem.make()
        A = damped(metric(G, method, blocks), 1e-8)
        for steps, out in ((0, plain), (1, refined)):
            dirs = rc.direction(
                model, x, y, loss=problem.loss_name, method=method, damping=1e-8, refine=steps
            )
            out.append(float((A @ flatten(dirs, model) - g).norm() / g.norm()))
    assert max(plain) > 1e-10  # the cancellation is real, so the test can tell
    assert max(refined) < 1e-10


@pytest.mark.parametrize(
    "method", ["layerwise", "full", "natural", "kfac"], ids=lambda m: f"method={m}"
)
def test_overflowing_metric_raises_solve_error(method):
    """A float32 factor of 1e20 overflows the metric: every method says so as SolveError."""
    model, x, y = Problem().make(dtype=torch.float32)

    def huge(outputs, targets):
        return torch.full((outputs.shape[0], 1, outputs.shape[1]), 1e20, dtype=outputs.dtype)

    with pytest.raises(rc.SolveError, match="NaN or inf"):
        rc.direction(model, x, y, method=method, output_metric=huge)


# ------------------------------------------------------------------ diagnostics

DIAG_METHODS = ("layerwise", "full", "natural", "kfac")


@pytest.mark.parametrize("method", DIAG_METHODS, ids=lambda m: f"method={m}")
@pytest.mark.parametrize(
    "problem",
    [Problem(depth=3), Problem(loss="mse", bias=False), PATHS[-1]],
    ids=lambda p: f"{p.id}-batch={p.batch}",
)
def test_diagnostics(problem, method):
    model, x, y = problem.make()
    dirs, diags = rc.direction(
        model, x, y, loss=problem.loss_name, method=method, damping=1e-3, return_diagnostics=True
    )
    assert isinstance(dirs, dict) and all(isinstance(d, rc.LayerDiagnostics) for d in diags)
    # exact factors: r = C - 1 rows per sample for cross-entropy (the rank), C for MSE
    d = problem.batch * (problem.classes - (problem.loss_name == "cross_entropy"))
    if method in ("full", "natural"):
        groups = [[n for n, _ in model.named_parameters()]]
        assert [row.name for row in diags] == ["(all)"]
    else:
        modules = [m for m, mod in model.named_modules() if list(mod.parameters(recurse=False))]
        groups = [
            [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] == m] for m in modules
        ]
        assert [row.name for row in diags] == modules
    for row, names in zip(diags, groups):
        assert row.method == method
        assert row.rows == d
        assert row.params == sum(dirs[n].numel() for n in names)
        assert row.condition >= 1
        assert 0 <= row.residual < 1e-8
        assert row.jitter >= 0
        block_norm = float(torch.sqrt(sum((dirs[n] ** 2).sum() for n in names)))
        assert row.update_norm == pytest.approx(block_norm, rel=1e-12)


@pytest.mark.parametrize("method", ["layerwise", "natural"], ids=lambda m: f"method={m}")
def test_diagnostics_rows_follow_samples(method):
    """``samples=5`` probes per sample give ``d = 5 N`` rows; a block solved on its own
    (layerwise) keeps ``min(r, m_out)`` rows per sample, where ``m_out`` is the block's
    output width (4 hidden units, 3 classes), since only their Gram enters ``K_a^T K_a``."""
    model, x, y = Problem().make()
    _, diags = rc.direction(
        model,
        x,
        y,
        method=method,
        output_metric="sampled",
        samples=5,
        damping=1e-2,
        return_diagnostics=True,
        generator=torch.Generator().manual_seed(0),
    )
    expected = [4 * 4, 4 * 3] if method == "layerwise" else [4 * 5]
    assert [row.rows for row in diags] == expected


def test_diagnostics_condition_is_that_of_the_damped_gram():
    """One Linear layer: the damped ``d x d`` Gram ``mu I + K K^T`` has the top ``d``
    eigenvalues of ``K^T K`` (the GGN) shifted by ``mu`` (and ``mu`` for any beyond its
    ``n`` unknowns)."""
    problem = Problem(depth=1)
    G, _, _ = oracle_for(problem)
    model, x, y = problem.make()
    _, (row,) = rc.direction(model, x, y, method="layerwise", damping=1e-2, return_diagnostics=True)
    lam = torch.linalg.eigvalsh(G).flip(0).clamp_min(0)
    smallest = float(lam[row.rows - 1]) if row.rows <= len(lam) else 0.0
    assert row.condition == pytest.approx(float(lam[0] + 1e-2) / (smallest + 1e-2), rel=1e-8)


def test_the_condition_of_a_jittered_float32_solve_is_positive():
    """Found by a hunt: at damping 1e-10 in float32 the rebuilt metric's smallest eigenvalue
    read below zero and the jitter did not make up for it: a condition of -4.6e8. A damped
    metric's eigenvalues are at least the damping, and the estimate is taken in float64."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the jitter and the accuracy are warned of
        _, (row,) = rc.direction(model, x, y, method="full", damping=1e-10, return_diagnostics=True)
    assert row.jitter > 0
    assert 1 <= row.condition < math.inf


def test_euclidean_has_no_diagnostics():
    model, x, y = Problem().make()
    _, diags = rc.direction(model, x, y, method="euclidean", return_diagnostics=True)
    assert diags == []


@pytest.mark.parametrize("frozen", [False, True], ids=["bias", "frozen-bias"])
def test_full_by_blocks_matches_the_oracle(frozen, device, monkeypatch):
    """``method='full'`` with its metric formed block by block from the samples' Grams
    (``full.blockwise``: taken here, a 40-24-10 MLP at batch 96, by the CPU's constants on
    every device: on CUDA the rule keeps ``K^T K`` at this size, ``costs.CUDA_BLOCK_COSTS``)
    against the dense float64 oracle (on the CPU), with the first layer's bias trained or
    frozen and a last layer without bias: each block's rows and columns in parameter order.
    (A block of a bias alone has ``K^T K`` formed from ``K``: no fewer FLOPs from the
    samples.)"""
    from riemann_core.methods import full

    monkeypatch.setattr(costs, "CUDA_BLOCK_COSTS", costs.CPU_BLOCK_COSTS)
    taken = []
    blockwise = full.blockwise
    monkeypatch.setattr(full, "blockwise", lambda hs: taken.append(blockwise(hs)) or taken[-1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(40, 24), torch.nn.Tanh(), torch.nn.Linear(24, 10, bias=False)
    ).double()
    model[0].bias.requires_grad_(not frozen)
    x, y = torch.randn(96, 40, dtype=torch.float64), torch.randint(0, 10, (96,))
    dirs = rc.direction(model.to(device), x.to(device), y.to(device), method="full", damping=1e-3)
    assert taken == [True]
    model, x, y = model.cpu(), x.cpu(), y.cpu()
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    got = torch.cat([dirs[name].reshape(-1).cpu() for name in trained])
    G, g = ggn(model, x, y, "cross_entropy"), gradient(model, x, y, "cross_entropy")
    assert rel_error(got, solve_dense(G, g, 1e-3)) < 1e-10


def test_full_metric_by_blocks_refuses_blocks_that_do_not_qualify(monkeypatch):
    """``full.metric(handlers, by_blocks=True)`` (for timing the two forms) needs every
    pair of blocks to qualify: one row per sample (a sampled Fisher's one probe) does not,
    and is refused with what to pass instead; ``by_blocks=False`` is ``K^T K``."""
    from riemann_core.methods import full

    seen, solve_ = [], full.solve
    monkeypatch.setattr(full, "solve", lambda p, opts: seen.append(p.handlers) or solve_(p, opts))
    model, x, y = Problem().make()
    rc.direction(model, x, y, method="full", output_metric="sampled", samples=1)
    with pytest.raises(ValueError, match="by_blocks=True needs every block"):
        full.metric(seen[0], by_blocks=True)
    torch.testing.assert_close(full.metric(seen[0], by_blocks=False), full.metric(seen[0]))


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 7 bytes"),
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 68.00 GiB"),
    ],
    ids=["cpu", "cuda"],
)
def test_full_says_what_it_needs_when_its_metric_does_not_fit(error, monkeypatch):
    """The allocator's failure to hold ``full``'s ``n x n`` metric (a 136k-parameter MLP
    needs 68 GiB in float32) is a ``MemoryError`` naming ``n``, the size and what to use
    instead; any other error passes as it was; the model and its ``.grad`` unchanged."""
    from riemann_core.methods import full

    def fails(handlers, by_blocks=None):
        raise error

    monkeypatch.setattr(full, "metric", fails)
    model, x, y = Problem().make()
    before = snapshot(model)
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(MemoryError, match=rf"the {n} x {n} metric .* method='layerwise'"):
        rc.direction(model, x, y, method="full")
    assert_unchanged(model, before)
    error = RuntimeError("some other failure")  # what `fails` raises now
    with pytest.raises(RuntimeError, match="^some other failure$"):
        rc.direction(model, x, y, method="full")


@pytest.mark.parametrize("method", ["layerwise", "natural"])
def test_a_gram_of_too_many_factor_rows_is_named_with_its_size_and_the_fix(method, monkeypatch):
    """Found by a hunt: 1000 classes at batch 256 under the exact Fisher make d = N (C - 1)
    = 255,744 rows, whose Gram (244 GiB in float32) the allocator refused with its raw
    message, from layerwise, natural and pre.backward alike. The failure is a MemoryError
    naming the Gram, d = N r, its size and the fix; another error passes as it was; the
    model and its .grad stay as they were."""
    from riemann_core.methods import SOLVERS

    error = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 7")

    def fails(problem, opts):
        raise error

    monkeypatch.setattr(SOLVERS[method], "solve", fails)
    model, x, y = Problem(classes=4).make()  # d = 4 samples x 3 rows, under each block's n
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot(model)
    d = f"d = N r = {x.shape[0]} x 3 factor rows"
    gram = (
        rf"Gram of {d}.*a 12 x 12 matrix"
        if method == "layerwise"
        else f"the 12 x 12 Gram of all {d}"
    )
    message = rf"method='{method}' .*{gram}.*iB in torch.float64.*output_metric='sampled'"
    with pytest.raises(MemoryError, match=message):
        rc.direction(model, x, y, method=method)
    pre = rc.RiemannianPreconditioner(model, method=method)
    with pytest.raises(MemoryError, match=message):
        pre.backward(F.cross_entropy(model(x), y))
    assert_unchanged(model, before)
    error = RuntimeError("some other failure")
    with pytest.raises(RuntimeError, match="^some other failure$"):
        rc.direction(model, x, y, method=method)


@pytest.mark.parametrize("method", ["layerwise", "natural", "full"])
def test_a_named_allocator_failure_keeps_the_allocators_type(method, monkeypatch):
    """Found by review: the MemoryError replaced torch's own error, so that code catching
    torch.cuda.OutOfMemoryError (or the CPU allocator's RuntimeError) by type, as
    riemann_core.scaling.sweep does to record a point as 'oom' and empty the cache, no
    longer caught it: a layerwise or natural point out of CUDA memory was an 'error'."""
    import riemann_core.scaling.sweep as sw
    from riemann_core.methods import SOLVERS

    raised = []

    def fails(problem, opts):
        raise raised[-1]

    monkeypatch.setattr(SOLVERS[method], "solve", fails)
    model, x, y = Problem(classes=4).make()
    raised.append(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"))
    with pytest.raises(
        torch.cuda.OutOfMemoryError, match=f"method='{method}' (forms|solves)"
    ) as err:
        rc.direction(model, x, y, method=method)
    assert isinstance(err.value, MemoryError)
    raised.append(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 7"))
    with pytest.raises(RuntimeError, match=f"method='{method}' (forms|solves)") as err:
        rc.direction(model, x, y, method=method)
    assert isinstance(err.value, MemoryError)
    assert not isinstance(err.value, torch.cuda.OutOfMemoryError)
    raised.append(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"))
    grid = sw.Grid(
        base={"width": 4, "depth": 1, "out_dim": 3, "batch": 4},
        axes={"width": (4,), "depth": (1,), "out_dim": (3,), "batch": (4,)},
        repeats=1,
        methods=(method,),
    )
    row = sw.measure_point(next(grid.runs()), grid)
    assert row["status"] == "oom" and f"method='{method}' " in row["reason"]


@pytest.mark.parametrize(
    "where, options, rows",
    [
        ("pullback", {}, r"4 samples x r = 3 rows \(C - 1 for the exact cross-entropy Fisher\)"),
        (
            "output_factor",
            {"output_metric": "sampled", "samples": 7},
            r"4 samples x r = 7 rows \(samples=7\)",
        ),
        (
            "pullback",
            {"loss": "mse"},
            r"4 samples x r = 4 rows \(C = 4 outputs per sample for the exact metric of "
            r"squared error\)",
        ),
        (  # (the exact squared error's factor is an expand: its memory is taken here)
            "factor_cotangents",
            {"loss": "mse"},
            r"4 samples x r = 4 rows \(C = 4 outputs per sample for the exact metric of "
            r"squared error\)",
        ),
        (
            "output_factor",
            {"output_metric": lambda z, y: z[:, None]},
            r"4 samples x r rows \(the custom",
        ),
    ],
    ids=["exact", "sampled", "mse", "mse-cotangents", "custom"],
)
@pytest.mark.parametrize("method", ["layerwise", "kfac"])
def test_factor_rows_too_many_to_pull_back_are_named_with_the_fix(
    method, where, options, rows, monkeypatch
):
    """Found by a hunt: samples=10**12 failed in forming the output metric's factor (before
    any solve, for every method that pulls rows back) with the allocator's byte count only.
    The failure, in forming the factor or in pulling its rows back, is a MemoryError naming
    the rows per sample, whence they come and the fix; from a device it stays a
    torch.cuda.OutOfMemoryError; another error passes as it was; the model and its .grad
    stay as they were, under pre.backward too."""
    from riemann_core.methods import _base

    raised = [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 7")]
    real = getattr(_base, where)

    def fails(*args, **kwargs):
        if raised:
            raise raised[-1]
        return real(*args, **kwargs)

    monkeypatch.setattr(_base, where, fails)
    loss = options.get("loss", "cross_entropy")
    model, x, y = Problem(classes=4, loss="mse" if loss == "mse" else "ce").make()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot(model)
    message = rf"ran out of memory (forming|pulling) the output metric's factor[^:]*: {rows}.*use output_metric='sampled'"
    with pytest.raises(MemoryError, match=message) as err:
        rc.direction(model, x, y, method=method, **options)
    assert isinstance(err.value, RuntimeError)
    if "output_metric" not in options or options["output_metric"] == "sampled":
        pre = rc.RiemannianPreconditioner(model, method=method, **options)
        target = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
        with pytest.raises(MemoryError, match=message):
            pre.backward(target(model(x), y))
        pre.remove()
    assert_unchanged(model, before)
    raised.append(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"))
    with pytest.raises(torch.cuda.OutOfMemoryError, match=message):
        rc.direction(model, x, y, method=method, **options)
    raised.append(RuntimeError("some other failure"))
    with pytest.raises(RuntimeError, match="^some other failure$"):
        rc.direction(model, x, y, method=method, **options)
    raised.clear()  # and without a failure, as before
    rc.direction(model, x, y, method=method, **options)


def test_rows_too_many_at_one_row_advise_a_smaller_batch_only(monkeypatch):
    """Found by review: at samples=1 the message advised the sampled metric with few
    samples, the setting that failed; and it gave the factor's size only, not the
    pulled-back rows' (which the allocator's count matches), nor the allocator's count."""
    from riemann_core.methods import _base

    def fails(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 7")

    monkeypatch.setattr(_base, "pullback", fails)
    model, x, y = Problem(classes=4).make()
    with pytest.raises(MemoryError) as err:
        rc.direction(model, x, y, method="kfac", output_metric="sampled", samples=1)
    message = str(err.value)
    assert "use a smaller batch" in message and "output_metric='sampled'" not in message
    assert "2 rows at the modules' outputs at least" in message and "you tried 7" in message


def test_rows_too_many_to_convert_to_the_solve_dtype_are_named(monkeypatch):
    """Found by review: solve_dtype=torch.float64 doubles the pulled-back float32 rows in
    converting them, outside any named region: the allocator's byte count only."""
    from riemann_core import modules

    def fails(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 7")

    monkeypatch.setattr(modules.LinearHandler, "to", fails)
    model, x, y = Problem(classes=4).make(dtype=torch.float32)
    with pytest.raises(
        MemoryError,
        match=r"ran out of memory converting the pulled-back rows to torch.float64: "
        r".* at least .* in torch.float64; use solve_dtype=None, output_metric='sampled'",
    ):
        rc.direction(model, x, y, method="layerwise", solve_dtype=torch.float64)


def test_the_rows_named_for_token_outputs_are_those_of_every_position():
    """(N, T, C) logits under the exact Fisher: T (C - 1) rows per sample."""
    from riemann_core.methods.memory import factor_rows

    rows, why = factor_rows(torch.zeros(2, 5, 3), Options(damping=1e-3))
    assert (rows, why) == (10, "T (C - 1) for the exact cross-entropy Fisher of T = 5 positions")


def test_a_named_allocator_failure_gives_the_blocks_own_dtype(monkeypatch):
    """Found by review: layerwise's message gave the size of a float64 block in the first
    block's float32 (half the bytes)."""
    from riemann_core.methods import layerwise

    def fails(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 7")

    class Double(torch.nn.Module):
        def forward(self, h):
            return h.double()

    monkeypatch.setattr(layerwise, "padded_gram", fails)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 300), torch.nn.Tanh(), Double(), torch.nn.Linear(300, 50).double()
    )
    x, y = torch.randn(64, 4), torch.randint(0, 50, (64,))
    with pytest.raises(
        MemoryError, match=r"block '3' .* a 3136 x 3136 matrix .*iB in torch.float64"
    ):
        rc.direction(model, x, y, method="layerwise")


class _RetainsGrad(torch.nn.Module):
    """An MLP that keeps its hidden layer's gradient for a plot (``h.retain_grad()``)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)

    def forward(self, x):
        h = self.fc1(x)
        h.retain_grad()
        self.h = h
        return self.fc2(torch.tanh(h))


@pytest.mark.parametrize("method", ("layerwise", "full", "natural", "kfac"))
def test_a_tensor_given_retain_grad_is_named_not_torchs_escaped_tensor_error(method):
    # found by review: the coupling probe raised torch's "tensor may have escaped from inside
    # a function being vmapped", naming neither retain_grad nor the fix
    torch.manual_seed(0)
    model = _RetainsGrad().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"retain_grad\(\).*flag of your own"):
        rc.direction(model, x, y, method=method)
    assert_unchanged(model, before)
