"""Per-module kernels for the whitened Jacobian ``K_a = L_a B_a`` of one block.

A *block* is a module that owns trainable parameters (a Linear's weight and bias form
one block; a module's parameters include those of the ``nn.ParameterList`` and
``nn.ParameterDict`` it holds, see :func:`own_parameters`); modules that share a parameter, and a module called more than once, form
one block whose ``K`` sums those of the calls (:class:`SharedHandler`). A handler knows
the block's input ``x`` and the factor pulled back to its output, ``Delta`` (``r`` rows
per sample, ``d = r N`` rows in all, ordered probe-major: row ``s N + b`` belongs to
sample ``b``), and provides

* ``gram()``      ``K K^T``                       (``d x d``)
* ``K_mv(v)``     ``K v`` for a list of tensors shaped like the block's parameters
* ``K_tmv(t)``    ``K^T t`` as such a list
* ``K()``         ``K`` materialised (``d x n_a``), for the dense ``full`` method
* ``kronecker_rows()`` rows of the K-FAC factors ``Gamma``, ``A`` with
  ``K^T K ~ Gamma (x) A`` (Linear, Conv2d)

Structured kernels (Linear, Conv2d) use that row ``r`` of ``K`` is
``sum_t delta_{r,t} xt_{b,t}^T`` over positions ``t`` (one for a plain Linear), with
``xt`` the input patch with a 1 appended for the bias; those of LayerNorm, RMSNorm and
GroupNorm that their affine map scales and shifts ``xhat`` elementwise
(:class:`AffineNormHandler`); Embedding's that its rows are ``Delta`` scattered into the
weight's rows the ids look up (:class:`EmbeddingHandler`). The generic kernel handles any
module with parameters through ``torch.func`` and materialises ``K``.
"""

from __future__ import annotations

import collections
import copy
import functools
import inspect
import itertools
import math
import types
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from .blas import symmetric_product_applies, symmetric_products, syrk_
from .costs import lower_gram_flops, metric_groups, metric_units, samples_chunk, samples_metric
from .draws import REPLAYED, recorded, replaying
from .woodbury import column_major

#: Containers, never called: the parameters of the ParameterList and ParameterDict among
#: them belong to the module that holds them (``F.linear(x, self.weights[i])`` in its
#: forward), see :func:`own_parameters`. By exact type: a subclass with a ``forward`` of
#: its own is called, and owns its parameters
CONTAINERS = (
    nn.ParameterList,
    nn.ParameterDict,
    nn.ModuleList,
    nn.ModuleDict,
    # nn.MultiheadAttention's out_proj, whose weight its forward reads without calling it
    nn.modules.linear.NonDynamicallyQuantizableLinear,
)


#: The attribute :func:`read_by_holder` sets on a module it marks (in its ``__dict__``,
#: which a deep copy and a pickle keep).
READ_BY_HOLDER = "_riemann_core_read_by_holder"


def is_container(module: nn.Module) -> bool:
    """Whether ``module`` is one of the :data:`CONTAINERS` (not a subclass of one), or a
    module :func:`read_by_holder` marked: never called, its holder owns its parameters."""
    return type(module) in CONTAINERS or (
        isinstance(module, nn.Module) and module.__dict__.get(READ_BY_HOLDER, False)
    )


def is_read_by_holder(module) -> bool:
    """Whether :func:`read_by_holder` marked ``module`` (``False`` for anything else)."""
    return isinstance(module, nn.Module) and module.__dict__.get(READ_BY_HOLDER, False)


def read_by_holder(*modules: nn.Module, marked: bool = True) -> None:
    """Mark ``modules`` as read by the module that holds them: its forward uses their
    parameters without calling them, as torchvision's Swin attention reads its ``qkv`` and
    ``proj`` Linears (``F.linear(x, self.qkv.weight, self.qkv.bias)``) and
    ``nn.MultiheadAttention`` its ``out_proj`` (taken without a mark). Their parameters
    then form one block with the holder's, which the generic kernel (``kernel="auto"``)
    evaluates whole: exact, as for any module under it; a marked module called outside
    its holder's forward is refused as a parameter used outside its module's calls (the
    mark named), and a marked model, which no module holds, as parameters of a module not
    called. Mark them before the forward pass a direction is computed from (a
    preconditioner's hooks are installed again at its next call, and a mark made after a
    probe passed is probed again; ``check_coupling=False`` skips that). The mark is an attribute of each module:
    a deep copy or a pickle of the model keeps it. ``marked=False`` removes it (none
    there: nothing to do), taken at the next call as a new mark is: their parameters are
    refused again as those of a module not called."""
    if type(marked) is not bool:
        raise TypeError(f"read_by_holder's marked takes True or False, got {type(marked).__name__}")
    for module in modules:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"read_by_holder takes the nn.Module whose parameters its holder reads, got "
                f"{type(module).__name__}"
            )
    for module in modules:  # (all checked first: a bad argument leaves every mark as it was)
        if marked:
            object.__setattr__(module, READ_BY_HOLDER, True)  # (not a submodule or parameter)
        else:
            module.__dict__.pop(READ_BY_HOLDER, None)


#: Arguments (by their names in ``forward``) a module shares between the samples whatever
#: their first dimension, by type of module (subclasses too), with the number of
#: dimensions they have then: the generic kernel passes them whole (the attention's
#: ``(L, S)`` mask; its 3-D mask holds one per sample and head, and is split where its
#: first dimension is the batch).
SHARED_ARGUMENTS: dict[type, dict[str, int]] = {nn.MultiheadAttention: {"attn_mask": 2}}


def sequence_first(module: nn.Module, inputs: tuple, kwargs: dict) -> bool:
    """Whether ``module`` is an ``nn.MultiheadAttention`` built sequence-first
    (``batch_first=False``, torch's default) called on a batch: its query, key and value
    ``(L, N, E)`` and its output hold the batch in their second dimension (an unbatched
    2-D query is one sample's)."""
    if not isinstance(module, nn.MultiheadAttention) or module.batch_first:
        return False
    query = inputs[0] if inputs else kwargs.get("query")
    return isinstance(query, Tensor) and query.ndim == 3


def folded_mask(module: nn.Module, inputs: tuple, kwargs: dict) -> str | None:
    """Where ``module`` is an ``nn.MultiheadAttention`` of several heads called on a batch
    with a 3-D ``attn_mask``, ``(N * num_heads, L, S)``: why that call cannot be split into
    samples (the batch folded with the heads); ``None`` otherwise (with one head the mask
    is ``(N, L, S)``, one per sample, and is split)."""
    if not isinstance(module, nn.MultiheadAttention) or module.num_heads == 1:
        return None
    query = inputs[0] if inputs else kwargs.get("query")
    mask = inputs[5] if len(inputs) > 5 else kwargs.get("attn_mask")
    if not (isinstance(query, Tensor) and query.ndim == 3 and isinstance(mask, Tensor)):
        return None
    if mask.ndim != 3:
        return None
    return (
        f"takes a 3-D attn_mask of shape {tuple(mask.shape)}, one per sample and head (the "
        f"batch folded with its {module.num_heads} heads), which cannot be split into "
        "samples: pass the mask the samples share as (L, S) and each sample's padding as "
        "key_padding_mask (N, S), or build the attention with num_heads=1 (its 3-D mask is "
        "then (N, L, S), one per sample)"
    )


def time_first_modules(model: nn.Module) -> set[int]:
    """The ids of the modules that a sequence-first ``nn.TransformerEncoderLayer`` or
    ``nn.TransformerDecoderLayer`` of ``model`` calls on ``(T, N, E)``, its batch in the
    second dimension, or an ``nn.TransformerEncoder`` or ``nn.TransformerDecoder`` of such
    layers (its final ``norm``), and that act on each position alone (an ``nn.Linear``, a
    norm over the last dimension): called so, their block is the call on the batch moved
    first, the same outputs moved (:class:`~riemann_core.capture.Capture`), whose
    structured kernels hold."""
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)

    def sequence_first_layers(m: nn.Module) -> bool:
        if isinstance(m, nn.TransformerEncoder | nn.TransformerDecoder):
            m = next(iter(m.layers), None)
        return isinstance(m, layers) and not m.self_attn.batch_first

    return {
        id(m)
        for holder in model.modules()
        if sequence_first_layers(holder)
        for m in holder.modules()
        if type(m) is nn.Linear
        or (type(m) in (nn.LayerNorm, nn.RMSNorm) and len(m.normalized_shape) == 1)
    }


def output_index(output) -> int | None | bool:
    """``None`` where a module's ``output`` is a tensor; where it is a tuple or list of one
    tensor and ``None`` otherwise (``nn.MultiheadAttention(need_weights=False)``), the
    tensor's place in it; ``False`` for anything else."""
    if isinstance(output, Tensor):
        return None
    if isinstance(output, tuple | list):
        places = [i for i, a in enumerate(output) if isinstance(a, Tensor)]
        if len(places) == 1 and all(a is None or isinstance(a, Tensor) for a in output):
            return places[0]
    return False


def output_batch_dims(module: nn.Module, inputs: tuple, kwargs: dict, output):
    """Where ``output`` is a tuple (or list, nested) of more than one tensor, and ``None``
    (an ``nn.LSTM``'s ``(out, (h_n, c_n))``): per leaf of its ``pytree`` flattening, the
    dimension that holds the batch (``None`` for a ``None``), which :func:`joined_output`
    moves first; else the reason it cannot be told, a string. ``nn.RNNBase`` (``nn.RNN``,
    ``nn.GRU``, ``nn.LSTM``) on a batched tensor: its output's ``0`` with ``batch_first``,
    else ``1``, and ``1`` for each final state; a :func:`sequence_first` attention: ``1``
    for its output ``(L, N, E)``, ``0`` for its weights. Any other module: ``0`` for each
    tensor, as for a module's one output, where they all have the same size there (the
    generic kernel compares the outputs it evaluates one sample at a time with the call's,
    which refuses a tensor that holds no batch there)."""
    if not isinstance(output, tuple | list):
        return "it is not a tuple or list of tensors"
    leaves = pytree.tree_leaves(output)
    if any(
        isinstance(a, nn.utils.rnn.PackedSequence)
        for a in pytree.tree_leaves(
            (inputs, kwargs, output), is_leaf=lambda a: isinstance(a, nn.utils.rnn.PackedSequence)
        )
    ):
        return (
            "it takes or returns a PackedSequence, whose data holds every sample's steps on "
            "one axis and cannot be split into samples: pass the padded batch (N, T, f) with "
            "batch_first=True instead (the padding then runs through the module: mask its "
            "outputs, or batch sequences of one length)"
        )
    tensors = [a for a in leaves if a is not None]
    if not all(isinstance(a, Tensor) and a.is_floating_point() for a in tensors):
        kinds = sorted(
            {type(a).__name__ if not isinstance(a, Tensor) else str(a.dtype) for a in tensors}
        )
        return f"it holds {', '.join(kinds)}, not floating tensors and None alone"
    if len({a.dtype for a in tensors}) > 1:
        return f"its tensors have several dtypes ({', '.join(sorted({str(a.dtype) for a in tensors}))})"
    if isinstance(module, nn.RNNBase):
        x = inputs[0] if inputs else kwargs.get("input")
        if not isinstance(x, Tensor) or x.ndim != 3:
            return (
                "it was called on one unbatched sequence (a 2-D input), one sample's, rather "
                "than on the batch: call it on the batch, (N, T, f) with batch_first=True"
            )
        first = 0 if module.batch_first else 1
        dims = [first] + [1] * (len(leaves) - 1)
    elif sequence_first(module, inputs, kwargs):  # its (L, N, E) and weights (N, L, S)
        dims = [1] + [0] * (len(leaves) - 1)
    else:
        dims = [0] * len(leaves)
    dims = [None if a is None else d for a, d in zip(leaves, dims, strict=True)]
    sizes = {a.shape[d] if a.ndim > d else None for a, d in zip(leaves, dims) if a is not None}
    if len(sizes) != 1 or None in sizes:
        shapes = [None if a is None else tuple(a.shape) for a in leaves]
        return (
            f"the batch cannot be told in its tensors of shapes {shapes}: each must hold the "
            "batch in its first dimension"
        )
    return tuple(dims)


def joined_output(output, dims: tuple[int | None, ...]) -> Tensor:
    """The tensors of ``output`` (a module's tuple, :func:`output_batch_dims` giving each
    one's batch dimension ``dims``) joined into one ``(N, m)`` tensor, batch first: each
    moved so and flattened per sample, in order. The one output whose pulled-back rows
    ``Delta`` are the whole tuple's cotangent."""
    leaves = pytree.tree_leaves(output)
    parts = [a.movedim(d, 0) for a, d in zip(leaves, dims, strict=True) if d is not None]
    N = parts[0].shape[0]
    return torch.cat([a.reshape(N, -1) for a in parts], dim=1)


def output_of_joined(joined: Tensor, output, dims: tuple[int | None, ...]):
    """``output``'s structure rebuilt from :func:`joined_output`'s ``joined``: each tensor
    a contiguous copy of its part (of its own shape), so that everything the network
    computes from the tuple reaches the parameters through ``joined``."""
    leaves, spec = pytree.tree_flatten(output)
    moved = [
        None if d is None else a.movedim(d, 0).shape for a, d in zip(leaves, dims, strict=True)
    ]
    parts = iter(joined.split([math.prod(s[1:]) for s in moved if s is not None], dim=1))
    rebuilt = [
        None if s is None else next(parts).reshape(s).movedim(0, d).contiguous()
        for s, d in zip(moved, dims, strict=True)
    ]
    return pytree.tree_unflatten(rebuilt, spec)


def training(module: nn.Module) -> bool:
    """``module.training``; ``False`` for a module without the flag (a ``torch.jit.freeze``d
    TorchScript module: found by review, an AttributeError wherever the flag was read)."""
    return getattr(module, "training", False)


def shows_parameters(module: nn.Module) -> bool:
    """Whether every NaN or inf in ``module``'s parameters makes the output of its own
    forward non-finite (wherever it has entries): an ``nn.Linear``'s weight and bias enter
    every output row through a dense product, and ``inf * 0`` is NaN (the GEMMs compute
    every product, zeros included). So its output, 8x smaller than its weight at
    784-1024-1024-10 and batch 128, is read for them. Only where the product is of those
    parameters: not where ``forward`` was replaced on the instance (it may clamp the
    weight), nor a subclass's, nor where the weight is computed from another parameter (a
    pre-hook fake-quantising it maps inf and NaN to finite values; found by review), and
    the caller sees that no hook changed the output since (global forward hooks run before
    a module's own); not a convolution's: its implementations skip the padding, where a
    tap that meets padding alone leaves the output finite."""
    own = module._parameters
    return (
        type(module) is nn.Linear
        and not forward_replaced(module)
        and own.keys() <= {"weight", "bias"}
        and isinstance(own.get("weight"), nn.Parameter)
    )


def forward_replaced(module: nn.Module) -> bool:
    """Whether ``module``'s ``forward`` was replaced on the instance by another function
    than its class's own: not the class's ``forward`` bound to the module again
    (``m.forward = m.forward``, which accelerate's ``remove_hook_from_module`` leaves), nor
    ``functools.partial(type(m).forward, m)``."""
    f = vars(module).get("forward")
    if f is None:
        return False
    own = type(module).forward
    if getattr(f, "__func__", None) is own and getattr(f, "__self__", None) is module:
        return False
    return not (
        isinstance(f, functools.partial)
        and f.func is own
        and f.args == (module,)
        and not f.keywords
    )


def named_module(name: str, module: nn.Module | None = None) -> str:
    """How messages name the module ``name`` of a model, with its class where ``module`` is
    given: ``module '0.conv' (Conv2d)``, or ``the model itself (Net)`` for the model
    (name ``''``: a model that owns parameters of its own)."""
    kind = "" if module is None else f" ({type(module).__name__})"
    return f"module {name!r}{kind}" if name else f"the model itself{kind}"


def named_block(name: str) -> str:
    """How messages name the block of module ``name`` (``block '0.conv'``; ``block
    '(all)'``, a solve of every block at once), ``the block of the model itself`` for a
    model that owns parameters of its own (name ``''``)."""
    return f"block {name!r}" if name else "the block of the model itself"


def own_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name in module, parameter)`` of the parameters ``module`` owns as a block: those
    registered on it and those of the parameter containers it holds, directly or inside
    other :data:`CONTAINERS`, which its forward uses. Trainable or not, duplicates kept
    (the first name first); a ``weight`` always before its ``bias``, the layout the
    structured kernels' ``[W | b]`` takes (found by a hunt: ``prune.remove``,
    ``remove_weight_norm``, ``remove_spectral_norm`` and ``remove_parametrizations``
    register the weight again after the bias, and K-FAC's directions were then 100% off,
    silently; ``full``'s with ``check_coupling=False`` too, the other calls crashed)."""
    own = [(n, p) for n, p in module._parameters.items() if p is not None]
    names = [n for n, _ in own]
    if "weight" in names and "bias" in names and names.index("bias") < names.index("weight"):
        own.insert(names.index("bias"), own.pop(names.index("weight")))
    for child_name, child in module._modules.items():
        if is_container(child):
            own += [(f"{child_name}.{n}", p) for n, p in own_parameters(child)]
    return own


@dataclass(eq=False)
class Block:
    """One call of a module that owns trainable parameters, as seen in a forward pass;
    or, with ``calls``, a block of the metric whose parameters several calls share."""

    name: str
    module: nn.Module | None
    param_names: list[str]  # full names, as in model.named_parameters()
    params: list[nn.Parameter]
    inputs: tuple  # positional arguments of the call, detached
    output: Tensor | None  # in the autograd graph
    delta: Tensor | None = None  # pulled-back factor, (r, N, *output.shape[1:])
    kwargs: dict = field(default_factory=dict)  # keyword arguments of the call, detached
    output_grad: Tensor | None = None  # the loss gradient at the output, Lambda
    graph_inputs: tuple[Tensor, ...] = ()  # the call's input tensors in the autograd graph
    # each one's batch dimension (graph_batch_dims); None: the first of each
    graph_dims: tuple[int, ...] | None = None
    calls: tuple[Block, ...] = ()  # the calls of a shared block
    # where the call returned a tuple of one tensor and None: the tensor's place in it
    output_index: int | None = None
    # where it returned a tuple of several tensors: each one's batch dimension
    # (output_batch_dims), and output is then their joined_output
    output_dims: tuple[int | None, ...] | None = None
    # the eps of the float32 products the call ran with where the precision knobs or
    # autocast reduce them (a replayed pass runs in its user's precision), else 0
    product_eps: float = 0.0
    # the plain attributes of the module and its submodules as the call found them
    # (attributes_of), which the generic kernel evaluates it with; None: as they are
    attributes: list | None = None
    # the copies of the output the call returned where the rest of the network edits it in
    # place (Capture's clone), or of a tuple's tensors (output_of_joined), held weakly:
    # the tensors the user's code holds (None where freed)
    returned: Callable[[], tuple[Tensor | None, ...]] | None = None
    # where the call drew random numbers: the CUDA devices and the random state it started
    # from, for the generic kernel to draw them again (riemann_core.draws); None: it drew none
    rng: tuple[list[int], list[Tensor]] | None = None

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def input(self) -> Tensor:
        """The first argument (``input`` of ``nn.Linear`` / ``nn.Conv2d``)."""
        return self.inputs[0] if self.inputs else self.kwargs["input"]


class Handler(ABC):
    """Kernel interface for one block; subclasses implement the products with ``K``."""

    #: Whether ``K g`` and ``g - K^T t`` have shortcuts for ``g = Lambda^T Xt``.
    factored_gradient = False

    def __init__(self, block: Block):
        self.block = block
        self.set_delta(block.delta)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the kernel's algebra (that of its pulled-back factor)."""
        return self.delta.dtype

    @property
    def device(self) -> torch.device:
        """The device of the kernel's algebra."""
        return self.delta.device

    def to(self, dtype: torch.dtype) -> Handler:
        """The same ``K_a`` with its data (pulled-back rows, inputs) converted to ``dtype``:
        products with it then run in ``dtype``, exactly on the same numbers."""
        new = copy.copy(self)
        for key, value in vars(self).items():
            if isinstance(value, Tensor) and value.is_floating_point():
                setattr(new, key, value.to(dtype))
        return new

    def gradient(self) -> list[Tensor]:
        """The loss gradient ``g_a = B_a^T Lambda_a`` from its value at the block output."""
        return self.gradient_from_output(self.block.output_grad.to(self.dtype))

    def deferred_checks(self) -> list[tuple[Tensor, object]]:
        """``(ok, explain)`` pairs to be read with the other deferred checks."""
        return []

    def set_delta(self, delta: Tensor) -> None:
        """Use ``delta`` (``(r, N, *output.shape[1:])``) as the pulled-back factor."""
        self.delta = delta
        self.r, self.N = delta.shape[:2]
        self.d = self.r * self.N

    def compress_rows(self) -> None:
        """Keep ``m = min(r, m_out)`` rows per sample (``m_out``: a sample's output size).

        A sample's rows enter ``K_a^T K_a`` only through their Gram ``delta_b^T delta_b``
        (``m_out x m_out``); when ``r > m_out``, the ``R`` of a QR of ``delta_b`` has the
        same Gram with ``m_out`` rows. The block metric is unchanged and ``d`` shrinks,
        e.g. a 5-unit layer under a 10-class output keeps 5 rows per sample, not 10.
        Only for a block solved on its own (the rows no longer match other blocks').
        """
        m_out = math.prod(self.delta.shape[2:])
        if self.r <= m_out:
            return
        rows = self.delta.flatten(2).transpose(0, 1)  # (N, r, m_out)
        R = torch.linalg.qr(rows, mode="r").R  # (N, m_out, m_out), R^T R = rows^T rows
        self.set_delta(R.transpose(0, 1).reshape((m_out, self.N) + self.delta.shape[2:]))

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        """``None`` when the kernel handles ``module``, else the reason it does not."""
        return None

    @abstractmethod
    def gradient_from_output(self, lam: Tensor) -> list[Tensor]:
        """``B_a^T lam`` for ``lam`` shaped like the block output: the partial derivative
        through this call alone (its inputs held fixed)."""

    def gram_into(self, out: Tensor, add: bool = False) -> None:
        """Write (``add``: add) the lower triangle of ``K K^T`` into ``out`` (``d x d``,
        any strides); read only that triangle afterwards, as Cholesky, ``eigvalsh`` and
        the condition estimate do (the strict upper one: see :func:`lower_gram`)."""
        lower_gram(self.K(), self.r, out, add)

    def gram(self) -> Tensor:
        """``K K^T`` as its lower triangle, the strict upper triangle zero."""
        out = torch.zeros(self.d, self.d, dtype=self.dtype, device=self.device)
        self.gram_into(out)
        return out.tril_()

    def gram_flops(self) -> float:
        """Modelled FLOPs of :meth:`gram_into` (the lower triangle of ``K K^T`` from a
        materialised ``K``, :func:`lower_gram`)."""
        symmetric = symmetric_products(self.device, self.dtype)
        return lower_gram_flops(self.d, self.r, self.block.n_params, symmetric)

    def metric(self, other: Handler | None = None) -> Tensor:
        """``K^T K`` (``n_a x n_a``), or with ``other`` (a block with the same rows)
        ``K^T K_b`` (``n_a x n_b``): rows and columns in parameter order, from ``K``
        materialised."""
        K = self.K()
        return K.T @ (K if other is None else other.K())

    def metric_flops(self, other: Handler | None = None) -> float:
        """Modelled FLOPs of :meth:`metric` (``2 n_a n_b d``)."""
        n_b = self.block.n_params if other is None else other.block.n_params
        return 2 * self.block.n_params * n_b * self.d

    @abstractmethod
    def K(self) -> Tensor:
        """``K`` materialised, ``(d, n_a)``, columns in parameter order."""

    @abstractmethod
    def K_mv(self, v: list[Tensor]) -> Tensor:
        """``K v`` (``d``) for ``v`` shaped like the block's parameters."""

    @abstractmethod
    def K_tmv(self, t: Tensor) -> list[Tensor]:
        """``K^T t`` for ``t`` of length ``d``, shaped like the block's parameters."""


def lower_gram(rows: Tensor, blocks: int, out: Tensor, add: bool, scale: Tensor | None = None):
    """The lower triangle of ``(rows rows^T) * S`` written into ``out`` (``add``: added to
    it). Read only that triangle afterwards: the strict upper one keeps what it held,
    possibly times ``S``, or gets entries of the product (all of them for one block, the
    diagonal blocks' by block-row GEMMs); zeros there stay zeros or entries of the product.

    ``rows`` (``d x k``) holds ``blocks`` row blocks of ``m = d / blocks`` rows (the
    probe-major factor rows: block ``s`` is probe ``s`` of every sample); ``S`` is
    ``scale`` (``m x m``, symmetric) tiled over the blocks, or 1. The product costs
    ``d^2 k`` FLOPs by BLAS ``syrk`` where it runs (:mod:`riemann_core.blas`; CPU), else
    ``d^2 k (1 + 1/b)`` as one GEMM per block-row ``s``, ``rows_s rows_{0..s}^T``, written
    straight into ``out``, not the ``2 d^2 k`` of the whole product
    (:func:`riemann_core.costs.lower_gram_flops`). One block (``blocks == 1``) is the whole
    product, upper triangle included, by one GEMM.
    """
    m = rows.shape[0] // blocks
    if scale is not None and out.stride(0) == 1:  # column-major: S is symmetric, so S^T
        scale = scale.mT  # runs along the same memory as out
    if blocks == 1:  # one block-row: the whole (symmetric) product, in three kernels
        product = torch.mm(rows, rows.T, out=None if add else out)
        if scale is not None:
            product.mul_(scale)
        if add:
            out.add_(product)
        return
    symmetric = symmetric_product_applies(rows, out)
    if symmetric:
        if scale is None:
            syrk_(rows, out, 1.0 if add else 0.0)
            return
        # zeros above the diagonal: the block-rows added below carry nothing else there
        product = column_major(*out.shape, like=out, zero=True) if add else out
        syrk_(rows, product, 0.0)
    for s in range(blocks):
        block_row = (slice(s * m, (s + 1) * m), slice(0, (s + 1) * m))
        if symmetric:
            part = product[block_row]
        else:
            part = torch.mm(
                rows[block_row[0]], rows[block_row[1]].T, out=None if add else out[block_row]
            )
        if scale is not None:
            part.view(m, s + 1, m).mul_(scale[:, None, :])
        if add:
            out[block_row].add_(part)


def _samples_product(A: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """``S[k, (p, q)] = sum_b A[b, k] X[b, p] Y[b, q]`` (``A`` ``N x m``, ``X`` ``N x P``,
    ``Y`` ``N x Q``) by GEMMs over the samples: each sample's ``m`` entries against its
    ``P Q`` input products, or (where ``m < Q``) those entries times ``X_b`` against ``Y_b``,
    formed a chunk of samples at a time (:func:`riemann_core.costs.samples_chunk`)."""
    N, m, P, Q = A.shape[0], A.shape[1], X.shape[1], Y.shape[1]
    by_inputs, chunk = samples_chunk(N, m, P, Q)
    S = None
    for start in range(0, N, chunk):
        part = slice(start, start + chunk)
        if by_inputs:
            left, right = A[part], (X[part, :, None] * Y[part, None, :]).flatten(1)
        else:
            left, right = (A[part, :, None] * X[part, None, :]).flatten(1), Y[part]
        S = left.T @ right if S is None else S.addmm_(left.T, right)
    return S


def rows_dot(Dl: Tensor, V: Tensor) -> Tensor:
    """``<Delta_{s,b}, V_b>`` (summed over positions and outputs) for every factor row
    ``(s, b)`` of ``Dl`` ``(r, N, T, f_out)``, with ``V`` ``(N, T, f_out)``; flattened
    probe-major (``d``).

    Per sample one ``(1 x T f)(T f x r)`` product: the probe-major memory of ``Dl`` is each
    sample's ``T f x r`` matrix in column-major order, which the BLAS takes as it is. The
    same FLOPs as ``(r x T f)(T f x 1)`` (einsum's choice) ran 7-20x slower on a 2-core CPU
    (r = 9, N = 128: T f = 1024, 0.14 against 1.0 ms; T = 64, f = 32, 0.26 against 5.1 ms).
    """
    r, N = Dl.shape[:2]
    rows = torch.bmm(V.reshape(N, 1, -1), Dl.permute(1, 2, 3, 0).reshape(N, -1, r))
    return rows.reshape(N, r).T.reshape(-1)


def floating_dtypes(values) -> set[torch.dtype]:
    """The dtypes of the floating-point tensors among ``values`` (any objects)."""
    return {t.dtype for t in values if isinstance(t, Tensor) and t.is_floating_point()}


def relative_difference(value: Tensor, reference: Tensor) -> Tensor:
    """``max |value - reference| / max |reference|`` (a zero reference: the difference)."""
    scale = reference.abs().max().clamp_min(torch.finfo(value.dtype).tiny)
    return (value - reference).abs().max() / scale


def evaluated_eps(output: Tensor) -> float:
    """The largest machine epsilon among the floating-point tensors autograd recorded on
    the way to ``output`` (0 where none): the precision a computation rounded to, its
    explicit casts (``x.to(torch.bfloat16)``) and autocast regions of its own included."""
    eps, seen, stack = 0.0, set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for meta in getattr(node, "_input_metadata", ()):
            if meta.dtype.is_floating_point:
                eps = max(eps, torch.finfo(meta.dtype).eps)
        stack.extend(n for n, _ in node.next_functions)
    return eps


def lowest_precision_eps(tensors) -> float:
    """The largest machine epsilon among the floating-point ``tensors`` (float32's where
    none is): the precision a computation through all of them was rounded to."""
    dtypes = floating_dtypes(tensors)
    return max((torch.finfo(d).eps for d in dtypes), default=torch.finfo(torch.float32).eps)


class PatchHandler(Handler):
    """Modules whose output at position ``t`` is ``W x_t + b``.

    ``X`` holds the patches ``(N, T, P)``, ``Delta`` is reshaped to ``(r, N, T, f_out)``.
    In the formulas the bias is a column of ``[W | b]`` and ``xt = [x, 1]``; in the code
    it is kept apart (``Lambda^T Xt = [Lambda^T X | sum Lambda]``), which spares copying
    ``X`` and keeps GEMM sizes aligned. A frozen weight or bias is left out; with the
    weight frozen no product needs the patches, so they are not formed (bias-only
    fine-tuning of a convolutional network would otherwise unfold every input).
    """

    weight_dims: int  # those of the weight the kernel reads as (f_out, patch)

    def __init__(self, block: Block):
        super().__init__(block)
        module = block.module
        trainable = {id(p) for p in block.params}
        self.with_weight = id(module.weight) in trainable
        self.with_bias = getattr(module, "bias", None) is not None and id(module.bias) in trainable
        self.f_out = module.weight.shape[0]
        self.P = math.prod(module.weight.shape[1:])  # the size of a patch (no tensor op)
        self._X = None

    @property
    def X(self) -> Tensor:
        """The input patches ``(N, T, P)``, in the kernel's dtype, formed on first use."""
        if self._X is None:
            self._X = self.patches(self.block.input).to(self.dtype)
        return self._X

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        # frozen entries of a container are not the block's (a structured module's forward
        # never reads its containers); any other parameter registered on it is
        other = {n for n, p in own_parameters(module) if p.requires_grad or "." not in n}
        other -= {"weight", "bias"}
        if other:  # (found by a hunt: pruning's weight_orig was called weight norm's)
            return f"parameters other than weight and bias ({', '.join(sorted(other))})"
        if "weight" in getattr(module, "_buffers", {}):
            # torch's removal of a frozen parametrization leaves its weight so (found by a
            # hunt: named a weight a parametrization computes, where none was left)
            return (
                "a weight registered as a buffer, not a parameter, which no optimizer "
                "trains (remove_parametrizations(..., leave_parametrized=True) leaves a "
                "frozen parametrization's so; to train it, "
                "module.weight = nn.Parameter(module.weight.detach()) before the forward pass)"
            )
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            return "a weight that is not a parameter (a parametrization or pruning computes it)"
        # (found by a hunt: LinearHandler registered for a module with a 1-D weight
        # crashed inside its K_tmv, "shape '[5]' is invalid for input of size 25")
        weight, bias = module.weight, getattr(module, "bias", None)
        if weight.dim() != cls.weight_dims:
            return (
                f"a weight of shape {tuple(weight.shape)}, where the {cls.__name__} kernel "
                f"takes a {cls.weight_dims}-D one"
            )
        # a frozen bias the kernel never reads: nn.Linear broadcasts one of shape (1,) or ()
        # (found by review: such a module, exact before, was refused, by K-FAC too)
        trained_bias = isinstance(bias, Tensor) and bias.requires_grad
        if trained_bias and bias.shape != weight.shape[:1]:
            return (
                f"a bias of shape {tuple(bias.shape)}, where the {cls.__name__} kernel takes "
                f"one of shape {tuple(weight.shape[:1])}, an entry per output"
            )
        return None

    def set_delta(self, delta: Tensor) -> None:
        super().set_delta(delta)
        self.Dl = self.output_positions(delta)  # (r, N, T, f_out)

    def to(self, dtype: torch.dtype) -> PatchHandler:
        # the patches formed again from the block's input, not converted: formed in a half
        # dtype first (a coupling probe under autocast), they would carry its rounding into
        # the wider algebra (found by a hunt: probed calls 4e-3 off the others)
        patches, self._X = self._X, None
        try:
            return super().to(dtype)
        finally:
            self._X = patches

    @abstractmethod
    def patches(self, x: Tensor) -> Tensor:
        """The module input as ``(N, T, P)`` patches."""

    @abstractmethod
    def output_positions(self, delta: Tensor) -> Tensor:
        """``(r, N, *output)`` -> ``(r, N, T, f_out)``."""

    def to_matrix(self, tensors: list[Tensor]) -> Tensor:
        """The trainable parameters' tensors -> ``[W | b]`` (``f_out x P``)."""
        columns = [tensors[0].reshape(self.f_out, -1)] if self.with_weight else []
        if self.with_bias:
            columns.append(tensors[-1][:, None])
        return torch.cat(columns, dim=1) if len(columns) > 1 else columns[0]

    def from_matrix(self, M: Tensor) -> list[Tensor]:
        """``[W | b]`` (``(..., f_out, P)``) -> the trainable parameters' tensors."""
        out = []
        if self.with_weight:
            W = M[..., : M.shape[-1] - self.with_bias]
            out.append(W.reshape(M.shape[:-2] + self.block.module.weight.shape))
        if self.with_bias:
            out.append(M[..., -1])
        return out

    def outer(self, M: Tensor, scale: float = 1.0) -> list[Tensor]:
        """``scale sum_{b,t} M_{b,t} xt_{b,t}^T`` for ``M`` of shape ``(N, T, f_out)``, as
        the trainable parameters' tensors: ``scale M^T X`` and ``scale sum M`` (the scale
        in the GEMM, not a pass over ``M``)."""
        M = M if M.ndim == 2 else M.reshape(-1, self.f_out)
        out = []
        if self.with_weight:
            X = self.X.flatten(0, 1)
            if scale == 1:
                W = M.T @ X
            elif abs(scale) <= torch.finfo(M.dtype).max:
                # beta=0 reads no input, NaN or not: an empty one, no kernel to fill it
                W = torch.addmm(X.new_empty(()), M.T, X, beta=0, alpha=scale)
            else:  # (1 / mu past the dtype: addmm refuses such an alpha, found by review)
                W = (M * scale).T @ X  # inf, refused as a direction that overflowed
            shape = self.block.module.weight.shape
            out.append(W if W.shape == shape else W.reshape(shape))
        if self.with_bias:
            out.append(M.sum(0) if scale == 1 else M.sum(0).mul_(scale))
        return out

    def apply(self, v: list[Tensor]) -> Tensor:
        """``xt_{b,t} . [W | b]`` for every sample and position: ``(N, T, f_out)``."""
        if not self.with_weight:  # the bias alone: the same at every sample and position
            return v[-1].expand(*self.Dl.shape[1:3], self.f_out)
        out = self.X @ v[0].reshape(self.f_out, -1).T
        return out + v[-1] if self.with_bias else out

    def gradient_from_output(self, lam: Tensor) -> list[Tensor]:
        """The parameter gradient ``Lambda^T Xt`` from the gradient at the output."""
        return self.outer(self.output_positions(lam[None])[0])

    def K(self) -> Tensor:
        rows = []
        if self.with_weight:
            rows.append(torch.einsum("sbtc,btp->sbcp", self.Dl, self.X).reshape(self.d, -1))
        if self.with_bias:
            rows.append(self.Dl.sum(2).reshape(self.d, self.f_out))
        return torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]

    def K_mv(self, v: list[Tensor]) -> Tensor:
        return rows_dot(self.Dl, self.apply(v))

    def K_tmv(self, t: Tensor) -> list[Tensor]:
        # Rows of one sample share xt, so sum them first: K^T t = U^T Xt.
        return self.outer(torch.einsum("sb,sbtc->btc", t.reshape(self.r, self.N), self.Dl))

    def kronecker_rows(self, ones: bool) -> tuple[Tensor, Tensor]:
        """Rows of the K-FAC factors: ``Gamma = D^T D``, ``A = R^T R``.

        ``D`` holds the pulled-back rows ``delta`` at every position (``r N T x f_out``),
        ``R`` the input patches over ``sqrt(N T)``, with a column of ones when ``ones``
        (``xt = [x, 1]``, weight and bias in one block). So ``Gamma = sum_{r,t} delta
        delta^T`` and ``A = mean_{b,t} xt xt^T``: ``K^T K = Gamma (x) A`` (row-major
        ``vec([W | b])``) for one sample at one position; otherwise the K-FAC (KFC for
        convolutions) approximation.
        """
        if not self.with_weight:  # the bias's part has no input factor: ones only
            X = self.Dl.new_empty(self.Dl.shape[1] * self.Dl.shape[2], 0)
        else:
            X = self.X.reshape(-1, self.X.shape[-1])
        if ones:
            X = torch.nn.functional.pad(X, (0, 1), value=1.0)  # one operator, not two
        return self.Dl.reshape(-1, self.f_out), X / math.sqrt(X.shape[0])


class LinearHandler(PatchHandler):
    """``nn.Linear`` on ``(N, ..., f_in)`` inputs; ``K`` never materialised for 2-D input.

    ``K K^T = (Delta Delta^T) * (Xt Xt^T)`` elementwise (``Xt Xt^T`` tiled over the
    ``r x r`` probe blocks): ``O(d^2 f_out + N^2 f_in)`` time, ``O(d^2)`` memory.
    """

    weight_dims = 2  # (f_out, f_in)

    def patches(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def output_positions(self, delta: Tensor) -> Tensor:
        return delta.reshape(delta.shape[0], delta.shape[1], -1, delta.shape[-1])

    def gradient_from_output(self, lam: Tensor) -> list[Tensor]:
        return self.outer(lam)  # (N, ..., f_out): the positions in place, no reshape of it

    def __init__(self, block: Block):
        super().__init__(block)
        self.factored_gradient = self.Dl.shape[2] == 1  # one position per sample
        self._input_gram = self._xt = None

    def to(self, dtype: torch.dtype) -> LinearHandler:
        new = super().to(dtype)
        new._input_gram = new._xt = None  # formed again from the converted inputs
        return new

    def input_gram(self) -> Tensor:
        """``Xt Xt^T = X X^T + 1`` (``N x N``)."""
        if self._input_gram is None:
            X = self.X[:, 0] if self.with_weight else None
            G = X @ X.T if X is not None else self.Dl.new_zeros(self.N, self.N)
            self._input_gram = G + 1 if self.with_bias else G
        return self._input_gram

    def gram_flops(self) -> float:
        if not self.factored_gradient:
            return super().gram_flops()
        symmetric = symmetric_products(self.device, self.dtype)
        return lower_gram_flops(self.d, self.r, self.f_out, symmetric) + 2 * self.N**2 * self.P

    def gram_into(self, out: Tensor, add: bool = False) -> None:
        if not self.factored_gradient:  # sequence inputs: positions couple, use K K^T
            return super().gram_into(out, add)
        lower_gram(self.Dl.reshape(self.d, self.f_out), self.r, out, add, self.input_gram())

    def metric(self, other: Handler | None = None) -> Tensor:
        """``K^T K`` without ``K``, or with ``other`` (a block with the same rows, as
        ``method='full'`` asks) ``K^T K_b``, from the samples' Grams
        (:meth:`metric_into`) where :meth:`samples_metric_with` holds: two rows per
        sample or more, and the samples' Grams no larger than ``K``; elsewhere (a sampled
        Fisher's one row, a wide output on a narrow input, the bias alone) from ``K``."""
        g = self if other is None else other
        if not self.samples_metric_with(g):
            return super().metric(other)
        out = self.Dl.new_empty(self.block.n_params, g.block.n_params)
        self.metric_into(out, g)
        return out

    def metric_into(self, out: Tensor, other: LinearHandler) -> None:
        """``K^T K_b`` into ``out`` (``n_a x n_b``, any strides) for the block ``other`` on
        the same rows (itself for ``K^T K``), without ``K``: with one position per sample, a
        sample's rows share ``xt_b``, so

            K^T K_b = sum_b (Delta_b^T Delta^b_b) (x) (xt_b xt^b_b^T)

        (row-major ``vec([W | b])`` on both sides; ``Delta_b``: the sample's ``r x f_out``
        rows), one GEMM over the samples, ``2 N f_out f^b_out P P_b`` FLOPs
        (:meth:`metric_flops`) against the ``2 r N f_out f^b_out P P_b`` of ``K^T K_b`` from
        ``K``: ``r`` times fewer. The GEMM's result is ordered ``(i, j), (p, q)`` and copied
        into parameter order; it covers a group of output units ``i``
        (:func:`riemann_core.costs.metric_units`: about the cache's size where forming the
        operands again for each group costs no more than the block, else all of them).
        Needs :meth:`samples_metric_with`."""
        D, E = (h.Dl[:, :, 0].transpose(0, 1) for h in (self, other))  # (N, r, f)
        A = (D.mT @ E).reshape(self.N, -1)  # each sample's Delta_b^T Delta^b_b, (i, j)
        X, Y = self.inputs_with_ones(), other.inputs_with_ones()
        f, fb, P, Q = self.f_out, other.f_out, X.shape[1], Y.shape[1]
        units = metric_units(self.N, f, P, fb, Q)
        for i in range(0, f, units):
            m = min(units, f - i)
            S = _samples_product(A[:, i * fb : (i + m) * fb], X, Y)
            T = S.view(m, fb, P, Q).permute(0, 2, 1, 3)  # T[i, p, j, q]: ((i, p), (j, q))
            for p, top, height in self._parameter_parts():  # W, then b
                rows = out[top + i * height : top + (i + m) * height]
                for q, left, width in other._parameter_parts():
                    part = T[:, p, :, q]
                    rows[:, left : left + fb * width].view(part.shape).copy_(part)
            del S, T, part  # freed before the next group's result is formed

    def inputs_with_ones(self) -> Tensor:
        """``Xt``: the inputs with a column of ones for the bias (``N x P``)."""
        if self._xt is None:
            columns = [self.X[:, 0]] if self.with_weight else []
            if self.with_bias:
                columns.append(self.Dl.new_ones(self.N, 1))
            self._xt = torch.cat(columns, 1) if len(columns) > 1 else columns[0]
        return self._xt

    def _parameter_parts(self) -> list[tuple]:
        """Each trainable tensor's index along ``P``, first row and rows per output unit,
        in parameter order: ``W`` (``P - 1`` per unit), then ``b`` (one), or all of ``P``."""
        P = self.block.n_params // self.f_out
        if not (self.with_weight and self.with_bias):
            return [(slice(None), 0, P)]
        return [(slice(None, P - 1), 0, P - 1), (P - 1, self.f_out * (P - 1), 1)]

    def metric_flops(self, other: Handler | None = None) -> float:
        """``2 N r f_out f^b_out`` (the samples' Grams) ``+ 2 N f_out f^b_out P P_b``
        (:meth:`metric`), or ``2 n_a n_b d`` where it forms ``K^T K_b`` from ``K``."""
        g = self if other is None else other
        if not self.samples_metric_with(g):
            return super().metric_flops(other)
        P, Q = (h.block.n_params // h.f_out for h in (self, g))
        return 2 * self.N * self.f_out * g.f_out * (self.r + P * Q)

    def metric_groups(self, other: LinearHandler) -> int:
        """The GEMMs over the samples :meth:`metric_into` takes for ``K^T K_b``."""
        P, Q = (h.block.n_params // h.f_out for h in (self, other))
        return metric_groups(self.N, self.f_out, P, other.f_out, Q)

    def samples_metric_with(self, other: Handler) -> bool:
        """Whether :meth:`metric` forms ``K^T K_b`` from the samples' Grams: both blocks
        Linear with one position per sample and the same rows, and
        :func:`riemann_core.costs.samples_metric` holds."""
        if not (isinstance(other, LinearHandler) and self.factored_gradient):
            return False
        if not other.factored_gradient or (other.r, other.N) != (self.r, self.N):
            return False
        P, Q = (h.block.n_params // h.f_out for h in (self, other))
        return samples_metric(self.f_out, P, self.r, other.f_out, Q)

    def K_mv_output_grad(self, lam: Tensor) -> Tensor:
        """``K g`` for ``g = Lambda^T Xt``: row ``(s, b)`` is
        ``delta_{s,b} . (Xt Xt^T Lambda)_b``, ``O(N^2 f_out + d f_out)``; with one row per
        sample, ``rowsum((Delta Lambda^T) * (Xt Xt^T))``: the same product, then ``N x N``
        entries instead of ``N x f_out`` (two passes over 128 x 1024 took 0.04 ms a layer
        of a sampled step at 784-1024-1024-10)."""
        if self.r == 1:
            return ((self.Dl[0, :, 0] @ lam.mT) * self.input_gram()).sum(-1)
        XXL = self.input_gram() @ lam
        return rows_dot(self.Dl, XXL[:, None, :])  # no r N f temporary (fresh: page faults)

    def rows_combination(self, t: Tensor) -> Tensor:
        """``U = sum_p diag(t_p) Delta_p`` (``N x f_out``) for ``t`` (``d``): ``K^T t = U^T Xt``."""
        return torch.einsum("pb,pbf->bf", t.reshape(self.r, self.N), self.Dl[:, :, 0])

    def residual_terms(
        self, x: list[Tensor], Y: Tensor, s: Tensor, lam: Tensor, damping: float
    ) -> Tensor:
        """The terms of ``||mu x + K^T s - Lambda^T Xt||^2`` for ``Y = Xt x^T`` (``N x f_out``)
        and rows ``s`` (``d``), from ``N``-sized factors
        (:meth:`riemann_core.methods._base.Problem.residual_squared`): that squared norm,
        ``||Lambda^T Xt||^2``, ``mu^2 ||x||^2``, ``2 mu ||B|| ||Xt|| ||x|| + ||B||^2 ||Xt||^2``
        and ``||Lambda||^2 ||Xt||^2`` (Frobenius norms), ``B = sum_p diag(s_p) Delta_p -
        Lambda``."""
        XXt, lam = self.input_gram(), lam.reshape(self.N, self.f_out)
        B = self.rows_combination(s) - lam
        xx = sum(torch.dot(a.reshape(-1), a.reshape(-1)) for a in x)
        BY, BB, LL = (B * Y).sum(), (B @ B.T * XXt).sum(), (lam @ lam.T * XXt).sum()
        B_norm, Xt_norm = torch.linalg.vector_norm(B), XXt.diagonal().sum().sqrt()
        mu = damping
        return torch.stack(
            [
                mu**2 * xx + 2 * mu * BY + BB,
                LL,
                mu**2 * xx,
                2 * mu * B_norm * Xt_norm * xx.sqrt() + (B_norm * Xt_norm) ** 2,
                lam.square().sum() * Xt_norm**2,
            ]
        )

    def output_grad_minus_K_tmv(
        self, lam: Tensor, t: Tensor, scale: float = 1.0, bound: bool = True
    ) -> tuple[list[Tensor], Tensor | None]:
        """``scale (g - K^T t) = scale M^T Xt`` with ``M = Lambda - U``,
        ``U_b = sum_s t_{s,b} delta_{s,b}``; and, where ``bound``, ``|scale| ||M||_F
        ||Xt||_F`` (a device scalar; else ``None``), an upper bound on the result's 2-norm
        read from ``N (f_out + 1)`` entries instead of its ``f_out (f_in + 1)``
        (``||Xt||_F^2`` is the trace of ``Xt Xt^T``)."""
        D, t = self.Dl[:, :, 0], t.reshape(self.r, self.N, 1)
        # the r probes subtracted one by one, each an N x f_out update: a bmm over samples
        # of (1 x r)(r x f) loops over them on the CPU, 2.4x slower at r = 9, N = 128
        M = torch.addcmul(lam, D[0], t[0], value=-1)
        for s in range(1, self.r):
            M.addcmul_(D[s], t[s], value=-1)
        x = self.outer(M, scale)
        if not bound:
            return x, None
        trace = self.input_gram().diagonal().sum()
        return x, torch.linalg.vector_norm(M) * (trace.sqrt() * abs(scale))


class Conv2dHandler(PatchHandler):
    """``nn.Conv2d`` (groups=1, zero padding) through unfolded patches.

    ``padding='same'`` pads ``dilation (k - 1)`` zeros per dimension, half of them (rounded
    down) before and the rest after, as the convolution does: an even kernel pads one more
    after, which ``unfold`` cannot, so the input is padded first.

    ``K v`` and ``K^T t`` run on the ``(N, T, C_in k_h k_w)`` patches without
    ``K``; the Gram is built as ``K K^T`` from ``K`` assembled from patches (the
    pairwise-position alternative costs ``d^2 T^2 C_out``, more for typical convs).
    """

    weight_dims = 4  # (C_out, C_in, k_h, k_w)

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        if reason := super().supports(module):
            return reason
        if module.groups != 1:
            return f"groups={module.groups} (the structured Conv2d kernel needs groups=1)"
        if module.padding_mode != "zeros":
            return (
                f"padding_mode={module.padding_mode!r} (the structured kernel needs zero padding)"
            )
        return None

    def patches(self, x: Tensor) -> Tensor:
        m = self.block.module
        padding = 0 if m.padding == "valid" else m.padding
        if m.padding == "same":
            totals = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
            padding = tuple(t // 2 for t in totals)
            if any(t % 2 for t in totals):  # (left, right, top, bottom): one more after
                x = nn.functional.pad(x, [p for t in totals[::-1] for p in (t // 2, t - t // 2)])
                padding = 0
        cols = nn.functional.unfold(
            x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride
        )
        return cols.transpose(1, 2)  # (N, T, C_in k_h k_w)

    def output_positions(self, delta: Tensor) -> Tensor:
        return delta.flatten(3).transpose(2, 3)  # (r, N, C_out, T) -> (r, N, T, C_out)


class AffineNormHandler(Handler):
    """Normalisations followed by an elementwise affine map, ``y = xhat * w + b`` at every
    position, ``xhat`` the input normalised (no parameter in it): LayerNorm and RMSNorm
    over their normalised shape, GroupNorm per channel.

    ``Delta`` is read as ``(r, N, T, F)``, the ``F`` features the weight scales at the
    ``T`` positions of a sample, and ``xhat`` as ``(N, T, F)``; row ``(s, b)`` of ``K`` is
    ``[sum_t delta_{s,b,t} * xhat_{b,t} | sum_t delta_{s,b,t}]``, ``O(d T F)``. ``xhat`` is
    formed again from the block input by the normalisation without its affine map, in the
    kernel's dtype (the generic kernel would evaluate the module one sample at a time under
    ``torch.func``: a forward and a backward pass of it per row). A frozen weight or bias
    is left out; the bias rows do not read the weight, which may be a buffer.
    """

    def __init__(self, block: Block):
        self.width = self.features(block.module)
        super().__init__(block)
        module, trainable = block.module, {id(p) for p in block.params}
        self.with_weight = id(getattr(module, "weight", None)) in trainable
        self.with_bias = id(getattr(module, "bias", None)) in trainable
        self._xhat = None

    @staticmethod
    @abstractmethod
    def features(module: nn.Module) -> int:
        """``F``: the number of entries of the weight."""

    @abstractmethod
    def normalised(self, x: Tensor) -> Tensor:
        """``xhat``: the module's normalisation of ``x`` without its affine map."""

    def positions(self, t: Tensor, lead: int) -> Tensor:
        """``t`` shaped like the output after ``lead`` leading dimensions, as
        ``(*lead, T, F)``: the normalised shape last (LayerNorm, RMSNorm)."""
        return t.reshape(*t.shape[:lead], -1, self.width)

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        other = {n for n, p in own_parameters(module) if p.requires_grad} - {"weight", "bias"}
        if other:
            return f"parameters other than weight and bias ({', '.join(sorted(other))})"
        return None

    @property
    def xhat(self) -> Tensor:
        """``(N, T, F)``, in the kernel's dtype, formed on first use."""
        if self._xhat is None:
            self._xhat = self.positions(self.normalised(self.block.input.to(self.dtype)), 1)
        return self._xhat

    def set_delta(self, delta: Tensor) -> None:
        super().set_delta(delta)
        self.Dl = self.positions(delta, 2)

    def to(self, dtype: torch.dtype) -> AffineNormHandler:
        # formed again from the input, not converted (its rounding: see PatchHandler.to)
        xhat, self._xhat = self._xhat, None
        try:
            return super().to(dtype)
        finally:
            self._xhat = xhat

    def _outer(self, M: Tensor) -> list[Tensor]:
        """``[sum_{b,t} M_{b,t} * xhat_{b,t} | sum_{b,t} M_{b,t}]`` for ``M`` of shape
        ``(N, T, F)``, as the trainable parameters' tensors."""
        module, out = self.block.module, []
        if self.with_weight:
            out.append(torch.einsum("btf,btf->f", M, self.xhat).reshape(module.weight.shape))
        if self.with_bias:
            out.append(M.sum((0, 1)).reshape(module.bias.shape))
        return out

    def gradient_from_output(self, lam: Tensor) -> list[Tensor]:
        return self._outer(self.positions(lam, 1))

    def K(self) -> Tensor:
        rows = []
        if self.with_weight:
            rows.append(torch.einsum("sbtf,btf->sbf", self.Dl, self.xhat).reshape(self.d, -1))
        if self.with_bias:
            rows.append(self.Dl.sum(2).reshape(self.d, -1))
        return torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]

    def K_mv(self, v: list[Tensor]) -> Tensor:
        applied = self.xhat * v[0].reshape(-1) if self.with_weight else 0
        if self.with_bias:
            applied = applied + v[-1].reshape(-1)
        return (self.Dl * applied).sum((2, 3)).reshape(self.d)

    def K_tmv(self, t: Tensor) -> list[Tensor]:
        return self._outer(torch.einsum("sb,sbtf->btf", t.reshape(self.r, self.N), self.Dl))


class LayerNormHandler(AffineNormHandler):
    """``nn.LayerNorm``: ``xhat = (x - mean) / sqrt(var + eps)`` over the normalised shape."""

    @staticmethod
    def features(module: nn.Module) -> int:
        return math.prod(module.normalized_shape)

    def normalised(self, x: Tensor) -> Tensor:
        m = self.block.module
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)


class RMSNormHandler(LayerNormHandler):
    """``nn.RMSNorm``: ``xhat = x / sqrt(mean(x^2) + eps)`` over the normalised shape."""

    def normalised(self, x: Tensor) -> Tensor:
        m = self.block.module
        return F.rms_norm(x, m.normalized_shape, None, self.eps(m, self.block.input.dtype))

    @staticmethod
    def eps(module: nn.RMSNorm, dtype: torch.dtype) -> float:
        """The ``eps`` the call added: ``eps=None`` is the machine epsilon of the precision
        torch computes an input of ``dtype`` in (float32's for float32, bfloat16 and
        float16), not of the kernel's dtype (found by review: ``xhat`` formed in float64
        for ``solve_dtype=torch.float64`` took float64's, and a float32 model whose mean
        square at the norm neared float32's epsilon was 2e-2 off, silently)."""
        if module.eps is not None:
            return module.eps
        return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


class GroupNormHandler(AffineNormHandler):
    """``nn.GroupNorm``: ``xhat`` standardised over each sample's groups of channels; the
    weight and bias per channel (dimension 1), the other dimensions its positions."""

    @staticmethod
    def features(module: nn.Module) -> int:
        return module.num_channels

    def normalised(self, x: Tensor) -> Tensor:
        m = self.block.module
        return F.group_norm(x, m.num_groups, None, None, m.eps)

    def positions(self, t: Tensor, lead: int) -> Tensor:
        return t.movedim(lead, -1).reshape(*t.shape[:lead], -1, self.width)


class EmbeddingHandler(Handler):
    """``nn.Embedding``: the output at position ``t`` is row ``ids_t`` of the weight
    (``V x D``), so row ``(s, b)`` of ``K`` is ``delta_{s,b}`` scattered into the rows of
    the weight at the sample's ids, summed where an id repeats, and zero at
    ``padding_idx`` (torch's backward leaves that row's gradient zero).

    Only the ``U`` distinct ids of the batch have nonzero columns: ``K = R P``, ``R`` the
    ``d x U D`` rows on them (formed on first use, ``O(d T D)``) and ``P`` their
    selection among the ``V`` rows. So ``K K^T = R R^T`` costs ``d^2 U D`` and ``K^T t``
    scatters ``R^T t`` into the weight's shape; nothing of size ``V`` but the results
    shaped like the weight. The generic kernel materialises ``K`` (``d x V D``) instead,
    and ``kernel="structured"`` refused the module. ``max_norm``, ``sparse=True`` and
    ``scale_grad_by_freq=True`` are refused before any kernel (``check_model``).
    """

    def __init__(self, block: Block):
        super().__init__(block)
        module = block.module
        self.V, self.D = module.weight.shape
        ids, self.inverse = torch.unique(block.input, return_inverse=True)  # inverse: (N, ...)
        self.ids = ids.long()
        # (one set negative after construction counts from the end, as F.embedding reads it)
        pad = module.padding_idx
        self.padding_idx = None if pad is None else pad % self.V

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        other = {n for n, p in own_parameters(module) if p.requires_grad or "." not in n}
        other -= {"weight"}
        if other:
            return f"parameters other than weight ({', '.join(sorted(other))})"
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            return "a weight that is not a parameter (a parametrization computes it)"
        if module.weight.dim() != 2:
            return (
                f"a weight of shape {tuple(module.weight.shape)}, where the kernel takes a 2-D one"
            )
        return None

    def set_delta(self, delta: Tensor) -> None:
        super().set_delta(delta)
        self._R = None  # the rows on the ids depend on delta

    def to(self, dtype: torch.dtype) -> EmbeddingHandler:
        # R formed again from the converted rows, not converted (its sums' rounding)
        R, self._R = self._R, None
        try:
            return super().to(dtype)
        finally:
            self._R = R

    @property
    def R(self) -> Tensor:
        """``(d, U, D)``: row ``(s, b)`` of ``K`` on the batch's distinct ids."""
        if self._R is None:
            r, N, D = self.r, self.N, self.D
            delta = self.delta.reshape(r, N, -1, D)
            index = self.inverse.reshape(1, N, -1, 1).expand(delta.shape)
            R = delta.new_zeros(r, N, len(self.ids), D).scatter_add_(2, index, delta)
            if self.padding_idx is not None:
                # (a mask, not boolean indexing: no host read of its count on a GPU)
                R.masked_fill_((self.ids == self.padding_idx)[:, None], 0)
            self._R = R.reshape(self.d, -1, D)
        return self._R

    def gradient_from_output(self, lam: Tensor) -> list[Tensor]:
        out = lam.new_zeros(self.V, self.D)
        out.index_add_(0, self.block.input.reshape(-1).long(), lam.reshape(-1, self.D))
        if self.padding_idx is not None:
            out[self.padding_idx] = 0
        return [out]

    def gram_into(self, out: Tensor, add: bool = False) -> None:
        lower_gram(self.R.reshape(self.d, -1), self.r, out, add)

    def gram_flops(self) -> float:
        symmetric = symmetric_products(self.device, self.dtype)
        return lower_gram_flops(self.d, self.r, len(self.ids) * self.D, symmetric)

    def metric(self, other: Handler | None = None) -> Tensor:
        if other is not None:
            return super().metric(other)
        R, D = self.R.reshape(self.d, -1), self.D
        # R's columns among K's (row-major (V, D)): P^T (R^T R) P
        columns = (self.ids[:, None] * D + torch.arange(D, device=self.device)).reshape(-1)
        M = R.new_zeros(self.V * D, self.V * D)
        M[columns[:, None], columns] = R.T @ R
        return M

    def metric_flops(self, other: Handler | None = None) -> float:
        if other is not None:
            return super().metric_flops(other)
        return 2 * (len(self.ids) * self.D) ** 2 * self.d

    def K(self) -> Tensor:
        K = self.R.new_zeros(self.d, self.V, self.D).index_copy_(1, self.ids, self.R)
        return K.reshape(self.d, -1)

    def K_mv(self, v: list[Tensor]) -> Tensor:
        return self.R.reshape(self.d, -1) @ v[0][self.ids].reshape(-1)

    def K_tmv(self, t: Tensor) -> list[Tensor]:
        on_ids = (t @ self.R.reshape(self.d, -1)).reshape(-1, self.D)  # R^T t, then P^T
        return [on_ids.new_zeros(self.V, self.D).index_copy_(0, self.ids, on_ids)]


class GenericHandler(Handler):
    """Any module with parameters: ``K`` materialised with ``torch.func``.

    Row ``(s, b)`` of ``K`` is the vector-Jacobian product of the module's output for
    sample ``b`` with the cotangent ``delta_{s,b}``: ``vmap`` over samples of ``vmap``
    over probes of ``vjp``. ``O(d n_a)`` memory; this is the ``O(n d^2 + d^3)`` path.

    The call's positional and keyword arguments are passed on; a tensor whose first
    dimension is the batch is split into samples, any other is passed whole. Evaluating
    one sample at a time is exact only for a module that treats samples independently:
    the outputs it gives are compared with those of the forward pass (a deferred check,
    see :meth:`deferred_checks`), and, where the coupling probe runs, its Jacobian with the
    batch call's (:meth:`batch_mismatch`).
    """

    def __init__(self, block: Block):
        super().__init__(block)
        self.shapes = [p.shape for p in block.params]
        local: dict[int, str] = {}
        for n, p in own_parameters(block.module):  # an alias: its first name, as functional_call
            local.setdefault(id(p), n)
        self.local_names = [local[id(p)] for p in block.params]
        self.output_value = None if block.output is None else block.output.detach()
        self.mismatch: Tensor | None = None  # (see deferred_checks)
        self.rerun_mismatch: Tensor | None = None
        self._batch: tuple[Tensor, float] | None = None  # (see _batch_evaluation)
        self._draws: list[Tensor] | None = None  # (see _drawn)

    def set_delta(self, delta: Tensor) -> None:
        super().set_delta(delta)
        self._K = None  # K depends on the rows

    def to(self, dtype: torch.dtype) -> Handler:
        new = copy.copy(self)
        new.delta = self.delta.to(dtype)
        new._K = None if self._K is None else self._K.to(dtype)
        return new

    def K(self) -> Tensor:
        if self._K is None:
            self._K = self._per_sample(self._materialise)
        return self._K

    def _per_sample(self, compute):
        """``compute()``, whose ``torch.func`` transforms run the module one sample at a
        time; what they cannot run is refused with the reason. Under grad mode whatever
        the caller's (``pre.step()`` runs under ``torch.no_grad()``): oneDNN's
        ``nn.LSTM`` forward on the CPU (float32, bfloat16) keeps no workspace for its
        backward where the caller disabled grad, which ``torch.func.vjp`` enables only
        inside, and its vjp then fails (found by review: ``pre.step()`` refused an LSTM
        that ``pre.backward`` took; the arguments and parameters carry no graph). Its
        results are detached: a tensor outside the model that requires grad and that the
        forward reads (a learned scale not registered as a parameter, a constant of the
        metric) left them a graph, which ``pre.backward``'s ``out=`` products refused
        (found by review: ``mm(): functions with out=... arguments don't support automatic
        differentiation``), and which ``pre.step()`` now builds too, under grad mode."""
        try:
            with torch.enable_grad():
                return pytree.tree_map_only(Tensor, Tensor.detach, compute())
        except RuntimeError as err:
            if isinstance(self.block.module, nn.EmbeddingBag) and "offsets" in str(err):
                raise ValueError(
                    f"{named_module(self.block.name)} (EmbeddingBag) cannot be evaluated one "
                    "sample at a time by kernel='generic' (torch.func): with a 1-D input and "
                    "offsets, its first dimension holds every sample's ids, not one row per "
                    "sample. Pass the bags as a 2-D (N, length) tensor of ids, padding "
                    f"shorter bags with padding_idx (torch: {str(err).splitlines()[0]})"
                ) from err
            name, kind = self.block.name, type(self.block.module).__name__
            if "random" in str(err):  # (found by a hunt: a model holding a positional
                # table, with a dropout, was told to call model.eval() to train)
                raise ValueError(
                    f"kernel='generic' cannot evaluate {self._what()} one sample at a time "
                    "with torch.func: it draws random numbers, its submodules' calls "
                    "included, other than those pre.step() and pre.backward(loss) draw "
                    f"again for each sample ({REPLAYED}): e.g. nn.MultiheadAttention's or an "
                    "RNN's dropout, randint. Where the draws are a submodule's and the module holds "
                    "parameters of its own (a model holding a table of positions), hold "
                    "those parameters in a small module of their own (one whose forward adds "
                    "the table), so that the draws lie outside it; else call model.eval(), "
                    "or give the module a structured kernel (rc.register_handler) (torch: "
                    f"{str(err).splitlines()[0]})"
                ) from err
            module = self.block.module
            own = [n for n, _ in module.named_parameters(recurse=False)]
            whole = own and any(next(c.parameters(), None) is not None for c in module.children())
            raise ValueError(
                f"kernel='generic' cannot evaluate {named_module(name)} ({kind}) one sample at a "
                f"time with torch.func: {err}. "
                + (  # (found by a hunt: a learned initial state h0 held by the model)
                    f"It holds parameters of its own ({', '.join(own)}), so it is evaluated "
                    "whole, its submodules' calls included: hold those parameters in a small "
                    "module of their own, one whose forward adds them to a batched input or "
                    "returns them expanded over the batch (self.h0.expand(n, -1), the batch "
                    "size n passed to it: one that returns them as they are maps no batch, "
                    "found by a hunt), so that only that module and each submodule are "
                    "evaluated per sample. "
                    if whole
                    else ""
                )
                + "A module that draws random numbers (call "
                "model.eval()), that takes an argument whose first dimension equals the "
                "batch but is not per sample, that writes in place into a tensor it makes "
                "itself (an RNN cell's default hx=None: pass the initial state, "
                "torch.zeros(N, hidden_size)), or whose operations torch.func cannot batch "
                "cannot be split into samples; give it a structured kernel "
                "(rc.register_handler)"
            ) from err

    def _params(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in zip(self.local_names, self.block.params, strict=True)}

    def _call(self, params, leaves, spec) -> Tensor:
        # copies: a module that changes its input in place must not change the record
        leaves = [a.clone() if isinstance(a, Tensor) else a for a in leaves]
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        # the module's other parameters (its children's, which are blocks of their own,
        # and frozen ones) are constants of this block: detached, K carries no graph
        # by identity: a parameter of the block may have another first name in the module
        # (an alias held by a child), and functional_call ties aliases itself
        own = {id(p) for p in self.block.params}
        fixed = {n: p.detach() for n, p in self.block.module.named_parameters() if id(p) not in own}
        values = {f"module.{n}": p for n, p in {**fixed, **params}.items()}
        # its buffers as copies: a module that updates them as it runs (a quantisation
        # observer) must leave the model's as they were (found by a hunt: rc.direction
        # moved a QAT Linear's observer)
        module = self.block.module
        values |= {f"module.{n}": b.clone() for n, b in module.named_buffers()}
        registered = {id(m): set(m._buffers.keys()) for m in module.modules()}
        attributes = [attributes_of(m) for m in module.modules()]
        if self.block.attributes is not None:  # (and those its call held unregistered)
            have = {id(m) for m, _, _ in attributes}
            attributes += [
                attributes_of(m) for m, _, _ in self.block.attributes if id(m) not in have
            ]
        try:
            if self.block.attributes is not None:
                # as the call found them: a counter its forward moves (or the pass run
                # again moved since) chose the path of another pass (found by a hunt: a
                # weight detached until the 6th pass, taken in here where the gradient had
                # none, 0.54-1.72 off)
                _restore_attributes(self.block.attributes)
            args, kwargs = _initial_state(module, tuple(args), kwargs)
            output = functional_call(_Unhooked(module), values, args, kwargs)
        finally:  # nor keep a buffer it registers as it runs (found by review: one holding
            # torch.func's wrapped tensor was left in the user's model)
            for m in module.modules():
                for name in [n for n in m._buffers.keys() if n not in registered.get(id(m), ())]:
                    del m._buffers[name]
            _restore_attributes(attributes)
        if self.block.output_dims is not None:
            return joined_output(output, self.block.output_dims)
        index = self.block.output_index
        return output if index is None else output[index]

    def _whole(self) -> list[bool]:
        """Per leaf of the call's arguments (:meth:`_leaves`' order), whether it is one the
        module shares between the samples whatever its shape (:data:`SHARED_ARGUMENTS`:
        an attention mask of ``T x T`` positions with ``T`` equal to the batch, which the
        first-dimension rule would split; found by review)."""
        module = self.block.module
        shared = next((v for t, v in SHARED_ARGUMENTS.items() if isinstance(module, t)), {})

        def whole(name, a) -> bool:
            return isinstance(a, Tensor) and a.ndim == shared.get(name)

        # positional arguments by their names in forward (found by review: the mask passed
        # positionally, MultiheadAttention's sixth, was split)
        names = list(inspect.signature(self.block.module.forward).parameters) if shared else []
        flags = (
            tuple(
                pytree.tree_map(lambda a, k=k: whole(k, a), v)
                for k, v in zip(names + [None] * len(self.block.inputs), self.block.inputs)
            ),
            {
                k: pytree.tree_map(lambda a, k=k: whole(k, a), v)
                for k, v in self.block.kwargs.items()
            },
        )
        return pytree.tree_leaves(flags)

    def split(self) -> tuple[int | None, ...]:
        """Per tensor among the call's arguments, the dimension along which it is split
        into samples, or ``None``: its first where that is the batch's and it is not one
        the module shares (:meth:`_whole`); an ``nn.RNNBase``'s as :meth:`_batch_dims`
        says (its initial state ``hx``, ``(layers, N, hidden)``: its second). Decided by shapes, so a table whose length
        equals the batch size only at some calls (rotary positions at ``T = N``) is split
        at those: the Jacobian check runs for each new pattern
        (:func:`riemann_core.coupling.register`)."""
        leaves = pytree.tree_leaves((self.block.inputs, self.block.kwargs))
        whole, dims = self._whole(), self._batch_dims()
        return tuple(
            d if a.ndim > d and a.shape[d] == self.N and not whole[i] else None
            for i, (a, d) in enumerate(zip(leaves, dims, strict=True))
            if isinstance(a, Tensor)
        )

    def _batch_dims(self) -> list[int]:
        """Per leaf of the call's arguments (:meth:`_leaves`' order), the dimension that
        holds the batch where it holds one (:func:`argument_batch_dims`)."""
        return argument_batch_dims(self.block.module, self.block.inputs, self.block.kwargs)

    def _leaves(self, dtype: torch.dtype) -> tuple[list, object]:
        """The call's arguments, flattened; half-precision ones (a forward pass under
        autocast) in the parameters' ``dtype``, as the structured kernels take them."""
        leaves, spec = pytree.tree_flatten((self.block.inputs, self.block.kwargs))
        half = (torch.float16, torch.bfloat16)
        leaves = [a.to(dtype) if isinstance(a, Tensor) and a.dtype in half else a for a in leaves]
        return leaves, spec

    def _materialise(self) -> Tensor:
        rows, outs = self._rows_one_sample_at_a_time(self.delta)
        if self.output_value is not None:
            self.mismatch = relative_difference(outs, self.output_value)
            if self._ran_coarser():
                # the call's coarser precision (autocast, reduced products) makes the check
                # against its output too loose to see a coupling below it (a batch statistic
                # taken detached, 0.10 off the oracle under bfloat16 autocast, found by
                # review): also against the batch call run again as the samples were
                self.rerun_mismatch = relative_difference(outs, self._batch_evaluation()[0])
        # rows[name]: (N, r, *shape) -> (r N, numel), probe-major like Delta
        flat = [rows[n].transpose(0, 1).reshape(self.d, -1) for n in self.local_names]
        return torch.cat(flat, dim=1).to(self.dtype)

    def _rows_one_sample_at_a_time(self, delta: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """``({name: (N, r, *shape)}, outputs)``: the vjps of the rows ``delta``
        (``(r, N, ...)``) through the module evaluated one sample at a time, in the
        module's dtype, and its outputs so evaluated."""
        params = self._params()
        dtype = next(iter(params.values())).dtype  # the vjp runs in the module's dtype
        leaves, spec = self._leaves(dtype)
        tensors = [i for i, a in enumerate(leaves) if isinstance(a, Tensor)]
        batched = self.split()
        draws = self._drawn(params, leaves, spec)
        what = self._what()

        def output_of_sample(p, *sample):
            call = list(leaves)
            for i, a, d in zip(tensors, sample[: len(tensors)], batched, strict=True):
                call[i] = a if d is None else a.unsqueeze(d)
            with replaying(sample[len(tensors) :], what, per_sample=True):
                return self._call(p, call, spec)[0]

        # the rows batched inside the samples' vmap, but for one row: torch 2.13's PReLU
        # weight gradient under such a vmap of one row is silently wrong (10x; found by the
        # check of batch_mismatch), under two or more rows it raises
        nested = delta.shape[0] > 1

        def rows_of_sample(delta_b, *sample):
            out, pullback = vjp(lambda p: output_of_sample(p, *sample), params)
            if nested:
                return vmap(pullback)(delta_b)[0], out
            rows = [pullback(row)[0] for row in delta_b.unbind(0)]
            return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}, out

        in_dims = (1, *batched, *[0] * len(draws))  # each sample's rows of the draws
        args = (delta.to(dtype), *[leaves[i] for i in tensors], *draws)
        try:
            return vmap(rows_of_sample, in_dims=in_dims)(*args)
        except RuntimeError:
            # some backward formulas have no rule for a vmap inside a vmap (PReLU's weight
            # gradient in torch 2.13): the probes one at a time, the samples still batched
            nested = False
            return vmap(rows_of_sample, in_dims=in_dims)(*args)

    def _batch_evaluation(self) -> tuple[Tensor, float]:
        """The call's output on the batch run again in the module's dtype and the
        precision the evaluation one sample at a time runs in, its draws replayed, and the
        machine epsilon that run rounded to (:func:`evaluated_eps`, at least the
        parameters' dtype's): a module computing in bfloat16 of its own accord (a cast in
        its forward, an autocast region in it) does so there too (found by review: 2e-3
        between its Jacobians one sample at a time and on the batch, refused at float32's
        tolerance). Once per step."""
        if self._batch is None:
            params = {n: p.requires_grad_() for n, p in self._params().items()}
            leaves, spec = self._leaves(next(iter(params.values())).dtype)
            # (detached: the walk stays inside the module)
            leaves = [a.detach() if isinstance(a, Tensor) else a for a in leaves]
            draws, what = self._drawn(params, leaves, spec), self._what()

            def call():
                with replaying(draws, what, per_sample=False):
                    output = self._call(params, leaves, spec)
                return output, max(self._parameters_eps(), evaluated_eps(output))

            self._batch = self._per_sample(call)
        return self._batch

    def _rows_of_batch(self, rows: Tensor) -> dict[str, Tensor]:
        """``{name: (r, *shape)}``: the batch call's vjps of ``rows`` (``(r, N, ...)``),
        in the module's dtype; under vmap (over the rows) like ``K_a``'s, so that random
        numbers are refused."""
        params = self._params()
        dtype = next(iter(params.values())).dtype
        leaves, spec = self._leaves(dtype)
        draws, what = self._drawn(params, leaves, spec), self._what()

        def gradient(cotangent):
            with replaying(draws, what, per_sample=False):
                _, pullback = vjp(lambda p: self._call(p, leaves, spec), params)
            return pullback(cotangent)[0]

        return self._per_sample(lambda: vmap(gradient)(rows.to(dtype)))

    def _what(self) -> str:
        name, kind = self.block.name, type(self.block.module).__name__
        return f"module {name!r} ({kind})" if name else f"the model's own forward ({kind})"

    def _drawn(self, params, leaves, spec) -> list[Tensor]:
        """The random tensors the call drew, in order (none where it drew none): drawn
        again by its evaluation on the batch from the random state it started from
        (:func:`~riemann_core.draws.recorded`), once."""
        if self.block.rng is None:
            return []
        if self._draws is None:
            self._draws = self._per_sample(
                lambda: recorded(
                    lambda: self._call(params, leaves, spec),
                    self.block.rng,
                    self.N if self.output_value is None else self.output_value.shape[0],
                    self._what(),
                )
            )
        return self._draws

    def batch_mismatch(self, rows: Tensor) -> Tensor:
        """The largest relative difference, over the parameters and the rows ``rows``
        (``(r, N, ...)``), of their vjps formed as ``K_a``'s rows are (one sample at a time,
        then summed over the samples) from the batch call's. Zero but for rounding, unless
        the parameters reach one sample through the others (a gate initialised at zero on
        a batch mean agrees in its outputs one sample at a time, not in its Jacobian) or
        ``torch.func`` differentiates the module wrongly under ``vmap``. The coupling
        probe checks it (:mod:`riemann_core.coupling`)."""
        alone, _ = self._per_sample(lambda: self._rows_one_sample_at_a_time(rows))
        batch = self._rows_of_batch(rows)
        differences = []
        for name in self.local_names:
            a, b = alone[name].sum(0), batch[name]  # (r, *shape) each
            scale = torch.maximum(alone[name].abs().sum(0).max(), b.abs().max())
            differences.append((a - b).abs().max() / scale.clamp_min(torch.finfo(b.dtype).tiny))
        return torch.stack(differences).max()

    def refuse_batch_mismatch(self, mismatch: Tensor) -> None:
        """The error of a failed :meth:`batch_mismatch`."""
        raise ValueError(
            f"{named_module(self.block.name, self.block.module)} has another "
            "Jacobian in its parameters when evaluated one sample at a time, as "
            f"kernel='generic' does (largest relative difference {float(mismatch):.1e}), "
            "its parameters reach one sample through the others (e.g. a gate initialised at "
            "zero on a batch mean), it takes an argument whose first dimension equals the "
            "batch but is not per sample (a T x T attention mask or a table of T positions, "
            "such as rotary cos/sin, with T the batch size: hold it as a buffer of the "
            "module, sliced in its forward), or torch.func differentiates it wrongly under "
            "vmap. Make it act on each sample alone, or give it a structured kernel "
            "(rc.register_handler)"
        )

    def _call_eps(self) -> float:
        """The machine epsilon of the roundest precision the call ran in: under autocast a
        float32 output may come from half-precision inputs (found by review: bfloat16 GEMM
        plus a float32 bias, 3.1e-3 apart, was refused as coupling the samples) or
        products (a GRU's, :attr:`Block.product_eps`)."""
        leaves = pytree.tree_leaves((self.block.inputs, self.block.kwargs, self.output_value))
        return max(lowest_precision_eps(leaves), self.block.product_eps)

    def _parameters_eps(self) -> float:
        return torch.finfo(self.block.params[0].dtype).eps

    def _ran_coarser(self) -> bool:
        """Whether the call ran in a coarser precision than its parameters' dtype."""
        return self._call_eps() > self._parameters_eps()

    def evaluation_eps(self) -> float:
        """The machine epsilon the module's evaluation by the generic kernel (one sample at
        a time, or on the batch for the checks) rounds to: its parameters' dtype's, or
        where the call ran coarser, the batch call's run again
        (:meth:`_batch_evaluation`), which sees the module's own casts."""
        return self._batch_evaluation()[1] if self._ran_coarser() else self._parameters_eps()

    def deferred_checks(self) -> list[tuple[Tensor, object]]:
        """The outputs one sample at a time against the call's, within the square root of
        the call's precision (:meth:`_call_eps`); where that is coarser than the
        parameters', also against the batch call run again in the evaluation's precision
        (:meth:`_batch_evaluation`), within the square root of that
        (:meth:`evaluation_eps`)."""
        if self.mismatch is None:
            return []

        def explain(mismatch, against=""):
            raise ValueError(
                f"{named_module(self.block.name, self.block.module)} gives other "
                "outputs when evaluated one sample at a time, as kernel='generic' does "
                f"(largest relative difference {float(mismatch):.1e}{against}): it couples "
                "the samples of the batch, depends on the batch size, or takes an argument "
                "whose first dimension equals the batch but is not per sample"
                f"{self._buffers_hint()}. Make it act on each sample alone, or give it a "
                "structured kernel (rc.register_handler)"
            )

        checks = [(self.mismatch <= self._call_eps() ** 0.5, lambda: explain(self.mismatch))]
        if self.rerun_mismatch is not None:
            dtype = self.block.params[0].dtype
            checks.append(
                (
                    self.rerun_mismatch <= self.evaluation_eps() ** 0.5,
                    lambda: explain(
                        self.rerun_mismatch,
                        f" from the batch's run again in {str(dtype).removeprefix('torch.')}, without autocast or "
                        "reduced-precision products",
                    ),
                )
            )
        return checks

    def _buffers_hint(self) -> str:
        """Where the module has buffers: that it may update them as it runs, and the fix."""
        names = [n for n, _ in self.block.module.named_buffers()]
        if not names:
            return ""
        return (
            f"; or it updates its buffers {names[:4]} from the batch it sees (an observer of "
            "its inputs' range): one sample at a time it sees another. Freeze them while "
            "preconditioning (for quantisation-aware training: "
            "model.apply(torch.ao.quantization.disable_observer))"
        )

    def gradient_from_output(self, lam: Tensor) -> list[Tensor]:
        grads = self._rows_of_batch(lam[None])
        return [grads[n][0].to(self.dtype) for n in self.local_names]

    def K_mv(self, v: list[Tensor]) -> Tensor:
        return self.K() @ torch.cat([a.reshape(-1) for a in v])

    def K_tmv(self, t: Tensor) -> list[Tensor]:
        flat = self.K().T @ t
        return [
            c.reshape(s)
            for c, s in zip(flat.split([s.numel() for s in self.shapes]), self.shapes, strict=True)
        ]


def argument_batch_dims(module: nn.Module, inputs: tuple, kwargs: dict) -> list[int]:
    """Per leaf of a call's arguments (``pytree`` leaves of ``(inputs, kwargs)``), the
    dimension that holds the batch where it holds one: for an ``nn.RNNBase``, its input's
    ``0`` with ``batch_first``, else ``1`` (its first argument, or keyword ``input``), and
    ``1`` for its initial state ``hx`` (its second, or keyword); for a
    :func:`sequence_first` attention, ``1`` for its query, key and value; ``0`` for the
    others (an attention's ``key_padding_mask`` ``(N, S)`` is batch first)."""
    if isinstance(module, nn.RNNBase):
        dims = {"input": 0 if module.batch_first else 1, "hx": 1}
    elif sequence_first(module, inputs, kwargs):
        dims = dict.fromkeys(("query", "key", "value"), 1)
    else:
        return [0] * len(pytree.tree_leaves((inputs, kwargs)))
    names = list(dims)
    return [
        dims.get(k, 0)
        for k, a in [*zip(names + [None] * len(inputs), inputs), *kwargs.items()]
        for _ in pytree.tree_leaves(a)
    ]


def graph_batch_dims(module: nn.Module, inputs: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """Of a call's argument tensors in the autograd graph (those that require grad, in
    ``pytree`` order: :attr:`Block.graph_inputs`), the dimension that holds the batch
    (:func:`argument_batch_dims`); ``None`` where it is the first of each (any module but
    an ``nn.RNNBase`` or a :func:`sequence_first` attention: no walk of the arguments on
    the hot path)."""
    if not isinstance(module, nn.RNNBase) and not sequence_first(module, inputs, kwargs):
        return None
    leaves = pytree.tree_leaves((inputs, kwargs))
    dims = argument_batch_dims(module, inputs, kwargs)
    return tuple(
        d for a, d in zip(leaves, dims, strict=True) if isinstance(a, Tensor) and a.requires_grad
    )


def _initial_state(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` of a call of an ``nn.RNNBase`` on a batch without its initial
    state ``hx`` (left out, or ``None`` by position or keyword; the input by position or
    keyword) with the zeros it would start from passed as ``hx``: the module makes them
    itself and writes into them in place, which ``torch.func.vmap`` cannot split into
    samples (the same values, so the same outputs and Jacobians). Other calls' as they are."""
    if not isinstance(module, nn.RNNBase):
        return args, kwargs
    x = args[0] if args else kwargs.get("input")
    given = args[1] if len(args) > 1 else kwargs.get("hx")
    if given is not None or not isinstance(x, Tensor) or x.ndim != 3:
        return args, kwargs
    shape = (
        module.num_layers * (2 if module.bidirectional else 1),
        x.shape[0 if module.batch_first else 1],
    )
    h = x.new_zeros(*shape, module.proj_size or module.hidden_size)
    hx = (h, x.new_zeros(*shape, module.hidden_size)) if isinstance(module, nn.LSTM) else h
    if len(args) > 1:  # (found by review: lstm(x, None) and lstm(input=x) were refused)
        return (args[0], hx, *args[2:]), kwargs
    return args, {**kwargs, "hx": hx}


def attributes_of(module: nn.Module, found: list | None = None) -> tuple[nn.Module, dict, list]:
    """``module``, a copy of its ``__dict__``, and a copy of what each plain container it
    holds of its own holds (a ``list``, ``dict``, ``set``, ``collections.deque``,
    ``OrderedDict`` or ``defaultdict``, not one of their subclasses; :func:`_restore_attributes`),
    the state of each ``torch.Generator`` it holds (``self.gen``: its draws in a replay
    are the pass's), and of the values of its class's ``__slots__`` (:class:`_Slots`).
    ``found``, where given: the modules it holds outside its registered submodules (``object.__setattr__``,
    or an item of such a container or of a tuple) are appended to it
    (:func:`replayed_attributes`)."""
    state = dict(module.__dict__)
    held = []
    for k, v in state.items():
        if k not in _TORCH_OWN:
            _held(v, held, found)
    slots = _SLOTS.get(type(module))
    if slots is None:
        slots = _slots_of(type(module))
    if slots:
        values = {}
        for slot in slots:
            try:
                values[slot] = value = slot.__get__(module, type(module))
            except AttributeError:  # not set
                values[slot] = _MISSING
                continue
            _held(value, held, found)
        held.append((_Slots(module), values))
    return module, state, held


def _held(value, held: list, found: list | None) -> None:
    """Note ``value``, an attribute of a module: a copy of its items where it is a plain
    container (:data:`_COPIED`), the state of a ``torch.Generator``, and, where ``found``
    is given, the modules it is or holds (as one of the first
    :data:`REPLAY_SEARCH_ENTRIES` items of such a container or of a tuple: not in a
    container held in another), as a sequence to append to ``found``."""
    copied = _COPIED.get(type(value))
    if type(value) is torch.Generator:  # its state: a replay draws what the pass drew
        held.append((value, value.get_state()))
    elif copied is not None:
        items = copied(value)
        held.append((value, items))
        if found is not None and items:
            if type(items) is dict:
                items = items.values()
            if _any_module(items):
                found.append(list(itertools.islice(items, REPLAY_SEARCH_ENTRIES)))
    elif found is not None:
        if type(value) is tuple:
            if _any_module(value):
                found.append(value[:REPLAY_SEARCH_ENTRIES])
        elif _is_module(value):
            found.append((value,))


def _is_module(value) -> bool:
    """``isinstance(value, nn.Module)``, ``False`` for a ``weakref.proxy`` whose object is
    gone (whose ``__class__`` raises ``ReferenceError``: found by review, a module holding
    one, a forward pass that runs without the preconditioner, raised it at every pass)."""
    try:
        return isinstance(value, nn.Module)
    except ReferenceError:
        return False


def _any_module(items) -> bool:
    """Whether one of the first :data:`REPLAY_SEARCH_ENTRIES` of ``items`` (a sequence or
    a dict's values) is a module (:func:`_is_module`; one C-level loop first)."""
    try:
        return any(map(isinstance, itertools.islice(items, REPLAY_SEARCH_ENTRIES), _MODULE))
    except ReferenceError:
        return any(map(_is_module, itertools.islice(items, REPLAY_SEARCH_ENTRIES)))


#: How many items of each container a module holds are searched for modules it holds
#: unregistered (:func:`replayed_attributes`): searching every item of a list of 50,000
#: tensors took 3.5 ms a pass, 13 times its copy (a loaded 2-core CPU).
REPLAY_SEARCH_ENTRIES = 256
_MODULE = itertools.repeat(nn.Module)


class _Slots:
    """The ``__slots__`` of ``module``'s class, as :func:`attributes_of` holds them: an
    entry ``(_Slots(module), {descriptor: value})`` (:data:`_MISSING`: not set)."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module


#: the slot descriptors of each class's ``__slots__`` (those of its bases too)
_SLOTS: dict[type, tuple] = {}


def _slots_of(cls: type) -> tuple:
    slots = _SLOTS[cls] = tuple(
        d
        for c in cls.__mro__
        if "__slots__" in c.__dict__
        for d in c.__dict__.values()
        if type(d) is types.MemberDescriptorType
    )
    return slots


def replayed_attributes(
    modules, known: set[int] | None = None, found: list | None = None
) -> list[tuple[nn.Module, dict, list]]:
    """:func:`attributes_of` each of ``modules`` whose forward may keep Python state
    of its own (a call counter, a flag, a running average in a float, a list it appends
    to): those of a type that is not torch's own (``torch.nn.Linear``, ``torch.nn.ReLU``,
    whose forward reads only its configuration), and torch's own whose forward was
    replaced on the instance. What a replay of a recorded forward pass starts from
    (:func:`restored_attributes`). Snapshotting torch's own too took 184 microseconds a
    pass instead of 17 on an MLP of 48 Linear layers, which has none of the others (a
    loaded 2-core CPU). A type is torch's own where every class it derives from is: a
    module of the user's parametrized (``torch.nn.utils.parametrize`` makes it a class
    ``Parametrized...`` of torch's module, derived from the user's) keeps the user's
    forward (found by review: a parametrization frozen, its counter not replayed, 0.51
    off silently).

    So are, by the same rule, the modules those hold outside the registered submodules
    (``object.__setattr__(self, "w", module)``, or in a list, tuple, dict, set or deque
    attribute), and their submodules and the modules they hold in turn, each once
    (``known``: the ids of the modules not taken as such, by default those of
    ``modules``; ``found``: such modules found already): a counter there was not replayed
    (found by a hunt: a warm-up ``a h + (1 - a) h.detach()`` in such a module, 0.6-0.8
    off silently, and the counter moved twice a step)."""
    modules = modules if isinstance(modules, list) else list(modules)
    found = [] if found is None else found
    attributes = [attributes_of(m, found) for m in modules if _replayed(m)]
    if found:
        seen = {id(m) for m in modules} if known is None else set(known)
        attributes += _unregistered(found, seen)
    return attributes


def call_attributes(module: nn.Module, registered=None) -> list[tuple[nn.Module, dict, list]]:
    """:func:`attributes_of` ``module`` and each of its submodules, and of the modules
    they hold outside their registered submodules (as :func:`replayed_attributes` finds
    them; ``registered``: a callable giving the ids of the model's modules, not taken as
    such): what the generic kernel evaluates the call with (found by a hunt: a counter in
    a module held unregistered moved at every evaluation, the first step refused as a
    module that couples the samples)."""
    modules = list(module.modules())
    found: list = []
    attributes = [attributes_of(m, found) for m in modules]
    if found:
        attributes += _unregistered(
            found, {id(m) for m in modules}, registered() if registered is not None else frozenset()
        )
    return attributes


def _unregistered(found: list, seen: set[int], registered: frozenset[int] = frozenset()) -> list:
    """:func:`attributes_of` the modules in ``found`` (sequences of the items that may be
    modules, :func:`_held`), and of their submodules, and of the modules those hold in
    turn, by :func:`replayed_attributes`' rule: each once, those of ``seen`` and
    ``registered`` (ids) left out (a module held back, a child's
    ``object.__setattr__(self, "parent", parent)``, walks nothing; a list of the model's
    modules held by each of 48 modules, one C-level test a list)."""
    attributes = []
    while found:
        items = found.pop()
        if seen.issuperset(map(id, items)):
            continue
        for held in items:
            if id(held) in seen or not _is_module(held) or id(held) in registered:
                continue  # (its submodules are registered too)
            for m in held.modules():
                if id(m) not in seen and id(m) not in registered:
                    seen.add(id(m))
                    if _replayed(m):
                        attributes.append(attributes_of(m, found))
    return attributes


def _replayed(module: nn.Module) -> bool:
    """Whether :func:`replayed_attributes` keeps ``module``'s attributes."""
    return "forward" in module.__dict__ or not _torchs_own(type(module))


# (a plain dict: a class is made anew by a parametrization registered, not by a pass)
_OWN_TYPES: dict[type, bool] = {}


def _torchs_own(cls: type) -> bool:
    """Whether every class of ``cls``'s MRO is torch's own (or Python's: ``object``,
    ``abc.ABC``, ``typing.Generic``)."""
    own = _OWN_TYPES.get(cls)
    if own is None:
        own = _OWN_TYPES[cls] = all(
            c.__module__.startswith("torch.") or c.__module__ in _PYTHONS for c in cls.__mro__
        )
    return own


_PYTHONS = frozenset({"builtins", "abc", "typing"})


def restored_attributes(attributes: list[tuple[nn.Module, dict, list]]) -> None:
    """Give the modules of ``attributes`` (:func:`replayed_attributes`) the plain
    attributes they had then, as :func:`_restore_attributes` does, except those every
    module holds (:data:`_TORCH_OWN`: its ``training`` flag, its hooks, parameters,
    buffers and submodules), which stay as they are now; nor :func:`read_by_holder`'s mark
    (found by review: a module of the user's type marked after the forward pass lost its
    mark in the replay, refused as a module not called where one of torch's was taken)."""
    _restore_attributes(attributes, keep=_KEPT)


def _restore_attributes(
    attributes: list[tuple[nn.Module, dict, list]], keep: frozenset = frozenset((READ_BY_HOLDER,))
) -> None:
    """Give each module the plain attributes it had (:func:`attributes_of`): a module,
    or a pre-hook, that stores a tensor on the module as it runs (``self.attn = weights``
    kept for a plot, pruning's ``weight``) stored torch.func's wrapped tensor of a
    per-sample call, which escaped ``vmap`` (found by a hunt: reading it after
    ``pre.step()`` raised "Batching rule not implemented"). The attributes' values are put
    back as they were by identity; what was added is removed. So are the items of a list,
    dict, set or deque it holds (``self.acts.append(h)``, ``self.maps["attn"] = a``; found
    by review: two entries more a step, one of them unreadable), and the values of its
    class's ``__slots__`` (one not set then is unset), and the state of a generator it
    holds (found by a hunt: a replay drew from it where the pass had left it, refused as
    another output, and moved it on); not what it stores elsewhere (a
    global dict, another module: that module's own entry restores it). ``keep``: names
    left as they are (by default :func:`read_by_holder`'s mark, which is not state a pass
    moves)."""
    for m, before, held in attributes:
        now = m.__dict__
        for name in [n for n in now if n not in before and n not in keep]:
            del now[name]
        for name, value in before.items():
            if name not in keep and now.get(name, _MISSING) is not value:
                now[name] = value
        for container, items in held:
            if type(container) is _Slots:
                for slot, value in items.items():
                    try:
                        now_value = slot.__get__(m, type(m))
                    except AttributeError:
                        now_value = _MISSING
                    if now_value is not value:
                        if value is _MISSING:
                            slot.__delete__(m)
                        else:
                            slot.__set__(m, value)
            elif type(container) is torch.Generator:
                container.set_state(items)
            elif isinstance(container, (list, collections.deque)):
                if len(container) != len(items) or any(
                    a is not b for a, b in zip(container, items, strict=True)
                ):
                    container.clear()
                    container.extend(items)
            elif isinstance(container, set):
                if container != items:
                    container.clear()
                    container.update(items)
            elif list(container) != list(items) or any(
                container[k] is not v for k, v in items.items()
            ):  # (the keys' order too: an OrderedDict's is read)
                container.clear()
                container.update(items)


#: What every module holds in its ``__dict__`` (torch's own registries: hooks, parameters,
#: buffers, submodules), whose items registration changes; not restored item by item.
_TORCH_OWN = frozenset(nn.Module().__dict__)
#: What :func:`restored_attributes` leaves as it is: those and :func:`read_by_holder`'s mark
_KEPT = _TORCH_OWN | {READ_BY_HOLDER}
_MISSING = object()
#: The containers whose items :func:`attributes_of` copies, each with its copy; a
#: running average over a ``deque(maxlen=k)`` of the last passes, ``self.seen.add(...)``
_COPIED = {
    list: list,
    dict: dict,
    set: set,
    collections.deque: list,
    collections.OrderedDict: dict,
    collections.defaultdict: dict,
}


class _Unhooked(nn.Module):
    """``module``'s call as the capture records it: its inputs as they reached ``forward``
    (after any pre-hook) and its output before any hook changes it (a user's hook that
    scales the output lies between the module and the rows pulled back to it).

    The module's pre-hooks still run, for what they set on the module (pruning computes
    ``weight`` from ``weight_orig`` in one), but what they return is dropped: the recorded
    inputs already are what they returned; and they run on copies of the inputs, which
    already hold what they edit in place (found by a hunt: ``args[0].mul_(2)`` doubled the
    recorded input again, refused as a module that couples the samples).
    riemann_core's own hooks are skipped."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        from .capture import OwnHook  # capture imports this module

        m = self.module
        for key, hook in m._forward_pre_hooks.items():
            if isinstance(hook, OwnHook):
                continue
            # copies: the dict, and the tensors, may be edited in place
            copies, kw = pytree.tree_map(
                lambda a: a.clone() if isinstance(a, Tensor) else a, (args, kwargs)
            )
            if key in m._forward_pre_hooks_with_kwargs:
                hook(m, copies, dict(kw))
            else:
                hook(m, copies)
        return m.forward(*args, **kwargs)


class SharedHandler(Handler):
    """A block whose parameters several calls use: weight tying between modules
    (``m2.weight = m1.weight``), or one module called more than once.

    By the chain rule the loss reaches a shared parameter through every call, so
    ``K = sum_c K_c P_c`` with ``K_c`` the kernel of call ``c`` (its inputs held fixed,
    its rows pulled back to its own output) and ``P_c`` the selection of the call's
    parameters among the block's. The Gram ``K K^T`` has cross terms between calls, so
    ``K`` is materialised (``O(d n_a)`` memory, like the generic kernel).
    """

    def __init__(self, block: Block, handlers: list[Handler]):
        self.block = block
        self.handlers = handlers
        self.delta = handlers[0].delta
        self.r, self.N, self.d = handlers[0].r, handlers[0].N, handlers[0].d
        index = {id(p): i for i, p in enumerate(block.params)}
        self.slots = [[index[id(p)] for p in h.block.params] for h in handlers]
        self._K = None

    def to(self, dtype: torch.dtype) -> Handler:
        new = copy.copy(self)
        new.handlers = [h.to(dtype) for h in self.handlers]
        new.delta = self.delta.to(dtype)
        new._K = None if self._K is None else self._K.to(dtype)
        return new

    def compress_rows(self) -> None:
        """Kept as they are: every call's rows must stay aligned with the others'."""

    def gradient(self) -> list[Tensor]:
        return self._sum([h.gradient() for h in self.handlers])

    def gradient_from_output(self, lam: Tensor) -> list[Tensor]:
        raise TypeError("a shared block has one output per call; use gradient()")

    def deferred_checks(self) -> list[tuple[Tensor, object]]:
        return [c for h in self.handlers for c in h.deferred_checks()]

    def _sum(self, per_call: list[list[Tensor]]) -> list[Tensor]:
        """``sum_c P_c^T x_c``: per-call tensors added into the block's parameters."""
        out = [torch.zeros_like(p, dtype=self.dtype) for p in self.block.params]
        for slots, tensors in zip(self.slots, per_call, strict=True):
            for j, x in zip(slots, tensors, strict=True):
                out[j] = out[j] + x
        return out

    def K(self) -> Tensor:
        if self._K is None:
            sizes = [p.numel() for p in self.block.params]
            offsets = [sum(sizes[:j]) for j in range(len(sizes))]
            K = torch.zeros(self.d, sum(sizes), dtype=self.dtype, device=self.delta.device)
            for slots, h in zip(self.slots, self.handlers, strict=True):
                for j, Kc in zip(slots, h.K().split([sizes[j] for j in slots], 1), strict=True):
                    K[:, offsets[j] : offsets[j] + sizes[j]] += Kc
            self._K = K
        return self._K

    def K_mv(self, v: list[Tensor]) -> Tensor:
        return sum(
            h.K_mv([v[j] for j in slots])
            for slots, h in zip(self.slots, self.handlers, strict=True)
        )

    def K_tmv(self, t: Tensor) -> list[Tensor]:
        return self._sum([h.K_tmv(t) for h in self.handlers])


#: Structured kernels by exact module type (subclasses may change ``forward``).
STRUCTURED: dict[type, type[Handler]] = {
    nn.Linear: LinearHandler,
    nn.Conv2d: Conv2dHandler,
    nn.LayerNorm: LayerNormHandler,
    nn.RMSNorm: RMSNormHandler,
    nn.GroupNorm: GroupNormHandler,
    nn.Embedding: EmbeddingHandler,
}
KERNELS = ("structured", "generic", "auto")


def register_handler(module_type: type, handler: type[Handler], *, overwrite: bool = False):
    """Register a structured kernel for ``module_type`` (``overwrite=True`` to replace):
    ``handler`` a concrete subclass of :class:`Handler`, ``module_type`` a subclass of
    ``nn.Module``. Checked here, since the registry is global: a bad entry would break
    every later call on such a module; the shapes the kernel's products return are
    checked at every call (:func:`_shape_checked`), and that they are products of one
    ``K`` once per shape of the module's call (:func:`register_kernel_checks`)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of nn.Module, got {module_type!r}")
    if not (isinstance(handler, type) and issubclass(handler, Handler)) or inspect.isabstract(
        handler
    ):
        raise TypeError(
            f"handler must be a subclass of riemann_core.Handler that implements its abstract "
            f"methods (gradient_from_output, K, K_mv, K_tmv), got {handler!r}"
        )
    if module_type in STRUCTURED and not overwrite:
        raise ValueError(
            f"{module_type.__name__} already has the kernel {STRUCTURED[module_type].__name__}; "
            "pass overwrite=True to replace it"
        )
    STRUCTURED[module_type] = _shape_checked(handler)


def _shape_checked(handler: type[Handler]) -> type[Handler]:
    """``handler`` with the shapes of what its products return checked at every call: a
    registered kernel's wrong shape is named with the method that returned it (found by a
    hunt: a broadcasting or size error deep in the solve, naming neither)."""

    def check(self, what: str, got, expected: list[tuple[int, ...]]):
        listed = isinstance(got, (list, tuple))
        shapes = [tuple(getattr(t, "shape", ())) for t in got] if listed else type(got).__name__
        if shapes != expected:
            raise ValueError(
                f"{handler.__qualname__}.{what} returned {shapes} for "
                f"{named_module(self.block.name, self.block.module)}, where a kernel "
                f"returns the shapes {expected}: fix the kernel registered by rc.register_handler"
            )
        # (found by a hunt: a float32 or integer K of a float64 kernel, a numpy array or a
        # K that requires grad failed deep in the solve, naming neither; method='full'
        # took a float32 K silently, the direction float32-accurate in a float64 model)
        wrong = [
            type(t).__name__
            if not isinstance(t, Tensor)
            else f"{t.dtype} on {t.device}" + (" requiring grad" if t.requires_grad else "")
            for t in (got if listed else [got])
            if not isinstance(t, Tensor)
            or t.dtype != self.dtype
            or t.device != self.device
            or t.requires_grad
        ]
        if wrong:
            raise ValueError(
                f"{handler.__qualname__}.{what} returned {wrong[0]} for "
                f"{named_module(self.block.name, self.block.module)}, where a kernel "
                f"returns tensors of its algebra's dtype and device ({self.dtype} on "
                f"{self.device}, those of self.delta) that do not require grad: fix the "
                "kernel registered by rc.register_handler"
            )
        return got

    def own(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.block.params]

    class Checked(handler):
        #: the calls' :func:`_signature` whose products, and whose materialised ``K``,
        #: were checked (:func:`register_kernel_checks`, :func:`_check_materialised`)
        products_checked: set = set()
        K_checked: set = set()

        def K(self):
            K = check(self, "K()", [super().K()], [(self.d, self.block.n_params)])[0]
            key = _signature(self)
            # (found by a hunt: a zero K, behind a zero-initialised head, passed vacuously)
            if key not in Checked.K_checked and bool(self.delta.isfinite().all() & K.ne(0).any()):
                Checked.K_checked.add(key)  # (first: a K_mv that materialises K calls K())
                try:
                    _check_materialised(self, K, handler.__qualname__)
                except BaseException:  # checked again at the next call, until it passes
                    Checked.K_checked.discard(key)
                    raise
            return K

        def K_mv(self, v):
            return check(self, "K_mv(v)", [super().K_mv(v)], [(self.d,)])[0]

        def K_tmv(self, t):
            return check(self, "K_tmv(t)", super().K_tmv(t), own(self))

        def gradient_from_output(self, lam):
            return check(
                self, "gradient_from_output(lam)", super().gradient_from_output(lam), own(self)
            )

    Checked.__name__, Checked.__qualname__ = handler.__name__, handler.__qualname__
    Checked.__module__, Checked.__doc__ = handler.__module__, handler.__doc__
    return Checked


def registered(handler: Handler) -> bool:
    """Whether ``handler`` is a kernel registered by :func:`register_handler`."""
    return hasattr(type(handler), "products_checked")


def _signature(h: Handler) -> tuple:
    """What a kernel's products may depend on besides the values: the shapes of the
    parameters, of a sample's inputs and output, and whether there are several rows per
    sample and several samples (a mix-up of the probe-major order shows only then)."""
    leaves = pytree.tree_leaves((h.block.inputs, h.block.kwargs))
    per_sample = tuple(tuple(a.shape[1:]) for a in leaves if isinstance(a, Tensor))
    params = tuple(tuple(p.shape) for p in h.block.params)
    return params, per_sample, tuple(h.delta.shape[2:]), h.r > 1, h.N > 1


def _probes(h: Handler) -> tuple[list[Tensor], Tensor, Tensor]:
    """Random ``v`` shaped like the block's parameters and two random ``t`` of length
    ``d``, in the kernel's dtype and device; from a generator of their own (the global
    random state is the user's)."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        x = torch.randn(*shape, generator=generator, dtype=torch.float64)
        return x.to(device=h.device, dtype=h.dtype)

    return [randn(*p.shape) for p in h.block.params], randn(h.d), randn(h.d)


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([a.reshape(-1) for a in tensors])


def _relative(a: Tensor, b: Tensor) -> Tensor:
    """``|a - b| / (|a| + |b|)``: 0 where both are zero, NaN where either is not finite."""
    scale = (a.norm() + b.norm()).clamp_min(torch.finfo(a.dtype).tiny)
    return (a - b).norm() / scale


def register_kernel_checks(checks, handler: Handler) -> None:
    """Register with ``checks`` (:class:`~riemann_core._checks.Deferred`) that a registered
    kernel's products are those of one ``K`` with rows the vector-Jacobian products of
    ``Delta`` (row ``s N + b``: ``delta_{s,b}`` through sample ``b``'s call), on random
    ``v``, ``t``, ``g``:

    * ``K^T t = B^T lam`` at ``lam = sum_s t_s Delta_s`` (``gradient_from_output``, which
      the coupling probe checks against autograd);
    * ``<K v, s> = <v, K^T s>`` at ``s = K v / |K v| + g / |g|`` (``K_mv`` the adjoint of
      ``K_tmv``, scale errors of either plain);
    * where overridden, ``gram() t = K (K^T t)`` and, where ``n_a <= d``,
      ``metric() v = K^T (K v)``; ``K`` itself the first time it is materialised
      (:func:`_check_materialised`).

    Until it passes once for a registered class and :func:`_signature` of a call (found
    by a hunt: a ``K_mv`` or ``K_tmv`` off by 2x, a ``K_tmv`` reading the rows
    sample-major, a Gram ``2 K K^T`` gave layerwise and natural directions 2 to 9 times off
    the oracle, without an error); vacuous, and not counted as passed, where ``Delta`` is
    not finite (the data's checks name that) or ``K^T t`` is zero (all-zero rows, as behind
    a zero-initialised head: found by a hunt, a ``K_mv`` off by 2x passed there and gave
    every later direction 2.1 to 2.6 times off the oracle). A half-precision kernel (rows pulled back
    under autocast) is checked in float32, as its algebra runs after."""
    for h in handler.handlers if isinstance(handler, SharedHandler) else [handler]:
        key = _signature(h) if registered(h) else None
        if key is None or key in type(h).products_checked:
            continue
        ok, explain, seen = _products_agree(h)
        checks.require(ok, explain)
        checks.then(functools.partial(_passed, type(h).products_checked, key, checks.read(seen)))


def _passed(checked: set, key: tuple, seen) -> None:
    """Count ``key`` as checked where the check could see (finite rows, ``K^T t != 0``)."""
    if seen.value:
        checked.add(key)


def _products_agree(h: Handler) -> tuple[Tensor, object, Tensor]:
    """``(ok, explain, seen)``: the check of :func:`register_kernel_checks` for one call,
    and whether it could see: finite rows and ``K^T t`` or ``B^T lam`` not zero (on zero
    rows every product of every kernel may be zero)."""
    h = h.to(torch.float32) if h.dtype in (torch.float16, torch.bfloat16) else h
    v, t, g = _probes(h)
    lam = (h.delta * t.view((h.r, h.N) + (1,) * (h.delta.ndim - 2))).sum(0)
    Kt, gradient = h.K_tmv(t), h.gradient_from_output(lam)
    u = h.K_mv(v)
    tiny = torch.finfo(h.dtype).tiny
    s = u / u.norm().clamp_min(tiny) + g / g.norm()
    Ks = _flat(h.K_tmv(s))
    # the rounding bound of the two inner products, not their value, is the scale
    scale = ((u * s).abs().sum() + (_flat(v) * Ks).abs().sum()).clamp_min(tiny)
    relations = [
        (
            "K_tmv(t) = gradient_from_output(lam) at lam = sum_s t_s Delta_s",
            _relative(_flat(Kt), _flat(gradient)),
        ),
        ("<K_mv(v), s> = <v, K_tmv(s)>", ((u * s).sum() - (_flat(v) * Ks).sum()).abs() / scale),
    ]
    if type(h).gram_into is not Handler.gram_into:
        G = h.gram()  # its lower triangle
        relations.append(
            ("gram() t = K_mv(K_tmv(t))", _relative(G @ t + G.tril(-1).mT @ t, h.K_mv(Kt)))
        )
    if type(h).metric is not Handler.metric and h.block.n_params <= h.d:
        Kv = _flat(h.K_tmv(u))
        relations.append(("metric() v = K_tmv(K_mv(v))", _relative(h.metric() @ _flat(v), Kv)))
    errors = torch.stack([e for _, e in relations])
    tolerance = torch.finfo(h.dtype).eps ** 0.5
    finite = h.delta.isfinite().all()
    ok = (errors <= tolerance).all() | ~finite
    seen = finite & (_flat(Kt).ne(0).any() | _flat(gradient).ne(0).any())
    name, block = type(h).__qualname__, h.block

    def explain():
        wrong = [
            f"{what} off by {float(e):.1e}"
            for (what, _), e in zip(relations, errors.tolist(), strict=True)
            if not e <= tolerance
        ]
        raise ValueError(
            f"{name}'s products for {named_module(block.name, block.module)} "
            f"are not those of one K, on random v and t (relative, {h.dtype}): "
            f"{'; '.join(wrong)}. {_KERNEL_RULES}"
        )

    return ok, explain, seen


def _check_materialised(h: Handler, K: Tensor, name: str) -> None:
    """``K v = K_mv(v)`` and ``K^T t = K_tmv(t)`` on random vectors, read at once: the
    first time a registered kernel's ``K`` is materialised for a :func:`_signature`
    (``method="full"`` reads only ``K`` and the gradient; found by a hunt: a ``K`` with
    its columns out of parameter order gave a direction 12x off the oracle)."""
    v, t, _ = _probes(h)
    errors = [_relative(K @ _flat(v), h.K_mv(v)), _relative(K.T @ t, _flat(h.K_tmv(t)))]
    tolerance = torch.finfo(h.dtype).eps ** 0.5
    wrong = [
        f"{what} off by {e:.1e}"
        for what, e in zip(("K() v = K_mv(v)", "K()^T t = K_tmv(t)"), torch.stack(errors).tolist())
        if not e <= tolerance
    ]
    if wrong:
        raise ValueError(
            f"{name}'s K() for {named_module(h.block.name, h.block.module)} is "
            f"not the K of its products, on random v and t (relative, {h.dtype}): "
            f"{'; '.join(wrong)}. {_KERNEL_RULES}"
        )


_KERNEL_RULES = (
    "A kernel's K (d x n_a, columns in the order of self.block.params, the trainable "
    "parameters) has as row s N + b the vector-Jacobian product of self.delta[s, b] "
    "through sample b's call: K_mv(v) = K v, K_tmv(t) = K^T t, gradient_from_output(lam) = "
    "the gradient of the call's output against lam (so K_tmv(t) is gradient_from_output "
    "of lam[b] = sum_s t[s N + b] self.delta[s, b]), gram() = K K^T, metric() = K^T K. "
    "Fix the kernel and register it again (rc.register_handler(..., overwrite=True))"
)


def has_kronecker_factors(module: nn.Module) -> bool:
    """Whether K-FAC factorises ``module``'s metric: a structured kernel with Kronecker
    factors (:class:`PatchHandler`) that supports its settings."""
    cls = STRUCTURED.get(type(module))
    return cls is not None and issubclass(cls, PatchHandler) and cls.supports(module) is None


def _no_kronecker_shared(name: str) -> ValueError:
    return ValueError(
        f"method='kfac' has no Kronecker factorisation for the block {name!r}, whose "
        "parameters several module calls share (weight tying, or a module called twice): its "
        "metric is a sum of Kronecker products. Use method='layerwise', 'full' or 'natural', "
        "which are exact for it"
    )


def _no_kronecker(name: str, module: nn.Module) -> ValueError:
    cls = STRUCTURED.get(type(module))
    reason = cls.supports(module) if cls is not None and issubclass(cls, PatchHandler) else None
    if cls is None:
        reason = _subclass_of_structured(module)
    if reason is None and forward_replaced(module):
        reason = "a forward replaced on the instance, under a kernel other than 'structured'"
    return ValueError(
        f"method='kfac' has no Kronecker factorisation for {named_module(name)} "
        f"({type(module).__name__}{': ' + reason if reason else ''}); K-FAC supports Linear "
        "and Conv2d (groups=1, zero padding). Use method='layerwise' for other modules"
    )


def check_kronecker(calls: list[Block], kernel: str = "structured") -> None:
    """Refuse, before any work, the calls :func:`kronecker_handler` would refuse under the
    ``kernel`` option (found by a hunt: ``pre.backward`` refused a LayerNorm once its
    backward pass had consumed the user's graph)."""
    callers: dict[str, list[str]] = {}
    for c in calls:
        for n in c.param_names:
            callers.setdefault(n, []).append(c.name)
        generic = kernel != "structured" and forward_replaced(c.module)
        if not has_kronecker_factors(c.module) or generic:
            raise _no_kronecker(c.name, c.module)
    shared = next((names for names in callers.values() if len(names) > 1), None)
    if shared:  # (named as the block of the calls: "0+2")
        raise _no_kronecker_shared("+".join(dict.fromkeys(shared)))


def kronecker_handler(handler: Handler) -> PatchHandler:
    """A handler with K-FAC factors for ``handler``'s block (any kernel was asked for)."""
    if isinstance(handler, PatchHandler):
        return handler
    if isinstance(handler, SharedHandler):
        raise _no_kronecker_shared(handler.block.name)
    module = handler.block.module
    if not has_kronecker_factors(module) or forward_replaced(module):
        # (the factors assume its class's forward, which no probe of the generic kernel
        # checks: found by a hunt, a forward replaced on the instance)
        raise _no_kronecker(handler.block.name, module)
    structured = STRUCTURED[type(handler.block.module)](handler.block)  # on the call's
    # data: in the dtype of the handler's
    return structured if structured.dtype == handler.dtype else structured.to(handler.dtype)


def evaluated_per_sample(module: nn.Module, kernel: str) -> bool:
    """Whether :func:`handler_for` gives a call of ``module`` (one owning trainable
    parameters) the generic kernel, which evaluates it again one sample at a time."""
    if kernel == "generic":
        return True
    return kernel == "auto" and structured_reason(module) is not None


def structured_reason(module: nn.Module) -> str | None:
    """Why ``kernel="auto"`` gives ``module`` the generic kernel (``None``: it does not): no
    structured kernel, one that does not support its settings, or a forward replaced on the
    instance, which may compute other than its class's (``kernel="structured"`` takes such
    a module where the coupling probe checks it: found by a hunt, accelerate's device hooks
    pass, a forward scaling the weight does not)."""
    cls = STRUCTURED.get(type(module))
    if cls is None:
        return "no structured kernel"
    return cls.supports(module) or ("a forward replaced" if forward_replaced(module) else None)


def _subclass_of_structured(module: nn.Module) -> str | None:
    """Where ``module``'s class subclasses one with a structured kernel (a hunt: a plain
    ``class MyLinear(nn.Linear)`` read as if it had none): kernels are looked up by exact
    class, since a subclass may compute otherwise."""
    parent = next((t for t in STRUCTURED if isinstance(module, t)), None)
    if parent is None:
        return None
    kernel, cls = STRUCTURED[parent], type(module)
    # by module too where the names are alike (found by review: torch.ao.nn.qat.Linear read
    # "Linear subclasses Linear" and rc.register_handler(Linear, ...), nn.Linear's)
    name, parents = (
        (f"{cls.__module__}.{cls.__qualname__}", f"{parent.__module__}.{parent.__qualname__}")
        if cls.__name__ == parent.__name__
        else (cls.__name__, parent.__name__)
    )
    registration = f"rc.register_handler({name}, {kernel.__module__}.{kernel.__name__})"
    # a forward of its own, which the parent's kernel does not read (found by review:
    # registered, F.linear(x, 2 * self.weight, self.bias) was refused as parameters used
    # outside their module's call, or with check_coupling=False taken, 2x off)
    own = getattr(cls, "forward", None) is not getattr(parent, "forward", None)
    advice = (
        f"{name} overrides forward, and {kernel.__name__} assumes {parents}'s: "
        f"{registration} only where it computes exactly what {parents}'s does, otherwise "
        "kernel='auto'"
        if own
        else f"where it computes what {parents} does: {registration}"
    )
    return (
        f"{name} subclasses {parents}, and kernels are looked up by exact class, since a "
        f"subclass may compute otherwise ({advice})"
    )


def _no_structured_kernel(module: nn.Module) -> str:
    """Why ``module``, whose class has no structured kernel, has none."""
    beside = _subclass_of_structured(module)
    return "no structured kernel" + (f": {beside}" if beside else "")


def handler_for(block: Block, kernel: str) -> Handler:
    """The kernel for ``block``: structured where registered, generic where asked for; a
    shared block sums the kernels of its calls."""
    if block.calls:
        return SharedHandler(block, [handler_for(c, kernel) for c in block.calls])
    if kernel == "generic":
        return GenericHandler(block)
    cls = STRUCTURED.get(type(block.module))
    if kernel == "auto":
        return GenericHandler(block) if structured_reason(block.module) else cls(block)
    reason = _no_structured_kernel(block.module) if cls is None else cls.supports(block.module)
    if reason is None:
        return cls(block)
    supported = ", ".join(t.__name__ for t in STRUCTURED)
    what = type(block.module).__name__
    # (a review's note: "has parameters but parameters other than weight and bias")
    unfit = (
        f"has parameters but {reason}"
        if cls is None
        else f"does not fit its structured kernel: {reason}"
    )
    raise ValueError(
        f"{named_module(block.name)} ({what}) {unfit}; "
        f"structured kernels exist for {supported}. Pass kernel='generic' (torch.func, "
        "materialises K) or kernel='auto' (structured where possible, generic elsewhere); "
        "with method='kfac' no kernel helps: it has Kronecker factors for Linear and Conv2d "
        "(groups=1, zero padding) only, use method='layerwise' "
        "for other modules"
    )
