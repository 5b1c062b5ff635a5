"""sumie's own memory-mapped safetensors reader: exact tensors, pages given back on request."""

import gc
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sumie.io.sd.tensors import SafetensorsFile, drop_pages, materialize, open_safetensors, release_files


def test_reads_every_dtype_exactly_as_safetensors_does(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(), "f64": torch.randn(4, generator=g).double(),
               "i64": torch.arange(-3, 6), "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
               "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
               "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, path)
    ref = load_file(path)
    weights, _ = open_safetensors(path)
    got = materialize(weights)
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def _rss_file_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_mapped_pages_leave_memory_when_dropped_or_released_and_tensors_stay_valid(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.full((1024, 1024), float(i)) for i in range(24)}, path)  # 96 MB
    weights, _ = open_safetensors(path)
    tensors = materialize(weights)  # views of the mapping; the handle is released
    assert not SafetensorsFile._open
    base = _rss_file_mb()
    assert sum(float(t[::64, ::64].sum()) for t in tensors.values()) > 0  # touches every page row
    total = sum(float(t.sum()) for t in tensors.values())
    assert _rss_file_mb() - base > 80  # the weights are resident, as file pages
    anon = torch.full((1024, 1024), 3.0)  # not from a file: never advised (its pages would be zeroed)
    assert drop_pages([anon]) == 0 and float(anon.sum()) == 3.0 * 2**20
    half = [tensors[f"w{i}"] for i in range(12)]
    assert drop_pages(half) > 45 * 2**20
    assert 35 < _rss_file_mb() - base < 60  # only those pages left
    drop_pages(tensors.values())
    assert _rss_file_mb() - base < 10
    assert sum(float(t.sum()) for t in tensors.values()) == total  # read back from the file
    assert _rss_file_mb() - base > 80
    del tensors, half
    gc.collect()
    assert _rss_file_mb() - base < 10  # freed tensors unmap the file
    release_files()  # idempotent


def test_stream_blocks_hooks_the_first_blocks_holding_the_fraction():
    from sumie.config import preset
    from sumie.nn.unet import UNet
    from sumie.pipelines.sd import stream_blocks

    unet = UNet(preset("tiny").model)
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    for fraction in (0.0, 0.3, 1.0):
        hooks = stream_blocks(unet, fraction)
        hooked = [b for b in blocks if b._forward_hooks]
        assert hooked == blocks[:len(hooks)]  # a prefix, in running order
        covered = sum(sizes[:len(hooks)])
        assert covered >= fraction * sum(sizes) and (not hooks or covered - sizes[len(hooks) - 1] < fraction * sum(sizes))
        for h in hooks:
            h.remove()
    with pytest.raises(ValueError, match="fraction"):
        stream_blocks(unet, 2.0)
