import numpy as np
import pytest
from PIL import Image

from sumie.cli import main


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", "--max-steps", "6"]) == 0
    return run


def test_sample_writes_grid_and_singles(trained_run, tmp_path, capsys):
    grid, singles = tmp_path / "g.png", tmp_path / "singles"
    assert main(["sample", str(trained_run), "--n", "4", "--steps", "3", "--out", str(grid),
                 "--singles", str(singles), "--scale", "1"]) == 0
    img = Image.open(grid)
    assert img.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 grid of 16 px with 2 px padding
    assert sorted(p.name for p in singles.iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "ddim", "ddpm", "heun"])
def test_every_sampler_from_the_cli(trained_run, tmp_path, sampler):
    args = ["sample", str(trained_run), "--n", "2", "--steps", "3", "--out", str(tmp_path / "g.png"),
            "--sampler", sampler, "--shape", "circle", "--color", "red", "--guidance-scale", "2"]
    if sampler == "ddim":
        args += ["--eta", "0.5"]
    assert main(args) == 0


def test_same_seed_same_image(trained_run, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        assert main(["sample", str(trained_run), "--n", "2", "--steps", "3", "--out", str(out),
                     "--sampler", "ddpm", "--seed", "5"]) == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.parametrize("args,msg", [
    (["--sampler", "dpm_fast"], "valid: ddim"),
    (["--schedule", "cosine"], "valid: karras"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--guidance-scale", "-1"], "guidance scale must be >= 0"),
    (["--shape", "hexagram", "--color", "red"], "hexagram"),
    (["--eta", "0.3", "--sampler", "heun"], "takes no eta"),
])
def test_sample_errors_are_clear(trained_run, tmp_path, capsys, args, msg):
    assert main(["sample", str(trained_run), "--n", "2", "--out", str(tmp_path / "g.png"), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()  # nothing half-written


def test_sample_from_a_folder_without_checkpoints(tmp_path, capsys):
    assert main(["sample", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_unknown_config_key_from_the_cli(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", "train.epochs=3"]) == 2
    assert "valid keys:" in capsys.readouterr().err


def test_explain_forward(tmp_path):
    src = tmp_path / "in.png"
    yy, xx = np.mgrid[0:40, 0:60]
    Image.fromarray(np.stack([xx * 4, yy * 6, 255 - xx * 4], -1).astype(np.uint8)).save(src)
    assert main(["explain", "forward", str(src), "--out", str(tmp_path / "ex"), "--size", "32", "--frames", "5"]) == 0
    strip = Image.open(tmp_path / "ex" / "forward_strip.png")
    assert strip.size[0] > 6 * 32
    gif = Image.open(tmp_path / "ex" / "forward.gif")
    assert gif.n_frames > 10
    # the first frame is (nearly) the clean image, the last nearly pure noise
    gif.seek(0)
    first = np.asarray(gif.convert("RGB"), dtype=float)
    gif.seek(gif.n_frames - 1)
    last = np.asarray(gif.convert("RGB"), dtype=float)
    clean = np.asarray(Image.open(src).convert("RGB").resize((32, 32)), dtype=float)
    assert np.abs(first - clean).mean() < 20 and np.abs(last - clean).mean() > 40
    assert main(["explain", "forward", str(tmp_path / "missing.png")]) == 2
