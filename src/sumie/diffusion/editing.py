"""Editing as a start state plus denoiser wrappers: img2img, variations, inpainting.

img2img (SDEdit, Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with
Stochastic Differential Equations") starts the reverse process part-way down: the sigma list
of ``steps`` steps is truncated to its last ``int(steps * strength)`` steps and the encoded
image is noised to the first kept sigma, ``x = z_image + sigma_start * noise``
(:func:`truncate_sigmas`, :func:`start_state`). This is diffusers' and A1111's convention
(``get_timesteps``): strength 1 runs every step from pure noise, strength 0.3 runs about 30%
of them, strength 0 returns the encoded image.

Inpainting, two ways, both wrappers around a denoiser ``D(x; sigma, cond) -> x0``:

* :class:`InpaintBlendDenoiser` (any model; RePaint-like blending, Lugmayr et al. 2022;
  ComfyUI ``KSamplerX0Inpaint``): before each call the known region of x is replaced by the
  image re-noised *with the initial noise* to the current sigma, ``z + sigma * noise``, and
  the known region of the x0 estimate is the image itself. With an Euler step this leaves
  the known region exactly at ``z + sigma_next * noise``, which is what diffusers'
  ``StableDiffusionInpaintPipeline`` writes back after each step for 4-channel U-Nets.
  Optional RePaint resampling (``resample > 1``) re-noises and repeats each call's
  harmonisation inside the wrapper.
* :class:`ConcatDenoiser` (SD inpainting checkpoints, 9 input channels): the mask and the
  latents of the masked image ride along as extra U-Net input channels, unscaled by c_in
  (``cond["concat"]``, concatenated inside :class:`~sumie.nn.unet.UNet`).

Masks are 1 where the model repaints (white in a mask image) and 0 where the image is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from .precond import DiscreteDenoiser


def steps_for_strength(steps: int, strength: float) -> int:
    """Steps an img2img run of ``steps`` at ``strength`` actually takes: int(steps * strength)
    (diffusers ``get_timesteps``; A1111 rounds the same way)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0 keeps the image, 1 repaints it from pure noise), "
                         f"got {strength:g}")
    return min(int(steps * strength), steps)


def truncate_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a sigma list (ending in 0) that img2img at ``strength`` runs: the last
    int(steps * strength) steps; strength 0 leaves ``[0]`` (nothing to run)."""
    steps = len(sigmas) - 1
    kept = steps_for_strength(steps, strength)
    return sigmas[steps - kept:]


def noise_scale(denoiser, sigma: float) -> float:
    """Std of a pure-noise start at ``sigma`` for a model denoiser (unwrapped): sqrt(1 + sigma^2)
    for variance-preserving (discrete) models, the std of their training x at that level for
    unit-variance data (diffusers' ``init_noise_sigma``), and sigma for EDM-style models,
    whose sigma_max dwarfs the data."""
    if isinstance(denoiser, DiscreteDenoiser):
        return (1.0 + sigma**2) ** 0.5
    return sigma


def start_state(noise: torch.Tensor, sigma: float, *, image_latent: torch.Tensor | None = None,
                pure_noise_scale: float | None = None) -> torch.Tensor:
    """x at the first sigma: pure noise (``noise * pure_noise_scale``) when there is no image,
    else the encoded image noised to ``sigma``, ``z + sigma * noise`` (diffusers ``add_noise``
    in VE form). Shapes (B, C, h, w)."""
    if image_latent is None:
        return noise * (sigma if pure_noise_scale is None else pure_noise_scale)
    return image_latent + noise * sigma


class ConcatDenoiser(nn.Module):
    """Extra U-Net input channels (B, k, h, w) for every call: SD inpainting checkpoints take
    ``cat([x * c_in, mask, z_masked_image])``. Sits under CFG: a doubled batch repeats them."""

    def __init__(self, denoiser, concat: torch.Tensor):
        super().__init__()
        self.denoiser, self.concat = denoiser, concat

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        c = self.concat.to(device=x.device, dtype=x.dtype)
        if c.shape[0] != x.shape[0]:
            c = c.repeat(x.shape[0] // c.shape[0], 1, 1, 1)
        return self.denoiser(x, sigma, {**(cond or {}), "concat": c})


class InpaintBlendDenoiser(nn.Module):
    """Keep the known region (mask = 0) on the image's own noisy trajectory.

    ``forward(x, sigma)``: x_in = m * x + (1 - m) * (z + sigma * noise); x0 = m * D(x_in) + (1 - m) * z,
    with m (B or 1, 1, h, w) in [0, 1], z the image latents and ``noise`` the run's initial noise.
    ``resample`` > 1 repeats each call RePaint-style (Lugmayr et al. 2022, Algorithm 1 with
    jump length 1): the harmonised x0 is re-noised to sigma with fresh noise and denoised again.
    """

    def __init__(self, denoiser, image_latent: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
                 resample: int = 1, generator=None):
        super().__init__()
        if resample < 1:
            raise ValueError(f"resample must be >= 1, got {resample}")
        self.denoiser, self.z, self.mask, self.noise = denoiser, image_latent, mask, noise
        self.resample, self.generator = resample, generator

    def blend_input(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        m = self.mask.to(x.dtype)
        return m * x + (1 - m) * (self.z.to(x.dtype) + s * self.noise.to(x.dtype))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        from ..samplers.noise import randn_like

        m = self.mask.to(x.dtype)
        for r in range(self.resample):
            x_in = self.blend_input(x, sigma)
            x0 = m * self.denoiser(x_in, sigma, cond) + (1 - m) * self.z.to(x.dtype)
            if r + 1 < self.resample:  # RePaint: back up to sigma along fresh noise, harmonise again
                s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
                x = x0 + s * randn_like(x, self.generator)
        return x0
