"""riemann_core: layerwise Riemannian metrics (Pehle & Slotine, arXiv 2603.03610).

The layerwise metric ``G_a = mu I + K_a^T K_a`` beside the dense full-metric solver,
exact natural gradient and K-FAC, behind one interface::

    import riemann_core as rc
    dirs = rc.direction(model, x, y, method="layerwise", damping=1e-3)
"""

from ._warn import HookWarning
from .direction import direction
from .distributed import DistributedError
from .methods import METHODS, LayerDiagnostics
from .modules import Handler, read_by_holder, register_handler
from .preconditioner import RiemannianPreconditioner
from .woodbury import AccuracyWarning, SolveError

__all__ = [
    "METHODS",
    "AccuracyWarning",
    "DistributedError",
    "Handler",
    "HookWarning",
    "LayerDiagnostics",
    "RiemannianPreconditioner",
    "SolveError",
    "direction",
    "read_by_holder",
    "register_handler",
]
