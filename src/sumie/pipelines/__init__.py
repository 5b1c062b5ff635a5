"""Complete text-to-image pipelines over foreign checkpoints (Stable Diffusion)."""

from .sd import StableDiffusion

__all__ = ["StableDiffusion"]
