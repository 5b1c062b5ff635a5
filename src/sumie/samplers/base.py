"""What every sampler shares: validating sigmas, calling the denoiser, reporting steps.

Samplers are pure functions (k-diffusion's ``sampling.py`` style)::

    sample_x(denoiser, x, sigmas, *, cond=None, callback=None, generator=None) -> x0

``x`` is the initial noise already scaled by ``sigmas[0]``; ``sigmas`` is a decreasing
tensor of noise levels ending in 0. There is no hidden step index and no state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


class SamplingCancelled(Exception):
    """Raised by a callback to stop sampling between steps."""


@dataclass(frozen=True)
class StepInfo:
    i: int  # step index, 0-based
    sigma: float  # noise level of x at this step
    sigma_next: float
    x: torch.Tensor  # current noisy sample (B, C, H, W)
    denoised: torch.Tensor  # current x0 estimate (B, C, H, W)


Callback = Optional[Callable[[StepInfo], object]]


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Validate a sampling schedule: 1-D, at least two entries, strictly decreasing, final 0."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels (steps >= 1), got shape "
                         f"{tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all():
        raise ValueError("sigmas must be finite")
    if sigmas[-1] != 0:
        raise ValueError(f"sigmas must end in 0 (got {float(sigmas[-1]):g}); append a zero")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"sigmas must be strictly decreasing, got {sigmas.tolist()}")
    return sigmas


def denoise(denoiser: Callable, x: torch.Tensor, sigma: torch.Tensor, cond, i: int) -> torch.Tensor:
    """One denoiser call at noise level ``sigma`` for the whole batch, checked for NaN/inf."""
    # sigma travels in float32 unless the whole computation is float64 (reference runs, parity tests)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = torch.as_tensor(sigma).to(device=x.device, dtype=dtype).expand(x.shape[0])
    out = denoiser(x, s, cond)
    if not torch.isfinite(out).all():
        raise FloatingPointError(f"the denoiser returned NaN or inf at step {i} (sigma={float(sigma):.6g}); "
                                 "check the model weights, the guidance scale and the input")
    return out


def report(callback: Callback, i: int, sigmas: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor) -> None:
    """Tell the callback about step ``i``; it may raise :class:`SamplingCancelled` to stop."""
    if callback is not None:
        callback(StepInfo(i, float(sigmas[i]), float(sigmas[i + 1]), x, denoised))


def report_at(callback: Callback, i: int, sigma, sigma_next, x: torch.Tensor, denoised: torch.Tensor) -> None:
    """:func:`report` for a step between two explicit noise levels (restart segments)."""
    if callback is not None:
        callback(StepInfo(i, float(sigma), float(sigma_next), x, denoised))


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma, Karras et al. 2022 eq. 3."""
    return (x - denoised) / sigma


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step to sigma_next into a deterministic part to sigma_down and fresh noise sigma_up.

    sigma_up = eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2): in VE form this is
    exactly DDIM's sigma_t(eta) (Song et al. 2021, eq. 16); eta = 1 is DDPM's posterior
    variance (Ho et al. 2020 eq. 7).
    """
    if not eta or sigma_next == 0:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
    return sigma_down, sigma_up


def lambda_(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR in VE form, lambda = -log(sigma) (Lu et al. 2022, DPM-Solver sec. 3.1)."""
    return -torch.log(sigma)


class ReachedSigma(Exception):
    """Raised by :class:`StopAtSigma`: sampling reached its final noise level; ``x`` is the sample there."""

    def __init__(self, x: torch.Tensor):
        super().__init__("reached the final noise level")
        self.x = x


class StopAtSigma:
    """A denoiser wrapper that ends sampling on reaching noise level ``sigma_final`` > 0: called
    there, it raises :class:`ReachedSigma` with x instead of calling the network. Run a sampler
    over ``[..., sigma_final, 0]`` to get the sample at ``sigma_final`` with no extra network call
    (diffusers' DDIM/PNDM with ``set_alpha_to_one=False`` and DEIS end at timestep 0's noise level,
    not at 0). Only for samplers that evaluate the denoiser at the levels of ``sigmas`` alone
    (not Heun-type second stages, whose correction would evaluate it at ``sigma_final`` early)."""

    def __init__(self, denoiser: Callable, sigma_final: float):
        self.denoiser, self.sigma_final = denoiser, float(sigma_final)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        if torch.isclose(sigma.double(), torch.tensor(self.sigma_final, dtype=torch.float64,
                                                      device=sigma.device), rtol=1e-5).all():
            raise ReachedSigma(x)
        return self.denoiser(x, sigma, cond)
