"""The ``sumie`` command: train, sample, explain, demo, convert, data.

Errors a user can fix (bad config keys, missing folders, unreadable checkpoints, unknown
sampler names) are printed as one line ``sumie: error: ...`` with exit status 2, not as
a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="named preset (shapes-32, tiny); default shapes-32")
    p.add_argument("--config", default=None, help="TOML/YAML/JSON file with [model] [diffusion] [data] "
                                                  "[train] [sample] tables, applied over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one value, e.g. --set train.max_steps=500 (repeatable)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--sampler", default=None, help="euler, euler_ancestral, heun, ddim, ddpm")
    p.add_argument("--schedule", default=None, help="karras, exponential, or for discrete models "
                                                    "leading/linspace/trailing")
    p.add_argument("--eta", type=float, default=None, help="noise of ddim/euler_ancestral (0 = deterministic)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sumie", description="Diffusion models from first principles.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a diffusion model")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder (checkpoints, samples, config.json, log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds of training")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("sample", help="sample images from a trained run")
    p.add_argument("run", help="run folder or ckpt-* folder")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--out", default="grid.png", help="PNG grid to write")
    p.add_argument("--singles", default=None, metavar="DIR", help="also write each image as DIR/NNNN.png")
    p.add_argument("--label", type=int, action="append", default=None,
                   help="class label(s) (repeatable; default: cycle through all classes)")
    p.add_argument("--shape", default=None, help="shapes models: the shape to draw (with --color)")
    p.add_argument("--color", default=None, help="shapes models: the colour to draw (with --shape)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of the grid")
    _add_sampling_args(p)

    p = sub.add_parser("explain", help="pictures that show how diffusion works")
    esub = p.add_subparsers(dest="what", required=True)
    e = esub.add_parser("forward", help="the forward (noising) process of an image: strip + GIF")
    e.add_argument("image")
    e.add_argument("--out", default="explain", help="output folder")
    e.add_argument("--size", type=int, default=128)
    e.add_argument("--frames", type=int, default=8)
    e.add_argument("--schedule", default="linear", help="beta schedule: linear, scaled_linear, cosine")
    e.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="train on the built-in shapes data for a few minutes, then sample")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("convert", help="convert Stable Diffusion weights between single-file, diffusers and sumie layouts")
    p.add_argument("src", help="single file (.safetensors; .ckpt with --allow-pickle), diffusers folder or sumie folder")
    p.add_argument("dst", help="file (single-file) or new folder (diffusers, sumie) to write")
    p.add_argument("--to", required=True, choices=["single-file", "diffusers", "sumie"])
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a pickled .ckpt/.bin through the restricted unpickler (tensors and containers only)")
    p.add_argument("--prediction", choices=["eps", "v"], default=None,
                   help="override the detected prediction target (SD 2.x 768 models are v)")
    p.add_argument("--vae", default=None, help="replace the checkpoint's VAE with this file")
    p.add_argument("--half", action="store_true", help="write floating-point tensors as float16")

    p = sub.add_parser("data", help="build a captioned image folder (metadata.jsonl) to train on")
    dsub = p.add_subparsers(dest="what", required=True)
    d = dsub.add_parser("emoji", help="Noto Emoji and Twemoji 64 px artwork (fetched with npm, integrity checked)")
    d.add_argument("out_dir", help="folder to create (written atomically)")
    d.add_argument("--tarball", action="append", default=[], metavar="FILE",
                   help="an emoji-datasource-<vendor> .tgz made by `npm pack` elsewhere (repeatable)")
    d.add_argument("--vendors", default="google,twitter", help="comma-separated: google (Noto), twitter (Twemoji)")
    d.add_argument("--skin-tones", action="store_true", help="also the five skin-tone variants of people emoji")
    d.add_argument("--no-flags", action="store_true", help="leave out the flag emoji (270 of 1906)")
    d.add_argument("--size", type=int, default=64, help="image side in pixels (8-64)")
    d.add_argument("--cache-dir", default=None, help="where fetched tarballs are kept (default ~/.cache/sumie/npm)")
    d.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    d = dsub.add_parser("shapes", help="the procedural shapes data, exported as an image folder")
    d.add_argument("out_dir", help="folder to create")
    d.add_argument("--n", type=int, default=1000, help="number of images")
    d.add_argument("--resolution", type=int, default=32)
    d.add_argument("--background", default="plain", help="plain, textured or mixed")
    d.add_argument("--max-objects", type=int, default=1)
    d.add_argument("--seed", type=int, default=0)
    return ap


def _labels_for(args, config) -> list[int] | None:
    n_classes = config.model.num_classes
    if n_classes is None:
        if args.label or args.shape or args.color:
            raise ValueError("this model is unconditional: it takes no --label/--shape/--color")
        return None
    if args.shape or args.color:
        from .data.shapes import class_label

        if not (args.shape and args.color):
            raise ValueError("give both --shape and --color")
        return [class_label(args.shape, args.color)] * args.n
    if args.label:
        bad = [l for l in args.label if not -1 <= l < n_classes]
        if bad:
            raise ValueError(f"class labels must be in [0, {n_classes}) (or -1 for none), got {bad}")
        return [args.label[i % len(args.label)] for i in range(args.n)]
    return [i % n_classes for i in range(args.n)]


def cmd_train(args) -> int:
    from .config import resolve
    from .train.loop import train

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.time_budget is not None:
        overrides.append(f"train.time_budget_s={args.time_budget}")
    if args.resume and args.preset is None and args.config is None:
        from .config import from_dict, merge, parse_override
        from .io.checkpoint import read_json

        cfg_path = Path(args.out) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"--resume: {cfg_path} not found; is {args.out} a run folder?")
        config = from_dict(read_json(cfg_path))
        for o in overrides:
            config = merge(config, parse_override(o))
    else:
        config = resolve(args.preset or "shapes-32", args.config, overrides)
    result = train(config, args.out, resume=args.resume, progress=not args.no_progress)
    print(f"{result.status} at step {result.step} in {result.elapsed_s:.0f}s of training "
          f"({result.images_per_s:.1f} images/s); checkpoints in {result.run_dir}")
    if result.status == "interrupted":
        print(f"resume with: sumie train --out {result.run_dir} --resume")
    return 0


def cmd_sample(args) -> int:
    import torch

    from .image import make_grid, save_png, to_uint8, upscale
    from .models import load_model
    from .pipeline import class_cond, sample

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    denoiser, config = load_model(args.run, ema=not args.raw)
    s = config.sample
    labels = _labels_for(args, config)
    cond = class_cond(labels) if labels is not None else None
    uncond = class_cond([-1] * args.n) if labels is not None else None
    res = config.data.resolution
    x = sample(denoiser, (config.model.in_channels, res, res), args.n, cond=cond, uncond=uncond,
               sampler=args.sampler or s.sampler, schedule=args.schedule or s.schedule,
               steps=args.steps if args.steps is not None else s.steps, rho=s.rho, eta=args.eta,
               guidance_scale=args.guidance_scale if args.guidance_scale is not None else s.guidance_scale,
               seed=args.seed)
    images = to_uint8(x[:, :3])
    out = save_png(args.out, upscale(make_grid(images), args.scale))
    print(f"wrote {out} ({args.n} images)")
    if args.singles:
        for i, img in enumerate(images):
            save_png(Path(args.singles) / f"{i:04d}.png", img)
        print(f"wrote {args.n} images to {args.singles}/")
    return 0


def cmd_explain(args) -> int:
    from .explain import explain_forward

    paths = explain_forward(args.image, args.out, size=args.size, frames=args.frames,
                            beta_schedule=args.schedule, seed=args.seed)
    for k, v in paths.items():
        print(f"wrote {v}")
    return 0


def cmd_demo(args) -> int:
    from .config import preset
    from .image import make_grid, save_png, to_uint8, upscale
    from .models import load_model
    from .pipeline import class_cond, sample
    from .train.loop import train

    config = preset("shapes-32")
    config.train.time_budget_s = args.minutes * 60
    config.train.max_steps = 10**9
    config.train.sample_every = 0
    out = Path(args.out)
    print(f"training a class-conditional shapes model for {args.minutes:g} minutes into {out} ...")
    result = train(config, out, resume=(out / "config.json").exists() and any(out.glob("ckpt-*")),
                   progress=not args.no_progress)
    denoiser, config = load_model(out)
    n = config.model.num_classes
    x = sample(denoiser, (3, 32, 32), n, cond=class_cond(list(range(n))), sampler=config.sample.sampler,
               schedule=config.sample.schedule, steps=config.sample.steps, seed=0)
    grid = save_png(out / "demo_grid.png", upscale(make_grid(to_uint8(x), ncols=6), 3))
    print(f"trained {result.step} steps; one sample per class (rows: shapes, columns: colours): {grid}")
    return 0


def cmd_convert(args) -> int:
    import torch

    from .io.sd import convert

    sd = convert(args.src, args.dst, args.to, allow_pickle=args.allow_pickle, prediction=args.prediction,
                 vae=args.vae, dtype=torch.float16 if args.half else None)
    print(f"{sd.family.title} ({sd.family.name}, {sd.prediction}-prediction) -> {args.dst} [{args.to}]")
    for note in sd.notes:
        print(f"  {note}")
    return 0


def cmd_data(args) -> int:
    import json

    if args.what == "emoji":
        from .data.emoji import build

        report = build(args.out_dir, vendors=[v.strip() for v in args.vendors.split(",") if v.strip()],
                       tarballs=args.tarball, size=args.size, include_skin_tones=args.skin_tones,
                       include_flags=not args.no_flags, cache_dir=args.cache_dir, overwrite=args.overwrite)
        print(f"wrote {report.summary()}")
        for what, skipped in (("corrupt", report.corrupt), ("missing", report.missing)):
            if skipped:
                print(f"  skipped {len(skipped)} {what} image(s), e.g. {skipped[0]}")
        return 0
    from .data.shapes import ShapesConfig, ShapesDataset
    from .image import save_png, to_uint8

    out = Path(args.out_dir)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new folder")
    ds = ShapesDataset(ShapesConfig(resolution=args.resolution, background=args.background,
                                    max_objects=args.max_objects, seed=args.seed))
    rows = []
    for i in range(args.n):
        item = ds[i]
        name = f"images/{i:06d}.png"
        save_png(out / name, to_uint8(item["x"]))
        rows.append(json.dumps({"file_name": name, "text": item["caption"], "label": int(item["label"])}) + "\n")
    (out / "metadata.jsonl").write_text("".join(rows), encoding="utf-8")
    print(f"wrote {args.n} shapes images and metadata.jsonl to {out}")
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "explain": cmd_explain, "demo": cmd_demo,
            "convert": cmd_convert, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .io.checkpoint import CheckpointError

    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, CheckpointError, TypeError, FloatingPointError) as e:
        print(f"sumie: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sumie: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # TrainingDiverged and other runtime errors with a message for the user
        from .train.loop import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            print(f"sumie: error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
