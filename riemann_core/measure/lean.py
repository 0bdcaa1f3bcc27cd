"""The floor of an eager implementation: the sampled layerwise step, written lean.

:class:`LeanStep` is one training step with the layerwise metric (sampled Fisher, one
probe) on an ``nn.Sequential`` of ``nn.Linear`` layers and parameter-free modules that
treat samples independently (activations), 2-D inputs ``(N, f)`` and the mean
cross-entropy, written with as few eager PyTorch calls as the algebra allows: no hooks (the
forward pass walks the layers itself), no checks of the data, no condition estimate, no
fallbacks. It is a measuring stick, not an API: its time beside ``pre.backward``'s, in the
same rounds (``riemann-bench targets``), separates what the algorithm costs in eager
PyTorch from what the package adds for its guarantees and its generality.

The loss gradient and the probe rows are pulled back in one of three ways
(:data:`PULLBACKS`): by autograd in two backward passes; by autograd in one batched over
both (``torch.func.vmap``, as ``pre.backward`` does); or by hand, with no autograd graph: a
forward pass under ``no_grad``, the loss gradient ``(softmax(z) - onehot(y)) / N`` written
out, and both rows carried back as one ``(2, N, f)`` tensor, ``G <- G W`` through a
Linear layer and ``G <- G * f'`` through an activation (``nn.ReLU``, ``nn.Tanh``,
``nn.Identity`` only). Which is fastest depends on the network (one GEMM of ``2 N`` rows
against two of ``N``, against the batching's and autograd's own overhead), so ``targets``
times all three and takes the one fastest in most rounds as the floor.

Per layer ``a`` with inputs ``X`` (``N x f_in``), loss gradient ``Lambda`` and pulled-back
probe rows ``Delta`` at its output (``N x f_out``), ``Xt = [X, 1]``:

    K K^T = (Delta Delta^T) * (Xt Xt^T),       K g = rowsum((Delta Lambda^T) * (Xt Xt^T)),
    t = (mu I + K K^T)^{-1} K g,                [dW | db] = (Lambda - t * Delta)^T Xt / mu,

the Woodbury form of ``(mu I + K^T K)^{-1} g`` of ``riemann_core.methods.layerwise`` with
``g = Lambda^T Xt`` never formed; the layers' Grams (all ``N x N``) are factorised by one
batched Cholesky, at an order off LAPACK's slow ones (``costs.factor_order``),
on one MKL thread where that is faster (``woodbury.cholesky_ex``), as in the package.
Given the same probes it sets the ``.grad`` that ``pre.backward`` sets
(tests/test_lean.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..costs import factor_order
from ..factors import sampled_cross_entropy_factor
from ..woodbury import cholesky_ex

#: How :class:`LeanStep` pulls back the loss gradient and the probe rows.
PULLBACKS = ("two passes", "batched", "by hand")

#: The activations the pullback by hand knows the derivative of, from their output ``h``.
_DERIVATIVE = {
    nn.ReLU: lambda h: h > 0,
    nn.Tanh: lambda h: 1 - h * h,
    nn.Identity: None,
}


class LeanStep:
    """``step(x, y)``: ``opt.zero_grad()``, forward, cross-entropy, each ``.grad`` set to
    the sampled layerwise direction, ``opt.step()`` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Sequential,
        opt: torch.optim.Optimizer,
        damping: float = 1e-3,
        generator: torch.Generator | None = None,
        pullback: str = "two passes",
    ):
        others = [
            type(m).__name__
            for m in model.children()
            if not isinstance(m, nn.Linear) and next(m.parameters(), None) is not None
        ]
        if others or not isinstance(model, nn.Sequential):
            raise ValueError(
                "LeanStep takes an nn.Sequential of nn.Linear layers and parameter-free "
                f"modules, got {type(model).__name__} with {others or 'no such layers'}"
            )
        inplace = [type(m).__name__ for m in model if getattr(m, "inplace", False)]
        if inplace:  # (found by review: autograd's pullbacks then reached the wrong tensors)
            raise ValueError(
                f"LeanStep keeps each layer's output for the pullback, which the in-place "
                f"{inplace} overwrite: build them with inplace=False"
            )
        if pullback not in PULLBACKS:
            raise ValueError(f"pullback must be one of {PULLBACKS}, got {pullback!r}")
        unknown = [
            type(m).__name__
            for m in model
            if not isinstance(m, nn.Linear) and type(m) not in _DERIVATIVE
        ]
        if pullback == "by hand" and unknown:
            raise ValueError(
                f"the pullback by hand knows the derivatives of {[t.__name__ for t in _DERIVATIVE]}"
                f", not of {unknown}: take pullback='two passes' or 'batched'"
            )
        self.model, self.opt, self.mu, self.generator = model, opt, damping, generator
        self.pullback = pullback
        self.linears = [m for m in model if isinstance(m, nn.Linear)]

    def __call__(self, x: Tensor, y: Tensor) -> None:
        self.opt.zero_grad()
        pull = self._by_hand if self.pullback == "by hand" else self._by_autograd
        inputs, lam, delta = pull(x, y)
        N = x.shape[0]
        order = factor_order(N, x.dtype, x.device)
        grams = x.new_zeros(len(inputs), order, order)
        Kg = x.new_zeros(len(inputs), order, 1)
        for a, (m, X, L, D) in enumerate(zip(self.linears, inputs, lam, delta, strict=True)):
            XX = X @ X.T if m.bias is None else torch.addmm(X.new_ones(()), X, X.T)
            torch.mul(D @ D.T, XX, out=grams[a, :N, :N])
            Kg[a, :N, 0] = ((D @ L.T) * XX).sum(1)
        grams.diagonal(dim1=-2, dim2=-1).add_(self.mu)
        factor, _ = cholesky_ex(grams)  # damped Grams: positive definite, no check
        t = torch.cholesky_solve(Kg, factor)[:, :N]
        for a, (m, X, L, D) in enumerate(zip(self.linears, inputs, lam, delta, strict=True)):
            M = torch.addcmul(L, D, t[a], value=-1).div_(self.mu)
            m.weight.grad = M.T @ X
            if m.bias is not None:
                m.bias.grad = M.sum(0)
        self.opt.step()

    def _by_autograd(self, x: Tensor, y: Tensor) -> tuple[list, list, list]:
        """Each Linear layer's input, loss gradient and probe row at its output, by autograd
        (two backward passes, or one batched over both rows)."""
        inputs, outputs, h = [], [], x
        for m in self.model:
            if isinstance(m, nn.Linear):
                inputs.append(h.detach())
                h = m(h)
                outputs.append(h)
            else:
                h = m(h)
        loss = F.cross_entropy(h, y)
        N = h.shape[0]
        rows = sampled_cross_entropy_factor(h.detach(), 1, self.generator)[:, 0] / math.sqrt(N)
        (dz,) = torch.autograd.grad(loss, h, retain_graph=True)
        if self.pullback == "batched":  # one backward pass, both rows at once
            pulled = torch.func.vmap(lambda c: torch.autograd.grad(h, outputs, c))(
                torch.stack([dz, rows])
            )
            return inputs, [g[0] for g in pulled], [g[1] for g in pulled]
        lam = torch.autograd.grad(h, outputs, dz, retain_graph=True)
        return inputs, lam, torch.autograd.grad(h, outputs, rows)

    @torch.no_grad()
    def _by_hand(self, x: Tensor, y: Tensor) -> tuple[list, list, list]:
        """As :meth:`_by_autograd`, with no autograd graph: both rows carried back by hand."""
        inputs, outputs, h = [], [], x
        for m in self.model:
            inputs.append(h)
            h = m(h)
            outputs.append(h)
        N = h.shape[0]
        rows = sampled_cross_entropy_factor(h, 1, self.generator)[:, 0] / math.sqrt(N)
        dz = torch.softmax(h, -1)
        dz[torch.arange(N, device=h.device), y] -= 1
        G = torch.stack([dz.div_(N), rows])
        lam, delta, first = [], [], self.linears[0]
        for m, Z in zip(reversed(self.model), reversed(outputs), strict=True):
            if isinstance(m, nn.Linear):
                lam.append(G[0])
                delta.append(G[1])
                if m is first:  # nothing below it to pull back to
                    break
                G = G @ m.weight
            elif _DERIVATIVE[type(m)] is not None:
                G = G * _DERIVATIVE[type(m)](Z)
        linear_inputs = [X for m, X in zip(self.model, inputs) if isinstance(m, nn.Linear)]
        return linear_inputs, lam[::-1], delta[::-1]
