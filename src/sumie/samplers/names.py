"""Sampler names from other tools, and what a number of steps costs in denoiser calls.

A1111 names a (sampler, schedule) pair in one string, "DPM++ 2M Karras"; ComfyUI names
them apart ("dpmpp_2m" + "karras"), which is sumie's convention; diffusers names a
scheduler class. :func:`resolve_sampler_name` maps all three onto sumie's pair; the names
themselves are declared once, in :mod:`sumie.samplers.registry`.
"""

from __future__ import annotations

import torch

from .registry import A1111_SAMPLERS, BY_NAME, DIFFUSERS_SCHEDULERS, SAMPLER_NAMES

# A1111 schedule suffixes (lower case) -> sumie schedule
A1111_SCHEDULES = {"karras": "karras", "exponential": "exponential", "polyexponential": "polyexponential",
                   "sgm uniform": "sgm_uniform", "simple": "simple", "beta": "beta", "uniform": "linspace",
                   "normal": "linspace"}


def resolve_sampler_name(name: str) -> tuple[str, str | None]:
    """Map a sumie/ComfyUI, A1111 or diffusers sampler name onto ``(sampler, schedule)``.

    ``schedule`` is None unless the name carries one ("DPM++ 2M Karras" -> ("dpmpp_2m", "karras")).
    A diffusers class name also implies sampler options: see :func:`sampler_defaults`.
    """
    if name in SAMPLER_NAMES:
        return name, None
    if name in DIFFUSERS_SCHEDULERS:
        return DIFFUSERS_SCHEDULERS[name][0], None
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
                     f"{', '.join(sorted(A1111_SCHEDULES))}, or diffusers scheduler classes such as "
                     f"'UniPCMultistepScheduler')")


def sampler_defaults(name: str) -> dict:
    """Options a sampler name implies: a diffusers scheduler class brings its own defaults
    (``UniPCMultistepScheduler`` -> ``{"order": 2}``); other names bring none."""
    return dict(DIFFUSERS_SCHEDULERS[name][1]) if name in DIFFUSERS_SCHEDULERS else {}


def nfe_for_steps(sampler: str, steps: int, sigmas: torch.Tensor | None = None) -> int:
    """Denoiser calls (NFE) that ``steps`` steps of ``sampler`` make (restart: over ``sigmas``,
    default Karras sigmas of Stable Diffusion's range, restarts included)."""
    return BY_NAME[resolve_sampler_name(sampler)[0]].nfe(steps, sigmas)


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """The most steps of ``sampler`` that make at most ``nfe`` denoiser calls (at least 1)."""
    steps = 1
    while nfe_for_steps(sampler, steps + 1) <= nfe:
        steps += 1
    return steps
