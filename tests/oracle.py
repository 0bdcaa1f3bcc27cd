"""Independent dense float64 oracle and the small problems the tests share.

Nothing here calls ``riemann_core``: the GGN of the mean loss is assembled from
``torch.func`` Jacobians of the network output with respect to one flat parameter
vector and the explicit Hessian of the loss in the outputs,

    GGN = sum_b J_b^T H_b J_b,     H_b = d^2 loss / d z_b^2   (includes the 1/N),

the gradient comes from ``torch.autograd`` on the loss, and every solve is a dense
``torch.linalg.solve`` in float64.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from riemann_core._precision import precision_knobs  # test state only, not the oracle

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
LOSS_NAMES = {"ce": "cross_entropy", "mse": "mse"}


# ----------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """A seeded toy problem, declared BackPACK-style and built on demand."""

    loss: str = "ce"  # "ce" or "mse"
    act: str = "tanh"
    depth: int = 2  # number of Linear layers
    bias: bool = True
    width: int = 4
    n_in: int = 5
    classes: int = 3
    batch: int = 4
    seed: int = 0

    @property
    def id(self) -> str:
        return f"loss={self.loss}-act={self.act}-depth={self.depth}-bias={self.bias}"

    @property
    def loss_name(self) -> str:
        return LOSS_NAMES[self.loss]

    def make(self, dtype=torch.float64, device="cpu"):
        """``(model, inputs, targets)`` with parameters drawn from ``seed``."""
        torch.manual_seed(self.seed)
        model = mlp(self.n_in, self.width, self.classes, self.depth, self.act, self.bias)
        x = torch.randn(self.batch, self.n_in)
        if self.loss == "ce":
            y = torch.randint(0, self.classes, (self.batch,))
        else:
            y = torch.randn(self.batch, self.classes)
        model = model.to(dtype=dtype, device=device)
        x = x.to(dtype=dtype, device=device)
        y = y.to(device=device) if self.loss == "ce" else y.to(dtype=dtype, device=device)
        return model, x, y


def mlp(n_in: int, width: int, n_out: int, depth: int, act: str = "tanh", bias: bool = True):
    """``depth`` Linear layers with ``act`` between them (a depth-1 net is one Linear)."""
    sizes = [n_in] + [width] * (depth - 1) + [n_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i > 0:
            layers.append(ACTIVATIONS[act]())
        layers.append(nn.Linear(a, b, bias=bias))
    return nn.Sequential(*layers)


def grid(**axes) -> list[Problem]:
    """The MLP grid: depth 1 once per (loss, bias) (no activation), deeper nets per act."""
    problems = []
    for loss in axes.get("loss", ("ce", "mse")):
        for bias in axes.get("bias", (True, False)):
            for depth in axes.get("depth", (1, 2, 3)):
                acts = ("tanh",) if depth == 1 else axes.get("act", tuple(ACTIVATIONS))
                for act in acts:
                    problems.append(Problem(loss=loss, act=act, depth=depth, bias=bias))
    return problems


# Networks beyond MLPs (float64, cross-entropy with 3 classes): (model, inputs, targets)


class ScaleShift(nn.Module):
    """Elementwise ``x * scale + shift``: parameters, but no structured kernel."""

    def __init__(self, width):
        super().__init__()
        self.scale = nn.Parameter(1 + 0.3 * torch.randn(width))
        self.shift = nn.Parameter(0.1 * torch.randn(width))

    def forward(self, x):
        return x * self.scale + self.shift


def conv_net(bias=True, stride=1, padding=1, kernel=3, dilation=1, groups=1):
    torch.manual_seed(12)
    conv = nn.Conv2d(
        2, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias
    )
    x = torch.randn(3, 2, 5, 5)
    with torch.no_grad():
        n_flat = conv(x).numel() // 3
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n_flat, 3, bias=bias))
    return model.double(), x.double(), torch.tensor([0, 2, 1])


def sequence_net():
    """A Linear applied at every position of a ``(N, T, f)`` input."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3, 3))
    return model.double(), torch.randn(3, 2, 4, dtype=torch.float64), torch.tensor([1, 0, 2])


def custom_net():
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(4, 5), ScaleShift(5), nn.Tanh(), nn.Linear(5, 3))
    return model.double(), torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1])


# ----------------------------------------------------------------------- the oracle


def param_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def flatten(tensors: dict[str, Tensor], model: nn.Module) -> Tensor:
    """Concatenate ``{name: tensor}`` in ``model.named_parameters()`` order, as float64."""
    return torch.cat([tensors[n].detach().reshape(-1).double() for n in param_names(model)])


def unflatten(vector: Tensor, model: nn.Module) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    out, i = {}, 0
    for n in param_names(model):
        k = params[n].numel()
        out[n] = vector[i : i + k].reshape(params[n].shape)
        i += k
    return out


def block_indices(model: nn.Module) -> list[Tensor]:
    """Positions in the flat vector of each block of the layerwise metric.

    A block is the trainable parameters of one module (weight and bias together, and
    those of the ``nn.ParameterList`` / ``nn.ParameterDict`` it holds, which its forward uses),
    merged across modules that hold the same parameter object (weight tying; a module
    called twice is one module anyway): a union over parameter identities, aliases
    included, in the order of each block's first parameter.
    """
    position, start = {}, 0
    for p in model.parameters():
        if p.requires_grad:
            position[id(p)] = torch.arange(start, start + p.numel())
            start += p.numel()
    parent = {key: key for key in position}

    def root(key):
        while parent[key] != key:
            key = parent[key]
        return key

    # and nn.MultiheadAttention's out_proj, a Linear its forward never calls (the attention
    # reads its weight): one module, one block
    containers = (
        nn.ParameterList,
        nn.ParameterDict,
        nn.ModuleList,
        nn.ModuleDict,
        nn.modules.linear.NonDynamicallyQuantizableLinear,
    )

    def held(module):  # never called: their parameters are the holder's
        for child in module.children():
            if type(child) in containers:  # a subclass with a forward is called
                yield child
                yield from held(child)

    for module in model.modules():
        if type(module) in containers:
            continue
        own = [
            id(p)
            for m in (module, *held(module))
            for _, p in m.named_parameters(recurse=False, remove_duplicate=False)
            if id(p) in position
        ]
        for key in own[1:]:
            parent[root(key)] = root(own[0])
    groups: dict[int, list[Tensor]] = {}
    for key, index in position.items():
        groups.setdefault(root(key), []).append(index)
    return [torch.cat(g) for g in groups.values()]


def as_float64(model: nn.Module, *tensors: Tensor):
    """A float64 copy of ``model`` (same weights) and float64 copies of float tensors."""
    model64 = copy.deepcopy(model).double().cpu()
    out = [t.detach().cpu().double() if t.is_floating_point() else t.cpu() for t in tensors]
    return (model64, *out)


def output_fn(model: nn.Module, inputs: Tensor, kwargs: dict | None = None):
    """``theta -> model(inputs, **kwargs)`` for a flat parameter vector ``theta``."""

    def f(theta: Tensor) -> Tensor:
        return functional_call(model, unflatten(theta, model), (inputs,), kwargs or {})

    return f


def jacobian(model: nn.Module, inputs: Tensor, kwargs: dict | None = None) -> Tensor:
    """``J`` of shape ``(N, C, n)``: ``d model(inputs)_b / d theta``, by ``jacrev``."""
    theta = flatten(dict(model.named_parameters()), model)
    return jacrev(output_fn(model, inputs, kwargs))(theta)


def loss_hessians(outputs: Tensor, targets: Tensor, loss: str) -> Tensor:
    """Per-sample Hessians ``H_b`` of the *mean* loss in the outputs, ``(N, C, C)``.

    Cross-entropy: ``torch.func.hessian`` of ``F.cross_entropy`` on one sample's logits,
    divided by ``N`` (the mean). MSE: ``torch.func.hessian`` of ``F.mse_loss`` (mean over
    all ``N C`` entries) on the whole output, its diagonal ``(b, b)`` blocks.
    """
    N = outputs.shape[0]
    z = outputs.detach()
    if loss == "cross_entropy":

        def ce(zb, yb):
            return F.cross_entropy(zb[None], yb[None])

        return torch.stack([hessian(ce)(z[b], targets[b]) for b in range(N)]) / N
    H = hessian(lambda out: F.mse_loss(out, targets))(z)  # (N, C, N, C)
    return torch.stack([H[b, :, b, :] for b in range(N)])


def ggn(model: nn.Module, inputs: Tensor, targets: Tensor, loss: str, kwargs=None) -> Tensor:
    """The GGN of the mean loss, ``sum_b J_b^T H_b J_b`` (float64, ``n x n``), for the
    call ``model(inputs, **kwargs)``."""
    model, inputs, targets = as_float64(model, inputs, targets)
    kwargs = _float64_kwargs(kwargs)
    J = jacobian(model, inputs, kwargs)
    N = J.shape[0]
    J = J.reshape(N, -1, J.shape[-1])  # outputs of any shape, flattened per sample
    outputs = model(inputs, **kwargs)
    if loss == "cross_entropy" and outputs.ndim > 2:
        H = position_hessians(outputs, targets)
    else:
        if loss == "mse":
            targets = targets.reshape(N, -1)
        H = loss_hessians(outputs.reshape(N, -1), targets, loss)
    return torch.einsum("bci,bcd,bdj->ij", J, H, J)


def position_hessians(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample Hessians ``(N, P C, P C)`` of the token-level cross-entropy, the mean over
    every position of ``(N, ..., C)`` logits: ``torch.func.hessian`` of the whole batch's
    loss in the outputs, its diagonal ``(b, b)`` blocks."""
    N, C = outputs.shape[0], outputs.shape[-1]

    def mean_loss(out):
        return F.cross_entropy(out.reshape(-1, C), targets.reshape(-1))

    H = hessian(mean_loss)(outputs.detach()).reshape(N, -1, N, outputs[0].numel())
    return torch.stack([H[b, :, b, :] for b in range(N)])


def _float64_kwargs(kwargs) -> dict:
    return {
        k: v.detach().double() if isinstance(v, Tensor) and v.is_floating_point() else v
        for k, v in (kwargs or {}).items()
    }


def gradient(model: nn.Module, inputs: Tensor, targets: Tensor, loss: str, kwargs=None) -> Tensor:
    """Flat gradient of the mean loss by ``torch.autograd`` (float64)."""
    model, inputs, targets = as_float64(model, inputs, targets)
    out = model(inputs, **_float64_kwargs(kwargs))
    if loss == "cross_entropy":  # classes along the last dimension, mean over positions
        value = F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))
    else:
        value = F.mse_loss(out, targets)
    params = [dict(model.named_parameters())[n] for n in param_names(model)]
    grads = torch.autograd.grad(value, params, allow_unused=True)  # unused: a zero gradient
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
    )


def damped(G: Tensor, damping: float) -> Tensor:
    return G + damping * torch.eye(G.shape[0], dtype=G.dtype)


def solve_dense(G: Tensor, v: Tensor, damping: float) -> Tensor:
    """``(G + mu I)^{-1} v`` by ``torch.linalg.solve``; ``v`` may be ``(n,)`` or ``(n, k)``."""
    return torch.linalg.solve(damped(G, damping), v)


def solve_blocks(G: Tensor, v: Tensor, damping: float, blocks: list[Tensor]) -> Tensor:
    """Block-diagonal solve: ``(G_aa + mu I)^{-1} v_a`` on each block's positions."""
    out = torch.empty_like(v)
    for s in blocks:
        out[s] = solve_dense(G[s][:, s], v[s], damping)
    return out


def solve_eigh(G: Tensor, v: Tensor, damping: float) -> Tensor:
    """``(G + mu I)^{-1} v`` through ``eigh``; clamps round-off negative eigenvalues to 0."""
    lam, Q = torch.linalg.eigh(G)
    return Q @ ((Q.T @ v) / (lam.clamp_min(0) + damping))


def oracle_direction(G, g, damping, method, blocks) -> Tensor:
    if method == "euclidean":
        return g.clone()
    if method == "layerwise":
        return solve_blocks(G, g, damping, blocks)
    if method in ("full", "natural"):
        return solve_dense(G, g, damping)
    raise ValueError(method)


@functools.cache
def oracle_for(problem: Problem, dtype: torch.dtype = torch.float64):
    """``(G, g, blocks)`` in float64 for ``problem`` built in ``dtype`` (its weights
    rounded to ``dtype``), computed once per session."""
    model, x, y = problem.make(dtype)
    return (
        ggn(model, x, y, problem.loss_name),
        gradient(model, x, y, problem.loss_name),
        block_indices(model),
    )


# ------------------------------------------------------- per-layer oracles (Sequential)


def layer_io(model: nn.Sequential, index: int, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """Input and output of ``model[index]`` on ``inputs``."""
    h = model[:index](inputs).detach()
    return h, model[index](h).detach()


def output_jacobian_wrt_layer(model: nn.Sequential, index: int, inputs: Tensor) -> Tensor:
    """``d z_b / d h_b`` for the output ``h`` of ``model[index]``: ``(N, C, *h.shape[1:])``.

    ``jacrev`` of the rest of the network, one sample at a time.
    """
    _, h = layer_io(model, index, inputs)
    rest = model[index + 1 :]
    return torch.stack([jacrev(lambda hb: rest(hb[None])[0])(h[b]) for b in range(h.shape[0])])


def whitened_jacobian(J_block: Tensor, factor: Tensor) -> Tensor:
    """``K = L_o J`` for ``L_o = factor / sqrt(N)``; rows probe-major (row ``s N + b``).

    ``J_block`` is ``(N, C, n_a)`` (output Jacobian restricted to one block), ``factor``
    ``(N, r, C)``.
    """
    N, r, _ = factor.shape
    K = torch.einsum("bsc,bcn->sbn", factor, J_block) / math.sqrt(N)
    return K.reshape(r * N, -1)


def pulled_back_factor(Jh: Tensor, factor: Tensor) -> Tensor:
    """``Delta`` at a layer's output, ``(r, N, *h.shape[1:])``, from ``Jh = dz/dh``."""
    N = factor.shape[0]
    return torch.einsum("bsc,bc...->sb...", factor, Jh) / math.sqrt(N)


def layer_patches(module: nn.Module, x: Tensor) -> Tensor:
    """``Xt`` of shape ``(N, T, P)``: the layer input per output position, bias column 1."""
    if isinstance(module, nn.Conv2d):
        X = F.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        ).transpose(1, 2)
    else:
        X = x[:, None, :]
    if module.bias is not None:
        X = torch.cat([X, torch.ones_like(X[..., :1])], dim=-1)
    return X


def matrix_to_params(module: nn.Module) -> Tensor:
    """Permutation ``P`` with ``P @ vec_rowmajor([W | b]) = [vec(W), b]`` (parameter order)."""
    f_out = module.weight.shape[0]
    f_in = module.weight[0].numel()
    cols = f_in + (module.bias is not None)
    index = torch.arange(f_out * cols).reshape(f_out, cols)
    order = index[:, :f_in].reshape(-1)
    if module.bias is not None:
        order = torch.cat([order, index[:, f_in]])
    return torch.eye(f_out * cols, dtype=torch.float64)[order]


def sampled_hessians(outputs: Tensor, loss: str, generator: torch.Generator) -> Tensor:
    """One-sample Monte Carlo Fisher of the *mean* loss per sample, ``(N, C, C)``.

    Cross-entropy: a label ``y_b ~ Cat(softmax(z_b))``, the number of cumulative
    probabilities at or below one float64 uniform draw per sample (as
    ``riemann_core.factors`` draws it from logits this small), and ``H_b = (e_y - p)(e_y -
    p)^T / N``, the outer product of the per-sample loss gradient at the drawn label.
    MSE: a target ``z_b + eps_b / sqrt(2)`` (``eps ~ N(0, I)``, the noise of
    ``mse_loss``'s Gaussian) and ``H_b = (2 / C) eps eps^T / N``.
    """
    N, C = outputs.shape
    z = outputs.detach()
    if loss == "cross_entropy":
        p = torch.softmax(z, dim=1)
        cdf = torch.cumsum(p, dim=1)
        draw = torch.rand((N, 1), dtype=torch.float64, generator=generator) * cdf[:, -1:]
        labels = (cdf <= draw).sum(1).clamp_max(C - 1)
        u = F.one_hot(labels, C).to(z.dtype) - p
    else:
        u = torch.randn((N, 1, C), dtype=z.dtype, generator=generator)[:, 0]
        u = u * math.sqrt(2 / C)
    return u[:, :, None] * u[:, None, :] / N


def kfac_factors(model: nn.Sequential, inputs: Tensor, targets: Tensor, loss: str, hessians=None):
    """Per Linear/Conv2d module ``(positions, module, Gamma, A)`` (float64), from definitions.

    ``Gamma = sum_{b,t} Jh_{b,t}^T H_b Jh_{b,t}`` (the Jacobian of the network output with
    respect to the layer output at position ``t``, by ``jacrev``; ``H_b`` the loss
    Hessian of :func:`loss_hessians`, or ``hessians``) and ``A = mean_{b,t} xt xt^T``
    (``xt = [x, 1]`` when the module has a bias).
    """
    model, inputs, targets = as_float64(model, inputs, targets)
    H = loss_hessians(model(inputs), targets, loss) if hessians is None else hessians
    blocks = iter(block_indices(model))
    out = []
    for i, module in enumerate(model):
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        x, _ = layer_io(model, i, inputs)
        Jh = output_jacobian_wrt_layer(model, i, inputs)
        N, C = Jh.shape[:2]
        Jh = Jh.reshape(N, C, module.weight.shape[0], -1)  # (N, C, f_out, T)
        Gamma = torch.einsum("bcot,bcd,bdpt->op", Jh, H, Jh).detach().contiguous()
        X = layer_patches(module, x).flatten(0, 1)
        out.append((next(blocks), module, Gamma, X.T @ X / X.shape[0]))
    return out


@functools.cache
def kfac_factors_for(problem: Problem):
    """:func:`kfac_factors` of ``problem`` (float64), computed once per session."""
    model, x, y = problem.make()
    return kfac_factors(model, x, y, problem.loss_name)


def factored_shifts(Gamma: Tensor, A: Tensor, damping: float) -> tuple[float, float]:
    """``(pi sqrt(mu), sqrt(mu) / pi)`` with ``pi = sqrt((tr Gamma / dim) / (tr A / dim))``."""
    pi = math.sqrt(float(Gamma.trace() / Gamma.shape[0]) / float(A.trace() / A.shape[0]))
    return pi * math.sqrt(damping), math.sqrt(damping) / pi


def damped_kronecker(Gamma: Tensor, A: Tensor, damping: float, scheme: str) -> Tensor:
    """``Gamma (x) A + mu I`` (``"exact"``) or ``(Gamma + pi sqrt(mu) I) (x)
    (A + sqrt(mu) / pi I)`` (``"factored"``), dense, row-major ``vec``."""
    if scheme == "exact":
        return damped(torch.kron(Gamma, A), damping)
    c_G, c_A = factored_shifts(Gamma, A, damping)
    return torch.kron(damped(Gamma, c_G), damped(A, c_A))


def kfac_metric(module, Gamma, A, damping: float, scheme: str = "exact", bias: str = "joint"):
    """A module's damped K-FAC metric in parameter order (``vec(W)`` row-major, ``b``).

    ``bias="joint"``: one block ``[W | b]`` with the whole ``A``. ``"separate"``: the
    weight's block with ``A`` less its bias row and column, and the bias's block, whose
    input factor is ``1``: ``Gamma`` damped as in the weight's block (``Gamma + mu I``
    exact, ``Gamma + pi sqrt(mu) I`` factored).
    """
    if module.bias is None or bias == "joint":
        P = matrix_to_params(module)
        return P @ damped_kronecker(Gamma, A, damping, scheme) @ P.T
    A_weight = A[:-1, :-1]
    shift = damping if scheme == "exact" else factored_shifts(Gamma, A_weight, damping)[0]
    weight = damped_kronecker(Gamma, A_weight, damping, scheme)
    return torch.block_diag(weight, damped(Gamma, shift))


def kfac_blocks(model: nn.Sequential, inputs: Tensor, targets: Tensor, loss: str):
    """Per Linear/Conv2d block: ``(positions, Gamma (x) A)`` in parameter order (float64)."""
    return [
        (s, matrix_to_params(m) @ torch.kron(Gamma, A) @ matrix_to_params(m).T)
        for s, m, Gamma, A in kfac_factors(model, inputs, targets, loss)
    ]


def solve_kfac(blocks, v: Tensor, damping: float) -> Tensor:
    out = torch.empty_like(v)
    for s, M in blocks:
        out[s] = solve_dense(M, v[s], damping)
    return out


def solve_kfac_metric(factors, v: Tensor, damping: float, scheme: str, bias: str) -> Tensor:
    """``v`` solved with each module's :func:`kfac_metric` (already damped)."""
    out = torch.empty_like(v)
    for s, module, Gamma, A in factors:
        out[s] = torch.linalg.solve(kfac_metric(module, Gamma, A, damping, scheme, bias), v[s])
    return out


def rel_error(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (``b`` is the reference)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------- state snapshots


def snapshot(model: nn.Module) -> dict:
    """Clones of every parameter and its ``.grad`` (``None`` kept), and ``training``."""
    return {
        "training": [m.training for m in model.modules()],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters()
        },
    }


def assert_call_refused(pre, model, x, y, call, match, error=ValueError) -> None:
    """``pre.backward(loss)`` or ``loss.backward(); pre.step()`` on ``model(x)`` raises
    ``error`` matching ``match``, parameters and ``.grad`` left as they were."""
    loss = F.cross_entropy(model(x), y)
    if call == "step":
        loss.backward()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        pre.backward(loss) if call == "backward" else pre.step()
    assert_unchanged(model, before)


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """Parameters and ``.grad`` bit-for-bit as in ``before`` (NaN equal to NaN)."""
    assert [m.training for m in model.modules()] == before["training"]
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before["params"][n]) or (
            torch.isnan(before["params"][n]).any()
            and torch.allclose(p.detach(), before["params"][n], equal_nan=True, rtol=0, atol=0)
        ), f"parameter {n!r} changed"
        old = before["grads"][n]
        if old is None:
            assert p.grad is None, f".grad of {n!r} was None and is now set"
        else:
            assert p.grad is not None, f".grad of {n!r} was removed"
            assert torch.allclose(p.grad, old, equal_nan=True, rtol=0, atol=0), (
                f".grad of {n!r} changed"
            )


def batches(n, seed=1):
    """``n`` seeded batches of 6 float64 samples of 5 features and 3 classes."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(6, 5, dtype=torch.float64, generator=g),
            torch.randint(0, 3, (6,), generator=g),
        )
        for _ in range(n)
    ]


def preconditioned(pre, model, x, y, call) -> None:
    """One step's ``.grad`` by ``call``: ``pre.backward(loss)``, or ``loss.backward()`` and
    ``pre.step()``."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if call == "backward":
        pre.backward(loss)
    else:
        loss.backward()
        pre.step()


@contextlib.contextmanager
def restored_precision():
    """Restore the float32 matmul precision exactly on leaving: the legacy setting and
    every ``fp32_precision`` knob (setting the legacy one back turns knobs that read
    ``none`` into ``ieee``, which the sweep's resume check tells apart)."""
    legacy = torch.get_float32_matmul_precision()
    knobs = [(k, k.fp32_precision) for _, k in precision_knobs()]
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        for knob, value in knobs:
            knob.fp32_precision = value
