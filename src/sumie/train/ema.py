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
        self._params: tuple[int, list, list] | None = None
        self._has_buffers = any(True for _ in self.shadow.buffers())

    def _parameters(self, model: nn.Module) -> tuple[list, list]:
        # module traversal costs more than the averaging for small nets: list the parameters once per
        # model (moving a module keeps its Parameter objects; buffers are replaced, so they are not kept)
        if self._params is None or self._params[0] != id(model):
            self._params = (id(model), list(self.shadow.parameters()), list(model.parameters()))
        return self._params[1], self._params[2]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        shadow, params = self._parameters(model)
        if all(s.dtype == p.dtype and s.device == p.device for s, p in zip(shadow, params)):
            torch._foreach_lerp_(shadow, params, 1 - d)  # one fused pass over all parameters
        else:
            for s, p in zip(shadow, params):
                s.lerp_(p.to(s.dtype), 1 - d)
        if self._has_buffers:
            for s, b in zip(self.shadow.buffers(), model.buffers()):
                s.copy_(b)
