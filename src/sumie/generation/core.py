"""One generation function for every model family and every mode.

    request -> validate -> images/mask fitted to the model's size
            -> cond, uncond        (family.text_cond)
            -> start state         (pure noise at sigma_max, or the encoded image noised to the
                                    sigma that strength selects: sumie.diffusion.editing)
            -> denoiser chain      (model -> [inpaint channels] -> CFG -> [inpaint blend])
            -> sampler over sigmas (sumie.samplers, pure functions)
            -> decode, overlay     (unmasked pixels come back unchanged)

Seeding is defined here once: image i draws everything random (the VAE posterior sample of
its init image, its initial noise, the masked image's posterior sample, then each step's
noise) from ONE generator seeded ``seed + i``, in that order, as diffusers does with
``generator=[torch.Generator().manual_seed(seed + i) for i in range(n)]``. Image i is
therefore the same whether drawn alone or in a batch.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..diffusion.editing import (ConcatDenoiser, InpaintBlendDenoiser, noise_scale, start_state, steps_for_strength,
                                 truncate_sigmas)
from ..diffusion.guidance import CFGDenoiser
from ..image import to_uint8
from ..pipeline import check_sampler_options, resolve_sampling
from ..samplers import SAMPLERS, generators_for, randn
from ..samplers.base import ReachedSigma, StopAtSigma
from . import images as im
from .request import GenerationRequest, GenerationResult

DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 1.0, "outpaint": 1.0}


def _round_to(v: int, m: int) -> int:
    return max(m, v // m * m)


def _size(family, req: GenerationRequest, image: Image.Image | None, notes: list[str]) -> tuple[int, int]:
    """(height, width): the request's, else the init image's (rounded down to the model's multiple),
    else the family default; refused before any work when it exceeds the family's pixel budget."""
    m = family.size_multiple
    if req.width is not None or req.height is not None or image is None:
        d = family.defaults
        height, width = req.height or d.height, req.width or d.width
        if height % m or width % m:
            near = [_round_to(round(v / m) * m, m) for v in (height, width)]
            raise ValueError(f"height and width must be multiples of {m} for this model, got {height}x{width}; "
                             f"nearest valid size: --height {near[0]} --width {near[1]}")
    else:
        width, height = _round_to(image.width, m), _round_to(image.height, m)
        if (width, height) != image.size:
            notes.append(f"image {image.width}x{image.height} worked on at {width}x{height} "
                         f"(multiples of {m}, resize mode {req.resize_mode})")
    if width * height > family.max_pixels:
        s = (family.max_pixels / (width * height)) ** 0.5
        fit = (_round_to(int(width * s), m), _round_to(int(height * s), m))
        raise ValueError(f"{width}x{height} is too large for this model (at most {family.max_pixels} pixels); "
                         f"the same shape that fits: --width {fit[0]} --height {fit[1]}")
    return height, width


def _prepare(family, req: GenerationRequest, notes: list[str]) -> dict:
    """The fitted init image, mask and outpainting canvas as PIL images, plus what is needed to
    paste the result back (the original, the blurred mask, the "only masked" box)."""
    if req.init_image is None:
        h, w = _size(family, req, None, notes)
        return dict(height=h, width=w)
    image = im.load_image(req.init_image)
    mask = None
    if req.outpaint is not None:
        left, top, right, bottom = req.outpaint
        m = family.size_multiple
        W, H = image.width + left + right, image.height + top + bottom
        # grow a new margin so the canvas is a multiple of the model's size step (else it is resized)
        dw, dh = -W % m, -H % m
        right, left = (right + dw, left) if right else (right, left + dw) if left else (right, left)
        bottom, top = (bottom + dh, top) if bottom else (bottom, top + dh) if top else (bottom, top)
        canvas = im.extend(image, left, top, right, bottom)
        arr = np.full((canvas.height, canvas.width), 255, np.uint8)
        o = req.outpaint_overlap
        y0, y1 = top + (o if top else 0), top + image.height - (o if bottom else 0)
        x0, x1 = left + (o if left else 0), left + image.width - (o if right else 0)
        arr[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 0
        image, mask = canvas, Image.fromarray(arr, "L")
        notes.append(f"outpainting: canvas {canvas.width}x{canvas.height} (left {left}, top {top}, right {right}, "
                     f"bottom {bottom})")
    elif req.mask is not None:
        mask = im.load_mask(req.mask)
        if mask.size != image.size:
            notes.append(f"mask {mask.width}x{mask.height} resized to the image's {image.width}x{image.height}")
            mask = mask.resize(image.size, Image.Resampling.LANCZOS)
        if req.invert_mask:
            mask = Image.fromarray(255 - np.asarray(mask), "L")
    original, box = image, None
    if mask is not None:
        full_mask = im.blur_mask(mask, req.mask_blur)  # the overlay mask at the original's size
        hard = np.asarray(mask) >= 128
        if not hard.any():
            return dict(empty=True, original=original)
        if hard.all():
            notes.append("the mask covers the whole image: this is img2img of all of it")
        if req.only_masked:
            h, w = _size(family, req, None if req.width or req.height else image, notes)
            box = im.mask_box(mask, req.only_masked_padding, w, h)
            image, mask = image.crop(box), mask.crop(box)
            notes.append(f"only masked: region {box} worked on at {w}x{h}")
        if req.inpaint_fill == "fill":
            image = im.fill_masked(image, mask)
    h, w = _size(family, req, image if box is None else None, notes) if box is None else (h, w)
    fitted = im.fit(image, w, h, req.resize_mode)
    out = dict(height=h, width=w, image=fitted, original=original, box=box)
    if mask is not None:
        out["mask"] = im.fit(mask, w, h, req.resize_mode)
        out["overlay_mask"] = full_mask if box is not None else im.fit(full_mask, w, h, req.resize_mode)
        if box is None:
            out["original"] = im.fit(original, w, h, req.resize_mode)
    return out


def _lists(req: GenerationRequest) -> tuple[list[str], list[str]]:
    if req.class_labels is not None:  # class-conditional models: one image per label
        req.class_labels = [int(c) for c in req.class_labels]
        k = len(req.class_labels)
        if isinstance(req.prompt, (list, tuple)) or req.prompt or req.negative_prompt:
            raise ValueError("give prompts or class labels, not both")
        return [""] * k, [""] * k
    prompts = list(req.prompt) if isinstance(req.prompt, (list, tuple)) else [req.prompt] * req.n
    if not prompts:
        raise ValueError("no prompts given")
    negs = list(req.negative_prompt) if isinstance(req.negative_prompt, (list, tuple)) else \
        [req.negative_prompt] * len(prompts)
    if len(negs) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negs)} negative prompts")
    return prompts, negs


@torch.inference_mode()
def generate(family, request: GenerationRequest | None = None, **fields) -> GenerationResult:
    """Images for ``request`` (or a request built from ``fields``) with the model ``family``
    (:mod:`sumie.generation.families`); see the module docstring for the steps."""
    req = request if request is not None else GenerationRequest(**fields)
    if request is not None and fields:
        raise TypeError("give a GenerationRequest or its fields, not both")
    req.check()
    t0 = time.perf_counter()
    d = family.defaults
    kw = check_sampler_options(req.sampler or d.sampler, req.eta, req.order)
    sampler, schedule = resolve_sampling(req.sampler or d.sampler, req.schedule, default_schedule=d.schedule)
    steps = req.steps or d.steps
    guidance = d.guidance_scale if req.guidance_scale is None else req.guidance_scale
    mode = req.mode
    strength = 1.0 if mode == "txt2img" else (DEFAULT_STRENGTH[mode] if req.strength is None else req.strength)
    prompts, negs = _lists(req)
    n = len(prompts)
    notes: list[str] = []
    settings = dict(req.settings(), mode=mode, sampler=sampler, schedule=schedule, steps=steps,
                    guidance_scale=guidance, strength=strength, n=n, model=family.name)
    seeds = [req.seed + i for i in range(n)]

    plan = _prepare(family, req, notes)
    if plan.get("empty"):  # documented: an empty mask repaints nothing
        notes.append("the mask is empty: nothing to repaint, the image is returned as it is")
        img = np.asarray(plan["original"])[None].repeat(n, 0)
        return GenerationResult(img, settings, time.perf_counter() - t0, seeds, notes)
    h, w = plan["height"], plan["width"]
    settings.update(height=h, width=w)
    if mode != "txt2img" and steps_for_strength(steps, strength) == 0:
        if strength == 0:
            notes.append("strength 0: the image is returned as it is")
            img = np.asarray(plan["original"] if plan.get("box") is None else plan["image"])[None].repeat(n, 0)
            return GenerationResult(img, settings, time.perf_counter() - t0, seeds, notes)
        raise ValueError(f"strength {strength:g} x {steps} steps runs no step (int(steps * strength) = 0); "
                         f"raise the strength or the steps")
    if family.concat_channels and "mask" not in plan:
        raise ValueError(f"this is an inpainting model ({family.name}, {family.concat_channels} extra input "
                         "channels): give an init image and a mask (sumie inpaint), or outpaint")

    gens = generators_for(req.seed, n)
    cond, uncond = family.text_cond(prompts, negs, h, w, req.class_labels)
    mask_lat = concat = z_img = None
    inpaint = "mask" in plan
    pure_start = mode == "txt2img" or (inpaint and strength == 1.0)

    if mode != "txt2img":
        image = im.to_tensor(plan["image"])[None].expand(n, -1, -1, -1)  # (n, 3, H, W)
        if inpaint:
            m_px = im.to_tensor(plan["mask"])[None].expand(n, -1, -1, -1)  # (n, 1, H, W) in [0, 1]
            m_bin = (m_px >= 0.5).float()  # binarised, as diffusers' mask processor
        with family.space() as space:
            if not (family.concat_channels and pure_start):  # diffusers encodes the image only when it is used
                z_img = space.encode(image, gens)  # (n, c, h, w)
            noise = randn((n, family.latent_channels, *z_img.shape[-2:]) if z_img is not None else
                          (n, family.latent_channels, h // family.latent_factor, w // family.latent_factor), gens,
                          device=family.device)
            if inpaint:
                mask_lat = F.interpolate(m_bin, size=noise.shape[-2:]).to(noise.device)  # nearest, as diffusers
                if family.concat_channels:
                    masked = image * (m_bin < 0.5)
                    concat = torch.cat([mask_lat, space.encode(masked, gens).to(noise.device)], dim=1)
                if z_img is not None and req.inpaint_fill in ("latent_noise", "latent_nothing"):
                    fill = randn(z_img.shape, gens, device=z_img.device) if req.inpaint_fill == "latent_noise" \
                        else torch.zeros_like(z_img)
                    z_img = z_img * (1 - mask_lat) + fill * mask_lat
    else:
        noise = randn((n, family.latent_channels, h // family.latent_factor, w // family.latent_factor), gens,
                      device=family.device)

    with family.denoiser(round_timesteps=req.round_timesteps) as denoiser:  # (SD: the U-Net stage, after the VAE)
        # final_sigma > 0: the scheduler's last step lands on timestep 0's noise level, not 0 (io.sd.scheduler)
        sigmas, final_sigma = family.sigmas(denoiser, steps, schedule, req.rho if req.rho is not None else d.rho,
                                            sampler)
        sigmas = sigmas.to(device=family.device, dtype=torch.float32)
        if mode != "txt2img":
            sigmas = truncate_sigmas(sigmas, strength)
        sigma0 = float(sigmas[0])
        x = start_state(noise, sigma0, image_latent=None if pure_start else z_img.to(noise.device),
                        pure_noise_scale=noise_scale(denoiser, sigma0))
        model = denoiser
        if concat is not None:
            model = ConcatDenoiser(model, concat.to(x.dtype))
        if (guidance != 1.0 or req.guidance_rescale) and uncond is not None:
            model = CFGDenoiser(model, uncond, guidance, req.guidance_rescale)
        if inpaint and not family.concat_channels:
            model = InpaintBlendDenoiser(model, z_img.to(x.dtype), mask_lat.to(x.dtype), noise.to(x.dtype),
                                         resample=req.resample, generator=gens)
        x = x.to(dtype=family.dtype)
        if final_sigma:
            model = StopAtSigma(model, final_sigma)
        try:
            latent = SAMPLERS[sampler](model, x, sigmas, cond=cond, callback=req.callback, generator=gens, **kw)
        except ReachedSigma as stop:
            latent = stop.x / (1 + final_sigma**2) ** 0.5  # VE x at sigma_final -> the VP latent diffusers decodes
        del model, cond, uncond
    with family.space() as space:
        out = to_uint8(space.decode(latent))
    if inpaint and req.overlay:
        out = np.stack([im.overlay(o, plan["original"], plan["overlay_mask"], plan.get("box")) for o in out])
    elif plan.get("box") is not None:  # only masked, no overlay: still paste the region back
        full = Image.new("L", plan["original"].size, 0)
        full.paste(255, plan["box"])
        out = np.stack([im.overlay(o, plan["original"], full, plan["box"]) for o in out])
    return GenerationResult(out, settings, time.perf_counter() - t0, seeds, notes)

