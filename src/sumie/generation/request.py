"""What one call of :func:`sumie.generation.generate` is asked for, and what it returns.

One request type for every model family and every mode: text to image (no init image),
img2img and variations (init image + strength), inpainting (init image + mask) and
outpainting (init image + ``outpaint`` margins). Fields left None take the family's defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .images import RESIZE_MODES, ImageLike

FILL_MODES = ("original", "fill", "latent_noise", "latent_nothing")  # A1111's "masked content"


@dataclass
class GenerationRequest:
    """Everything a generation may vary. Image i of the batch is seeded with ``seed + i``, so it is
    the same image whether drawn alone or in a batch of any size."""

    prompt: str | list[str] = ""
    negative_prompt: str | list[str] = ""
    n: int = 1  # images per prompt string (a list of prompts gives one image each)
    class_labels: list[int] | None = None  # class-conditional sumie models: one label per image (-1 = none)
    seed: int = 0
    width: int | None = None  # pixels; default: the init image's size, else the model's resolution
    height: int | None = None
    steps: int | None = None  # the full schedule; img2img runs int(steps * strength) of them
    sampler: str | None = None  # sumie, ComfyUI, A1111 ("Euler a", "DPM++ 2M Karras") or diffusers name
    schedule: str | None = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    eta: float | None = None
    order: int | None = None  # solver order of lms, deis, uni_pc, uni_pc_bh2 (None: the sampler name's default)
    rho: float | None = None
    round_timesteps: bool = False  # discrete models: the U-Net sees the nearest integer timestep (diffusers' habit)
    # img2img / variations
    init_image: ImageLike | None = None
    strength: float | None = None  # in [0, 1]; default 0.75 for img2img, 1.0 for inpainting and outpainting
    resize_mode: str = "resize"  # "resize", "crop" (crop and resize) or "fill" (resize and fill)
    # inpainting
    mask: ImageLike | None = None  # white (1) = repaint, black (0) = keep
    mask_blur: float = 4.0  # Gaussian radius in pixels, for the final overlay (and soft edges)
    invert_mask: bool = False
    inpaint_fill: str = "original"  # what the masked area starts from: see FILL_MODES
    only_masked: bool = False  # crop around the mask (+ padding), work at full size, paste back
    only_masked_padding: int = 32
    overlay: bool = True  # paste the result over the original through the blurred mask
    resample: int = 1  # RePaint resampling per step for models without inpainting channels
    # outpainting: pixels added on each side (left, top, right, bottom)
    outpaint: tuple[int, int, int, int] | None = None
    outpaint_overlap: int = 8  # pixels of the original also repainted along each new edge, so no seam shows
    callback: Callable | None = field(default=None, repr=False)

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        if self.outpaint is not None:
            return "outpaint"
        return "inpaint" if self.mask is not None else "img2img"

    def settings(self) -> dict:
        """The request as plain data (images left out), for logs and result metadata."""
        skip = {"init_image", "mask", "callback"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def check(self) -> None:
        """Validate what needs no model; one clear line per problem."""
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.strength is not None and not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1] (0 keeps the image, 1 repaints it from pure noise), "
                             f"got {self.strength:g}")
        if self.strength is not None and self.init_image is None:
            raise ValueError("strength applies to an init image (img2img); give one or drop strength")
        if self.mask is not None and self.init_image is None:
            raise ValueError("a mask needs the image it masks (init_image)")
        if self.outpaint is not None:
            if self.init_image is None:
                raise ValueError("outpainting needs the image to extend (init_image)")
            if self.mask is not None:
                raise ValueError("outpainting makes its own mask (the new margins); give no mask")
            if len(self.outpaint) != 4 or min(self.outpaint) < 0 or max(self.outpaint) == 0:
                raise ValueError(f"outpaint takes 4 margins >= 0 (left, top, right, bottom), not all 0; "
                                 f"got {self.outpaint}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.inpaint_fill not in FILL_MODES:
            raise ValueError(f"inpaint fill must be one of {', '.join(FILL_MODES)}, got {self.inpaint_fill!r}")
        if self.mask_blur < 0:
            raise ValueError(f"mask blur must be >= 0 pixels, got {self.mask_blur:g}")
        if self.resample < 1:
            raise ValueError(f"resample must be >= 1, got {self.resample}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 pixel, got {v}")


@dataclass
class GenerationResult:
    """uint8 images (n, H, W, 3), the seed of each, the settings used, notes on what was adjusted
    (a resized mask, a rounded size), and the time the call took."""

    images: np.ndarray
    settings: dict
    seconds: float
    seeds: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
