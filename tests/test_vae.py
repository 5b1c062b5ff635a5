import pytest
import torch

from sumie.nn.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, tiled_apply


def _randomise(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def test_sd_layout_has_the_published_parameter_count_and_ldm_names():
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.sd())
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    keys = set(vae.state_dict())
    for k in ("encoder.down.0.block.1.conv2.weight", "encoder.down.1.block.0.nin_shortcut.weight",
              "encoder.down.2.downsample.conv.weight", "encoder.mid.attn_1.proj_out.weight", "quant_conv.weight",
              "post_quant_conv.bias", "decoder.up.3.upsample.conv.weight", "decoder.up.0.block.2.norm2.bias",
              "decoder.norm_out.weight"):
        assert k in keys, k
    assert "decoder.up.0.upsample.conv.weight" not in keys and "encoder.down.3.downsample.conv.weight" not in keys
    assert VAEConfig.sdxl().scaling_factor == 0.13025 and VAEConfig.sd().scaling_factor == 0.18215


def test_shapes_posterior_and_latent_scaling():
    vae = _randomise(AutoencoderKL(VAEConfig.tiny()))
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    post = vae.encode(x)
    f = vae.downsampling_factor
    assert f == 4 and post.mean.shape == (2, 4, 8, 6) and post.logvar.shape == post.mean.shape
    z = post.sample(torch.Generator().manual_seed(0))
    assert not torch.equal(z, post.mode())
    assert torch.equal(post.sample(torch.Generator().manual_seed(0)), z)  # seeded
    assert vae.decode(z).shape == x.shape
    rec, p2 = vae(x, torch.Generator().manual_seed(0))
    assert rec.shape == x.shape and p2.kl().shape == (2,) and (p2.kl() >= 0).all()
    lat = vae.to_latent(z)
    assert torch.allclose(lat, z * 0.18215) and torch.allclose(vae.from_latent(lat), z, atol=1e-6)
    shifted = AutoencoderKL(VAEConfig(**{**VAEConfig.tiny().to_dict(), "shift_factor": 0.5}))
    assert torch.allclose(shifted.from_latent(shifted.to_latent(z)), z, atol=1e-6)


def test_kl_of_the_prior_is_zero():
    moments = torch.zeros(1, 8, 2, 2)
    assert DiagonalGaussian(moments).kl().item() == 0.0


def test_tiled_equals_untiled_when_one_tile_covers_the_image():
    vae = _randomise(AutoencoderKL(VAEConfig.tiny()))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(vae.encode_tiled(x, tile=32, overlap=8).mean, vae.encode(x).mean, atol=1e-6)
        z = vae.encode(x).mean
        assert torch.allclose(vae.decode_tiled(z, tile=8, overlap=2), vae.decode(z), atol=1e-6)


def test_tiled_blending_is_exact_for_pointwise_maps_and_close_for_the_vae():
    # a pointwise map commutes with tiling, so any blending error would show
    x = torch.randn(1, 2, 40, 56)
    out = tiled_apply(lambda t: torch.cat([t * 3, t.sin()], 1), x, tile=16, overlap=6, scale=1.0, out_channels=4)
    assert torch.allclose(out, torch.cat([x * 3, x.sin()], 1), atol=1e-6)
    # an upsampling map: tiles map to f-times larger outputs
    up = tiled_apply(lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2), x, 16, 4, 2.0, 2)
    assert torch.allclose(up, x.repeat_interleave(2, -1).repeat_interleave(2, -2), atol=1e-6)
    vae = _randomise(AutoencoderKL(VAEConfig.tiny()))
    z = torch.randn(1, 4, 20, 20)
    with torch.no_grad():
        full, tiled = vae.decode(z), vae.decode_tiled(z, tile=12, overlap=4)
    assert tiled.shape == full.shape
    # tiles see less context and their own GroupNorm statistics: for random weights and a random
    # latent, the same picture only roughly (trained decoders are far closer)
    assert torch.isfinite(tiled).all() and (tiled - full).abs().mean() < 0.5 * full.abs().mean()
    with pytest.raises(ValueError, match="multiples"):
        vae.encode_tiled(torch.zeros(1, 3, 32, 32), tile=30, overlap=8)
    with pytest.raises(ValueError, match="overlap"):
        tiled_apply(lambda t: t, x, tile=8, overlap=8, scale=1.0, out_channels=2)
