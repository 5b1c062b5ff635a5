import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sumie.cli import main
from sumie.config import preset
from sumie.io.checkpoint import latest_checkpoint
from sumie.latent import (LatentSpace, PixelSpace, decode_samples, load_space, load_vae, read_vae_config, save_vae,
                          training_space)
from sumie.models import export_model, load_model
from sumie.nn.vae import AutoencoderKL, VAEConfig
from sumie.train.loop import Trainer, train


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A briefly trained tiny kl-f4 autoencoder folder with a measured scale."""
    from sumie.train.vae import resolve_vae_config, train_vae

    cfg = resolve_vae_config("tiny", overrides=["train.max_steps=20", "train.ckpt_every=0", "train.scale_images=32",
                                                "train.eval_images=8"])
    run = tmp_path_factory.mktemp("vae") / "run"
    train_vae(cfg, run, progress=False)
    return run / "vae"


@pytest.fixture
def latent_config(vae_dir):
    cfg = preset("tiny-latent")
    cfg.latent.vae = str(vae_dir)
    cfg.train.max_steps = 10
    cfg.train.ckpt_every = 5
    return cfg


def test_pixel_space_is_the_identity():
    space = PixelSpace()
    x = torch.randn(2, 3, 16, 16)
    assert space.encode(x) is x and space.decode(x) is x and decode_samples(space, x) is x
    assert space.latent_shape(16) == (3, 16, 16)


def test_latent_space_shapes_scale_and_shift(tmp_path):
    cfg = VAEConfig(**{**VAEConfig.tiny().to_dict(), "scaling_factor": 2.0, "shift_factor": 0.25})
    vae = AutoencoderKL(cfg)
    save_vae(tmp_path / "v", vae)
    space = LatentSpace(load_vae(tmp_path / "v"))
    assert (space.scale, space.shift, space.channels, space.downsampling_factor) == (2.0, 0.25, 4, 4)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = space.encode(x)
    assert z.shape == (3, *space.latent_shape(32)) == (3, 4, 8, 8)
    assert torch.allclose(z, (vae.encode(x).mean - 0.25) * 2.0, atol=1e-5)
    assert decode_samples(space, z, batch_size=2).shape == x.shape
    with pytest.raises(ValueError, match="multiple of the autoencoder's downsampling factor 4"):
        space.latent_shape(30)
    sampled = LatentSpace(space.vae, sample_posterior=True)
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(sampled.encode(x, generator=g), z)


def test_latent_run_trains_is_self_contained_and_samples_pixels(latent_config, vae_dir, tmp_path):
    latent_config.train.sample_every = 10
    latent_config.train.sample_n = 4
    run = tmp_path / "run"
    trainer = Trainer(latent_config, run, progress=False)
    x = trainer.get_batch(10_000, 0)["x"]
    z = trainer.space.encode(x)
    assert z.shape == (16, 4, 8, 8) and 0.5 < float(z.std()) < 2.0  # scaled latents

    def eval_loss():
        with torch.no_grad():
            return float(trainer.loss_fn(trainer.denoiser, z, {"class_labels": x.new_zeros(16, dtype=torch.long)},
                                         generator=torch.Generator().manual_seed(0)).mean())

    before = eval_loss()
    res = trainer.run(max_steps=10)
    assert res.step == 10 and all(np.isfinite(res.losses)) and eval_loss() < before
    assert (run / "vae" / "vae.json").is_file()
    with Image.open(run / "samples" / "step-0000010.png") as im:  # 2x2 grid of decoded 32x32 images, upscaled x2
        assert im.size == (2 * (2 * 32 + 3 * 2),) * 2
    # the run folder alone is enough: move the source autoencoder away
    moved = tmp_path / "moved"
    shutil.copytree(vae_dir, moved)
    shutil.rmtree(vae_dir)
    try:
        space = load_space(run)
        assert isinstance(space, LatentSpace) and space.scale == read_vae_config(run / "vae").scaling_factor
        singles = tmp_path / "singles"
        assert main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png"),
                     "--singles", str(singles)]) == 0
        with Image.open(singles / "0000.png") as im:
            assert im.size == (32, 32)
        den, cfg = load_model(run)
        assert cfg.model.in_channels == 4 and cfg.latent.vae == str(vae_dir)
        rest = Trainer(cfg, run, resume=True, progress=False).run(max_steps=12)  # resumes from the run's own copy
        assert rest.step == 12 and latest_checkpoint(run).name == "ckpt-0000012"
        exported = export_model(run, tmp_path / "exported")  # the inference folder carries the autoencoder too
        assert (exported / "vae.safetensors").is_file()
        assert load_space(exported).latent_shape(32) == (4, 8, 8)
        assert main(["sample", str(exported), "--n", "1", "--steps", "2", "--out", str(tmp_path / "e.png")]) == 0
    finally:
        shutil.copytree(moved, vae_dir)


def test_pixel_runs_keep_pixel_space(tiny_config, tmp_path):
    tiny_config.train.max_steps = 2
    train(tiny_config, tmp_path / "run", progress=False)
    assert isinstance(load_space(tmp_path / "run"), PixelSpace)
    assert not (tmp_path / "run" / "vae").exists()


def test_config_errors_for_channels_and_missing_vae(latent_config, vae_dir, tmp_path, capsys):
    bad = preset("tiny-latent")
    bad.latent.vae = str(vae_dir)
    bad.model.in_channels = bad.model.out_channels = 3
    with pytest.raises(ValueError, match=r"must equal the autoencoder's latent channels \(4\)"):
        training_space(bad, tmp_path / "a")
    bad.latent.vae = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no such autoencoder folder"):
        training_space(bad, tmp_path / "a")
    (tmp_path / "empty").mkdir()
    bad.latent.vae = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="holds no autoencoder"):
        training_space(bad, tmp_path / "a")
    with pytest.raises(ValueError, match="pixel-space run"):
        training_space(preset("tiny-latent"), tmp_path / "a")  # 4 channels but no latent.vae
    for args, msg in ((["--set", "model.in_channels=3", "--set", "model.out_channels=3"], "latent channels (4)"),
                      (["--set", f"latent.vae={tmp_path / 'nope'}"], "no such autoencoder folder"),
                      (["--set", "data.resolution=30"], "downsampling factor 4")):
        code = main(["train", "--preset", "tiny-latent", "--out", str(tmp_path / "r"), "--no-progress",
                     "--set", f"latent.vae={vae_dir}", *args])
        assert code == 2 and msg in capsys.readouterr().err


def test_text_to_image_in_latent_space_generates_explains_and_exports(vae_dir, tmp_path):
    """A caption-conditioned latent model: generate, explain reverse/attention at pixel size, export with its VAE."""
    from sumie import explain
    from sumie.generate import TextToImage

    cfg = preset("tiny-text")
    cfg.model.in_channels = cfg.model.out_channels = 4
    cfg.data.resolution = 32
    cfg.latent.vae = str(vae_dir)
    cfg.train.max_steps = 4
    cfg.train.ckpt_every = 4
    train(cfg, tmp_path / "run", progress=False)
    out = export_model(tmp_path / "run", tmp_path / "model")
    assert (out / "vae.safetensors").is_file()
    g = TextToImage.load(out)("a red circle", n=2, steps=3, sampler="euler")
    assert g.images.shape == (2, 32, 32, 3)
    att = np.asarray(Image.open(explain.explain_attention(out, "a red circle", tmp_path / "x", steps=2,
                                                          scale=1)["attention"]))
    assert att.shape[0] >= 32  # tiles of the 32-px image, not of the 8-px latent
    rev = explain.explain_reverse(out, tmp_path / "y", prompt="a red circle", steps=2, scale=1)
    assert Image.open(rev["strip"]).size[1] >= 2 * 32
