"""Linear multistep samplers: one denoiser call per step, history of past derivatives.

* LMS: Adams-Bashforth in sigma with exact step-size-aware coefficients (k-diffusion
  ``sample_lms``, after Karras et al. 2022's use of the VE ODE dx/dsigma = (x - x0)/sigma).
* PLMS/PNDM: Liu et al. 2022 ("Pseudo Numerical Methods for Diffusion Models on
  Manifolds") eq. 12, the fixed-coefficient Adams-Bashforth combination of eps with the
  DDIM transfer, started with one pseudo improved-Euler step (diffusers ``PNDMScheduler``
  with ``skip_prk_steps=True``, the "PLMS" of Stable Diffusion).
* iPNDM: Zhang & Chen 2023 ("Fast Sampling of Diffusion Models with Exponential
  Integrator", DEIS) sec. 5: PLMS with lower-order Adams-Bashforth warm-up steps instead
  of the extra denoiser call.
* DEIS: Zhang & Chen 2023 tAB-DEIS: eps interpolated by a polynomial in log(sigma) and
  integrated exactly over sigma (diffusers ``DEISMultistepScheduler``).
* UniPC: Zhao et al. 2023 ("UniPC: A Unified Predictor-Corrector Framework...")
  Algorithms 1-3 in data prediction with the B(h) variants bh1 and bh2; the UniC
  corrector reuses the denoiser call of the next step, so it costs no extra NFE.

In VE form eps = (x - x0) / sigma is exactly the ODE derivative d = dx/dsigma, and the
DDIM transfer x_next = x0 + sigma_next * eps is the Euler step x + (sigma_next - sigma) * eps.
"""

from __future__ import annotations

import math

import torch

from .base import Callback, check_sigmas, denoise, lambda_, report, to_d
from .noise import Generators

# 4-point Gauss-Legendre rule on [-1, 1]: exact for polynomials of degree <= 7
_GL_NODES = (-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526)
_GL_WEIGHTS = (0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538)

# Adams-Bashforth coefficients for equal steps, newest derivative first
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def lms_coefficients(ts: list[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights for step i -> i+1 on an arbitrary grid ``ts``: the integral over
    [ts[i], ts[i+1]] of the Lagrange basis through ts[i], ts[i-1], ..., ts[i-order+1]
    (k-diffusion ``linear_multistep_coeff``, integrated exactly by Gauss-Legendre)."""
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")
    a, b = ts[i], ts[i + 1]
    nodes = [ts[i - k] for k in range(order)]
    coeffs = []
    for j in range(order):
        total = 0.0
        for u, w in zip(_GL_NODES, _GL_WEIGHTS):
            tau = (a + b) / 2 + (b - a) / 2 * u
            prod = 1.0
            for k in range(order):
                if k != j:
                    prod *= (tau - nodes[k]) / (nodes[j] - nodes[k])
            total += w * prod
        coeffs.append(total * (b - a) / 2)
    return coeffs


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None,
               order: int = 4):
    """Linear multistep (Adams-Bashforth) in sigma of order ``order`` with step-size-aware
    coefficients; lower order while the history fills (k-diffusion ``sample_lms``)."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    sigmas = check_sigmas(sigmas).to(x.device)
    ts = sigmas.double().tolist()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        coeffs = lms_coefficients(ts, i, min(i + 1, order))
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def _adams_bashforth(ds: list[torch.Tensor]) -> torch.Tensor:
    """Fixed-step Adams-Bashforth combination of up to 4 derivatives (newest last)."""
    coeffs = _AB[min(len(ds), 4)]
    return sum(c * d for c, d in zip(coeffs, reversed(ds[-4:])))


@torch.no_grad()
def sample_plms(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None):
    """PLMS / PNDM without Runge-Kutta warm-up, Liu et al. 2022 eq. 12 (diffusers
    ``PNDMScheduler(skip_prk_steps=True)``): the first step is a pseudo improved-Euler step
    (one extra denoiser call, so NFE = steps + 1), later steps use Adams-Bashforth of order
    up to 4 on eps with the DDIM transfer."""
    sigmas = check_sigmas(sigmas).to(x.device)
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        dt = sigmas[i + 1] - sigmas[i]
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        d = to_d(x, sigmas[i], denoised)
        ds.append(d)
        if i == 0 and sigmas[1] > 0:
            x_pred = x + d * dt
            d_pred = to_d(x_pred, sigmas[1], denoise(denoiser, x_pred, sigmas[1], cond, i))
            x = x + (d + d_pred) / 2 * dt
        else:
            x = x + _adams_bashforth(ds) * dt
    return x


@torch.no_grad()
def sample_ipndm(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None):
    """Improved PNDM, Zhang & Chen 2023 sec. 5 (as ComfyUI's ``ipndm``): Adams-Bashforth of
    order min(i+1, 4) on eps = dx/dsigma, one denoiser call per step."""
    sigmas = check_sigmas(sigmas).to(x.device)
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        ds.append(to_d(x, sigmas[i], denoised))
        ds = ds[-4:]
        x = x + _adams_bashforth(ds) * (sigmas[i + 1] - sigmas[i])
    return x


def deis_coefficients(s_next: float, nodes: list[float]) -> list[float]:
    """tAB-DEIS weights, Zhang & Chen 2023 eq. 15: c_j = int_{s_0}^{s_next} l_j(log s) ds, with
    l_j the Lagrange basis in log-sigma through ``nodes`` = [sigma_i, sigma_{i-1}, ...]
    (closed forms of diffusers ``DEISMultistepScheduler``; the integral to s_next = 0 is the limit)."""
    def ind2(t, b, c):  # antiderivative of (log t - log c)/(log b - log c) w.r.t. t
        return 0.0 if t == 0 else t * (-math.log(c) + math.log(t) - 1) / (math.log(b) - math.log(c))

    def ind3(t, b, c, d):
        if t == 0:
            return 0.0
        lt, lc, ld, lb = math.log(t), math.log(c), math.log(d), math.log(b)
        num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
        return num / ((lb - lc) * (lb - ld))

    s0 = nodes[0]
    if len(nodes) == 1:
        return [s_next - s0]
    if len(nodes) == 2:
        s1 = nodes[1]
        return [ind2(s_next, s0, s1) - ind2(s0, s0, s1), ind2(s_next, s1, s0) - ind2(s0, s1, s0)]
    if len(nodes) == 3:
        s1, s2 = nodes[1], nodes[2]
        return [ind3(s_next, s0, s1, s2) - ind3(s0, s0, s1, s2),
                ind3(s_next, s1, s2, s0) - ind3(s0, s1, s2, s0),
                ind3(s_next, s2, s0, s1) - ind3(s0, s2, s0, s1)]
    raise ValueError(f"DEIS order must be 1, 2 or 3, got {len(nodes)}")


@torch.no_grad()
def sample_deis(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None,
                order: int = 3):
    """tAB-DEIS of order ``order`` (1-3), Zhang & Chen 2023 eq. 15, with lower order while the
    history fills and a first-order (DDIM) final step to sigma = 0."""
    if order not in (1, 2, 3):
        raise ValueError(f"DEIS order must be 1, 2 or 3, got {order}")
    sigmas = check_sigmas(sigmas).to(x.device)
    ts = sigmas.double().tolist()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        report(callback, i, sigmas, x, denoised)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        k = 1 if ts[i + 1] == 0 else len(ds)
        coeffs = deis_coefficients(ts[i + 1], [ts[i - j] for j in range(k)])
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def _unipc_system(h: torch.Tensor, rks: torch.Tensor, order: int, variant: str):
    """UniPC's linear system, Zhao et al. 2023 Algorithm 2/3 in data prediction: returns
    (R, b, h_phi_1, B_h) with R[k] = rks^k and b[k] = (k+1)! phi_{k+2}(-h) h / B(h)."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    B_h = hh if variant == "bh1" else torch.expm1(hh)
    R, b = [], []
    for k in range(1, order + 1):
        R.append(rks ** (k - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(R), torch.stack(b), h_phi_1, B_h


def _unipc_update(x, sigma_s0, sigma_t, lambdas, m_hist, order, variant, m_t=None):
    """One UniP predictor step (``m_t is None``) or UniC corrector step from sigma_s0 to sigma_t.

    ``m_hist`` holds x0 estimates newest first (m_hist[0] at sigma_s0), ``lambdas`` their
    lambda = -log sigma. Follows diffusers ``multistep_uni_p/c_bh_update`` in VE form.
    """
    h = lambda_(sigma_t) - lambdas[0]
    m0 = m_hist[0]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lambdas[k] - lambdas[0]) / h
        rks.append(rk)
        d1s.append((m_hist[k] - m0) / rk)
    rks.append(torch.ones_like(h))
    R, b, h_phi_1, B_h = _unipc_system(h, torch.stack(rks), order, variant)
    x_t = (sigma_t / sigma_s0) * x - h_phi_1 * m0
    if m_t is None:  # predictor UniP-p
        if not d1s:
            return x_t
        rhos = torch.tensor([0.5], dtype=h.dtype, device=h.device) if order == 2 else \
            torch.linalg.solve(R[:-1, :-1], b[:-1])
        return x_t - B_h * sum(r.to(x.dtype) * d for r, d in zip(rhos, d1s))
    # corrector UniC-p
    rhos = torch.tensor([0.5], dtype=h.dtype, device=h.device) if order == 1 else torch.linalg.solve(R, b)
    res = sum(r.to(x.dtype) * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0
    return x_t - B_h * (res + rhos[-1].to(x.dtype) * (m_t - m0))


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None,
                 order: int = 3, variant: str = "bh1", corrector: bool = True):
    """UniPC-p (Zhao et al. 2023) with the UniC corrector after every predictor step except the
    last; order min(order, i+1, steps-i) (warm-up and lower order near the end, as diffusers'
    ``lower_order_final``). One denoiser call per step."""
    if order < 1:
        raise ValueError(f"UniPC order must be >= 1, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    sigmas = check_sigmas(sigmas).to(x.device)
    sig64 = sigmas.double()
    n = len(sigmas) - 1
    m_hist: list[torch.Tensor] = []  # newest first
    lambdas: list[torch.Tensor] = []
    last_x, last_order = None, 0
    for i in range(n):
        denoised = denoise(denoiser, x, sigmas[i], cond, i)
        if corrector and last_x is not None:
            x = _unipc_update(last_x, sig64[i - 1], sig64[i], lambdas, m_hist, last_order, variant, m_t=denoised)
        report(callback, i, sigmas, x, denoised)
        m_hist = [denoised] + m_hist[:order - 1]
        lambdas = [lambda_(sig64[i])] + lambdas[:order - 1]
        this_order = min(order, n - i, i + 1)
        last_x, last_order = x, this_order
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = _unipc_update(x, sig64[i], sig64[i + 1], lambdas, m_hist, this_order, variant)
    return x


def sample_unipc_bh2(denoiser, x, sigmas, *, cond=None, callback: Callback = None, generator: Generators = None,
                     order: int = 3):
    """UniPC with B(h) = e^h - 1 (variant bh2, Zhao et al. 2023 sec. 3.3); see :func:`sample_unipc`."""
    return sample_unipc(denoiser, x, sigmas, cond=cond, callback=callback, generator=generator, order=order,
                        variant="bh2")
