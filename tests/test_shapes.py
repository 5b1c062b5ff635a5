import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from sumie.data import build_dataset
from sumie.data.shapes import (COLORS, NUM_CLASSES, PLAIN_BACKGROUNDS, POSITIONS, SHAPES, SIZES, TEXTURE_COLORS,
                               TEXTURED_BACKGROUNDS, ShapeObject, ShapesConfig, ShapesDataset, caption, class_label,
                               label_names, parse_caption, parse_scene, render, sample_scene)


def test_vocabulary():
    assert SHAPES[:6] == ("circle", "square", "triangle", "diamond", "star", "cross")
    assert list(COLORS)[:6] == ["red", "orange", "yellow", "green", "blue", "purple"]
    assert SIZES == ("small", "medium", "large") and len(POSITIONS) == 9
    assert NUM_CLASSES == len(SHAPES) * len(COLORS)
    # textured backgrounds are muted: far from every object colour
    for tex in TEXTURE_COLORS.values():
        for col in COLORS.values():
            assert np.linalg.norm(np.subtract(tex, col, dtype=float)) > 80


def test_item_is_pure_function_of_seed_and_index():
    a = ShapesDataset(ShapesConfig(seed=3, background="mixed", max_objects=2))
    b = ShapesDataset(ShapesConfig(seed=3, background="mixed", max_objects=2))
    c = ShapesDataset(ShapesConfig(seed=4, background="mixed", max_objects=2))
    for i in (0, 17, 123456):
        assert torch.equal(a[i]["x"], b[i]["x"]) and a[i]["caption"] == b[i]["caption"]
    assert a[5]["caption"] == a[5]["caption"] and a.spec(5) == b.spec(5)
    assert any(a[i]["caption"] != c[i]["caption"] for i in range(5))
    _ = a[99]  # reading other items first changes nothing
    assert torch.equal(a[17]["x"], b[17]["x"])


def test_items_shape_range_and_collate():
    ds = ShapesDataset(ShapesConfig(resolution=32, background="mixed"))
    items = [ds[i] for i in range(8)]
    batch = default_collate(items)
    assert batch["x"].shape == (8, 3, 32, 32) and batch["x"].dtype == torch.float32
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1
    assert batch["label"].dtype == torch.int64 and len(batch["caption"]) == 8
    for i, item in enumerate(items):
        obj = ds.spec(i).objects[0]
        assert item["label"] == class_label(obj.shape, obj.color) and item["caption"] == ds.spec(i).caption


@pytest.mark.parametrize("res", [16, 24, 32, 48, 64])
def test_all_resolutions_render(res):
    rng = np.random.default_rng(0)
    for bg in ("plain", "textured"):
        for n in (1, 2, 3):
            scene = sample_scene(rng, n, bg)
            img = render(scene.objects, scene.background, res, rng)
            assert img.shape == (res, res, 3) and img.dtype == np.uint8
            assert img.std() > 5  # something was drawn


def test_object_is_drawn_in_its_cell_with_its_colour():
    rng = np.random.default_rng(1)
    for pos in POSITIONS:
        obj = ShapeObject("square", "blue", "medium", pos)
        img = render([obj], "white", 48, rng).astype(int)
        mask = (np.abs(img - np.array(COLORS["blue"])).sum(-1) < 60)
        ys, xs = np.nonzero(mask)
        row, col = divmod(POSITIONS.index(pos), 3)
        assert int(ys.mean() // 16) == row and int(xs.mean() // 16) == col


def test_multi_object_scenes_use_distinct_cells_and_pairs():
    ds = ShapesDataset(ShapesConfig(max_objects=4, min_objects=2, background="textured"))
    counts = set()
    for i in range(300):
        objs = ds.spec(i).objects
        counts.add(len(objs))
        assert len({o.position for o in objs}) == len(objs)
        assert len({(o.shape, o.color) for o in objs}) == len(objs)
    assert counts == {2, 3, 4}


def test_caption_wording_and_parse_round_trip():
    a = ShapeObject("circle", "red", "small", "top left")
    b = ShapeObject("square", "blue", "large", "bottom right")
    c = ShapeObject("star", "green", "medium", "center")
    assert caption([a], "white") == "a small red circle at the top left on a white background"
    assert caption([b, a], "striped gray") == ("a large blue square at the bottom right and a small red circle at "
                                              "the top left on a striped gray background")
    assert "in the center" in caption([c], "black")
    assert "on the left" in caption([ShapeObject("cross", "purple", "small", "left")], "black")
    assert parse_caption("A Small RED circle at the top left.") == [a]
    ds = ShapesDataset(ShapesConfig(max_objects=3, background="mixed"))
    for i in range(500):
        scene = ds.spec(i)
        assert parse_scene(scene.caption) == scene
        assert parse_caption(ds[i]["caption"]) == list(scene.objects) if i < 20 else True
    for bg in list(PLAIN_BACKGROUNDS) + list(TEXTURED_BACKGROUNDS):
        assert parse_scene(caption([c], bg)).background == bg


@pytest.mark.parametrize("text", ["a red circle", "a huge red circle at the top", "a small red circle at the middle",
                                  "a small red circle at the top on a plaid background", ""])
def test_parse_caption_rejects_what_it_cannot_parse(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_class_labels_round_trip():
    seen = set()
    for s in SHAPES:
        for c in COLORS:
            lab = class_label(s, c)
            assert label_names(lab) == (s, c)
            seen.add(lab)
    assert seen == set(range(NUM_CLASSES))
    with pytest.raises(ValueError, match="valid: circle"):
        class_label("hexagon", "red")
    with pytest.raises(ValueError):
        label_names(NUM_CLASSES)


@pytest.mark.parametrize("kwargs, match", [
    (dict(background="plaid"), "valid: plain, textured, mixed"),
    (dict(max_objects=0), "min_objects"),
    (dict(min_objects=3, max_objects=2), "min_objects"),
    (dict(resolution=4), "resolution"),
    (dict(length=0), "length"),
])
def test_invalid_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesConfig(**kwargs)


def test_invalid_objects_and_backgrounds():
    with pytest.raises(ValueError, match="valid: small, medium, large"):
        ShapeObject("circle", "red", "tiny", "top")
    with pytest.raises(ValueError, match="unknown background"):
        render([], "plaid", 32, np.random.default_rng(0))
    with pytest.raises(IndexError):
        ShapesDataset(ShapesConfig(length=10))[10]


def test_build_dataset():
    ds = build_dataset("shapes", resolution=16, seed=2)
    assert ds[0]["x"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="valid: shapes, folder"):
        build_dataset("imagenet")
