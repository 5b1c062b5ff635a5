"""Measure a text-to-image model the way the bundled model's card reports it.

1. Time to one 64x64 image at the default settings (model loaded; median of 5 after a warm-up),
   and the load time, with the thread count given.
2. Shapes prompt adherence (the shapes verifier: every requested shape, colour and position
   found) on captions of held-out scenes, one and two objects, at the default guidance scale,
   and a guidance sweep 1..12 of adherence and diversity (mean pairwise distance of
   sumie-features between images of the same prompt), plotted.
3. Grids: held-out emoji captions (names never trained on), training captions, compositional
   shapes prompts, and a few free-form prompts.

    python benchmarks/bundled_model_report.py RUN_OR_MODEL --data data/emoji --out benchmarks/results/bundled
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sumie.data.shapes import ShapesConfig, ShapesDataset
from sumie.generate import TextToImage
from sumie.image import make_grid, save_png, upscale
from sumie.metrics.features import SumieFeatureNet
from sumie.metrics.verifier import ShapesVerifier

FREE_PROMPTS = ["a red apple", "red apple, food and drink, twemoji style", "a cat face", "a yellow star",
                "a blue heart", "a green tree", "a car", "a smiling face"]


def shapes_prompts(n_objects: int, n: int, seed: int = 987_654) -> tuple[list[str], list]:
    ds = ShapesDataset(ShapesConfig(resolution=32, min_objects=n_objects, max_objects=n_objects, seed=seed))
    scenes = [ds.spec(i) for i in range(n)]
    return [s.caption for s in scenes], [s.objects for s in scenes]


def emoji_captions(data: Path, split: str, n: int) -> list[str]:
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]
    caps = sorted({r["text"] for r in rows if r.get("split") == split})
    g = torch.Generator().manual_seed(0)
    return [caps[i] for i in torch.randperm(len(caps), generator=g)[:n].tolist()]


def draw(model: TextToImage, prompts: list[str], batch: int = 64, **kw) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        out.append(torch.from_numpy(model(prompts[i:i + batch], seed=i, **kw).images))
    return torch.cat(out)  # (n, H, W, 3) uint8


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def timing(model: TextToImage, threads: int) -> dict:
    torch.set_num_threads(threads)
    model("a red apple")  # warm-up
    times = []
    for seed in range(5):
        t0 = time.perf_counter()
        model("a red apple", seed=seed)
        times.append(time.perf_counter() - t0)
    s = model.config.sample
    return {"threads": threads, "seconds_per_image_median": statistics.median(times), "seconds_all": times,
            "sampler": s.sampler, "steps": s.steps, "guidance_scale": s.guidance_scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="run folder, ckpt-* folder or exported model folder")
    ap.add_argument("--data", default="data/emoji", help="the emoji folder (for held-out captions)")
    ap.add_argument("--out", default="benchmarks/results/bundled")
    ap.add_argument("--n", type=int, default=128, help="shapes prompts per object count")
    ap.add_argument("--sweep", default="1,2,3,4,6,8,12")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: timing,adherence,sweep,grids")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = TextToImage.load(args.model)
    report = {"model": str(args.model), "load_seconds": time.perf_counter() - t0,
              "defaults": {"sampler": model.config.sample.sampler, "steps": model.config.sample.steps,
                           "guidance_scale": model.config.sample.guidance_scale}}
    if "timing" not in skip:
        report["timing"] = timing(model, args.threads)
        print(json.dumps(report["timing"]), flush=True)
    verifier = ShapesVerifier.load()
    if "adherence" not in skip:
        report["adherence"] = {}
        for k in (1, 2):
            prompts, objects = shapes_prompts(k, args.n)
            x = as_float(draw(model, prompts))
            ok = verifier.accepts(x, objects, check_position=True).float().mean().item()
            ok_any = verifier.accepts(x, objects, check_position=False).float().mean().item()
            report["adherence"][f"{k}_object"] = {"accepted": ok, "accepted_any_position": ok_any, "n": args.n}
            print(json.dumps({"objects": k, "accepted": ok, "any_position": ok_any}), flush=True)
    if "sweep" not in skip:
        features = SumieFeatureNet.load()
        rows = []
        p1, o1 = shapes_prompts(1, 48, seed=55_555)
        p2, o2 = shapes_prompts(2, 48, seed=66_666)
        div_prompts = p1[:4] + p2[:4]
        for g in (float(v) for v in args.sweep.split(",")):
            acc = []
            for prompts, objects in ((p1, o1), (p2, o2)):
                x = as_float(draw(model, prompts, guidance_scale=g))
                acc.append(verifier.accepts(x, objects, check_position=True).float().mean().item())
            per_prompt = []
            for p in div_prompts:
                f = features.features(as_float(torch.from_numpy(model(p, n=8, seed=1000, guidance_scale=g).images)))
                d = torch.cdist(f, f)
                per_prompt.append((d.sum() / (d.numel() - len(d))).item())
            row = {"guidance": g, "accepted_1_object": acc[0], "accepted_2_objects": acc[1],
                   "diversity": statistics.mean(per_prompt)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        report["sweep"] = {"n_per_set": 48, "diversity": "mean pairwise L2 of sumie-features, 8 seeds x 8 prompts",
                           "rows": rows}
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        gs = [r["guidance"] for r in rows]
        ax.plot(gs, [r["accepted_1_object"] for r in rows], "o-", label="adherence, 1 object")
        ax.plot(gs, [r["accepted_2_objects"] for r in rows], "s-", label="adherence, 2 objects")
        ax.set_xlabel("guidance scale")
        ax.set_ylabel("verifier acceptance")
        ax.set_ylim(0, 1)
        ax2 = ax.twinx()
        ax2.plot(gs, [r["diversity"] for r in rows], "k--", label="diversity")
        ax2.set_ylabel("diversity (feature distance)")
        fig.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "guidance_sweep.png", dpi=120)
    if "grids" not in skip:
        data = Path(args.data)
        held = emoji_captions(data, "heldout", 24) if (data / "metadata.jsonl").is_file() else []
        train = emoji_captions(data, "train", 24) if (data / "metadata.jsonl").is_file() else []
        comp = shapes_prompts(2, 12, seed=77_777)[0] + shapes_prompts(1, 12, seed=88_888)[0]
        for name, prompts in (("heldout", held), ("train", train), ("shapes", comp), ("free", FREE_PROMPTS)):
            if not prompts:
                continue
            imgs = draw(model, prompts).numpy()
            save_png(out / f"grid_{name}.png", upscale(make_grid(imgs, ncols=8), 2))
            (out / f"grid_{name}.txt").write_text("\n".join(prompts) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'report.json'}")


if __name__ == "__main__":
    main()
