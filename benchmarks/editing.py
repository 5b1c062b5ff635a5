"""Editing with the one generation pipeline, measured on the bundled model (emoji-64) with
procedural shapes scenes the shapes verifier can judge.

* inpainting acceptance: a one-object scene, the object's box masked, the prompt asking for a
  different shape and colour at the same place; the verifier must find the new object there
  (the same captions drawn from scratch are the baseline), and the unmasked pixels must come
  back unchanged;
* strength sweep: img2img of the scenes with their own caption at strengths 0.2 .. 1.0: how
  far the image moves (mean |change| of uint8 pixels) and whether the object survives;
* time: img2img at strength s against text to image with the same settings (expect ~s).

    PYTHONPATH=src python benchmarks/editing.py --n 24 --steps 20 --sampler euler

Prints one JSON line per measurement and writes benchmarks/results/editing.json and
editing_strength.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from sumie.data.shapes import COLORS, SHAPES, ShapeObject, ShapesDataset, _nominal_box, caption
from sumie.generation import GenerationRequest, generate, load_family
from sumie.image import to_uint8
from sumie.metrics.verifier import ShapesVerifier

RES = 64


def scenes(n: int, seed: int = 987_654):
    ds = ShapesDataset(resolution=RES, min_objects=1, max_objects=1, seed=seed)
    out = []
    for i in range(n):
        item, spec = ds[i], ds.spec(i)
        out.append((Image.fromarray(to_uint8(item["x"])), spec.objects[0], spec.background))
    return out


def swapped(o: ShapeObject, i: int) -> ShapeObject:
    """Another shape and colour at the same size and place."""
    shapes = [s for s in SHAPES if s != o.shape]
    colors = [c for c in COLORS if c != o.color]
    return ShapeObject(shapes[i % len(shapes)], colors[(i // len(shapes)) % len(colors)], o.size, o.position)


def box_mask(o: ShapeObject, grow: float = 1.4) -> Image.Image:
    cx, cy, s = _nominal_box(o)
    half = s * grow / 2 + 0.06  # the jitter of the placement
    m = np.zeros((RES, RES), np.uint8)
    y0, y1 = int(max(0, cy - half) * RES), int(min(1, cy + half) * RES + 0.999)
    x0, x1 = int(max(0, cx - half) * RES), int(min(1, cx + half) * RES + 0.999)
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m)


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--strengths", default="0.2,0.4,0.6,0.8,1.0")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    family, verifier = load_family(None), ShapesVerifier.load()
    data = scenes(args.n)
    common = dict(steps=args.steps, sampler=args.sampler)
    report: dict = {"model": "emoji-64 (bundled)", "n": args.n, **common, "results": []}

    def emit(row: dict) -> None:
        report["results"].append(row)
        print(json.dumps(row), flush=True)

    # inpainting acceptance vs drawing the same caption from scratch
    targets = [swapped(o, i) for i, (_, o, _) in enumerate(data)]
    prompts = [caption([t], bg) for t, (_, _, bg) in zip(targets, data)]
    inpainted, kept, t_inpaint = [], [], 0.0
    for i, (img, o, _) in enumerate(data):
        mask = box_mask(o)
        t0 = time.perf_counter()
        res = generate(family, GenerationRequest(prompts[i], seed=i, init_image=img, mask=mask, mask_blur=2, **common))
        t_inpaint += time.perf_counter() - t0
        inpainted.append(res.images[0])
        far = np.asarray(mask.filter(ImageFilter.MaxFilter(13))) == 0  # outside the mask and its blur
        kept.append(float((res.images[0][far] == np.asarray(img)[far]).all()))
    t0 = time.perf_counter()
    fresh = generate(family, GenerationRequest(prompts, seed=0, **common)).images
    t_fresh = time.perf_counter() - t0
    ok_inpaint = verifier.accepts(as_tensor(np.stack(inpainted)), [[t] for t in targets]).float().mean().item()
    ok_fresh = verifier.accepts(as_tensor(fresh), [[t] for t in targets]).float().mean().item()
    emit({"what": "inpaint: new object in the masked box", "accepted": ok_inpaint,
          "txt2img_same_captions_accepted": ok_fresh, "unmasked_pixels_unchanged": float(np.mean(kept)),
          "seconds_per_image": t_inpaint / args.n})

    # strength sweep and time of img2img against txt2img
    originals = np.stack([np.asarray(img) for img, _, _ in data])
    own = [caption([o], bg) for _, o, bg in data]
    with family.space() as space:  # the floor: what the autoencoder alone changes
        roundtrip = to_uint8(space.decode(space.encode(as_tensor(originals), None)))
    emit({"what": "autoencoder round trip (strength -> 0 floor)",
          "mean_abs_change": float(np.abs(roundtrip.astype(int) - originals.astype(int)).mean()),
          "object_kept_accepted": verifier.accepts(as_tensor(roundtrip),
                                                   [[o] for _, o, _ in data]).float().mean().item()})
    sweep = []
    for s in (float(v) for v in args.strengths.split(",")):
        out, t_img, t_txt = [], 0.0, 0.0
        for i, (img, _, _) in enumerate(data):  # interleaved, so both see the same machine load
            t0 = time.perf_counter()
            generate(family, GenerationRequest(own[i], seed=i, **common))
            t1 = time.perf_counter()
            out.append(generate(family, GenerationRequest(own[i], seed=i, init_image=img, strength=s, **common))
                       .images[0])
            t_img, t_txt = t_img + time.perf_counter() - t1, t_txt + t1 - t0
        out = np.stack(out)
        change = float(np.abs(out.astype(int) - originals.astype(int)).mean())
        ok = verifier.accepts(as_tensor(out), [[o] for _, o, _ in data]).float().mean().item()
        row = {"what": "img2img strength", "strength": s, "steps_run": int(args.steps * s),
               "mean_abs_change": change, "object_kept_accepted": ok, "seconds_vs_txt2img": t_img / t_txt}
        sweep.append(row)
        emit(row)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "editing.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    xs = [r["strength"] for r in sweep]
    ax[0].plot(xs, [r["mean_abs_change"] for r in sweep], "o-")
    ax[0].set(xlabel="strength", ylabel="mean |change| (0-255)", title="how far img2img moves")
    ax[1].plot(xs, [r["seconds_vs_txt2img"] for r in sweep], "o-", label="measured")
    ax[1].plot(xs, xs, "--", label="= strength")
    ax[1].set(xlabel="strength", ylabel="time / txt2img time", title="cost")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "editing_strength.png", dpi=100)
    print(f"wrote {out_dir / 'editing.json'}, {out_dir / 'editing_strength.png'}; txt2img {t_fresh:.1f} s for "
          f"{args.n} images")


if __name__ == "__main__":
    main()
