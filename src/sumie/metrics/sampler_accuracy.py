"""Sampler accuracy on a problem with a known answer: a mixture of Gaussians.

For data p(x0) = sum_k w_k N(mu_k, diag(s_k^2)) the forward process x = x0 + sigma * eps
keeps every component Gaussian, so the optimal denoiser (the posterior mean, Karras et al.
2022 eq. 2-3) has the closed form

    D(x; sigma) = sum_k p(k | x) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)],
    p(k | x) ~ w_k N(x; mu_k, diag(s_k^2 + sigma^2)).

With it the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al.
eq. 3) from any starting noise can be solved to near machine precision by a very fine
classical Runge-Kutta integration in log(sigma); every sampler's final sample is compared
with that solution (RMS error), and stochastic samplers by sliced Wasserstein distance to
fresh draws from the mixture.

The problem is posed on Stable Diffusion's discrete "scaled linear" schedule (1000 steps,
sigma in [0.0292, 14.61]) so that diffusers' schedulers can run it too, with the initial
condition of a VP sampler: x_T = z * sqrt(1 + sigma_max^2), z ~ N(0, I).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from ..diffusion.schedules import DiscreteSchedule, sampling_sigmas
from ..samplers import SAMPLERS, STOCHASTIC, generators_for

NFES = (5, 8, 10, 15, 20, 30, 50)
SCHEDULES = ("karras", "exponential", "simple", "sgm_uniform", "beta", "ays_gmm", "leading", "linspace", "trailing")


@dataclass(frozen=True)
class GaussianMixture:
    """Diagonal Gaussian mixture in ``dim`` dimensions with an exact denoiser."""

    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, D)
    stds: torch.Tensor  # (K, D)

    @classmethod
    def benchmark(cls, dim: int = 8, components: int = 6, seed: int = 0) -> "GaussianMixture":
        """The benchmark's mixture: means ~ N(0, 0.8^2), per-dimension stds log-uniform in
        [0.05, 0.5], Dirichlet(2) weights; data variance a little under 1 per dimension."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(components, dim, generator=g, dtype=torch.float64) * 0.8
        stds = torch.exp(torch.empty(components, dim, dtype=torch.float64).uniform_(math.log(0.05), math.log(0.5),
                                                                                    generator=g))
        # Dirichlet(2, ..., 2): normalised Gamma(2) draws, each the sum of two Exp(1) draws
        u = torch.rand(2, components, generator=g, dtype=torch.float64)
        weights = -u.log().sum(0)
        return cls(weights / weights.sum(), means, stds)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        """The exact posterior mean E[x0 | x_sigma] for x of shape (B, ...) with prod(...) = D."""
        shape = x.shape
        xf = x.reshape(shape[0], 1, -1).to(torch.float64)  # (B, 1, D)
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1) ** 2  # (B or 1, 1, 1)
        var = self.stds**2 + s2  # (B, K, D)
        diff = xf - self.means
        logp = self.weights.log() - 0.5 * (diff**2 / var + var.log()).sum(-1)  # (B, K)
        post = torch.softmax(logp, dim=-1)
        comp = self.means + self.stds**2 / var * diff  # (B, K, D)
        return (post.unsqueeze(-1) * comp).sum(1).reshape(shape).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k] * z


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (NFE)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        return self.denoiser(x, sigma, cond)


def sd_schedule() -> DiscreteSchedule:
    """Stable Diffusion's discrete schedule: scaled-linear betas 0.00085..0.012 over 1000 steps."""
    return DiscreteSchedule.named("scaled_linear", 1000)


def exact_solution(gmm: GaussianMixture, x: torch.Tensor, sigma_start: float, sigma_end: float = 1e-7,
                   steps: int = 1500) -> torch.Tensor:
    """Probability-flow ODE solution from (x, sigma_start) down to sigma_end ~ 0 by classical RK4
    in s = log(sigma), dx/ds = x - D(x; e^s), with ``steps`` uniform steps (float64). Stopping
    at sigma_end = 1e-7 instead of 0 moves x by about (sigma_end / s_min)^2 ~ 1e-11."""
    x = x.to(torch.float64)
    s = torch.linspace(math.log(sigma_start), math.log(sigma_end), steps + 1, dtype=torch.float64)

    def f(x, s):
        return x - gmm.denoise(x, s.exp())

    for i in range(steps):
        h = s[i + 1] - s[i]
        k1 = f(x, s[i])
        k2 = f(x + h / 2 * k1, s[i] + h / 2)
        k3 = f(x + h / 2 * k2, s[i] + h / 2)
        k4 = f(x + h * k3, s[i + 1])
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point clouds (N, D), Rabin et al. 2011."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a.double() @ dirs).sort(dim=0)
    pb, _ = (b.double() @ dirs).sort(dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


# ---------------------------------------------------------------------------
# Running sumie's samplers
# ---------------------------------------------------------------------------

def run_sumie(gmm: GaussianMixture, z: torch.Tensor, sampler: str, sigmas: torch.Tensor, seed: int = 0,
              **options) -> tuple[torch.Tensor, int]:
    """Sample from unit noise ``z`` (N, D) along ``sigmas`` with the VP initial condition
    x = z sqrt(1 + sigma_0^2); returns (final x, NFE). Per-sample noise is seeded seed + i."""
    den = CountingDenoiser(gmm.denoise)
    x = z * math.sqrt(1 + float(sigmas[0]) ** 2)
    gens = generators_for(seed, z.shape[0]) if sampler in STOCHASTIC else None
    out = SAMPLERS[sampler](den, x, sigmas.double(), generator=gens, **options)
    return out, den.calls


def nfe_steps(sampler: str, target: int, probe) -> int | None:
    """The most steps whose NFE (as ``probe(steps)`` reports) stays <= target; None if even 1 step is over."""
    best = None
    for steps in range(1, target + 1):
        if probe(steps) <= target:
            best = steps
        elif best is not None:
            break
    return best


# ---------------------------------------------------------------------------
# Running diffusers' schedulers on the same problem (diffusers is a bench/test-only dependency)
# ---------------------------------------------------------------------------

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def diffusers_table(scheduler) -> DiscreteSchedule:
    """The scheduler's own sigma table in float64 (from its float32 alphas_cumprod)."""
    ac = scheduler.alphas_cumprod.double()
    return DiscreteSchedule(((1 - ac) / ac).sqrt())


def run_diffusers(scheduler, denoiser, z: torch.Tensor, steps: int, *, seed: int | None = None,
                  callback=None, variance_noise=None, step_kwargs: dict | None = None) -> tuple[torch.Tensor, int]:
    """Run a diffusers scheduler as its pipelines do, on a sumie denoiser: the network it sees is
    the eps-prediction ``eps(x_vp, t) = (x - D(x; sigma_t)) / sigma_t`` with x = x_vp sqrt(1 + sigma_t^2)
    and sigma_t interpolated log-linearly in the scheduler's own table, from the initial sample
    of a VP sampler (unit noise z); ``variance_noise(x)``, if given, supplies the
    noise of schedulers that accept it. Returns (final sample, NFE)."""
    scheduler.set_timesteps(steps)
    table = diffusers_table(scheduler)
    calls = 0

    def eps_model(x_in, t):
        nonlocal calls
        calls += 1
        sigma = table.t_to_sigma(torch.as_tensor(t, dtype=torch.float64).reshape(1))
        x_ve = x_in.double() * (1 + sigma**2).sqrt()
        return ((x_ve - denoiser(x_ve, sigma.expand(x_in.shape[0]))) / sigma).to(x_in.dtype)

    # the same initial noise for every solver: unit VP noise z, i.e. x = z sqrt(1 + sigma_0^2) in VE form
    # (diffusers' own pipelines start its Euler-type schedulers at z * sigma_0 for linspace/trailing)
    if float(scheduler.init_noise_sigma) != 1.0:  # VE-form scheduler
        x = z * (1 + scheduler.sigmas[0].double() ** 2).sqrt().to(z.dtype)
    else:
        x = z
    kwargs = dict(step_kwargs or {})
    if seed is not None and "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        eps = eps_model(x_in, t)
        if variance_noise is not None:
            kwargs["variance_noise"] = variance_noise(x)
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
        if callback is not None:
            callback(i, x)
    return x, calls


def _diffusers_options(cls) -> list[tuple[str, dict]]:
    """The timestep choices a diffusers scheduler offers: its three spacings and, where it has
    them, Karras, exponential and beta sigmas."""
    params = inspect.signature(cls.__init__).parameters
    opts = [("leading", {"timestep_spacing": "leading", "steps_offset": 1}), ("linspace", {"timestep_spacing": "linspace"}),
            ("trailing", {"timestep_spacing": "trailing"})]
    for key, label in (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential"),
                       ("use_beta_sigmas", "beta")):
        if key in params:
            opts.append((label, {key: True}))
    return opts


# diffusers' deterministic schedulers, each with the configuration that suits this problem best:
# no sample clipping, and the final step to sigma = 0 where the scheduler can take it
DIFFUSERS_ODE = [
    ("EulerDiscreteScheduler", "EulerDiscrete", {}),
    ("HeunDiscreteScheduler", "HeunDiscrete", {}),
    ("KDPM2DiscreteScheduler", "KDPM2Discrete", {}),
    ("LMSDiscreteScheduler", "LMSDiscrete", {}),
    ("DDIMScheduler", "DDIM", {"clip_sample": False, "set_alpha_to_one": True}),
    ("PNDMScheduler", "PNDM (PLMS)", {"skip_prk_steps": True, "set_alpha_to_one": True}),
    ("DEISMultistepScheduler", "DEIS-2", {"solver_order": 2}),
    ("DEISMultistepScheduler", "DEIS-3", {"solver_order": 3}),
    ("DPMSolverMultistepScheduler", "DPM++2M", {"solver_order": 2}),
    ("DPMSolverMultistepScheduler", "DPM++3M", {"solver_order": 3}),
    ("DPMSolverSinglestepScheduler", "DPM++2S", {"solver_order": 2, "final_sigmas_type": "zero"}),
    ("DPMSolverSinglestepScheduler", "DPM++3S", {"solver_order": 3, "final_sigmas_type": "zero"}),
    ("UniPCMultistepScheduler", "UniPC-2 bh2", {"solver_order": 2, "solver_type": "bh2"}),
    ("UniPCMultistepScheduler", "UniPC-3 bh2", {"solver_order": 3, "solver_type": "bh2"}),
    ("UniPCMultistepScheduler", "UniPC-3 bh1", {"solver_order": 3, "solver_type": "bh1"}),
    ("SASolverScheduler", "SA-Solver (tau=0)", {"tau_func": lambda t: 0}),
]

DIFFUSERS_SDE = [
    ("EulerAncestralDiscreteScheduler", "EulerAncestral", {"timestep_spacing": "trailing"}),
    ("KDPM2AncestralDiscreteScheduler", "KDPM2Ancestral", {"timestep_spacing": "trailing"}),
    ("DDPMScheduler", "DDPM", {"timestep_spacing": "trailing", "clip_sample": False}),
    ("DPMSolverMultistepScheduler", "DPM++2M SDE", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    ("DPMSolverSDEScheduler", "DPM++ SDE", {"use_karras_sigmas": True}),
    ("SASolverScheduler", "SA-Solver (tau=1)", {"timestep_spacing": "trailing"}),
    ("LCMScheduler", "LCM", {"timestep_spacing": "trailing"}),
]

SUMIE_ODE = ("euler", "heun", "dpm_2", "lms", "plms", "ipndm", "deis", "dpmpp_2m", "dpmpp_3m", "uni_pc", "uni_pc_bh2")
SUMIE_SDE = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
             "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "restart", "lcm")


def _steps_within(target: int, nfe_of) -> tuple[int, int] | None:
    """Largest steps with nfe_of(steps) <= target, as (steps, nfe); None if 1 step is already over."""
    best = None
    for steps in range(1, target + 1):
        nfe = nfe_of(steps)
        if nfe <= target:
            best = (steps, nfe)
        elif best is not None and nfe > target + 2:
            break
    return best


def benchmark(nfes=NFES, samples: int = 2048, sde_samples: int = 2048, seed: int = 0, diffusers: bool = True,
              schedules=SCHEDULES, sumie_ode=SUMIE_ODE, sumie_sde=SUMIE_SDE, diffusers_ode=None, diffusers_sde=None,
              log=print) -> dict:
    """Every sampler x schedule x NFE budget on the Gaussian-mixture problem, sumie and diffusers.

    Deterministic samplers: RMS error of the final sample against the exact PF-ODE solution
    from the same noise. Stochastic samplers: sliced Wasserstein distance to fresh mixture
    samples (``floor`` is that distance between two independent sets of true samples).
    """
    gmm = GaussianMixture.benchmark()
    table = sd_schedule()
    smin, smax = table.sigma_min, table.sigma_max
    z = torch.randn(samples, gmm.dim, generator=torch.Generator().manual_seed(seed + 1000), dtype=torch.float64)
    ref = exact_solution(gmm, z * math.sqrt(1 + smax**2), smax)
    ref_check = exact_solution(gmm, z[:256] * math.sqrt(1 + smax**2), smax, steps=3000)
    rows: list[dict] = []

    def sigmas_of(schedule, steps):
        return sampling_sigmas(schedule, steps, sigma_min=smin, sigma_max=smax, discrete=table)

    def probe_nfe(sampler, schedule, steps):
        den = CountingDenoiser(gmm.denoise)
        gens = generators_for(0, 1) if sampler in STOCHASTIC else None
        SAMPLERS[sampler](den, z[:1] * smax, sigmas_of(schedule, steps), generator=gens)
        return den.calls

    for sampler in sumie_ode:
        for schedule in schedules:
            for target in nfes:
                got = _steps_within(target, lambda s: probe_nfe(sampler, schedule, s))
                if got is None:
                    continue
                out, nfe = run_sumie(gmm, z, sampler, sigmas_of(schedule, got[0]))
                rows.append(dict(lib="sumie", kind="ode", sampler=sampler, schedule=schedule, target=target,
                                 nfe=nfe, steps=got[0], error=rms(out, ref)))
        log(f"sumie {sampler}: done")

    zs = torch.randn(sde_samples, gmm.dim, generator=torch.Generator().manual_seed(seed + 2000), dtype=torch.float64)
    truth = gmm.sample(sde_samples, torch.Generator().manual_seed(seed + 3000))
    floor = sliced_wasserstein(gmm.sample(sde_samples, torch.Generator().manual_seed(seed + 4000)), truth)
    for sampler in sumie_sde:
        for schedule in [s for s in ("karras", "exponential", "ays_gmm") if s in schedules]:
            for target in nfes:
                got = _steps_within(target, lambda s: probe_nfe(sampler, schedule, s))
                if got is None:
                    continue
                out, nfe = run_sumie(gmm, zs, sampler, sigmas_of(schedule, got[0]), seed=seed)
                rows.append(dict(lib="sumie", kind="sde", sampler=sampler, schedule=schedule, target=target,
                                 nfe=nfe, steps=got[0], error=sliced_wasserstein(out, truth)))
        log(f"sumie {sampler}: done")

    if diffusers:
        rows += _diffusers_rows(gmm, z, ref, zs, truth, nfes, seed, log,
                                DIFFUSERS_ODE if diffusers_ode is None else diffusers_ode,
                                DIFFUSERS_SDE if diffusers_sde is None else diffusers_sde)
    return dict(problem=dict(dim=gmm.dim, components=len(gmm.weights), samples=samples, sde_samples=sde_samples,
                             sigma_min=smin, sigma_max=smax, reference_self_check=rms(ref[:256], ref_check),
                             sw_floor=floor),
                rows=rows)


def _diffusers_rows(gmm, z, ref, zs, truth, nfes, seed, log, ode_list, sde_list) -> list[dict]:
    import warnings

    import diffusers

    rows = []
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    def one(cls, config, steps, zz, stochastic):
        sched = getattr(diffusers, cls)(**SD_BETAS, **config)
        with torch.no_grad():
            return run_diffusers(sched, gmm.denoise, zz, steps, seed=seed if stochastic else None)

    def probe(cls, config, steps, stochastic):
        return one(cls, config, steps, z[:1], stochastic)[1]

    for cls, label, base in ode_list:
        for opt_label, opt in _diffusers_options(getattr(diffusers, cls)):
            config = {**base, **opt}
            for target in nfes:
                try:
                    got = _steps_within(target, lambda s: probe(cls, config, s, False))
                    if got is None:
                        continue
                    out, nfe = one(cls, config, got[0], z, False)
                except Exception as e:  # a configuration diffusers rejects (for example too few steps)
                    log(f"diffusers {label} {opt_label} NFE {target}: {type(e).__name__}: {e}")
                    continue
                err = rms(out.double(), ref)
                rows.append(dict(lib="diffusers", kind="ode", sampler=label, schedule=opt_label, target=target,
                                 nfe=nfe, steps=got[0], error=err if math.isfinite(err) else float("nan")))
        log(f"diffusers {label}: done")
    for cls, label, config in sde_list:
        for target in nfes:
            try:
                got = _steps_within(target, lambda s: probe(cls, config, s, True))
                if got is None:
                    continue
                out, nfe = one(cls, config, got[0], zs, True)
            except Exception as e:
                log(f"diffusers {label} NFE {target}: {type(e).__name__}: {e}")
                continue
            rows.append(dict(lib="diffusers", kind="sde", sampler=label, schedule=next(iter(config.values())),
                             target=target, nfe=nfe, steps=got[0], error=sliced_wasserstein(out.double(), truth)))
        log(f"diffusers {label}: done")
    return rows


def fit_schedule(samplers=("uni_pc", "uni_pc_bh2"), steps: int = 10, samples: int = 2048, seed: int = 100,
                 init=None, free_end: bool = True, maxiter: int = 3000, log=print) -> list[float]:
    """Fit a few-step schedule on the Gaussian-mixture problem, in the spirit of Sabour et al. 2024
    ("Align Your Steps"): the noise levels (as fractions of log(sigma_max/sigma_min); the first
    fixed at sigma_max, the last at sigma_min unless ``free_end``) that minimise the mean log RMS
    error of ``samplers`` at ``steps`` steps against the exact solution, by Nelder-Mead (scipy),
    on noise drawn apart from the benchmark's. Returns the fractions u_0 = 1 > ... > u_{steps-1} >= 0
    that :func:`sumie.diffusion.schedules.fitted_sigmas` takes."""
    import numpy as np
    from scipy.optimize import minimize

    from ..diffusion.schedules import fitted_sigmas

    gmm = GaussianMixture.benchmark()
    table = sd_schedule()
    smin, smax = table.sigma_min, table.sigma_max
    z = torch.randn(samples, gmm.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = exact_solution(gmm, z * math.sqrt(1 + smax**2), smax)

    def fractions(p):
        gaps = np.logaddexp(0, p[: steps - 1])  # softplus: positive gaps in log-sigma
        u = 1 - np.concatenate([[0], np.cumsum(gaps)]) / gaps.sum()
        if free_end:
            end = 0.3 / (1 + np.exp(-p[-1]))  # the last level may sit above sigma_min
            u = end + (1 - end) * u
        return u

    def loss(p):
        sig = fitted_sigmas(steps, smin, smax, fractions(p))
        return float(np.mean([math.log(rms(run_sumie(gmm, z, s, sig)[0], ref)) for s in samplers]))

    if init is None:
        p0 = np.zeros(steps - 1)
    else:
        u0 = np.asarray(init, dtype=float)
        u0 = (u0 - u0[-1]) / (u0[0] - u0[-1])
        p0 = np.log(np.expm1(np.maximum(-np.diff(u0), 1e-6)))
    if free_end:
        p0 = np.concatenate([p0, [-6.0]])
    log(f"fit_schedule: start loss {loss(p0):.4f}")
    res = minimize(loss, p0, method="Nelder-Mead", options=dict(maxiter=maxiter, xatol=1e-4, fatol=1e-6,
                                                                 adaptive=True))
    log(f"fit_schedule: loss {res.fun:.4f} after {res.nfev} evaluations")
    return [round(float(v), 5) for v in fractions(res.x)]


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

def best_rows(rows: list[dict], lib: str, kind: str = "ode") -> dict[int, dict]:
    """For each NFE budget, the row with the lowest error of ``lib``."""
    best: dict[int, dict] = {}
    for r in rows:
        if r["lib"] == lib and r["kind"] == kind and math.isfinite(r["error"]):
            if r["target"] not in best or r["error"] < best[r["target"]]["error"]:
                best[r["target"]] = r
    return dict(sorted(best.items()))


def format_tables(result: dict, markdown: bool = False) -> str:
    """The error tables: one row per (library, sampler, schedule), one column per NFE budget,
    then the best of each library per budget and their ratio."""
    rows = result["rows"]
    nfes = sorted({r["target"] for r in rows})
    sep = " | " if markdown else "  "

    def line(cells, widths, left=(0, 1, 2)):
        text = sep.join(str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return f"| {text} |" if markdown else text

    out = []
    for kind, what in (("ode", "RMS error of the final sample against the exact PF-ODE solution"),
                       ("sde", "sliced Wasserstein-2 distance to the mixture "
                               f"(floor between two true sample sets: {result['problem']['sw_floor']:.4f})")):
        table: dict[tuple, dict[int, float]] = {}
        for r in rows:
            if r["kind"] == kind:
                table.setdefault((r["lib"], r["sampler"], r["schedule"]), {})[r["target"]] = r["error"]
        if not table:
            continue
        widths = [9, 20, 12] + [9] * len(nfes)
        out.append(f"\n{'Deterministic' if kind == 'ode' else 'Stochastic'} samplers: {what}, by NFE budget\n")
        out.append(line(["library", "sampler", "schedule"] + [f"NFE {n}" for n in nfes], widths))
        if markdown:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for key in sorted(table):
            out.append(line(list(key) + [f"{table[key][n]:.2e}" if n in table[key] else "-" for n in nfes], widths))
        b_s, b_d = best_rows(rows, "sumie", kind), best_rows(rows, "diffusers", kind)
        if b_s and b_d:
            out.append(f"\nBest per NFE budget ({'RMS error' if kind == 'ode' else 'SW distance'}):\n")
            w2 = [5, 34, 10, 38, 10, 8]
            out.append(line(["NFE", "sumie best", "error", "diffusers best", "error", "ratio"], w2, (1, 3)))
            if markdown:
                out.append("|" + "|".join("-" * (w + 2) for w in w2) + "|")
            for n in nfes:
                if n in b_s and n in b_d:
                    s_, d_ = b_s[n], b_d[n]
                    out.append(line([n, f"{s_['sampler']} + {s_['schedule']}", f"{s_['error']:.3e}",
                                     f"{d_['sampler']} + {d_['schedule']}", f"{d_['error']:.3e}",
                                     f"{s_['error'] / d_['error']:.2f}"], w2, (1, 3)))
    return "\n".join(out)


def write_plot(result: dict, path) -> None:
    """Log-log error against NFE: each sampler at the schedule that is best for it at NFE 10
    (solid: sumie, dashed: diffusers); stochastic samplers' SW distance in a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    for ax, kind in zip(axes, ("ode", "sde")):
        series: dict[tuple, dict[str, dict[int, float]]] = {}
        for r in rows:
            if r["kind"] == kind and math.isfinite(r["error"]):
                series.setdefault((r["lib"], r["sampler"]), {}).setdefault(r["schedule"], {})[r["target"]] = r["error"]
        for (lib, sampler), by_schedule in sorted(series.items()):
            def score(item):
                errs = item[1]
                return errs.get(10, min(errs.values()))
            schedule, errs = min(by_schedule.items(), key=score)
            xs = sorted(errs)
            ax.plot(xs, [errs[x] for x in xs], "-" if lib == "sumie" else "--", marker="o" if lib == "sumie" else "x",
                    ms=3, lw=1.2, label=f"{lib}: {sampler} ({schedule})")
        if kind == "sde":
            ax.axhline(result["problem"]["sw_floor"], color="k", lw=0.8, ls=":", label="two true sample sets")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (denoiser calls)")
        ax.set_ylabel("RMS error vs exact PF-ODE solution" if kind == "ode" else "sliced W2 to the mixture")
        ax.set_title("deterministic samplers" if kind == "ode" else "stochastic samplers")
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Sampler accuracy on a Gaussian mixture (8-D, 6 components, SD schedule)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
