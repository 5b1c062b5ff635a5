"""A folder of images (and optional captions) as a training set.

Captions follow the Hugging Face ``imagefolder`` convention: a ``metadata.jsonl`` with
lines ``{"file_name": ..., "text": ...}`` (paths relative to the folder holding the
metadata file), else a same-stem ``.txt`` file next to the image, else ``""``.
Images are resized so the shorter side equals the resolution (Lanczos), centre-cropped
(or randomly cropped), and flipped horizontally with probability 1/2; the flip and crop of
item ``i`` in epoch ``e`` are a pure function of ``(seed, i, e)``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILE = "metadata.jsonl"


def _verified(path: Path, resolution: int) -> bool:
    """Integrity check: Pillow's ``verify`` (PNG chunk CRCs), then a decode (JPEG at reduced scale via ``draft``)."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the file unusable; decoding catches truncated streams
            im.draft("RGB", (resolution, resolution))
            im.load()
    except Exception:  # PIL raises many kinds (OSError, SyntaxError, ValueError, DecompressionBombError)
        return False
    return True


def _read_metadata(root: Path) -> dict[Path, str]:
    """``metadata.jsonl`` files anywhere under root -> {absolute image path: caption}."""
    return {p: str(row.get("text", "")) for p, row in _read_metadata_rows(root).items()}


def _read_metadata_rows(root: Path) -> dict[Path, dict]:
    """``metadata.jsonl`` files anywhere under root -> {absolute image path: its row}."""
    rows: dict[Path, dict] = {}
    for meta in sorted(root.rglob(METADATA_FILE)):
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[(meta.parent / row["file_name"]).resolve()] = row
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{meta}:{n}: expected a JSON object with 'file_name' and 'text' ({e})") from e
    return rows


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB; transparency is composited onto white."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            out = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            out.alpha_composite(rgba)
            return out.convert("RGB")
        return im.convert("RGB")


def resize_crop(img: Image.Image, resolution: int, center: bool = True,
                rng: np.random.Generator | None = None) -> Image.Image:
    """Resize the shorter side to ``resolution`` (Lanczos), then crop a square (centre or random)."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.LANCZOS)
    if center or rng is None:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = int(rng.integers(nw - resolution + 1)), int(rng.integers(nh - resolution + 1))
    return img.crop((left, top, left + resolution, top + resolution))


class ImageFolderDataset(Dataset):
    """Every PNG/JPEG/WebP image under ``root`` (recursively); items ``{"x", "label": -1, "caption"}``.

    With ``split`` (e.g. ``"train"``), only images whose ``metadata.jsonl`` row has that ``"split"`` value.
    """

    def __init__(self, root: str | Path, resolution: int, random_flip: bool = True, center_crop: bool = True,
                 seed: int = 0, split: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a directory")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution, self.random_flip, self.center_crop, self.seed = resolution, random_flip, center_crop, seed
        self.epoch = 0
        candidates = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        meta = _read_metadata_rows(self.root)
        self.split = split
        if split is not None:
            n_all = len(candidates)
            candidates = [p for p in candidates if meta.get(p.resolve(), {}).get("split") == split]
            if not candidates:
                raise ValueError(f"no images in {str(self.root)!r} have split {split!r} in {METADATA_FILE} "
                                 f"(of {n_all} image(s))")
        ok = [_verified(p, resolution) for p in candidates]
        self.paths: list[Path] = [p for p, good in zip(candidates, ok) if good]
        bad = [p for p, good in zip(candidates, ok) if not good]
        if bad:
            warnings.warn(f"skipped {len(bad)} unreadable or truncated image(s) under {self.root}, e.g. {bad[0]}",
                          stacklevel=2)
        if not self.paths:
            raise ValueError(f"no usable images in {str(self.root)!r} (looked recursively for "
                             f"{', '.join(IMAGE_EXTENSIONS)}; found {len(candidates)} candidate(s))")
        self.captions: list[str] = []
        for p in self.paths:
            txt = p.with_suffix(".txt")
            if p.resolve() in meta:
                self.captions.append(str(meta[p.resolve()].get("text", "")))
            elif txt.is_file():
                self.captions.append(txt.read_text(encoding="utf-8").strip())
            else:
                self.captions.append("")

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips and crops items are drawn with."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        rng = np.random.default_rng((self.seed, i, self.epoch))
        img = resize_crop(load_rgb(self.paths[i]), self.resolution, self.center_crop, rng)
        x = np.asarray(img, dtype=np.float32)  # (R, R, 3)
        if self.random_flip and rng.random() < 0.5:
            x = x[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))) / 127.5 - 1  # (3, R, R)
        return {"x": x, "label": -1, "caption": self.captions[i]}
