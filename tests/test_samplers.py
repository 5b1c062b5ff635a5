import math

import pytest
import torch

from sumie.diffusion.schedules import karras_sigmas
from sumie.samplers import (SAMPLER_OPTIONS, SAMPLERS, STOCHASTIC, SamplingCancelled, generators_for, get_sampler,
                            nfe_for_steps, randn, resolve_sampler_name, sampler_defaults, sample_ddim, sample_euler, sample_heun)
from sumie.samplers.names import A1111_SAMPLERS, DIFFUSERS_SCHEDULERS

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
    with pytest.raises(ValueError, match="valid: ddim, ddpm, deis, dpm_2, "):
        get_sampler("euler_b")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        get_sampler("ddim")(gaussian_denoiser, x, karras_sigmas(3, 0.1, 1), eta=-1)


def test_nan_names_step_and_sigma():
    def bad(x, sigma, cond=None):
        return torch.full_like(x, float("nan")) if sigma[0] < 1 else x * 0

    with pytest.raises(FloatingPointError, match=r"step \d+ \(sigma="):
        sample_euler(bad, torch.randn(1, 1, 2, 2), karras_sigmas(8, 0.01, 10.0))


DETERMINISTIC = sorted(set(SAMPLERS) - STOCHASTIC)
FIRST_ORDER = {"euler", "ddim"}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_deterministic_sampler_converges_at_its_order(name):
    sigma_max = 20.0
    x_T = torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma_max
    exact = exact_flow(x_T, sigma_max)

    def rms_error(steps):  # averaged over three step counts: single counts can cancel by luck
        return sum(((get_sampler(name)(gaussian_denoiser, x_T, karras_sigmas(n, 0.002, sigma_max).double())
                     - exact) ** 2).mean().sqrt().item() for n in steps) / 3

    coarse, fine = rms_error((8, 10, 12)), rms_error((64, 80, 96))
    # 8x the steps: a first-order method cuts the error ~8x, a second-order one ~64x
    assert coarse / fine > (5 if name in FIRST_ORDER else 40), (coarse, fine)
    assert fine < (0.03 if name in FIRST_ORDER else 1e-3)


@pytest.mark.parametrize("name", sorted(STOCHASTIC - {"lcm"}))
def test_every_stochastic_sampler_reaches_the_data_distribution(name):
    sigma_max = 20.0
    gens = generators_for(0, 3000)
    x = randn((3000, 1), gens, dtype=torch.float64) * sigma_max
    out = get_sampler(name)(gaussian_denoiser, x, karras_sigmas(150, 0.002, sigma_max).double(), generator=gens)
    assert out.mean().item() == pytest.approx(MU, abs=0.04)
    assert out.std().item() == pytest.approx(S, rel=0.05)


def test_lcm_renoises_the_x0_estimate():
    """LCM multistep: each step is x0 = D(x; sigma), then x0 + sigma_next * z (Luo et al. 2023 Alg. 3)."""
    sig = torch.tensor([10.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    x = randn((2, 1, 2, 2), generators_for(3, 2), dtype=torch.float64) * 10
    gens = generators_for(9, 2)
    out = get_sampler("lcm")(gaussian_denoiser, x, sig, generator=gens)
    ref_gens = generators_for(9, 2)
    y = x
    for i in range(3):
        y = gaussian_denoiser(y, sig[i:i + 1].expand(2))
        if sig[i + 1] > 0:
            y = y + randn(y.shape, ref_gens, dtype=torch.float64) * sig[i + 1]
    assert torch.allclose(out, y)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_nfe_and_callbacks_of_every_sampler(name):
    calls, seen = [], []

    def den(x, sigma, cond=None):
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma)

    sig = karras_sigmas(8, 0.01, 10.0).double()
    gens = generators_for(0, 2)
    get_sampler(name)(den, randn((2, 1, 2, 2), gens, dtype=torch.float64) * 10, sig, generator=gens,
                      callback=seen.append)
    assert len(calls) == nfe_for_steps(name, 8, sig)
    if name != "restart":
        assert len(calls) == nfe_for_steps(name, 8)
        assert [s.i for s in seen] == list(range(8))
        assert [s.sigma for s in seen] == pytest.approx(sig[:-1].tolist())
    else:  # Heun steps plus a restart segment: more calls, step indices still increase by one
        assert len(calls) > nfe_for_steps("heun", 8) and [s.i for s in seen] == list(range(len(seen)))
    assert all(s.denoised.shape == (2, 1, 2, 2) and s.sigma_next < s.sigma for s in seen)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_can_be_cancelled_and_stops_on_nan(name):
    def cancel(step):
        if step.i == 2:
            raise SamplingCancelled()

    sig = karras_sigmas(6, 0.01, 10.0)
    fn = get_sampler(name)
    with pytest.raises(SamplingCancelled):
        fn(gaussian_denoiser, torch.randn(1, 1, 2, 2) * 10, sig, callback=cancel, generator=generators_for(0, 1))

    def bad(x, sigma, cond=None):
        return torch.full_like(x, float("nan")) if sigma[0] < 1 else gaussian_denoiser(x, sigma)

    with pytest.raises(FloatingPointError, match=r"at step \d+ \(sigma=0\.\d+"):
        fn(bad, torch.randn(1, 1, 2, 2) * 10, sig, generator=generators_for(0, 1))


@pytest.mark.parametrize("name", sorted(n for n, opts in SAMPLER_OPTIONS.items() if "eta" in opts))
def test_negative_eta_is_refused(name):
    with pytest.raises(ValueError, match="eta must be >= 0"):
        get_sampler(name)(gaussian_denoiser, torch.randn(1, 1, 2, 2), karras_sigmas(3, 0.1, 1), eta=-0.5)


def test_a1111_comfyui_and_diffusers_names():
    assert resolve_sampler_name("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert resolve_sampler_name("Euler a") == ("euler_ancestral", None)
    assert resolve_sampler_name("DPM++ 2M SDE Exponential") == ("dpmpp_2m_sde", "exponential")
    assert resolve_sampler_name("DPM++ SDE Karras") == ("dpmpp_sde", "karras")
    assert resolve_sampler_name("dpm++ 3m sde  karras") == ("dpmpp_3m_sde", "karras")
    assert resolve_sampler_name("DPM2 a Karras") == ("dpm_2_ancestral", "karras")
    assert resolve_sampler_name("Euler SGM Uniform") == ("euler", "sgm_uniform")
    assert resolve_sampler_name("UniPC") == ("uni_pc", None)
    assert resolve_sampler_name("uni_pc_bh2") == ("uni_pc_bh2", None)
    assert resolve_sampler_name("DPMSolverMultistepScheduler") == ("dpmpp_2m", None)
    assert resolve_sampler_name("UniPCMultistepScheduler") == ("uni_pc_bh2", None)
    assert sampler_defaults("UniPCMultistepScheduler") == {"order": 2} and sampler_defaults("uni_pc_bh2") == {}
    assert sampler_defaults("DEISMultistepScheduler") == {"order": 2}
    for name in list(A1111_SAMPLERS) + list(DIFFUSERS_SCHEDULERS):
        assert resolve_sampler_name(name)[0] in SAMPLERS
    assert get_sampler("DPM++ 2M") is SAMPLERS["dpmpp_2m"]
    for bad in ("DPM++ 2M Karras Karras", "Euler b", "karras", ""):
        with pytest.raises(ValueError, match="unknown sampler .*valid: ddim, ddpm"):
            resolve_sampler_name(bad)


def test_restart_jumps_back_up_and_solves_again():
    sig = karras_sigmas(12, 0.01, 10.0).double()
    levels = []
    get_sampler("restart")(gaussian_denoiser, torch.randn(2, 1, 2, 2, dtype=torch.float64) * 10, sig,
                           generator=generators_for(0, 2), callback=lambda s: levels.append(s.sigma))
    ups = [i for i in range(1, len(levels)) if levels[i] > levels[i - 1]]
    assert len(ups) == 1 and levels[ups[0]] == pytest.approx(sig[(sig[:-1] - 2.0).abs().argmin()].item())
    assert len(levels) > 12
    with pytest.raises(ValueError, match="restart"):
        get_sampler("restart")(gaussian_denoiser, torch.randn(1, 1, 2, 2), sig, restart_min=3, restart_max=1)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_nfe_for_steps_counts_the_denoiser_calls_on_sd_sigmas(name, steps):
    """nfe_for_steps (with its default SD-range Karras sigmas for restart) is the number of calls."""
    calls = []

    def den(x, sigma, cond=None):
        calls.append(1)
        return gaussian_denoiser(x, sigma)

    sig = karras_sigmas(steps, 0.0292, 14.6146).double()
    get_sampler(name)(den, torch.randn(1, 1, 2, 2, dtype=torch.float64) * 14, sig, generator=generators_for(0, 1))
    assert len(calls) == nfe_for_steps(name, steps)


def test_registry_declares_each_sampler_once_and_the_cli_help_lists_them_all():
    from sumie.cli import build_parser
    from sumie.samplers import REGISTRY, sampler_help

    names = [s.name for s in REGISTRY]
    assert len(names) == len(set(names)) == len(SAMPLERS)
    assert nfe_for_steps("restart", 20) > 2 * 20  # a restart segment on top of 20 Heun steps
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    help_text = next(a.help for a in sub._actions if a.dest == "sampler")
    assert help_text == sampler_help() and all(n in help_text for n in names)
    assert "dpmpp_2m_sde_heun" in help_text


@pytest.mark.parametrize("name", ["ddim", "plms", "deis", "euler", "dpmpp_2m"])
def test_stop_at_sigma_returns_the_sample_at_the_final_level_without_calling_there(name):
    """StopAtSigma over [..., s_f, 0]: the sample at s_f, as if the schedule had ended there, with
    no denoiser call at s_f (diffusers' DDIM/PNDM with set_alpha_to_one=False, DEIS)."""
    from sumie.samplers.base import ReachedSigma, StopAtSigma

    sig = karras_sigmas(6, 0.5, 10.0).double()
    s_f = 0.2
    calls = []

    def den(x, sigma, cond=None):
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma)

    x = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 10
    with pytest.raises(ReachedSigma) as stop:
        get_sampler(name)(StopAtSigma(den, s_f), x, torch.cat([sig[:-1], sig.new_tensor([s_f, 0.0])]))
    assert len(calls) == nfe_for_steps(name, 6) and s_f not in calls
    # the same steps on an explicit schedule ending at s_f: Euler/DDIM take a plain step there
    if name in ("ddim", "euler"):
        y = x
        levels = torch.cat([sig[:-1], sig.new_tensor([s_f])])
        for i in range(6):
            d = gaussian_denoiser(y, levels[i:i + 1].expand(2))
            y = d + (y - d) * levels[i + 1] / levels[i]
        assert torch.allclose(stop.value.x, y)
