"""First-order and Heun samplers of the probability-flow ODE and its ancestral SDE.

All are written against the denoiser contract in VE form (x = x0 + sigma * eps).
"""

from __future__ import annotations

import torch

from .base import Callback, ancestral_step, check_sigmas, denoise, report, to_d
from .noise import Generators, randn_like


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None):
    """Euler's method on the probability-flow ODE, Karras et al. 2022 Algorithm 1 without the
    Heun correction. For a VP model this equals deterministic DDIM (Song et al. 2021, eta=0)."""
    sigmas = check_sigmas(sigmas).to(x.device)
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, cond=None, callback: Callback = None,
                           generator: Generators = None, eta: float = 1.0):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up
    (k-diffusion ``sample_euler_ancestral``). In VE form the update
    ``x_next = x0_hat + sigma_down * eps_hat + sigma_up * z`` is exactly DDIM's eq. 12 with
    sigma_t(eta) of eq. 16 (Song et al. 2021); eta = 1 is DDPM ancestral sampling."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    sigmas = check_sigmas(sigmas).to(x.device)
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0 and sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
    return x


def sample_ddim(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None,
                eta: float = 0.0):
    """DDIM, Song et al. 2021 eq. 12 with sigma_t(eta) of eq. 16, in VE form (see
    :func:`sample_euler_ancestral`, which it is algebraically identical to)."""
    return sample_euler_ancestral(denoiser, x, sigmas, cond=cond, callback=callback, generator=generator, eta=eta)


def sample_ddpm(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None):
    """DDPM ancestral sampling, Ho et al. 2020 Algorithm 2 with the posterior variance beta-tilde:
    DDIM with eta = 1 (Song et al. 2021 sec. 4.1)."""
    return sample_euler_ancestral(denoiser, x, sigmas, cond=cond, callback=callback, generator=generator, eta=1.0)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None):
    """Heun's second-order method, Karras et al. 2022 Algorithm 1 (deterministic, S_churn = 0):
    2 denoiser calls per step except the last, which is a plain Euler step to sigma = 0."""
    sigmas = check_sigmas(sigmas).to(x.device)
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        x_next = x + d * dt
        if sigmas[i + 1] > 0:
            d_next = to_d(x_next, sigmas[i + 1], denoise(denoiser, x_next, sigmas[i + 1], cond, i))
            x_next = x + (d + d_next) / 2 * dt
        x = x_next
    return x
