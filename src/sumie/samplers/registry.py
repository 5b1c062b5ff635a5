"""The one declaration of every sampler: name, function, aliases, cost and whether it draws noise.

Each sampler is declared once (as ComfyUI's ``KSAMPLER_NAMES`` + ``ksampler()`` and A1111's
``samplers_k_diffusion`` do); the name lists, the A1111 and diffusers alias tables, the set of
stochastic samplers, the CLI help and :func:`nfe_for_steps` are all read off :data:`REGISTRY`.

A diffusers alias carries the options that make sumie's sampler compute what that scheduler
computes with its own defaults (``UniPCMultistepScheduler`` is UniPC-bh2 of order 2, not 3).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from .basic import (restart_plan, sample_ddim, sample_ddpm, sample_dpm_2, sample_dpm_2_ancestral, sample_euler,
                    sample_euler_ancestral, sample_heun, sample_lcm, sample_restart)
from .dpm import (sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2m_sde_heun, sample_dpmpp_2s_ancestral,
                  sample_dpmpp_3m, sample_dpmpp_3m_sde, sample_dpmpp_sde)
from .multistep import sample_deis, sample_ipndm, sample_lms, sample_plms, sample_unipc, sample_unipc_bh2


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler. ``calls_per_step``: denoiser calls of a step (two-stage samplers make one on
    the final step to sigma = 0, which is an Euler step); ``first_step_extra``: calls the first
    step makes on top (PLMS's pseudo improved-Euler start); ``diffusers``: scheduler class ->
    sampler options that reproduce that scheduler's defaults."""

    name: str
    fn: Callable
    calls_per_step: int = 1
    stochastic: bool = False
    a1111: tuple[str, ...] = ()
    diffusers: dict[str, dict] = field(default_factory=dict)
    first_step_extra: int = 0

    @property
    def options(self) -> tuple[str, ...]:
        """Extra keyword arguments the sampler accepts (eta, order, variant, ...), off its signature."""
        common = {"denoiser", "x", "sigmas", "cond", "callback", "generator"}
        return tuple(p for p in inspect.signature(self.fn).parameters if p not in common)

    def nfe(self, steps: int, sigmas: torch.Tensor | None = None) -> int:
        """Denoiser calls of ``steps`` steps (restart: over ``sigmas``, by default Karras sigmas of
        Stable Diffusion's range, since where it restarts depends on the noise levels)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if self.name == "restart":
            if sigmas is None:
                from ..diffusion.schedules import karras_sigmas
                sigmas = karras_sigmas(steps, 0.0292, 14.6146)
            steps = len(restart_plan(sigmas))
        if self.calls_per_step == 2:
            return 2 * steps - 1
        return steps + (self.first_step_extra if steps > 1 else 0)


REGISTRY: tuple[SamplerSpec, ...] = (
    SamplerSpec("euler", sample_euler, a1111=("euler",),
                diffusers={"EulerDiscreteScheduler": {}}),
    SamplerSpec("euler_ancestral", sample_euler_ancestral, stochastic=True, a1111=("euler a",),
                diffusers={"EulerAncestralDiscreteScheduler": {}}),
    SamplerSpec("heun", sample_heun, 2, a1111=("heun",), diffusers={"HeunDiscreteScheduler": {}}),
    SamplerSpec("dpm_2", sample_dpm_2, 2, a1111=("dpm2",), diffusers={"KDPM2DiscreteScheduler": {}}),
    SamplerSpec("dpm_2_ancestral", sample_dpm_2_ancestral, 2, stochastic=True, a1111=("dpm2 a",),
                diffusers={"KDPM2AncestralDiscreteScheduler": {}}),
    SamplerSpec("lms", sample_lms, a1111=("lms",), diffusers={"LMSDiscreteScheduler": {}}),
    SamplerSpec("ddim", sample_ddim, a1111=("ddim",), diffusers={"DDIMScheduler": {}}),
    SamplerSpec("ddpm", sample_ddpm, stochastic=True, a1111=("ddpm",), diffusers={"DDPMScheduler": {}}),
    SamplerSpec("plms", sample_plms, first_step_extra=1, a1111=("plms",), diffusers={"PNDMScheduler": {}}),
    SamplerSpec("ipndm", sample_ipndm, a1111=("ipndm",), diffusers={"IPNDMScheduler": {}}),
    SamplerSpec("deis", sample_deis, a1111=("deis",), diffusers={"DEISMultistepScheduler": {"order": 2}}),
    SamplerSpec("dpmpp_2s_ancestral", sample_dpmpp_2s_ancestral, 2, stochastic=True, a1111=("dpm++ 2s a",)),
    SamplerSpec("dpmpp_sde", sample_dpmpp_sde, 2, stochastic=True, a1111=("dpm++ sde",),
                diffusers={"DPMSolverSDEScheduler": {}}),
    SamplerSpec("dpmpp_2m", sample_dpmpp_2m, a1111=("dpm++ 2m",), diffusers={"DPMSolverMultistepScheduler": {}}),
    SamplerSpec("dpmpp_2m_sde", sample_dpmpp_2m_sde, stochastic=True, a1111=("dpm++ 2m sde",)),
    SamplerSpec("dpmpp_2m_sde_heun", sample_dpmpp_2m_sde_heun, stochastic=True, a1111=("dpm++ 2m sde heun",)),
    SamplerSpec("dpmpp_3m", sample_dpmpp_3m, a1111=("dpm++ 3m",)),
    SamplerSpec("dpmpp_3m_sde", sample_dpmpp_3m_sde, stochastic=True, a1111=("dpm++ 3m sde",)),
    SamplerSpec("uni_pc", sample_unipc, a1111=("unipc",)),
    SamplerSpec("uni_pc_bh2", sample_unipc_bh2, diffusers={"UniPCMultistepScheduler": {"order": 2}}),
    SamplerSpec("restart", sample_restart, 2, stochastic=True, a1111=("restart",)),
    SamplerSpec("lcm", sample_lcm, stochastic=True, a1111=("lcm",), diffusers={"LCMScheduler": {}}),
)

BY_NAME: dict[str, SamplerSpec] = {s.name: s for s in REGISTRY}
SAMPLER_NAMES: tuple[str, ...] = tuple(BY_NAME)
SAMPLERS: dict[str, Callable] = {s.name: s.fn for s in REGISTRY}
STOCHASTIC: frozenset[str] = frozenset(s.name for s in REGISTRY if s.stochastic)
SAMPLER_OPTIONS: dict[str, tuple[str, ...]] = {s.name: s.options for s in REGISTRY}
# A1111 sampler names (lower case) -> sumie sampler
A1111_SAMPLERS: dict[str, str] = {a: s.name for s in REGISTRY for a in s.a1111}
# diffusers scheduler class -> (sumie sampler, options reproducing the scheduler's defaults)
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict]] = {c: (s.name, dict(o)) for s in REGISTRY
                                                      for c, o in s.diffusers.items()}


def sampler_help() -> str:
    """The sampler list for ``--help``, read off the registry."""
    return (", ".join(SAMPLER_NAMES) + "; or an A1111 name such as 'DPM++ 2M Karras', or a diffusers scheduler "
            "class such as UniPCMultistepScheduler (with that scheduler's defaults)")
