"""The FID Inception-v3: architecture, key names, loading from user files, input handling (random weights)."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sumie.nn.inception import FIDInceptionV3, _avg_pool_no_pad, load_fid_inception


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = FIDInceptionV3().eval()
    with torch.no_grad():  # random but non-trivial BatchNorm statistics
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def test_parameter_count_and_key_layout(net):
    # torchvision's inception_v3 without the aux classifier has 23,834,568 parameters with a
    # 1000-class fc; the FID graph's 1008-class fc adds 8 * 2049
    assert sum(p.numel() for p in net.parameters()) == 23_834_568 + 8 * 2049
    keys = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(keys) == 94 * 5 + 2  # 94 conv+BN units (conv.weight, bn.weight/bias/running_mean/var) + fc
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert shapes["Mixed_7a.branch7x7x3_4.conv.weight"] == (192, 192, 3, 3)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["fc.weight"] == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in keys)


def test_pool3_features_on_299_input(net):
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    f = net.features(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float32
    assert (f >= 0).all()  # pooled ReLU outputs
    assert not torch.equal(f[0], f[1])  # random deep nets map inputs close together, but not equal


def test_small_inputs_are_resized_bilinearly_to_299(net):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    up = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(net.features(x), net.features(up), rtol=1e-5, atol=1e-5)
    assert net.preprocess(x).shape == (1, 3, 299, 299)


def test_tf_style_pools():
    x = torch.ones(1, 2, 5, 5)
    torch.testing.assert_close(_avg_pool_no_pad(x), x)  # corners would be 4/9 with padding counted
    m = FIDInceptionV3()
    assert m.Mixed_7c.max_pool and not m.Mixed_7b.max_pool


def test_loads_pth_and_safetensors_from_user_files(net, tmp_path):
    state = net.state_dict()
    pth = tmp_path / "pt_inception.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, pth)
    st = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    want = net.features(x)
    for path in (pth, st):
        got = load_fid_inception(path).features(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_wrong_architecture_names_the_layer(net, tmp_path):
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["Mixed_6c.branch7x7_2.conv.weight"] = torch.zeros(160, 160, 7, 1)  # transposed kernel
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"Mixed_6c\.branch7x7_2\.conv\.weight' has shape \(160, 160, 7, 1\), "
                                         r"expected \(160, 160, 1, 7\)"):
        load_fid_inception(bad)
    del state["Mixed_6c.branch7x7_2.conv.weight"]
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"Mixed_6c\.branch7x7_2\.conv\.weight' .* is missing"):
        load_fid_inception(bad)
    state = dict(net.state_dict())
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(state, bad)
    with pytest.raises(ValueError, match="unexpected layer 'AuxLogits.fc.weight'"):
        load_fid_inception(bad)
    other = tmp_path / "small.safetensors"
    save_file({"body.0.0.weight": torch.zeros(32, 5, 3, 3)}, str(other))
    with pytest.raises(ValueError, match="Conv2d_1a_3x3.conv.weight"):
        load_fid_inception(other)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickles_with_code_are_refused(tmp_path):
    p = tmp_path / "evil.pth"
    with open(p, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(ValueError, match="weights_only"):
        load_fid_inception(p)
    with pytest.raises(FileNotFoundError, match="does not download"):
        load_fid_inception(tmp_path / "missing.pth")
