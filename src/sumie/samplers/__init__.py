"""Samplers as pure functions and the registry that names them."""

from __future__ import annotations

from .base import SamplingCancelled, StepInfo, check_sigmas
from .basic import sample_ddim, sample_ddpm, sample_euler, sample_euler_ancestral, sample_heun
from .noise import generators_for, randn, randn_like

SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
}

# samplers whose extra keyword arguments are accepted by name
SAMPLER_OPTIONS = {"euler_ancestral": ("eta",), "ddim": ("eta",)}


def get_sampler(name: str):
    """Look a sampler up by name; the error lists the valid names."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}") from None


__all__ = ["SAMPLERS", "SAMPLER_OPTIONS", "SamplingCancelled", "StepInfo", "check_sigmas", "get_sampler",
           "generators_for", "randn", "randn_like", "sample_ddim", "sample_ddpm", "sample_euler",
           "sample_euler_ancestral", "sample_heun"]
