"""Sampling discretisations added with the sampler suite: polyexponential, simple, sgm_uniform,
beta, the fitted few-step schedule; and the errors every schedule gives for bad input."""

import math

import pytest
import torch

from sumie.diffusion import schedules as S

TABLE = S.DiscreteSchedule.named("scaled_linear", 1000)
SMIN, SMAX = TABLE.sigma_min, TABLE.sigma_max


@pytest.mark.parametrize("name", S.SAMPLING_SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 37])
def test_every_schedule_is_a_valid_sampling_discretisation(name, steps):
    sig = S.sampling_sigmas(name, steps, sigma_min=SMIN, sigma_max=SMAX, discrete=TABLE)
    assert sig.dtype == torch.float64 and sig[-1] == 0
    assert (sig[1:] < sig[:-1]).all()
    if name == "beta":  # repeated timesteps are dropped
        assert 2 <= len(sig) <= steps + 1
    else:
        assert len(sig) == steps + 1
    assert sig[0] <= SMAX * (1 + 1e-9) and sig[-2] >= SMIN * (1 - 1e-9)
    if name != "leading" and (name, steps) != ("linspace", 1):  # diffusers' linspace of 1 step is t = 0
        assert sig[0] == pytest.approx(SMAX, rel=1e-6)


@pytest.mark.parametrize("name", S.SAMPLING_SCHEDULES)
def test_every_schedule_refuses_zero_steps(name):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        S.sampling_sigmas(name, 0, sigma_min=SMIN, sigma_max=SMAX, discrete=TABLE)


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: karras, exponential, polyexponential, simple"):
        S.sampling_sigmas("cosine", 10, sigma_min=SMIN, sigma_max=SMAX)


def test_continuous_models_get_a_log_uniform_table_for_table_schedules():
    for name in ("simple", "sgm_uniform", "beta"):
        sig = S.sampling_sigmas(name, 8, sigma_min=0.002, sigma_max=80.0)
        assert sig[0] == pytest.approx(80.0) and sig[-2] >= 0.002 and sig[-1] == 0
    with pytest.raises(ValueError, match="continuous"):
        S.sampling_sigmas("trailing", 8, sigma_min=0.002, sigma_max=80.0)


def test_polyexponential_rho1_is_exponential():
    assert torch.allclose(S.polyexponential_sigmas(9, SMIN, SMAX, 1.0), S.exponential_sigmas(9, SMIN, SMAX))
    # rho > 1 spends more steps at low noise than exponential does
    assert S.polyexponential_sigmas(9, SMIN, SMAX, 2.0)[4] < S.exponential_sigmas(9, SMIN, SMAX)[4]


def test_simple_and_sgm_uniform_follow_their_definitions():
    # ComfyUI simple: sigmas[-(1 + int(k * T / n))] of the ascending table
    n = 7
    expect = [TABLE.sigmas[-(1 + int(k * 1000 / n))].item() for k in range(n)] + [0.0]
    assert S.simple_sigmas(TABLE, n).tolist() == pytest.approx(expect, rel=1e-12)
    # sgm_uniform: n + 1 evenly spaced timesteps from t(sigma_max) to t(sigma_min), last dropped
    ts = torch.linspace(999, 0, n + 1, dtype=torch.float64)[:-1]
    assert torch.allclose(S.sgm_uniform_sigmas(TABLE, n)[:-1], TABLE.t_to_sigma(ts), rtol=1e-9)


def test_beta_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for a, b in ((0.6, 0.6), (0.5, 0.7), (2.0, 3.0)):
        for q in (0.0, 1e-6, 0.1, 0.5, 0.93, 1.0):
            assert S.beta_ppf(q, a, b) == pytest.approx(stats.beta.ppf(q, a, b), abs=1e-9)
    # ComfyUI's beta_scheduler on the same table
    import numpy as np

    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, 10, endpoint=False), 0.6, 0.6) * 999)
    assert S.beta_sigmas(TABLE, 10).tolist()[:-1] == pytest.approx(TABLE.sigmas[ts.astype(int)].tolist())


def test_fitted_schedule_interpolates_in_log_sigma():
    u = S.AYS_GMM_10
    sig10 = S.fitted_sigmas(10, SMIN, SMAX)
    assert sig10[:-1].log().tolist() == pytest.approx([math.log(SMIN) + v * math.log(SMAX / SMIN) for v in u])
    sig19 = S.fitted_sigmas(19, SMIN, SMAX)  # every other level of the 19-step schedule is a fitted one
    assert torch.allclose(sig19[:-1:2], sig10[:-1])
    assert (S.fitted_sigmas(4, SMIN, SMAX, [1.0, 0.5, 0.0])[:-1].log() - math.log(SMIN)).tolist() == \
        pytest.approx([v * math.log(SMAX / SMIN) for v in (1.0, 2 / 3, 1 / 3, 0.0)])
