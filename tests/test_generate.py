"""`sumie generate` / `sumie export`: text to image from exported (fp16) model folders and the bundled model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sumie.io import checkpoint
from sumie import generate as gen
from sumie.cli import main
from sumie.config import preset
from sumie.models import TEXT_FILES, export_model, load_model
from sumie.train.loop import train


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    cfg = preset("tiny-text")
    cfg.train.max_steps = 8
    cfg.train.ckpt_every = 8
    run = tmp_path_factory.mktemp("run")
    train(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def exported(text_run, tmp_path_factory):
    return export_model(text_run, tmp_path_factory.mktemp("export") / "model",
                        extra_files={"MODEL_CARD.md": "# test card\n"})


def test_export_writes_fp16_weights_that_load_like_the_run(text_run, exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        ["config.json", "ema.safetensors", TEXT_FILES["ema"], TEXT_FILES["tokenizer"], "MODEL_CARD.md"])
    with safe_open(str(exported / "ema.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    full, _ = load_model(text_run)
    half, _ = load_model(exported)
    for (k, a), (_, b) in zip(full.net.state_dict().items(), half.net.state_dict().items()):
        assert b.dtype == torch.float32, k  # computed in fp32 on the CPU
        torch.testing.assert_close(a.half().float(), b)
    with pytest.raises(Exception, match="only the EMA weights"):
        load_model(exported, ema=False)


def test_generate_is_seeded_per_image_and_matches_run_and_export_closely(text_run, exported):
    run_model, model = gen.TextToImage.load(text_run), gen.TextToImage.load(exported)
    both = model("a red circle", n=2, seed=5, steps=4, sampler="euler")
    alone = model("a red circle", n=1, seed=6, steps=4, sampler="euler")
    assert both.images.shape == (2, 16, 16, 3) and both.images.dtype == np.uint8
    np.testing.assert_array_equal(both.images[1], alone.images[0])
    assert not np.array_equal(both.images[0], both.images[1])
    full = run_model("a red circle", n=2, seed=5, steps=4, sampler="euler")
    assert np.abs(full.images.astype(int) - both.images.astype(int)).max() <= 8  # fp16 rounding of the weights
    assert both.settings["guidance_scale"] == model.config.sample.guidance_scale


def test_cli_generate_writes_png_grid_and_singles(exported, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a blue square", "--model", str(exported), "--out", str(out), "--steps", "3",
                 "--n", "3", "--each", "--scale", "2"]) == 0
    msg = capsys.readouterr().out
    assert "3 image(s) of 16x16" in msg and " 3 steps" in msg
    assert Image.open(out).size[0] > 32  # a grid of 3, upscaled
    for i in range(3):
        assert Image.open(tmp_path / f"img-{i:04d}.png").size == (32, 32)
    assert main(["generate", "", "--model", str(exported), "--out", str(tmp_path / "u.png"), "--steps", "2"]) == 0
    assert "generating unconditionally" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "steps must be >= 1"),
    (["--guidance-scale", "-1"], "guidance scale must be >= 0"),
    (["--sampler", "hexagram"], "valid:"),
    (["--out", "x.jpg"], "must name a .png"),
    (["--n", "0"], "n must be >= 1"),
])
def test_cli_generate_errors_are_clear(exported, tmp_path, capsys, args, message):
    argv = ["generate", "a red circle", "--model", str(exported)] + args
    if "--out" not in args:
        argv += ["--out", str(tmp_path / "o.png")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_generate_refuses_class_models_and_a_missing_bundle(tmp_path, tiny_config, monkeypatch, capsys):
    train(tiny_config, tmp_path / "cls", progress=False, max_steps=2)
    assert main(["generate", "a red circle", "--model", str(tmp_path / "cls"), "--out", str(tmp_path / "o.png")]) == 2
    assert "not a text-to-image model" in capsys.readouterr().err
    monkeypatch.setattr(checkpoint, "BUNDLED_MODEL", tmp_path / "nowhere")
    assert main(["generate", "a red circle", "--out", str(tmp_path / "o.png")]) == 2
    assert "bundled model is not installed" in capsys.readouterr().err


@pytest.mark.skipif(not (gen.BUNDLED_MODEL / "config.json").is_file(), reason="the bundled model is not built yet")
def test_bundled_model_is_small_fp16_documented_and_draws(tmp_path):
    files = list(gen.BUNDLED_MODEL.iterdir())
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    assert (gen.BUNDLED_MODEL / "MODEL_CARD.md").read_text().count("icens") >= 1  # licences named in the card
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as st:
                assert all(st.get_tensor(k).dtype == torch.float16 for k in st.keys()), f
    cfg = json.loads((gen.BUNDLED_MODEL / "config.json").read_text())
    assert cfg["data"]["conditioning"] == "caption"
    out = tmp_path / "apple.png"
    assert main(["generate", "a red apple", "--out", str(out), "--steps", "6"]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (64, 64, 3) and img.std() > 10  # a picture, not a flat field


def test_long_weighted_unicode_prompts_generate(exported):
    model = gen.TextToImage.load(exported)
    long = " ".join(["a (red:1.3) circle at the top left and a [blue] square"] * 4)  # > one 24-token window
    g = model([long, "猫 (( unbalanced", ""], steps=2, sampler="euler")
    assert g.images.shape == (3, 16, 16, 3)
