"""The DPM-Solver++ family: exponential integrators of the diffusion ODE/SDE in data prediction.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models" (Algorithms 1-2 and the SDE variant of appendix B), written in VE form with the
time variable t = lambda = -log(sigma). With h = t_next - t the exact solution of the
probability-flow ODE over one step is

    x_next = (sigma_next / sigma) * x + sigma_next * int_t^{t_next} e^{tau} x0(tau) dtau

and each solver approximates x0(tau) by a polynomial through the x0 estimates it has.
The SDE solvers add eta * h of Langevin noise per step (Gonzalez et al. 2023, "SEEDS",
and k-diffusion's ``sample_dpmpp_2m_sde``/``sample_dpmpp_3m_sde``).

Noise: k-diffusion's SDE solvers draw from a Brownian tree by default; sumie draws fresh
per-sample seeded Gaussians (``randn_like(x, generator)``) in the same order, so that
image i of a batch equals the image generated alone with seed + i. Given the same noise
the results are identical (see tests/test_sampler_parity.py).
"""

from __future__ import annotations

import torch

from .base import Callback, ancestral_step, check_sigmas, denoise, lambda_, report, to_d
from .noise import Generators, randn_like


def _check_eta(eta: float) -> None:
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")


def _first_order(x, sigma, sigma_next, denoised):
    """DPM-Solver++(1) = DDIM in data prediction: x_next = (sigma_next/sigma) x - expm1(-h) x0."""
    h = lambda_(sigma_next) - lambda_(sigma)
    return (sigma_next / sigma) * x - torch.expm1(-h) * denoised


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, cond=None, callback: Callback = None,
                              generator: Generators = None, eta: float = 1.0):
    """DPM-Solver++(2S) single-step, Lu et al. 2022 Algorithm 1 (r = 1/2), taken to sigma_down
    followed by ancestral noise sigma_up (k-diffusion ``sample_dpmpp_2s_ancestral``)."""
    _check_eta(eta)
    sigmas = check_sigmas(sigmas).to(x.device)
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = lambda_(sigmas[i]), lambda_(sigma_down)
            sigma_mid = torch.exp(-(t + (t_next - t) / 2))
            x_mid = _first_order(x, sigmas[i], sigma_mid, denoised)
            x = _first_order(x, sigmas[i], sigma_down, denoise(denoiser, x_mid, sigma_mid, cond, i))
        if sigmas[i + 1] > 0 and sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None,
                     eta: float = 1.0, r: float = 0.5):
    """DPM-Solver++ (stochastic) "DPM++ SDE": a two-stage SDE-DPM-Solver++ step with the
    intermediate point at t + r h, each stage split into a deterministic part and ancestral
    noise (k-diffusion ``sample_dpmpp_sde``). 2 denoiser calls per step except the last."""
    _check_eta(eta)
    if not 0 < r < 1:
        raise ValueError(f"r must be in (0, 1), got {r}")
    sigmas = check_sigmas(sigmas).to(x.device)
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t, t_next = lambda_(sigma), lambda_(sigma_next)
        sigma_s = torch.exp(-(t + r * (t_next - t)))
        # stage 1: to sigma_s
        sd, su = ancestral_step(sigma, sigma_s, eta)
        x_2 = _first_order(x, sigma, sd, denoised) + randn_like(x, generator) * su
        denoised_2 = denoise(denoiser, x_2, sigma_s, cond, i)
        # stage 2: to sigma_next with x0 extrapolated from the two stages
        fac = 1 / (2 * r)
        sd, su = ancestral_step(sigma, sigma_next, eta)
        x = _first_order(x, sigma, sd, (1 - fac) * denoised + fac * denoised_2)
        x = x + randn_like(x, generator) * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None):
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2: x0 extrapolated linearly from the last
    two estimates; first order on the first step and on the final step to sigma = 0."""
    sigmas = check_sigmas(sigmas).to(x.device)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        if old_denoised is None or sigmas[i + 1] == 0:
            x = _first_order(x, sigmas[i], sigmas[i + 1], denoised)
        else:
            h = lambda_(sigmas[i + 1]) - lambda_(sigmas[i])
            h_last = lambda_(sigmas[i]) - lambda_(sigmas[i - 1])
            r = h_last / h
            x = _first_order(x, sigmas[i], sigmas[i + 1], (1 + 1 / (2 * r)) * denoised - old_denoised / (2 * r))
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None,
                        eta: float = 1.0, solver_type: str = "midpoint"):
    """DPM-Solver++(2M) SDE, Lu et al. 2022 appendix B / Gonzalez et al. 2023: the 2M update
    of the SDE with eta * h of injected noise; ``solver_type`` midpoint or heun picks the
    second-order correction (k-diffusion ``sample_dpmpp_2m_sde``). eta = 0 is an ODE solver."""
    _check_eta(eta)
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sigmas = check_sigmas(sigmas).to(x.device)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            h = None
        else:
            h = lambda_(sigmas[i + 1]) - lambda_(sigmas[i])
            eta_h = eta * h
            phi = -torch.expm1(-h - eta_h)  # 1 - e^{-(1+eta) h}
            x = sigmas[i + 1] / sigmas[i] * torch.exp(-eta_h) * x + phi * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + randn_like(x, generator) * sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt()
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None,
                        eta: float = 1.0):
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``): x0 extrapolated by a
    quadratic through the last three estimates, Lu et al. 2022 eq. (third-order multistep)
    with eta * h of injected noise; eta = 0 is the deterministic DPM-Solver++(3M)."""
    _check_eta(eta)
    sigmas = check_sigmas(sigmas).to(x.device)
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = lambda_(sigmas[i + 1]) - lambda_(sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = torch.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = torch.expm1(-h_eta) / h_eta + 1
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + randn_like(x, generator) * sigmas[i + 1] * (-torch.expm1(-2 * h * eta)).sqrt()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def sample_dpmpp_3m(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None):
    """DPM-Solver++(3M), the deterministic third-order multistep solver (Lu et al. 2022):
    :func:`sample_dpmpp_3m_sde` with eta = 0."""
    return sample_dpmpp_3m_sde(denoiser, x, sigmas, cond=cond, callback=callback, generator=generator, eta=0.0)


def sample_dpmpp_2m_sde_heun(denoiser, x, sigmas, *, cond=None, callback: Callback = None,
                             generator: Generators = None, eta: float = 1.0):
    """DPM-Solver++(2M) SDE with the heun-type second-order correction (ComfyUI's
    ``dpmpp_2m_sde_heun``)."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, cond=cond, callback=callback, generator=generator,
                               eta=eta, solver_type="heun")
