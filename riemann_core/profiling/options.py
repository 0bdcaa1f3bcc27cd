"""argparse types and checks shared by the subcommands' options."""

from __future__ import annotations

import argparse


def ints(text: str) -> tuple[int, ...]:
    """``"1,2,3"`` -> ``(1, 2, 3)``."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err


def floats(text: str) -> tuple[float, ...]:
    """``"0.1,1e-2"`` -> ``(0.1, 0.01)``."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def names(text: str) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def check_choices(what: str, chosen: tuple[str, ...], known: tuple[str, ...]) -> None:
    """``ValueError`` naming the unknown ``what``\\ s and the choices, or for an empty choice."""
    unknown = [c for c in chosen if c not in known]
    if unknown or not chosen:
        raise ValueError(
            f"unknown {what}(s) {unknown or list(chosen)}; choose from {', '.join(known)}"
        )
