"""An exponential moving average (EMA) of a model's weights, updated on the device without a host sync.

``torch.optim.swa_utils.AveragedModel`` would do this, but its ``update_parameters`` reads its step counter (a device
tensor) on the host at every call: a sync per batch on CUDA. Here the step count lives on the host, and one fused
``torch._foreach_lerp_`` per update moves every floating-point parameter and buffer (BatchNorm's running statistics
included) towards the trained model's; integer buffers (BatchNorm's batch counter) are copied.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def lerp_all(averages: list[torch.Tensor], targets: list[torch.Tensor], weight: float) -> None:
    """``a += weight * (t - a)`` for every pair: one fused kernel per device and dtype (the optimisers' own
    ``_foreach`` ops; ``torch`` has no public multi-tensor lerp)."""
    if averages:
        torch._foreach_lerp_(averages, targets, weight)


class WeightAverage:
    """A frozen copy of ``model`` whose weights follow the trained ones: after step t, each moves towards the model's
    by ``max(1 - decay, 1 / t)``. The first steps are thus averaged evenly (no bias towards the initial weights), and
    later ones with a window of about ``1 / (1 - decay)`` steps."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.steps = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # The average's own tensors, listed once (loading weights copies into them in place).
        self._floats, self._ints = self._split(self.model)

    @staticmethod
    def _split(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tensors = [t.detach() for t in (*model.parameters(), *model.buffers())]
        return [t for t in tensors if t.is_floating_point()], [t for t in tensors if not t.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step: move the average towards ``model`` (same architecture, same device)."""
        self.steps += 1
        now_floats, now_ints = self._split(model)
        lerp_all(self._floats, now_floats, max(1.0 - self.decay, 1.0 / self.steps))
        for a, b in zip(self._ints, now_ints, strict=True):
            a.copy_(b)

    def load(self, weights: dict[str, Any], steps: int) -> None:
        self.model.load_state_dict(weights)
        self.steps = int(steps)
