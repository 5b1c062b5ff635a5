"""Which noise levels a Stable Diffusion model is sampled at: diffusers' scheduler configs,
read the way diffusers reads them, and the A1111/ComfyUI default for single files.

A diffusers folder ships ``scheduler/scheduler_config.json``; a key it does not set takes the
default of the scheduler *class* that reads it (SD 1.5's and 2.1's configs set no
``timestep_spacing``, so ``EulerDiscreteScheduler`` spaces "linspace" while ``DDIMScheduler``
spaces "leading"). sumie picks, for each sampler, the diffusers class that implements it
(:data:`SAMPLER_SCHEDULER`), lays the class defaults under the file's keys, and computes that
class's timesteps (``set_timesteps``):

* "euler" classes (Euler, Euler a, Heun, DPM2, LMS, DPM++ SDE): n timesteps, "linspace" over
  [0, T-1] unrounded, sigma interpolated linearly in t (``np.interp``);
* "ddim" classes (DDIM, DDPM, PNDM, LCM): n integer timesteps;
* "multistep" classes (DPM-Solver++, UniPC, DEIS): n + 1 intervals ("linspace":
  round(linspace(0, T-1, n+1))[::-1][:-1]; "leading": step ratio T // (n+1)), so 20 steps
  start at 999 ("linspace") or 951 ("leading" + 1) and go 999, 946, ... / 951, 904, ...

Single files carry no scheduler. For them sumie uses what A1111 ("Automatic"/"Normal") and
ComfyUI ("normal") use by default for their k-diffusion samplers: n timesteps spaced evenly
from T-1 to 0 (k-diffusion ``get_sigmas``), sigma interpolated in log sigma; and for DDIM and
PLMS A1111's ``ddim_discretize="uniform"``: "leading" with offset 1.
"""

from __future__ import annotations

import numpy as np
import torch

from ...diffusion.schedules import DiscreteSchedule, append_zero

# the diffusers defaults of each class, for the keys that decide the timesteps
_EULER = {"kind": "euler", "timestep_spacing": "linspace", "steps_offset": 0}
_DDIM = {"kind": "ddim", "timestep_spacing": "leading", "steps_offset": 0}
_MULTI = {"kind": "multistep", "timestep_spacing": "linspace", "steps_offset": 0}
CLASS_DEFAULTS: dict[str, dict] = {
    "EulerDiscreteScheduler": _EULER, "EulerAncestralDiscreteScheduler": _EULER, "HeunDiscreteScheduler": _EULER,
    "KDPM2DiscreteScheduler": _EULER, "KDPM2AncestralDiscreteScheduler": _EULER, "LMSDiscreteScheduler": _EULER,
    "DPMSolverSDEScheduler": _EULER,
    "DDIMScheduler": {**_DDIM, "set_alpha_to_one": True}, "DDPMScheduler": _DDIM,
    "PNDMScheduler": {**_DDIM, "set_alpha_to_one": False}, "LCMScheduler": {**_DDIM, "set_alpha_to_one": True},
    "DPMSolverMultistepScheduler": _MULTI, "UniPCMultistepScheduler": _MULTI, "DEISMultistepScheduler": _MULTI,
}

# sumie sampler -> the diffusers class whose timesteps it takes from a folder's config
SAMPLER_SCHEDULER: dict[str, str] = {
    "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler", "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_ancestral": "KDPM2AncestralDiscreteScheduler", "lms": "LMSDiscreteScheduler", "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler", "plms": "PNDMScheduler", "ipndm": "EulerDiscreteScheduler",
    "deis": "DEISMultistepScheduler", "dpmpp_2s_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_sde": "DPMSolverSDEScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler", "dpmpp_2m_sde_heun": "DPMSolverMultistepScheduler",
    "dpmpp_3m": "DPMSolverMultistepScheduler", "dpmpp_3m_sde": "DPMSolverMultistepScheduler",
    "uni_pc": "UniPCMultistepScheduler", "uni_pc_bh2": "UniPCMultistepScheduler", "restart": "EulerDiscreteScheduler",
    "lcm": "LCMScheduler",
}

# single files: A1111/ComfyUI defaults (module docstring)
SINGLE_FILE = {"kind": "normal", "timestep_spacing": "normal", "steps_offset": 0, "set_alpha_to_one": True}
SINGLE_FILE_LEADING = {"kind": "ddim", "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": True}


def resolve_scheduler(file_config: dict | None, sampler: str) -> dict:
    """The scheduler settings ``sampler`` runs with: the class defaults of the diffusers class that
    implements it under the keys ``file_config`` sets; ``None`` (a single file): A1111/ComfyUI's."""
    if file_config is None:
        return dict(SINGLE_FILE_LEADING if sampler in ("ddim", "plms") else SINGLE_FILE)
    cls = SAMPLER_SCHEDULER.get(sampler, "EulerDiscreteScheduler")
    out = dict(CLASS_DEFAULTS[cls])
    out.update({k: v for k, v in file_config.items() if k in ("timestep_spacing", "steps_offset", "set_alpha_to_one")
                and v is not None and (k != "set_alpha_to_one" or "set_alpha_to_one" in out)})
    out["class"] = cls
    return out


def timesteps(num_train: int, steps: int, spacing: str, offset: int = 0, kind: str = "euler") -> np.ndarray:
    """The decreasing timesteps diffusers' ``set_timesteps`` picks (module docstring), float64."""
    T = num_train
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    if kind == "multistep":
        if spacing == "linspace":
            return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy()
        if spacing == "leading":
            return (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + offset
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps)[::-1].copy()
        return ts.round() if kind == "ddim" else ts
    elif spacing == "leading":
        return (np.arange(0, steps) * (T // steps)).round()[::-1] + offset
    if spacing == "trailing":
        return np.arange(T, 0, -T / steps).round()[:steps] - 1
    raise ValueError(f"unknown timestep spacing {spacing!r}; valid: leading, linspace, trailing")


def final_sigma(schedule: DiscreteSchedule, config: dict) -> float:
    """Where diffusers' last step lands: 0, or the noise level of timestep 0 (sigma ~ 0.029 for SD)
    for DDIM and PNDM with ``set_alpha_to_one=False`` (PNDM's class default) and for DEIS, whose
    ``set_timesteps`` always ends at sigma(t=0)."""
    cls = config.get("class")
    if cls == "DEISMultistepScheduler" or (cls in ("DDIMScheduler", "PNDMScheduler")
                                           and not config.get("set_alpha_to_one", True)):
        return float(schedule.sigmas[0])
    return 0.0


def config_sigmas(schedule: DiscreteSchedule, steps: int, config: dict) -> tuple[torch.Tensor, float]:
    """(sigmas ending in 0, final noise level) for ``steps`` steps under a resolved scheduler config
    (:func:`resolve_scheduler`). With a final level above 0 (:func:`final_sigma`) the sigmas are
    the ``steps`` levels, the final level and 0: sampling stops on reaching the final level
    (:class:`sumie.samplers.base.StopAtSigma`), so ``steps`` steps are taken, as in diffusers."""
    T = schedule.num_steps
    sig = schedule.sigmas.double()
    if config["kind"] == "normal":  # k-diffusion get_sigmas: t linear from T-1 to 0, log-sigma interpolation
        sigmas = append_zero(schedule.t_to_sigma(torch.linspace(T - 1, 0, steps, dtype=torch.float64)))
    else:
        ts = timesteps(T, steps, config["timestep_spacing"], int(config["steps_offset"]), config["kind"])
        ts = np.clip(ts, 0, T - 1)
        sigmas = append_zero(torch.from_numpy(np.interp(ts, np.arange(T), sig.numpy())))
    final = final_sigma(schedule, config)
    if final:
        sigmas = torch.cat([sigmas[:-1], sigmas.new_tensor([final, 0.0])])
    return sigmas, final
