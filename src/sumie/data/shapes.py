"""Procedural shapes: coloured geometric objects on plain or textured backgrounds.

A tiny, fully synthetic text-to-image task in the spirit of dSprites (Matthey et al. 2017)
and CLEVR (Johnson et al. 2017): every image is drawn from a scene description
(shape, colour, size and 3x3 grid position of each object, plus a background), so the
caption is exact and prompt adherence can be checked by a verifier
(:mod:`sumie.metrics.verifier`). Nothing is downloaded; item ``i`` of a dataset is a pure
function of ``(seed, i)``.

Objects are drawn with Pillow at 4x the target resolution and box-downsampled, which is
exact area-coverage anti-aliasing (supersampling, Crow 1981).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {  # ordered: class labels depend on this order
    "red": (220, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (242, 212, 24),
    "green": (34, 160, 60),
    "blue": (36, 88, 224),
    "purple": (140, 56, 196),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
SIZE_FRACTIONS: dict[str, float] = {"small": 0.22, "medium": 0.32, "large": 0.44}  # of the image side
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right")  # row-major 3x3 grid
NUM_CLASSES: int = len(SHAPES) * len(COLORS)

PLAIN_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "dark gray": (64, 64, 64),
    "light gray": (212, 212, 212),
    "light blue": (206, 224, 244),
    "light green": (212, 236, 210),
    "light pink": (248, 216, 226),
}
TEXTURES: tuple[str, ...] = ("striped", "checkered", "mottled", "gradient")
TEXTURE_COLORS: dict[str, tuple[int, int, int]] = {  # muted: far from every object colour
    "gray": (140, 140, 140),
    "beige": (196, 182, 158),
    "sage": (152, 164, 142),
    "slate": (116, 124, 140),
    "taupe": (150, 136, 128),
}
TEXTURED_BACKGROUNDS: tuple[str, ...] = tuple(f"{t} {c}" for t in TEXTURES for c in TEXTURE_COLORS)
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "textured", "mixed")

SUPERSAMPLE = 4  # draw at 4x, box-downsample: 16 coverage samples per pixel
TEXTURE_CONTRAST = (14, 30)  # +- this much around the muted base colour
COLOR_JITTER = 10  # per-channel jitter of object colours
SIZE_JITTER = 0.04  # relative
EDGE_MARGIN = 0.02  # objects stay this far (fraction of the side) inside the image
CELL_MARGIN = 0.03  # object centres stay this far inside their grid cell
POS_JITTER = 0.06  # range of the jittered centre inside its cell
GAP = 0.03  # minimum gap between object bounding boxes in multi-object scenes
MAX_OBJECTS = 4

_PREP = {"top left": "at the", "top": "at the", "top right": "at the", "left": "on the", "center": "in the",
         "right": "on the", "bottom left": "at the", "bottom": "at the", "bottom right": "at the"}


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene."""

    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field, value, valid in (("shape", self.shape, SHAPES), ("color", self.color, tuple(COLORS)),
                                    ("size", self.size, SIZES), ("position", self.position, POSITIONS)):
            if value not in valid:
                raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")

    @property
    def label(self) -> int:
        return class_label(self.shape, self.color)


@dataclass(frozen=True)
class Scene:
    """A scene description: the objects and the background they are drawn on."""

    objects: tuple[ShapeObject, ...]
    background: str

    @property
    def caption(self) -> str:
        return caption(self.objects, self.background)


@dataclass(frozen=True)
class ShapesConfig:
    resolution: int = 32
    background: str = "plain"  # plain | textured | mixed
    max_objects: int = 1
    min_objects: int = 1
    seed: int = 0
    length: int = 2**20

    def __post_init__(self) -> None:
        if not 16 <= self.resolution <= 256:
            raise ValueError(f"resolution must be in [16, 256] (shapes are designed for 16-64), got {self.resolution}")
        if self.background not in BACKGROUND_KINDS:
            raise ValueError(f"unknown background {self.background!r}; valid: {', '.join(BACKGROUND_KINDS)}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                             f"got min_objects={self.min_objects}, max_objects={self.max_objects}")
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")


# ---------------------------------------------------------------------------
# Labels and captions
# ---------------------------------------------------------------------------

def class_label(shape: str, color: str) -> int:
    """Class label of (shape, colour): ``shape_idx * len(COLORS) + color_idx``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; valid: {', '.join(COLORS)}")
    return SHAPES.index(shape) * len(COLORS) + list(COLORS).index(color)


def label_names(label: int) -> tuple[str, str]:
    """Inverse of :func:`class_label`: label -> (shape, colour)."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"class label must be in [0, {NUM_CLASSES}), got {label}")
    s, c = divmod(int(label), len(COLORS))
    return SHAPES[s], list(COLORS)[c]


def _describe(obj: ShapeObject) -> str:
    return f"a {obj.size} {obj.color} {obj.shape} {_PREP[obj.position]} {obj.position}"


def caption(objects: Sequence[ShapeObject], background: str) -> str:
    """'a small red circle at the top left and a large blue square in the center on a white background'."""
    if not objects:
        return f"an empty {background} background"
    return " and ".join(_describe(o) for o in objects) + f" on a {background} background"


_OBJ_RE = re.compile(
    r"an? (?P<size>{sizes}) (?P<color>{colors}) (?P<shape>{shapes}) (?:at|on|in) the (?P<position>{positions})".format(
        sizes="|".join(SIZES), colors="|".join(COLORS), shapes="|".join(SHAPES),
        positions="|".join(sorted(POSITIONS, key=len, reverse=True))))
_BG_RE = re.compile(r" on an? (?P<background>[a-z ]+?) background$")


def parse_scene(text: str) -> Scene:
    """Inverse of :func:`caption` (case and spacing insensitive; without a background clause: white)."""
    t = " ".join(text.lower().replace(",", " ").split()).rstrip(".")
    background = "white"
    m = _BG_RE.search(t)
    if m:
        background = m.group("background")
        if background not in PLAIN_BACKGROUNDS and background not in TEXTURED_BACKGROUNDS:
            raise ValueError(f"cannot parse caption {text!r}: unknown background {background!r}")
        t = t[:m.start()]
    objects = []
    for part in t.split(" and "):
        m = _OBJ_RE.fullmatch(part.strip())
        if m is None:
            raise ValueError(f"cannot parse caption {text!r}: {part!r} is not of the form "
                             f"'a <size> <color> <shape> at/on/in the <position>' "
                             f"(sizes: {', '.join(SIZES)}; colors: {', '.join(COLORS)}; "
                             f"shapes: {', '.join(SHAPES)}; positions: {', '.join(POSITIONS)})")
        objects.append(ShapeObject(**m.groupdict()))
    return Scene(tuple(objects), background)


def parse_caption(text: str) -> list[ShapeObject]:
    """The objects a caption describes (inverse of :func:`caption`); ValueError if it cannot be parsed."""
    return list(parse_scene(text).objects)


# ---------------------------------------------------------------------------
# Scene sampling and layout
# ---------------------------------------------------------------------------

def _centre_range(cell: int, s: float) -> tuple[float, float]:
    """Interval of centre coordinates (fractions of the side) for grid index ``cell`` in {0, 1, 2}."""
    if cell == 1:
        return 0.5 - POS_JITTER / 2, 0.5 + POS_JITTER / 2
    lo = s / 2 + EDGE_MARGIN  # pushed outwards as far as the edge allows
    hi = max(lo, min(lo + POS_JITTER, 1 / 3 - CELL_MARGIN))
    return (lo, hi) if cell == 0 else (1 - hi, 1 - lo)


def _nominal_box(obj: ShapeObject) -> tuple[float, float, float]:
    """(cx, cy, side) of the un-jittered placement, in fractions of the image side."""
    row, col = divmod(POSITIONS.index(obj.position), 3)
    s = SIZE_FRACTIONS[obj.size]
    return sum(_centre_range(col, s)) / 2, sum(_centre_range(row, s)) / 2, s


def _overlap(a: tuple[float, float, float], b: tuple[float, float, float], gap: float = GAP) -> bool:
    sep = (a[2] + b[2]) / 2 + gap
    return abs(a[0] - b[0]) < sep and abs(a[1] - b[1]) < sep


def sample_background(rng: np.random.Generator, kind: str = "plain") -> str:
    """A background name: plain colour, textured, or either (``mixed``) with equal probability."""
    if kind not in BACKGROUND_KINDS:
        raise ValueError(f"unknown background {kind!r}; valid: {', '.join(BACKGROUND_KINDS)}")
    if kind == "mixed":
        kind = "plain" if rng.random() < 0.5 else "textured"
    names = tuple(PLAIN_BACKGROUNDS) if kind == "plain" else TEXTURED_BACKGROUNDS
    return names[int(rng.integers(len(names)))]


def sample_scene(rng: np.random.Generator, n_objects: int = 1, background: str = "plain") -> Scene:
    """Uniform shapes, colours, sizes and distinct cells; multi-object layouts rejected until none overlap."""
    if not 0 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in [0, {MAX_OBJECTS}], got {n_objects}")
    bg = sample_background(rng, background)
    pairs = rng.choice(NUM_CLASSES, n_objects, replace=False)  # distinct (shape, colour) pairs
    for attempt in range(64):
        cells = rng.choice(len(POSITIONS), n_objects, replace=False)
        sizes = rng.integers(len(SIZES), size=n_objects) if attempt < 48 else np.zeros(n_objects, dtype=int)
        objects = tuple(ShapeObject(*label_names(int(p)), SIZES[int(z)], POSITIONS[int(c)])
                        for p, z, c in zip(pairs, sizes, cells))
        boxes = [_nominal_box(o) for o in objects]
        if not any(_overlap(boxes[i], boxes[j]) for i in range(n_objects) for j in range(i)):
            return Scene(objects, bg)
    raise AssertionError("unreachable: small objects in distinct cells never overlap")


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

def _box_filtered_square_wave(u: np.ndarray, period: float, width: float) -> np.ndarray:
    """Mean of the 0/1 wave ``[u mod period < period/2]`` over ``[u - width/2, u + width/2]`` (exact box filter)."""
    def integral(v: np.ndarray) -> np.ndarray:  # antiderivative of the square wave
        return np.floor(v / period) * (period / 2) + np.clip(np.mod(v, period), 0, period / 2)

    return (integral(u + width / 2) - integral(u - width / 2)) / width


def _texture(background: str, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """(R, R, 3) uint8 texture: two tones of a muted colour as stripes, checks, soft noise or a gradient.

    Drawn at the target resolution with analytic box filtering (no aliasing, no supersampling cost).
    """
    texture, color = background.split(" ", 1)
    base = np.asarray(TEXTURE_COLORS[color], dtype=np.float32)
    d = float(rng.uniform(*TEXTURE_CONTRAST))
    tone_a, tone_b = base + d, base - d
    scale = resolution / 32  # texture periods are given in pixels of a 32 px image
    ax = np.arange(resolution, dtype=np.float32) + 0.5  # pixel centres
    if texture == "mottled":
        k = int(rng.integers(3, 7))
        small = Image.fromarray((rng.random((k, k)) * 255).astype(np.uint8))
        t = np.asarray(small.resize((resolution, resolution), Image.BICUBIC), dtype=np.float32) / 255
    elif texture == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        u = np.cos(theta) * ax[None, :] + np.sin(theta) * ax[:, None]  # (R, R)
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    elif texture == "striped":
        period = rng.uniform(4, 8) * scale
        phase = rng.uniform(0, period)
        wx, wy = ((1.0, 0.0), (0.0, 1.0), (0.7071, 0.7071), (0.7071, -0.7071))[int(rng.integers(4))]
        u = wx * ax[None, :] + wy * ax[:, None] + phase  # (R, R)
        t = _box_filtered_square_wave(u, period, abs(wx) + abs(wy))
    else:  # checkered: XOR of two square waves; separable, so the box filter stays exact
        period = rng.uniform(5, 10) * scale
        sx, sy = (_box_filtered_square_wave(ax + rng.uniform(0, period), period, 1.0) for _ in range(2))
        t = sx[None, :] * (1 - sy[:, None]) + sy[:, None] * (1 - sx[None, :])
    out = tone_a + (tone_b - tone_a) * t[..., None]  # (R, R, 3)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _shape_polygon(shape: str, cx: float, cy: float, s: float) -> list[tuple[float, float]] | None:
    """Vertices (pixels) of a polygonal shape with bounding side ``s`` centred at (cx, cy)."""
    h = s / 2
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + 0.84 * h), (cx - h, cy + 0.84 * h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "star":
        r_out, r_in = h * 1.04, h * 1.04 * 0.44
        cy = cy + 0.08 * h  # the 5-point star is top-heavy; centre its bounding box
        return [(cx + (r_out if k % 2 == 0 else r_in) * math.sin(k * math.pi / 5),
                 cy - (r_out if k % 2 == 0 else r_in) * math.cos(k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        w = s * 0.18
        return [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy - w), (cx + h, cy - w), (cx + h, cy + w),
                (cx + w, cy + w), (cx + w, cy + h), (cx - w, cy + h), (cx - w, cy + w), (cx - h, cy + w),
                (cx - h, cy - w), (cx - w, cy - w)]
    return None


def _place(objects: Sequence[ShapeObject], rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Jittered (cx, cy, side) per object (fractions); multi-object jitter re-drawn if boxes would overlap."""
    nominal = [_nominal_box(o) for o in objects]
    for _ in range(8):
        boxes = []
        for o, (_, _, s) in zip(objects, nominal):
            row, col = divmod(POSITIONS.index(o.position), 3)
            s = s * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
            boxes.append((rng.uniform(*_centre_range(col, s)), rng.uniform(*_centre_range(row, s)), s))
        if len(boxes) < 2 or not any(_overlap(boxes[i], boxes[j], GAP / 2)
                                     for i in range(len(boxes)) for j in range(i)):
            return boxes
    return nominal


def render(objects: Sequence[ShapeObject], background: str, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Draw a scene: (H, W, 3) uint8, 4x supersampled then box-filtered (area-coverage anti-aliasing)."""
    size = resolution * SUPERSAMPLE
    if background in PLAIN_BACKGROUNDS:
        canvas = Image.new("RGB", (size, size), PLAIN_BACKGROUNDS[background])
    elif background in TEXTURED_BACKGROUNDS:
        canvas = Image.fromarray(_texture(background, resolution, rng)).resize((size, size), Image.NEAREST)
    else:
        raise ValueError(f"unknown background {background!r}; valid: "
                         f"{', '.join(PLAIN_BACKGROUNDS)}, or '<texture> <color>' with texture in "
                         f"{', '.join(TEXTURES)} and color in {', '.join(TEXTURE_COLORS)}")
    draw = ImageDraw.Draw(canvas)
    for obj, (cx, cy, s) in zip(objects, _place(objects, rng)):
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        fill = tuple(int(v) for v in np.clip(np.asarray(COLORS[obj.color]) + jitter, 0, 255))
        cx, cy, s = cx * size, cy * size, s * size
        poly = _shape_polygon(obj.shape, cx, cy, s)
        if poly is not None:
            draw.polygon(poly, fill=fill)
        elif obj.shape == "circle":
            draw.ellipse((cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2), fill=fill)
        else:  # square: a little smaller than its box, so its area matches the circle's
            h = s * 0.44
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    return np.array(canvas.resize((resolution, resolution), Image.BOX))  # writable copy


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(127.5).sub_(1)


# ---------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------

class ShapesDataset(Dataset):
    """Procedural shapes; item ``i`` is a pure function of ``(config.seed, i)``.

    Items are ``{"x": (3, R, R) float32 in [-1, 1], "label": class of the first object,
    "caption": str}`` so that ``torch.utils.data.default_collate`` batches them; the scene
    itself (objects, background) is available from :meth:`spec`.
    """

    def __init__(self, config: ShapesConfig | None = None, **kwargs) -> None:
        if config is not None and kwargs:
            raise TypeError("pass either a ShapesConfig or keyword arguments, not both")
        self.config = config if config is not None else ShapesConfig(**kwargs)

    def __len__(self) -> int:
        return self.config.length

    def _rng(self, i: int) -> np.random.Generator:
        n = self.config.length
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of length {n}")
        return np.random.default_rng((self.config.seed, i % n))

    def _scene(self, rng: np.random.Generator) -> Scene:
        c = self.config
        n = c.min_objects if c.min_objects == c.max_objects else int(rng.integers(c.min_objects, c.max_objects + 1))
        return sample_scene(rng, n, c.background)

    def spec(self, i: int) -> Scene:
        """The scene of item ``i`` (objects and background), without rendering it."""
        return self._scene(self._rng(int(i)))

    def __getitem__(self, i: int) -> dict:
        rng = self._rng(int(i))
        scene = self._scene(rng)
        image = render(scene.objects, scene.background, self.config.resolution, rng)
        return {"x": to_tensor(image), "label": scene.objects[0].label, "caption": scene.caption}
