"""explain: the reverse process, training curves, cross-attention maps (tiny models)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sumie.cli import main
from sumie.explain import (CrossAttentionMaps, attention_heatmaps, attention_probs, explain_curves, read_log,
                           reverse_trajectory, smooth, token_labels)
from sumie.nn.layers import Attention
from sumie.nn.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("explain") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", "--max-steps", "4"]) == 0
    return run


def _randomise(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


# -- cross-attention --------------------------------------------------------

def test_attention_probs_reproduce_the_layer_output():
    torch.manual_seed(0)
    attn = Attention(16, context_dim=8, heads=2, dim_head=8)
    x, ctx = torch.randn(3, 10, 16), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    p = attention_probs(attn, x, ctx, mask)  # (B, h, N, M)
    assert p.shape == (3, 2, 10, 5)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 2, 10))
    assert (p[0, :, :, 3:] == 0).all() and (p[2, :, :, 1:] == 0).all()
    v = attn.to_v(ctx).reshape(3, 5, 2, 8).transpose(1, 2)
    out = attn.to_out((p @ v).transpose(1, 2).reshape(3, 10, 16))
    torch.testing.assert_close(out, attn(x, ctx, mask), rtol=1e-5, atol=1e-5)


def _text_unet():
    cfg = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                     num_heads=2, norm_groups=8, context_dim=12)
    return _randomise(UNet(cfg)).eval()


def test_cross_attention_maps_on_a_tiny_unet():
    net = _text_unet()
    x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    cap = CrossAttentionMaps(net, (16, 16))
    n_layers = len(cap.layers)
    assert n_layers >= 3  # input, middle and output blocks at two resolutions
    with cap, torch.no_grad():
        net(x, torch.tensor([1.0, 1.0]), {"context": ctx, "context_mask": mask})
        net(x, torch.tensor([5.0, 5.0]), {"context": ctx, "context_mask": mask})
    m = cap.maps()
    assert m.shape == (2, 6, 16, 16)
    assert cap.count == 2 * n_layers and set(cap.per_layer.values()) == {2}
    torch.testing.assert_close(m.sum(1), torch.ones(2, 16, 16), rtol=1e-5, atol=1e-5)  # a distribution per pixel
    assert (m[0, 4:] == 0).all() and (m[1, 4:] > 0).all()  # padded tokens receive nothing
    assert m[1].std(dim=(1, 2)).max() > 0  # maps vary over the image
    # the hooks are gone after the block: more calls change nothing
    with torch.no_grad():
        net(x, torch.tensor([1.0, 1.0]), {"context": ctx, "context_mask": mask})
    assert cap.count == 2 * n_layers


def test_cross_attention_maps_depend_on_the_context():
    net = _text_unet()
    ctx = torch.randn(1, 4, 12) * 0.1
    with CrossAttentionMaps(net, (16, 16)) as base, torch.no_grad():
        net(torch.randn(1, 3, 16, 16), torch.tensor([1.0]), {"context": ctx})
    boosted = ctx.clone()
    boosted[0, 2] *= 60
    with CrossAttentionMaps(net, (16, 16)) as cap, torch.no_grad():
        net(torch.randn(1, 3, 16, 16), torch.tensor([1.0]), {"context": boosted})
    assert not torch.allclose(base.maps(), cap.maps())


def test_cfg_doubled_batch_keeps_the_conditional_half():
    net = _text_unet()
    cond, uncond = torch.randn(1, 5, 12), torch.zeros(1, 5, 12)
    x = torch.randn(1, 3, 16, 16)
    with CrossAttentionMaps(net, (16, 16), batch_size=1) as both, torch.no_grad():
        net(torch.cat([x, x]), torch.tensor([2.0, 2.0]), {"context": torch.cat([cond, uncond])})
    with CrossAttentionMaps(net, (16, 16)) as alone, torch.no_grad():
        net(x, torch.tensor([2.0]), {"context": cond})
    torch.testing.assert_close(both.maps(), alone.maps(), rtol=1e-4, atol=1e-5)


def test_attention_errors_and_heatmaps():
    with pytest.raises(ValueError, match="no cross-attention layers"):
        CrossAttentionMaps(UNet(UNetConfig(model_channels=16, channel_mult=(1,), attention_resolutions=(1,),
                                           num_heads=2, norm_groups=8)), (8, 8))
    cap = CrossAttentionMaps(_text_unet(), (16, 16))
    with pytest.raises(ValueError, match="no cross-attention was captured"):
        cap.maps()
    img = np.zeros((16, 16, 3), np.uint8)
    grid = attention_heatmaps(img, torch.rand(3, 16, 16), ["a", "red", "star"], scale=2)
    assert grid.dtype == np.uint8 and grid.shape[1] > 4 * 32
    with pytest.raises(ValueError, match="3 maps but 2 token labels"):
        attention_heatmaps(img, torch.rand(3, 16, 16), ["a", "b"])


def test_token_labels_from_a_word_tokenizer():
    from sumie.text.small import WordTokenizer

    tok = WordTokenizer.build(["a red star", "a blue circle"], model_max_length=8)
    labels, pos = token_labels(tok, "a red circle")
    assert labels[1:4] == ["a", "red", "circle"] and len(labels) == 5 and pos.tolist() == [0, 1, 2, 3, 4]


def test_explain_attention_refuses_class_models(class_run, tmp_path, capsys):
    assert main(["explain", "attention", str(class_run), "--prompt", "a red star", "--out", str(tmp_path)]) == 2
    assert "text-conditioned model" in capsys.readouterr().err


# -- reverse process ----------------------------------------------------------

def test_reverse_trajectory_ends_in_the_sample(class_run):
    from sumie.models import load_model
    from sumie.pipeline import class_cond

    den, cfg = load_model(class_run)
    final, frames = reverse_trajectory(den, (3, 16, 16), cond=class_cond([3]), sampler="euler", steps=5, seed=1)
    assert len(frames) == 5
    sigmas = [f[0] for f in frames]
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[0] == pytest.approx(den.sigma_max, rel=1e-5)
    torch.testing.assert_close(final, frames[-1][2])  # Euler's last step lands on the x0 estimate


def test_explain_reverse_cli_writes_strip_and_gif(class_run, tmp_path, capsys):
    out = tmp_path / "rev"
    assert main(["explain", "reverse", str(class_run), "--shape", "star", "--color", "red", "--steps", "6",
                 "--columns", "4", "--scale", "2", "--out", str(out)]) == 0
    strip, gif = Image.open(out / "reverse_strip.png"), Image.open(out / "reverse.gif")
    assert strip.size[0] == 2 + 5 * (32 + 2)  # 4 steps + the result, 16 px images upscaled 2x
    assert gif.n_frames == 6 + 1
    assert main(["explain", "reverse", str(class_run), "--out", str(out)]) == 2
    assert "--label" in capsys.readouterr().err


# -- training curves ----------------------------------------------------------

def test_curves_from_a_run_log(class_run, tmp_path):
    paths = explain_curves(class_run, tmp_path / "c")
    assert {"curves", "loss", "lr"} <= set(paths) and all(p.is_file() for p in paths.values())


def test_read_log_keeps_the_last_row_of_a_step_and_names_bad_lines(tmp_path):
    rows = [{"step": 10, "loss": 1.0, "lr": 1e-3}, {"step": 20, "loss": 0.5, "lr": 1e-3},
            {"step": 20, "loss": 0.4, "lr": 1e-3}, {"step": 30, "loss": 0.3, "lr": 5e-4, "ema_loss": 0.2}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = read_log(tmp_path)
    assert [r["step"] for r in got] == [10, 20, 30] and got[1]["loss"] == 0.4
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match="log.jsonl:2"):
        read_log(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_log(tmp_path / "nothing")


def test_smooth_is_bias_corrected():
    np.testing.assert_allclose(smooth([2.0, 2.0, 2.0]), [2.0, 2.0, 2.0])
    s = smooth([1.0, 0.0], alpha=0.5)
    assert s[0] == 1.0 and 0 < s[1] < 1
