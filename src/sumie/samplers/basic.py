"""One- and two-stage samplers of the probability-flow ODE and its ancestral SDE.

Euler, Euler ancestral (= DDIM with eta, DDPM), Heun and DPM2 (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models"), and LCM multistep
sampling (Luo et al. 2023). All are written against the denoiser contract in VE form
(x = x0 + sigma * eps); they match k-diffusion's functions of the same names.
"""

from __future__ import annotations

import torch

from .base import Callback, ancestral_step, check_sigmas, denoise, report, report_at, to_d
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
        x = _heun_step(denoiser, x, sigmas, i, i, cond, callback)
    return x


def _heun_step(denoiser, x, sigmas, i, step, cond, callback):
    """Heun step sigmas[i] -> sigmas[i+1] (Euler when sigmas[i+1] = 0), reported as ``step``."""
    denoised = denoise(denoiser, x, sigmas[i], cond, step)
    report_at(callback, step, sigmas[i], sigmas[i + 1], x, denoised)
    d = to_d(x, sigmas[i], denoised)
    dt = sigmas[i + 1] - sigmas[i]
    x_next = x + d * dt
    if sigmas[i + 1] > 0:
        d_next = to_d(x_next, sigmas[i + 1], denoise(denoiser, x_next, sigmas[i + 1], cond, step))
        x_next = x + (d + d_next) / 2 * dt
    return x_next


def _dpm2_step(denoiser, x, sigma, sigma_to, d, cond, i):
    """DPM-Solver-2 step in sigma (k-diffusion ``sample_dpm_2``): the derivative is taken at
    the geometric midpoint sigma_mid = sqrt(sigma * sigma_to), Lu et al. 2022 Algorithm 1
    with r = 1/2 written for the VE ODE."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = to_d(x_mid, sigma_mid, denoise(denoiser, x_mid, sigma_mid, cond, i))
    return x + d_mid * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None):
    """DPM2: DPM-Solver-2 (Lu et al. 2022) steps in sigma as in Karras et al. 2022 Algorithm 2
    without churn; 2 denoiser calls per step except the last (Euler to sigma = 0)."""
    sigmas = check_sigmas(sigmas).to(x.device)
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            x = _dpm2_step(denoiser, x, sigmas[i], sigmas[i + 1], d, cond, i)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, *, cond=None, callback: Callback = None,
                           generator: Generators = None, eta: float = 1.0):
    """DPM2 ancestral: a DPM-Solver-2 step down to sigma_down, then fresh noise sigma_up
    (k-diffusion ``sample_dpm_2_ancestral``)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    sigmas = check_sigmas(sigmas).to(x.device)
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm2_step(denoiser, x, sigmas[i], sigma_down, d, cond, i)
            x = x + randn_like(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None):
    """LCM multistep sampling, Luo et al. 2023 ("Latent Consistency Models") Algorithm 3 /
    Song et al. 2023 ("Consistency Models") Algorithm 1: jump to the x0 estimate, then
    re-noise it to the next sigma with fresh noise. The consistency boundary condition
    (c_skip, c_out) belongs to the denoiser's preconditioning, not to the sampler."""
    sigmas = check_sigmas(sigmas).to(x.device)
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + randn_like(x, generator) * sigmas[i + 1]
    return x


@torch.no_grad()
def sample_restart(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None,
                   restart_min: float = 0.1, restart_max: float = 2.0, restart_times: int | None = None):
    """Restart sampling, Xu et al. 2023 ("Restart Sampling for Improving Generative Processes")
    Algorithm 1: Heun steps along ``sigmas``; on reaching the noise level nearest
    ``restart_min``, add fresh noise to jump back up to the level nearest ``restart_max``,
    x += sqrt(s_max^2 - s_min^2) z, and solve that interval again, ``restart_times`` times
    (default: 1, or 2 from 36 steps on, A1111's rule). The restart interval reuses the
    schedule's own noise levels (A1111 instead re-spaces it with Karras sigmas)."""
    sigmas = check_sigmas(sigmas).to(x.device)
    steps = restart_plan(sigmas, restart_min, restart_max, restart_times)
    level = sigmas[0]
    for step, i in enumerate(steps):
        if sigmas[i] > level:  # jump back up the noise levels
            x = x + randn_like(x, generator) * (sigmas[i] ** 2 - level**2).sqrt()
        x = _heun_step(denoiser, x, sigmas, i, step, cond, callback)
        level = sigmas[i + 1]
    return x


def restart_plan(sigmas: torch.Tensor, restart_min: float = 0.1, restart_max: float = 2.0,
                 restart_times: int | None = None) -> list[int]:
    """The schedule indices restart sampling visits in order (Xu et al. 2023 Algorithm 1): every
    step once, and the interval from the level nearest ``restart_max`` down to the one nearest
    ``restart_min`` again ``restart_times`` times (see :func:`sample_restart`)."""
    n = len(sigmas) - 1
    if restart_times is None:
        restart_times = 0 if n < 4 else (1 if n < 36 else 2)
    if restart_times < 0 or not 0 < restart_min < restart_max:
        raise ValueError("restart needs restart_times >= 0 and 0 < restart_min < restart_max")
    positive = torch.as_tensor(sigmas)[:-1]
    j_min = int((positive - restart_min).abs().argmin())
    j_max = int((positive - restart_max).abs().argmin())
    steps = list(range(n))
    if j_max < j_min:
        steps = steps[:j_min] + (list(range(j_max, j_min)) * restart_times) + steps[j_min:]
    return steps
