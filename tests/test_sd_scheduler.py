"""sumie's reading of diffusers scheduler configs (sumie.io.sd.scheduler) against diffusers'
own ``set_timesteps`` for every scheduler class sumie maps a sampler onto, every spacing, with
the keys the real SD configs set and leave out (issue 22 items 2-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sumie.io.sd.scheduler import CLASS_DEFAULTS, SAMPLER_SCHEDULER, config_sigmas, resolve_scheduler, timesteps
from sumie.pipelines.sd import scheduler_schedule

diffusers = pytest.importorskip("diffusers")
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SD15 = {"_class_name": "PNDMScheduler", **BETAS, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "clip_sample": False, "trained_betas": None}


def test_issue_numbers():
    """SD 1.5's config has no timestep_spacing: Euler spaces linspace (999, 946.4, ...), DDIM leading+1
    (951, 901, ...); multistep classes n+1 intervals (linspace 999, 949, ...; leading+1 951, 904, ...)."""
    assert resolve_scheduler(SD15, "euler")["timestep_spacing"] == "linspace"
    assert resolve_scheduler(SD15, "ddim")["timestep_spacing"] == "leading"
    assert timesteps(1000, 20, "leading", 1, "multistep")[:2].tolist() == [941.0, 894.0]
    assert timesteps(1000, 20, "linspace", 0, "multistep")[:2].tolist() == [999.0, 949.0]
    assert timesteps(1000, 20, "leading", 1, "ddim")[:2].tolist() == [951.0, 901.0]
    assert resolve_scheduler(SD15, "uni_pc_bh2")["kind"] == "multistep"
    assert resolve_scheduler(None, "euler")["kind"] == "normal"


@pytest.mark.parametrize("cls", sorted(CLASS_DEFAULTS))
@pytest.mark.parametrize("spacing", [None, "leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 20, 50])
def test_noise_levels_equal_diffusers_set_timesteps(cls, spacing, steps):
    if cls == "LCMScheduler":
        pytest.skip("LCM picks timesteps from its original_inference_steps grid")
    file_cfg = {**SD15, **({} if spacing is None else {"timestep_spacing": spacing})}
    ref = getattr(diffusers, cls).from_config({k: v for k, v in file_cfg.items() if k != "_class_name"})
    ref.set_timesteps(steps)
    sampler = next(s for s, c in SAMPLER_SCHEDULER.items() if c == cls)
    cfg = resolve_scheduler(file_cfg, sampler)
    sched = scheduler_schedule(file_cfg)
    sigmas, final = config_sigmas(sched, steps, cfg)
    want_t = ref.timesteps.double().numpy()
    if cls == "PNDMScheduler":  # PLMS repeats its second timestep (the pseudo step): compare the distinct ones
        want_t = np.array(sorted(set(want_t.tolist()), reverse=True))
    if cls in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
               "DPMSolverSDEScheduler"):  # two evaluations per step: every other entry is a step's start
        want_t = want_t[::2]
    # diffusers' sigma at its (possibly fractional) timesteps: interpolated linearly in t
    want = np.interp(want_t[:steps], np.arange(1000), sched.sigmas.numpy())
    np.testing.assert_allclose(sigmas[:steps].numpy(), want, rtol=1e-6)
    assert (final > 0) == (cls == "DEISMultistepScheduler" or
                           (cls in ("DDIMScheduler", "PNDMScheduler") and not cfg.get("set_alpha_to_one", True)))
    if final:
        assert sigmas[-2].item() == pytest.approx(final) and sigmas[-1] == 0
