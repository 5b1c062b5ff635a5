"""Time to evaluate 1,000 generated images against 1,000 reference images on this CPU.

    python benchmarks/eval_speed.py [--n 1000] [--threads 1] [--inception-n 64]

Counts what `sumie eval --generated DIR --reference DIR` does after decoding: feature
extraction of both sets, then FD, KID (100 subsets of 1,000) and precision/recall (k = 3).
With sumie-features (the shipped weights) every image is processed. The FID Inception-v3
(random weights: same architecture and cost as pytorch-fid's file) is timed on
``--inception-n`` images and extrapolated linearly to ``--n``, which the output says.
The images are procedural shapes scenes at 32 px (the cost does not depend on content).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from sumie.data.shapes import ShapesConfig, ShapesDataset
from sumie.metrics.evaluate import distribution_metrics, extract_features
from sumie.metrics.features import SumieFeatureNet
from sumie.nn.inception import FIDInceptionV3


def images(n: int, seed: int) -> torch.Tensor:
    ds = ShapesDataset(ShapesConfig(resolution=32, background="mixed", max_objects=2, seed=seed))
    return torch.stack([ds[i]["x"] for i in range(n)])


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="images per set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--inception-n", type=int, default=64, help="images per set timed through Inception")
    ap.add_argument("--batch-size", type=int, default=250)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen, ref = images(args.n, 1), images(args.n, 2)
    result = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
              "threads": args.threads, "n": args.n}

    net = SumieFeatureNet.load()
    extract_features(net, gen[:8])  # warm-up
    gf, t_gen = timed(lambda: extract_features(net, gen, args.batch_size))
    rf, t_ref = timed(lambda: extract_features(net, ref, args.batch_size))
    (metrics, _), t_metrics = timed(lambda: distribution_metrics(net, rf, gf))
    result["sumie-features"] = {"features_s": t_gen + t_ref, "metrics_s": t_metrics,
                                "total_s": t_gen + t_ref + t_metrics, "images_per_s": 2 * args.n / (t_gen + t_ref),
                                "FD_sumie": metrics["FD_sumie"]}

    torch.manual_seed(0)
    inc = FIDInceptionV3().eval()
    m = min(args.inception_n, args.n)
    extract_features(inc, gen[:2])  # warm-up
    _, t_inc = timed(lambda: extract_features(inc, gen[:m], 32))
    per_image = t_inc / m
    g2048 = torch.randn(args.n, 2048, dtype=torch.float64)  # metric cost at 2048-d does not depend on the values
    r2048 = torch.randn(args.n, 2048, dtype=torch.float64) + 0.1
    (_, _), t_metrics_inc = timed(lambda: distribution_metrics(inc, r2048, g2048))
    result["inception-v3-fid (random weights)"] = {
        "measured_images": m, "seconds_per_image": per_image,
        "features_s_extrapolated": 2 * args.n * per_image, "metrics_s": t_metrics_inc,
        "total_s_extrapolated": 2 * args.n * per_image + t_metrics_inc}
    print(json.dumps(result, indent=2))
    s, i = result["sumie-features"], result["inception-v3-fid (random weights)"]
    print(f"\n{args.n} generated + {args.n} reference images, {args.threads} thread(s):")
    print(f"  sumie-features: {s['total_s']:.1f} s ({s['features_s']:.1f} s features at {s['images_per_s']:.0f} img/s, "
          f"{s['metrics_s']:.1f} s FD+KID+PR)")
    print(f"  Inception-v3:   {i['total_s_extrapolated']:.0f} s (features extrapolated from {m} images at "
          f"{i['seconds_per_image']:.3f} s/img, {i['metrics_s']:.1f} s FD+KID+PR at 2048-d)")


if __name__ == "__main__":
    main()
