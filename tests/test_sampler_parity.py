"""sumie's samplers against k-diffusion's and diffusers' implementations of the same algorithms.

Same deterministic denoiser (the exact Gaussian-mixture posterior mean), same sigmas, same
initial noise, float64; stochastic samplers get the same noise (k-diffusion through its
``noise_sampler`` argument, diffusers through a shared generator or ``variance_noise``).
Both libraries are test-only dependencies.

k-diffusion 0.1.1's package ``__init__`` imports torchvision and scikit-image (training
utilities); only ``k_diffusion.sampling`` is needed, so it is loaded without them: the
package is registered with its real path but its ``__init__`` is not run, and an empty
``torchvision.transforms.functional`` is provided for the duration of the import
(``k_diffusion.utils`` imports it for image helpers the samplers never call).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import pytest
import torch

from sumie.diffusion.schedules import karras_sigmas
from sumie.metrics.sampler_accuracy import SD_BETAS, GaussianMixture, diffusers_table, run_diffusers
from sumie.samplers import SAMPLERS, generators_for, randn_like

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

GMM = GaussianMixture.benchmark(dim=6, components=5, seed=3)
SIGMA_MIN, SIGMA_MAX = 0.0292, 14.6


def load_k_diffusion_sampling():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        return None
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    stubs = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
    added = [n for n in stubs if n not in sys.modules]
    for n in added:
        sys.modules[n] = types.ModuleType(n)
    try:
        if "k_diffusion" not in sys.modules:
            pkg = types.ModuleType("k_diffusion")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["k_diffusion"] = pkg
        import k_diffusion.sampling as ks
        return ks
    finally:
        for n in added:
            del sys.modules[n]


KS = load_k_diffusion_sampling()
needs_k = pytest.mark.skipif(KS is None, reason="k-diffusion not installed")


def kd_model(x, sigma, **_):
    return GMM.denoise(x, sigma)


def start(n=4, seed=0):
    z = torch.randn(n, GMM.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z * math.sqrt(1 + SIGMA_MAX**2)


def sigmas(n=10):
    return karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)


# (sumie name, k-diffusion function, options for both, stochastic)
K_CASES = [
    ("euler", "sample_euler", {}, False),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 1.0}, True),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.5}, True),
    ("heun", "sample_heun", {}, False),
    ("dpm_2", "sample_dpm_2", {}, False),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {"eta": 1.0}, True),
    ("lms", "sample_lms", {}, False),
    ("lms", "sample_lms", {"order": 2}, False),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {"eta": 1.0}, True),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {"eta": 0.0}, False),
    ("dpmpp_sde", "sample_dpmpp_sde", {"eta": 1.0}, True),
    ("dpmpp_sde", "sample_dpmpp_sde", {"eta": 1.0, "r": 0.3}, True),
    ("dpmpp_2m", "sample_dpmpp_2m", {}, False),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 1.0}, True),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.0}, False),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 1.0, "solver_type": "heun"}, True),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 1.0}, True),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.0}, False),
]


@needs_k
@pytest.mark.parametrize("name,kname,opts,stochastic", K_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in K_CASES])
def test_matches_k_diffusion(name, kname, opts, stochastic):
    x, sig = start(), sigmas(12)
    gens = generators_for(11, x.shape[0]) if stochastic else None
    ours = SAMPLERS[name](GMM.denoise, x.clone(), sig, generator=gens, **opts)
    kw = dict(opts)
    if stochastic:
        ref_gens = generators_for(11, x.shape[0])
        kw["noise_sampler"] = lambda sigma, sigma_next: randn_like(x, ref_gens)
    theirs = getattr(KS, kname)(kd_model, x.clone(), sig, disable=True, **kw)
    assert (ours - theirs).abs().max().item() < 1e-10


@needs_k
def test_k_diffusion_schedules():
    from sumie.diffusion import schedules as S

    for n in (1, 5, 17):
        assert torch.allclose(S.karras_sigmas(n, 0.03, 14.6, 7.0), KS.get_sigmas_karras(n, 0.03, 14.6, 7.0).double(),
                              rtol=1e-6)
        assert torch.allclose(S.exponential_sigmas(n, 0.03, 14.6), KS.get_sigmas_exponential(n, 0.03, 14.6).double(),
                              rtol=1e-6)
        assert torch.allclose(S.polyexponential_sigmas(n, 0.03, 14.6, 2.0),
                              KS.get_sigmas_polyexponential(n, 0.03, 14.6, 2.0).double(), rtol=1e-6)


# ---------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


def sumie_sigmas_of(scheduler) -> torch.Tensor:
    """The decreasing noise levels a diffusers scheduler visits, ending in 0."""
    if hasattr(scheduler, "sigmas") and scheduler.sigmas is not None and len(scheduler.sigmas) > 1:
        s = scheduler.sigmas.double()
    else:
        s = diffusers_table(scheduler).sigmas[scheduler.timesteps.long()]
    s = s[torch.cat([torch.tensor([True]), s[1:] != s[:-1]])]  # Heun/KDPM2/PLMS visit levels twice
    return s if s[-1] == 0 else torch.cat([s, s.new_zeros(1)])


# (diffusers class, scheduler config, sumie sampler, sumie options, steps, seeded)
D_CASES = [
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "euler", {}, 10, False),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler", {}, 10, False),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, "euler_ancestral", {}, 10, True),
    ("HeunDiscreteScheduler", {"timestep_spacing": "trailing"}, "heun", {}, 8, False),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, "heun", {}, 8, False),
    ("KDPM2DiscreteScheduler", {"timestep_spacing": "trailing"}, "dpm_2", {}, 8, False),
    ("KDPM2AncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, "dpm_2_ancestral", {}, 8, True),
    ("LMSDiscreteScheduler", {"timestep_spacing": "trailing"}, "lms", {}, 10, False),
    ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, "lms", {}, 10, False),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "clip_sample": False}, "ddim", {}, 10, False),
    ("DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False}, "ddim", {}, 10, False),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "clip_sample": False}, "ddim", {"eta": 1.0}, 10, "eta"),
    ("DDPMScheduler", {"timestep_spacing": "trailing", "clip_sample": False}, "ddpm", {}, 10, True),
    ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": True}, "plms", {}, 10, False),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}, "dpmpp_2m", {}, 10, False),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "linspace"}, "dpmpp_2m", {}, 25, False),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "timestep_spacing": "trailing"}, "dpmpp_3m", {}, 16, False),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "timestep_spacing": "trailing"},
     "dpmpp_2m_sde", {}, 10, "variance_noise"),
    ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}, "uni_pc_bh2", {"order": 2}, 10, False),
    ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1", "timestep_spacing": "trailing"},
     "uni_pc", {"order": 3}, 10, False),
    ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2", "timestep_spacing": "trailing"},
     "uni_pc_bh2", {"order": 3}, 12, False),
    ("LCMScheduler", {"timestep_spacing": "trailing", "timestep_scaling": 1e12}, "lcm", {}, 6, True),
]


@pytest.mark.parametrize("cls,config,name,opts,steps,seeded", D_CASES,
                         ids=[f"{c[0].replace('Scheduler', '')}-{c[2]}-{'-'.join(map(str, c[1].values()))}"
                              for c in D_CASES])
def test_matches_diffusers(cls, config, name, opts, steps, seeded):
    sched = getattr(diffusers, cls)(**SD_BETAS, **config)
    z = torch.randn(1, GMM.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise_fn = None
    if seeded == "variance_noise":
        g_theirs = generators_for(5, 1)
        noise_fn = lambda x: randn_like(x.double(), g_theirs)  # noqa: E731
    traj = []
    theirs, nfe_theirs = run_diffusers(sched, GMM.denoise, z, steps, seed=5 if seeded in (True, "eta") else None,
                                       variance_noise=noise_fn, step_kwargs={"eta": 1.0} if seeded == "eta" else None,
                                       callback=lambda i, x: traj.append(x.double()))
    if cls == "UniPCMultistepScheduler" and config["solver_type"] == "bh1":
        # diffusers' bh1 final step to sigma = 0 computes B(h) * 0 with B(h) = -inf and returns NaN; the
        # order-1 step it means to take returns the x0 estimate at the last predictor point
        assert torch.isnan(theirs).all()
        sigma = sched.sigmas[-2].double()
        theirs = GMM.denoise(traj[-2] * (1 + sigma**2).sqrt(), sigma.reshape(1))  # VP -> VE
    sig = sumie_sigmas_of(sched)
    x = z * math.sqrt(1 + float(sig[0]) ** 2)
    calls = []

    def den(x, sigma, cond=None):
        calls.append(1)
        return GMM.denoise(x, sigma)

    ours = SAMPLERS[name](den, x, sig, generator=generators_for(5, 1) if seeded else None, **opts)
    assert len(calls) == nfe_theirs
    assert (ours - theirs.double()).abs().max().item() < 1e-5


@pytest.mark.parametrize("order,spacing", [(2, "trailing"), (3, "linspace")])
def test_deis_matches_diffusers_until_its_last_step(order, spacing):
    """diffusers' DEIS stops at sigma(t=0) = 0.029 instead of 0; every state before that matches."""
    sched = diffusers.DEISMultistepScheduler(**SD_BETAS, solver_order=order, timestep_spacing=spacing,
                                             lower_order_final=False)
    z = torch.randn(1, GMM.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    traj = []
    # diffusers keeps DEIS's sigmas in float32, which alone moves the result by ~1e-5; compare the
    # algorithm in float64
    set_timesteps = sched.set_timesteps
    sched.set_timesteps = lambda n: (set_timesteps(n), setattr(sched, "sigmas", sched.sigmas.double()))
    run_diffusers(sched, GMM.denoise, z, 12, callback=lambda i, x: traj.append(x.double()))
    assert sched.sigmas[-1] > 0  # the documented difference
    sig = torch.cat([sched.sigmas[:-1].double(), torch.zeros(1, dtype=torch.float64)])
    ours = []
    SAMPLERS["deis"](GMM.denoise, z * (1 + sig[0] ** 2).sqrt(), sig, order=order,
                     callback=lambda st: ours.append(st.x / math.sqrt(1 + st.sigma**2)))  # VE -> VP
    diffs = [(a - b).abs().max().item() for a, b in zip(ours[1:], traj[:-1])]
    assert len(diffs) == 11 and max(diffs) < 1e-7


def test_karras_in_dpmsolver_rounds_the_timestep_the_model_sees():
    """Documented difference: diffusers' DPMSolverMultistep with Karras sigmas steps with the exact
    Karras sigmas but calls the model at the rounded integer timestep; sumie calls the denoiser at
    the sigma it steps with. The gap is small but well above float error."""
    sched = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True)
    sched.set_timesteps(10)
    table = diffusers_table(sched)
    seen = table.t_to_sigma(sched.timesteps.double())
    assert not torch.allclose(seen, sched.sigmas[:-1].double(), rtol=1e-4)
    assert torch.allclose(seen, sched.sigmas[:-1].double(), rtol=3e-2)


def test_discrete_spacings_match_diffusers_timesteps():
    from sumie.diffusion.schedules import DiscreteSchedule, discrete_sigmas

    table = DiscreteSchedule.named("scaled_linear", 1000)
    for spacing in ("leading", "linspace", "trailing"):
        for n in (1, 7, 10, 50):
            sched = diffusers.DDIMScheduler(**SD_BETAS, timestep_spacing=spacing)
            sched.set_timesteps(n)
            assert torch.equal(discrete_sigmas(table, n, spacing)[:-1], table.sigmas[sched.timesteps.long()])
