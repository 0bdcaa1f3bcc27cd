"""The methods: each module defines ``NEEDS_FACTOR`` and ``solve(problem, options)``.

``solve`` returns the directions per block (lists aligned with ``problem.gradient``)
and a list of :class:`LayerDiagnostics` (empty unless ``options.diagnostics``).
"""

from . import euclidean, full, kfac, layerwise, natural
from ._base import LayerDiagnostics, Options, Problem, build_problem

METHODS = ("euclidean", "layerwise", "full", "natural", "kfac")
SOLVERS = {
    "euclidean": euclidean,
    "layerwise": layerwise,
    "full": full,
    "natural": natural,
    "kfac": kfac,
}

__all__ = ["METHODS", "SOLVERS", "LayerDiagnostics", "Options", "Problem", "build_problem"]
