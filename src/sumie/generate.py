"""Text to image with a trained sumie model: the bundled one by default.

:class:`TextToImage` holds a loaded model (denoiser, text encoder, run config) and turns a
prompt into images with classifier-free guidance (Ho & Salimans 2022): the prompt and the
negative prompt are encoded once, and :func:`sumie.pipeline.sample` batches the conditional
and unconditional passes. Image ``i`` of a call is seeded with ``seed + i``, so it is the
same image whether it is drawn alone or in a batch, up to float rounding: CPU convolutions and
matrix products sum in an order that depends on the batch size, so a few pixel values may differ
by 1/255 (measured on the bundled model, batches of 4 and 8: at most 1/255 on under 0.02% of the
values; tested to 2/255 on under 1%).

The bundled model (``sumie/assets/emoji-64``) is an exported model folder (``sumie export``):
config, fp16 EMA weights, the text encoder and its tokenizer, and a model card.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import RunConfig
from .diffusion.precond import Denoiser
from .generation.request import GenerationResult
from .latent import PixelSpace, Space
from .io.checkpoint import BUNDLED_MODEL  # noqa: F401 - re-exported (sumie.generate.BUNDLED_MODEL)
from .text.base import TextEncoder



Generation = GenerationResult  # the one result type (sumie.generation.request)


class TextToImage:
    """A loaded text-conditioned model, ready to draw prompts."""

    def __init__(self, denoiser: Denoiser, encoder: TextEncoder, config: RunConfig,
                 space: Space | None = None) -> None:
        self.denoiser, self.encoder, self.config = denoiser, encoder, config
        self.space = space or PixelSpace(config.model.in_channels)  # pixels, or an autoencoder's latents

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> "TextToImage":
        """A run folder, ``ckpt-*`` folder or exported model folder; None or ``bundled`` for the bundled model."""
        from .generation.families import SumieFamily, require_text

        f = require_text(SumieFamily.load(path, device=device), path)
        return cls(f.denoiser_, f.encoder, f.config, f.space_)

    @property
    def resolution(self) -> int:
        return self.config.data.resolution

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str = "", *, n: int = 1, seed: int = 0,
                 steps: int | None = None, sampler: str | None = None, schedule: str | None = None,
                 guidance_scale: float | None = None, eta: float | None = None, callback=None) -> Generation:
        """``n`` images of ``prompt`` (or one image per prompt of a list); image i is seeded with seed + i."""
        from .generation import GenerationRequest, SumieFamily, generate

        family = SumieFamily(self.denoiser, self.config, self.space, self.encoder)
        return generate(family, GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, n=n, seed=seed, steps=steps, sampler=sampler,
            schedule=schedule, guidance_scale=guidance_scale, eta=eta, callback=callback))
