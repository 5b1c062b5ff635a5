"""Samplers as pure functions and the registry that names them.

Every sampler is ``sample_x(denoiser, x, sigmas, *, cond=None, callback=None, generator=None, **options)``;
the names follow ComfyUI/k-diffusion, and :func:`resolve_sampler_name` also accepts the
A1111 names ("DPM++ 2M Karras", "Euler a", ...) and diffusers scheduler class names.
"""

from __future__ import annotations

from .base import SamplingCancelled, StepInfo, check_sigmas
from .basic import (sample_ddim, sample_ddpm, sample_dpm_2, sample_dpm_2_ancestral, sample_euler,
                    sample_euler_ancestral, sample_heun, sample_lcm, sample_restart)
from .dpm import (sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2m_sde_heun, sample_dpmpp_2s_ancestral,
                  sample_dpmpp_3m, sample_dpmpp_3m_sde, sample_dpmpp_sde)
from .multistep import sample_deis, sample_ipndm, sample_lms, sample_plms, sample_unipc, sample_unipc_bh2
from .names import nfe_for_steps, resolve_sampler_name, sampler_defaults, steps_for_nfe
from .noise import generators_for, randn, randn_like
from .registry import REGISTRY, SAMPLER_NAMES, SAMPLER_OPTIONS, SAMPLERS, STOCHASTIC, SamplerSpec, sampler_help


def get_sampler(name: str):
    """Look a sampler up by sumie, ComfyUI, A1111 or diffusers name; the error lists the valid names."""
    if name in SAMPLERS:
        return SAMPLERS[name]
    return SAMPLERS[resolve_sampler_name(name)[0]]


__all__ = ["REGISTRY", "SAMPLERS", "SAMPLER_NAMES", "SAMPLER_OPTIONS", "STOCHASTIC", "SamplerSpec", "SamplingCancelled", "StepInfo", "check_sigmas",
           "get_sampler", "generators_for", "nfe_for_steps", "randn", "randn_like", "resolve_sampler_name",
           "sampler_defaults", "sampler_help", "steps_for_nfe"] + [f.__name__ for f in SAMPLERS.values()]
