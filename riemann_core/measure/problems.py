"""The networks every measurement uses: tanh MLPs given by their layer widths.

The sweeps, ``riemann-bench targets``, the demo and both benchmark suites build their
models here, so that a figure from one can be set beside a figure from another.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def widths(width: int, depth: int, out_dim: int) -> tuple[int, ...]:
    """Layer widths of the swept MLP: ``width`` inputs, ``depth`` hidden layers of
    ``width`` units, ``out_dim`` outputs (``L = depth + 1`` Linear modules)."""
    return (int(width),) * (int(depth) + 1) + (int(out_dim),)


def mlp(layer_widths: Sequence[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """Linear layers ``layer_widths[a] -> layer_widths[a + 1]`` with ``activation`` between
    them (none after the output layer)."""
    layers: list[nn.Module] = []
    for f_in, f_out in zip(layer_widths[:-1], layer_widths[1:], strict=True):
        layers += [nn.Linear(f_in, f_out), activation()]
    return nn.Sequential(*layers[:-1])
