"""Noise schedules: the forward process and the noise levels it passes through.

Everything in sumie is written in the variance-exploding form of Karras et al. 2022
("Elucidating the Design Space of Diffusion-Based Generative Models", EDM), eq. 1:

    x_sigma = x0 + sigma * eps,       eps ~ N(0, I)

A discrete variance-preserving DDPM (Ho et al. 2020) with cumulative products
alpha_bar_t is the same process seen through the scaling ``z_t = x / sqrt(1 + sigma^2)``
with ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``; the functions below convert
between timestep, alpha_bar and sigma so that both worlds meet in one sampler suite.

Two things are kept apart here, as in EDM section 5: the *training* distribution of
sigma (``SigmaSampler``) and the *sampling* discretisation (functions returning a
decreasing tensor of sigmas that ends in 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


# ---------------------------------------------------------------------------
# Discrete DDPM schedules
# ---------------------------------------------------------------------------

def betas_linear(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear beta schedule, Ho et al. 2020 section 4."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def betas_scaled_linear(num_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's "scaled linear" schedule: linear in sqrt(beta), Rombach et al. 2022."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2


def betas_cosine(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule, Nichol & Dhariwal 2021 eq. 17, betas clipped at ``max_beta``."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def make_betas(kind: str, num_steps: int = 1000, beta_start: float | None = None,
               beta_end: float | None = None) -> torch.Tensor:
    """Betas of a named schedule (``linear``, ``scaled_linear``, ``cosine``) in float64."""
    if num_steps < 2:
        raise ValueError(f"a discrete schedule needs at least 2 timesteps, got {num_steps}")
    kw = {k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if v is not None}
    if kind == "linear":
        return betas_linear(num_steps, **kw)
    if kind == "scaled_linear":
        return betas_scaled_linear(num_steps, **kw)
    if kind == "cosine":
        if kw:
            raise ValueError("the cosine schedule takes no beta_start/beta_end")
        return betas_cosine(num_steps)
    raise ValueError(f"unknown beta schedule {kind!r}; valid: {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR, Lin et al. 2023 ("Common Diffusion
    Noise Schedules and Sample Steps Are Flawed"), Algorithm 1."""
    alphas_bar_sqrt = torch.cumprod(1 - betas.double(), 0).sqrt()
    a0, aT = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * a0 / (a0 - aT)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), Ho et al. 2020 eq. 4."""
    return torch.cumprod(1 - betas.double(), 0)


def alpha_bar_to_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar): the VP process seen in VE form (EDM table 1)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    """alpha_bar = 1 / (1 + sigma^2), inverse of :func:`alpha_bar_to_sigma`."""
    return 1 / (1 + sigma**2)


# Zero-terminal-SNR schedules reach alpha_bar = 0, i.e. sigma = inf; like ComfyUI we
# clamp the last alpha_bar to a tiny positive value so that sigma_max stays finite.
_MIN_ALPHA_BAR = 4.8973451890853435e-08


@dataclass(frozen=True)
class DiscreteSchedule:
    """A DDPM-style schedule of ``num_steps`` timesteps, exposed as sigmas.

    ``sigmas[t]`` is increasing in t. Continuous timesteps between grid points are
    interpolated linearly in log-sigma, as k-diffusion's ``DiscreteSchedule`` does.
    """

    sigmas: torch.Tensor  # (T,) float64, increasing

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "DiscreteSchedule":
        ab = alphas_cumprod(betas).clamp(min=_MIN_ALPHA_BAR)
        return cls(alpha_bar_to_sigma(ab))

    @classmethod
    def named(cls, kind: str = "scaled_linear", num_steps: int = 1000, *, zero_terminal_snr: bool = False,
              beta_start: float | None = None, beta_end: float | None = None) -> "DiscreteSchedule":
        betas = make_betas(kind, num_steps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls.from_betas(betas)

    @property
    def num_steps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return sigma_to_alpha_bar(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous timestep -> sigma, by linear interpolation of log-sigma."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_steps - 1)
        log_sigmas = self.sigmas.log().to(t.device)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_steps - 1)
        w = t - lo
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma -> continuous timestep, the inverse of :meth:`t_to_sigma` (clamped to the grid)."""
        sigma = torch.as_tensor(sigma)
        dtype = sigma.dtype if sigma.is_floating_point() else torch.float32
        log_sigmas = self.sigmas.log().to(sigma.device)
        log_sigma = sigma.double().clamp(min=1e-30).log()
        # index of the grid interval [lo, lo+1] that contains log_sigma
        lo = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1)
        lo = lo.clamp(0, self.num_steps - 2).reshape(log_sigma.shape)
        low, high = log_sigmas[lo], log_sigmas[lo + 1]
        w = ((log_sigma - low) / (high - low)).clamp(0, 1)
        return (lo + w).to(dtype)


# ---------------------------------------------------------------------------
# Sampling discretisations (decreasing sigmas ending in 0)
# ---------------------------------------------------------------------------

def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: n noise levels spaced evenly in sigma^(1/rho), plus a final 0."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def discrete_sigmas(schedule: DiscreteSchedule, n: int, spacing: str = "trailing") -> torch.Tensor:
    """n of the model's own timesteps, with diffusers' spacing conventions, plus a final 0.

    ``linspace`` and ``trailing`` follow Lin et al. 2023 table 2; ``leading`` is the
    original DDIM/Stable Diffusion spacing (which never starts at the last timestep).
    """
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    T = schedule.num_steps
    if n > T:
        raise ValueError(f"steps ({n}) cannot exceed the model's {T} timesteps with discrete spacing")
    if spacing == "linspace":
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0)
    elif spacing == "leading":
        ratio = T // n
        ts = (torch.arange(n, dtype=torch.float64) * ratio).flip(0)
    elif spacing == "trailing":
        ratio = T / n
        ts = (torch.arange(T, 0, -ratio, dtype=torch.float64).round() - 1)[:n]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: leading, linspace, trailing")
    return append_zero(schedule.sigmas[ts.long()])


# ---------------------------------------------------------------------------
# Training distributions of sigma
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LogNormalSigma:
    """EDM training distribution: ln(sigma) ~ N(P_mean, P_std^2), Karras et al. 2022 table 1."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        z = torch.randn(n, generator=generator, device=device)
        return (z * self.p_std + self.p_mean).exp()


@dataclass(frozen=True)
class UniformTimestepSigma:
    """DDPM training distribution: t ~ U{0..T-1}, sigma = sigma_t (Ho et al. 2020, Algorithm 1)."""

    schedule: DiscreteSchedule

    def __call__(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        t = torch.randint(0, self.schedule.num_steps, (n,), generator=generator, device=device)
        return self.schedule.sigmas.to(device)[t].float()


# ---------------------------------------------------------------------------
# The forward process
# ---------------------------------------------------------------------------

def add_noise(x0: torch.Tensor, sigma: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """Exact sample of the forward process: x_sigma = x0 + sigma * eps (EDM eq. 1)."""
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    return x0 + append_dims(sigma, x0.ndim) * noise


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Broadcast a (B,) or scalar tensor against a (B, ...) tensor of ``ndim`` dimensions."""
    if x.ndim == 0:
        return x
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n noise levels evenly spaced in log-sigma, plus a final 0 (k-diffusion ``get_sigmas_exponential``)."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """n noise levels with log-sigma following a ramp**rho, plus a final 0 (k-diffusion
    ``get_sigmas_polyexponential``); rho = 1 is :func:`exponential_sigmas`."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return append_zero((ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp())


def _model_table(discrete: DiscreteSchedule | None, sigma_min: float, sigma_max: float) -> DiscreteSchedule:
    """The model's own sigma table; for continuous models 1000 levels evenly spaced in log-sigma
    (as ComfyUI's ``ModelSamplingContinuousEDM.sigmas``)."""
    if discrete is not None:
        return discrete
    return DiscreteSchedule(torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000, dtype=torch.float64).exp())


def simple_sigmas(table: DiscreteSchedule, n: int) -> torch.Tensor:
    """ComfyUI's "simple" schedule: every (T/n)-th entry of the model's sigma table from the top."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    T = table.num_steps
    if n > T:
        raise ValueError(f"steps ({n}) cannot exceed the model's {T} noise levels")
    idx = [T - 1 - int(k * T / n) for k in range(n)]
    return append_zero(table.sigmas[idx])


def sgm_uniform_sigmas(table: DiscreteSchedule, n: int) -> torch.Tensor:
    """"sgm_uniform" (Stability's sgm / ComfyUI ``normal_scheduler(sgm=True)``): n continuous
    timesteps evenly spaced from the top, the last one short of t = 0, mapped to sigma."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    t_max = float(table.sigma_to_t(torch.tensor(table.sigma_max, dtype=torch.float64)))
    t_min = float(table.sigma_to_t(torch.tensor(table.sigma_min, dtype=torch.float64)))
    ts = torch.linspace(t_max, t_min, n + 1, dtype=torch.float64)[:-1]
    return append_zero(table.t_to_sigma(ts))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by Lentz's continued fraction (Numerical Recipes 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return math.exp(log_front) * f / a


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution, by bisection on :func:`_betainc`."""
    if q <= 0 or q >= 1:
        return 0.0 if q <= 0 else 1.0
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def beta_sigmas(table: DiscreteSchedule, n: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Beta schedule, Lee et al. 2024 ("Beta Sampling is All You Need"), as ComfyUI's
    ``beta_scheduler``: timesteps at the Beta(alpha, beta) quantiles 1 - k/n of the model's
    table, rounded, repeated timesteps dropped (so it may return fewer than n steps)."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    T = table.num_steps - 1
    ts = [round(beta_ppf(1 - k / n, alpha, beta) * T) for k in range(n)]
    idx = [t for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
    return append_zero(table.sigmas[idx])


# Few-step schedule fitted on the Gaussian-mixture accuracy benchmark
# (sumie.metrics.sampler_accuracy.fit_schedule), in the spirit of Sabour et al. 2024,
# "Align Your Steps": fractions of log(sigma_max / sigma_min) above sigma_min for 10 steps.
AYS_GMM_10 = (1.0, 0.88488, 0.74161, 0.60973, 0.5427, 0.43604, 0.33299, 0.20548, 0.14998, 0.0)


def fitted_sigmas(n: int, sigma_min: float, sigma_max: float, fractions=None) -> torch.Tensor:
    """A schedule given as fractions u_k in [0, 1] of log-sigma (1 = sigma_max, 0 = sigma_min) at
    some number of steps, resampled to n steps by linear interpolation in the step index
    (Align Your Steps' ``loglinear_interp``), plus a final 0."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    u = torch.as_tensor(AYS_GMM_10 if fractions is None else fractions, dtype=torch.float64)
    pos = torch.linspace(0, len(u) - 1, n, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=len(u) - 2)
    w = pos - lo
    un = (1 - w) * u[lo] + w * u[lo + 1]
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return append_zero((log_min + un * (log_max - log_min)).exp())


SAMPLING_SCHEDULES = ("karras", "exponential", "polyexponential", "simple", "sgm_uniform", "beta", "ays_gmm",
                      "leading", "linspace", "trailing")


def sampling_sigmas(name: str, steps: int, *, sigma_min: float, sigma_max: float,
                    discrete: DiscreteSchedule | None = None, rho: float = 7.0) -> torch.Tensor:
    """The sampling discretisation called ``name``: a decreasing float64 tensor of steps+1 sigmas ending in 0.

    ``leading``/``linspace``/``trailing`` pick the model's own discrete timesteps and need
    a discrete schedule; ``simple``, ``sgm_uniform`` and ``beta`` use the model's sigma table
    (a log-uniform table of 1000 levels for continuous models); the others are continuous in
    [sigma_min, sigma_max]. ``rho`` is Karras' rho for ``karras`` and the ramp exponent of
    ``polyexponential`` (where 7 would be extreme; it uses rho = 1 unless rho != 7 is given).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if name == "karras":
        return karras_sigmas(steps, sigma_min, sigma_max, rho)
    if name == "exponential":
        return exponential_sigmas(steps, sigma_min, sigma_max)
    if name == "polyexponential":
        return polyexponential_sigmas(steps, sigma_min, sigma_max, 1.0 if rho == 7.0 else rho)
    if name == "ays_gmm":
        return fitted_sigmas(steps, sigma_min, sigma_max)
    if name in ("simple", "sgm_uniform", "beta"):
        table = _model_table(discrete, sigma_min, sigma_max)
        return {"simple": simple_sigmas, "sgm_uniform": sgm_uniform_sigmas, "beta": beta_sigmas}[name](table, steps)
    if name in ("leading", "linspace", "trailing"):
        if discrete is None:
            raise ValueError(f"schedule {name!r} picks a discrete model's timesteps; this model is continuous "
                             f"(use karras or exponential)")
        return discrete_sigmas(discrete, steps, name)
    raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SAMPLING_SCHEDULES)}")
