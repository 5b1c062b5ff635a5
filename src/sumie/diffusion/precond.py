"""Preconditioning: turn a raw network into the denoiser ``D(x, sigma, cond) -> x0``.

Karras et al. 2022 (EDM) eq. 7 writes every parameterisation as

    D(x; sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x; c_noise(sigma))

with the coefficients of table 1. The raw network ``F`` never sees sigma directly, only
``c_noise``. An epsilon-, v- or x0-predicting DDPM and an EDM network are all the same
object to the rest of sumie once wrapped here.

The raw network is any module called as ``net(x_in, c_noise, cond)`` where ``cond`` is a
dict (for example ``{"class_labels": ...}`` or ``{"context": ...}``) or None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .schedules import DiscreteSchedule, append_dims

PARAMETERIZATIONS = ("eps", "v", "x0", "edm")


@dataclass(frozen=True)
class Scalings:
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


class Denoiser(nn.Module):
    """Base class: ``forward(x, sigma, cond)`` returns the x0 estimate (EDM eq. 7)."""

    sigma_data: float = 1.0

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def scalings(self, sigma: torch.Tensor) -> Scalings:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def sigma_min(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def sigma_max(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def raw(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> tuple[torch.Tensor, Scalings]:
        """The raw network output F and the scalings used to produce it."""
        sigma = _as_batch(sigma, x)
        s = self.scalings(sigma)
        c_in = append_dims(s.c_in, x.ndim).to(x.dtype)
        return self.net(x * c_in, s.c_noise, cond), s

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        out, s = self.raw(x, sigma, cond)
        c_skip = append_dims(s.c_skip, x.ndim).to(out.dtype)
        c_out = append_dims(s.c_out, x.ndim).to(out.dtype)
        return c_skip * x.to(out.dtype) + c_out * out


def _as_batch(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma


class DiscreteDenoiser(Denoiser):
    """A network trained on a discrete VP schedule, fed the continuous timestep as c_noise.

    ``prediction`` chooses the target the network was trained to output:
    ``eps`` (Ho et al. 2020), ``v`` (Salimans & Ho 2022, "Progressive Distillation", sec. 4)
    or ``x0``. In VE form the scalings are (k-diffusion's ``DiscreteEpsDDPMDenoiser`` and
    ``DiscreteVDDPMDenoiser``):

        eps: c_skip = 1,              c_out = -sigma
        v:   c_skip = 1/(sigma^2+1),  c_out = -sigma/sqrt(sigma^2+1)
        x0:  c_skip = 0,              c_out = 1
        all: c_in = 1/sqrt(sigma^2+1), c_noise = t(sigma)
    """

    def __init__(self, net: nn.Module, schedule: DiscreteSchedule, prediction: str = "eps",
                 round_timesteps: bool = False):
        super().__init__(net)
        # c_noise rounded to the nearest training timestep, as diffusers' multistep schedulers do with
        # Karras/exponential sigmas (they round the timestep the network sees, not sigma)
        self.round_timesteps = round_timesteps
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"unknown prediction {prediction!r}; valid: eps, v, x0")
        self.schedule = schedule
        self.prediction = prediction

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        s2 = sigma.double() ** 2
        c_in = (s2 + 1).rsqrt()
        if self.prediction == "eps":
            c_skip, c_out = torch.ones_like(s2), -sigma.double()
        elif self.prediction == "v":
            c_skip, c_out = 1 / (s2 + 1), -sigma.double() * c_in
        else:
            c_skip, c_out = torch.zeros_like(s2), torch.ones_like(s2)
        c_noise = self.schedule.sigma_to_t(sigma.double())
        c_noise = (c_noise.round() if self.round_timesteps else c_noise).float()
        f = torch.float32
        return Scalings(c_skip.to(f), c_out.to(f), c_in.to(f), c_noise)


class EDMDenoiser(Denoiser):
    """EDM preconditioning, Karras et al. 2022 table 1:

        c_skip = sd^2/(sigma^2+sd^2), c_out = sigma*sd/sqrt(sigma^2+sd^2),
        c_in = 1/sqrt(sigma^2+sd^2),  c_noise = ln(sigma)/4
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__(net)
        self.sigma_data = sigma_data
        self._sigma_min, self._sigma_max = sigma_min, sigma_max

    @property
    def sigma_min(self) -> float:
        return self._sigma_min

    @property
    def sigma_max(self) -> float:
        return self._sigma_max

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        sd = self.sigma_data
        s = sigma.float()
        denom = s**2 + sd**2
        return Scalings(sd**2 / denom, s * sd * denom.rsqrt(), denom.rsqrt(), s.log() / 4)


def make_denoiser(net: nn.Module, parameterization: str, *, schedule: DiscreteSchedule | None = None,
                  sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Denoiser:
    """Wrap ``net`` in the preconditioning named by ``parameterization``."""
    if parameterization == "edm":
        return EDMDenoiser(net, sigma_data, sigma_min, sigma_max)
    if parameterization in ("eps", "v", "x0"):
        if schedule is None:
            raise ValueError(f"{parameterization}-prediction needs a discrete schedule")
        return DiscreteDenoiser(net, schedule, parameterization)
    raise ValueError(f"unknown parameterization {parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}")
