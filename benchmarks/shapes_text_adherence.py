"""Prompt adherence of a caption-conditioned `shapes` model, judged by the shapes verifier.

Prompts are captions of procedural scenes drawn with a seed the model never trained on
(single-object and two-object sets). The verifier accepts a sample when every requested
object is detected with its shape, colour and position (size is not checked). Prints the
acceptance per guidance scale and writes a JSON report and a grid per set.

    python benchmarks/shapes_text_adherence.py RUN_DIR --n 128 --guidance 1,3,5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sumie.data.shapes import ShapesDataset
from sumie.image import make_grid, save_png, to_uint8, upscale
from sumie.metrics.verifier import ShapesVerifier
from sumie.models import load_model, load_text_encoder
from sumie.pipeline import sample
from sumie.text.small import text_cond


def prompts_for(n_objects: int, n: int, seed: int = 987_654) -> tuple[list[str], list]:
    """Captions and object lists of ``n`` held-out scenes with exactly ``n_objects`` objects."""
    ds = ShapesDataset(resolution=32, min_objects=n_objects, max_objects=n_objects, seed=seed)
    scenes = [ds.spec(i) for i in range(n)]
    return [s.caption for s in scenes], [s.objects for s in scenes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=128, help="prompts per set")
    ap.add_argument("--guidance", default="1,3,5")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--out", default=None, help="folder for report.json and grids (default: RUN/adherence)")
    args = ap.parse_args()
    den, cfg = load_model(args.run)
    enc = load_text_encoder(args.run)
    if enc is None:
        raise SystemExit(f"{args.run} is not a caption-conditioned model")
    out = Path(args.out or Path(args.run) / "adherence")
    out.mkdir(parents=True, exist_ok=True)
    verifier = ShapesVerifier.load()
    res = cfg.data.resolution
    sampler, steps = args.sampler or cfg.sample.sampler, args.steps or cfg.sample.steps
    report = {"run": str(args.run), "sampler": sampler, "steps": steps, "n": args.n, "results": []}
    for k in (1, 2):
        prompts, objects = prompts_for(k, args.n)
        for g in (float(v) for v in args.guidance.split(",")):
            t0 = time.perf_counter()
            xs = []
            with torch.no_grad():
                for i in range(0, args.n, 64):
                    p = prompts[i:i + 64]
                    xs.append(sample(den, (3, res, res), len(p), cond=text_cond(enc, p),
                                     uncond=text_cond(enc, [""] * len(p)), guidance_scale=g, sampler=sampler,
                                     steps=steps, seed=i))
            x = torch.cat(xs)
            dt = time.perf_counter() - t0
            ok = verifier.accepts(x, objects, check_position=True)
            ok_any = verifier.accepts(x, objects, check_position=False)
            row = {"objects": k, "guidance": g, "accepted": float(ok.float().mean()),
                   "accepted_any_position": float(ok_any.float().mean()), "images_per_s": args.n / dt}
            report["results"].append(row)
            print(json.dumps(row), flush=True)
            save_png(out / f"objects{k}_g{g:g}.png", upscale(make_grid(to_uint8(x[:48]), ncols=8), 3))
        (out / f"prompts{k}.txt").write_text("\n".join(prompts[:48]) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
