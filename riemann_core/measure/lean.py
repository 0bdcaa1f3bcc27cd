"""The floor of an eager implementation: the sampled layerwise step, written lean.

:class:`LeanStep` is one training step with the layerwise metric (sampled Fisher, one
probe) on an ``nn.Sequential`` of ``nn.Linear`` layers and parameter-free modules that
treat samples independently (activations), 2-D inputs ``(N, f)`` and the mean
cross-entropy, written with as few eager PyTorch calls as the algebra allows: no hooks (the
forward pass walks the layers itself), no checks of the data, no condition estimate, no
fallbacks. It is a measuring stick, not an API: its time beside ``pre.backward``'s, in the
same rounds (``riemann-bench targets``), separates what the algorithm costs in eager
PyTorch from what the package adds for its guarantees and its generality.

The loss gradient and the probe rows are pulled back either in two backward passes or in
one batched over both (``torch.func.vmap``, as ``pre.backward`` does). Which is faster
depends on the network (one GEMM of ``2 N`` rows against two of ``N``, against the
batching's own overhead), so ``targets`` times both and takes the faster as the floor.

Per layer ``a`` with inputs ``X`` (``N x f_in``), loss gradient ``Lambda`` and pulled-back
probe rows ``Delta`` at its output (``N x f_out``), ``Xt = [X, 1]``:

    K K^T = (Delta Delta^T) * (Xt Xt^T),       K g = rowsum((Delta Lambda^T) * (Xt Xt^T)),
    t = (mu I + K K^T)^{-1} K g,                [dW | db] = (Lambda - t * Delta)^T Xt / mu,

the Woodbury form of ``(mu I + K^T K)^{-1} g`` of ``riemann_core.methods.layerwise`` with
``g = Lambda^T Xt`` never formed; the layers' Grams (all ``N x N``) are factorised by one
batched Cholesky, at an order off LAPACK's slow multiples of 64 (``costs.factor_order``),
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


class LeanStep:
    """``step(x, y)``: ``opt.zero_grad()``, forward, cross-entropy, each ``.grad`` set to
    the sampled layerwise direction, ``opt.step()`` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Sequential,
        opt: torch.optim.Optimizer,
        damping: float = 1e-3,
        generator: torch.Generator | None = None,
        batched: bool = False,
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
        self.model, self.opt, self.mu, self.generator = model, opt, damping, generator
        self.batched = batched
        self.linears = [m for m in model if isinstance(m, nn.Linear)]

    def __call__(self, x: Tensor, y: Tensor) -> None:
        self.opt.zero_grad()
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
        if self.batched:  # one backward pass, both rows at once
            pulled = torch.func.vmap(lambda c: torch.autograd.grad(h, outputs, c))(
                torch.stack([dz, rows])
            )
            lam, delta = [g[0] for g in pulled], [g[1] for g in pulled]
        else:
            lam = torch.autograd.grad(h, outputs, dz, retain_graph=True)
            delta = torch.autograd.grad(h, outputs, rows)
        order = factor_order(N)
        grams = h.new_zeros(len(inputs), order, order)
        Kg = h.new_zeros(len(inputs), order, 1)
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
