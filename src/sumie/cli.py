"""The ``sumie`` command: generate, train, sample, export, explain, eval, demo, convert, data, bench.

Errors a user can fix (bad config keys, missing folders, unreadable checkpoints, unknown
sampler names) are printed as one line ``sumie: error: ...`` with exit status 2, not as
a traceback.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    from .config import PRESETS

    p.add_argument("--preset", default=None, help=f"named preset ({', '.join(PRESETS)}); default shapes-32")
    p.add_argument("--config", default=None, help="TOML/YAML/JSON file with [model] [diffusion] [data] "
                                                  "[train] [sample] tables, applied over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one value, e.g. --set train.max_steps=500 (repeatable)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's sample.steps)")
    from .diffusion.schedules import SAMPLING_SCHEDULES
    from .samplers.registry import sampler_help
    p.add_argument("--sampler", default=None, help=sampler_help())
    discrete = ("leading", "linspace", "trailing")
    p.add_argument("--schedule", default=None,
                   help=f"{', '.join(n for n in SAMPLING_SCHEDULES if n not in discrete)}, or for discrete models "
                        f"{'/'.join(n for n in SAMPLING_SCHEDULES if n in discrete)}")
    p.add_argument("--eta", type=float, default=None, help="noise of the samplers that take it (ddim, the "
                                                           "ancestral and SDE samplers; 0 = deterministic)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")

EDIT_COMMANDS = {
    "generate": ("text to image with the bundled model (or --model RUN_DIR / an SD checkpoint)",
                 'sumie generate "a red apple" writes sumie.png with the bundled model'),
    "img2img": ("image to image: re-draw --image at --strength (variations: new seeds)",
                'sumie img2img "a red apple" --image in.png --strength 0.6 (runs about 0.6 x --steps steps)'),
    "inpaint": ("repaint the white part of --mask in --image",
                'sumie inpaint "a red apple" --image in.png --mask mask.png (white = repaint)'),
    "outpaint": ("extend --image by --left/--top/--right/--bottom pixels and paint the new margins",
                 'sumie outpaint "a red apple" --image in.png --right 32 --bottom 32'),
}


def _add_generation_parsers(sub) -> None:
    """generate, img2img, inpaint and outpaint: one set of arguments, one request type, one pipeline."""
    for name, (help_, desc) in EDIT_COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=desc)
        p.add_argument("prompt", help="what to draw (an empty string draws unconditionally)")
        p.add_argument("--negative-prompt", default="", help="what to steer away from")
        p.add_argument("--model", default=None, help="run folder, ckpt-* folder, exported model folder, bundled (the "
                                                     "default: the bundled emoji-64 model), or a Stable Diffusion "
                                                     "file / diffusers folder")
        p.add_argument("--out", default="sumie.png", help="PNG to write (with --n > 1: a grid; see --each)")
        p.add_argument("--n", type=int, default=1, help="number of images (image i uses seed + i)")
        p.add_argument("--each", action="store_true", help="with --n > 1, also write OUT-0000.png, ... one per image")
        p.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscaling of the written image")
        p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                       help="Stable Diffusion models: a kohya or diffusers/PEFT LoRA file (repeatable)")
        p.add_argument("--vae", default=None, help="Stable Diffusion models: a separate VAE file")
        p.add_argument("--text-encoder", action="append", default=[], metavar="[SLOT=]FILE",
                       help="Stable Diffusion models: replace a text encoder (slot text_encoder by default; SDXL's "
                            "OpenCLIP-bigG is text_encoder_2=FILE); repeatable")
        p.add_argument("--tokenizer", default=None, help="Stable Diffusion single files: a CLIP tokenizer/ folder")
        p.add_argument("--prediction", choices=["eps", "v"], default=None,
                       help="Stable Diffusion models: the prediction target, if the file does not say (SD 2.x 768 "
                            "are v)")
        p.add_argument("--order", type=int, default=None,
                       help="solver order of lms, deis, uni_pc, uni_pc_bh2 (diffusers' UniPC/DEIS default: 2)")
        p.add_argument("--width", type=int, default=None, help="image width (default: the init image's, else the "
                                                              "model's resolution)")
        p.add_argument("--height", type=int, default=None, help="image height")
        p.add_argument("--allow-pickle", action="store_true", help="admit .ckpt files (restricted unpickler)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is "
                                                                  "not a terminal)")
        _add_sampling_args(p)
        if name == "generate":
            continue
        p.add_argument("--image", required=True, help="the init image (any PIL mode; EXIF orientation applied)")
        p.add_argument("--strength", type=float, default=None,
                       help="in [0, 1]: how much to change; int(steps x strength) steps run (default 0.75 for "
                            "img2img, 1 for inpaint/outpaint)")
        p.add_argument("--resize-mode", default="resize", choices=("resize", "crop", "fill"),
                       help="fitting the image to --width/--height: just resize, crop and resize, resize and fill")
        if name == "img2img":
            continue
        p.add_argument("--mask-blur", type=float, default=4.0, help="Gaussian blur of the mask in pixels (the final "
                                                                     "overlay's soft edge)")
        p.add_argument("--fill", default="original", choices=("original", "fill", "latent_noise", "latent_nothing"),
                       help="what the masked area starts from")
        p.add_argument("--no-overlay", action="store_true", help="keep the decoded pixels outside the mask instead "
                                                                 "of the original ones")
        p.add_argument("--resample", type=int, default=1, help="RePaint resampling per step (models without "
                                                               "inpainting channels)")
        if name == "inpaint":
            p.add_argument("--mask", required=True, help="mask image: white = repaint, black = keep")
            p.add_argument("--invert-mask", action="store_true", help="repaint the black part instead")
            p.add_argument("--only-masked", action="store_true", help="work on the region around the mask at full "
                                                                      "size, then paste it back")
            p.add_argument("--padding", type=int, default=32, help="--only-masked: pixels around the mask")
        else:
            for side in ("left", "top", "right", "bottom"):
                p.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")
            p.add_argument("--overlap", type=int, default=8, help="pixels of the original repainted along each new "
                                                                  "edge, so no seam shows")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sumie", description="Diffusion models from first principles.")
    sub = ap.add_subparsers(dest="command", required=True)

    _add_generation_parsers(sub)

    p = sub.add_parser("export", help="write a run's inference-only model folder (EMA weights in fp16)")
    p.add_argument("run", help="run folder, ckpt-* folder, exported model folder, or bundled (the bundled model)")
    p.add_argument("out", help="model folder to write (replaced atomically)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    p.add_argument("--card", default=None, metavar="FILE", help="a model card (Markdown) to put beside the weights")

    p = sub.add_parser("train", help="train a diffusion model")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder (checkpoints, samples, config.json, log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out: deletes the run's "
                                                            "checkpoints, log and samples first")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds of training")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("sample", help="sample images from a trained run")
    p.add_argument("run", help="run folder, ckpt-* folder, exported model folder, or bundled (the bundled model)")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--out", default="grid.png", help="PNG grid to write")
    p.add_argument("--singles", default=None, metavar="DIR", help="also write each image as DIR/NNNN.png")
    p.add_argument("--label", type=int, action="append", default=None,
                   help="class label(s) (repeatable; default: cycle through all classes)")
    p.add_argument("--shape", default=None, help="shapes models: the shape to draw (with --color)")
    p.add_argument("--color", default=None, help="shapes models: the colour to draw (with --shape)")
    p.add_argument("--prompt", default=None, help="text-conditioned models: what to draw (empty: unconditional)")
    p.add_argument("--negative-prompt", default="", help="text-conditioned models: what to steer away from")
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
    _add_explain_parsers(esub)
    _add_eval_parser(sub)

    _add_bench_parser(sub)
    _add_train_vae_parser(sub)

    p = sub.add_parser("demo", help="train on the built-in shapes data (2,500 steps: 5-10 minutes on 2 cores), then sample")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=DEMO_STEPS,
                   help=f"training steps (default {DEMO_STEPS}); the result depends on these, not on the machine's "
                        "speed; a second run continues the same folder")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop earlier after this many minutes of training (a warning then says how far it got)")
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
    p.add_argument("--text-encoder", action="append", default=[], metavar="[SLOT=]FILE",
                   help="replace a text encoder (slot text_encoder by default, or text_encoder_2=FILE); repeatable")
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


def check_writable(path: str | Path, *, folder: bool = False) -> Path:
    """Before any work: ``path`` (a file to write, or a folder with ``folder``) can be written, tried
    with a throw-away file in the nearest existing folder on its way (nothing is left behind)."""
    import os
    import tempfile

    path = Path(path)
    if not folder and path.is_dir():
        raise ValueError(f"--out {path} is a folder; give a file name to write")
    where = path if folder else path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise ValueError(f"cannot write {path}: {where} is a file, not a folder; choose another --out")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sumie-write-check-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {where} is not writable ({e.strerror or type(e).__name__}); "
                         "choose another --out") from None
    return path


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


def _training_config(args, from_dict, resolve, default_preset: str, what: str):
    """The config of `sumie train` / `train-vae`: preset + file + --set overrides; on a bare --resume,
    the run's own config.json (+ overrides such as a new --max-steps)."""
    from .config import merge, parse_override
    from .io.checkpoint import read_json

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.time_budget is not None:
        overrides.append(f"train.time_budget_s={args.time_budget}")
    if not (args.resume and args.preset is None and args.config is None):
        return resolve(args.preset or default_preset, args.config, overrides)
    cfg_path = Path(args.out) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--resume: {cfg_path} not found; is {args.out} a {what}?")
    config = from_dict(read_json(cfg_path))
    for o in overrides:
        config = merge(config, parse_override(o))
    return config


def cmd_train(args) -> int:
    from .config import from_dict, resolve
    from .train.loop import train

    check_writable(args.out, folder=True)
    config = _training_config(args, from_dict, resolve, "shapes-32", "run folder")
    result = train(config, args.out, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"{result.status} at step {result.step} in {result.elapsed_s:.0f}s of training "
          f"({result.images_per_s:.1f} images/s); checkpoints in {result.run_dir}")
    if result.status == "interrupted":
        print(f"resume with: sumie train --out {result.run_dir} --resume")
    return 0


def cmd_sample(args) -> int:
    from .generation import GenerationRequest, SumieFamily, generate
    from .image import make_grid, save_png, upscale

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    check_writable(args.out)
    if args.singles:
        check_writable(args.singles, folder=True)
    family = SumieFamily.load(args.run, ema=not args.raw)
    req = GenerationRequest(n=args.n, seed=args.seed, steps=args.steps, sampler=args.sampler, schedule=args.schedule,
                            guidance_scale=args.guidance_scale, eta=args.eta)
    if family.conditioning == "caption":
        if args.label or args.shape or args.color:
            raise ValueError("this model is text-conditioned: describe the image with --prompt instead of "
                             "--label/--shape/--color")
        req.prompt, req.negative_prompt = args.prompt or "", args.negative_prompt
        if not req.prompt.strip():
            print("empty prompt: generating unconditionally", file=sys.stderr)
        _warn_ignored_words(family.encoder, req.prompt, req.negative_prompt)
    else:
        if args.prompt:
            raise ValueError("this model has no text encoder; use --label or --shape/--color instead of --prompt")
        req.class_labels = _labels_for(args, family.config)
    images = generate(family, req).images
    out = save_png(args.out, upscale(make_grid(images), args.scale))
    print(f"wrote {out} ({args.n} images)")
    if args.singles:
        for i, img in enumerate(images):
            save_png(Path(args.singles) / f"{i:04d}.png", img)
        print(f"wrote {args.n} images to {args.singles}/")
    return 0


def _add_explain_parsers(esub) -> None:
    e = esub.add_parser("reverse", help="the reverse (denoising) process of one sample: x_sigma and the x0 "
                                        "estimate per step, strip + GIF")
    e.add_argument("run", help="run folder, ckpt-* folder, exported model folder, or bundled (the bundled model)")
    e.add_argument("--out", default="explain", help="output folder")
    e.add_argument("--label", type=int, default=None, help="class-conditional models: the class to draw")
    e.add_argument("--shape", default=None, help="shapes models: the shape to draw (with --color)")
    e.add_argument("--color", default=None, help="shapes models: the colour to draw (with --shape)")
    e.add_argument("--prompt", default=None, help="text-conditioned models: what to draw")
    e.add_argument("--columns", type=int, default=8, help="steps shown in the strip")
    e.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling")
    _add_sampling_args(e)
    e = esub.add_parser("curves", help="training curves (loss, learning rate, ...) of a run as PNG plots")
    e.add_argument("run", help="run folder (reads log.jsonl)")
    e.add_argument("--out", default=None, help="output folder (default RUN/curves)")
    e = esub.add_parser("attention", help="text-conditioned models: per-token cross-attention heatmaps for a prompt")
    e.add_argument("run", help="run folder, ckpt-* folder, exported model folder, or bundled (the bundled model)")
    e.add_argument("--prompt", required=True)
    e.add_argument("--out", default="explain", help="output folder")
    e.add_argument("--scale", type=int, default=4)
    _add_sampling_args(e)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="FD/KID/precision/recall and prompt adherence: image folders, a run, or a sweep",
                       description="sumie eval --generated DIR --reference DIR | sumie eval RUN | "
                                   "sumie eval sweep RUN --steps 10,20 --sampler euler,heun --guidance 1,3")
    p.add_argument("target", nargs="*", metavar="RUN", help="a run or model folder to sample from (`bundled`: the "
                                                            "bundled model), or `sweep RUN` for a grid of settings; "
                                                            "none with --generated/--reference")
    p.add_argument("--generated", default=None, help="folder of generated images")
    p.add_argument("--reference", default=None, help="folder of reference images")
    p.add_argument("--features", default="sumie", choices=["sumie", "inception"],
                   help="feature network: sumie (shipped, reported as FD_sumie) or inception (FID; needs "
                        "--inception-weights)")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or a .safetensors of it)")
    p.add_argument("--feature-weights", default=None, metavar="FILE", help="another sumie-features file")
    p.add_argument("--out", default=None, help="JSON report to write; for a sweep, a folder (default: sweep)")
    p.add_argument("--n", type=int, default=256, help="runs: images per setting (and reference images)")
    p.add_argument("--steps", default=None, help="sampling steps (a sweep takes a list, e.g. 10,20,30)")
    p.add_argument("--sampler", default=None, help="sampler (a sweep takes a list, e.g. euler,heun)")
    p.add_argument("--guidance", "--guidance-scale", dest="guidance", default=None,
                   help="classifier-free guidance scale (a sweep takes a list, e.g. 1,3,5)")
    p.add_argument("--schedule", default=None, help="karras, exponential, ... (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="generated image i uses seed + i")
    p.add_argument("--k", type=int, default=3, help="nearest neighbours for precision/recall")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=None, help="folders: resize both sets to this size")
    p.add_argument("--adherence", action="store_true",
                   help="folders: check the generated images against their shapes captions with the verifier")
    p.add_argument("--save-images", default=None, metavar="DIR", help="runs: also write the generated images")
    p.add_argument("--data", default=None, metavar="DIR", help="runs trained on an image folder: where it is now")
    p.add_argument("--split", default=None, help="runs on a folder: the reference split (default: the run's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--no-progress", action="store_true")


def cmd_explain(args) -> int:
    from . import explain
    from .deps import require

    if args.what in ("curves", "attention"):
        require(f"sumie explain {args.what}", "matplotlib")
    if args.out is not None:
        check_writable(args.out, folder=True)
    if args.what == "forward":
        paths = explain.explain_forward(args.image, args.out, size=args.size, frames=args.frames,
                                        beta_schedule=args.schedule, seed=args.seed)
    elif args.what == "reverse":
        label = args.label
        if args.shape or args.color:
            from .data.shapes import class_label

            if not (args.shape and args.color):
                raise ValueError("give both --shape and --color")
            label = class_label(args.shape, args.color)
        if args.eta is not None:
            raise ValueError("explain reverse takes no --eta")
        paths = explain.explain_reverse(args.run, args.out, label=label, prompt=args.prompt, sampler=args.sampler,
                                        schedule=args.schedule, steps=args.steps, guidance_scale=args.guidance_scale,
                                        seed=args.seed, columns=args.columns, scale=args.scale)
    elif args.what == "curves":
        paths = explain.explain_curves(args.run, args.out)
    else:
        paths = explain.explain_attention(args.run, args.prompt, args.out, sampler=args.sampler, steps=args.steps,
                                          guidance_scale=args.guidance_scale, seed=args.seed, scale=args.scale)
    for v in paths.values():
        print(f"wrote {v}")
    return 0


def cmd_eval(args) -> int:
    import json

    from .metrics import evaluate as ev
    from .metrics.sweep import grid, markdown_table, parse_list, write_sweep

    weights = args.inception_weights if args.features == "inception" else args.feature_weights
    progress = not args.no_progress
    if args.target and args.target[0] == "sweep":
        from .deps import require

        require("sumie eval sweep", "matplotlib")
        check_writable(args.out or "sweep", folder=True)
    elif args.out:
        check_writable(args.out)
    common = dict(features=args.features, weights=weights, k=args.k, kid_subsets=args.kid_subsets,
                  kid_subset_size=args.kid_subset_size, seed=args.seed, progress=progress)
    if not args.target:
        if not (args.generated and args.reference):
            raise ValueError("give a run folder (sumie eval RUN), `sumie eval sweep RUN`, or both --generated DIR "
                             "and --reference DIR")
        report = ev.evaluate_folders(args.generated, args.reference, resolution=args.resolution,
                                     adherence_captions=args.adherence, **common)
        for note in report["notes"]:
            print(f"note: {note}", file=sys.stderr)
        print(json.dumps(report["metrics"], indent=1))
        if report.get("adherence"):
            print(json.dumps({"adherence": report["adherence"]}, indent=1))
        if args.out:
            print(f"wrote {ev.write_report(report, args.out)}")
        return 0
    if args.generated or args.reference:
        raise ValueError("--generated/--reference compare two folders; they do not combine with a run folder")
    sweep = args.target[0] == "sweep"
    rest = args.target[1:] if sweep else args.target
    if len(rest) != 1:
        raise ValueError("expected one run folder: sumie eval RUN or sumie eval sweep RUN")
    from .config import from_dict
    from .io.checkpoint import read_json, resolve_checkpoint

    s = from_dict(read_json(resolve_checkpoint(rest[0]) / "config.json")).sample
    samplers = parse_list(args.sampler, str, "sampler") or [s.sampler]
    steps = parse_list(args.steps, int, "steps") or [s.steps]
    guidance = parse_list(args.guidance, float, "guidance") or [s.guidance_scale]
    if not sweep and len(samplers) * len(steps) * len(guidance) > 1:
        raise ValueError("lists of settings are for sweeps: sumie eval sweep RUN ...")
    report = ev.evaluate_run(rest[0], grid(samplers, steps, guidance, args.schedule), n=args.n,
                             batch_size=args.batch_size, raw=args.raw, images_out=args.save_images, data=args.data,
                             split=args.split, **common)
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(markdown_table(report), end="")
    if sweep:
        for v in write_sweep(report, args.out or "sweep").values():
            print(f"wrote {v}")
    elif args.out:
        print(f"wrote {ev.write_report(report, args.out)}")
    return 0


def _parse_lora(spec: str) -> tuple[str, float]:
    path, _, strength = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    try:
        return path, float(strength) if strength else 1.0
    except ValueError:
        raise ValueError(f"--lora {spec!r}: expected FILE or FILE:STRENGTH (e.g. style.safetensors:0.8)") from None


def _parse_text_encoders(specs: list[str]) -> dict[str, str]:
    """--text-encoder [SLOT=]FILE values -> {slot: file}; a plain FILE is the first slot, text_encoder."""
    out: dict[str, str] = {}
    for spec in specs:
        slot, sep, path = spec.partition("=")
        if not sep or not slot.isidentifier() or Path(spec).exists():
            slot, path = "text_encoder", spec
        if slot in out:
            raise ValueError(f"--text-encoder: slot {slot} given twice ({out[slot]}, {path})")
        out[slot] = path
    return out


def request_from_args(args):
    """The GenerationRequest of a generate/img2img/inpaint/outpaint command line."""
    from .generation import GenerationRequest

    req = GenerationRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, n=args.n, seed=args.seed,
                            width=args.width, height=args.height, steps=args.steps, sampler=args.sampler,
                            schedule=args.schedule, guidance_scale=args.guidance_scale, eta=args.eta,
                            order=args.order)
    if args.command == "generate":
        return req
    req.init_image, req.strength, req.resize_mode = args.image, args.strength, args.resize_mode
    if args.command == "img2img":
        return req
    req.mask_blur, req.inpaint_fill, req.overlay, req.resample = args.mask_blur, args.fill, not args.no_overlay, \
        args.resample
    if args.command == "inpaint":
        req.mask, req.invert_mask, req.only_masked, req.only_masked_padding = args.mask, args.invert_mask, \
            args.only_masked, args.padding
    else:
        req.outpaint, req.outpaint_overlap = (args.left, args.top, args.right, args.bottom), args.overlap
    return req


@contextmanager
def _progress(args, steps: int):
    """A sampling-step progress bar on stderr, as in training; none when stderr is not a terminal."""
    if getattr(args, "no_progress", False) or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=steps, desc="sample", unit="step", dynamic_ncols=True, leave=False)

    def callback(info) -> None:
        bar.update(max(0, min(steps, info.i + 1) - bar.n))

    try:
        yield callback
    finally:
        bar.close()


def _warn_ignored_words(encoder, *prompts: str) -> None:
    """One warning line naming the words of the prompts the model's vocabulary lacks (read as unknown)."""
    from .text.small import ignored_words

    words = list(dict.fromkeys(w for p in prompts for w in ignored_words(encoder, p)))
    if words:
        print(f"warning: the model does not know {', '.join(map(repr, words))}; ignored (read as one unknown "
              "word)", file=sys.stderr)


def cmd_generate(args) -> int:
    """generate, img2img, inpaint, outpaint: one request, one pipeline (sumie.generation)."""
    from .generation import generate, load_family
    from .image import make_grid, save_png, upscale

    if args.scale < 1:
        raise ValueError(f"--scale must be >= 1, got {args.scale}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {str(out)!r}")
    check_writable(out)
    if not args.prompt.strip():
        print("empty prompt: generating unconditionally", file=sys.stderr)
    req = request_from_args(args)
    req.check()  # before loading anything
    sd_options = dict(vae=args.vae, tokenizer=args.tokenizer, allow_pickle=args.allow_pickle, prediction=args.prediction,
                      text_encoders=_parse_text_encoders(args.text_encoder), loras=[_parse_lora(s) for s in args.lora])
    family = load_family(args.model, **sd_options)
    steps = req.steps or family.defaults.steps
    if hasattr(family, "pipe"):  # Stable Diffusion: which prediction target, and why; the cost, before the work
        from .cost import check_sd_request

        ck = family.pipe.checkpoint
        print(f"{ck.family.title}: {ck.notes[1]}")
        print(check_sd_request(family.pipe, n=args.n, height=args.height, width=args.width, steps=steps,
                               guidance_scale=family.defaults.guidance_scale if req.guidance_scale is None
                               else req.guidance_scale, sampler=req.sampler or family.defaults.sampler),
              file=sys.stderr)
    else:
        _warn_ignored_words(family.encoder, args.prompt, args.negative_prompt)
    with _progress(args, steps) as callback:
        req.callback = callback
        g = generate(family, req)
    for note in g.notes:
        print(f"note: {note}", file=sys.stderr)
    image = g.images[0] if len(g.images) == 1 else make_grid(g.images)
    save_png(out, upscale(image, args.scale))
    written = [out]
    if args.each and len(g.images) > 1:
        for i, img in enumerate(g.images):
            written.append(save_png(out.with_name(f"{out.stem}-{i:04d}.png"), upscale(img, args.scale)))
    s = g.settings
    size = f"{g.images.shape[2]}x{g.images.shape[1]}"
    what = "" if s["mode"] == "txt2img" else f"{s['mode']} at strength {s['strength']:g}, "
    model_name = args.model or "bundled (emoji-64)"
    print(f"wrote {', '.join(map(str, written))}: {args.prompt!r}"
          f"{f' (negative {args.negative_prompt!r})' if args.negative_prompt else ''} with {model_name}; "
          f"{len(g.images)} image(s) of {size}, {what}{s['sampler']} {s['steps']} steps, "
          f"guidance {s['guidance_scale']:g}, seed {args.seed}, {g.seconds:.2f} s")
    return 0


def cmd_export(args) -> int:
    import torch

    from .models import export_model

    extra = {}
    if args.card:
        extra["MODEL_CARD.md"] = Path(args.card).read_text(encoding="utf-8")
    out = export_model(args.run, args.out, dtype=getattr(torch, args.dtype), extra_files=extra)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    return 0


# shapes-32 draws recognisable shapes from ~2,500 steps (82% verifier acceptance; README, Training vs diffusers)
DEMO_STEPS = 2500


def cmd_demo(args) -> int:
    from .config import preset
    from .image import make_grid, save_png, to_uint8, upscale
    from .models import load_model
    from .pipeline import class_cond, sample
    from .io.checkpoint import latest_checkpoint
    from .train.loop import train

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    config = preset("shapes-32")
    config.train.time_budget_s = args.minutes * 60 if args.minutes is not None else None
    config.train.max_steps = args.steps
    config.train.sample_every = 0
    out = Path(args.out)
    check_writable(out, folder=True)
    resume = latest_checkpoint(out) is not None
    budget = f" (at most {args.minutes:g} minutes)" if args.minutes is not None else ""
    print(f"training a class-conditional shapes model for {args.steps} steps{budget} into {out} ...")
    if resume:
        from .config import from_dict
        from .io.checkpoint import read_json

        config = from_dict(read_json(out / "config.json"))
        config.train.max_steps, config.train.time_budget_s = args.steps, None
        if args.minutes is not None:  # the budget counts this run's minutes on top of the time already trained
            config.train.time_budget_s = read_json(latest_checkpoint(out) / "state.json")["elapsed_s"] + args.minutes * 60
    # the demo's own folder: a run without a checkpoint (killed early) is started over
    result = train(config, out, resume=resume, overwrite=not resume, progress=not args.no_progress)
    if result.step < args.steps:
        print(f"warning: only {result.step} of {args.steps} steps were trained in the time given; the samples "
              f"will be poor. Run `sumie demo --out {out}` again to continue.", file=sys.stderr)
    denoiser, config = load_model(out)
    n = config.model.num_classes
    s = config.sample
    x = sample(denoiser, (3, 32, 32), n, cond=class_cond(list(range(n))), uncond=class_cond([-1] * n),
               sampler=s.sampler, schedule=s.schedule, steps=s.steps, guidance_scale=s.guidance_scale, seed=0)
    grid = save_png(out / "demo_grid.png", upscale(make_grid(to_uint8(x), ncols=6), 3))
    print(f"trained {result.step} steps; one sample per class (rows: shapes, columns: colours): {grid}")
    return 0


def cmd_convert(args) -> int:
    import torch

    from .io.sd import convert

    sd = convert(args.src, args.dst, args.to, allow_pickle=args.allow_pickle, prediction=args.prediction,
                 vae=args.vae, text_encoders=_parse_text_encoders(args.text_encoder),
                 dtype=torch.float16 if args.half else None)
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


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks with a known answer")
    bsub = p.add_subparsers(dest="what", required=True)
    b = bsub.add_parser("samplers", help="every sampler x schedule x NFE on a Gaussian mixture, against the exact "
                                         "PF-ODE solution and diffusers' schedulers: table, JSON, log-log plot")
    b.add_argument("--out", default="benchmarks/results/samplers", help="folder for samplers.json/.md/.png")
    b.add_argument("--nfe", default=None, help="comma-separated NFE budgets (default 5,8,10,15,20,30,50)")
    b.add_argument("--samples", type=int, default=2048, help="starting points for the deterministic samplers")
    b.add_argument("--sde-samples", type=int, default=2048, help="samples for the stochastic samplers")
    b.add_argument("--no-diffusers", action="store_true", help="skip diffusers' schedulers")
    b.add_argument("--quick", action="store_true", help="a few samplers and schedules only (smoke test)")


def cmd_bench(args) -> int:
    from .metrics import sampler_accuracy as sa

    nfes = tuple(int(v) for v in args.nfe.split(",")) if args.nfe else sa.NFES
    if any(n < 1 for n in nfes):
        raise ValueError(f"NFE budgets must be >= 1, got {nfes}")
    if args.samples < 2 or args.sde_samples < 2:
        raise ValueError("--samples and --sde-samples must be >= 2")
    from .deps import require

    if args.no_diffusers:
        require("sumie bench samplers (its plot)", "matplotlib")
    else:
        require("sumie bench samplers (its plot, and diffusers' schedulers unless --no-diffusers)",
                "diffusers", "matplotlib")
    check_writable(args.out, folder=True)
    kw = {}
    if args.quick:
        kw = dict(schedules=("karras", "ays_gmm"), sumie_ode=("euler", "dpmpp_2m", "uni_pc"),
                  sumie_sde=("euler_ancestral",), diffusers_ode=sa.DIFFUSERS_ODE[:1], diffusers_sde=[])
    result = sa.benchmark(nfes, samples=args.samples, sde_samples=args.sde_samples, diffusers=not args.no_diffusers,
                          log=lambda m: print(m, file=sys.stderr), **kw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / "samplers.json").write_text(json.dumps(result, indent=1))
    (out / "samplers.md").write_text(sa.format_tables(result, markdown=True) + "\n")
    sa.write_plot(result, out / "samplers.png")
    print(sa.format_tables(result))
    print(f"\nwrote {out / 'samplers.json'}, {out / 'samplers.md'} and {out / 'samplers.png'}")
    return 0


def _add_train_vae_parser(sub) -> None:
    p = sub.add_parser("train-vae", help="train a KL autoencoder for latent diffusion; writes RUN/vae and "
                                         "RUN/report.json (latent scale, held-out PSNR)")
    from .train.vae import VAE_PRESETS

    p.add_argument("--preset", default=None, help=f"{', '.join(VAE_PRESETS)}; default tiny")
    p.add_argument("--config", default=None, help="TOML/YAML/JSON file with [vae] [data] [loss] [train] tables")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one value, e.g. --set loss.disc_start=2000 (repeatable)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, vae/, report.json, log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out: deletes the run's "
                                                            "checkpoints, log and samples first")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds of training")
    p.add_argument("--no-progress", action="store_true")


def cmd_train_vae(args) -> int:
    from .train.vae import resolve_vae_config, train_vae, vae_config_from_dict

    check_writable(args.out, folder=True)
    config = _training_config(args, vae_config_from_dict, resolve_vae_config, "tiny", "train-vae run folder")
    result = train_vae(config, args.out, resume=args.resume, progress=not args.no_progress,
                       overwrite=args.overwrite)
    r = result.report
    print(f"{result.status} at step {result.step} in {result.elapsed_s:.0f}s of training "
          f"({result.images_per_s:.1f} images/s); held-out PSNR {r['heldout']['psnr_db']:.2f} dB on "
          f"{r['heldout']['images']} images ({r['heldout']['source']}); latent scale "
          f"{r['latent']['scaling_factor']:.4g}, shift {r['latent']['shift_factor']:.4g}")
    print(f"autoencoder for latent diffusion: {result.run_dir / 'vae'} (set latent.vae to it); "
          f"report: {result.run_dir / 'report.json'}")
    if result.status == "interrupted":
        print(f"resume with: sumie train-vae --out {result.run_dir} --resume")
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "explain": cmd_explain, "eval": cmd_eval, "demo": cmd_demo,
            "convert": cmd_convert, "data": cmd_data}

COMMANDS.update(bench=cmd_bench, export=cmd_export, **{name: cmd_generate for name in EDIT_COMMANDS})
COMMANDS["train-vae"] = cmd_train_vae


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .io.checkpoint import CheckpointError
    from .text.clip_tokenizer import TokenizerError

    from .interrupt import prompt_interrupts

    # training turns the first Ctrl-C into a checkpoint at the next step; a second one ends it at once
    kill_after = 2 if args.command in ("train", "train-vae", "demo") else 1
    try:
        with prompt_interrupts(kill_after):
            return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, CheckpointError, TypeError, FloatingPointError, TokenizerError,
            PermissionError, IsADirectoryError, NotADirectoryError) as e:
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
