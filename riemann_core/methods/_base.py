"""What every method shares: the forward capture, the gradient, the pulled-back factor."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .. import coupling
from .._checks import (
    KFAC_OPTIONS,
    OVERFLOW_FIX,
    Deferred,
    check_kfac_options,
    check_no_frequency_scaling,
    check_one_output,
    check_options,
    check_outputs,
    forward_arguments,
)
from ..capture import Replay, forward, notes_for, pullback_dtype
from ..factors import FactorFn, factor_cotangents, output_factor, pullback
from ..modules import (
    CONTAINERS,
    Block,
    Handler,
    argument_batch_dims,
    handler_for,
    is_container,
    is_read_by_holder,
    named_module,
    register_kernel_checks,
    rows_dot,
    sequence_first,
    structured_reason,
)
from .memory import named_when_rows_too_large

#: The pulled-back rows (the loss gradient and the factor's) go through the network one
#: backward pass after another, not vectorised by vmap, when there are at most this many
#: and the batch times the parameters is at most SERIAL_PULLBACK_WORK: vmap's batching
#: adds tensor operations that only its larger products repay. Measured on MLPs at batch
#: 128, sampled Fisher with one probe (two rows), as the training step's time, one pass
#: after another against vmap (interleaved rounds, both orders): 64-32-32-10 0.95-0.96x,
#: 256-256-256-10 0.96-0.99x, 512-512-512-10 1.02-1.07x, 784-1024-1024-10 1.04-1.06x
#: (torch 2.13, 2-core CPU).
SERIAL_PULLBACK_ROWS = 2
SERIAL_PULLBACK_WORK = 2**25  # batch x parameters: 1.7e7 at width 256, 6.8e7 at 512


@dataclass(frozen=True)
class Options:
    """The options of ``rc.direction`` after validation (see :meth:`checked`)."""

    damping: float
    loss: str = "cross_entropy"
    output_metric: str | FactorFn = "exact"
    samples: int = 1
    kernel: str = "structured"
    solve_dtype: torch.dtype | None = None
    diagnostics: bool = False
    generator: torch.Generator | None = None
    refine: int = 0
    check_coupling: bool | str = True
    kfac_damping: str = "exact"
    kfac_bias: str = "joint"

    @classmethod
    def checked(cls, method: str, methods, **options) -> Options:
        """Validate ``method`` and ``options`` (naming any bad one and its fix)."""
        unchecked = ("diagnostics", "generator", *KFAC_OPTIONS)
        check_options(
            method=method,
            methods=methods,
            **{k: v for k, v in options.items() if k not in unchecked},
        )
        check_kfac_options(method, **{k: options[k] for k in KFAC_OPTIONS if k in options})
        if not isinstance(options.get("diagnostics", False), bool):
            raise TypeError(
                "diagnostics (return_diagnostics of rc.direction) must be True or False, got "
                f"{options['diagnostics']!r}"
            )
        generator = options.get("generator")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(  # (found by review: accepted, or refused only at a first step)
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        numbers = {k: int(options[k]) for k in ("samples", "refine") if k in options}
        return cls(**{**options, **numbers, "damping": float(options["damping"])})


@dataclass
class LayerDiagnostics:
    """What one solve did. ``name`` is the block's module name (``"(all)"`` for a
    whole-network solve); ``rows`` the factor rows ``d``; ``params`` the unknowns;
    ``solver`` the algebra used (``"woodbury"``: the damped ``d x d`` Gram;
    ``"dense"``: the ``n x n`` metric; ``"kronecker"``: K-FAC eigenbases, exact damping;
    ``"kronecker-factored"``: K-FAC's factors damped apart, by Cholesky);
    ``condition`` the 2-norm condition number of the factorised matrix; ``residual``
    ``||G x - v|| / ||v||`` of the whole metric, evaluated in float64; ``jitter``
    added to its diagonal; ``update_norm`` ``||x||``."""

    name: str
    method: str
    kernel: str
    solver: str
    rows: int
    params: int
    condition: float
    residual: float
    jitter: float
    update_norm: float


class Problem:
    """A batch seen by the network, ready for any method.

    ``blocks`` are the blocks of the metric (a module that owns trainable parameters,
    or the modules that share one); ``handlers`` their kernels. ``gradient[i]`` lists the
    vectors to precondition for ``blocks[i]``, in the order of ``blocks[i].params``: the
    given ones, or the mean loss's gradient, formed on first use from ``Lambda_a``, its
    value at the block output (for 2-D Linear blocks ``g = Lambda^T Xt`` is never needed
    as such, see :meth:`K_gradient`).
    """

    def __init__(self, blocks, handlers=(), gradient=None, data_dtype=None):
        self.blocks: list[Block] = blocks
        self.handlers: list[Handler] = list(handlers)
        self.given = gradient is not None
        self._gradient: list[list[Tensor] | None] = gradient or [None] * len(blocks)
        self._handlers64: dict[int, Handler] = {}
        #: the dtype of the data the metric was formed from (rows pulled back in half
        #: precision under autocast), whose eps bounds the accuracy; None: the parameters'
        self.data_dtype: torch.dtype | None = data_dtype

    @property
    def gradient(self) -> list[list[Tensor]]:
        return [self.gradient_of(i) for i in range(len(self.blocks))]

    def gradient_of(self, i: int) -> list[Tensor]:
        """``blocks[i]``'s vectors, formed from ``Lambda`` on first use."""
        if self._gradient[i] is None:
            self._gradient[i] = self.handlers[i].gradient()
        return self._gradient[i]

    def in_one_dtype(self) -> None:
        """Every handler, and the vectors given, in the widest dtype among the handlers: a
        solve over every block at once needs one (a model with a float32 and a float64
        layer raised torch's "expected m1 and m2 to have the same dtype")."""
        dtype = functools.reduce(torch.promote_types, (h.dtype for h in self.handlers))
        if any(h.dtype != dtype for h in self.handlers):
            self.handlers = [h.to(dtype) for h in self.handlers]
            self._gradient = [g and [a.to(dtype) for a in g] for g in self._gradient]

    def factored(self, i: int) -> bool:
        """Whether block ``i``'s gradient is ``Lambda^T Xt`` and its products with ``K``
        run through ``Lambda`` (a 2-D ``nn.Linear``, the loss gradient not given)."""
        return not self.given and self.handlers[i].factored_gradient

    def rows_refinable(self, i: int) -> bool:
        """Whether a Woodbury solve of block ``i`` can be refined in its rows
        (``riemann_core.methods._solve.Solve.refine_rows``): a 2-D ``nn.Linear``, whose
        ``K K^T t`` runs through ``N``-sized factors, whether its gradient is the loss's
        carried with the rows or given whole (``pre.step()``, ``pre.backward``'s first call)."""
        return self.handlers[i].factored_gradient

    def output_grad64(self, i: int) -> Tensor:
        """``Lambda_a`` of a factored block (:meth:`factored`) in float64, ``N x f_out``."""
        h = self.handlers[i]
        return h.block.output_grad.double().reshape(h.N, h.f_out)

    def _output_grad(self, i: int) -> Tensor:
        """``Lambda_a`` of a factored block in the handler's dtype, ``N x f_out`` (found by a
        hunt: a Linear on ``(N, 1, f)`` inputs kept its ``(N, 1, f_out)`` and crashed)."""
        h = self.handlers[i]
        lam = h.block.output_grad.reshape(h.N, h.f_out)
        return lam if lam.dtype == h.dtype else lam.to(h.dtype)

    def K_gradient(self, i: int) -> Tensor:
        """``K_a g_a`` (``d``), through ``Lambda_a`` where the handler can."""
        if self.factored(i):
            return self.handlers[i].K_mv_output_grad(self._output_grad(i))
        return self.handlers[i].K_mv(self.gradient_of(i))

    def gradient_minus_K_tmv(
        self, i: int, t: Tensor, scale: float = 1.0, bound: bool = True
    ) -> tuple[list[Tensor], Tensor | None]:
        """``scale (g_a - K_a^T t)`` and an upper bound on its 2-norm, or ``None``. Where
        the handler can, one GEMM ``scale (Lambda - U)^T Xt`` (the scale in its alpha, no
        pass over ``n_a`` entries) whose bound (where ``bound``) comes from those small
        factors."""
        if self.factored(i):
            return self.handlers[i].output_grad_minus_K_tmv(self._output_grad(i), t, scale, bound)
        Kt = self.handlers[i].K_tmv(t)
        return [(g - k) * scale for g, k in zip(self.gradient_of(i), Kt, strict=True)], None

    # ---- the same metric and gradient in float64, for residuals and refinement

    def K_gradient64(self, i: int) -> Tensor:
        """``K_a g_a`` (``d``) in float64: through ``Lambda_a`` where the block is factored,
        else from the gradient as given (one GEMM of the forward's size in float64)."""
        if self.factored(i):
            return self.handler64(i).K_mv_output_grad(self.output_grad64(i))
        return self.handler64(i).K_mv([a.double() for a in self.gradient_of(i)])

    def gradient_minus_K_tmv64(
        self, i: int, t: Tensor, scale: float
    ) -> tuple[list[Tensor], Tensor | None]:
        """:meth:`gradient_minus_K_tmv` in float64, for ``t`` in float64; its bound only
        where the block is factored (else ``None``: the norm of the result is read)."""
        h = self.handler64(i)
        if self.factored(i):
            return h.output_grad_minus_K_tmv(self.output_grad64(i), t, scale)
        Kt = h.K_tmv(t)
        return [
            (g.double() - k) * scale for g, k in zip(self.gradient_of(i), Kt, strict=True)
        ], None

    def handler64(self, i: int) -> Handler:
        """``handlers[i]`` on its data converted to float64 (the same ``K_a``): a copy made
        on first use and kept with the problem, so that the residuals and refinement steps
        of one call convert the rows and form ``Xt Xt^T`` once (a problem lives for one
        call; the fast path never makes one)."""
        h = self.handlers[i]
        if h.dtype == torch.float64:
            return h
        if i not in self._handlers64:
            self._handlers64[i] = h.to(torch.float64)
        return self._handlers64[i]

    def gradient64(self, indices: list[int]) -> list[Tensor]:
        """The vectors of ``blocks[indices]`` in float64 (the loss gradient formed from
        ``Lambda`` in float64)."""
        if self.given:
            return [a.double() for i in indices for a in self.gradient_of(i)]
        return [a for i in indices for a in self.handler64(i).gradient()]

    def metric64(self, indices: list[int], damping: float):
        """``x -> (mu I + K_S^T K_S) x`` in float64, ``K_S`` the blocks ``indices`` side by
        side; ``x`` a list over their parameters."""
        handlers = [self.handler64(i) for i in indices]

        def G(x: list[Tensor]) -> list[Tensor]:
            parts = self._by_block(indices, x)
            Kx = sum(h.K_mv(p) for h, p in zip(handlers, parts, strict=True))
            KtKx = [a for h in handlers for a in h.K_tmv(Kx)]
            return [damping * a + b for a, b in zip(x, KtKx, strict=True)]

        return G

    def residual_squared(
        self, indices: list[int], x: list[Tensor], damping: float
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(q, e, c)``: ``q = ||G x - v||^2 / ||v||^2`` for ``x`` (a list over the
        parameters of ``blocks[indices]``, ``G`` as in :meth:`metric64`) in float64 from
        ``N``-sized factors, a bound ``e`` on its rounding error (``e`` is inf where
        ``||v||^2`` is not determined) and ``c = mu^2 ||x||^2 / ||v||^2`` (device scalars);
        ``None`` unless every block's gradient is ``v_a = Lambda_a^T Xt_a`` (a 2-D
        ``nn.Linear``).

        With ``Y_a = Xt_a x_a^T`` (``N x f_out``) and the rows ``s = sum_a K_a x_a``
        (``s_{p,b} = sum_a <delta_{a,p,b}, Y_{a,b}>``), block ``a``'s residual is
        ``r_a = mu x_a + K_a^T s - v_a = mu x_a + B_a^T Xt_a``, with
        ``B_a = sum_p diag(s_p) Delta_{a,p} - Lambda_a``, so that

            ||r_a||^2 = mu^2 ||x_a||^2 + 2 mu <B_a, Y_a> + <B_a B_a^T, Xt_a Xt_a^T>,
            ||v_a||^2 = <Lambda_a Lambda_a^T, Xt_a Xt_a^T>:

        one float64 GEMM of the forward's size per block (``Y_a``) and ``N x N`` ones
        (``Xt_a Xt_a^T`` over ``f_in``, the others over ``f_out``), where forming ``r`` and
        ``v`` takes three of the forward's size and passes over every parameter. Both sums
        cancel (``r`` is small; ``v`` may be), so their float64 rounding is bounded:
        ``gamma_n mu^2 ||x||^2 + gamma_m (2 mu ||B|| ||Xt|| ||x|| + ||B||^2 ||Xt||^2)`` for
        ``||r||^2`` and ``gamma_m ||Lambda||^2 ||Xt||^2`` for ``||v||^2`` (Frobenius norms;
        ``n`` parameters, ``m = N^2 + N f_out + f_in + f_out + 4`` terms per block plus the
        blocks, ``gamma_k = k u / (1 - k u)``, ``u = 2^-53``), and ``e`` bounds ``q`` over the
        interval both leave. The rounding of ``K x`` enters only times ``||K r||`` (to first
        order the large terms cancel) and is left out, as the direct evaluation leaves out
        its own.
        """
        if not all(self.factored(i) for i in indices):
            return None
        handlers = [self.handler64(i) for i in indices]
        parts = [[a.double() for a in p] for p in self._by_block(indices, x)]
        Y = [h.apply(p) for h, p in zip(handlers, parts, strict=True)]
        s = sum(rows_dot(h.Dl, y) for h, y in zip(handlers, Y, strict=True))
        terms = sum(
            h.residual_terms(p, y[:, 0], s, self.output_grad64(i), damping)
            for i, h, p, y in zip(indices, handlers, parts, Y, strict=True)
        )
        r2, v2, x_part, rest, lam_part = terms.unbind()
        gamma_n, gamma_m = (_gamma(k) for k in self._residual_terms_count(indices))
        r2_error, v2_error = gamma_n * x_part + gamma_m * rest, gamma_m * lam_part
        q = r2 / v2
        low, high = (r2 - r2_error) / (v2 + v2_error), (r2 + r2_error) / (v2 - v2_error)
        error = torch.maximum(high - q, q - low)
        return q, torch.where(v2 > 2 * v2_error, error, torch.inf), x_part / v2

    def _residual_terms_count(self, indices: list[int]) -> tuple[int, int]:
        """``(n, m)`` of :meth:`residual_squared`'s rounding bound."""
        handlers = [self.handlers[i] for i in indices]
        m = max(h.N**2 + h.N * h.f_out + h.P + h.f_out + 4 for h in handlers) + len(handlers)
        return sum(self.blocks[i].n_params for i in indices), m

    def residual_from_factors_pays(self, indices: list[int], bound: float) -> bool:
        """Whether :meth:`residual_squared` applies to ``blocks[indices]``, costs less than
        the direct evaluation (``N^2 (f_in + 2 f_out) + N f_in f_out`` against
        ``3 N f_in f_out`` multiply-adds per block, the direct one's passes over every
        parameter left out), and can settle a squared residual of ``bound^2``: its rounding
        bound, at least ``gamma_m`` relative, must fall well below it (for a float64
        model's bound, ``1e-12``, it does not)."""
        if not all(self.factored(i) for i in indices):
            return False
        handlers = [self.handlers[i] for i in indices]
        ours = sum(h.N**2 * (h.P + 2 * h.f_out) + h.N * h.P * h.f_out for h in handlers)
        direct = sum(3 * h.N * h.P * h.f_out for h in handlers)
        return ours < direct and 1000 * _gamma(self._residual_terms_count(indices)[1]) < bound**2

    def _by_block(self, indices: list[int], x: list[Tensor]) -> list[list[Tensor]]:
        """``x`` (a list over the parameters of ``blocks[indices]``) split by block."""
        parts, start = [], 0
        for i in indices:
            size = len(self.blocks[i].params)
            parts.append(x[start : start + size])
            start += size
        return parts


def _gamma(k: int) -> float:
    """``gamma_k = k u / (1 - k u)``: the relative rounding of a float64 sum of ``k`` terms
    (``u = 2^-53``)."""
    return k * 2.0**-53 / (1 - k * 2.0**-53)


def group_calls(calls: list[Block], model: nn.Module) -> list[Block]:
    """The blocks of the metric: calls that share a parameter (a module called twice,
    modules with a tied weight) are merged, in the order of their first call."""
    parent = list(range(len(calls)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i] = parent[parent[i]]
        return i

    first: dict[int, int] = {}
    for i, call in enumerate(calls):
        for p in call.params:
            parent[root(i)] = root(first.setdefault(id(p), i))
    groups: dict[int, list[Block]] = {}
    for i, call in enumerate(calls):
        groups.setdefault(root(i), []).append(call)
    if all(len(group) == 1 for group in groups.values()):  # nothing shared
        return list(calls)
    names = {id(p): n for n, p in model.named_parameters()}
    order = {key: i for i, key in enumerate(names)}
    blocks = []
    for group in groups.values():  # in the order of their first call
        if len(group) == 1:
            blocks.append(group[0])
            continue
        params = {id(p): p for c in group for p in c.params}
        params = sorted(params.values(), key=lambda p: order[id(p)])
        blocks.append(
            Block(
                name="+".join(dict.fromkeys(c.name for c in group)),
                module=None,
                param_names=[names[id(p)] for p in params],
                params=params,
                inputs=(),
                output=None,
                calls=tuple(group),
            )
        )
    return blocks


def _check_reached(model, blocks, outputs, targets, opts, gradient) -> None:
    """Refuse trainable parameters that the loss depends on but whose module was not
    called (``F.linear(h, self.emb.weight)``: tying through a functional call), since no
    kernel sees them; parameters that take no part at all get a zero direction."""
    seen = {id(p) for b in blocks for p in b.params}
    unreached = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen
    ]
    if not unreached:
        return
    if gradient is not None:
        used = [n for n, _ in unreached if n in gradient and bool(gradient[n].ne(0).any())]
    else:
        grads = torch.autograd.grad(
            mean_loss(outputs, targets, opts.loss),
            [p for _, p in unreached],
            retain_graph=True,
            allow_unused=True,
        )
        used = [n for (n, _), g in zip(unreached, grads, strict=True) if g is not None]
    if used and gradient is not None:  # a .grad given: it may be left from another pass
        raise ValueError(
            f"parameters {used} have a nonzero gradient, but their modules were not called "
            "in the model's forward pass: the loss reaches them another way (weight tying "
            "through F.linear, a head applied outside forward), which no kernel sees; or the "
            ".grad is left from an earlier step (call opt.zero_grad() before the backward "
            "pass); or from an earlier micro-batch whose pass called them, where the last "
            "one, whose batch the metric is taken at, did not (a branch or expert routed by "
            "the batch: the metric has no rows for them; pass the micro-batches through one "
            f"forward pass, concatenated, or step after each).{_held_by(model, used)} Call "
            "the owning module inside forward, or freeze them with requires_grad_(False)"
        )
    if used:
        raise ValueError(
            f"parameters {used} enter the loss without their module being called in the "
            "model's forward pass (weight tying through F.linear, or a head applied outside "
            f"forward to a submodule's output); no kernel sees them.{_held_by(model, used)} "
            "Call the owning module inside forward, or freeze them with requires_grad_(False)"
        )


def _held_by(model: nn.Module, used: list[str]) -> str:
    """Where the module of the first of ``used`` (parameter names) is held by another: that
    module named, whose forward may read the parameters without calling their module (found
    by a hunt: torchvision's Swin attention, ``F.linear(x, self.qkv.weight, ...)``); where
    :func:`~riemann_core.modules.read_by_holder` marked it already, that its holder was not
    called, or that the model itself is marked, which no module holds (found by review:
    told only of a module not called, or to mark the module marked)."""
    owner = used[0].rpartition(".")[0]  # (a trainable parametrization is refused before)
    # (by the names named_parameters gave, not get_submodule's getattr: found by review, a
    # child shadowed by a property raised AttributeError in place of the refusal)
    modules = dict(model.named_modules())
    chain = [owner]  # it and the containers above it: a call of the last one sees them
    while chain[-1] and is_container(modules.get(chain[-1])):
        chain.append(chain[-1].rpartition(".")[0])
    if is_read_by_holder(modules.get(chain[-1])):  # the model's mark: never called
        return marked_model(model)
    marked = next((n for n in reversed(chain[:-1]) if is_read_by_holder(modules.get(n))), None)
    if marked is not None and chain[-1] in modules:
        return (
            f" {marked!r} is marked by rc.read_by_holder, so only a call of "
            f"{named_module(chain[-1], modules[chain[-1]])}, which holds it, sees its "
            "parameters: none was made."
        )
    if not owner:  # the model's own parameter
        return ""
    holder = owner.rpartition(".")[0]
    while holder and is_container(modules.get(holder)):  # a ModuleList's holder
        holder = holder.rpartition(".")[0]
    if holder not in modules:  # (names of a model that overrides named_parameters)
        return ""
    kind = type(modules[holder]).__name__
    where = f"module {holder!r} ({kind})" if holder else f"the model ({kind})"
    return (
        f" {owner!r} is held by {where}, whose forward may read its parameters without "
        "calling it (F.linear(x, self.qkv.weight, self.qkv.bias), as torchvision's Swin "
        f"attention does): then mark it, rc.read_by_holder(model.get_submodule({owner!r})), "
        "and take kernel='auto'."
    )


def marked_model(model: nn.Module) -> str:
    """Where ``model`` itself is marked by :func:`~riemann_core.modules.read_by_holder`,
    which hides its parameters (and its marked submodules') from every call, the refusal's
    sentence naming it and the fix (after a space); else ``""``."""
    if not is_read_by_holder(model):
        return ""
    return (
        f" The model ({type(model).__name__}) is marked by rc.read_by_holder, but no module "
        "holds it to call it: unmark it, rc.read_by_holder(model, marked=False), and mark "
        "the submodules its forward reads without calling them instead."
    )


def mean_loss(outputs: Tensor, targets: Tensor, loss: str) -> Tensor:
    """The mean loss as torch defines it (``reduction="mean"``)."""
    if loss == "cross_entropy":  # classes along the last dimension, mean over positions
        C = outputs.shape[-1]
        return F.cross_entropy(outputs.reshape(-1, C), targets.reshape(-1).long())
    return F.mse_loss(outputs, targets)


def mean_loss_gradient(outputs: Tensor, targets: Tensor, loss: str) -> Tensor:
    """The gradient of :func:`mean_loss` in ``outputs`` (detached), each entry to a few
    ``eps`` of itself.

    Cross-entropy: ``(p - e_y) / M`` over the ``M`` positions, the target's entry
    ``p_y - 1`` formed as ``-sum_{j != y} p_j``. Autograd's ``exp(log p_y) - 1`` cancels
    where ``p_y`` nears 1, to an error of ``eps / (1 - p_y)`` (found by a hunt: float32
    logits with ``p_y = 1 - 1e-7`` gave a gradient, and every method's direction, 82% off
    at ``cond(G) ~ 1``). Squared error: autograd's ``2 (z - y) / numel``, exact but for the
    rounding of ``z`` itself."""
    z = outputs.detach()
    if loss != "cross_entropy":
        z.requires_grad_()
        with torch.enable_grad():
            return torch.autograd.grad(mean_loss(z, targets, loss), z)[0]
    C = z.shape[-1]
    y = targets.reshape(-1, 1).long()
    others = torch.softmax(z.reshape(-1, C), dim=1).scatter_(1, y, 0)
    gradient = others.scatter_(1, y, -others.sum(1, keepdim=True))
    return gradient.div_(y.shape[0]).reshape(z.shape)


def _probe_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Floating inputs of the batch (first dimension that of the first positional tensor)
    as non-leaf tensors in the graph, so that the coupling probe reaches the first module's
    input too (and in-place operations on them still work); others (an attention mask of
    the positions) as they are."""
    first = next((a for a in args if isinstance(a, Tensor) and a.ndim > 0), None)

    def leaf(a):
        if not isinstance(a, Tensor) or not a.is_floating_point() or a.ndim == 0:
            return a
        if first is not None and a.shape[0] != first.shape[0]:
            return a
        return a.detach().requires_grad_().clone()

    return pytree.tree_map(leaf, (args, kwargs))


def build_problem(
    model: nn.Module,
    inputs,
    targets: Tensor | None,
    opts: Options,
    *,
    needs_factor: bool,
    gradient: dict[str, Tensor] | None = None,
    forward_kwargs: dict | None = None,
    checks: Deferred | None = None,
    replay: Replay | None = None,
) -> Problem:
    """Forward pass, the loss gradient (unless ``gradient`` maps parameter names to the
    vectors to precondition) and, if needed, the pulled-back factor. ``targets`` may be
    ``None`` when ``gradient`` is given (they then reach only a custom output metric).

    ``inputs`` is the model's argument, or a tuple of its positional arguments, beside
    ``forward_kwargs``. Checks of the data join ``checks`` and are read (one host sync)
    after the forward pass, before the loss is formed; the batch-coupling probe's join
    them for the caller to read. ``replay``: a recorded forward pass to run again, whose
    output the new pass must reproduce (:class:`riemann_core.capture.Replay`).

    With the factor, the loss gradient at the network output rides along as one more
    cotangent row of the pullback, which yields ``Lambda_a`` at every block output.
    Uses ``torch.autograd.grad`` throughout, so no ``.grad`` is touched; runs with
    gradients enabled even when called under ``torch.no_grad()``.
    """
    own = checks is None
    checks = Deferred() if own else checks
    args, kwargs = forward_arguments(inputs, forward_kwargs)
    with torch.enable_grad():
        problem = _build_problem(
            model, args, kwargs, targets, opts, needs_factor, gradient, checks, replay
        )
    if own:
        checks.run()
    return problem


def _build_problem(
    model, args, kwargs, targets, opts, needs_factor, gradient, checks, replay
) -> Problem:
    notes = notes_for(model)
    key = coupling.probe_key(
        model, args, kwargs, opts.kernel, None if replay is None else replay.autocast
    )
    probing = needs_factor and coupling.needs_probe(notes, key, opts.check_coupling)
    if probing:
        args, kwargs = _probe_inputs(args, kwargs)
    # (a checkpointed segment's backward runs through this pass's nodes, hooks included)
    watch = coupling.watching_backward_hooks(model) if probing else contextlib.nullcontext([])
    with watch as hooks:
        outputs, calls = forward(model, args, kwargs, replay=replay)
    if needs_factor and torch.is_tensor(outputs):
        check_output_batch(calls, outputs, args)
    if replay is not None:  # read with the data's checks, before what a wrong path breaks
        replay.check(outputs, checks)
        if replay.reached and torch.is_tensor(outputs):
            nodes = set()
            reached = coupling.reached_parameters(outputs, calls, nodes)
            replay.check_kept(nodes, calls)
            replay.check_reach(reached, calls)
        if replay.coupled is not None and torch.is_tensor(outputs):
            replay.coupled(outputs, calls)
    return problem_from_graph(
        model,
        outputs,
        calls,
        targets,
        opts,
        checks,
        needs_factor=needs_factor,
        gradient=gradient,
        probe=coupling.Probe(key, lambda: forward_only(model, args, kwargs, replay), hooks)
        if probing
        else None,
    )


def problem_from_graph(
    model: nn.Module,
    outputs: Tensor,
    calls: list[Block],
    targets: Tensor | None,
    opts: Options,
    checks: Deferred,
    *,
    needs_factor: bool = True,
    gradient: dict[str, Tensor] | None = None,
    loss: Tensor | None = None,
    through_output: bool = True,
    output_gradient: Tensor | None = None,
    probe=None,
    overflow: type | None = None,
) -> Problem:
    """The problem of a forward pass already run: its ``outputs`` and the ``calls`` of
    the modules with parameters (:mod:`riemann_core.capture`), still in the autograd graph.

    The vectors to precondition are ``gradient`` (``{name: vector}``) or the gradient of
    ``loss`` (a scalar in the graph of ``outputs``: the user's own loss, whose graph is
    then consumed as ``loss.backward()`` would; ``through_output``: it reaches the
    network only through ``outputs``, where its gradient is ``output_gradient`` if the
    caller already took it) or else of the mean loss on ``targets``. ``probe``: run the
    batch-coupling probe on this graph (a :class:`~riemann_core.coupling.Probe`). Checks of
    the data are read once (a host sync) before the loss gradient is formed. ``overflow``:
    the error a non-finite loss gradient raises, at the outputs or pulled back to a module
    (a loss scaled by a ``GradScaler``; by default the outputs' is refused as bad input).
    """
    check_one_output(outputs)
    check_outputs(outputs, targets, opts.loss, checks)
    if needs_factor:  # (the gradient alone needs no samples along dimension 0)
        check_batch_dimension(calls, outputs)
    if not calls:
        raise ValueError(
            "no module with trainable parameters took part in the forward pass; "
            "nothing to precondition (a submodule called as module.forward(x), not "
            "module(x), runs without the hooks that see it: call it as module(x))"
            f"{marked_model(model)}"
        )
    checks.run()  # the data, parameters and outputs, before the loss is formed from them
    blocks = group_calls(calls, model)
    if loss is None:
        _check_reached(model, blocks, outputs, targets, opts, gradient)
    given = None if gradient is None else [[gradient[n] for n in b.param_names] for b in blocks]
    if not needs_factor:
        if given is None:
            params = [p for b in blocks for p in b.params]
            if loss is None:  # the mean loss's gradient, as the other methods take it
                seed = mean_loss_gradient(outputs, targets, opts.loss)
                flat = torch.autograd.grad(outputs, params, seed, allow_unused=True)
            else:
                flat = torch.autograd.grad(loss, params, allow_unused=True)
            flat = [
                torch.zeros_like(p) if g is None else g for g, p in zip(flat, params, strict=True)
            ]
            names = [n for b in blocks for n in b.param_names]
            items = [(f"the gradient of {n!r}", g) for n, g in zip(names, flat, strict=True)]
            checks.finite_all(items, OVERFLOW_FIX, overflow or ValueError)
            given = [[flat.pop(0) for _ in b.params] for b in blocks]
        return Problem(blocks, gradient=given)

    if loss is None:  # (pre.backward checks its loss's graph before any of it is consumed)
        names = {id(p): n for b in blocks for n, p in zip(b.param_names, b.params, strict=True)}
        check_no_frequency_scaling(outputs, names)
    z = outputs.reshape(outputs.shape[0], -1)
    # the factor and its cotangents (the exact squared error's is an expand, its memory
    # taken by factor_cotangents; found by review)
    with named_when_rows_too_large(outputs, opts):
        factor = output_factor(
            outputs.detach(),
            targets,
            loss=opts.loss,
            output_metric=opts.output_metric,
            samples=opts.samples,
            generator=opts.generator,
        )
        cotangents = factor_cotangents(factor)
        cotangents = cotangents.reshape(cotangents.shape[:1] + outputs.shape)
        del factor  # (freed before the pullback's rows are formed)
    if callable(opts.output_metric):
        checks.finite(
            "the factor of the custom output_metric",
            cotangents,
            "check the output_metric callable",
        )
    r = cotangents.shape[0]
    if given is None and loss is None:  # the loss gradient rides along as row 0
        output_gradient = mean_loss_gradient(outputs, targets, opts.loss)
    if given is None and through_output:  # seeded at the output: only the network's graph is
        dz = output_gradient  # batched
        if dz is None:
            (dz,) = torch.autograd.grad(loss, outputs, retain_graph=True)
        checks.finite("the loss gradient at the outputs", dz, OVERFLOW_FIX, overflow or ValueError)
    # the probe below needs the graph; otherwise it is freed, as by loss.backward()
    k, work = r + (given is None), outputs.shape[0] * sum(b.n_params for b in blocks)
    batched = k > SERIAL_PULLBACK_ROWS or work > SERIAL_PULLBACK_WORK
    module_outputs = [c.output for c in calls]
    # (read before the pullback frees the graph)
    path_dtype = pullback_dtype(outputs, module_outputs, outputs.dtype)
    # (the rows joined with the loss gradient's are as large as the factor: found by review)
    with named_when_rows_too_large(outputs, opts, r, module_outputs):
        roots, seeds = (outputs,), (cotangents,)
        if given is None and through_output:
            seeds = (torch.cat([dz[None], cotangents]),)
        elif given is None:  # the loss seeded with 1, the output with 0
            seed = torch.zeros(k, dtype=loss.dtype, device=loss.device)
            seed[0] = 1
            roots = (loss, outputs)
            seeds = (seed, torch.cat([torch.zeros_like(cotangents[:1]), cotangents]))
        del cotangents
        pulled = pullback(
            roots, seeds, module_outputs, retain_graph=probe is not None, batched=batched
        )
        del seeds
    for c, delta in zip(calls, pulled, strict=True):
        c.delta = delta if given is not None else delta[1:]
        c.output_grad = None if given is not None else delta[0]
    if overflow is not None and given is None:  # half-precision rows may overflow on the way
        items = [
            (f"the loss gradient at the output of {named_module(c.name)}", c.output_grad)
            for c in calls
        ]
        checks.finite_all(items, OVERFLOW_FIX, overflow)
    handlers = [handler_for(b, opts.kernel) for b in blocks]
    for h in handlers:  # (before the probe's: a registered kernel's wrong gradient reads
        # there as a parameter used outside its module)
        register_kernel_checks(checks, h)
    # the precision the rows were pulled back in (half under autocast, or through a frozen
    # half-precision module) bounds the accuracy
    dtypes = [path_dtype, *(h.dtype for h in handlers)]
    data_dtype = max(dtypes, key=lambda d: torch.finfo(d).eps)
    if probe is not None:
        coupling.register(checks, notes_for(model), model, z, calls, handlers, probe, path_dtype)
    if opts.check_coupling:  # (the Jacobian check is one of the probe's)
        coupling.register_splits(checks, notes_for(model), handlers, probed=probe is not None)
    dtype = opts.solve_dtype
    if dtype is not None and dtype != z.dtype:  # the whole algebra in solve_dtype
        # (the pulled-back rows converted: twice their memory from float32 to float64)
        with named_when_rows_too_large(outputs, opts, r, module_outputs, dtype):
            handlers = [h.to(dtype) for h in handlers]
        given = None if given is None else [[a.to(dtype) for a in g] for g in given]
    # a forward pass under autocast: rows pulled back in half precision, the algebra in
    # the parameters' dtype (no half-precision Cholesky; half the digits would be lost)
    half = (torch.float16, torch.bfloat16)
    to = next((h.block.params[0].dtype for h in handlers if h.dtype in half), None)
    if to is not None:
        with named_when_rows_too_large(outputs, opts, r, module_outputs, to):
            handlers = [h.to(h.block.params[0].dtype) if h.dtype in half else h for h in handlers]
    for c in calls:
        c.output, c.graph_inputs = None, ()  # release the graph
    return Problem(blocks, handlers, given, data_dtype)


def check_output_batch(calls: list[Block], outputs: Tensor, args: tuple) -> None:
    """Refuse outputs whose first dimension is not the batch that the first positional
    tensor and every module with parameters agree on (found by a hunt: logits flattened to
    ``(N T, C)`` in ``forward`` were blamed on the first module, with ``N T`` for the
    batch). A call that returns outputs of the model's outputs' shape (the model's own, where
    it holds parameters, or a wrapped model's) is no witness (found by a hunt: a positional
    table held by the model had the flattened logits blamed on its embedding)."""
    first = next((a for a in args if isinstance(a, Tensor) and a.ndim), None)
    if first is None or outputs.ndim == 0:  # (a scalar output is refused as such)
        return
    M, N = first.shape[0], outputs.shape[0]
    witnesses = [c for c in calls if c.output.shape != outputs.shape]
    if M == N or any(c.output.shape[:1] != (M,) for c in witnesses):
        return
    flattened = f" (the batch flattened with another dimension, {M} * T?)" if N % M == 0 else ""
    raise ValueError(
        f"the model's output has shape {tuple(outputs.shape)}, whose first dimension is not "
        f"the batch of {M} samples of its inputs and modules{flattened}: return the outputs "
        f"with the batch on dimension 0 (token logits as ({M}, T, C): cross-entropy reads "
        "them per position) and flatten them in the loss"
    )


def check_batch_dimension(calls: list[Block], outputs: Tensor) -> None:
    """Refuse a module with parameters whose output's first dimension is not the batch
    (the metrics pull rows back sample by sample), or that is called once per sample."""
    N = outputs.shape[0]
    for c in calls:
        if c.output.shape[:1] != outputs.shape[:1]:
            if _one_sample(c):  # (found by a docs check: told only of its output's shape)
                _refuse_per_sample(c, N)
            rows = c.output.shape[0] if c.output.ndim else 0
            # (found by a hunt: the batch flattened with time was told only of tables; by a
            # hunt of timm: its Swin and LeViT were told to call their modules on the batch,
            # a rewrite of timm, where marks make them exact)
            flattened = (
                f"; if its {rows} rows are the batch flattened with another dimension "
                f"(h.reshape({N} * T, f)), call it on the ({N}, T, f) tensor instead "
                f"(nn.Linear takes any leading dimensions; a convolution, each step's ({N}, "
                "C, ...) slice); where a module that takes the batch folds it with another "
                "dimension and calls others on the result (timm's Swin, whose "
                f"SwinTransformerBlock calls its WindowAttention on ({N} * windows, T, C); "
                f"timm's LeViT, whose LinearNorm calls its BatchNorm1d on ({N} * T, C)), mark "
                "those modules and their submodules with parameters as read by it, "
                "rc.read_by_holder(blk.attn, blk.attn.qkv, blk.attn.proj) for each "
                "SwinTransformerBlock blk, rc.read_by_holder(m.bn) for each LinearNorm m, and "
                "pass kernel='auto': it is then evaluated whole, one sample at a time"
                if rows > N and rows % N == 0
                else ""
            )
            # (found by a hunt: Hugging Face's GPT-2, BERT and DistilBERT look up their
            # position embeddings on (1, T) indices, told only of tables held otherwise)
            if rows == 1 and isinstance(c.module, (nn.Embedding, nn.EmbeddingBag)):
                flattened += (
                    f"; an embedding looked up on indices of shape (1, T) (position ids, as "
                    "Hugging Face models build them when none are passed) gives every sample "
                    f"the same rows: pass the indices expanded to the batch, ({N}, T), e.g. "
                    f"position_ids=torch.arange(T).expand({N}, T) as a forward argument"
                )
            # a table of indices of its own, (T, T) relative-position buckets as Hugging
            # Face's T5 looks up its bias on, can only be frozen; a position table on
            # torch.arange(T) can be trained as the message's first fix says
            elif (
                not flattened
                and isinstance(c.module, (nn.Embedding, nn.EmbeddingBag))
                and c.input.ndim >= 2
            ):
                flattened += (
                    f"; an embedding looked up on a table of indices of shape "
                    f"{tuple(c.input.shape)} that every sample shares (a relative "
                    "position bias, as Hugging Face's T5 looks up its relative_attention_bias "
                    "on (T, T) buckets) cannot be trained here: freeze it, "
                    f"model.get_submodule({c.name!r}).requires_grad_(False), and the "
                    "other parameters' direction is exact"
                )
            if sequence_first(c.module, c.inputs, c.kwargs):  # (its output joined, batch first)
                flattened += (
                    f"; it is sequence-first (batch_first=False): its query, key and value "
                    f"are (L, N, E), the batch in their second dimension, here {rows}, and its "
                    "output joined batch first: pass them so (x.transpose(0, 1)), or build "
                    "it with batch_first=True and pass (N, L, E)"
                )
            raise ValueError(
                f"{named_module(c.name)} returns shape {tuple(c.output.shape)}, whose first dimension "
                f"is not the batch of {N} samples; the metrics need every module with "
                "parameters to map samples along dimension 0 (no reshaping of the batch into "
                "other dimensions around it; a table of positions, an nn.Embedding called on "
                "torch.arange(T), as an nn.Parameter that a small module of its own adds in "
                "forward (held by a module whose forward draws dropout, it cannot be "
                f"evaluated one sample at a time)){flattened}{_inside_holder(c, calls, N)}"
            )
    _check_per_sample_calls(calls, N)


def _inside_holder(c: Block, calls: list[Block], N: int) -> str:
    """Where ``c``, a call whose output is not batched, is made inside the forward of a
    module with parameters that the generic kernel evaluates one sample at a time, each
    call of ``c`` inside it then (found by review: torchvision's Swin V2 attention, whose
    ``cpb_mlp`` maps a table of coordinates, was refused without the fix): the mark that
    makes ``c``'s parameters that module's, named."""
    holders = {
        h.name: h
        for h in calls
        if h.name and h.output.shape[:1] == (N,) and structured_reason(h.module) is not None
    }
    parts = c.name.split(".")
    at = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in holders), None)
    if at is None:
        return ""
    holder = holders[".".join(parts[:at])]
    inside = dict(holder.module.named_modules())
    end = at + 1  # the holder's child on the way down, past its ModuleLists
    while end < len(parts) and type(inside.get(".".join(parts[at:end]))) in CONTAINERS:
        end += 1
    child, name = inside.get(".".join(parts[at:end])), ".".join(parts[:end])
    if child is None:  # (names of a model that overrides named_modules)
        return ""
    marks = f"model.get_submodule({name!r})"
    if next(child.children(), None) is not None:  # its submodules too
        marks = f"*{marks}.modules()"
    return (
        f"; it is called inside {named_module(holder.name, holder.module)}, whose forward "
        "the generic kernel evaluates one sample at a time (kernel='auto'): mark it read by "
        f"that module, rc.read_by_holder({marks}), and its parameters join that module's block"
    )


def _check_per_sample_calls(calls: list[Block], N: int) -> None:
    """Refuse a module called once per sample (``torch.stack([self.a(row) for row in x])``),
    whose outputs pass the check of the batch dimension where their width equals the
    batch size (found by review: the kernels then crashed deep inside): a ``Linear`` or
    convolution called on an unbatched input (one sample: a 1-D input of a ``Linear``),
    or a module called more than once with no tensor input whose first dimension is the
    batch's and an output not broadcast over it (one call that broadcasts a table over the
    batch, or several such calls, a table per step, are exact)."""
    unbatched: dict[int, list[Block]] = {}
    for c in calls:
        leaves, dims = c.inputs, [0] * len(c.inputs)  # (a call on tensors alone needs no walk)
        # (and each argument's batch dimension where it may be another: found by review, a
        # sequence-first attention called twice was refused as called once per sample)
        if c.kwargs or c.graph_dims is not None or not all(isinstance(t, Tensor) for t in leaves):
            leaves = pytree.tree_leaves((c.inputs, c.kwargs))
            dims = argument_batch_dims(c.module, c.inputs, c.kwargs)
        tensors = [(t, d) for t, d in zip(leaves, dims, strict=True) if isinstance(t, Tensor)]
        if not tensors:
            continue
        one_sample = _one_sample(c)
        broadcast = c.output.ndim and c.output.stride(0) == 0  # (expanded over the batch)
        if one_sample or not (broadcast or any(t.ndim > d and t.shape[d] == N for t, d in tensors)):
            unbatched.setdefault(id(c.module), []).append(c)
            if one_sample or len(unbatched[id(c.module)]) > 1:
                _refuse_per_sample(c, N)


def _one_sample(c: Block) -> bool:
    """A ``Linear`` or convolution called on one sample's unbatched input."""
    module, x = c.module, c.inputs[0] if c.inputs else c.kwargs.get("input")
    if not isinstance(x, Tensor):
        return False
    return (isinstance(module, nn.Linear) and x.ndim < 2) or (
        isinstance(module, nn.modules.conv._ConvNd) and x.ndim == len(module.kernel_size) + 1
    )


def _refuse_per_sample(c: Block, N: int) -> None:
    leaves = pytree.tree_leaves((c.inputs, c.kwargs))
    shapes = [tuple(t.shape) for t in leaves if isinstance(t, Tensor)]
    raise ValueError(
        f"{named_module(c.name, c.module)} is called on inputs of shapes "
        f"{shapes}, one sample's rather than a batch of {N} (its output's first dimension "
        "may match the batch by chance): a module called once per sample, on x[i], maps no "
        "batch. Call it on the whole batch, samples along dimension 0"
    )


def forward_only(model, args, kwargs, replay) -> Tensor:
    """The model's output on ``args``, ``kwargs`` (for slow paths that hook it anew)."""
    with torch.enable_grad():
        return forward(model, args, kwargs, replay=replay)[0]


def norm(tensors: list[Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))
