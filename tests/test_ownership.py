"""The greedy plan that gives each block an owner rank, without processes."""

import itertools
import random

import pytest

from riemann_core.ownership import assign, greedy_ratio, loads, lower_bound


def optimal_load(costs, ranks):
    """The smallest largest load over every plan (brute force, small instances)."""
    return min(
        max(loads(costs, owners, ranks))
        for owners in itertools.product(range(ranks), repeat=len(costs))
    )


def test_largest_jobs_first_to_the_least_loaded_rank():
    assert assign([3.0, 5.0, 2.0, 2.0], 2) == [1, 0, 1, 0]
    assert assign([1.0, 1.0, 1.0], 3) == [0, 1, 2]  # ties: in order, to the lowest rank
    assert assign([4.0], 3) == [0]
    assert assign([], 2) == []


def test_one_rank_owns_everything():
    assert assign([2.0, 7.0, 1.0], 1) == [0, 0, 0]


def test_the_plan_depends_only_on_the_costs():
    costs = [random.Random(1).uniform(1, 10) for _ in range(9)]
    assert assign(costs, 4) == assign(list(costs), 4)


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_within_the_greedy_bound_of_the_best_plan(ranks):
    """Graham's bound, ``T <= (4/3 - 1/(3P)) T_opt``, and ``T >= max(sum/P, max)``."""
    rng = random.Random(ranks)
    for _ in range(40):
        costs = [
            rng.choice([1.0, 2.0, 3.0, rng.uniform(0.1, 10)]) for _ in range(rng.randint(1, 7))
        ]
        largest = max(loads(costs, assign(costs, ranks), ranks))
        assert largest <= greedy_ratio(ranks) * optimal_load(costs, ranks) * (1 + 1e-12)
        assert largest >= lower_bound(costs, ranks) * (1 - 1e-12)


def test_graham_worst_case_is_reached():
    """Five jobs 3, 3, 2, 2, 2 on two ranks: the greedy plan takes 7, the best 6."""
    costs = [3.0, 3.0, 2.0, 2.0, 2.0]
    assert max(loads(costs, assign(costs, 2), 2)) == 7 and optimal_load(costs, 2) == 6
    assert greedy_ratio(2) * 6 == pytest.approx(7)


def test_no_ranks_is_an_error():
    with pytest.raises(ValueError, match="at least one rank"):
        assign([1.0], 0)
