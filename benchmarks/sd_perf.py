"""Stable Diffusion 1.5 on CPU or a CUDA GPU: sumie's pipeline against diffusers' StableDiffusionPipeline.

The published SD 1.5 architecture (unet/, vae/ config.json of the released diffusers
repository; CLIP ViT-L/14 text tower) is built by diffusers with random weights and saved
once as a diffusers folder (on CPU); each library then loads that folder in its own subprocess,
on the chosen device and in the chosen dtype, and generates one image (CFG, default 20 Euler
steps at 512x512) while recording (the model's files are read once before each library starts,
so both find them in the OS page cache)

* seconds per U-Net step (median interval between step callbacks; one step = one batched
  cond + uncond forward pass),
* seconds per image (the whole call: text encoding, sampling, VAE decoding), and load + image
  (sumie reads its weights lazily inside the call, diffusers in ``from_pretrained``),
* peak resident memory of the process (``VmHWM``: loading included),
* the U-Net's achieved GFLOP/s: FLOPs of one CFG step counted by ``torch.utils.flop_counter``
  divided by the measured step time.

With ``--device cuda`` each worker first runs a 2-step warm-up generation at the same size (kernel
and cuDNN algorithm selection are not timed), synchronizes the GPU before every timestamp, and
also records the peak GPU memory (``torch.cuda.max_memory_allocated``, loading included) as
``peak_gpu_mb``, and the time from loading to the end of the warm-up image as ``first_s`` (sumie
builds its stages on first use and keeps them on CUDA, so its loading happens there). It prints
both rows and the sumie/diffusers ratios; ``--json`` also writes them
to a file. The weights are random, so images are noise; speed and memory do not depend on the
values. The tokenizer is a small byte-level BPE vocabulary (CLIP's is not shipped), which
changes nothing about the networks' cost.

    python benchmarks/sd_perf.py [--size 512] [--steps 20] [--threads 1] [--workdir DIR] [--vae-tile 64] [--json PATH]
                                 [--variants resident,stream] [--repeat 2]
    PYTHONPATH=src python benchmarks/sd_perf.py --device cuda --dtype fp16 [--json PATH]   # GPU, sumie not installed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", ""
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
_SD15_VAE = dict(sample_size=512, block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                 norm_num_groups=32, scaling_factor=0.18215, down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, hidden_act="quick_gelu", vocab_size=49408)
_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  timestep_spacing="leading", prediction_type="epsilon")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a timestamp taken next covers it (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def write_tokenizer(folder: Path) -> None:
    from sumie.text.clip_tokenizer import BOS, EOS, bytes_to_unicode

    syms = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(syms + [s + "</w>" for s in syms] + [BOS, EOS])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
                                                               "pad_token": EOS}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": EOS}))


def build(folder: Path) -> None:
    """The SD 1.5 architecture with random weights, saved by diffusers (safetensors)."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    write_tokenizer(folder / "tokenizer")
    tok = transformers.CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt"),
                                     pad_token="<|endoftext|>")
    tok.model_max_length = 77
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**_SD15_VAE),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**_CLIP_L)),
        tokenizer=tok, unet=diffusers.UNet2DConditionModel(**_SD15_UNET),
        scheduler=diffusers.EulerDiscreteScheduler(**_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    write_tokenizer(folder / "tokenizer")  # sumie reads vocab.json + merges.txt
    del pipe


def prime_page_cache(folder: Path) -> None:
    """Read every file of the model once, so that each library starts with its weights in the OS
    page cache: without this the first library measured pays the disk reads for both."""
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def unet_flops(unet_call) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        unet_call()
    return counter.get_total_flops()


def worker(lib: str, folder: Path, size: int, steps: int, vae_tile: int | None, device: str = "cpu",
           dtype: str = "fp32") -> dict:
    """Load, generate one image, measure (runs in its own process)."""
    stamps: list[float] = []
    dt, latent = DTYPES[dtype], size // 8

    def stamp() -> None:
        sync(device)
        stamps.append(time.perf_counter())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if lib.startswith("sumie"):
        from sumie.pipelines import StableDiffusion

        stream = {"sumie": None, "sumie-resident": False, "sumie-stream": True}[lib]
        pipe = StableDiffusion.from_pretrained(folder, vae_tile=vae_tile, device=device, dtype=dt,
                                               stream_weights=stream)

        def generate(n_steps: int) -> None:
            pipe(PROMPT, NEGATIVE, steps=n_steps, guidance_scale=7.5, sampler="euler", seed=0, height=size,
                 width=size, callback=lambda info: stamp())
    else:
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=dt,
                                                                 requires_safety_checker=False).to(device)
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if vae_tile:
            pipe.vae.enable_tiling()

        def on_step(p, i, t, kw):
            stamp()
            return kw

        def generate(n_steps: int) -> None:
            with torch.inference_mode():
                pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=n_steps, guidance_scale=7.5, height=size,
                     width=size, generator=torch.Generator(device).manual_seed(0), callback_on_step_end=on_step,
                     output_type="np")
    sync(device)
    load_s = time.perf_counter() - t0
    first_s = None
    if device == "cuda":  # kernel / cuDNN algorithm selection happens here, untimed
        generate(2)
        sync(device)
        first_s = time.perf_counter() - t0  # load + a 2-step image: sumie builds (uploads) its stages here
        stamps.clear()
    t1 = time.perf_counter()
    generate(steps)
    sync(device)
    image_s = time.perf_counter() - t1
    extra = {}
    if device == "cuda":
        extra = {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20, "gpu": torch.cuda.get_device_name(),
                 "first_s": first_s}
    rss = peak_rss_mb()
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dt)
    ctx = torch.randn(2, 77, 768, device=device, dtype=dt)
    t = torch.full((2,), 500.0, device=device)
    if lib.startswith("sumie"):
        unet = pipe._stage("unet", pipe.build_unet)  # the kept U-Net (CUDA), else a fresh one to count
        flops = unet_flops(lambda: unet(x, t, {"context": ctx}))
    else:
        flops = unet_flops(lambda: pipe.unet(x, t, encoder_hidden_states=ctx))
    # sumie reports before each step, diffusers after: both give steps-1 full step intervals
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    step_s = gaps[len(gaps) // 2] if gaps else image_s / steps
    return {"lib": lib, "load_s": load_s, "step_s": step_s, "image_s": image_s, "total_s": load_s + image_s,
            "peak_rss_mb": rss, **extra,
            "unet_gflop_per_step": flops / 1e9, "gflops": flops / 1e9 / step_s}


def unet_ab(folder: Path, size: int, calls: int, device: str = "cpu", dtype: str = "fp32") -> dict:
    """Both U-Nets in one process, called alternately on the same inputs (CFG batch of 2): step
    speed without the between-process drift of the whole-run comparison."""
    import diffusers
    from sumie.pipelines import StableDiffusion

    dt, latent = DTYPES[dtype], size // 8
    pipe = StableDiffusion.from_pretrained(folder, device=device, dtype=dt, stream_weights=False)
    ours = pipe.build_unet()
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dt).to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g).to(device, dt)
    ctx = torch.randn(2, 77, 768, generator=g).to(device, dt)
    t = torch.full((2,), 500.0, device=device)
    fns = {"sumie": lambda: ours(x, t, {"context": ctx}), "diffusers": lambda: theirs(x, t, encoder_hidden_states=ctx)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for name in fns:  # first calls (weight pages, kernel selection) untimed
            fns[name]()
        for i in range(calls):
            for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
                sync(device)
                t0 = time.perf_counter()
                fns[name]()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"calls": times, "median_s": med, "ratio": med["sumie"] / med["diffusers"]}


def round_ratios(runs: dict[str, list[dict]], lib: str, key: str) -> list[float]:
    """``lib``'s value over diffusers' in each round (both measured back to back in that round): on a
    machine whose speed drifts by several percent between runs, their median is steadier than the
    ratio of the best runs, which one lucky run decides."""
    return [a[key] / b[key] for a, b in zip(runs[lib], runs["diffusers"])]


def print_round_ratios(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for lib in runs:
        if lib == "diffusers" or len(runs[lib]) < 2:
            continue
        for key in ("step_s", "total_s"):
            rs = round_ratios(runs, lib, key)
            out[f"{lib}/{key}"] = {"rounds": rs, "median": statistics.median(rs)}
            print(f"per-round {lib}/diffusers {key}: {' '.join(f'{r:.3f}' for r in rs)}  "
                  f"median {statistics.median(rs):.3f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image height and width in pixels (multiple of 64)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each worker")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the saved model here (reused if present)")
    ap.add_argument("--vae-tile", type=int, default=None, help="tiled VAE decoding with this latent tile size")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and activations of both pipelines")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and ratios to this JSON file")
    ap.add_argument("--repeat", type=int, default=1, help="rounds, in alternating order; each library's best run "
                    "(least load + image time) is reported, all runs go into --json")
    ap.add_argument("--variants", default="", help="also measure sumie with these CPU memory modes (comma list): "
                    "resident (stream_weights=False), stream (every U-Net block streamed)")
    ap.add_argument("--unet-ab", type=int, default=0, metavar="N",
                    help="instead: N alternating calls of each U-Net in one process (step speed only)")
    ap.add_argument("--worker", choices=["sumie", "sumie-resident", "sumie-stream", "diffusers"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: CUDA is not available to this torch ({torch.__version__}, "
                 f"CUDA build: {torch.version.cuda or 'none'})")
    torch.set_num_threads(args.threads)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.folder, args.size, args.steps, args.vae_tile,
                                            args.device, args.dtype)))
        return 0

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sd_perf_")
        args.workdir = Path(tmp.name)
    folder = args.workdir / "sd15-random"
    if not (folder / "model_index.json").is_file():
        print(f"building SD 1.5 (random weights) in {folder} ...", flush=True)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import sd_perf; from pathlib import Path; sd_perf.build(Path({str(folder)!r}))"], check=True)
    if args.unet_ab:
        res = unet_ab(folder, args.size, args.unet_ab, args.device, args.dtype)
        print(f"U-Net alone, {args.unet_ab} alternating calls each, {args.device} {args.dtype}, {args.size}x{args.size}, "
              f"{args.threads} thread(s): median s/call sumie {res['median_s']['sumie']:.3f}, diffusers "
              f"{res['median_s']['diffusers']:.3f}, ratio {res['ratio']:.3f}")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - {"resident", "stream"}:
        ap.error(f"--variants takes resident and/or stream, got {args.variants!r}")
    libs = ("sumie", *(f"sumie-{v}" for v in variants), "diffusers")
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    for r in range(args.repeat):  # rounds in alternating order: a machine that speeds up or slows down
        for lib in (libs if r % 2 == 0 else libs[::-1]):  # mid-run does not favour one library
            prime_page_cache(folder)
            cmd = [sys.executable, __file__, "--worker", lib, "--folder", str(folder), "--size", str(args.size),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device,
                   "--dtype", args.dtype]
            if args.vae_tile:
                cmd += ["--vae-tile", str(args.vae_tile)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if out.returncode or line is None:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                return 1
            runs[lib].append(json.loads(line[len("RESULT "):]))
    rows = {lib: min(rs, key=lambda row: row["total_s"]) for lib, rs in runs.items()}  # each library's best run
    device = f"{args.device} ({rows['sumie']['gpu']})" if args.device == "cuda" else args.device
    print(f"SD 1.5 architecture, random weights, {device} {args.dtype}, {args.size}x{args.size}, {args.steps} Euler "
          f"steps, CFG 7.5, {args.threads} thread(s), torch {torch.__version__}"
          + (f"; best of {args.repeat} runs each, alternating order" if args.repeat > 1 else ""))
    cols = [("load_s", "load s"), ("step_s", "s/U-Net step"), ("image_s", "s/image"), ("total_s", "load+image s"),
            ("peak_rss_mb", "peak RSS MB"),
            ("unet_gflop_per_step", "GFLOP/step"), ("gflops", "U-Net GFLOP/s")]
    if args.device == "cuda":
        cols.insert(4, ("peak_gpu_mb", "peak GPU MB"))
        cols.insert(1, ("first_s", "load+2 steps s"))
    ratios = {lib: {k: rows[lib][k] / rows["diffusers"][k] for k, _ in cols} for lib in rows if lib != "diffusers"}
    ratio = ratios["sumie"]
    print(f"{'':<15}" + "".join(f"{h:>15}" for _, h in cols))
    for lib, r in rows.items():
        print(f"{lib:<15}" + "".join(f"{r[k]:>15.3f}" for k, _ in cols))
    for lib, rt in ratios.items():
        print(f"{'ratio':<15}" + "".join(f"{rt[k]:>15.3f}" for k, _ in cols) + f"   ({lib} / diffusers)")
    per_round = print_round_ratios(runs)
    if args.json:
        config = {k: getattr(args, k) for k in ("device", "dtype", "size", "steps", "threads", "vae_tile")}
        args.json.write_text(json.dumps({"config": {**config, "torch": torch.__version__}, "rows": rows,
                                         "ratio": ratio, "ratios": ratios, "per_round": per_round, "runs": runs},
                                        indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
