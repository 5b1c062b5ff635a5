"""From a trained denoiser to images: choose sigmas, draw seeded noise, guide, sample.

Everything the user can vary (sampler, schedule, steps, eta, guidance scale, seed) is an
argument; the sampler itself is a pure function from :mod:`sumie.samplers`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .diffusion.editing import noise_scale, start_state
from .diffusion.guidance import CFGDenoiser
from .diffusion.precond import Denoiser, DiscreteDenoiser
from .diffusion.schedules import sampling_sigmas
from .samplers import SAMPLER_OPTIONS, SAMPLERS, generators_for, randn, resolve_sampler_name, sampler_defaults


def class_cond(labels: Sequence[int] | torch.Tensor, device=None) -> dict:
    """Condition dict for a class-conditional model; label -1 means "no class"."""
    return {"class_labels": torch.as_tensor(labels, dtype=torch.long, device=device)}


def sigmas_for(denoiser: Denoiser, schedule: str, steps: int, rho: float = 7.0) -> torch.Tensor:
    """The sampling sigmas named ``schedule`` within the denoiser's own noise range."""
    discrete = denoiser.schedule if isinstance(denoiser, DiscreteDenoiser) else None
    return sampling_sigmas(schedule, steps, sigma_min=denoiser.sigma_min, sigma_max=denoiser.sigma_max,
                           discrete=discrete, rho=rho)


def resolve_sampling(sampler: str, schedule: str | None = None, default_schedule: str = "karras") -> tuple[str, str]:
    """(sampler, schedule) from a sumie, ComfyUI, A1111 ("DPM++ 2M Karras") or diffusers sampler name
    and an optional explicit schedule; a schedule named both ways must agree."""
    name, named = resolve_sampler_name(sampler)
    if schedule is not None and named is not None and schedule != named:
        raise ValueError(f"sampler {sampler!r} already names the {named!r} schedule; got schedule {schedule!r}")
    return name, schedule or named or default_schedule


def check_sampler_options(name: str, eta: float | None = None, order: int | None = None) -> dict:
    """The extra keyword arguments of the sampler a user named (any name :func:`resolve_sampling`
    accepts): the defaults the name implies (a diffusers scheduler class brings its own, e.g.
    UniPC's order 2), then ``eta`` and ``order`` when given; a sampler refuses an option it does
    not take, naming those that do."""
    sampler = resolve_sampler_name(name)[0]
    kw = sampler_defaults(name)
    for key, value in (("eta", eta), ("order", order)):
        if value is None:
            continue
        if key not in SAMPLER_OPTIONS[sampler]:
            takers = ", ".join(k for k, v in SAMPLER_OPTIONS.items() if key in v)
            raise ValueError(f"sampler {sampler!r} takes no {key} (samplers with {key}: {takers})")
        kw[key] = value
    return kw


@torch.no_grad()
def sample(denoiser: Denoiser, shape: Sequence[int], n: int, *, cond: dict | None = None,
           uncond: dict | None = None, sampler: str = "heun", schedule: str | None = None, steps: int = 30,
           rho: float = 7.0, eta: float | None = None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
           guidance_interval: tuple[float, float] | None = None, seed: int = 0,
           callback: Callable | None = None, sigmas: torch.Tensor | None = None,
           device: torch.device | str | None = None) -> torch.Tensor:
    """Draw ``n`` samples of ``shape`` (C, H, W); sample i is seeded with ``seed + i``.

    ``sampler`` may be any name :func:`resolve_sampling` accepts; ``schedule`` defaults to the
    one the sampler name carries, else karras. Returns the final x (sigma = 0) in the model's
    data space, (n, C, H, W) float32.
    """
    kwargs = check_sampler_options(sampler, eta)
    sampler, schedule = resolve_sampling(sampler, schedule)
    fn = SAMPLERS[sampler]
    if device is None:
        device = next(denoiser.parameters()).device
    if sigmas is None:
        sigmas = sigmas_for(denoiser, schedule, steps, rho)
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    gens = generators_for(seed, n)  # one generator per image for the initial AND the per-step noise
    x = start_state(randn((n, *shape), gens, device=device), float(sigmas[0]),
                    pure_noise_scale=noise_scale(denoiser, float(sigmas[0])))
    model = denoiser
    if guidance_scale != 1.0 or guidance_rescale or guidance_interval is not None:
        if uncond is None:
            raise ValueError("classifier-free guidance needs an unconditional input (uncond)")
        model = CFGDenoiser(denoiser, uncond, guidance_scale, guidance_rescale, guidance_interval)
    return fn(model, x, sigmas, cond=cond, callback=callback, generator=gens, **kwargs)
