"""The methods: each module defines ``NEEDS_FACTOR`` and ``solve(problem, options)``.

``solve`` returns a list of :class:`Solve` records, one per solve (a block, or the
whole network), whose directions :func:`finish` checks and splits back per block.
"""

from . import euclidean, full, kfac, layerwise, natural
from ._base import LayerDiagnostics, Options, Problem, build_problem, problem_from_graph
from ._solve import SLOW_PATHS, Solve, finish, recording_slow_paths

METHODS = ("euclidean", "layerwise", "full", "natural", "kfac")
SOLVERS = {
    "euclidean": euclidean,
    "layerwise": layerwise,
    "full": full,
    "natural": natural,
    "kfac": kfac,
}

__all__ = [
    "METHODS",
    "SLOW_PATHS",
    "SOLVERS",
    "LayerDiagnostics",
    "Options",
    "Problem",
    "Solve",
    "build_problem",
    "problem_from_graph",
    "finish",
    "recording_slow_paths",
]
