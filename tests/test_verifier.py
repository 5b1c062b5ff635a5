import numpy as np
import pytest
import torch
from safetensors import safe_open

from sumie.data.shapes import (COLORS, NUM_CLASSES, SHAPES, ShapeObject, ShapesConfig, ShapesDataset, label_names,
                               render)
from sumie.metrics.verifier import (DEFAULT_WEIGHTS, ShapesVerifier, VerifierConfig, degrade, detection_loss,
                                    make_batch)

TEST_SEED = 777  # the shipped weights were trained on seed 0 and evaluated on seed 10000


@pytest.fixture(scope="module")
def verifier():
    return ShapesVerifier.load()


def _batch(ds, n):
    return torch.stack([ds[i]["x"] for i in range(n)]), [ds.spec(i) for i in range(n)]


def test_shipped_weights_are_small_fp16_safetensors():
    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        assert f.metadata()["format"] == "sumie.shapes_verifier"
        assert all(f.get_tensor(k).dtype in (torch.float16, torch.int64) for k in f.keys())


def test_accepts_true_labels_and_rejects_wrong_ones(verifier):
    ds = ShapesDataset(ShapesConfig(seed=TEST_SEED, background="mixed"))
    x, scenes = _batch(ds, 256)
    labels = torch.tensor([s.objects[0].label for s in scenes])
    assert verifier.accepts_labels(x, labels).float().mean() >= 0.95
    rng = np.random.default_rng(0)
    wrong = (labels + torch.from_numpy(rng.integers(1, NUM_CLASSES, len(labels)))) % NUM_CLASSES
    assert verifier.accepts_labels(x, wrong).float().mean() <= 0.05
    # hardest negatives: same shape, other colour; same colour, other shape
    other_color = [ShapeObject(o.shape, list(COLORS)[(list(COLORS).index(o.color) + 1) % len(COLORS)], o.size,
                               o.position) for o in (s.objects[0] for s in scenes)]
    other_shape = [ShapeObject(SHAPES[(SHAPES.index(o.shape) + 1) % len(SHAPES)], o.color, o.size, o.position)
                   for o in (s.objects[0] for s in scenes)]
    assert verifier.accepts(x, other_color, check_position=False).float().mean() <= 0.05
    assert verifier.accepts(x, other_shape, check_position=False).float().mean() <= 0.05


def test_two_object_scenes_with_positions(verifier):
    ds = ShapesDataset(ShapesConfig(seed=TEST_SEED + 1, background="mixed", min_objects=2, max_objects=2))
    x, scenes = _batch(ds, 128)
    truth = [list(s.objects) for s in scenes]
    assert verifier.accepts(x, truth, check_position=True).float().mean() >= 0.9
    moved = [[ShapeObject(o.shape, o.color, o.size, "center" if o.position != "center" else "top left")
              for o in objs] for objs in truth]
    assert verifier.accepts(x, moved, check_position=True).float().mean() <= 0.05
    exact = [set(p) == set(t) for p, t in zip(verifier.predict(x), truth)]
    assert np.mean(exact) >= 0.85  # sizes included


def test_inputs_uint8_any_resolution_and_lists(verifier):
    rng = np.random.default_rng(TEST_SEED)
    obj = ShapeObject("star", "orange", "large", "center")
    imgs = [render([obj], "light gray", r, rng) for r in (16, 32, 48, 64)]
    assert all(verifier.accepts(imgs, [[obj]] * 4))
    assert verifier.accepts(imgs[2], [obj]).shape == (1,)
    hwc = np.stack([render([obj], "white", 40, rng) for _ in range(3)])  # (B, H, W, 3)
    assert verifier.predict(hwc) == [[obj]] * 3
    assert verifier.predict(render([], "checkered beige", 32, rng)) == [[]]  # nothing to find
    with pytest.raises(ValueError):
        verifier.accepts(imgs, [[obj]])


def test_save_load_round_trip_and_training_contracts(tmp_path):
    torch.manual_seed(0)
    model = ShapesVerifier(VerifierConfig(widths=(8, 8, 8), blocks_per_stage=1, head_width=16))
    x, target, scenes = make_batch(np.random.default_rng(0), 4, render_resolutions=(16, 32))
    assert x.shape == (4, 3, 32, 32) and target["object"].shape == (4, 9)
    assert all(target["object"][b].sum() == len(s.objects) for b, s in enumerate(scenes))
    y = degrade(x, torch.Generator().manual_seed(0), p=1.0)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and not torch.equal(x, y)
    loss = detection_loss(model(x), target)
    loss.backward()
    assert torch.isfinite(loss)
    path = model.eval().save(tmp_path / "v.safetensors", {"note": 1})
    back = ShapesVerifier.load(path)
    assert back.config == model.config
    assert torch.allclose(back(x), model(x), atol=5e-2)
    with pytest.raises(FileNotFoundError, match="python -m sumie.metrics.verifier"):
        ShapesVerifier.load(tmp_path / "missing.safetensors")


def test_label_names_used_by_accepts_labels_match_data():
    assert label_names(0) == (SHAPES[0], list(COLORS)[0])
