"""Training losses as small callables ``loss(denoiser, x0, cond) -> per-sample loss``.

Every loss is written in x0 space with a per-sigma weight, the form of Karras et al.
2022 (EDM) eq. 8: ``lambda(sigma) * ||D(x0 + sigma*eps; sigma) - x0||^2``.

* ``weighting="native"`` uses lambda = 1/c_out^2, which makes the loss exactly the plain
  regression of the raw network onto its own target (eps, v, x0 or EDM's F target):
  for eps-prediction ``||D - x0||^2 / sigma^2 = ||eps_hat - eps||^2`` (Ho et al. 2020 eq. 14),
  and for EDM it is the lambda = 1/c_out^2 of EDM eq. 8 / table 1.
* ``weighting="min_snr"`` is Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training
  via Min-SNR Weighting Strategy", eq. 7): in x0 space the weight is min(SNR, gamma) with
  SNR = 1/sigma^2, whatever the network predicts; this is what their per-target weights
  (min(SNR,g)/SNR for eps, min(SNR,g)/(SNR+1) for v) reduce to.

A noise offset (Guttenberg 2023, "Diffusion with Offset Noise") adds a per-channel
constant to the noise so the model can learn to change mean brightness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .precond import Denoiser
from .schedules import append_dims

WEIGHTINGS = ("native", "min_snr")


@dataclass
class DiffusionLoss:
    """Draw sigma from ``sigma_sampler``, noise x0, denoise, return the weighted x0 error (B,)."""

    sigma_sampler: Callable[..., torch.Tensor]
    weighting: str = "native"
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.0

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.weighting!r}; valid: {', '.join(WEIGHTINGS)}")

    def weight(self, denoiser: Denoiser, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) for each sample, (B,)."""
        if self.weighting == "min_snr":
            snr = sigma.double() ** -2
            return snr.clamp(max=self.min_snr_gamma).float()
        return denoiser.scalings(sigma).c_out.double().pow(-2).float()

    def __call__(self, denoiser: Denoiser, x0: torch.Tensor, cond: dict | None = None, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        b = x0.shape[0]
        sigma = self.sigma_sampler(b, generator=generator, device=x0.device)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.noise_offset:
            offset = torch.randn((b, x0.shape[1], 1, 1), generator=generator, device=x0.device, dtype=x0.dtype)
            noise = noise + self.noise_offset * offset
        x = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise
        # x0-space error of the native raw target: (F - target) * c_out == D - x0
        out, s = denoiser.raw(x, sigma, cond)
        target = (x0 - append_dims(s.c_skip, x.ndim) * x) / append_dims(s.c_out, x.ndim)
        raw_err = (out.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
        if self.weighting == "native":  # lambda = 1/c_out^2 cancels exactly
            return raw_err
        # ||D - x0||^2 = c_out^2 * ||F - target||^2, so lambda * ||D-x0||^2 = lambda*c_out^2*raw_err
        return self.weight(denoiser, sigma) * s.c_out.float().pow(2) * raw_err
