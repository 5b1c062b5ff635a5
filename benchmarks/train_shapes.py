"""Equal-budget training benchmark on `shapes` (32x32, class-conditional shape x colour).

sumie (preset ``shapes-32``: EDM preconditioning, log-normal sigma; trained with
``train.compile`` unless ``--no-compile``, sampled with DPM++ 2M on Karras sigmas) against a
peer trained in the same run on the same data order, batch size and wall-clock budget:
diffusers' ``UNet2DModel`` with a plain DDPM recipe (epsilon loss, 1000-step linear schedule,
``DDPMScheduler`` ancestral sampling). Both keep an EMA of the weights and train with the
same 10% condition dropout, so both can sample with classifier-free guidance at the preset's
scale (one batched call per step for conditional + unconditional).

Reported for each: training images/s, sampling images/s, and the fraction of 256 samples
that the shapes verifier accepts (requested shape and colour present), guided and
unguided, as a table of values and sumie/peer ratios. Writes a JSON report and grids.

    pip install -e ".[bench]"
    python benchmarks/train_shapes.py --minutes 10 --out benchmarks/results/train_shapes

``--curve-every 250`` also keeps a checkpoint every 250 steps and reports the guided acceptance
of the last 8 (within one run it rises smoothly; its slope at the end shows whether the budget,
not the recipe, is what limits the result).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

from sumie.config import preset, resolve
from sumie.data.shapes import NUM_CLASSES
from sumie.image import make_grid, save_png, to_uint8, upscale
from sumie.io.checkpoint import list_checkpoints
from sumie.metrics.verifier import ShapesVerifier
from sumie.models import load_model
from sumie.pipeline import class_cond, sample, sigmas_for
from sumie.train.loop import Trainer, autocast_dtype, cpu_has_native_bf16


def labels_for(n: int) -> list[int]:
    return [i % NUM_CLASSES for i in range(n)]


def sample_classes(den, labels: list[int], guidance_scale: float, sampler: str, sigmas: torch.Tensor) -> torch.Tensor:
    """One sample per label, 64 at a time, batch i seeded by its first index."""
    return torch.cat([sample(den, (3, 32, 32), len(labels[i:i + 64]), cond=class_cond(labels[i:i + 64]),
                             uncond=class_cond([-1] * len(labels[i:i + 64])), guidance_scale=guidance_scale,
                             sampler=sampler, sigmas=sigmas, seed=i, device="cpu") for i in range(0, len(labels), 64)])


def learning_curve(ckpts: list[Path], cfg, sampler: str, steps: int, n: int,
                   verifier: ShapesVerifier) -> list[tuple[int, float]]:
    """Guided acceptance of the EMA weights of these checkpoints: within one run it rises
    smoothly, so its slope at the end says whether more training would still pay."""
    labels, curve = labels_for(n), []
    for ckpt in ckpts:
        den, _ = load_model(ckpt)
        x = sample_classes(den, labels, cfg.sample.guidance_scale, sampler,
                           sigmas_for(den, cfg.sample.schedule, steps, cfg.sample.rho))
        accepted = float(verifier.accepts_labels(x, torch.tensor(labels)).float().mean())
        curve.append((int(ckpt.name.split("-")[-1]), accepted))
        print(f"   step {curve[-1][0]}: accepted {curve[-1][1]:.3f}", flush=True)
    return curve


def run_sumie(minutes: float, out: Path, n: int, steps: int, sampler: str | None,
              overrides: list[str] = (), curve_every: int = 0,
              verifier: ShapesVerifier | None = None) -> tuple[dict, torch.Tensor]:
    cfg = resolve("shapes-32", overrides=overrides)
    cfg.train.time_budget_s = minutes * 60
    cfg.train.max_steps = 10**9
    cfg.train.sample_every = 0
    cfg.train.ckpt_every = curve_every
    cfg.train.keep_checkpoints = 10**6 if curve_every else cfg.train.keep_checkpoints
    trainer = Trainer(cfg, out / "sumie", progress=False)
    params = sum(p.numel() for p in trainer.denoiser.net.parameters())
    res = trainer.run()
    den = trainer.ema_denoiser()
    sampler = sampler or cfg.sample.sampler
    verifier = verifier or ShapesVerifier.load()
    # the final checkpoint holds these EMA weights: its point is the guided measurement below
    curve = (learning_curve(list_checkpoints(res.run_dir)[-8:-1], cfg, sampler, steps, n, verifier)
             if curve_every else None)
    sigmas = sigmas_for(den, cfg.sample.schedule, steps, cfg.sample.rho)
    calls = []

    def counting(x, sigma, cond=None):  # counts denoiser evaluations (NFE) per batch
        calls.append(x.shape[0])
        return den(x, sigma, cond)

    labels = labels_for(n)
    out_images, stats = {}, {"params": params, "train_steps": res.step, "train_images_per_s": res.images_per_s,
                             "train_seconds": res.elapsed_s, "sampler": f"{sampler} + {cfg.sample.schedule}",
                             "train_autocast": str(autocast_dtype(cfg.train.precision, torch.device("cpu"))),
                             "train_compile": cfg.train.compile, "train_first_step_seconds": res.first_step_s,
                             "steps": steps, "guidance_scale": cfg.sample.guidance_scale}
    for g in (cfg.sample.guidance_scale, 1.0):
        calls.clear()
        key = "guided" if g != 1.0 else "unguided"
        t0 = time.perf_counter()
        out_images[key] = sample_classes(counting, labels, g, sampler, sigmas)
        dt = time.perf_counter() - t0
        stats[f"nfe_{key}"] = len(calls) // math.ceil(n / 64)
        stats[f"sample_images_per_s_{key}"] = n / dt
    if curve is not None:
        accepted = verifier.accepts_labels(out_images["guided"], torch.tensor(labels)).float().mean()
        curve.append((res.step, float(accepted)))
        print(f"   step {res.step}: accepted {curve[-1][1]:.3f}", flush=True)
        stats["curve_accepted_guided"] = curve
    return stats, out_images


def run_diffusers(minutes: float, n: int, steps: int) -> tuple[dict, torch.Tensor]:
    from diffusers import DDPMScheduler, UNet2DModel

    cfg = preset("shapes-32")  # same data, batch size, lr warmup and EMA decay as sumie
    torch.manual_seed(cfg.train.seed)
    # the same depth (3 levels, 1 block each, attention at the lowest) at 32x32 without a patch stem
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64, 64), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                       num_class_embeds=NUM_CLASSES + 1, attention_head_dim=32)  # + a null class for CFG
    params = sum(p.numel() for p in unet.parameters())
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    lr = 1e-3
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.99))
    from sumie.train.loop import dataset_for
    ds = dataset_for(cfg.data)
    g = torch.Generator().manual_seed(1)
    b = cfg.train.batch_size
    step, t_train, budget = 0, 0.0, minutes * 60
    while t_train < budget:
        t0 = time.perf_counter()
        batch = default_collate([ds[step * b + j] for j in range(b)])
        x0, labels = batch["x"], batch["label"]
        drop = torch.rand(b, generator=g) < cfg.train.cond_drop_prob  # the same 10% condition dropout
        labels = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        for grp in opt.param_groups:  # the same warmup + cosine-over-the-budget schedule as sumie
            frac = min(1.0, t_train / budget)
            grp["lr"] = (lr * min(1.0, (step + 1) / cfg.train.warmup_steps)
                         * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))))
        loss = torch.nn.functional.mse_loss(unet(xt, t, class_labels=labels).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            d = min(cfg.train.ema_decay, (step + 2) / (step + 11))
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - d)
        step += 1
        t_train += time.perf_counter() - t0
    train_ips = step * b / t_train

    sched.set_timesteps(steps)
    out_images, stats = {}, {"params": params, "train_steps": step, "train_images_per_s": train_ips,
                             "train_seconds": t_train, "sampler": "DDPMScheduler", "steps": steps,
                             "guidance_scale": cfg.sample.guidance_scale, "lr": lr}
    labels = labels_for(n)
    for w in (cfg.sample.guidance_scale, 1.0):
        t0 = time.perf_counter()
        images = []
        with torch.no_grad():
            for i in range(0, n, 64):
                lab = torch.tensor(labels[i:i + 64])
                both = torch.cat([lab, torch.full_like(lab, NUM_CLASSES)])
                gen = torch.Generator().manual_seed(i)
                x = torch.randn((len(lab), 3, 32, 32), generator=gen)
                for t in sched.timesteps:
                    if w != 1.0:  # conditional and unconditional in one batched call, as sumie does
                        eps_c, eps_u = ema(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
                        eps = eps_u + w * (eps_c - eps_u)
                    else:
                        eps = ema(x, t, class_labels=lab).sample
                    x = sched.step(eps, t, x, generator=gen).prev_sample
                images.append(x)
        dt = time.perf_counter() - t0
        key = "guided" if w != 1.0 else "unguided"
        stats[f"nfe_{key}"] = steps
        stats[f"sample_images_per_s_{key}"] = n / dt
        out_images[key] = torch.cat(images)
    return stats, out_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget for each system")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sampler", default="dpmpp_2m",
                    help="sumie sampler (default dpmpp_2m: one network call per step, as the peer's DDPM)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="train sumie with train.compile (torch.compile; its compile time counts in the budget)")
    ap.add_argument("--out", default="benchmarks/results/train_shapes")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--curve-every", type=int, default=0, metavar="STEPS",
                    help="also checkpoint every STEPS steps and report the guided acceptance of the last 8 "
                         "checkpoints (sumie only; ~40 s each)")
    ap.add_argument("--set", nargs="*", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                    help="overrides of sumie's shapes-32 preset (for experiments)")
    args = ap.parse_args()
    overrides = ["train.compile=true"] * args.compile + args.set
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    verifier = ShapesVerifier.load()
    labels = torch.tensor(labels_for(args.n))
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_native_bf16": cpu_has_native_bf16(),
              "minutes": args.minutes, "n": args.n, "sumie_overrides": overrides}
    systems = [("sumie", lambda: run_sumie(args.minutes, out, args.n, args.steps, args.sampler, overrides,
                                                 args.curve_every, verifier))]
    if not args.skip_peer:
        systems.append(("diffusers", lambda: run_diffusers(args.minutes, args.n, args.steps)))
    for name, fn in systems:
        print(f"== {name}: training for {args.minutes:g} min ...", flush=True)
        stats, images = fn()
        for key, x in images.items():
            stats[f"accepted_{key}"] = float(verifier.accepts_labels(x, labels).float().mean())
            save_png(out / f"{name}_{key}_grid.png", upscale(make_grid(to_uint8(x[:72]), ncols=12), 2))
        report[name] = stats
        print(json.dumps(stats, indent=2), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    keys = ["params", "train_steps", "train_images_per_s", "sample_images_per_s_guided", "nfe_guided",
            "accepted_guided", "sample_images_per_s_unguided", "accepted_unguided"]
    print(f"\n{'':30s}" + "".join(f"{k:>12s}" for k in [s for s, _ in systems]) +
          ("     ratio" if len(systems) > 1 else ""))
    for k in keys:
        vals = [report[s][k] for s, _ in systems]
        row = f"{k:30s}" + "".join(f"{v:12.3f}" if isinstance(v, float) else f"{v:12d}" for v in vals)
        if len(vals) == 2 and vals[1]:
            row += f"{vals[0] / vals[1]:10.2f}x"
        print(row)


if __name__ == "__main__":
    main()
