"""Feature networks for distribution metrics: sumie's own small CNN, and Inception-v3 (FID).

Metrics such as FD, KID and precision/recall are only as meaningful as the features they
compare. The standard choice is the pool3 layer of the TensorFlow Inception-v3 of Heusel et
al. 2017 (:mod:`sumie.nn.inception`), whose weights sumie cannot ship or download. So sumie
also trains and ships its own network, ``sumie-features``: a 6-layer CNN trained as a
multi-task classifier on procedural :mod:`sumie.data.shapes` scenes (which shapes, colours,
(shape, colour) pairs and 3x3 cells are present, the object count and the background), under
the verifier's degradations. Its 128-d global-average-pooled features are what FD/KID/PR
compare; numbers computed with it are always reported as ``FD_sumie`` etc., never as FID.

Retrain the shipped weights with

    python -m sumie.metrics.features --out src/sumie/assets/sumie_features.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..data.shapes import COLORS, NUM_CLASSES, PLAIN_BACKGROUNDS, POSITIONS, SHAPES, TEXTURED_BACKGROUNDS

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "sumie_features.safetensors"
FORMAT = "sumie.features"
BACKGROUNDS: tuple[str, ...] = tuple(PLAIN_BACKGROUNDS) + TEXTURED_BACKGROUNDS
MAX_COUNT = 4
# heads: (shape, colour) pairs, shapes, colours and cells present (multi-label), object count, background
HEAD_SPLITS: tuple[int, ...] = (NUM_CLASSES, len(SHAPES), len(COLORS), len(POSITIONS), MAX_COUNT, len(BACKGROUNDS))
MULTI_LABEL = ("pairs", "shapes", "colors", "cells")


class FeatureExtractor(Protocol):
    """What the metrics need from a feature network."""

    name: str  # e.g. "sumie-features" or "inception-v3-fid"; goes into every report
    metric_prefix: str  # "FD_sumie" / "FID": the name the Frechet distance is reported under
    dim: int

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [-1, 1], any H, W -> (B, dim) float32."""
        ...


@dataclass(frozen=True)
class FeatureNetConfig:
    resolution: int = 32  # every input is resized to this (antialiased bilinear)
    widths: tuple[int, ...] = (32, 64, 128)  # one stage per width; stages after the first halve the resolution
    blocks_per_stage: int = 2


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class SumieFeatureNet(nn.Module):
    """CoordConv CNN -> global average pool (the features) -> linear multi-task heads."""

    name = "sumie-features"
    metric_prefix = "FD_sumie"

    def __init__(self, config: FeatureNetConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or FeatureNetConfig()
        layers, c_in = [], 5  # RGB + (y, x) coordinates (Liu et al. 2018)
        for s, width in enumerate(c.widths):
            for b in range(c.blocks_per_stage):
                layers.append(_conv(c_in, width, 2 if (s > 0 and b == 0) else 1))
                c_in = width
        self.body = nn.Sequential(*layers)
        self.dim = c_in
        self.head = nn.Linear(c_in, sum(HEAD_SPLITS))

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, R, R) clamped, antialiased bilinear (the same for every set)."""
        r = self.config.resolution
        x = x.float().clamp(-1, 1)
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) -> pooled features (B, dim)."""
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.body(torch.cat([x, ys, xs], 1)).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) -> head logits (B, sum(HEAD_SPLITS))."""
        return self.head(self.embed(x))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, dim) float32 features, in eval mode."""
        was = self.training
        self.eval()
        out = self.embed(self.resize(images.to(next(self.parameters()).device)))
        self.train(was)
        return out.float()

    # -- weights --------------------------------------------------------------

    def save(self, path: str | Path, metrics: dict | None = None) -> Path:
        """fp16 safetensors; config and metrics in the metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
                   for k, v in self.state_dict().items() if not k.endswith("num_batches_tracked")}
        meta = {"format": FORMAT, "config": json.dumps(asdict(self.config))}
        if metrics:
            meta["metrics"] = json.dumps(metrics)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> "SumieFeatureNet":
        """The shipped (default) or given weights, eval mode, fp32; a wrong file names the first bad tensor."""
        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"sumie-features weights {str(path)!r} not found; train them with "
                                    f"`python -m sumie.metrics.features --out {path}`")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a sumie feature network (metadata format {meta.get('format')!r})")
        cfg = json.loads(meta["config"])
        cfg["widths"] = tuple(cfg["widths"])
        model = cls(FeatureNetConfig(**cfg))
        state = model.state_dict()
        for k, v in state.items():
            if k.endswith("num_batches_tracked"):
                continue
            if k not in tensors:
                raise ValueError(f"{path}: layer {k} is missing")
            if tensors[k].shape != v.shape:
                raise ValueError(f"{path}: layer {k} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}")
        model.load_state_dict({k: tensors[k].float() if k in tensors else v for k, v in state.items()})
        return model.to(device).eval()


# ---------------------------------------------------------------------------
# Training data, loss, evaluation
# ---------------------------------------------------------------------------

def targets_for(scenes) -> dict[str, torch.Tensor]:
    """Multi-task targets of a list of :class:`Scene`."""
    b = len(scenes)
    t = {k: torch.zeros(b, n) for k, n in zip(MULTI_LABEL, HEAD_SPLITS)}
    t["count"], t["background"] = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)
    for i, s in enumerate(scenes):
        for o in s.objects:
            t["pairs"][i, o.label] = 1
            t["shapes"][i, SHAPES.index(o.shape)] = 1
            t["colors"][i, list(COLORS).index(o.color)] = 1
            t["cells"][i, POSITIONS.index(o.position)] = 1
        t["count"][i] = len(s.objects) - 1
        t["background"][i] = BACKGROUNDS.index(s.background)
    return t


def multitask_loss(logits: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """BCE on the multi-label heads (positives up-weighted: they are sparse) + cross-entropy on count and background."""
    *multi, count, bg = logits.split(HEAD_SPLITS, dim=-1)
    loss = F.cross_entropy(count, t["count"]) + F.cross_entropy(bg, t["background"])
    for lg, k in zip(multi, MULTI_LABEL):
        pos_weight = torch.full((lg.shape[-1],), lg.shape[-1] / 3.0)  # about 1.5 of n labels are on
        loss = loss + F.binary_cross_entropy_with_logits(lg, t[k], pos_weight=pos_weight)
    return loss


N_OBJECTS = (0.0, 0.55, 0.25, 0.12, 0.08)  # probability of 0..4 objects (never empty: count is 1..4)


def _batch(rng: np.random.Generator, n: int, resolution: int, render_res=(32,)):
    from .verifier import make_batch

    x, _, scenes = make_batch(rng, n, resolution, n_objects=N_OBJECTS, background="mixed",
                              render_resolutions=render_res)
    return x, targets_for(scenes)


@torch.no_grad()
def evaluate(model: SumieFeatureNet, n: int = 1000, seed: int = 10_000, degraded: bool = False) -> dict[str, float]:
    """Head accuracies on fresh scenes: the exact sets of (shape, colour) pairs, shapes, colours and occupied
    cells (every label right), the object count, the background."""
    from .verifier import degrade

    model.eval()
    x, t = _batch(np.random.default_rng((seed, int(degraded))), n, model.config.resolution)
    if degraded:
        x = degrade(x, torch.Generator().manual_seed(seed), p=1.0)
    *multi, count, bg = model(model.resize(x)).split(HEAD_SPLITS, dim=-1)
    out = {f"{k}_exact": ((lg > 0).float() == t[k]).all(1).float().mean().item() for lg, k in zip(multi, MULTI_LABEL)}
    out["count"] = (count.argmax(1) == t["count"]).float().mean().item()
    out["background"] = (bg.argmax(1) == t["background"]).float().mean().item()
    return out


def train_features(out_path: str | Path | None, steps: int = 1500, batch_size: int = 128, seed: int = 0,
                   lr: float = 3e-3, time_budget_s: float | None = None, eval_n: int = 1000,
                   eval_seed: int = 10_000, log_every: int = 100, degrade_p: float = 0.0) -> dict:
    """AdamW with warmup and cosine decay (over steps or the time budget) on procedural scenes; save fp16.

    Scenes are rendered at 32 px or above (downsampled, so sharp) and, by default, not degraded:
    features for a distribution distance must *see* blur and noise, not be trained to ignore them
    (``degrade_p`` > 0 applies the verifier's degradations to that fraction of each batch)."""
    from .verifier import degrade

    if eval_seed == seed:
        raise ValueError("eval_seed must differ from the training seed, or the evaluation is not held out")
    torch.manual_seed(seed)
    model = SumieFeatureNet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, min(100, steps // 10))
    render_res = (32, 32, 32, 48, 64)
    t0, step = time.perf_counter(), 0
    model.train()
    for step in range(steps):
        x, t = _batch(np.random.default_rng((seed, step)), batch_size, model.config.resolution, render_res)
        if degrade_p > 0:
            x = degrade(x, gen, p=degrade_p)
        progress = max(step / steps, (time.perf_counter() - t0) / time_budget_s if time_budget_s else 0.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        loss = multitask_loss(model(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "s": round(time.perf_counter() - t0, 1)}),
                  flush=True)
        if progress >= 1.0:
            break
    metrics = {"steps": step + 1, "batch_size": batch_size, "seed": seed, "degrade_p": degrade_p,
               "train_seconds": round(time.perf_counter() - t0, 1),
               "params": sum(p.numel() for p in model.parameters()), "eval_n": eval_n, "eval_seed": eval_seed}
    if out_path is not None:
        model.save(out_path, metrics)
        model = SumieFeatureNet.load(out_path)  # measure the fp16 weights that ship
    metrics["clean"] = evaluate(model, eval_n, eval_seed)
    metrics["degraded"] = evaluate(model, eval_n, eval_seed, degraded=True)
    if out_path is not None:
        model.save(out_path, metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sumie.metrics.features", description="train sumie-features")
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None, help="stop training after this many minutes")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    metrics = train_features(args.out, args.steps, args.batch_size, args.seed,
                             time_budget_s=args.minutes * 60 if args.minutes else None)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
