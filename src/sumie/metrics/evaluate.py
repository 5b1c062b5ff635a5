"""Evaluate generated images against a reference set: FD/KID/precision/recall and prompt adherence.

Two ways in:

* two image folders (:func:`evaluate_folders`), and
* a trained run (:func:`evaluate_run`, :func:`sweep_run`): the reference is the run's own
  data (fresh procedural scenes for ``shapes``, the folder otherwise) and the generated set
  is sampled with the conditions of the reference items, taken from a
  :class:`ConditionSource` (class labels today; captions for text-conditioned models), so
  both sets ask for the same things.

Distribution metrics are computed on the features of a named network
(:mod:`sumie.metrics.features`) and reported under its name: ``FD_sumie`` for sumie's own
network, ``FID`` only for the Inception-v3 of Heusel et al. 2017. Adherence on ``shapes``
uses the verifier (:mod:`sumie.metrics.verifier`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from ..data.folder import IMAGE_EXTENSIONS, load_rgb, resize_crop
from .fid import DEFAULT_K, frechet_distance, kid, min_samples, precision_recall

# ---------------------------------------------------------------------------
# Feature networks by name
# ---------------------------------------------------------------------------

FEATURE_NETWORKS = ("sumie", "inception")


def load_features(kind: str = "sumie", weights: str | Path | None = None, device: str | torch.device = "cpu"):
    """``sumie`` (shipped weights unless ``weights`` is given) or ``inception`` (``weights`` required)."""
    if kind == "sumie":
        from .features import SumieFeatureNet

        return SumieFeatureNet.load(weights, device)
    if kind == "inception":
        if weights is None:
            raise ValueError("--features inception needs --inception-weights FILE (pytorch-fid's "
                             "pt_inception-2015-12-05-6726825d.pth); sumie cannot download it")
        from ..nn.inception import load_fid_inception

        return load_fid_inception(weights, device)
    raise ValueError(f"unknown feature network {kind!r}; valid: {', '.join(FEATURE_NETWORKS)}")


def metric_names(extractor) -> dict[str, str]:
    """Report keys for an extractor: FID/KID/... for Inception, FD_sumie/KID_sumie/... otherwise."""
    suffix = "" if extractor.name == "inception-v3-fid" else "_" + extractor.name.split("-")[0]
    return {"fd": extractor.metric_prefix, "kid": f"KID{suffix}", "precision": f"precision{suffix}",
            "recall": f"recall{suffix}"}


@torch.no_grad()
def extract_features(extractor, images: torch.Tensor, batch_size: int = 250, progress: bool = False,
                     desc: str = "features") -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] (float or uint8 (N, H, W, 3)) -> (N, D) float32, in batches."""
    from tqdm import tqdm

    n = len(images)
    out = []
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True, leave=False)
    for i in range(0, n, batch_size):
        x = images[i:i + batch_size]
        if x.dtype == torch.uint8:  # (B, H, W, 3)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(extractor.features(x))
        bar.update(len(x))
    bar.close()
    return torch.cat(out) if out else torch.zeros(0, extractor.dim)


def distribution_metrics(extractor, ref_feats: torch.Tensor, gen_feats: torch.Tensor, k: int = DEFAULT_K,
                         kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> tuple[dict, list]:
    """FD, KID (mean, std), precision and recall under the extractor's names; notes on what was adapted."""
    names, notes = metric_names(extractor), []
    need = max(min_samples(k).values())
    for which, f in (("reference", ref_feats), ("generated", gen_feats)):
        if len(f) < need:
            from .fid import NotEnoughSamples

            raise NotEnoughSamples(f"the metrics need at least {need} images per set (FD and KID 2, "
                                   f"precision/recall k+1 = {k + 1}); the {which} set has {len(f)}")
    fd = frechet_distance(ref_feats, gen_feats)
    kr = kid(ref_feats, gen_feats, kid_subsets, kid_subset_size, seed)
    pr = precision_recall(ref_feats, gen_feats, k)
    if kr.subset_size < kid_subset_size:
        notes.append(f"KID subset size reduced from {kid_subset_size} to {kr.subset_size} (the smaller set's size)")
    if abs(kr.mean) < 2 * kr.std:
        notes.append(f"{names['kid']} {kr.mean:.4g} is within 2 standard deviations ({kr.std:.3g}) of 0: at "
                     f"{kr.subset_size} images the sets are not told apart by KID (its unbiased estimate can be "
                     "negative); use more images (--n) to resolve it")
    d = extractor.dim
    if min(len(ref_feats), len(gen_feats)) <= d:
        notes.append(f"{names['fd']}: fewer images ({min(len(ref_feats), len(gen_feats))}) than feature "
                     f"dimensions ({d}): the covariances are singular and FD is biased upwards; compare "
                     "only numbers computed with the same number of images")
    return {names["fd"]: fd, names["kid"]: {"mean": kr.mean, "std": kr.std, "subsets": kr.subsets,
                                            "subset_size": kr.subset_size},
            names["precision"]: pr.precision, names["recall"]: pr.recall, "k": k}, notes


def features_info(extractor, weights: str | Path | None) -> dict:
    info = {"name": extractor.name, "dim": extractor.dim}
    if extractor.name == "sumie-features":
        from .features import DEFAULT_WEIGHTS

        info["weights"] = str(weights or DEFAULT_WEIGHTS)
        info["note"] = ("sumie's own feature network (trained on procedural shapes); its FD is not FID and "
                        "is not comparable with published FID numbers")
    else:
        info["weights"] = str(weights)
    return info


# ---------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------

@dataclass
class FolderImages:
    """Decoded images of a folder, at their own sizes, plus what could not be read."""

    root: Path
    images: list = field(default_factory=list)  # PIL RGB images
    names: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)

    @property
    def sizes(self) -> Counter:
        return Counter(im.size for im in self.images)


def read_folder(root: str | Path, progress: bool = False) -> FolderImages:
    """Every PNG/JPEG/WebP under ``root``; unreadable or truncated files are skipped and counted."""
    from tqdm import tqdm

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    out = FolderImages(root)
    for p in tqdm(paths, desc=f"read {root.name}", unit="img", disable=not progress, dynamic_ncols=True, leave=False):
        try:
            out.images.append(load_rgb(p))
            out.names.append(str(p.relative_to(root)))
        except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            out.corrupt.append(str(p.relative_to(root)))
    if not out.images:
        raise ValueError(f"no readable images in {str(root)!r} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}; "
                         f"{len(paths)} candidate(s), {len(out.corrupt)} unreadable)")
    return out


def common_resolution(*sets: FolderImages) -> int | None:
    """None if every image of every set has one square size; else the smaller median short side of the sets."""
    sizes = set().union(*(s.sizes for s in sets))
    if len(sizes) == 1 and next(iter(sizes))[0] == next(iter(sizes))[1]:
        return None
    return int(min(np.median([min(im.size) for im in s.images]) for s in sets))


def to_tensor_batch(images: Sequence, resolution: int | None) -> torch.Tensor:
    """PIL images -> uint8 (N, R, R, 3), resized (shorter side, Lanczos) and centre-cropped when resolution is set."""
    arrs = [np.asarray(resize_crop(im, resolution) if resolution else im, dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrs))


def _folder_info(s: FolderImages) -> dict:
    return {"path": str(s.root), "n": len(s.images), "corrupt_skipped": len(s.corrupt),
            "corrupt_examples": s.corrupt[:5],
            "sizes": {f"{w}x{h}": c for (w, h), c in sorted(s.sizes.items())}}


def evaluate_folders(generated: str | Path, reference: str | Path, *, features: str = "sumie",
                     weights: str | Path | None = None, resolution: int | None = None, k: int = DEFAULT_K,
                     kid_subsets: int = 100, kid_subset_size: int = 1000, batch_size: int = 250, seed: int = 0,
                     progress: bool = True, adherence_captions: bool = False) -> dict:
    """Metrics between two image folders; the report says what was skipped and how images were resized."""
    t0 = time.perf_counter()
    extractor = load_features(features, weights)
    gen, ref = read_folder(generated, progress), read_folder(reference, progress)
    res = resolution or common_resolution(gen, ref)
    notes = [f"{len(s.corrupt)} unreadable image(s) skipped in {s.root}, e.g. {s.corrupt[0]}"
             for s in (gen, ref) if s.corrupt]
    if res is not None:
        notes.append(f"both sets resized the same way to {res}x{res} (shorter side to {res} with Lanczos, centre "
                     f"crop); sizes found: generated {_folder_info(gen)['sizes']}, reference {_folder_info(ref)['sizes']}")
    t_feat = time.perf_counter()
    gen_x, ref_x = to_tensor_batch(gen.images, res), to_tensor_batch(ref.images, res)
    gen_f = extract_features(extractor, gen_x, batch_size, progress, "features (generated)")
    ref_f = extract_features(extractor, ref_x, batch_size, progress, "features (reference)")
    t_metrics = time.perf_counter()
    metrics, more = distribution_metrics(extractor, ref_f, gen_f, k, kid_subsets, kid_subset_size, seed)
    notes.extend(more)
    if len(gen.images) != len(ref.images):
        notes.append(f"sets differ in size ({len(gen.images)} generated, {len(ref.images)} reference); the "
                     "estimators allow it, but FD's bias depends on both sizes")
    report = {"mode": "folders", "features": features_info(extractor, weights), "generated": _folder_info(gen),
              "reference": _folder_info(ref), "resolution": res or gen.images[0].size[0], "metrics": metrics,
              "notes": notes}
    if adherence_captions:
        report["adherence"] = folder_adherence(gen, gen_x)
    report["seconds"] = {"total": time.perf_counter() - t0, "features": t_metrics - t_feat,
                         "metrics": time.perf_counter() - t_metrics}
    return report


def folder_adherence(s: FolderImages, images: torch.Tensor) -> dict:
    """Verifier adherence of folder images to their shapes captions (metadata.jsonl or .txt)."""
    from ..data.folder import _read_metadata

    meta = _read_metadata(s.root)
    caps = []
    for name in s.names:
        p = (s.root / name).resolve()
        txt = p.with_suffix(".txt")
        caps.append(meta.get(p) or (txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""))
    return caption_adherence(images, caps)


# ---------------------------------------------------------------------------
# Prompt adherence
# ---------------------------------------------------------------------------

def caption_adherence(images: torch.Tensor, captions: Sequence[str], verifier=None) -> dict:
    """Share of images whose shapes caption the verifier accepts (shape, colour, position), by object count."""
    from ..data.shapes import parse_caption
    from .verifier import ShapesVerifier

    verifier = verifier or ShapesVerifier.load()
    keep, requests = [], []
    for i, c in enumerate(captions):
        try:
            requests.append(parse_caption(c))
            keep.append(i)
        except ValueError:
            continue
    out = {"verifier": "shapes_verifier", "checked": len(keep), "unparsable_captions": len(captions) - len(keep)}
    if not keep:
        return out
    x = images[keep]
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    ok = verifier.accepts(x, requests, check_position=True).tolist()
    out["accepted"] = float(np.mean(ok))
    by_n: dict[int, list] = {}
    for req, a in zip(requests, ok):
        by_n.setdefault(len(req), []).append(a)
    out["by_objects"] = {str(n): {"n": len(v), "accepted": float(np.mean(v))} for n, v in sorted(by_n.items())}
    return out


def label_adherence(images: torch.Tensor, labels: Sequence[int], verifier=None) -> dict:
    """Share of images showing their class label's shape and colour (anywhere, any size)."""
    from .verifier import ShapesVerifier

    verifier = verifier or ShapesVerifier.load()
    ok = verifier.accepts_labels(images, list(labels))
    return {"verifier": "shapes_verifier", "checked": len(ok), "accepted": ok.float().mean().item()}


# ---------------------------------------------------------------------------
# Generating from a run: condition sources
# ---------------------------------------------------------------------------

class ConditionSource(Protocol):
    """What to ask the model for, item by item, and how to check that it was drawn."""

    kind: str  # "class", "caption" or "none"

    def conds(self, start: int, stop: int) -> tuple[dict | None, dict | None]:
        """(cond, uncond) for items [start, stop)."""
        ...

    def describe(self) -> dict:
        ...

    def adherence(self, images: torch.Tensor) -> dict | None:
        """Verifier adherence of ``images`` (item i drawn for condition i), or None where it does not apply."""
        ...


@dataclass
class ClassLabels:
    """Class-conditional models: one label per item; -1 is the unconditional label."""

    labels: list[int]
    shapes_vocabulary: bool = True  # labels index (shape, colour) pairs of ``sumie.data.shapes``
    kind: str = "class"

    def conds(self, start: int, stop: int) -> tuple[dict, dict]:
        from ..pipeline import class_cond

        return class_cond(self.labels[start:stop]), class_cond([-1] * (stop - start))

    def describe(self) -> dict:
        return {"kind": "class labels", "n": len(self.labels), "distinct": len(set(self.labels))}

    def adherence(self, images: torch.Tensor) -> dict | None:
        return label_adherence(images, self.labels[:len(images)]) if self.shapes_vocabulary else None


@dataclass
class Captions:
    """Text-conditioned models: one caption per item, encoded by the run's text encoder."""

    captions: list[str]
    encoder: object  # sumie.text TextEncoder
    kind: str = "caption"

    def conds(self, start: int, stop: int) -> tuple[dict, dict]:
        from ..text.small import text_cond

        with torch.no_grad():
            return (text_cond(self.encoder, self.captions[start:stop]),
                    text_cond(self.encoder, [""] * (stop - start)))

    def describe(self) -> dict:
        return {"kind": "captions", "n": len(self.captions), "examples": self.captions[:3]}

    def adherence(self, images: torch.Tensor) -> dict | None:
        return caption_adherence(images, self.captions[:len(images)])


@dataclass
class Unconditional:
    n: int
    kind: str = "none"

    def conds(self, start: int, stop: int) -> tuple[None, None]:
        return None, None

    def describe(self) -> dict:
        return {"kind": "unconditional", "n": self.n}

    def adherence(self, images: torch.Tensor) -> None:
        return None


class _Permuted:
    """A dataset viewed in a seeded random order (so the first n items are a fair sample of a sorted folder)."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset = dataset
        self.perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()

    def __len__(self) -> int:
        return len(self.perm)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.perm[i]]


def reference_dataset(config, seed_offset: int = 1, split: str | None = None):
    """The run's data as a reference set: shapes with a different seed (fresh scenes), or the folder's
    images (its ``split``, default the training split) in a seeded random order."""
    from ..data.folder import ImageFolderDataset
    from ..data.shapes import ShapesConfig, ShapesDataset

    d = config.data
    if d.kind == "shapes":
        return ShapesDataset(ShapesConfig(resolution=d.resolution, background=d.background,
                                          max_objects=d.max_objects, seed=d.seed + seed_offset))
    if d.kind == "folder":
        if not d.path or not Path(d.path).is_dir():
            raise FileNotFoundError(f"the run's image folder {d.path!r} is not here; pass --data DIR (the folder "
                                    "it was trained on, e.g. built with `sumie data emoji DIR`)")
        folder = ImageFolderDataset(d.path, d.resolution, random_flip=False, seed=d.seed, split=split or d.split)
        return _Permuted(folder, d.seed + seed_offset)
    raise ValueError(f"cannot build a reference set for data.kind {d.kind!r}")


def condition_source(config, dataset, n: int, run: str | Path | None = None, encoder=None) -> ConditionSource:
    """Conditions matching the first ``n`` reference items: their class labels or their captions
    (encoded by ``encoder``, else the run's text encoder)."""
    kind = config.data.conditioning
    if kind == "caption":
        if encoder is None:
            from ..models import load_text_encoder

            encoder = load_text_encoder(run)
        return Captions([dataset[i]["caption"] for i in range(n)], encoder)
    if kind == "class" and config.model.num_classes is not None:
        if config.data.kind != "shapes":
            raise ValueError("class-conditional evaluation needs labelled reference data (data.kind = shapes)")
        labels = [int(dataset.spec(i).objects[0].label) for i in range(n)]
        return ClassLabels(labels, shapes_vocabulary=True)
    return Unconditional(n)


@dataclass(frozen=True)
class SamplingSettings:
    sampler: str = "heun"
    steps: int = 30
    guidance_scale: float = 1.0
    schedule: str | None = None

    def label(self) -> str:
        return f"{self.sampler} {self.steps} steps w={self.guidance_scale:g}"


def generate(denoiser, config, source: ConditionSource, n: int, s: SamplingSettings, *, seed: int = 0,
             batch_size: int = 64, progress: bool = True, space=None) -> tuple[torch.Tensor, dict]:
    """Sample ``n`` images for the source's conditions: (n, 3, R, R) in [-1, 1] and cost figures."""
    from tqdm import tqdm

    from ..generation import GenerationRequest, SumieFamily
    from ..generation import generate as run

    family = SumieFamily(denoiser, config, space, getattr(source, "encoder", None))
    evaluations = [0]  # network evaluations, per image (a guided call evaluates 2 per image)
    hook = denoiser.register_forward_pre_hook(lambda module, args: evaluations.__setitem__(
        0, evaluations[0] + args[0].shape[0]))
    guided = s.guidance_scale != 1.0 and source.kind != "none"
    out = []
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=f"sample {s.label()}", unit="img", disable=not progress, dynamic_ncols=True,
               leave=False)
    try:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            req = GenerationRequest(seed=seed + start, sampler=s.sampler, schedule=s.schedule, steps=s.steps,
                                    guidance_scale=s.guidance_scale if guided else 1.0, n=stop - start)
            if source.kind == "caption":
                req.prompt, req.negative_prompt = source.captions[start:stop], [""] * (stop - start)
            elif source.kind == "class":
                req.class_labels = source.labels[start:stop]
            images = run(family, req).images  # (b, H, W, 3) uint8, what a user would save
            out.append(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
            bar.update(stop - start)
    finally:
        hook.remove()
    bar.close()
    dt = time.perf_counter() - t0
    return torch.cat(out), {"seconds": dt, "seconds_per_image": dt / n, "nfe_per_image": evaluations[0] / n}


# ---------------------------------------------------------------------------
# A run against its own data
# ---------------------------------------------------------------------------

def reference_images(dataset, n: int, progress: bool = True) -> torch.Tensor:
    """The first ``n`` items of the reference dataset: (n, 3, R, R) in [-1, 1]."""
    from tqdm import tqdm

    if n > len(dataset):
        raise ValueError(f"asked for {n} images but the reference set has only {len(dataset)}")
    return torch.stack([dataset[i]["x"] for i in tqdm(range(n), desc="reference", unit="img",
                                                      disable=not progress, dynamic_ncols=True, leave=False)])


def evaluate_run(run: str | Path, settings: Sequence[SamplingSettings], *, n: int = 256, features: str = "sumie",
                 weights: str | Path | None = None, k: int = DEFAULT_K, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, seed: int = 0, batch_size: int = 64, raw: bool = False,
                 progress: bool = True, images_out: str | Path | None = None, data: str | Path | None = None,
                 split: str | None = None) -> dict:
    """Sample ``n`` images per setting from a run and compare them with ``n`` reference images of its data
    (``data``: the image folder, when it has moved since training; ``split``: e.g. "heldout")."""
    from ..io.checkpoint import resolve_checkpoint

    need = max(min_samples(k).values())
    if n < need:
        raise ValueError(f"--n {n} is too few: the metrics need at least {need} images per set "
                         f"(precision/recall with k={k} needs k+1)")
    from ..generation import SumieFamily

    family = SumieFamily.load(run, ema=not raw)
    denoiser, config, space = family.denoiser_, family.config, family.space_
    if data is not None:
        config.data.path = str(data)
    extractor = load_features(features, weights)
    dataset = reference_dataset(config, split=split)
    source = condition_source(config, dataset, n, run, family.encoder)
    ref_x = reference_images(dataset, n, progress)
    ref_f = extract_features(extractor, ref_x, progress=progress, desc="features (reference)")
    report = {"mode": "run", "run": str(run), "checkpoint": resolve_checkpoint(run).name,
              "weights": "raw" if raw else "ema", "features": features_info(extractor, weights),
              "reference": {"kind": config.data.kind, "n": n, "split": split or config.data.split,
                            "resolution": config.data.resolution,
                            "adherence": source.adherence(ref_x)},
              "conditions": source.describe(), "seed": seed, "results": [], "notes": []}
    if config.data.kind == "shapes":
        report["reference"]["note"] = (f"fresh procedural scenes (data seed {config.data.seed + 1}; training used "
                                       f"{config.data.seed}), background {config.data.background!r}")
    for s in settings:
        x, cost = generate(denoiser, config, source, n, s, seed=seed, batch_size=batch_size, progress=progress,
                           space=space)
        if images_out is not None:
            from ..image import save_png, to_uint8

            folder = Path(images_out) / f"{s.sampler}_{s.steps}_w{s.guidance_scale:g}"
            for i, im in enumerate(to_uint8(x)):
                save_png(folder / f"{i:05d}.png", im)
        t0 = time.perf_counter()
        gen_f = extract_features(extractor, x, progress=progress, desc="features (generated)")
        metrics, notes = distribution_metrics(extractor, ref_f, gen_f, k, kid_subsets, kid_subset_size, seed)
        t_metrics = time.perf_counter() - t0
        report["results"].append({"sampler": s.sampler, "steps": s.steps, "guidance_scale": s.guidance_scale,
                                  "schedule": s.schedule or config.sample.schedule, **cost,
                                  "metrics_seconds": t_metrics, "metrics": metrics,
                                  "adherence": source.adherence(x)})
        report["notes"] = sorted(set(report["notes"]) | set(notes))
    return report


def write_report(report: dict, path: str | Path) -> Path:
    """JSON report, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return path
