"""Input images and masks for editing: reading any PIL mode, fitting to the model's size,
mask blur / invert / crop, outpainting canvases and the final overlay (A1111's conventions).

Images come back as (3, H, W) float tensors in [-1, 1]; masks as (1, H, W) in [0, 1] with
1 = repaint (white in a mask image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

RESIZE_MODES = ("resize", "crop", "fill")  # A1111: just resize, crop and resize, resize and fill

ImageLike = Image.Image | np.ndarray | torch.Tensor | str | Path


def _open(src: ImageLike, what: str) -> Image.Image:
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
        try:
            img = Image.open(path)
            img.load()
        except Exception as e:  # PIL raises several types for unreadable files
            raise ValueError(f"{what}: {str(path)!r} is not an image PIL can read ({e})") from None
        return img
    if isinstance(src, torch.Tensor):  # (3, H, W) or (H, W, 3) in [-1, 1]
        t = src.detach().float().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3):
            t = t.movedim(0, -1)
        src = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(-1).numpy()
    if isinstance(src, np.ndarray):
        return Image.fromarray(src)
    if isinstance(src, Image.Image):
        return src
    raise TypeError(f"{what}: expected a PIL image, array, tensor or file path, got {type(src).__name__}")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale (I;16, I, F) -> L, scaled by the mode's own range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img


def load_image(src: ImageLike) -> Image.Image:
    """An RGB image from a file, PIL image, uint8 array or tensor: EXIF orientation applied,
    transparency composited onto white, 16-bit greyscale scaled, CMYK/YCbCr/LAB converted."""
    img = _to_8bit(ImageOps.exif_transpose(_open(src, "image")))
    if img.mode in ("RGBA", "LA", "P", "PA", "RGBa", "La") or "transparency" in img.info:
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def load_mask(src: ImageLike) -> Image.Image:
    """A greyscale (L) mask, white = repaint: EXIF orientation applied; an image with an alpha
    channel and nothing else varying is read by its alpha (transparent = repaint)."""
    img = _to_8bit(ImageOps.exif_transpose(_open(src, "mask")))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if alpha.min() < 255 and np.ptp(np.asarray(rgba.convert("L"))) == 0:
            return Image.fromarray(255 - alpha, "L")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), rgba)
    return img.convert("L")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB -> (3, H, W) in [-1, 1]; L -> (1, H, W) in [0, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    if img.mode == "L":
        return (arr / 255.0)[None]
    return arr.permute(2, 0, 1) / 127.5 - 1


def fit(img: Image.Image, width: int, height: int, mode: str = "resize",
        resample=Image.Resampling.LANCZOS) -> Image.Image:
    """Fit an image to width x height: "resize" stretches, "crop" scales to cover and crops the
    centre, "fill" scales to fit and fills the bands by stretching the edge rows/columns."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    if img.size == (width, height):
        return img
    if mode == "resize":
        return img.resize((width, height), resample)
    w, h = img.size
    if mode == "crop":
        s = max(width / w, height / h)
        rw, rh = max(width, round(w * s)), max(height, round(h * s))
        r = img.resize((rw, rh), resample)
        x, y = (rw - width) // 2, (rh - height) // 2
        return r.crop((x, y, x + width, y + height))
    s = min(width / w, height / h)
    rw, rh = max(1, round(w * s)), max(1, round(h * s))
    r = img.resize((rw, rh), resample)
    x, y = (width - rw) // 2, (height - rh) // 2
    return extend(r, x, y, width - rw - x, height - rh - y)


def extend(img: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    """The image on a larger canvas, the new bands filled by repeating the nearest edge pixels."""
    arr = np.asarray(img)
    pad = ((top, bottom), (left, right)) + (((0, 0),) if arr.ndim == 3 else ())
    return Image.fromarray(np.pad(arr, pad, mode="edge"), img.mode)


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """Gaussian blur of the mask (A1111's mask blur), radius in pixels; 0 leaves it."""
    if radius < 0:
        raise ValueError(f"mask blur must be >= 0 pixels, got {radius:g}")
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius else mask


def mask_box(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1, y1) around the mask's non-zero pixels, grown by ``padding`` and then to
    the aspect ratio width:height (A1111's "only masked"), clipped to the image; None if empty."""
    bbox = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if bbox is None:
        return None
    W, H = mask.size
    x0, y0, x1, y1 = bbox[0] - padding, bbox[1] - padding, bbox[2] + padding, bbox[3] + padding
    bw, bh = x1 - x0, y1 - y0
    if bw / bh < width / height:  # too narrow: widen
        grow = round(bh * width / height) - bw
        x0, x1 = x0 - grow // 2, x1 + grow - grow // 2
    else:
        grow = round(bw * height / width) - bh
        y0, y1 = y0 - grow // 2, y1 + grow - grow // 2
    dx = max(0, -x0) - max(0, x1 - W)  # slide back inside before clipping
    dy = max(0, -y0) - max(0, y1 - H)
    x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
    return max(0, x0), max(0, y0), min(W, x1), min(H, y1)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with the colours around it (a normalised box blur
    of the unmasked pixels, widening until every masked pixel has a known neighbour)."""
    import torch.nn.functional as F

    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)[None]  # (1, 3, H, W)
    keep = torch.from_numpy((np.asarray(mask) < 128).astype(np.float32))[None, None]  # (1, 1, H, W)
    if keep.sum() == 0:
        return Image.new("RGB", image.size, (127, 127, 127))
    out, todo, r = arr.clone(), keep[0, 0] < 0.5, 2
    while todo.any():
        k = min(2 * r + 1, 2 * max(arr.shape[-2:]) + 1)
        num = F.avg_pool2d(arr * keep, k, stride=1, padding=k // 2, count_include_pad=True)
        den = F.avg_pool2d(keep, k, stride=1, padding=k // 2, count_include_pad=True)
        ok = todo & (den[0, 0] > 1e-6)
        out[0][:, ok] = (num[0] / den[0].clamp(min=1e-6))[:, ok]
        todo &= ~ok
        r *= 2
    return Image.fromarray(out[0].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy(), "RGB")


def overlay(result: np.ndarray, original: Image.Image, mask: Image.Image,
            box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Paste the result (H, W, 3) uint8 over the original through the (blurred) mask: unmasked
    pixels come back exactly as they were (A1111's final overlay). With ``box``, the result is
    first resized into that box of the original ("only masked")."""
    orig = np.asarray(original, dtype=np.float64)
    res = Image.fromarray(result)
    if box is not None:
        x0, y0, x1, y1 = box
        canvas = np.asarray(original).copy()
        canvas[y0:y1, x0:x1] = np.asarray(res.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS))
        res_arr = canvas.astype(np.float64)
    else:
        res_arr = np.asarray(res, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
    return np.clip(res_arr * m + orig * (1 - m) + 0.5, 0, 255).astype(np.uint8)
