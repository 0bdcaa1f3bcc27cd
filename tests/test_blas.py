"""BLAS ``syrk`` called from torch's own library: one triangle of ``R R^T``, in any layout,
and the Gram of every method through it equal to the one by GEMMs."""

import pytest
import torch

import riemann_core as rc
from riemann_core import blas, modules
from riemann_core.woodbury import column_major

NAN = float("nan")
needs_syrk = pytest.mark.skipif(
    not blas.symmetric_products("cpu"), reason="this torch build exports no BLAS syrk"
)


def layout(matrix, major, lead=0):
    """``matrix`` copied into row- or column-major memory with ``lead`` spare rows (columns)."""
    m, n = matrix.shape
    if major == "row":
        return torch.zeros(m, n + lead, dtype=matrix.dtype)[:, :n].copy_(matrix)
    return torch.zeros(n, m + lead, dtype=matrix.dtype).mT[:m].copy_(matrix)


@needs_syrk
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rows_major", ["row", "column"])
@pytest.mark.parametrize("out_major", ["row", "column"])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_syrk_writes_the_lower_triangle_and_leaves_the_upper_one(
    dtype, rows_major, out_major, beta
):
    torch.manual_seed(0)
    R = layout(torch.randn(7, 5, dtype=dtype), rows_major, lead=3)
    before = torch.randn(7, 7, dtype=dtype)
    out = layout(before, out_major, lead=2)
    blas.syrk_(R, out, beta)
    expected = R @ R.T + beta * before
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(out.tril(), expected.tril(), atol=tol, rtol=tol)
    assert torch.equal(out.triu(1), before.triu(1))


@needs_syrk
def test_syrk_reads_size_one_dimensions_whatever_their_stride():
    column = torch.randn(6, 1, dtype=torch.float64)
    out = torch.zeros(6, 6, dtype=torch.float64)
    blas.syrk_(column, out, 0.0)
    assert torch.allclose(out, (column @ column.T).tril())


@pytest.mark.parametrize(
    "rows, out, why",
    [
        (torch.randn(4, 3).half(), torch.zeros(4, 4).half(), "dtype"),
        (torch.randn(4, 3), torch.zeros(4, 4, dtype=torch.float64), "mixed dtypes"),
        (torch.randn(4, 6)[:, ::2], torch.zeros(4, 4), "no unit stride"),
        (torch.randn(4, 3), torch.zeros(5, 5), "shapes"),
        (torch.randn(4, 0), torch.zeros(4, 4), "no columns"),
    ],
    ids=lambda case: case if isinstance(case, str) else "",
)
def test_syrk_refuses_what_blas_cannot_take_as_it_lies(rows, out, why):
    assert not blas.symmetric_product_applies(rows, out)
    kept = out.clone()
    with pytest.raises(ValueError, match="syrk_ needs CPU float32 or float64 rows"):
        blas.syrk_(rows, out, 0.0)
    assert torch.equal(out, kept)


def test_no_syrk_where_autograd_would_record_the_product():
    rows = torch.randn(4, 3, requires_grad=True)
    assert not blas.symmetric_product_applies(rows, torch.zeros(4, 4))
    with torch.no_grad():
        assert blas.symmetric_product_applies(rows, torch.zeros(4, 4)) == blas.symmetric_products()


def test_no_syrk_off_the_cpu_nor_for_half_precision():
    assert not blas.symmetric_products("cuda")
    assert not blas.symmetric_products("cpu", torch.float16)
    assert blas._blas_syrk(torch.bfloat16) is None


@needs_syrk
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("blocks", [1, 3])
def test_lower_gram_by_syrk_equals_the_one_by_gemms(monkeypatch, add, scaled, blocks):
    """``modules.lower_gram``: the lower triangle of ``(R R^T) * S`` (S tiled over the
    probe blocks), added or written, is the same by ``syrk`` as by block-row GEMMs; zeros
    above the diagonal stay zeros or entries of the result (``damped_gram``'s promise)."""
    torch.manual_seed(1)
    m, k = 4, 6
    R = torch.randn(blocks * m, k, dtype=torch.float64)
    X = torch.randn(m, 3, dtype=torch.float64)
    S = X @ X.T + 1 if scaled else None
    start = torch.randn(blocks * m, blocks * m, dtype=torch.float64).tril()
    grams, uppers = [], []
    fresh = modules.column_major  # uninitialised memory may hold anything: NaN here

    def garbage(*shape, like, zero=False):
        return fresh(*shape, like=like, zero=zero) if zero else fresh(*shape, like=like).fill_(NAN)

    monkeypatch.setattr(modules, "column_major", garbage)
    for symmetric in (True, False):
        if not symmetric:
            monkeypatch.setattr(modules, "symmetric_product_applies", lambda rows, out: False)
        out = column_major(blocks * m, blocks * m, like=R)
        out.copy_(start)
        modules.lower_gram(R, blocks, out, add, S)
        grams.append(out.tril())
        uppers.append(out.triu(1))
    expected = (R @ R.T) * (S.repeat(blocks, blocks) if scaled else 1) + (start if add else 0)
    for gram, upper in zip(grams, uppers, strict=True):
        assert torch.allclose(gram, expected.tril(), atol=1e-12)
        written = upper != 0
        assert torch.allclose(upper[written], expected[written], atol=1e-12)


@needs_syrk
@pytest.mark.parametrize("method", ["layerwise", "natural"])
@pytest.mark.parametrize("kernel", ["structured", "generic"])
def test_directions_by_syrk_equal_those_by_gemms(monkeypatch, method, kernel):
    """The whole direction, with its condition estimate (which reads the Gram's diagonal
    blocks from their lower triangles), is the same with and without ``syrk``."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Linear(9, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12), torch.nn.Tanh(),
        torch.nn.Linear(12, 4),
    ).double()  # fmt: skip
    x, y = torch.randn(10, 9, dtype=torch.float64), torch.randint(0, 4, (10,))
    options = dict(method=method, kernel=kernel, return_diagnostics=True)
    with_syrk, diagnostics = rc.direction(model, x, y, **options)
    monkeypatch.setattr(modules, "symmetric_product_applies", lambda rows, out: False)
    without, diagnostics_without = rc.direction(model, x, y, **options)
    for name, value in with_syrk.items():
        assert torch.allclose(value, without[name], rtol=1e-10, atol=1e-12), name
    conditions = [(a.condition, b.condition) for a, b in zip(diagnostics, diagnostics_without)]
    assert all(a == pytest.approx(b, rel=1e-10) for a, b in conditions)
