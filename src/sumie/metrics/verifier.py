"""Shapes verifier: does an image show the requested objects? (prompt adherence on ``shapes``).

A small CNN with a grid-detection head in the manner of YOLO (Redmon et al. 2016): the
image is divided into the 3x3 grid of :data:`sumie.data.shapes.POSITIONS`, and for every
cell the network predicts whether an object is centred there, and its shape, colour and
size. CoordConv input channels (Liu et al. 2018) make cell membership easy to learn.

It is trained only on procedural images from :mod:`sumie.data.shapes` (zero to three
objects, plain and textured backgrounds, rendered at 16-64 px and resized to 32 px) under
augmentations that imitate imperfect generated images: Gaussian blur, white and
low-frequency noise, colour, brightness and contrast jitter. The shipped weights are
``sumie/assets/shapes_verifier.safetensors`` (fp16, config in the metadata); retrain with

    python -m sumie.metrics.verifier --out src/sumie/assets/shapes_verifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..data.shapes import (COLORS, POSITIONS, SHAPES, SIZES, ShapeObject, label_names, render, sample_scene,
                           to_tensor)

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "shapes_verifier.safetensors"
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
N_CELLS = len(POSITIONS)
# per-cell outputs: objectness logit, shape logits, colour logits, size logits
HEAD_SPLITS: tuple[int, ...] = (1, len(SHAPES), len(COLORS), len(SIZES))


@dataclass(frozen=True)
class VerifierConfig:
    resolution: int = 32  # every input is resized to this
    widths: tuple[int, ...] = (24, 48, 72)  # one stage per width; stages after the first halve the resolution
    blocks_per_stage: int = 2
    head_width: int = 128


# ---------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------

def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class ShapesVerifier(nn.Module):
    """3x3-grid detector for :mod:`sumie.data.shapes` scenes; see the module docstring."""

    def __init__(self, config: VerifierConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or VerifierConfig()
        layers, c_in = [], 5  # RGB + (y, x) coordinates
        for s, width in enumerate(c.widths):
            for b in range(c.blocks_per_stage):
                layers.append(_conv(c_in, width, 2 if (s > 0 and b == 0) else 1))
                c_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv2d(c_in, c.head_width, 1), nn.SiLU(),
                                  nn.Conv2d(c.head_width, sum(HEAD_SPLITS), 1))

    # -- tensors --------------------------------------------------------------

    def preprocess(self, images) -> torch.Tensor:
        """uint8 (H, W, 3) / (B, H, W, 3) arrays or float (3, H, W) / (B, 3, H, W) in [-1, 1] -> (B, 3, R, R)."""
        if isinstance(images, (list, tuple)):
            images = [self.preprocess(im) for im in images]
            return torch.cat(images) if images else torch.zeros(0, 3, self.config.resolution, self.config.resolution)
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise TypeError(f"numpy images must be uint8 (H, W, 3), got {images.dtype}")
            x = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1
            x = x.movedim(-1, -3)  # (..., 3, H, W)
        elif isinstance(images, torch.Tensor):
            x = images.float() if images.dtype != torch.uint8 else images.float() / 127.5 - 1
        else:
            raise TypeError(f"expected a numpy array, a tensor or a list of them, got {type(images).__name__}")
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W) or (H, W, 3), got {tuple(x.shape)}")
        x = x.to(next(self.parameters()).device).clamp(-1, 1)
        r = self.config.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> per-cell logits (B, 9, 1 + shapes + colours + sizes)."""
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        f = self.features(torch.cat([x, ys, xs], 1))  # (B, C, R/4, R/4)
        f = F.adaptive_avg_pool2d(f, 3)  # (B, C, 3, 3): one feature per grid cell
        return self.head(f).flatten(2).transpose(1, 2)  # (B, 9, 16)

    @torch.no_grad()
    def cell_probs(self, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Per-cell probabilities: objectness (B, 9) and shape / color / size distributions (B, 9, K)."""
        was_training = self.training
        self.eval()
        x = self.preprocess(images)
        logits = torch.cat([self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else \
            torch.zeros(0, N_CELLS, sum(HEAD_SPLITS), device=x.device)
        self.train(was_training)
        obj, shape, color, size = logits.float().split(HEAD_SPLITS, dim=-1)
        return {"object": obj.squeeze(-1).sigmoid(), "shape": shape.softmax(-1), "color": color.softmax(-1),
                "size": size.softmax(-1)}

    # -- decisions ------------------------------------------------------------

    def predict(self, images, threshold: float = 0.5) -> list[list[ShapeObject]]:
        """The objects found in each image (cells with objectness > threshold, arg-max attributes)."""
        p = self.cell_probs(images)
        shape, color, size = (p[k].argmax(-1).tolist() for k in ("shape", "color", "size"))
        found = (p["object"] > threshold).tolist()
        return [[ShapeObject(SHAPES[shape[b][k]], COLOR_NAMES[color[b][k]], SIZES[size[b][k]], POSITIONS[k])
                 for k in range(N_CELLS) if found[b][k]] for b in range(len(found))]

    def accepts(self, images, objects_per_image: Sequence[Sequence[ShapeObject] | ShapeObject],
                check_position: bool = True, check_size: bool = False, threshold: float = 0.5) -> torch.BoolTensor:
        """(B,) True where every requested object is detected with matching shape and colour (and position / size)."""
        found = self.predict(images, threshold)
        if len(found) != len(objects_per_image):
            raise ValueError(f"{len(found)} images but {len(objects_per_image)} object lists")

        def key(o: ShapeObject) -> tuple:
            return (o.shape, o.color) + ((o.position,) if check_position else ()) + ((o.size,) if check_size else ())

        out = []
        for det, req in zip(found, objects_per_image):
            req = [req] if isinstance(req, ShapeObject) else list(req)
            have, want = Counter(map(key, det)), Counter(map(key, req))  # matching is by equal keys: counts suffice
            out.append(all(have[k] >= n for k, n in want.items()))
        return torch.tensor(out, dtype=torch.bool)

    def accepts_labels(self, images, labels) -> torch.BoolTensor:
        """(B,) True where an object of the class label's shape and colour is present, anywhere, any size."""
        labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
        requests = [ShapeObject(*label_names(int(lab)), "medium", "center") for lab in labels]
        return self.accepts(images, requests, check_position=False, check_size=False)

    # -- weights --------------------------------------------------------------

    def save(self, path: str | Path, metrics: dict | None = None) -> Path:
        """fp16 safetensors; the config (and optional metrics) go into the metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
                   for k, v in self.state_dict().items() if not k.endswith("num_batches_tracked")}
        meta = {"format": "sumie.shapes_verifier", "config": json.dumps(asdict(self.config))}
        if metrics:
            meta["metrics"] = json.dumps(metrics)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> "ShapesVerifier":
        """Load weights (default: the shipped ``assets/shapes_verifier.safetensors``) in eval mode, fp32."""
        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"verifier weights {str(path)!r} not found; train them with "
                                    f"`python -m sumie.metrics.verifier --out {path}`")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != "sumie.shapes_verifier":
            raise ValueError(f"{path} is not a sumie shapes verifier (metadata format {meta.get('format')!r})")
        cfg = json.loads(meta["config"])
        cfg["widths"] = tuple(cfg["widths"])
        model = cls(VerifierConfig(**cfg))
        state = model.state_dict()
        missing = [k for k in state if k not in tensors and not k.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"{path}: missing tensors {missing[:4]}")
        model.load_state_dict({k: tensors[k].float() if k in tensors else v for k, v in state.items()})
        return model.to(device).eval()


# ---------------------------------------------------------------------------
# Procedural training data and augmentation
# ---------------------------------------------------------------------------

def make_batch(rng: np.random.Generator, batch_size: int, resolution: int = 32,
               n_objects: Sequence[float] = (0.05, 0.45, 0.35, 0.15), background: str = "mixed",
               render_resolutions: Sequence[int] = (32,)) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
    """Rendered scenes (B, 3, R, R) in [-1, 1], per-cell targets (-100 = no object), and the scenes."""
    xs, scenes = [], []
    target = {k: torch.full((batch_size, N_CELLS), -100, dtype=torch.long) for k in ("shape", "color", "size")}
    target["object"] = torch.zeros(batch_size, N_CELLS)
    for b in range(batch_size):
        n = int(rng.choice(len(n_objects), p=np.asarray(n_objects) / sum(n_objects)))
        scene = sample_scene(rng, n, background)
        r = int(render_resolutions[int(rng.integers(len(render_resolutions)))])
        img = to_tensor(render(scene.objects, scene.background, r, rng))  # (3, r, r)
        if r != resolution:  # the same resize the verifier applies to its inputs
            img = F.interpolate(img[None], size=(resolution, resolution), mode="bilinear", antialias=True,
                                align_corners=False)[0]
        xs.append(img)
        scenes.append(scene)
        for o in scene.objects:
            k = POSITIONS.index(o.position)
            target["object"][b, k] = 1.0
            target["shape"][b, k] = SHAPES.index(o.shape)
            target["color"][b, k] = COLOR_NAMES.index(o.color)
            target["size"][b, k] = SIZES.index(o.size)
    return torch.stack(xs), target, scenes


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur, (B, C, H, W) with sigma (B,) in pixels (separable 5-tap kernels)."""
    b, c, h, w = x.shape
    t = torch.arange(-2, 3, dtype=x.dtype, device=x.device)
    k = torch.exp(-t[None] ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 5)
    y = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, k.view(b * c, 1, 1, 5), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, 5, 1), groups=b * c)
    return y.view(b, c, h, w)


def degrade(x: torch.Tensor, generator: torch.Generator, p: float = 0.8, strength: float = 1.0) -> torch.Tensor:
    """Imitate generated images: blur, contrast / brightness / per-channel colour jitter, white and blotchy noise."""
    b = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

    on = (torch.rand(b, generator=generator) < p).float()  # (B,) which images are degraded
    s = on * strength
    x = torch.where(on.view(b, 1, 1, 1) > 0, gaussian_blur(x, u(0.0, 0.8) * s + 1e-3), x)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * (1 + u(-0.2, 0.2, 1, 1, 1) * s.view(b, 1, 1, 1))  # contrast
    x = x * (1 + u(-0.08, 0.08, 3, 1, 1) * s.view(b, 1, 1, 1)) + (u(-0.06, 0.06, 3, 1, 1) + u(-0.06, 0.06, 1, 1, 1)) \
        * s.view(b, 1, 1, 1)  # per-channel gain and offset, brightness
    blotch = F.interpolate(torch.randn(b, 3, 6, 6, generator=generator), size=x.shape[-2:], mode="bilinear",
                           align_corners=False)
    x = x + blotch * u(0.0, 0.06, 1, 1, 1) * s.view(b, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=generator) * u(0.0, 0.08, 1, 1, 1) * s.view(b, 1, 1, 1)
    return x.clamp(-1, 1)


def detection_loss(logits: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
    """BCE on objectness for every cell + cross-entropy on attributes of occupied cells (YOLO-style)."""
    obj, shape, color, size = logits.split(HEAD_SPLITS, dim=-1)  # (B, 9, K)
    loss = F.binary_cross_entropy_with_logits(obj.squeeze(-1), target["object"])
    for lg, k in ((shape, "shape"), (color, "color"), (size, "size")):
        loss = loss + F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target[k].reshape(-1), ignore_index=-100)
    return loss


# ---------------------------------------------------------------------------
# Evaluation and training
# ---------------------------------------------------------------------------

def _wrong_label(rng: np.random.Generator, o: ShapeObject) -> ShapeObject:
    """The same object with a different shape, or a different colour, or both."""
    while True:
        s = o.shape if rng.random() < 1 / 3 else SHAPES[int(rng.integers(len(SHAPES)))]
        c = o.color if (s != o.shape and rng.random() < 0.5) else COLOR_NAMES[int(rng.integers(len(COLORS)))]
        if (s, c) != (o.shape, o.color):
            return ShapeObject(s, c, o.size, o.position)


@torch.no_grad()
def evaluate(verifier: ShapesVerifier, n: int = 1000, seed: int = 10_000, degraded: bool = False,
             resolution: int = 32) -> dict[str, float]:
    """Accuracies on fresh procedural images (scenes drawn from ``seed``; keep it apart from the training seed).

    single_accept: single-object images where the true shape+colour is found (anywhere);
    single_exact: exactly the true object predicted (shape, colour, size, position);
    single_false_accept: accepted although asked for a different shape and/or colour;
    two_scene: two-object images predicted exactly (shape, colour, position of both, nothing else);
    two_accept: accepted with positions checked; two_false_accept: one object's shape/colour changed,
    two_swap_false_accept: the two colours swapped between the objects (attribute binding).
    """
    rng = np.random.default_rng((seed, resolution, int(degraded)))
    gen = torch.Generator().manual_seed(seed + 1)
    res: dict[str, float] = {}
    for n_obj in (1, 2):
        x, _, scenes = make_batch(rng, n, resolution, n_objects=[0.0] * n_obj + [1.0], render_resolutions=(resolution,))
        if degraded:
            x = degrade(x, gen, p=1.0)
        pred = verifier.predict(x)
        truth = [list(s.objects) for s in scenes]
        wrong = []
        for s in scenes:
            objs = list(s.objects)
            j = int(rng.integers(len(objs)))
            objs[j] = _wrong_label(rng, objs[j])
            wrong.append(objs)
        if n_obj == 1:
            res["single_accept"] = verifier.accepts(x, truth, check_position=False).float().mean().item()
            res["single_exact"] = float(np.mean([set(p) == set(t) for p, t in zip(pred, truth)]))
            res["single_false_accept"] = verifier.accepts(x, wrong, check_position=False).float().mean().item()
        else:
            def pos_key(objs):
                return {(o.shape, o.color, o.position) for o in objs}

            res["two_scene"] = float(np.mean([pos_key(p) == pos_key(t) for p, t in zip(pred, truth)]))
            res["two_scene_with_size"] = float(np.mean([set(p) == set(t) for p, t in zip(pred, truth)]))
            res["two_accept"] = verifier.accepts(x, truth, check_position=True).float().mean().item()
            res["two_false_accept"] = verifier.accepts(x, wrong, check_position=True).float().mean().item()
            swapped = [[ShapeObject(a.shape, b.color, a.size, a.position), ShapeObject(b.shape, a.color, b.size,
                        b.position)] for a, b in truth if a.color != b.color]
            keep = [i for i, (a, b) in enumerate(truth) if a.color != b.color]
            res["two_swap_false_accept"] = verifier.accepts(x[keep], swapped).float().mean().item()
    return res


def train_verifier(out_path: str | Path | None, steps: int = 1600, batch_size: int = 128, seed: int = 0,
                   resolution: int = 32, lr: float = 3e-3, time_budget_s: float | None = None,
                   eval_n: int = 1000, eval_seed: int = 10_000, log_every: int = 100) -> dict:
    """Train on procedural scenes (AdamW, linear warmup + cosine decay), evaluate on held-out ones, save fp16."""
    if eval_seed == seed:
        raise ValueError("eval_seed must differ from the training seed, or the evaluation is not held out")
    torch.manual_seed(seed)
    model = ShapesVerifier(VerifierConfig(resolution=resolution)).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, min(100, steps // 10))
    gen = torch.Generator().manual_seed(seed)
    render_res = (32, 32, 32, 32, 32, 16, 20, 24, 48, 64)  # mostly native, some resampled from other resolutions
    t0, log, step = time.perf_counter(), [], 0
    model.train()
    for step in range(steps):
        rng = np.random.default_rng((seed, step))
        x, target, _ = make_batch(rng, batch_size, resolution, render_resolutions=render_res)
        x = degrade(x, gen, p=0.8).contiguous(memory_format=torch.channels_last)
        elapsed = time.perf_counter() - t0
        progress = max(step / steps, elapsed / time_budget_s if time_budget_s else 0.0)  # cosine over steps or time
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        loss = detection_loss(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.append({"step": step, "loss": round(loss.item(), 4), "s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
        if progress >= 1.0:
            break
    train_s = time.perf_counter() - t0
    model.eval()
    metrics = {"steps": step + 1, "batch_size": batch_size, "seed": seed, "train_seconds": round(train_s, 1),
               "params": sum(p.numel() for p in model.parameters()), "eval_n": eval_n, "eval_seed": eval_seed,
               "clean": evaluate(model, eval_n, eval_seed), "degraded": evaluate(model, eval_n, eval_seed, True)}
    if out_path is not None:
        model.save(out_path, metrics)
        # report the accuracy of the fp16 weights that are actually shipped
        shipped = ShapesVerifier.load(out_path)
        metrics["clean"] = evaluate(shipped, eval_n, eval_seed)
        metrics["degraded"] = evaluate(shipped, eval_n, eval_seed, True)
        for r in (16, 64):
            metrics[f"clean_{r}px"] = evaluate(shipped, eval_n, eval_seed, resolution=r)
        shipped.save(out_path, metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sumie.metrics.verifier", description="train the shapes verifier")
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS), help="weights file to write (fp16 safetensors)")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None, help="stop training after this many minutes")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--eval-n", type=int, default=1000)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    metrics = train_verifier(args.out, args.steps, args.batch_size, args.seed,
                             time_budget_s=args.minutes * 60 if args.minutes else None, eval_n=args.eval_n)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
