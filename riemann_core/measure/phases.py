"""The phases of data-parallel steps as one rank sees them: seconds, counted FLOPs, bytes.

:class:`PhaseRecorder` is a :class:`riemann_core.distributed.Observer`: inside
``distributed.observing(recorder)`` every step records, per phase (``local``, ``agree``,
``exchange``, ``solve``, ``broadcast``), its wall-clock seconds (the device synchronised
at both ends, so on CUDA the time of the work, not of its launch) and, with
``count_flops``, its FLOPs (:func:`riemann_core.measure.flops.flop_counter`), and the
step's :class:`~riemann_core.distributed.Traffic`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from ..distributed import PHASES, Observer, Traffic
from .flops import flop_counter
from .timing import synchronize


@dataclass
class StepRecord:
    """One step on one rank."""

    seconds: dict[str, float] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    traffic: Traffic | None = None


class PhaseRecorder(Observer):
    """Records every observed step in :attr:`steps` (see the module docstring)."""

    def __init__(self, device: torch.device | str | None = None, count_flops: bool = False):
        self.device = device
        self.count_flops = count_flops
        self.steps: list[StepRecord] = []
        self._current = StepRecord()

    @contextlib.contextmanager
    def phase(self, name: str):
        if name == PHASES[0]:  # a new step (what a failed one left is dropped)
            self._current = StepRecord()
        synchronize(self.device)
        start = time.perf_counter()
        with flop_counter() if self.count_flops else contextlib.nullcontext() as counter:
            yield
            synchronize(self.device)
        self._current.seconds[name] = time.perf_counter() - start
        if counter is not None:
            self._current.flops[name] = counter.get_total_flops()

    def traffic(self, traffic: Traffic) -> None:
        self._current.traffic = traffic
        self.steps.append(self._current)
        self._current = StepRecord()
