import math

import pytest
import torch

from sumie.diffusion.schedules import karras_sigmas
from sumie.samplers import (SAMPLERS, SamplingCancelled, generators_for, get_sampler, randn, sample_ddim,
                            sample_euler, sample_heun)

MU, S = 0.3, 0.5  # 1-D Gaussian data N(MU, S^2)


def gaussian_denoiser(x, sigma, cond=None):
    """Exact posterior mean E[x0 | x] for Gaussian data: MU + S^2/(S^2+sigma^2) (x - MU)."""
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_flow(x_T, sigma_max):
    """Probability-flow ODE solution at sigma=0 for Gaussian data (closed form)."""
    return MU + (x_T - MU) * S / math.sqrt(S**2 + sigma_max**2)


def test_deterministic_samplers_converge_with_their_order():
    g = torch.Generator().manual_seed(0)
    sigma_max = 20.0
    x_T = torch.randn(64, 1, 2, 2, generator=g, dtype=torch.float64) * sigma_max
    exact = exact_flow(x_T, sigma_max)
    errs = {}
    for name, fn in (("euler", sample_euler), ("heun", sample_heun)):
        errs[name] = []
        for n in (10, 20, 40):
            out = fn(gaussian_denoiser, x_T.clone(), karras_sigmas(n, 0.002, sigma_max).double())
            errs[name].append((out - exact).abs().max().item())
    # Euler is first order, Heun second order: doubling steps cuts the error ~2x and ~4x
    assert errs["euler"][1] < errs["euler"][0] * 0.7 and errs["euler"][2] < errs["euler"][1] * 0.7
    assert errs["heun"][2] < errs["heun"][1] * 0.4
    assert errs["heun"][2] < 0.02 and errs["heun"][2] < errs["euler"][2] / 5


def test_ddim_eta0_is_euler():
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64) * 10
    sig = karras_sigmas(12, 0.01, 10).double()
    assert torch.allclose(sample_ddim(gaussian_denoiser, x, sig), sample_euler(gaussian_denoiser, x, sig))


@pytest.mark.parametrize("name", ["euler_ancestral", "ddpm"])
def test_ancestral_samplers_reach_the_data_distribution(name):
    sigma_max = 20.0
    gens = generators_for(0, 4000)
    x = randn((4000, 1), gens, dtype=torch.float64) * sigma_max
    out = get_sampler(name)(gaussian_denoiser, x, karras_sigmas(200, 0.002, sigma_max).double(), generator=gens)
    assert out.mean().item() == pytest.approx(MU, abs=0.03)
    assert out.std().item() == pytest.approx(S, rel=0.04)  # finite-step bias shrinks with steps


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_per_sample_seeding_batch_equals_single(name):
    fn = get_sampler(name)
    sig = karras_sigmas(6, 0.01, 10.0)
    gens = generators_for(7, 3)
    batch = fn(gaussian_denoiser, randn((3, 1, 4, 4), gens) * 10.0, sig, generator=gens)
    for i in range(3):
        g1 = generators_for(7 + i, 1)
        single = fn(gaussian_denoiser, randn((1, 1, 4, 4), g1) * 10.0, sig, generator=g1)
        assert torch.allclose(batch[i:i + 1], single, atol=1e-6), name


def test_callback_sees_every_step_and_can_cancel():
    seen = []
    sig = karras_sigmas(5, 0.01, 10.0)
    sample_euler(gaussian_denoiser, torch.randn(2, 1, 2, 2) * 10, sig, callback=lambda s: seen.append((s.i, s.sigma)))
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert seen[0][1] == pytest.approx(10.0)

    def cancel(step):
        if step.i == 2:
            raise SamplingCancelled()

    with pytest.raises(SamplingCancelled):
        sample_heun(gaussian_denoiser, torch.randn(2, 1, 2, 2) * 10, sig, callback=cancel)


def test_bad_sigmas_and_names():
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="end in 0"):
        sample_euler(gaussian_denoiser, x, torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="decreasing"):
        sample_euler(gaussian_denoiser, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="steps >= 1"):
        sample_euler(gaussian_denoiser, x, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="valid: ddim, ddpm, euler"):
        get_sampler("euler_b")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        get_sampler("ddim")(gaussian_denoiser, x, karras_sigmas(3, 0.1, 1), eta=-1)


def test_nan_names_step_and_sigma():
    def bad(x, sigma, cond=None):
        return torch.full_like(x, float("nan")) if sigma[0] < 1 else x * 0

    with pytest.raises(FloatingPointError, match=r"step \d+ \(sigma="):
        sample_euler(bad, torch.randn(1, 1, 2, 2), karras_sigmas(8, 0.01, 10.0))
