"""Classifier-free guidance as a denoiser wrapper, and the pipeline's control of a sampling run."""

import pytest
import torch
from torch import nn

from sumie.diffusion.guidance import CFGDenoiser
from sumie.pipeline import resolve_sampling, sample
from sumie.samplers import SAMPLERS, STOCHASTIC, SamplingCancelled


class ClassGaussian(nn.Module):
    """Exact denoiser of N(label, 0.5^2) per sample (label -1 = N(0, 1)); records its batch sizes."""

    sigma_min, sigma_max = 0.01, 10.0

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.batches = []

    def forward(self, x, sigma, cond=None):
        self.batches.append(x.shape[0])
        labels = cond["class_labels"].to(x.dtype) if cond is not None else torch.full((x.shape[0],), -1.0)
        mu = torch.where(labels >= 0, labels, torch.zeros_like(labels)).reshape(-1, 1, 1, 1)
        s2 = torch.where(labels >= 0, torch.full_like(labels, 0.25), torch.ones_like(labels)).reshape(-1, 1, 1, 1)
        sig2 = sigma.to(x.dtype).reshape(-1, 1, 1, 1) ** 2
        return mu + s2 / (s2 + sig2) * (x - mu)


def cond_of(*labels):
    return {"class_labels": torch.tensor(labels)}


def test_cfg_batches_cond_and_uncond_in_one_call_and_extrapolates():
    den = ClassGaussian()
    x, sigma = torch.randn(2, 1, 3, 3), torch.full((2,), 2.0)
    c, u = cond_of(1, 2), cond_of(-1, -1)
    d_c, d_u = den(x, sigma, c), den(x, sigma, u)
    den.batches.clear()
    out = CFGDenoiser(den, u, guidance_scale=4.0)(x, sigma, c)
    assert den.batches == [4]  # one forward call for both passes
    assert torch.allclose(out, d_u + 4.0 * (d_c - d_u), atol=1e-6)


def test_cfg_scale_one_and_zero_make_a_single_pass():
    den = ClassGaussian()
    x, sigma = torch.randn(2, 1, 3, 3), torch.full((2,), 2.0)
    c, u = cond_of(1, 2), cond_of(0, 0)  # a negative prompt is just another condition
    assert torch.allclose(CFGDenoiser(den, u, 1.0)(x, sigma, c), den(x, sigma, c))
    assert torch.allclose(CFGDenoiser(den, u, 0.0)(x, sigma, c), den(x, sigma, u))
    den.batches.clear()
    CFGDenoiser(den, u, 1.0)(x, sigma, c)
    assert den.batches == [2]


def test_cfg_rescale_matches_the_conditional_std():
    den = ClassGaussian()
    x, sigma = torch.randn(2, 1, 8, 8) * 3, torch.full((2,), 3.0)
    c, u = cond_of(1, 2), cond_of(-1, -1)
    d_c = den(x, sigma, c)
    full = CFGDenoiser(den, u, 7.0, rescale=1.0)(x, sigma, c)
    none = CFGDenoiser(den, u, 7.0, rescale=0.0)(x, sigma, c)
    half = CFGDenoiser(den, u, 7.0, rescale=0.5)(x, sigma, c)
    dims = (1, 2, 3)
    assert torch.allclose((full - x).std(dim=dims), (d_c - x).std(dim=dims), rtol=1e-5)
    assert torch.allclose(half, (full + none) / 2, atol=1e-5)


def test_cfg_only_inside_its_sigma_interval():
    den = ClassGaussian()
    x = torch.randn(1, 1, 3, 3)
    c, u = cond_of(1), cond_of(-1)
    g = CFGDenoiser(den, u, 5.0, sigma_interval=(0.5, 2.0))
    for s, inside in ((0.3, False), (1.0, True), (5.0, False)):
        sigma = torch.full((1,), s)
        plain = den(x, sigma, c)
        assert torch.allclose(g(x, sigma, c), plain) != inside


@pytest.mark.parametrize("kw,msg", [({"guidance_scale": -0.5}, "guidance scale must be >= 0"),
                                    ({"rescale": 1.5}, r"rescale \(phi\) must be in \[0, 1\]")])
def test_cfg_bad_input(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CFGDenoiser(ClassGaussian(), cond_of(-1), **{"guidance_scale": 2.0, **kw})


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "DPM++ 2M Karras", "Euler a", "restart", "uni_pc", "lcm"])
def test_pipeline_image_i_of_a_batch_is_the_image_alone_with_seed_plus_i(sampler):
    den = ClassGaussian()
    kw = dict(sampler=sampler, steps=6, guidance_scale=3.0)
    batch = sample(den, (1, 4, 4), 3, cond=cond_of(0, 1, 2), uncond=cond_of(-1, -1, -1), seed=10, **kw)
    for i in range(3):
        alone = sample(den, (1, 4, 4), 1, cond=cond_of(i), uncond=cond_of(-1), seed=10 + i, **kw)
        assert torch.allclose(batch[i:i + 1], alone, atol=1e-5)


def test_pipeline_callback_sees_x0_estimates_and_can_cancel():
    den = ClassGaussian()
    seen = []
    sample(den, (1, 4, 4), 2, cond=cond_of(1, 1), sampler="DPM++ 2M", schedule="exponential", steps=5,
           callback=lambda s: seen.append((s.i, s.sigma, s.denoised.shape)))
    assert [i for i, _, _ in seen] == list(range(5)) and seen[0][1] == pytest.approx(10.0)
    assert all(shape == (2, 1, 4, 4) for _, _, shape in seen)

    def stop(step):
        if step.i == 1:
            raise SamplingCancelled()

    with pytest.raises(SamplingCancelled):
        sample(den, (1, 4, 4), 2, sampler="euler", steps=5, callback=stop)


def test_pipeline_names_and_bad_input():
    assert resolve_sampling("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert resolve_sampling("DPM++ 2M Karras", "karras") == ("dpmpp_2m", "karras")
    assert resolve_sampling("dpmpp_2m", "beta") == ("dpmpp_2m", "beta")
    assert resolve_sampling("Euler a", None, "exponential") == ("euler_ancestral", "exponential")
    den = ClassGaussian()
    with pytest.raises(ValueError, match="already names the 'karras' schedule"):
        sample(den, (1, 2, 2), 1, sampler="DPM++ 2M Karras", schedule="exponential")
    with pytest.raises(ValueError, match="unknown sampler 'dpm_fast'; valid: ddim"):
        sample(den, (1, 2, 2), 1, sampler="dpm_fast")
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; valid: karras"):
        sample(den, (1, 2, 2), 1, schedule="cosine")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sample(den, (1, 2, 2), 1, steps=0)
    with pytest.raises(ValueError, match="takes no eta .*dpmpp_2m_sde"):
        sample(den, (1, 2, 2), 1, sampler="uni_pc", eta=0.5)
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        sample(den, (1, 2, 2), 1, cond=cond_of(1), uncond=cond_of(-1), guidance_scale=-1.0)
    assert torch.isfinite(sample(den, (1, 2, 2), 1, sampler="dpmpp_3m_sde", eta=0.5, steps=4)).all()


def test_every_sampler_runs_under_guidance_in_float32():
    den = ClassGaussian()
    for name in SAMPLERS:
        x = sample(den, (1, 4, 4), 2, cond=cond_of(1, 2), uncond=cond_of(-1, -1), sampler=name, steps=5,
                   guidance_scale=2.0, seed=1)
        assert x.dtype == torch.float32 and torch.isfinite(x).all(), name
    assert STOCHASTIC <= set(SAMPLERS)
