"""The forward passes behind a data-parallel step's ``.grad`` (riemann_core.passes); the
checks on ranks run in tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from riemann_core import passes
from riemann_core.passes import MAX_PASSES, Differentiated, Passes, check_shares


def test_the_passes_kept_between_two_steps_are_bounded():
    """Found by review: a loop that never called pre.step() (or evaluated with gradients
    enabled) added one record per forward pass for good."""
    kept = Passes()
    for n in range(MAX_PASSES + 44):
        kept.forward_ends([torch.zeros(n + 1, 3)], Differentiated([]), mean_ce=False)
    shapes = kept.shapes()
    assert len(shapes) == MAX_PASSES
    assert shapes[-1] == (MAX_PASSES + 44, 3)  # the last ones


@pytest.mark.parametrize(
    ("sizes", "alike"),
    [
        ([[2, 3], [2, 3]], True),
        ([[2, 4], [3, 6]], True),  # rank 0: 2 of 5, then 4 of 10
        ([[3, 1], [1, 3]], False),
        ([[5], [7]], True),
    ],
)
def test_shares_of_the_passes_must_be_alike(sizes, alike):
    """``sizes[p][k]``: rank p's samples in pass k; rank p's share of each pass must be
    the same (2 of 5 and 4 of 10; not 3 of 4 and 1 of 4)."""
    if alike:
        check_shares(sizes)
    else:
        with pytest.raises(ValueError, match=r"split between the ranks in other proportions"):
            check_shares(sizes)


@pytest.mark.parametrize("chunk", [2**22, 7])
def test_the_output_gradient_is_read_by_chunks_of_rows_alike(chunk, monkeypatch):
    """softmax(z) - R g, read by chunks of rows (a language model's outputs would need two
    more tensors of their size at once): the mean cross-entropy's is a distribution, a
    summed one's reaches (1 - R) softmax(z) below zero, whatever the chunks."""
    monkeypatch.setattr(passes, "CHUNK", chunk)
    torch.manual_seed(0)
    z, y = torch.randn(4, 6, 5, requires_grad=True), torch.randint(0, 5, (4, 6))
    lowest = {}
    for reduction in ("mean", "sum"):
        record = passes._Pass((4, 6, 5), Differentiated([]))
        out = z * 1.0  # a node the hook can sit on
        record.watch_mean(out)
        F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction=reduction).backward()
        assert record.rows == 24
        lowest[reduction] = float(record.lowest)
    p = torch.softmax(z.detach(), -1)
    assert lowest["mean"] >= -passes.tolerance(torch.float32)
    expected = (p - 24 * (p - F.one_hot(y, 5))).amin()  # the summed loss's gradient: p - e_y
    assert lowest["sum"] == pytest.approx(float(expected), rel=1e-5)


def test_an_empty_shard_leaves_the_user_backward_alone():
    """Found by review: the hook's amin() over zero rows raised inside the user's
    loss.backward(); the empty batch is named at the step, as before."""
    record = passes._Pass((0, 5), Differentiated([]))
    z = torch.zeros(0, 5, requires_grad=True)
    out = z * 1.0
    record.watch_mean(out)
    F.cross_entropy(out, torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    assert record.lowest is None
