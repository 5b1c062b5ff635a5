import pickle

import pytest
import torch

from sumie.io.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_tensors,
                                 prune_checkpoints, resolve_checkpoint, save_tensors, write_checkpoint)


def _files(step):
    return {"model.safetensors": {"w": torch.full((3,), float(step))}, "ema.safetensors": {"w": torch.zeros(3)},
            "state.safetensors": {"s": torch.ones(1)}, "state.json": {"step": step}, "config.json": {}}


def test_round_trip_and_pruning(tmp_path):
    for step in (10, 20, 30):
        write_checkpoint(tmp_path, step, _files(step))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000010", "ckpt-0000020", "ckpt-0000030"]
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000020", "ckpt-0000030"]
    assert torch.equal(load_tensors(latest_checkpoint(tmp_path) / "model.safetensors")["w"], torch.full((3,), 30.0))


def test_incomplete_checkpoints_are_never_chosen(tmp_path):
    write_checkpoint(tmp_path, 1, _files(1))
    (tmp_path / "ckpt-0000002.tmp-123").mkdir()  # a save killed midway
    partial = tmp_path / "ckpt-0000003"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x")
    assert latest_checkpoint(tmp_path).name == "ckpt-0000001"
    assert resolve_checkpoint(tmp_path).name == "ckpt-0000001"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(partial)


def test_pickles_refused_and_truncated_files_reported(tmp_path):
    p = tmp_path / "weights.safetensors"
    p.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_tensors(p)
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, pt)
    with pytest.raises(CheckpointError, match="never loads pickles"):
        load_tensors(pt)
    good = tmp_path / "good.safetensors"
    save_tensors(good, {"w": torch.randn(1000)})
    data = good.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_tensors(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_tensors(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)


def test_safetensors_whose_header_length_starts_like_a_pickle_still_loads(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sumie.io.checkpoint import load_tensors

    for pad in range(300):  # find a metadata length that makes the first header byte 0x80
        path = tmp_path / "w.safetensors"
        save_file({"w": torch.ones(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(load_tensors(path)["w"], torch.ones(2))


def test_on_meta_builds_structure_only_and_restores_torch_init():
    import subprocess
    import sys

    from sumie.io.checkpoint import on_meta

    before = torch.nn.init.normal_
    with on_meta():
        emb = torch.nn.Embedding(10, 4)
    assert emb.weight.is_meta and torch.nn.init.normal_ is before
    with pytest.raises(RuntimeError, match="boom"), on_meta():
        raise RuntimeError("boom")
    assert torch.nn.init.normal_ is before and torch.empty(1).device.type == "cpu"
    # building the CLIP text tower structure must not pull in torch._dynamo (a ~1 s import on CPU)
    code = ("import sys, torch\nfrom sumie.io.checkpoint import on_meta\nfrom sumie.text.clip import ClipTextConfig, "
            "ClipTextTransformer\nwith on_meta():\n    ClipTextTransformer(ClipTextConfig())\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
