"""Does a text-to-image model draw what its captions say? Retrieval by sumie's feature network.

For captions of the emoji training set (stratified over both styles and every category,
seeded), generate one image each at the model's default settings (or those given) and find
its nearest training images by sumie's feature network (L2 between ``SumieFeatureNet``
features, :mod:`sumie.metrics.features`). A caption counts as drawn when the nearest image
shows the caption's emoji name, in either style (top-1), or when that name is among the
names of the 5 nearest images (top-5). Chance is about 2 in 3,644 (top-1).

The same is measured for every held-out caption (names never trained on, in either style),
retrieved among the held-out images only; no target there, generalisation is its point.

Writes ``fidelity.json`` and two grids to look at: ``fidelity_train.png`` (the first 32
generated images, each above the training image of its caption in the same style) and
``fidelity_heldout.png`` likewise, with the captions and verdicts in ``fidelity_*.txt``.

    python benchmarks/caption_fidelity.py [MODEL] --data data/emoji --out DIR [--n 256]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sumie.generate import TextToImage
from sumie.image import make_grid, save_png, upscale
from sumie.metrics.features import SumieFeatureNet


def read_rows(data: Path) -> list[dict]:
    return [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]


def stratified(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` rows drawn round-robin over (vendor, category) groups, each group shuffled with ``seed``."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["vendor"], r["category"])].append(r)
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(len(g))) for g in groups.values()]
    keys = list(groups)
    out: list[dict] = []
    while len(out) < min(n, len(rows)):
        for key, q in zip(keys, queues):
            if q and len(out) < n:
                out.append(groups[key][q.pop()])
    return out


def load_images(data: Path, rows: list[dict], size: int) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1], composited on white as training saw them."""
    out = []
    for r in rows:
        im = Image.open(data / r["file_name"]).convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im).convert("RGB").resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1


def draw(model: TextToImage, prompts: list[str], batch: int, **kw) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        out.append(torch.from_numpy(model(prompts[i:i + batch], seed=i, **kw).images))
    return torch.cat(out).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, H, W) in [-1, 1]


def retrieval(feats: torch.Tensor, ref_feats: torch.Tensor, names: list[str], ref_names: list[str],
              k: int = 5) -> tuple[list[bool], list[bool], list[int]]:
    """Per query: nearest reference has the query's name; the name is among the k nearest; nearest index."""
    d = torch.cdist(feats, ref_feats)
    idx = d.topk(k, largest=False).indices
    top1 = [ref_names[int(row[0])] == n for row, n in zip(idx, names)]
    topk = [n in {ref_names[int(j)] for j in row} for row, n in zip(idx, names)]
    return top1, topk, [int(row[0]) for row in idx]


def pair_grid(generated: torch.Tensor, reference: torch.Tensor, path: Path, ncols: int = 8) -> None:
    """Rows of ``ncols`` generated images, each row followed by the matching reference images."""
    def u8(x):
        return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    tiles = []
    for i in range(0, len(generated), ncols):
        tiles += list(u8(generated[i:i + ncols])) + list(u8(reference[i:i + ncols]))
    save_png(path, upscale(make_grid(np.stack(tiles), ncols=ncols), 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--data", type=Path, default=Path("data/emoji"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bundled/fidelity"))
    ap.add_argument("--n", type=int, default=256, help="training captions")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.data / "metadata.jsonl").is_file():
        raise SystemExit(f"no emoji data in {args.data}: run `sumie data emoji {args.data}`")
    args.out.mkdir(parents=True, exist_ok=True)
    model = TextToImage.load(args.model)
    res = model.resolution
    kw = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps), ("guidance_scale", args.guidance))
          if v is not None}
    features = SumieFeatureNet.load()
    rows = read_rows(args.data)
    report: dict = {"model": str(args.model or "bundled"), "n_train_captions": args.n,
                    "settings": {"sampler": kw.get("sampler", model.config.sample.sampler),
                                 "steps": kw.get("steps", model.config.sample.steps),
                                 "guidance_scale": kw.get("guidance_scale", model.config.sample.guidance_scale)},
                    "features": "SumieFeatureNet (sumie/assets/sumie_features.safetensors), L2"}
    for split, queries in (("train", stratified([r for r in rows if r["split"] == "train"], args.n)),
                           ("heldout", [r for r in rows if r["split"] == "heldout"])):
        refs = [r for r in rows if r["split"] == split]
        ref_feats = features.features(load_images(args.data, refs, res))
        t0 = time.perf_counter()
        x = draw(model, [q["text"] for q in queries], args.batch, **kw)
        seconds = time.perf_counter() - t0
        top1, top5, nearest = retrieval(features.features(x), ref_feats, [q["name"] for q in queries],
                                        [r["name"] for r in refs])
        report[split] = {"n": len(queries), "top1": float(np.mean(top1)), "top5": float(np.mean(top5)),
                         "references": len(refs), "chance_top1": 2 / len(refs), "seconds_generating": seconds}
        print(json.dumps({split: report[split]}), flush=True)
        k = min(32, len(queries))
        own = {(r["name"], r["vendor"]): i for i, r in enumerate(refs)}
        ref_imgs = load_images(args.data, [refs[own[(q["name"], q["vendor"])]] for q in queries[:k]], res)
        pair_grid(x[:k], ref_imgs, args.out / f"fidelity_{split}.png")
        lines = [f"{i:2d} {'top1' if a else 'top5' if b else 'miss'}  {q['text']}  (nearest: {refs[j]['name']})"
                 for i, (q, a, b, j) in enumerate(zip(queries[:k], top1, top5, nearest))]
        (args.out / f"fidelity_{split}.txt").write_text("\n".join(lines) + "\n")
    (args.out / "fidelity.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'fidelity.json'}")


if __name__ == "__main__":
    main()
