"""img2img, inpainting and outpainting with sumie's own models through the one pipeline, and
what happens on bad input (odd image modes, EXIF, mismatched/empty/full masks, sizes, strength)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sumie.cli import main
from sumie.generation import GenerationRequest, SumieFamily, generate, load_family
from sumie.generation import images as im

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def family():
    return load_family(None)  # the bundled emoji-64 model (latent, 64 px)


def picture(size: int = 64, seed: int = 0) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)


def mask_of(size: int = 64) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[16:48, 16:40] = 255
    return Image.fromarray(m)


def run(family, **kw):
    return generate(family, GenerationRequest(**{"prompt": "a red apple", "steps": 3, "sampler": "euler", **kw}))


def test_the_bundled_model_is_a_family_with_defaults(family):
    assert isinstance(family, SumieFamily) and family.defaults.height == 64 and family.latent_factor > 1


def test_img2img_strength_runs_int_steps_times_strength_and_seeds_like_txt2img(family):
    calls = []
    res = run(family, init_image=picture(), strength=0.5, steps=8, n=2, callback=lambda info: calls.append(info.i))
    assert res.images.shape == (2, 64, 64, 3) and res.settings["mode"] == "img2img"
    assert calls == [0, 1, 2, 3]  # int(8 x 0.5) euler steps, the batch in one call each
    alone = run(family, init_image=picture(), strength=0.5, steps=8, seed=1)
    assert np.abs(alone.images[0].astype(int) - res.images[1].astype(int)).max() <= 1
    # variations: small strength stays close to the image, large strength moves away
    near = run(family, init_image=picture(), strength=0.2, steps=10).images[0].astype(int)
    far = run(family, init_image=picture(), strength=0.9, steps=10).images[0].astype(int)
    src = np.asarray(picture()).astype(int)
    assert np.abs(near - src).mean() < np.abs(far - src).mean()
    same = run(family, init_image=picture(), strength=0.0)
    assert np.array_equal(same.images[0], np.asarray(picture())) and "strength 0" in same.notes[0]


def test_inpainting_keeps_the_unmasked_pixels(family):
    image, mask = picture(), mask_of()
    res = run(family, init_image=image, mask=mask, mask_blur=0)
    keep = np.asarray(mask) == 0
    assert np.array_equal(res.images[0][keep], np.asarray(image)[keep])
    assert not np.array_equal(res.images[0][~keep], np.asarray(image)[~keep])
    for fill in ("fill", "latent_noise", "latent_nothing"):
        assert run(family, init_image=image, mask=mask, inpaint_fill=fill).images.shape == (1, 64, 64, 3)
    inv = run(family, init_image=image, mask=mask, mask_blur=0, invert_mask=True)
    assert np.array_equal(inv.images[0][~keep], np.asarray(image)[~keep])
    # RePaint resampling makes more denoiser calls and still keeps the known pixels
    rp = run(family, init_image=image, mask=mask, mask_blur=0, resample=2)
    assert np.array_equal(rp.images[0][keep], np.asarray(image)[keep])


def test_only_masked_works_on_the_region_and_pastes_it_back(family):
    image = picture(128)
    m = np.zeros((128, 128), np.uint8)
    m[70:90, 80:100] = 255
    res = run(family, init_image=image, mask=Image.fromarray(m), only_masked=True, only_masked_padding=8,
              mask_blur=0, width=64, height=64)
    assert res.images.shape == (1, 128, 128, 3)
    assert np.array_equal(res.images[0][m == 0], np.asarray(image)[m == 0])
    assert any("only masked" in n for n in res.notes)


def test_outpainting_grows_the_canvas(family):
    res = run(family, init_image=picture(), outpaint=(0, 0, 32, 16), mask_blur=0)
    assert res.images.shape == (1, 64 + 16, 64 + 32, 3)
    assert np.array_equal(res.images[0, :56, :56], np.asarray(picture())[:56, :56])  # 8 px overlap repainted


def test_bad_masks_are_resized_or_explained(family):
    image = picture()
    res = run(family, init_image=image, mask=mask_of(32))
    assert any("mask 32x32 resized to the image's 64x64" in n for n in res.notes)
    empty = run(family, init_image=image, mask=Image.new("L", (64, 64), 0))
    assert np.array_equal(empty.images[0], np.asarray(image)) and "empty" in empty.notes[0]
    full = run(family, init_image=image, mask=Image.new("L", (64, 64), 255))
    assert "whole image" in " ".join(full.notes)


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "L", "CMYK", "LA", "F"])
def test_images_in_every_pil_mode_load_as_rgb(mode):
    rgb = picture()
    img = rgb.convert("L").convert(mode) if mode in ("I;16", "F", "LA") else rgb.convert(mode)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)
        assert img.mode == "I;16"
    out = im.load_image(img)
    assert out.mode == "RGB" and out.size == (64, 64)
    if mode in ("L", "I;16", "LA", "F"):
        assert np.abs(np.asarray(out)[..., 0].astype(int) - np.asarray(rgb.convert("L")).astype(int)).max() <= 1
    assert im.load_mask(img).mode == "L"


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    buf.seek(0)
    assert im.load_image(Image.open(buf)).size == (20, 40)


def test_a_transparent_mask_is_read_by_its_alpha():
    a = np.full((8, 8, 4), 255, np.uint8)
    a[2:4, 2:4, 3] = 0  # transparent = repaint
    m = np.asarray(im.load_mask(Image.fromarray(a, "RGBA")))
    assert m[2, 2] == 255 and m[0, 0] == 0


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
def test_resize_modes(mode):
    img = Image.fromarray(np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3))
    assert im.fit(img, 32, 32, mode).size == (32, 32)


def test_bad_requests_fail_before_work_with_one_line(family):
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        run(family, init_image=picture(), strength=1.5)
    with pytest.raises(ValueError, match="strength applies to an init image"):
        run(family, strength=0.5)
    with pytest.raises(ValueError, match="a mask needs the image"):
        run(family, mask=mask_of())
    with pytest.raises(ValueError, match=r"too large for this model .*--width \d+ --height \d+"):
        run(family, init_image=picture(1024))
    with pytest.raises(ValueError, match="runs no step"):
        run(family, init_image=picture(), strength=0.1, steps=3)
    with pytest.raises(ValueError, match="takes no eta"):
        run(family, eta=0.5)
    with pytest.raises(ValueError, match="multiples of"):
        run(family, width=60, height=64)


def test_cli_img2img_inpaint_outpaint(tmp_path, capsys):
    src, mask = tmp_path / "in.png", tmp_path / "mask.png"
    picture().save(src)
    mask_of(48).save(mask)
    base = ["--steps", "2", "--sampler", "euler"]
    assert main(["img2img", "an apple", "--image", str(src), "--strength", "0.5", "--out", str(tmp_path / "a.png"),
                 "--n", "2", "--each"] + base) == 0
    out = capsys.readouterr().out
    assert "img2img at strength 0.5" in out and (tmp_path / "a-0001.png").is_file()
    assert main(["inpaint", "an apple", "--image", str(src), "--mask", str(mask), "--out",
                 str(tmp_path / "b.png")] + base) == 0
    captured = capsys.readouterr()
    assert "inpaint" in captured.out and "resized" in captured.err
    assert main(["outpaint", "an apple", "--image", str(src), "--right", "16", "--out", str(tmp_path / "c.png")]
                + base) == 0
    assert Image.open(tmp_path / "c.png").size == (80, 64)
    assert main(["img2img", "x", "--image", str(src), "--strength", "2", "--out", str(tmp_path / "d.png")]) == 2
    assert "strength must be in [0, 1]" in capsys.readouterr().err
    assert main(["inpaint", "x", "--image", str(tmp_path / "nope.png"), "--mask", str(mask), "--out",
                 str(tmp_path / "e.png")] + base) == 2
    assert "no such file" in capsys.readouterr().err
