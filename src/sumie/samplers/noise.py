"""Seeded noise with per-sample reproducibility.

Image i of a batch seeded with ``seed`` is the image generated alone with ``seed + i``:
every sample draws its initial and per-step noise from its own ``torch.Generator``.
"""

from __future__ import annotations

from typing import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def generators_for(seed: int, n: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded ``seed, seed+1, ..., seed+n-1``."""
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]


def randn(shape: Sequence[int], generator: Generators = None, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...), drawn per sample when given a list of generators."""
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype)
                        for g in generator]).to(device)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)
