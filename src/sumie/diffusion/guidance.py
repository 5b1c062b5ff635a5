"""Classifier-free guidance as a denoiser wrapper, Ho & Salimans 2022.

    D_cfg(x; sigma) = D(x; sigma, uncond) + w * (D(x; sigma, cond) - D(x; sigma, uncond))

computed in x0 space (equivalent to guiding eps or v, since both are affine in D at fixed
x and sigma), with both passes batched into one forward call. Optional:

* CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules...", sec. 3.4, eq. 15-16):
  match the per-sample std of the guided prediction to the conditional one, blend by phi.
* a sigma interval outside which guidance is off (Kynkaanniemi et al. 2024, "Applying
  Guidance in a Limited Interval Improves Sample and Distribution Quality").
"""

from __future__ import annotations

import torch
from torch import nn



SEQUENCE_KEYS = ("context", "context_mask")  # token sequences: a shorter one is padded (and masked out)


def _pad_seq(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[1] == n:
        return t
    pad = t.new_zeros((t.shape[0], n - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


def concat_cond(a: dict | None, b: dict | None) -> dict | None:
    """Batch-concatenate two condition dicts with the same keys (tensors along dim 0). Token
    sequences of different lengths (a long prompt chunked into more windows than its negative)
    are padded to the longer one; the padding is masked out through ``context_mask``."""
    if a is None and b is None:
        return None
    if a is None or b is None or set(a) != set(b):
        raise ValueError("conditional and unconditional inputs must carry the same keys")
    out = {}
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, torch.Tensor):
            if k in SEQUENCE_KEYS and va.shape[1] != vb.shape[1]:
                if "context_mask" not in a:
                    raise ValueError(f"cannot batch token sequences of lengths {va.shape[1]} and {vb.shape[1]} "
                                     "without a context_mask")
                n = max(va.shape[1], vb.shape[1])
                va, vb = _pad_seq(va, n), _pad_seq(vb, n)
            out[k] = torch.cat([va, vb.to(va.device)], dim=0)
        elif va is None and vb is None:
            out[k] = None
        else:
            raise TypeError(f"cannot batch condition {k!r} of type {type(va).__name__}")
    return out


class CFGDenoiser(nn.Module):
    """Guided denoiser: ``forward(x, sigma, cond)`` with ``uncond`` fixed at construction."""

    def __init__(self, denoiser, uncond: dict | None, guidance_scale: float = 1.0, rescale: float = 0.0,
                 sigma_interval: tuple[float, float] | None = None):
        super().__init__()
        if guidance_scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {guidance_scale}")
        if not 0 <= rescale <= 1:
            raise ValueError(f"CFG rescale (phi) must be in [0, 1], got {rescale}")
        self.denoiser = denoiser
        self.uncond = uncond
        self.guidance_scale = guidance_scale
        self.rescale = rescale
        self.sigma_interval = sigma_interval

    def _active(self, sigma: torch.Tensor) -> bool:
        if self.sigma_interval is None:
            return True
        lo, hi = self.sigma_interval
        s = float(sigma.flatten()[0])
        return lo <= s <= hi

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        w = self.guidance_scale
        if w == 1.0 or not self._active(sigma):
            return self.denoiser(x, sigma, cond)
        if w == 0.0:
            return self.denoiser(x, sigma, self.uncond)
        b = x.shape[0]
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), concat_cond(cond, self.uncond))
        d_cond, d_uncond = both[:b], both[b:]
        guided = d_uncond + w * (d_cond - d_uncond)
        if self.rescale > 0:
            # Lin et al. eq. 15-16 are written for the eps/v prediction; in x0 space with fixed
            # x and sigma, x0 is an affine map of eps, so we rescale the x0 deviation from x.
            dims = list(range(1, x.ndim))
            std_cond = (d_cond - x).std(dim=dims, keepdim=True)
            std_guided = (guided - x).std(dim=dims, keepdim=True).clamp(min=1e-12)
            rescaled = x + (guided - x) * (std_cond / std_guided)
            guided = self.rescale * rescaled + (1 - self.rescale) * guided
        return guided
