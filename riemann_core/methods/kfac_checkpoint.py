"""K-FAC's state across steps as a checkpoint: :func:`state_dict` and :func:`load`.

What a run needs to resume exactly is the step count, the running averages and, per
module whose factorisation is cached, its trainable parameters' names, its factor rows
and the factors it was factorised from: ``Gamma`` and the input factor ``A`` (a module
has at most one: its weight's, or weight and bias together), thin as their rows or
dense. Everything else (the module, its kernel, its Kronecker blocks) comes from the
model, and the factorisations are computed again from the factors as the step computed
them (deferred, and checked only where that failed; those of one order in one batched
call, as a step that refreshes every module does, the eigendecompositions and the
condition estimates' power iterations on a GPU only: resumed between a step that
refactorised some modules alone and the next refresh, a GPU's eigenvectors, Cholesky
factors and condition estimates may differ in their last bits, as cuSOLVER and cuBLAS
batch small matrices another way), so on the same machine a resumed run takes the same
steps, to the bit, as one never interrupted (with ``pre.backward``: for Linear layers in
the model's dtype, see docs/api.md#checkpoints).

The checkpoint holds only tensors, strings, numbers and lists: ``torch.save`` writes it
and ``torch.load(..., weights_only=True)`` reads it. :func:`load` checks all of it
against the model before changing anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from .._precision import full_precision
from ..kronecker import Factor
from ..modules import STRUCTURED, Block, PatchHandler, named_module
from ..woodbury import SolveError
from ._base import Options
from .kfac import (
    Cached,
    DampedBlock,
    KFACState,
    average_key,
    block_parts,
    damped_blocks,
    damped_modules,
    factor_names,
    module_shapes,
)

#: The options that shape the state, with their types: loading under others is refused.
SHAPING = {"refresh": int, "decay": Real, "bias": str}


def state_dict(state: KFACState, opts: Options) -> dict:
    """``state`` as plain data (its tensors themselves, not copies: none is changed in
    place, a later step replaces them)."""
    return {
        "refresh": state.refresh,
        "decay": state.decay,
        "bias": opts.kfac_bias,
        "steps": state.steps,
        "averages": dict(state._averages),
        "cached": {name: _cached_state(c) for name, c in state._cached.items()},
    }


def _cached_state(cached: Cached) -> dict:
    inputs = [b.A for b in cached.blocks if b.A is not None]
    return {
        "param_names": list(cached.block.param_names),
        "kernel": cached.kernel,
        "rows": cached.rows,
        "gamma": _factor_state(cached.blocks[0].gamma),
        "A": _factor_state(inputs[0]) if inputs else None,
        "data_dtype": None if cached.data_dtype is None else str(cached.data_dtype),
    }


def _factor_state(factor: Factor) -> dict:
    return {"rows": factor.rows} if factor.thin else {"matrix": factor.matrix}


def load(state: KFACState, saved, network: nn.Module, opts: Options) -> None:
    """Restore ``state`` from ``saved`` (:func:`state_dict`'s), for ``network``'s
    modules and parameters (found by name, on their device); refactorise the cached
    modules. Raises ``ValueError`` naming what does not fit, ``state`` unchanged."""
    saved = _mapping(saved, "the K-FAC state", {*SHAPING, "steps", "averages", "cached"})
    ours = {"refresh": state.refresh, "decay": state.decay, "bias": opts.kfac_bias}
    for key, kind in SHAPING.items():
        value = saved[key]
        if isinstance(value, bool) or not isinstance(value, kind) or value != ours[key]:
            raise ValueError(
                f"the K-FAC state was saved with kfac_{key}={value!r}, this preconditioner "
                f"has kfac_{key}={ours[key]!r}: build it with the options of the saved run"
            )
    steps = saved["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"the K-FAC state's 'steps' must be a count (int >= 0), got {steps!r}")
    entries = _mapping(saved["cached"], "the K-FAC state's 'cached'")
    params = dict(network.named_parameters())
    devices = {p.device.type for p in params.values()}
    with full_precision(devices):  # as every step factorises
        read = {name: _read(name, entry, network, opts) for name, entry in entries.items()}
        # those of one order together, as a refresh of all does
        deferred = damped_modules([(r.parts, r.gamma, r.inputs) for r in read.values()], opts)
        cached = {
            name: _factorised(name, r, blocks, opts)
            for (name, r), blocks in zip(read.items(), deferred, strict=True)
        }
    owners = _average_owners(cached.values())
    given = _renamed(_mapping(saved["averages"], "the K-FAC state's 'averages'"), params)
    # (a step may cache no module: one whose Gamma is zero, before a zero head, is not
    # cached; but with a decay it averages every module it solved)
    if steps > 0 and state.decay > 0 and not given:
        raise ValueError(
            f"the K-FAC state counts {steps} steps but holds no running average: every step "
            "with kfac_decay > 0 averages the modules it solved, so the state is incomplete"
        )
    missing = sorted(set(owners) - set(given)) if state.decay > 0 else []
    if missing:
        raise ValueError(
            f"the K-FAC state lacks the running averages {missing} of modules it caches: "
            "the state is incomplete (a step with kfac_decay > 0 averages every module)"
        )
    first = next(iter(params.values()))
    averages = {}
    for key, value in given.items():
        what = f"running average {key!r}"
        if key not in owners:  # a module the last step did not see: kept, as a step keeps it
            averages[key] = _matrix(value, what, first.device)
            orders = _average_orders(network, key, opts, f"the K-FAC state's {what}")
            _check_order(Factor(matrix=averages[key], what=what), orders, what, "the K-FAC state")
            continue
        factor, where = owners[key]
        averages[key] = _matrix(value, what, factor.data.device, factor.data.dtype)
        _check_order(Factor(matrix=averages[key], what=what), {factor.n}, what, where)
    # (a swap after the load, for a module of other shapes whose factor keeps its order,
    # starts afresh as it does without a checkpoint)
    shapes = {
        key: module_shapes(_module(network, key.rpartition(":")[0], "the K-FAC state"))
        for key in averages
    }
    state.restore(steps, averages, cached, shapes)


def _average_orders(network: nn.Module, key, opts: Options, where: str) -> set[int]:
    """The orders the running average ``key`` (``module:Gamma`` or ``module:A``) of a
    module not cached may have: its module must be the model's (found by a hunt: averages
    of modules the model lacks, or of another order, were loaded). An input factor has a
    column of ones more where the bias joins the weight, whether or not it was trainable."""
    name, _, factor = key.rpartition(":") if isinstance(key, str) else ("", "", "")
    if factor not in ("Gamma", "A"):
        raise ValueError(f"{where}: its key is not module:Gamma or module:A")
    module = _module(network, name, where)
    if factor == "Gamma":
        return {module.weight.shape[0]}
    fan_in = math.prod(module.weight.shape[1:])
    joins = opts.kfac_bias == "joint" and getattr(module, "bias", None) is not None
    return {fan_in, fan_in + 1} if joins else {fan_in}


def _average_owners(cached) -> dict[str, tuple[Factor, str]]:
    """The running averages' keys (``module:Gamma``, ``module:A``) of the cached modules,
    with the factor each must match in order, dtype and device."""
    owners = {}
    for c in cached:
        where = f"the K-FAC state of {named_module(c.block.name)}"
        owners[average_key(c.block.name, "Gamma")] = (c.blocks[0].gamma, where)
        owners.update(
            {average_key(c.block.name, "A"): (b.A, where) for b in c.blocks if b.A is not None}
        )
    return owners


def _renamed(given: dict, params: dict) -> dict:
    """``given`` averages with the input factor of a weight apart from its bias under its
    module's key, where a state saved before this version keyed it by the weight's name
    (``params``: the model's parameters by name; cached modules or not)."""
    renamed = {}
    for key, value in given.items():
        weight = key.removesuffix(":A")
        module = weight.removesuffix("weight").removesuffix(".")
        new = average_key(module, "A")
        if key != weight + ":A" or weight == module or weight not in params or new in given:
            renamed[key] = value
        else:
            renamed[new] = value
    return renamed


@dataclass(frozen=True)
class _Read:
    """A cached module's entry, checked against the model: its block, parts and factors."""

    block: Block
    parts: list
    gamma: Factor
    inputs: dict[str, Factor]
    kernel: str
    rows: int
    data_dtype: torch.dtype | None


def _read(name, entry, network: nn.Module, opts: Options) -> _Read:
    """The cached module ``name``: its block from the model and its saved factors."""
    where = f"the K-FAC state of {named_module(name)}"
    keys = {"param_names", "rows", "gamma", "A"}
    # (saved by later versions)
    entry = _mapping(entry, where, keys, optional={"data_dtype", "kernel"})
    module = _module(network, name, where)
    own = {
        local: f"{name}.{local}" if name else local
        for local in ("weight", "bias")
        if isinstance(getattr(module, local, None), nn.Parameter)
    }
    names = entry["param_names"]
    if not isinstance(names, list | tuple) or list(names) not in _orders(list(own.values())):
        raise ValueError(
            f"{where}: its 'param_names' {names!r} are not the weight and bias of the "
            f"model's {named_module(name)} ({list(own.values())}): the state was saved for another "
            "model"
        )
    names = list(names)
    rows = entry["rows"]
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"{where}: 'rows' must be a positive count, got {rows!r}")
    params = dict(network.named_parameters())  # a tied parameter under its first name
    tied = [n for n in names if n not in params]
    hint = _compiled_hint(network, name) if tied else ""
    if hint:  # (not a tie: the names of the wrapper)
        raise ValueError(
            f"{where}: the model has no parameters {tied}: the state was saved for another "
            f"model{hint}"
        )
    if tied:
        raise ValueError(
            f"{where}: the model's {tied} are tied to another module's parameter, which "
            "K-FAC refuses (a shared parameter has no Kronecker form): the state was saved "
            "for another model"
        )
    # with its module, as a step caches it (found by a hunt: without, the first step after
    # loading read it as no longer factorisable and refactorised, a sampled run's probes
    # drawn one step early)
    block = Block(name, module, names, [params[n] for n in names], inputs=(), output=None)
    with_weight, with_bias = own.get("weight") in names, own.get("bias") in names
    parts = block_parts(block, with_weight, with_bias, opts.kfac_bias)
    device = block.params[0].device
    gamma_what, input_what = factor_names(name)
    # in the dtype saved: a model moved to another since factorises its next batch again
    gamma = _factor(entry["gamma"], gamma_what, device, where)
    _check_order(gamma, {module.weight.shape[0]}, gamma_what, where)
    inputs = {}
    if with_weight:
        if entry["A"] is None:
            raise ValueError(f"{where}: 'A' is missing; its weight needs an input factor")
        A = _factor(entry["A"], input_what, device, where)
        if A.data.dtype != gamma.data.dtype:
            raise ValueError(
                f"{where}: its factors differ in dtype ({gamma.data.dtype}, {A.data.dtype}): "
                "the file is corrupted"
            )
        order = math.prod(module.weight.shape[1:]) + (opts.kfac_bias == "joint" and with_bias)
        _check_order(A, {order}, input_what, where)
        inputs = {p.name: A for p in parts if not p.bias_only}
    kernel = STRUCTURED[type(module)].__name__
    if entry.get("kernel", kernel) != kernel:  # (found by a hunt: factor orders can agree)
        raise ValueError(
            f"{where}: saved for a module of kernel {entry['kernel']!r}, the model's is a "
            f"{type(module).__name__} ({kernel}): the state was saved for another model"
        )
    data_dtype = _data_dtype(entry.get("data_dtype"), where)
    return _Read(block, parts, gamma, inputs, kernel, rows, data_dtype)


def _factorised(name, read: _Read, blocks: list[DampedBlock], opts: Options) -> Cached:
    """The cached module ``name`` with its blocks factorised again from its saved factors:
    ``blocks`` (deferred, :func:`damped_modules`), or checked where they failed."""
    parts, gamma, inputs = read.parts, read.gamma, read.inputs
    try:
        failed = [b.failed for b in blocks if b.failed is not None]
        if failed and bool(torch.stack(failed).any()):  # the step took the checked path too
            blocks = damped_blocks(parts, gamma, inputs, opts, checked=True)
    except SolveError as err:
        where = f"the K-FAC state of {named_module(name)}"
        raise ValueError(f"{where}: its saved factors cannot be factorised ({err})") from err
    return Cached(read.block, read.kernel, read.rows, blocks, read.data_dtype)


#: the dtypes factor rows are pulled back in: the parameters', or half under autocast
DATA_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _data_dtype(saved, where: str) -> torch.dtype | None:
    """The dtype a cached module's rows were pulled back in, as saved (``None``: not saved,
    by an older version; its steps are then checked at the parameters' accuracy)."""
    if saved is None:
        return None
    if saved not in DATA_DTYPES:
        raise ValueError(
            f"{where}: 'data_dtype' is {saved!r}, not one of {sorted(DATA_DTYPES)}: the file "
            "is corrupted"
        )
    return DATA_DTYPES[saved]


def _module(network: nn.Module, name, where: str) -> nn.Module:
    """The model's module ``name``, one that K-FAC factorises."""
    try:
        module = network.get_submodule(name) if isinstance(name, str) else None
    except AttributeError:
        module = None
    if isinstance(module, LazyModuleMixin) and _factorised_class(module.cls_to_become):
        # (found by a hunt: a LazyLinear shaped by model.load_state_dict, as a resumed run
        # loads it, stays a LazyLinear until its first call, and was refused as "saved for
        # another model")
        raise ValueError(
            f"{where}: the model's module {name!r} ({type(module).__name__}) is a lazy module "
            f"not called yet, which becomes a {module.cls_to_become.__name__} at its first "
            "call: run the model once, model(x), before loading the state"
        )
    if module is None or not _factorised_class(type(module)):
        missing = f"has no module {name!r}" if name else "itself is no module"
        raise ValueError(
            f"{where}: the model {missing} that K-FAC factorises (Linear, Conv2d): the state "
            f"was saved for another model{_compiled_hint(network, name)}"
        )
    return module


def _factorised_class(cls) -> bool:
    """Whether K-FAC factorises modules of class ``cls`` (a structured kernel with
    Kronecker factors)."""
    kernel = STRUCTURED.get(cls)
    return kernel is not None and issubclass(kernel, PatchHandler)


def _compiled_hint(network: nn.Module, name: str) -> str:
    """Where one side is a torch.compile wrapper (names under ``_orig_mod.``) and the
    other not: that, and the fix (found by a hunt: called a tie, or another model)."""
    names = [n for n, _ in network.named_modules()]
    if "_orig_mod" not in str(name) and not any(n.startswith("_orig_mod") for n in names):
        return ""
    return (
        " (or for it as torch.compile wraps it, its modules under '_orig_mod.', where this "
        "preconditioner holds the original, or the other way round: build both on the "
        "compiled model or both on the original)"
    )


def _orders(names: list[str]) -> list[list[str]]:
    """The trainable parameter lists a module with ``names`` (weight, bias) can have."""
    return [names, *([n] for n in names)] if len(names) > 1 else [names]


def _factor(entry, what: str, device, where: str) -> Factor:
    entry = _mapping(entry, f"{where}: the {what}")
    if set(entry) == {"rows"}:
        return Factor(rows=_tensor(entry["rows"], what, device), what=what)
    if set(entry) == {"matrix"}:
        return Factor(matrix=_matrix(entry["matrix"], what, device), what=what)
    raise ValueError(f"{where}: the {what} must hold 'rows' or 'matrix', got {sorted(entry)}")


def _check_order(factor: Factor, orders: set[int], what: str, where: str) -> None:
    if factor.n not in orders:
        raise ValueError(
            f"{where}: the {what} is of order {factor.n}, its parameters need {sorted(orders)}: "
            "the state was saved for another model"
        )


def _matrix(value, what: str, device, dtype=None) -> Tensor:
    """A square :func:`_tensor` that may be a Gram matrix: a non-negative diagonal,
    symmetric and ``|F_ij| <= sqrt(F_ii F_jj)`` (its 2 x 2 principal minors non-negative;
    O(n^2), where a full test of definiteness would cost a factorisation), each up to a
    rounding of ``sqrt(eps)`` relative to the largest entry. A corrupted or hand-edited
    factor breaks one of them, where the eigendecomposition would read one triangle and
    clamp negative eigenvalues to zero, silently another metric."""
    tensor = _tensor(value, what, device, dtype)
    if tensor.shape[0] != tensor.shape[1] or bool((tensor.diagonal() < 0).any()):
        raise ValueError(
            f"the K-FAC state's {what} must be a square matrix with a non-negative diagonal "
            f"(a sum of outer products), got shape {tuple(tensor.shape)}: the file is corrupted"
        )
    slack = torch.finfo(tensor.dtype).eps ** 0.5 * tensor.abs().max()
    diagonal = tensor.diagonal()
    bound = (diagonal[:, None] * diagonal[None, :]).sqrt() + slack
    if bool(((tensor - tensor.mT).abs() > slack).any()) or bool((tensor.abs() > bound).any()):
        raise ValueError(
            f"the K-FAC state's {what} is not a Gram matrix (a sum of outer products): it is "
            "not symmetric, or an entry exceeds sqrt(F_ii F_jj): the file is corrupted"
        )
    return tensor


def _tensor(value, what: str, device, dtype=None) -> Tensor:
    """A dense, finite, floating 2-D tensor with rows, on ``device``, of ``dtype``."""
    if (
        not isinstance(value, Tensor)
        or value.layout != torch.strided
        or value.is_meta  # (found by review: .item() on it raised a RuntimeError)
        or value.dim() != 2
        or value.shape[0] == 0
        or value.dtype not in (torch.float32, torch.float64)
    ):
        # (found by a hunt: half-precision factors, which no run saves, reached LAPACK)
        raise ValueError(
            f"the K-FAC state's {what} must be a dense 2-D float32 or float64 tensor with "
            f"rows, got {describe(value)}: the file is corrupted"
        )
    if dtype is not None and value.dtype != dtype:
        raise ValueError(
            f"the K-FAC state's {what} is {value.dtype}, and its factor {dtype}: the file is "
            "corrupted"
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"the K-FAC state's {what} contains NaN or inf: the file is corrupted")
    return value.to(device)


def describe(value) -> str:
    """What a malformed entry of a saved state is, for an error message."""
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, Tensor):
        return f"a {value.layout} {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _mapping(
    value, what: str, keys: set[str] | None = None, optional: set[str] = frozenset()
) -> Mapping:
    """``value``, a mapping with text keys: every one of ``keys`` and nothing else but
    ``optional`` ones (``keys`` ``None``: any)."""
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{what} must be a mapping (from state_dict()), got {type(value).__name__}"
        )
    if not all(isinstance(k, str) for k in value):  # (found by review: an AttributeError)
        raise ValueError(f"{what} must have text keys (from state_dict()): the file is corrupted")
    if keys is not None and not keys <= set(value) <= keys | optional:
        missing, extra = sorted(keys - set(value)), sorted(map(str, set(value) - keys - optional))
        raise ValueError(
            f"{what} does not have the keys of a saved state: missing {missing}, unknown {extra}"
        )
    return value
