"""sumie's one generation pipeline against diffusers' SD pipelines (test-only oracles): Euler a
text to image, img2img (SD 1.x and SDXL), inpainting with 9-channel and 4-channel U-Nets.

Tiny random models as in test_sd_pipeline; the same seed on both sides with one generator
per image (diffusers: ``generator=[torch.Generator().manual_seed(seed + i) ...]``), so the
initial noise, the VAE posterior samples and the ancestral steps' noise come from the same
draws. The uint8 images may differ by at most 1.

Known, intended differences (see sumie.generation.core / sumie.diffusion.editing):
* diffusers' inpaint pipeline encodes a single init image with only the first generator of a
  list and repeats it, so image i of its batch is not image i drawn alone; sumie's is. The
  inpainting comparisons therefore draw one image.
* for 4-channel (blended) inpainting diffusers also encodes the masked image, which uses up
  draws that sumie does not take: ancestral samplers then see other step noise. The
  4-channel comparisons use deterministic samplers; and at strength 1 sumie already shows
  the U-Net the re-noised known region at the first step (ComfyUI), diffusers pure noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sumie.generation import GenerationRequest, SDFamily, generate
from sumie.pipelines import StableDiffusion

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from test_sd_checkpoints import TINY_UNETS, _perturb  # noqa: E402
from test_sd_pipeline import EOS, NEGATIVE, PROMPT, SIZE, build_diffusers, max_diff, write_tokenizer  # noqa: E402

torch.set_num_threads(1)
SEED, STEPS = 3, 20
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
              "ddim": "DDIMScheduler"}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edit")
    pipe, folder, sched = build_diffusers(tmp, "sd1")
    torch.manual_seed(1)
    unet9 = _perturb(diffusers.UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4,
                                                    **TINY_UNETS["sd1"]), 5)
    inpaint = diffusers.StableDiffusionInpaintPipeline(**{**pipe.components, "unet": unet9})
    inpaint.save_pretrained(tmp / "sd1-inpaint")
    write_tokenizer(tmp / "sd1-inpaint" / "tokenizer", EOS)
    return pipe, folder, tmp / "sd1-inpaint", unet9


def picture(size: int = SIZE, seed: int = 0) -> Image.Image:
    """A smooth random picture (VAE-friendly) of size x size."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)


def square_mask(size: int = SIZE) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[8:24, 4:20] = 255
    return Image.fromarray(m)


def reference(cls, components: dict, scheduler: str, n: int = 1, **kw) -> np.ndarray:
    p = cls(**components)
    p.set_progress_bar_config(disable=True)
    extra = {"set_alpha_to_one": True, "clip_sample": False} if scheduler == "ddim" else {}
    p.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(components["scheduler"].config, **extra)
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(n)]
    with torch.no_grad():
        out = p(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                num_images_per_prompt=n, output_type="np", generator=gens, **kw).images
    return (out * 255).round().astype(np.uint8)


def ours(family, sampler: str, n: int = 1, **kw) -> np.ndarray:
    kw = {"steps": STEPS, **kw}
    req = GenerationRequest(PROMPT, NEGATIVE, n=n, seed=SEED, sampler=sampler, guidance_scale=7.5, **kw)
    return generate(family, req).images


def test_euler_ancestral_draws_initial_and_step_noise_from_one_generator(sd1):
    pipe, folder, _, _ = sd1
    family = SDFamily(StableDiffusion.from_pretrained(folder))
    got = ours(family, "Euler a", n=2, height=SIZE, width=SIZE)
    d = max_diff(got, reference(diffusers.StableDiffusionPipeline, pipe.components, "euler_ancestral", n=2,
                                height=SIZE, width=SIZE))
    print(f"txt2img euler_ancestral: max |sumie - diffusers| = {d}/255")
    assert d <= 1
    alone = ours(family, "euler_ancestral", n=1, height=SIZE, width=SIZE)  # seeds: batch invariant
    assert max_diff(alone[0], got[0]) <= 1  # batched matmuls round differently


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "ddim"])
def test_img2img_matches_diffusers(sd1, sampler):
    pipe, folder, _, _ = sd1
    family = SDFamily(StableDiffusion.from_pretrained(folder))
    image = picture()
    got = ours(family, sampler, n=2, init_image=image, strength=0.6)
    ref = reference(diffusers.StableDiffusionImg2ImgPipeline, pipe.components, sampler, n=2, image=image,
                    strength=0.6)
    d = max_diff(got, ref)
    print(f"img2img {sampler} strength 0.6: max |sumie - diffusers| = {d}/255")
    assert d <= 1 and got.shape == (2, SIZE, SIZE, 3)
    assert not np.array_equal(got[0], got[1])


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_checkpoint_matches_diffusers(sd1, sampler, strength):
    pipe, _, folder9, unet9 = sd1
    family = SDFamily(StableDiffusion.from_pretrained(folder9))
    assert family.name == "sd1-inpaint" and family.concat_channels == 5
    image, mask = picture(), square_mask()
    got = ours(family, sampler, init_image=image, mask=mask, strength=strength, mask_blur=0, overlay=False)
    ref = reference(diffusers.StableDiffusionInpaintPipeline, {**pipe.components, "unet": unet9}, sampler,
                    image=image, mask_image=mask, strength=strength, height=SIZE, width=SIZE)
    d = max_diff(got, ref)
    print(f"inpaint 9-channel {sampler} strength {strength}: max |sumie - diffusers| = {d}/255")
    assert d <= 1


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_blended_inpainting_matches_diffusers(sd1, sampler):
    pipe, folder, _, _ = sd1
    family = SDFamily(StableDiffusion.from_pretrained(folder))
    image, mask = picture(), square_mask()
    got = ours(family, sampler, init_image=image, mask=mask, strength=0.75, mask_blur=0, overlay=False)
    ref = reference(diffusers.StableDiffusionInpaintPipeline, pipe.components, sampler, image=image,
                    mask_image=mask, strength=0.75, height=SIZE, width=SIZE)
    d = max_diff(got, ref)
    print(f"inpaint 4-channel (blended) {sampler} strength 0.75: max |sumie - diffusers| = {d}/255")
    assert d <= 1


def test_inpainting_keeps_unmasked_pixels_and_is_batch_invariant(sd1):
    _, folder, folder9, _ = sd1
    image, mask = picture(seed=1), square_mask()
    keep = np.asarray(mask) == 0
    for f in (folder, folder9):
        family = SDFamily(StableDiffusion.from_pretrained(f))
        both = ours(family, "euler_ancestral", n=2, init_image=image, mask=mask, mask_blur=0, steps=6)
        assert np.array_equal(both[:, keep], np.asarray(image)[None, keep].repeat(2, 0))  # the overlay
        assert not np.array_equal(both[0], both[1])
        alone = generate(family, GenerationRequest(PROMPT, NEGATIVE, seed=SEED + 1, steps=6, sampler="euler_ancestral",
                                                   guidance_scale=7.5, init_image=image, mask=mask, mask_blur=0)).images
        assert max_diff(alone[0], both[1]) <= 1


def test_inpainting_checkpoint_needs_a_mask(sd1):
    _, _, folder9, _ = sd1
    family = SDFamily(StableDiffusion.from_pretrained(folder9))
    with pytest.raises(ValueError, match="inpainting model .* give an init image and a mask"):
        generate(family, prompt="a cat", steps=2, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="inpainting model"):
        generate(family, prompt="a cat", steps=2, init_image=picture(), strength=0.5)


def test_outpainting_extends_the_canvas_and_keeps_the_middle(sd1):
    _, _, folder9, _ = sd1
    family = SDFamily(StableDiffusion.from_pretrained(folder9))
    image = picture()
    res = generate(family, GenerationRequest("a cat", steps=4, seed=0, init_image=image, outpaint=(16, 0, 10, 0),
                                             mask_blur=1))
    assert res.images.shape == (1, SIZE, SIZE + 32, 3)  # 10 rounded up to 16: the canvas is a multiple of 16
    inner = res.images[0, :, 16 + 12:16 + SIZE - 12]  # 4 pixels inside the repainted 8-pixel overlap
    assert np.array_equal(inner, np.asarray(image)[:, 12:-12])
    assert any("outpainting" in n for n in res.notes)


# ---------------------------------------------------------------- SDXL


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from test_sd_overrides import clip_tower

    tmp = tmp_path_factory.mktemp("xl")
    folder = tmp / "xl"
    vocab, eos = write_tokenizer(folder / "tokenizer", EOS)
    write_tokenizer(folder / "tokenizer_2", "!")

    def tok(f, pad):
        t = transformers.CLIPTokenizer(str(f / "vocab.json"), str(f / "merges.txt"), pad_token=pad)
        t.model_max_length = 77
        return t

    torch.manual_seed(0)
    unet = _perturb(diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                                   **TINY_UNETS["sdxl"]), 11)
    from test_sd_checkpoints import TINY_VAE

    vae = _perturb(diffusers.AutoencoderKL(sample_size=SIZE, scaling_factor=0.13025, **TINY_VAE), 12)
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=clip_tower(768, 1, vocab, eos), text_encoder_2=clip_tower(1280, 2, vocab, eos,
                                                                                        projection=1280, act="gelu"),
        tokenizer=tok(folder / "tokenizer", EOS), tokenizer_2=tok(folder / "tokenizer_2", "!"), unet=unet,
        scheduler=sched)
    pipe.save_pretrained(folder)
    write_tokenizer(folder / "tokenizer", EOS)
    write_tokenizer(folder / "tokenizer_2", "!")
    return pipe, folder


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_sdxl_img2img_matches_diffusers(sdxl, sampler):
    pipe, folder = sdxl
    family = SDFamily(StableDiffusion.from_pretrained(folder))
    assert family.name == "sdxl"
    image = picture()
    got = ours(family, sampler, n=2, init_image=image, strength=0.6)
    ref = reference(diffusers.StableDiffusionXLImg2ImgPipeline, pipe.components, sampler, n=2, image=image,
                    strength=0.6)
    d = max_diff(got, ref)
    print(f"SDXL img2img {sampler} strength 0.6: max |sumie - diffusers| = {d}/255")
    assert d <= 1


def test_cli_validates_sd_and_sumie_models_alike(sd1, tmp_path, capsys):
    from sumie.cli import main

    _, folder, folder9, _ = sd1
    out = str(tmp_path / "x.png")
    base = ["--steps", "2", "--out", out, "--width", str(SIZE), "--height", str(SIZE)]
    assert main(["generate", "a cat", "--model", str(folder), "--sampler", "euler", "--eta", "0.5"] + base) == 2
    assert "sampler 'euler' takes no eta" in capsys.readouterr().err  # a one-line error, not a TypeError
    assert main(["generate", "a cat", "--model", str(folder9)] + base) == 2
    assert "inpainting model" in capsys.readouterr().err
    picture().save(tmp_path / "in.png")
    square_mask().save(tmp_path / "m.png")
    assert main(["inpaint", "a cat", "--model", str(folder9), "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "m.png"), "--steps", "2", "--out", out]) == 0
    assert "inpaint at strength 1" in capsys.readouterr().out
