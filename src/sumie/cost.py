"""What a Stable Diffusion request will cost, said before it starts.

Compute: the U-Net's FLOPs for one call at the requested size, counted by running it on the
meta device (no memory, no arithmetic) under ``torch.utils.flop_counter.FlopCounterMode``,
times the calls the sampler makes. Memory: the weights, the U-Net's skip activations and the
autoencoder decoder's full-resolution activations (its largest tensors: a few (n, ch, H, W)
maps at the output size), against the memory available now. A request whose estimate does not
fit is refused before any work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# fp32 rate assumed for the time estimate: the 2-core CPU this project measures on (~190 GFLOP/s
# in the Stable Diffusion benchmark); a GPU is ~100x faster
CPU_FLOPS = 2.0e11
CUDA_FLOPS = 3.0e13


@dataclass(frozen=True)
class Cost:
    flops: float  # the whole request
    seconds: float  # at the assumed rate
    peak_bytes: int
    available_bytes: int | None


def unet_flops(unet_config, batch: int, latent_hw: tuple[int, int], tokens: int = 77) -> float:
    """FLOPs of one U-Net call on ``batch`` latents of ``latent_hw``, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from .io.checkpoint import on_meta
    from .nn.unet import UNet

    with on_meta():
        unet = UNet(unet_config)
        x = torch.empty(batch, unet_config.in_channels, *latent_hw)
        cond = {}
        if unet_config.context_dim is not None:
            cond["context"] = torch.empty(batch, tokens, unet_config.context_dim)
        if unet_config.adm_in_channels is not None:
            cond["y"] = torch.empty(batch, unet_config.adm_in_channels)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(x, torch.empty(batch), cond)
    return float(counter.get_total_flops())


def available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated now: free GPU memory, or the host's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def sd_request_cost(unet_config, vae_config, *, n: int, height: int, width: int, calls: int, guided: bool,
                    weight_bytes: int, device: torch.device, dtype_bytes: int = 4) -> Cost:
    """FLOPs, time and peak memory of ``n`` images at ``height`` x ``width`` with ``calls`` U-Net calls."""
    f = 2 ** (len(vae_config.ch_mult) - 1)
    latent_hw = (height // f, width // f)
    batch = n * (2 if guided else 1)
    flops = calls * unet_flops(unet_config, batch, latent_hw)
    # decoder: ~4 live (n, ch * ch_mult, h, w) maps per resolution level; the largest level dominates
    dec = max(vae_config.ch * m * (height // 2 ** i) * (width // 2 ** i)
              for i, m in enumerate(vae_config.ch_mult)) * 4 * n * dtype_bytes
    # U-Net: the skip connections held across the down path (~3 maps per level) plus working maps
    levels = len(unet_config.channel_mult)
    skips = sum(3 * unet_config.model_channels * m * (latent_hw[0] // 2 ** i) * (latent_hw[1] // 2 ** i)
                for i, m in enumerate(unet_config.channel_mult[:levels]))
    unet_act = (skips + 4 * unet_config.model_channels * max(unet_config.channel_mult) * latent_hw[0] * latent_hw[1]) \
        * batch * dtype_bytes
    peak = int(weight_bytes + max(dec, unet_act))
    rate = CUDA_FLOPS if device.type == "cuda" else CPU_FLOPS
    return Cost(flops, flops / rate, peak, available_memory(device))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe(cost: Cost, device: torch.device) -> str:
    """One line: the estimate; raises ValueError when the peak memory estimate exceeds what is available."""
    gb = cost.peak_bytes / 2**30
    where = "GPU" if device.type == "cuda" else "CPU"
    rate = CUDA_FLOPS if device.type == "cuda" else CPU_FLOPS
    if cost.available_bytes is not None and cost.peak_bytes > cost.available_bytes:
        raise ValueError(f"this request needs about {gb:.1f} GB of memory but {cost.available_bytes / 2**30:.1f} GB "
                         f"is available; ask for a smaller --width/--height or fewer images (--n)")
    return (f"estimate: {cost.flops / 1e12:.3g} TFLOP, about {_duration(cost.seconds)} at "
            f"{rate / 1e9:.0f} GFLOP/s ({where}), peak memory about {gb:.1f} GB"
            + ("" if cost.available_bytes is None else f" of {cost.available_bytes / 2**30:.1f} GB available"))


def check_sd_request(pipe, *, n: int, height: int | None, width: int | None, steps: int, guidance_scale: float,
                     sampler: str) -> str:
    """The estimate line for a :class:`sumie.pipelines.sd.StableDiffusion` request (ValueError if it cannot fit)."""
    from .io.checkpoint import on_meta
    from .nn.unet import UNet
    from .samplers.names import nfe_for_steps, resolve_sampler_name

    ck = pipe.checkpoint
    res = ck.resolution
    height, width = height or res, width or res
    with on_meta():  # the U-Net's weights (the largest stage; streamed weights can take less)
        weight_bytes = 4 * sum(p.numel() for p in UNet(ck.unet_config).parameters())
    name = resolve_sampler_name(sampler)[0]
    cost = sd_request_cost(ck.unet_config, ck.vae_config, n=n, height=height, width=width,
                           calls=nfe_for_steps(name, steps), guided=guidance_scale != 1.0,
                           weight_bytes=weight_bytes, device=pipe.device)
    return describe(cost, pipe.device)
