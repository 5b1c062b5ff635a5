import json

import numpy as np
import pytest
import torch
from PIL import Image

from sumie.cli import main
from sumie.io.checkpoint import latest_checkpoint, load_tensors
from sumie.latent import LatentSpace, load_vae, read_vae_config
from sumie.train.vae import VAETrainer, _images, resolve_vae_config, train_and_heldout, train_vae


@pytest.fixture
def tiny_vae_config():
    cfg = resolve_vae_config("tiny")
    cfg.train.max_steps = 12
    cfg.train.ckpt_every = 6
    cfg.train.scale_images = 32
    cfg.train.eval_images = 16
    return cfg


def _image_folder(root, n, split_every=None):
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = np.full((24, 24, 3), 255, np.uint8)
        img[4:20, 4:20] = rng.integers(0, 255, 3, dtype=np.uint8)  # a flat square on white
        Image.fromarray(img).save(root / f"{i}.png")
        split = "heldout" if split_every and i % split_every == 0 else "train"
        rows.append(json.dumps({"file_name": f"{i}.png", "text": "square", "split": split}))
    if split_every:
        (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_loss_falls_and_the_run_writes_scale_and_psnr(tiny_vae_config, tmp_path):
    tiny_vae_config.train.max_steps = 60
    tiny_vae_config.train.ckpt_every = 30
    trainer = VAETrainer(tiny_vae_config, tmp_path / "run", progress=False)
    x = trainer.heldout_images()[:8]

    def rec_error():
        with torch.no_grad():
            return float((trainer.vae.decode(trainer.vae.encode(x).mode()) - x).abs().mean())

    before = rec_error()
    res = trainer.run()
    assert res.step == 60 and res.status == "finished"
    assert rec_error() < 0.6 * before
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["heldout"]["psnr_db"] > 10 and report["heldout"]["images"] == 16
    assert report["heldout"]["source"].startswith("shapes")
    cfg = read_vae_config(run / "vae")  # the measured scale lives in the exported autoencoder's config
    assert cfg.scaling_factor == pytest.approx(report["latent"]["scaling_factor"])
    assert cfg.shift_factor == pytest.approx(report["latent"]["shift_factor"])
    assert cfg.scaling_factor == pytest.approx(1 / report["latent"]["latent_std"])
    assert (run / "recon.png").is_file() and (run / "log.jsonl").is_file()


def test_scale_factor_gives_unit_variance_training_latents(tiny_vae_config, tmp_path):
    train_vae(tiny_vae_config, tmp_path / "run", progress=False)
    space = LatentSpace(load_vae(tmp_path / "run"))  # a run folder resolves to its vae/
    ds, _, _ = train_and_heldout(tiny_vae_config.data, 0.05)
    x = torch.stack([ds[i]["x"] for i in range(1000, 1064)])  # training images the scale was not measured on
    z = space.encode(x)
    assert z.shape == (64, 4, 8, 8)
    assert 0.8 < float(z.std()) < 1.25 and abs(float(z.mean())) < 0.3
    assert torch.allclose(space.decode(z), space.vae.decode(z / space.scale + space.shift))


def test_resume_with_discriminator_reproduces_the_uninterrupted_run(tiny_vae_config, tmp_path):
    tiny_vae_config.loss.disc_start = 3
    tiny_vae_config.loss.l2_weight = 1.0
    full = train_vae(tiny_vae_config, tmp_path / "a", progress=False)
    first = train_vae(tiny_vae_config, tmp_path / "b", progress=False, max_steps=6)
    rest = VAETrainer(tiny_vae_config, tmp_path / "b", resume=True, progress=False).run()
    assert first.step == 6 and rest.step == 12
    assert first.losses + rest.losses == full.losses  # bit-identical, discriminator included
    for name in ("ema.safetensors", "disc.safetensors"):
        wa = load_tensors(latest_checkpoint(tmp_path / "a") / name)
        wb = load_tensors(latest_checkpoint(tmp_path / "b") / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert "d" in log[-1] and "g_weight" in log[-1]


def test_heldout_split_from_metadata_or_hash(tmp_path):
    d = resolve_vae_config("tiny").data
    d.kind, d.resolution = "folder", 16
    d.path = str(_image_folder(tmp_path / "split", 12, split_every=4))
    train, held, how = train_and_heldout(d, 0.05)
    assert "metadata" in how and len(held) == 3 and len(train) == 9
    assert not {p.name for p in held.paths} & {p.name for p in train.paths}
    d.path = str(_image_folder(tmp_path / "plain", 40))
    train, held, how = train_and_heldout(d, 0.25)
    assert "hashed" in how and len(train) + len(held) == 40 and 1 <= len(held) < 20
    assert not {p.name for p in held.paths} & {p.name for p in train.paths}
    assert not held.random_flip
    train2, held2, _ = train_and_heldout(d, 0.25)
    assert [p.name for p in held2.paths] == [p.name for p in held.paths]  # stable
    assert _images(held, 2).shape == (2, 3, 16, 16)


def test_cli_train_vae_on_a_folder_and_config_errors(tmp_path, capsys):
    folder = _image_folder(tmp_path / "imgs", 10, split_every=5)
    run = tmp_path / "run"
    assert main(["train-vae", "--preset", "tiny", "--out", str(run), "--no-progress", "--max-steps", "3",
                 "--set", "data.kind=folder", f"--set=data.path={folder}", "--set", "data.resolution=16",
                 "--set", "train.scale_images=8"]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "latent scale" in out and (run / "vae" / "vae.safetensors").is_file()
    assert main(["train-vae", "--out", str(run), "--resume", "--no-progress", "--max-steps", "5"]) == 0
    assert latest_checkpoint(run).name == "ckpt-0000005"
    assert main(["train-vae", "--out", str(tmp_path / "x"), "--set", "loss.perceptual=1"]) == 2
    assert "unknown key(s) 'perceptual' in [loss]" in capsys.readouterr().err
    assert main(["train-vae", "--out", str(tmp_path / "x"), "--set", "data.resolution=30"]) == 2
    assert "multiple of the autoencoder's downsampling factor 4" in capsys.readouterr().err
