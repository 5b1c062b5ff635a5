"""Tensor <-> image conversion, grids, and PNG/GIF writing that never leaves half a file."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) or (H, W, 3)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def from_pil(img: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float tensor in [-1, 1] (alpha composited onto white)."""
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*H', cols*W', 3) grid image."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling so tiny images are visible (H, W, 3)."""
    return img.repeat(factor, 0).repeat(factor, 1) if factor > 1 else img


def _atomic_save(path: Path, save) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a uint8 (H, W, 3) array as PNG atomically."""
    _atomic_save(Path(path), lambda p: Image.fromarray(image).save(p, format="PNG"))
    return Path(path)


def save_gif(path: str | Path, frames: Sequence[np.ndarray], duration_ms: int = 80, final_hold_ms: int = 800) -> Path:
    """Write an animated GIF (looping) atomically; the last frame is held a little longer."""
    pil = [Image.fromarray(f) for f in frames]
    durations = [duration_ms] * (len(pil) - 1) + [final_hold_ms]
    _atomic_save(Path(path), lambda p: pil[0].save(p, format="GIF", save_all=True, append_images=pil[1:],
                                                   duration=durations, loop=0))
    return Path(path)
