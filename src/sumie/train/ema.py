"""Exponential moving average of weights (Polyak averaging), as used by Ho et al. 2020."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow`` = EMA of ``model``'s parameters; buffers are copied.

    The decay warms up as min(decay, (1 + n) / (10 + n)) so early averages are not
    dominated by the random initialisation (the warm-up of TensorFlow's EMA with num_updates).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0
        self._pairs: tuple[int, list, list, list, list] | None = None

    def _tensors(self, model: nn.Module) -> tuple[list, list, list, list]:
        # module traversal costs more than the averaging for small nets: list the tensors once per model
        if self._pairs is None or self._pairs[0] != id(model):
            self._pairs = (id(model), list(self.shadow.parameters()), list(model.parameters()),
                           list(self.shadow.buffers()), list(model.buffers()))
        return self._pairs[1:]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        shadow, params, shadow_buffers, buffers = self._tensors(model)
        if all(s.dtype == p.dtype and s.device == p.device for s, p in zip(shadow, params)):
            torch._foreach_lerp_(shadow, params, 1 - d)  # one fused pass over all parameters
        else:
            for s, p in zip(shadow, params):
                s.lerp_(p.to(s.dtype), 1 - d)
        for s, b in zip(shadow_buffers, buffers):
            s.copy_(b)
