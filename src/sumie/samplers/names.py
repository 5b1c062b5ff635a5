"""Sampler names from other tools, and what a number of steps costs in denoiser calls.

A1111 names a (sampler, schedule) pair in one string, "DPM++ 2M Karras"; ComfyUI names
them apart ("dpmpp_2m" + "karras"), which is sumie's convention; diffusers names a
scheduler class. :func:`resolve_sampler_name` maps all three onto sumie's pair.
"""

from __future__ import annotations

SAMPLER_NAMES = ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "ddim", "ddpm", "plms",
                 "ipndm", "deis", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde",
                 "dpmpp_2m_sde_heun", "dpmpp_3m", "dpmpp_3m_sde", "uni_pc", "uni_pc_bh2", "restart", "lcm")

# A1111 sampler names (lower case) -> sumie sampler
A1111_SAMPLERS = {
    "euler": "euler", "euler a": "euler_ancestral", "heun": "heun", "dpm2": "dpm_2", "dpm2 a": "dpm_2_ancestral",
    "lms": "lms", "ddim": "ddim", "ddpm": "ddpm", "plms": "plms", "ipndm": "ipndm", "deis": "deis",
    "dpm++ 2s a": "dpmpp_2s_ancestral", "dpm++ sde": "dpmpp_sde", "dpm++ 2m": "dpmpp_2m",
    "dpm++ 2m sde": "dpmpp_2m_sde", "dpm++ 2m sde heun": "dpmpp_2m_sde_heun", "dpm++ 3m": "dpmpp_3m",
    "dpm++ 3m sde": "dpmpp_3m_sde", "unipc": "uni_pc", "restart": "restart", "lcm": "lcm",
}

# A1111 schedule suffixes (lower case) -> sumie schedule
A1111_SCHEDULES = {"karras": "karras", "exponential": "exponential", "polyexponential": "polyexponential",
                   "sgm uniform": "sgm_uniform", "simple": "simple", "beta": "beta", "uniform": "linspace",
                   "normal": "linspace"}

# diffusers scheduler classes -> sumie sampler (with the scheduler's default configuration)
DIFFUSERS_SCHEDULERS = {
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun", "KDPM2DiscreteScheduler": "dpm_2",
    "KDPM2AncestralDiscreteScheduler": "dpm_2_ancestral", "LMSDiscreteScheduler": "lms", "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm", "PNDMScheduler": "plms", "IPNDMScheduler": "ipndm", "DEISMultistepScheduler": "deis",
    "DPMSolverMultistepScheduler": "dpmpp_2m", "DPMSolverSDEScheduler": "dpmpp_sde",
    "UniPCMultistepScheduler": "uni_pc_bh2", "LCMScheduler": "lcm",
}


def resolve_sampler_name(name: str) -> tuple[str, str | None]:
    """Map a sumie/ComfyUI, A1111 or diffusers sampler name onto ``(sampler, schedule)``.

    ``schedule`` is None unless the name carries one ("DPM++ 2M Karras" -> ("dpmpp_2m", "karras")).
    """
    if name in SAMPLER_NAMES:
        return name, None
    if name in DIFFUSERS_SCHEDULERS:
        return DIFFUSERS_SCHEDULERS[name], None
    key = " ".join(name.strip().lower().split())
    if key in SAMPLER_NAMES:
        return key, None
    if key in A1111_SAMPLERS:
        return A1111_SAMPLERS[key], None
    for suffix, schedule in sorted(A1111_SCHEDULES.items(), key=lambda kv: -len(kv[0])):
        if key.endswith(" " + suffix) and key[: -len(suffix) - 1] in A1111_SAMPLERS:
            return A1111_SAMPLERS[key[: -len(suffix) - 1]], schedule
    raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLER_NAMES))} (or A1111 names such as "
                     f"'DPM++ 2M Karras', 'Euler a', with schedule suffixes "
                     f"{', '.join(sorted(A1111_SCHEDULES))})")


# denoiser calls per step beyond the first: two-stage samplers make a second call on every
# step except the last (the last step to sigma = 0 is an Euler step); PLMS makes one extra
_TWO_STAGE = {"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"}


def nfe_for_steps(sampler: str, steps: int) -> int:
    """Denoiser calls (NFE) that ``steps`` steps of ``sampler`` make (restart: without restarts)."""
    if sampler in _TWO_STAGE:
        return 2 * steps - 1
    if sampler == "plms":
        return steps + 1 if steps > 1 else 1
    return steps


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """The most steps of ``sampler`` that make at most ``nfe`` denoiser calls (at least 1)."""
    steps = 1
    while nfe_for_steps(sampler, steps + 1) <= nfe:
        steps += 1
    return steps
