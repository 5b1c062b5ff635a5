"""Build networks and denoisers from a :class:`RunConfig`, and load trained ones from disk."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import RunConfig, from_dict
from .diffusion.precond import Denoiser, make_denoiser
from .diffusion.schedules import DiscreteSchedule
from .io.checkpoint import CheckpointError, load_tensors, read_json, resolve_checkpoint
from .nn.unet import UNet


def build_schedule(config: RunConfig) -> DiscreteSchedule | None:
    d = config.diffusion
    if d.parameterization == "edm":
        return None
    return DiscreteSchedule.named(d.beta_schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr)


def build_denoiser(config: RunConfig) -> Denoiser:
    """A freshly initialised network wrapped in the configured preconditioning."""
    d = config.diffusion
    net = UNet(config.model)
    return make_denoiser(net, d.parameterization, schedule=build_schedule(config), sigma_data=d.sigma_data,
                         sigma_min=d.sigma_min, sigma_max=d.sigma_max)


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names every missing, unexpected or mis-shaped tensor."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
        if bad:
            parts.append("shape mismatch: " + "; ".join(bad[:3]))
        raise CheckpointError(f"{source} does not match the model config: " + ", ".join(parts))
    module.load_state_dict(state)


def load_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> tuple[Denoiser, RunConfig]:
    """Load a trained denoiser from a run folder or ``ckpt-*`` folder (EMA weights by default)."""
    ckpt = resolve_checkpoint(path)
    config = from_dict(read_json(ckpt / "config.json"))
    denoiser = build_denoiser(config)
    name = "ema.safetensors" if ema else "model.safetensors"
    load_state_strict(denoiser.net, load_tensors(ckpt / name), str(ckpt / name))
    return denoiser.to(device).eval(), config
