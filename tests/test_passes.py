"""The forward passes behind a data-parallel step's ``.grad`` (riemann_core.passes); the
checks on ranks run in tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from riemann_core.passes import MAX_PASSES, Differentiated, Passes, check_shares


def test_the_passes_kept_between_two_steps_are_bounded():
    """Found by review: a loop that never called pre.step() (or evaluated with gradients
    enabled) added one record per forward pass for good."""
    passes = Passes()
    for n in range(MAX_PASSES + 44):
        passes.forward_ends([torch.zeros(n + 1, 3)], Differentiated([]), mean_ce=False)
    shapes = passes.shapes()
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
