"""sumie eval: image folders, runs, sweeps, the shipped feature network, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sumie.cli import main
from sumie.data.shapes import ShapesConfig, ShapesDataset
from sumie.image import to_uint8
from sumie.metrics.evaluate import (ClassLabels, caption_adherence, common_resolution, evaluate_folders,
                                    extract_features, read_folder)
from sumie.metrics.features import DEFAULT_WEIGHTS, SumieFeatureNet
from sumie.metrics.fid import frechet_distance


def _write_shapes(folder, n, seed, size=32, background="plain", captions=False):
    folder.mkdir(parents=True, exist_ok=True)
    ds = ShapesDataset(ShapesConfig(resolution=size, background=background, seed=seed))
    meta = []
    for i in range(n):
        item = ds[i]
        Image.fromarray(to_uint8(item["x"])).save(folder / f"{i:04d}.png")
        meta.append(json.dumps({"file_name": f"{i:04d}.png", "text": item["caption"]}))
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(meta) + "\n")
    return folder


@pytest.fixture(scope="module")
def features():
    return SumieFeatureNet.load()


# -- the shipped feature network -----------------------------------------------

def test_shipped_feature_network_is_small_fp16_and_accurate(features):
    assert DEFAULT_WEIGHTS.stat().st_size < 2 * 2**20
    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        meta = f.metadata()
        assert all(f.get_tensor(k).dtype in (torch.float16, torch.int64) for k in f.keys())
    metrics = json.loads(meta["metrics"])
    assert metrics["clean"]["background"] > 0.9 and metrics["clean"]["count"] > 0.9
    assert features.name == "sumie-features" and features.metric_prefix == "FD_sumie"
    x = torch.rand(5, 3, 48, 48) * 2 - 1
    f = features.features(x)
    assert f.shape == (5, features.dim) and features.dim == 128
    torch.testing.assert_close(f[2:3], features.features(x[2:3]), rtol=1e-4, atol=1e-5)  # eval mode: no batch stats


def test_feature_distance_separates_distributions(features):
    """Two sets of the same scenes are close; textured or blurred sets are far (FD_sumie, 300 images)."""
    def feats(seed, background="plain", blur=False):
        ds = ShapesDataset(ShapesConfig(resolution=32, background=background, seed=seed))
        x = torch.stack([ds[i]["x"] for i in range(300)])
        if blur:
            x = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)  # a 5x5 box blur
        return features.features(x)

    a, b = feats(1), feats(2)
    same = frechet_distance(a, b)
    assert frechet_distance(a, feats(3, "textured")) > 5 * same
    assert frechet_distance(a, feats(2, blur=True)) > 2 * same


def test_wrong_sumie_feature_file_names_the_layer(tmp_path):
    from safetensors.torch import save_file

    net = SumieFeatureNet()
    tensors = {k: v.half() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    tensors["body.2.0.weight"] = torch.zeros(64, 16, 3, 3, dtype=torch.float16)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"format": "sumie.features",
                                                                     "config": json.dumps({"resolution": 32, "widths": [32, 64, 128], "blocks_per_stage": 2})})
    with pytest.raises(ValueError, match=r"layer body\.2\.0\.weight has shape \(64, 16, 3, 3\), expected \(64, 32, 3, 3\)"):
        SumieFeatureNet.load(tmp_path / "bad.safetensors")


# -- folders ------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    gen = _write_shapes(root / "gen", 24, seed=5, captions=True)
    ref = _write_shapes(root / "ref", 30, seed=6, size=48)
    (gen / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a corrupt file
    Image.new("RGB", (40, 30), (255, 255, 255)).save(ref / "odd.png")  # another size
    return gen, ref


def test_folders_report_skips_corrupt_and_resizes_the_same_way(folders):
    gen, ref = folders
    r = evaluate_folders(gen, ref, progress=False, adherence_captions=True)
    assert r["generated"]["n"] == 24 and r["generated"]["corrupt_skipped"] == 1
    assert r["generated"]["corrupt_examples"] == ["broken.png"]
    assert r["reference"]["n"] == 31 and r["reference"]["sizes"] == {"40x30": 1, "48x48": 30}
    assert r["resolution"] == 32  # the smaller median short side
    assert any("resized the same way to 32x32" in n for n in r["notes"])
    assert any("1 unreadable image(s) skipped" in n for n in r["notes"])
    m = r["metrics"]
    assert set(m) == {"FD_sumie", "KID_sumie", "precision_sumie", "recall_sumie", "k"}
    assert "FID" not in json.dumps(m) and r["features"]["name"] == "sumie-features"
    assert r["adherence"]["checked"] == 24 and r["adherence"]["accepted"] > 0.9  # real scenes match their captions


def test_folder_against_itself_is_zero(folders):
    gen, _ = folders
    m = evaluate_folders(gen, gen, progress=False)["metrics"]
    assert abs(m["FD_sumie"]) < 1e-4 and m["precision_sumie"] == 1.0 and m["recall_sumie"] == 1.0


def test_common_resolution_rules(tmp_path):
    a = _write_shapes(tmp_path / "a", 2, 0, size=32)
    b = _write_shapes(tmp_path / "b", 2, 0, size=32)
    assert common_resolution(read_folder(a), read_folder(b)) is None  # same size: left alone
    c = _write_shapes(tmp_path / "c", 3, 0, size=64)
    assert common_resolution(read_folder(a), read_folder(c)) == 32


def test_too_few_images_is_a_clear_error(tmp_path, capsys):
    a = _write_shapes(tmp_path / "a", 3, 0)
    b = _write_shapes(tmp_path / "b", 10, 1)
    assert main(["eval", "--generated", str(a), "--reference", str(b), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "at least 4 images per set" in err and "the generated set has 3" in err


def test_empty_or_all_corrupt_folder(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not an image")
    b = _write_shapes(tmp_path / "b", 5, 1)
    assert main(["eval", "--generated", str(tmp_path / "bad"), "--reference", str(b), "--no-progress"]) == 2
    assert "no readable images" in capsys.readouterr().err and True


def test_cli_folders_json_report(folders, tmp_path):
    gen, ref = folders
    out = tmp_path / "report.json"
    assert main(["eval", "--generated", str(gen), "--reference", str(ref), "--out", str(out), "--no-progress",
                 "--kid-subsets", "10"]) == 0
    r = json.loads(out.read_text())
    assert r["metrics"]["KID_sumie"]["subset_size"] == 24 and r["metrics"]["KID_sumie"]["subsets"] == 10


def test_inception_features_through_the_cli(tmp_path, capsys):
    """The FID code path with a random-weight Inception file; a sumie file in its place names the layer."""
    from sumie.nn.inception import FIDInceptionV3

    torch.manual_seed(0)
    w = tmp_path / "pt_inception.pth"
    torch.save(FIDInceptionV3().state_dict(), w)
    a, b = _write_shapes(tmp_path / "a", 5, 0), _write_shapes(tmp_path / "b", 5, 1)
    out = tmp_path / "r.json"
    assert main(["eval", "--generated", str(a), "--reference", str(b), "--features", "inception",
                 "--inception-weights", str(w), "--out", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert set(r["metrics"]) == {"FID", "KID", "precision", "recall", "k"} and r["features"]["dim"] == 2048
    assert main(["eval", "--generated", str(a), "--reference", str(b), "--features", "inception",
                 "--inception-weights", str(DEFAULT_WEIGHTS), "--no-progress"]) == 2
    assert "layer 'Conv2d_1a_3x3.conv.weight'" in capsys.readouterr().err
    assert main(["eval", "--generated", str(a), "--reference", str(b), "--features", "inception"]) == 2
    assert "--inception-weights" in capsys.readouterr().err


# -- runs and sweeps ----------------------------------------------------------

@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", "--max-steps", "4"]) == 0
    return run


def test_eval_run_report(class_run, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", str(class_run), "--n", "8", "--steps", "3", "--sampler", "euler", "--guidance", "2",
                 "--out", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    (row,) = r["results"]
    assert (row["sampler"], row["steps"], row["guidance_scale"]) == ("euler", 3, 2.0)
    assert row["nfe_per_image"] == 6.0  # 3 Euler steps, two evaluations each under guidance
    assert set(row["metrics"]) >= {"FD_sumie", "KID_sumie"} and row["adherence"]["checked"] == 8
    assert r["reference"]["adherence"]["accepted"] > 0.9 and r["conditions"]["kind"] == "class labels"
    assert r["checkpoint"].startswith("ckpt-")


def test_eval_sweep_writes_table_and_plot(class_run, tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["eval", "sweep", str(class_run), "--n", "6", "--steps", "2,3", "--sampler", "euler,heun",
                 "--guidance", "1", "--out", str(out), "--no-progress"]) == 0
    r = json.loads((out / "sweep.json").read_text())
    assert [(x["sampler"], x["steps"]) for x in r["results"]] == [("euler", 2), ("euler", 3), ("heun", 2), ("heun", 3)]
    assert [x["nfe_per_image"] for x in r["results"]] == [2.0, 3.0, 3.0, 5.0]
    table = (out / "sweep.md").read_text()
    assert table.count("\n| ") == 4 + 1 - 1 and "FD_sumie" in table
    assert Image.open(out / "sweep.png").size[0] > 600


def test_eval_run_errors(class_run, capsys):
    assert main(["eval", str(class_run), "--n", "3", "--no-progress"]) == 2
    assert "at least 4 images per set" in capsys.readouterr().err
    assert main(["eval", str(class_run), "--steps", "2,3", "--no-progress"]) == 2
    assert "sweep" in capsys.readouterr().err
    assert main(["eval", "sweep", str(class_run), "--steps", "0", "--n", "4", "--no-progress"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err


def test_caption_adherence_counts_objects():
    ds = ShapesDataset(ShapesConfig(resolution=32, max_objects=2, min_objects=1, seed=3))
    x = torch.stack([ds[i]["x"] for i in range(12)])
    caps = [ds[i]["caption"] for i in range(12)]
    r = caption_adherence(x, caps + ["not a shapes caption"] if False else caps)
    assert r["checked"] == 12 and r["accepted"] > 0.9 and set(r["by_objects"]) <= {"1", "2"}
    wrong = caption_adherence(x.flip(-1), caps)  # mirrored scenes: objects in other cells
    assert wrong["accepted"] < r["accepted"]
    r = caption_adherence(x[:2], ["an elephant", caps[1]])
    assert r["unparsable_captions"] == 1 and r["checked"] == 1


def test_class_label_source_conditions_and_adherence():
    src = ClassLabels([0, 5, 7])
    cond, uncond = src.conds(1, 3)
    assert cond["class_labels"].tolist() == [5, 7] and uncond["class_labels"].tolist() == [-1, -1]
    assert src.describe()["distinct"] == 3


def test_eval_caption_run_and_attention(tmp_path):
    run = tmp_path / "text"
    assert main(["train", "--preset", "tiny-text", "--out", str(run), "--no-progress", "--max-steps", "2"]) == 0
    out = tmp_path / "r.json"
    assert main(["eval", str(run), "--n", "4", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["conditions"]["kind"] == "captions" and r["results"][0]["adherence"]["checked"] == 4
    assert main(["explain", "attention", str(run), "--prompt", "a small red star in the center", "--steps", "2",
                 "--out", str(tmp_path / "att")]) == 0
    assert (tmp_path / "att" / "attention.png").is_file()


def test_extract_features_accepts_uint8_and_float(features):
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    u8 = torch.from_numpy(to_uint8(x))
    a = extract_features(features, u8, batch_size=2)
    b = extract_features(features, torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 127.5 - 1)
    torch.testing.assert_close(a, b)
    assert np.isfinite(a.numpy()).all()
