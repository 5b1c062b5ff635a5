import math

import pytest
import torch

from sumie.diffusion import schedules as S


def test_linear_and_scaled_linear_closed_forms():
    b = S.betas_linear(1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert torch.allclose(b[1:] - b[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    sl = S.betas_scaled_linear(1000)
    assert torch.allclose(sl.sqrt(), torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64))


def test_cosine_alpha_bar_matches_closed_form():
    T = 1000
    ab = S.alphas_cumprod(S.betas_cosine(T))
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 100, 500, 900):  # before the 0.999 clip bites
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_zero_terminal_snr():
    betas = S.rescale_zero_terminal_snr(S.betas_scaled_linear(1000))
    ab = S.alphas_cumprod(betas)
    assert ab[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert ab[0].item() == pytest.approx(S.alphas_cumprod(S.betas_scaled_linear(1000))[0].item())
    sched = S.DiscreteSchedule.named("scaled_linear", zero_terminal_snr=True)
    assert math.isfinite(sched.sigma_max) and sched.sigma_max > 1000


def test_sigma_alpha_bar_round_trip_and_t_interpolation():
    sched = S.DiscreteSchedule.named("scaled_linear", 1000)
    ab = S.alphas_cumprod(S.betas_scaled_linear(1000))
    assert torch.allclose(sched.alphas_cumprod, ab, rtol=1e-12)
    t = torch.tensor([0.0, 1.0, 17.0, 998.0, 999.0])
    assert torch.allclose(sched.t_to_sigma(t), sched.sigmas[t.long()], rtol=1e-12)
    tc = torch.tensor([0.0, 0.5, 10.25, 500.7, 999.0], dtype=torch.float64)
    assert torch.allclose(sched.sigma_to_t(sched.t_to_sigma(tc)), tc, atol=1e-9)
    # log-linear between grid points
    mid = sched.t_to_sigma(torch.tensor(10.5))
    assert mid.item() == pytest.approx(math.sqrt(sched.sigmas[10].item() * sched.sigmas[11].item()), rel=1e-12)


def test_karras_sigmas():
    s = S.karras_sigmas(10, 0.002, 80.0, 7.0)
    assert len(s) == 11 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert (s[1:] < s[:-1]).all()
    # even spacing in sigma^(1/rho)
    r = s[:-1] ** (1 / 7)
    assert torch.allclose(r[1:] - r[:-1], (r[1] - r[0]).expand(9), rtol=1e-9)


@pytest.mark.parametrize("spacing,expected", [
    ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
])
def test_discrete_spacings_match_diffusers_conventions(spacing, expected):
    sched = S.DiscreteSchedule.named("scaled_linear", 1000)
    sig = S.discrete_sigmas(sched, 10, spacing)
    assert sig[-1] == 0
    assert torch.equal(sig[:-1], sched.sigmas[torch.tensor(expected)])


def test_sampling_sigmas_errors():
    with pytest.raises(ValueError, match="valid: karras"):
        S.sampling_sigmas("bogus", 10, sigma_min=0.01, sigma_max=10)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        S.sampling_sigmas("karras", 0, sigma_min=0.01, sigma_max=10)
    with pytest.raises(ValueError, match="continuous"):
        S.sampling_sigmas("trailing", 10, sigma_min=0.01, sigma_max=10)
    with pytest.raises(ValueError, match="valid: linear"):
        S.make_betas("quadratic")


def test_forward_process_statistics():
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7)
    for sigma in (0.1, 1.0, 5.0):
        x = S.add_noise(x0, sigma, torch.randn(x0.shape, generator=g))
        assert x.mean().item() == pytest.approx(0.7, abs=4 * sigma / math.sqrt(x0.numel()))
        assert x.std().item() == pytest.approx(sigma, rel=0.01)
    # VP view: unit-variance data keeps unit variance at every t (Ho et al. eq. 4)
    sched = S.DiscreteSchedule.named("linear", 1000)
    data = torch.randn(200_000, generator=g)
    for t in (0, 300, 999):
        sigma = sched.sigmas[t].float()
        z = S.add_noise(data, sigma, torch.randn(data.shape, generator=g)) / (1 + sigma**2).sqrt()
        assert z.var().item() == pytest.approx(1.0, rel=0.02)


def test_training_sigma_distributions():
    g = torch.Generator().manual_seed(0)
    s = S.LogNormalSigma(-1.2, 1.2)(100_000, generator=g)
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.02)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.02)
    sched = S.DiscreteSchedule.named("linear", 50)
    u = S.UniformTimestepSigma(sched)(10_000, generator=g)
    assert set(torch.unique(u).tolist()) <= set(sched.sigmas.float().tolist())
    assert len(torch.unique(u)) == 50
