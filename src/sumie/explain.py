"""Pictures that explain diffusion: the forward process of an image, frame by frame.

The forward process of Ho et al. 2020 (eq. 4) in its variance-preserving form,
``z_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``, is what people picture as ink
dissolving in water: the image fades while the noise rises, and at t = T only noise is
left. (sumie's samplers work in the equivalent VE form x = z_t / sqrt(alpha_bar_t).)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .diffusion.schedules import DiscreteSchedule, sigma_to_alpha_bar
from .image import from_pil, make_grid, save_gif, save_png, to_uint8


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Read an image, centre-crop it square and resize to ``size``: (3, size, size) in [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # PIL raises many types for damaged files
        raise ValueError(f"cannot read {path} as an image ({e})") from e
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return from_pil(img.convert("RGBA").resize((size, size), Image.LANCZOS))


def forward_frames(x0: torch.Tensor, timesteps: torch.Tensor, schedule: DiscreteSchedule,
                   seed: int = 0) -> torch.Tensor:
    """z_t for each timestep with one shared eps (so frames morph smoothly): (T, 3, H, W) in VP scale."""
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sig = schedule.t_to_sigma(timesteps.double())
    ab = sigma_to_alpha_bar(sig).float()
    return ab.sqrt()[:, None, None, None] * x0[None] + (1 - ab).sqrt()[:, None, None, None] * eps[None]


def _label(img: np.ndarray, text: str) -> np.ndarray:
    """Add a white caption band under an (H, W, 3) image."""
    h, w, _ = img.shape
    out = Image.new("RGB", (w, h + 14), (255, 255, 255))
    out.paste(Image.fromarray(img), (0, 0))
    ImageDraw.Draw(out).text((2, h + 1), text, fill=(0, 0, 0))
    return np.asarray(out)


def explain_forward(image: str | Path, out_dir: str | Path, *, size: int = 128, frames: int = 8,
                    gif_frames: int = 48, beta_schedule: str = "linear", num_timesteps: int = 1000,
                    seed: int = 0) -> dict[str, Path]:
    """Write ``forward_strip.png`` (labelled frames) and ``forward.gif`` for ``image``."""
    if frames < 2 or gif_frames < 2:
        raise ValueError("need at least 2 frames")
    schedule = DiscreteSchedule.named(beta_schedule, num_timesteps)
    x0 = load_image(image, size)
    out_dir = Path(out_dir)
    T = num_timesteps - 1
    ts = torch.linspace(0, T, frames).round()
    strip_frames = to_uint8(forward_frames(x0, ts, schedule, seed).clamp(-1, 1))
    ab = schedule.alphas_cumprod
    labelled = [_label(f, f"t={int(t)} ab={float(ab[int(t)]):.2f}") for f, t in zip(strip_frames, ts)]
    strip = make_grid(np.stack([_label(to_uint8(x0), "x0 (clean)")] + labelled), ncols=frames + 1)
    # GIF: clean image, then the process with t growing (denser at small t, where change is visible)
    gts = (torch.linspace(0, 1, gif_frames) ** 1.5 * T).round()
    gif = to_uint8(forward_frames(x0, gts, schedule, seed).clamp(-1, 1))
    return {"strip": save_png(out_dir / "forward_strip.png", strip),
            "gif": save_gif(out_dir / "forward.gif", list(gif), duration_ms=60, final_hold_ms=1200)}
