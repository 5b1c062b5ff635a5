"""Model families as bundles of components for the one generation function.

A family supplies what :func:`sumie.generation.generate` needs and nothing else:

* ``text_cond(prompts, negatives, height, width) -> (cond, uncond)``: the conditioner;
* ``denoiser()``: a context manager yielding the model denoiser ``D(x; sigma, cond) -> x0``
  (a family may build it lazily and free it afterwards, as the SD stages do);
* ``space()``: a context manager yielding ``encode(x, generator) -> z`` and ``decode(z) -> x``
  (pixels, sumie's own autoencoder, or an SD VAE);
* ``sigmas(denoiser, steps, schedule, rho)``: the default sampling noise levels;
* ``defaults``, ``size_multiple``, ``max_pixels``, ``latent_channels``, ``concat_channels``.

:class:`SumieFamily` covers sumie's own text-to-image models (pixel and latent);
:class:`SDFamily` covers every Stable Diffusion checkpoint sumie loads (SD 1.x, 2.x, 2.x-v,
the 9-channel inpainting variants, SDXL). :func:`load_family` picks one from a path. A new
family is a new class here with these members (see docs/design.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..diffusion.precond import Denoiser


@dataclass(frozen=True)
class Defaults:
    """A family's default settings, used for every request field left None."""

    steps: int
    sampler: str
    schedule: str | None  # None: the family's own (SD: the scheduler config's timestep spacing)
    guidance_scale: float
    rho: float = 7.0
    height: int = 512
    width: int = 512


def _per_image(fn, x: torch.Tensor, generators) -> torch.Tensor:
    """fn(x[i:i+1], generators[i]) for each image, concatenated: batch-size invariant draws."""
    return torch.cat([fn(x[i:i + 1], generators[i] if generators is not None else None)
                      for i in range(x.shape[0])])


class SumieFamily:
    """sumie's own models (pixel or latent space): text-, class- or unconditional. The one place
    that loads a run's denoiser, text encoder and space together (:meth:`load`)."""

    name = "sumie"
    concat_channels = 0

    def __init__(self, denoiser: Denoiser, config, space=None, encoder=None) -> None:
        from ..latent import PixelSpace

        self.denoiser_, self.config, self.encoder = denoiser, config, encoder
        self.space_ = space or PixelSpace(config.model.in_channels)
        s, res = config.sample, config.data.resolution
        self.defaults = Defaults(steps=s.steps, sampler=s.sampler, schedule=s.schedule,
                                 guidance_scale=s.guidance_scale, rho=s.rho, height=res, width=res)
        self.latent_channels = self.space_.channels
        f = self.latent_factor = getattr(self.space_, "downsampling_factor", 1)
        self.dtype = torch.float32
        self.size_multiple = f * getattr(getattr(denoiser, "net", None), "downsampling_factor", 1)
        self.max_pixels = (8 * res) ** 2  # a small model: up to 8x its training resolution on a side
        self.device = next(denoiser.parameters()).device
        self.is_pixel = isinstance(self.space_, PixelSpace)

    @classmethod
    def load(cls, path: str | Path | None = None, *, ema: bool = True, device: str | torch.device = "cpu"
             ) -> "SumieFamily":
        """A run folder, ``ckpt-*`` folder or exported model folder (None or ``bundled``: the bundled model)."""
        from ..latent import load_space
        from ..models import load_model, load_text_encoder

        from ..io.checkpoint import BUNDLED_MODEL, resolve_model_path

        path = BUNDLED_MODEL if path is None else resolve_model_path(path)  # "bundled" names it too
        if path == BUNDLED_MODEL:
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"the bundled model is not installed in this copy of sumie ({path}); "
                                        "pass --model RUN_DIR (a run trained with a caption preset such as "
                                        "emoji-64 or shapes-text-32)")
        denoiser, config = load_model(path, ema=ema, device=device)
        encoder = load_text_encoder(path, ema=ema, device=device) if config.data.conditioning == "caption" else None
        return cls(denoiser, config, load_space(path, config, device), encoder)

    @property
    def conditioning(self) -> str:
        if self.encoder is not None:
            return "caption"
        return "class" if self.config.model.num_classes is not None else "none"

    def text_cond(self, prompts: list[str], negatives: list[str], height: int, width: int,
                  class_labels: list[int] | None = None) -> tuple[dict | None, dict | None]:
        """(cond, uncond): encoded prompts, class labels (-1 = none), or None for unconditional models."""
        kind = self.conditioning
        if kind == "caption":
            if class_labels is not None:
                raise ValueError("this model is text-conditioned: give a prompt, not class labels")
            from ..text.small import text_cond

            return text_cond(self.encoder, prompts), text_cond(self.encoder, negatives)
        if any(p for p in prompts):
            raise ValueError("this model has no text encoder; give class labels (--label) instead of a prompt")
        if kind == "class":
            if class_labels is None:
                raise ValueError(f"this model is class-conditional: choose what to draw with class labels (0 to "
                                 f"{self.config.model.num_classes - 1})")
            bad = [c for c in class_labels if not -1 <= c < self.config.model.num_classes]
            if bad:
                raise ValueError(f"class labels must be in [0, {self.config.model.num_classes}), got {bad[0]}")
            from ..pipeline import class_cond

            return class_cond(class_labels, self.device), class_cond([-1] * len(class_labels), self.device)
        if class_labels is not None:
            raise ValueError("this model is unconditional: it takes no class labels")
        return None, None

    @contextlib.contextmanager
    def denoiser(self, round_timesteps: bool = False):
        if round_timesteps:
            raise ValueError("round_timesteps is for Stable Diffusion checkpoints (the integer timesteps diffusers "
                             "feeds its U-Net); sumie's models take continuous noise levels")
        yield self.denoiser_

    @contextlib.contextmanager
    def space(self):
        space = self.space_
        device = self.device

        class _Space:
            @staticmethod
            def encode(x: torch.Tensor, generators=None) -> torch.Tensor:
                return _per_image(lambda xi, g: space.encode(xi, g), x.to(device), generators)

            @staticmethod
            def decode(z: torch.Tensor) -> torch.Tensor:
                from ..latent import decode_samples

                return decode_samples(space, z)

        yield _Space

    def sigmas(self, denoiser: Denoiser, steps: int, schedule: str | None, rho: float,
               sampler: str = "euler") -> tuple[torch.Tensor, float]:
        """(sampling noise levels ending in 0, final noise level before 0 that ends sampling: none here)."""
        from ..pipeline import sigmas_for

        return sigmas_for(denoiser, schedule or "karras", steps, rho), 0.0


class SDFamily:
    """Stable Diffusion checkpoints through :class:`~sumie.pipelines.sd.StableDiffusion`'s lazy
    stages (text, U-Net, VAE built when needed and freed after unless ``keep_loaded``)."""

    name = "sd"

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        ck = pipe.checkpoint
        res = ck.resolution
        self.defaults = Defaults(steps=20, sampler="euler", schedule=None, guidance_scale=7.5, height=res, width=res)
        self.latent_channels = ck.vae_config.embed_dim
        self.latent_factor = ck.vae_config.downsampling_factor
        self.dtype = pipe.dtype
        extra = ck.unet_config.in_channels - self.latent_channels
        self.concat_channels = extra if extra > 0 else 0  # inpainting: mask (1) + masked-image latents (c)
        self.size_multiple = ck.vae_config.downsampling_factor * 2 ** (len(ck.unet_config.channel_mult) - 1)
        self.max_pixels = (4 * res) ** 2  # four times the native resolution on each side
        self.device = pipe.device
        self.is_pixel = False
        self.name = ck.family.name

    def text_cond(self, prompts: list[str], negatives: list[str], height: int, width: int,
                  class_labels: list[int] | None = None) -> tuple[dict, dict]:
        if class_labels is not None:
            raise ValueError("Stable Diffusion models are text-conditioned: give a prompt, not class labels")
        pipe = self.pipe
        text = pipe._stage("text", pipe.build_text)
        c, u = text.encode_pair(prompts, negatives)
        if pipe.zeros_for_empty_negative:  # diffusers' force_zeros_for_empty_prompt (SDXL's model_index.json)
            empty = torch.tensor([not neg for neg in negatives], device=u.hidden.device)
            u.hidden[empty] = 0
            u.pooled[empty] = 0
        size = dict(original_size=(height, width), target_size=(height, width))
        out = text.unet_cond(c, **size), text.unet_cond(u, **size)
        del text, c, u
        pipe._stage_done()
        return out

    @contextlib.contextmanager
    def denoiser(self, round_timesteps: bool = False):
        from ..diffusion.precond import DiscreteDenoiser
        from ..pipelines.sd import stream_blocks

        pipe = self.pipe
        unet = pipe._stage("unet", pipe.build_unet)
        hooks = stream_blocks(unet, pipe.stream_weights) if pipe.stream_weights else []
        try:
            yield DiscreteDenoiser(unet, pipe.schedule, pipe.checkpoint.prediction, round_timesteps)
        finally:
            for h in hooks:
                h.remove()
            del unet
            pipe._stage_done()

    @contextlib.contextmanager
    def space(self):
        pipe = self.pipe
        vae = pipe._stage("vae", lambda: pipe.checkpoint.build_vae(pipe.dtype, pipe.device))
        tile = pipe.vae_tile

        class _Space:
            @staticmethod
            def encode(x: torch.Tensor, generators=None) -> torch.Tensor:
                """Scaled latents of a posterior *sample* (as diffusers and A1111), one draw per image."""
                def one(xi, g):
                    xi = xi.to(pipe.device, pipe.dtype)
                    post = vae.encode_tiled(xi, tile * 8, tile) if tile else vae.encode(xi)
                    return vae.to_latent(post.sample(g))
                return _per_image(one, x, generators)

            @staticmethod
            def decode(z: torch.Tensor) -> torch.Tensor:
                z = vae.from_latent(z.to(pipe.dtype))
                return vae.decode_tiled(z, tile, tile // 8) if tile else vae.decode(z)

        try:
            yield _Space
        finally:
            del vae
            pipe._stage_done()

    def sigmas(self, denoiser: Denoiser, steps: int, schedule: str | None, rho: float,
               sampler: str = "euler") -> tuple[torch.Tensor, float]:
        """The scheduler's own noise levels for ``sampler`` (StableDiffusion.sigmas)."""
        return self.pipe.sigmas(steps, schedule, denoiser, sampler)


def is_sd_model(path: str | Path | None) -> bool:
    """A Stable Diffusion checkpoint: a weights file, or a diffusers folder (model_index.json)."""
    return path is not None and (Path(path).is_file() or (Path(path) / "model_index.json").is_file())


def load_family(path: str | Path | None = None, *, device: str | torch.device = "cpu", **sd_options):
    """The family of the model at ``path``: a Stable Diffusion checkpoint (file or diffusers folder,
    ``sd_options`` passed to ``StableDiffusion.from_pretrained``), else a sumie run or model folder
    (None: the bundled model)."""
    if is_sd_model(path):
        from ..pipelines.sd import StableDiffusion

        loras = sd_options.pop("loras", ())
        pipe = StableDiffusion.from_pretrained(path, device=device, **sd_options)
        for lora, strength in loras:
            pipe.load_lora(lora, strength)
        return SDFamily(pipe)
    if sd_options.get("loras") or any(v for k, v in sd_options.items() if k != "loras"):
        given = ", ".join(k for k, v in sd_options.items() if v)
        raise ValueError(f"{given}: options for Stable Diffusion checkpoints (a .safetensors file or a diffusers "
                         "folder), not for sumie's own models")
    return require_text(SumieFamily.load(path, device=device), path)


def require_text(family: SumieFamily, path) -> SumieFamily:
    """The family, if it is a text-to-image model (what generate/img2img/inpaint draw with)."""
    if family.conditioning != "caption":
        raise ValueError(f"{path} is not a text-to-image model (its conditioning is "
                         f"{family.config.data.conditioning!r}); use `sumie sample` for it")
    return family
