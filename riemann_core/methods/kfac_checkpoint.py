"""K-FAC's state across steps as a checkpoint: :func:`state_dict` and :func:`load`.

What a run needs to resume exactly is the step count, the running averages and, per
module whose factorisation is cached, the factors it was factorised from: ``Gamma`` and
the input factor ``A`` (a module has at most one: its weight's, or weight and bias
together), thin as their rows or dense. The factorisations themselves are not saved;
:func:`load` computes them again from those factors, as the step did (deferred, and
checked only where that failed), so on the same machine a resumed run takes the same
steps, to the bit, as one never interrupted.

The checkpoint holds only tensors, strings, numbers and lists: ``torch.save`` writes it
and ``torch.load(..., weights_only=True)`` reads it. :func:`load` checks all of it
against the model before changing anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..kronecker import Factor
from ..modules import Block
from ._base import Options
from .kfac import Cached, KFACState, Part, damped_blocks, factor_names

#: The options that shape the state: loading under others is refused.
SHAPING = ("refresh", "decay", "bias")


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
        "kernel": cached.kernel,
        "rows": cached.rows,
        "param_names": list(cached.block.param_names),
        "parts": [
            {
                "name": b.part.name,
                "param_names": list(b.part.param_names),
                "bias_only": b.part.bias_only,
            }
            for b in cached.blocks
        ],
        "gamma": _factor_state(cached.blocks[0].gamma),
        "A": _factor_state(inputs[0]) if inputs else None,
    }


def _factor_state(factor: Factor) -> dict:
    return {"rows": factor.rows} if factor.thin else {"matrix": factor.matrix}


def load(state: KFACState, saved, network: nn.Module, opts: Options) -> None:
    """Restore ``state`` from ``saved`` (:func:`state_dict`'s), for ``network``'s
    parameters (found by name, on their device); refactorise the cached modules. Raises
    ``ValueError`` naming what does not fit, ``state`` unchanged."""
    saved = _mapping(saved, "the K-FAC state", set(SHAPING) | {"steps", "averages", "cached"})
    ours = {"refresh": state.refresh, "decay": state.decay, "bias": opts.kfac_bias}
    for key in SHAPING:
        if saved[key] != ours[key]:
            raise ValueError(
                f"the K-FAC state was saved with kfac_{key}={saved[key]!r}, this preconditioner "
                f"has kfac_{key}={ours[key]!r}: build it with the options of the saved run"
            )
    steps = saved["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"the K-FAC state's 'steps' must be a count (int >= 0), got {steps!r}")
    params = dict(network.named_parameters())
    device = next(iter(params.values())).device if params else torch.device("cpu")
    cached = {
        name: _cached(name, entry, params, opts)
        for name, entry in _mapping(saved["cached"], "the K-FAC state's 'cached'").items()
    }
    owners = _average_owners(cached.values())
    averages = {}
    for key, value in _mapping(saved["averages"], "the K-FAC state's 'averages'").items():
        what = f"running average {key!r}"
        if key not in owners:  # a module the last step did not see: kept, as a step keeps it
            averages[key] = _matrix(value, what, device)
            continue
        factor, where = owners[key]
        averages[key] = _matrix(value, what, factor.data.device, factor.data.dtype)
        _check_order(Factor(matrix=averages[key], what=what), {factor.n}, what, where)
    state.restore(steps, averages, cached)


def _average_owners(cached) -> dict[str, tuple[Factor, str]]:
    """The running averages' keys (``module:Gamma``, ``part:A``) of the cached modules,
    with the factor each must match in order, dtype and device."""
    owners = {}
    for c in cached:
        where = f"the K-FAC state of module {c.block.name!r}"
        owners[f"{c.block.name}:Gamma"] = (c.blocks[0].gamma, where)
        owners.update({f"{b.part.name}:A": (b.A, where) for b in c.blocks if b.A is not None})
    return owners


def _cached(name, entry, params: dict[str, nn.Parameter], opts: Options) -> Cached:
    """The cached module ``name``, its blocks factorised again from its saved factors."""
    where = f"the K-FAC state of module {name!r}"
    keys = {"kernel", "rows", "param_names", "parts", "gamma", "A"}
    entry = _mapping(entry, where, keys)
    names = _strings(entry["param_names"], f"{where}: 'param_names'")
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(
            f"{where} names parameters {missing} that this model does not have: load the "
            "state into the model it was saved with (its parameters' names as saved)"
        )
    block_params = [params[n] for n in names]
    shapes = {n: p.shape for n, p in zip(names, block_params, strict=True)}
    parts = [_part(p, shapes, where) for p in _list(entry["parts"], f"{where}: 'parts'")]
    if not parts or sorted(n for p in parts for n in p.param_names) != sorted(names):
        raise ValueError(f"{where}: its parts do not hold its parameters {names} once each")
    device, dtype = block_params[0].device, opts.solve_dtype or block_params[0].dtype
    gamma_what, input_what = factor_names(name)
    gamma = _factor(entry["gamma"], gamma_what, device, dtype, where)
    _check_order(gamma, {p.shapes[0][0] for p in parts}, gamma_what, where)
    weighted = [p for p in parts if not p.bias_only]
    inputs = {}
    if weighted:
        if entry["A"] is None:
            raise ValueError(f"{where}: 'A' is missing; its weight needs an input factor")
        A = _factor(entry["A"], input_what, device, dtype, where)
        _check_order(
            A, {sum(math.prod(s[1:]) for s in p.shapes) for p in weighted}, input_what, where
        )
        inputs = {p.name: A for p in weighted}
    for key, kind in (("kernel", str), ("rows", int)):
        if not isinstance(entry[key], kind) or isinstance(entry[key], bool):
            raise ValueError(f"{where}: {key!r} must be a {kind.__name__}, got {entry[key]!r}")
    blocks = damped_blocks(parts, gamma, inputs, opts)
    failed = [b.failed for b in blocks if b.failed is not None]
    if failed and bool(torch.stack(failed).any()):  # the step took the checked path too
        blocks = damped_blocks(parts, gamma, inputs, opts, checked=True)
    block = Block(name, None, names, block_params, inputs=(), output=None)
    return Cached(block, entry["kernel"], entry["rows"], blocks)


def _part(entry, shapes: dict[str, torch.Size], where: str) -> Part:
    entry = _mapping(entry, f"{where}: a part", {"name", "param_names", "bias_only"})
    names = _strings(entry["param_names"], f"{where}: a part's 'param_names'")
    unknown = [n for n in names if n not in shapes]
    if unknown or not isinstance(entry["name"], str) or not isinstance(entry["bias_only"], bool):
        raise ValueError(f"{where}: the part {dict(entry)!r} does not fit its parameters")
    return Part(entry["name"], tuple(names), tuple(shapes[n] for n in names), entry["bias_only"])


def _factor(entry, what: str, device, dtype, where: str) -> Factor:
    entry = _mapping(entry, f"{where}: the {what}")
    if set(entry) == {"rows"}:
        return Factor(rows=_tensor(entry["rows"], what, device, dtype), what=what)
    if set(entry) == {"matrix"}:
        return Factor(matrix=_matrix(entry["matrix"], what, device, dtype), what=what)
    raise ValueError(f"{where}: the {what} must hold 'rows' or 'matrix', got {sorted(entry)}")


def _check_order(factor: Factor, orders: set[int], what: str, where: str) -> None:
    if orders != {factor.n}:
        raise ValueError(
            f"{where}: the {what} is of order {factor.n}, its parameters need {sorted(orders)}: "
            "the state was saved for another model"
        )


def _matrix(value, what: str, device, dtype=None) -> Tensor:
    tensor = _tensor(value, what, device, dtype)
    if tensor.shape[0] != tensor.shape[1]:
        raise ValueError(f"the K-FAC state's {what} must be square, got {tuple(tensor.shape)}")
    return tensor


def _tensor(value, what: str, device, dtype=None) -> Tensor:
    """A 2-D finite floating tensor, on ``device``, of ``dtype`` (when given)."""
    if not isinstance(value, Tensor) or value.dim() != 2 or not value.is_floating_point():
        raise ValueError(f"the K-FAC state's {what} must be a 2-D floating tensor, got {value!r}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(
            f"the K-FAC state's {what} is {value.dtype}, and this preconditioner solves in "
            f"{dtype}: pass solve_dtype={value.dtype} as the saved run did"
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"the K-FAC state's {what} contains NaN or inf: the file is corrupted")
    return value.to(device)


def _mapping(value, what: str, keys: set[str] | None = None) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{what} must be a mapping (from state_dict()), got {type(value).__name__}"
        )
    if keys is not None and set(value) != keys:
        missing, extra = sorted(keys - set(value)), sorted(set(value) - keys)
        raise ValueError(
            f"{what} does not have the keys of a saved state: missing {missing}, unknown {extra}"
        )
    return value


def _list(value, what: str) -> list:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


def _strings(value, what: str) -> list[str]:
    value = _list(value, what)
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of parameter names, got {value!r}")
    return value
