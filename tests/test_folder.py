import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from sumie.data import build_dataset
from sumie.data.folder import ImageFolderDataset


def _img(path, w=40, h=24, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode).save(path)
    return path


def test_captions_from_metadata_and_txt_and_recursive(tmp_path):
    _img(tmp_path / "a.png", seed=1)
    _img(tmp_path / "b.jpg", seed=2)
    _img(tmp_path / "sub" / "c.webp", seed=3)
    _img(tmp_path / "sub" / "d.png", seed=4)
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a red circle"}) + "\n\n"
        + json.dumps({"file_name": "sub/c.webp", "text": "from metadata"}) + "\n")
    (tmp_path / "b.txt").write_text("  a caption from a txt file\n")
    (tmp_path / "sub" / "c.txt").write_text("metadata wins over txt")
    ds = ImageFolderDataset(tmp_path, 16, random_flip=False)
    got = {p.name: c for p, c in zip(ds.paths, ds.captions)}
    assert got == {"a.png": "a red circle", "b.jpg": "a caption from a txt file", "c.webp": "from metadata",
                   "d.png": ""}
    batch = default_collate([ds[i] for i in range(len(ds))])
    assert batch["x"].shape == (4, 3, 16, 16) and batch["x"].dtype == torch.float32
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1 and (batch["label"] == -1).all()


def test_resize_center_crop_alpha_and_grayscale(tmp_path):
    # left half red, right half blue, 60x20: the centre crop of the resized image is half red, half blue
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    _img(tmp_path / "gray.png", 10, 10, mode="L")
    ds = ImageFolderDataset(tmp_path, 8, random_flip=False)
    items = {p.name: ds[i]["x"] for i, p in enumerate(ds.paths)}
    wide = items["wide.png"]
    assert wide.shape == (3, 8, 8)
    assert wide[0, :, :3].mean() > 0.9 and wide[2, :, -3:].mean() > 0.9
    assert torch.allclose(items["clear.png"], torch.ones(3, 8, 8))
    assert items["gray.png"].shape == (3, 8, 8)


def test_random_flip_is_deterministic_per_seed_index_epoch(tmp_path):
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, :8] = 255
    Image.fromarray(arr).save(tmp_path / "half.png")
    ds = ImageFolderDataset(tmp_path, 16, random_flip=True, seed=0)
    flips = []
    for epoch in range(16):
        ds.set_epoch(epoch)
        x = ds[0]["x"]
        assert torch.equal(x, ds[0]["x"])
        flips.append(bool(x[0, 0, 0] < 0))  # left column dark -> flipped
    assert 0 < sum(flips) < 16
    again = ImageFolderDataset(tmp_path, 16, random_flip=True, seed=0)
    again.set_epoch(3)
    ds.set_epoch(3)
    assert torch.equal(again[0]["x"], ds[0]["x"])
    no_flip = ImageFolderDataset(tmp_path, 16, random_flip=False)
    assert all(no_flip[0]["x"][0, 0, 0] > 0 for _ in range(3))


def test_truncated_and_corrupt_files_are_skipped_with_one_warning(tmp_path):
    _img(tmp_path / "good.png", 32, 32)
    raw = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    _img(tmp_path / "j.jpg", 64, 64)
    raw = (tmp_path / "j.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.webp").write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable") as rec:
        ds = ImageFolderDataset(tmp_path, 16)
    msg = str(rec[0].message)
    assert len(rec) == 1 and ("truncated" in msg or "garbage" in msg)
    assert sorted(p.name for p in ds.paths) == ["good.png", "j.jpg"]


def test_missing_and_empty_folders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(tmp_path / "nope", 16)
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no usable images.*\.png, \.jpg, \.jpeg, \.webp"):
        ImageFolderDataset(tmp_path, 16)


def test_bad_metadata_line_is_a_clear_error(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"text": "no file name"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl:1"):
        ImageFolderDataset(tmp_path, 16)


def test_build_dataset_folder(tmp_path):
    _img(tmp_path / "a.png")
    ds = build_dataset("folder", root=tmp_path, resolution=12)
    assert len(ds) == 1 and ds[0]["x"].shape == (3, 12, 12) and ds[0]["caption"] == ""


def _captioned_folder(root, n=6, split_every=3):
    rows = []
    for i in range(n):
        _img(root / f"{i}.png", 32, 32, seed=i)
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"emoji {i}",
                                "split": "heldout" if i % split_every == 0 else "train"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_folder_with_shapes_mixes_by_fraction_and_redraws_scenes_per_epoch(tmp_path):
    from sumie.config import DataConfig
    from sumie.data.mix import FolderWithShapes
    from sumie.train.loop import dataset_for

    root = _captioned_folder(tmp_path)
    ds = dataset_for(DataConfig(kind="folder", path=str(root), resolution=16, split="train", shapes_fraction=0.5,
                                random_flip=False,
                                max_objects=2, conditioning="caption"))
    assert isinstance(ds, FolderWithShapes) and ds.n_folder == 4 and len(ds) == 8  # the heldout split is left out
    items = [ds[i] for i in range(len(ds))]
    assert [it["caption"] for it in items[:4]] == ["emoji 1", "emoji 2", "emoji 4", "emoji 5"]
    assert all("background" in it["caption"] for it in items[4:])  # shapes captions
    assert all(it["x"].shape == (3, 16, 16) and it["label"] == -1 for it in items)
    assert {"emoji 1", "emoji 5"} <= set(ds.captions) and any("circle" in c or "square" in c for c in ds.captions)
    ds.set_epoch(1)
    assert ds[5]["caption"] != items[5]["caption"] or not torch.equal(ds[5]["x"], items[5]["x"])  # fresh scene
    torch.testing.assert_close(ds[0]["x"], items[0]["x"])  # folder images repeat (no flips configured here)
    with pytest.raises(ValueError, match="shapes_fraction must be in"):
        FolderWithShapes(ds.folder, ds.shapes, 1.0)
    with pytest.raises(ValueError, match="shapes_fraction must be in"):
        dataset_for(DataConfig(kind="folder", path=str(root), resolution=16, shapes_fraction=-0.1))


def test_worker_loaded_batches_equal_in_process_batches(tmp_path):
    """train.num_workers > 0 changes where items are read, never which: same batches across epochs,
    micro-batches, and a start mid-run (resume)."""
    from sumie.config import preset
    from sumie.train.loop import Trainer

    cfg = preset("tiny-text")
    cfg.data = type(cfg.data)(kind="folder", path=str(_captioned_folder(tmp_path)), resolution=16, split="train",
                              shapes_fraction=0.5, max_objects=2, conditioning="caption")
    cfg.train.batch_size, cfg.train.grad_accum = 3, 2  # 6 items a step: the 8-item epoch ends mid-step

    def batches(workers, first_step):
        cfg.train.num_workers = workers
        tr = Trainer(cfg, tmp_path / f"run{workers}-{first_step}", progress=False)
        return [tr.get_batch(s, m) for s in range(first_step, 5) for m in range(2)]

    for first in (0, 3):
        ref, got = batches(0, first), batches(2, first)
        for a, b in zip(ref, got, strict=True):
            assert a["caption"] == b["caption"]
            torch.testing.assert_close(a["x"], b["x"], rtol=0, atol=0)
    cfg.train.num_workers = -1
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        Trainer(cfg, tmp_path / "bad", progress=False)
