"""Training latent diffusion's KL autoencoder (Rombach et al. 2022, sec. 3 and app. G).

    loss = l1 |x - D(z)| + l2 |x - D(z)|^2 + kl_weight KL(q(z|x) || N(0, I)) [+ lambda * hinge GAN]

with ``z`` a reparameterised posterior sample, both reconstruction terms averaged over
pixels and the KL summed over latent dimensions divided by the number of pixel values
(so ``kl_weight`` has latent diffusion's meaning: 1e-6 in the published kl-f8). The
optional PatchGAN (Isola et al. 2017) with hinge loss switches on at ``disc_start``; its
weight lambda is ``disc_weight`` times the adaptive ratio of Esser et al. 2021 (eq. 7),
||grad rec|| / ||grad GAN|| at the decoder's last layer. No perceptual loss: it needs
pretrained features, and sumie ships none.

At the end of a run the latent scale is measured (Rombach et al. 2022, sec. 4.3.2:
``scale = 1 / std``, ``shift = mean`` of the posterior means of training images), written
into the exported autoencoder folder ``RUN/vae`` (what ``[latent] vae`` points at), and
reconstruction PSNR on held-out images goes into ``RUN/report.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from ..config import DataConfig, _from_dict, merge, parse_override, read_config_file
from ..image import make_grid, save_png, to_uint8, upscale
from ..io.checkpoint import (CheckpointError, latest_checkpoint, load_tensors, prune_checkpoints, read_json,
                             write_checkpoint, write_json)
from ..latent import RUN_VAE_DIR, save_vae
from ..models import load_state_strict
from ..nn.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from ..nn.vae import AutoencoderKL, VAEConfig
from .ema import EMA
from .optim import adamw, load_optimizer, optimizer_tensors
from .loop import (DataOrder, Trainer, TrainingDiverged, _stop_on_signals,
                   dataset_for, resolve_device)
from .rundir import prepare_run_dir, truncate_log


@dataclass
class VAELossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    kl_weight: float = 1e-6  # KL summed over latent dims / pixel values (latent diffusion's convention)
    disc_start: int | None = None  # step at which the PatchGAN switches on; None: no discriminator
    disc_weight: float = 0.5
    disc_adaptive: bool = True  # lambda = disc_weight * ||grad rec|| / ||grad GAN|| (Esser et al. 2021)
    disc_channels: int = 32
    disc_layers: int = 2
    disc_lr: float | None = None  # default: train.lr


@dataclass
class VAETrainSettings:
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.5, 0.9)  # latent diffusion's autoencoder betas
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # constant | cosine
    lr_min_ratio: float = 0.1
    max_steps: int = 20_000
    time_budget_s: float | None = None
    grad_clip: float = 1.0
    ema_decay: float | None = 0.999  # None: no EMA (the raw weights are exported)
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 1000  # reconstruction grids of held-out images
    log_every: int = 25
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    scale_images: int = 512  # training images whose latents set scale and shift
    eval_images: int = 512  # at most this many held-out images for PSNR
    heldout_fraction: float = 0.05  # folders without a "heldout" split: this hashed fraction is held out
    eval_batch_size: int = 32


@dataclass
class VAETrainConfig:
    vae: VAEConfig = field(default_factory=VAEConfig.tiny)
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="shapes", resolution=32, conditioning="none"))
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: VAETrainSettings = field(default_factory=VAETrainSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ---------------------------------------------------------------------------
# presets and config files
# ---------------------------------------------------------------------------

def _small(z_channels: int = 4, ch_mult: tuple[int, ...] = (1, 2, 2), resolution: int = 64, **kw) -> VAEConfig:
    """A CPU-sized LDM autoencoder: 32 base channels, one ResNet block per level, attention in the middle only."""
    return VAEConfig(ch=32, ch_mult=ch_mult, num_res_blocks=1, z_channels=z_channels, embed_dim=z_channels,
                     norm_groups=8, resolution=resolution, **kw)


def _vae_tiny() -> VAETrainConfig:
    """A few-second kl-f4 on 32x32 shapes for tests and smoke runs (8x8x4 latents)."""
    return VAETrainConfig(vae=VAEConfig.tiny(), data=DataConfig(kind="shapes", resolution=32, conditioning="none"),
                          train=VAETrainSettings(batch_size=8, lr=2e-3, max_steps=60, warmup_steps=5, ckpt_every=30,
                                                 sample_every=0, log_every=10, ema_decay=0.9, scale_images=64,
                                                 eval_images=32))


def _vae_shapes_f4() -> VAETrainConfig:
    """kl-f4 on 32x32 shapes scenes (plain and textured): 8x8x4 latents."""
    return VAETrainConfig(vae=_small(resolution=32),
                          data=DataConfig(kind="shapes", resolution=32, background="mixed", max_objects=2,
                                          conditioning="none"),
                          train=VAETrainSettings(batch_size=16, lr=1e-3, lr_schedule="cosine"))


def _vae_emoji_f4() -> VAETrainConfig:
    """kl-f4 on 64x64 emoji (``sumie data emoji``; set data.path): 16x16x4 latents, 12x compression."""
    return VAETrainConfig(vae=_small(resolution=64),
                          data=DataConfig(kind="folder", resolution=64, conditioning="none"),
                          train=VAETrainSettings(batch_size=8, lr=1e-3, lr_schedule="cosine", ckpt_every=250,
                                                 sample_every=500))


def _vae_emoji_f8() -> VAETrainConfig:
    """kl-f8 on 64x64 emoji: 8x8x8 latents, 24x compression."""
    cfg = _vae_emoji_f4()
    cfg.vae = _small(z_channels=8, ch_mult=(1, 2, 2, 2), resolution=64)
    return cfg


VAE_PRESETS = {"tiny": _vae_tiny, "shapes-f4": _vae_shapes_f4, "emoji-f4": _vae_emoji_f4, "emoji-f8": _vae_emoji_f8}


def vae_preset(name: str) -> VAETrainConfig:
    try:
        return VAE_PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown autoencoder preset {name!r}; valid: {', '.join(sorted(VAE_PRESETS))}") from None


def vae_config_from_dict(data: dict) -> VAETrainConfig:
    return _from_dict(VAETrainConfig, data, "config")


def resolve_vae_config(preset_name: str | None = "tiny", file: str | Path | None = None,
                       overrides: list[str] | tuple[str, ...] = ()) -> VAETrainConfig:
    """Preset, then file ([vae] [data] [loss] [train] tables), then ``section.key=value`` overrides."""
    config = vae_preset(preset_name) if preset_name else VAETrainConfig()
    if file is not None:
        config = merge(config, read_config_file(file))
    for o in overrides:
        config = merge(config, parse_override(o))
    return config


# ---------------------------------------------------------------------------
# training and held-out images
# ---------------------------------------------------------------------------

def _hashed_heldout(rel: str, fraction: float) -> bool:
    """A stable pseudo-random choice of ``fraction`` of files, by the SHA-256 of their relative path."""
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little") / 2**64 < fraction


def _subset(ds, keep: list[bool]):
    """A copy of an image-folder dataset with only the kept images."""
    out = copy.copy(ds)
    out.paths = [p for p, k in zip(ds.paths, keep) if k]
    out.captions = [c for c, k in zip(ds.captions, keep) if k]
    if not out.paths:
        raise ValueError(f"no images left in {ds.root} after holding out images for evaluation")
    return out


def train_and_heldout(d: DataConfig, heldout_fraction: float) -> tuple[Dataset, Dataset, str]:
    """(training set, held-out set, how it was held out). Folders: the metadata's "heldout" split
    if any row has it, else a hashed fraction of the files; shapes: scenes of another seed."""
    if d.kind == "shapes":
        held = dataset_for(dataclasses.replace(d, seed=d.seed + 1))
        return dataset_for(d), held, f"shapes scenes of seed {d.seed + 1}"
    if d.kind != "folder":
        return dataset_for(d), dataset_for(d), "none"  # dataset_for names the valid kinds
    from ..data.folder import ImageFolderDataset, _read_metadata_rows

    if not d.path:
        raise ValueError("data.kind = 'folder' needs data.path, the folder of images")
    rows = _read_metadata_rows(Path(d.path)) if Path(d.path).is_dir() else {}
    folder = ImageFolderDataset(d.path, d.resolution, random_flip=d.random_flip, seed=d.seed, split=d.split)
    if any(r.get("split") == "heldout" for r in rows.values()):
        held = ImageFolderDataset(d.path, d.resolution, random_flip=False, seed=d.seed, split="heldout")
        how = "metadata split 'heldout'"
        if d.split is None:
            held_set = {p.resolve() for p in held.paths}
            folder = _subset(folder, [p.resolve() not in held_set for p in folder.paths])
    else:
        mask = [_hashed_heldout(p.relative_to(folder.root).as_posix(), heldout_fraction) for p in folder.paths]
        if not any(mask):
            mask[-1] = True  # tiny folders: hold out at least one image
        held = _subset(folder, mask)
        held.random_flip = False
        folder = _subset(folder, [not m for m in mask])
        how = f"hashed {heldout_fraction:.0%} of the files"
    if d.shapes_fraction > 0:
        from ..data.mix import FolderWithShapes

        shapes = dataset_for(dataclasses.replace(d, kind="shapes"))
        folder = FolderWithShapes(folder, shapes, d.shapes_fraction)
    return folder, held, how


def _images(ds: Dataset, n: int) -> torch.Tensor:
    """The first-epoch images at ``n`` evenly spaced indices of a dataset, (n, 3, H, W)."""
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(0)
    n = min(n, len(ds))
    idx = torch.linspace(0, len(ds) - 1, n).round().long().tolist()
    return torch.stack([ds[i]["x"] for i in idx])


@torch.no_grad()
def measure_latent_scale(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32) -> dict:
    """Global mean and std of the posterior means of ``images``: shift = mean, scale = 1 / std (LDM sec. 4.3.2)."""
    dev = next(vae.parameters()).device
    z = torch.cat([vae.encode(images[i: i + batch_size].to(dev)).mode().float().cpu()
                   for i in range(0, len(images), batch_size)])  # (N, c, h, w)
    mean, std = float(z.mean()), float(z.std())
    return {"scaling_factor": 1.0 / std, "shift_factor": mean, "latent_mean": mean, "latent_std": std,
            "channel_mean": z.mean(dim=(0, 2, 3)).tolist(), "channel_std": z.std(dim=(0, 2, 3)).tolist(),
            "latent_shape": list(z.shape[1:]), "images": len(images)}


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32) -> tuple[dict, torch.Tensor]:
    """PSNR of D(mean of E(x)) against x on the [0, 1] scale, per image then averaged; and the reconstructions."""
    dev = next(vae.parameters()).device
    recs = torch.cat([vae.decode(vae.encode(images[i: i + batch_size].to(dev)).mode()).float().cpu().clamp(-1, 1)
                      for i in range(0, len(images), batch_size)])
    mse = ((recs - images) / 2).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)  # (N,)
    psnr = 10 * torch.log10(1.0 / mse)
    return {"psnr_db": float(psnr.mean()), "psnr_db_min": float(psnr.min()),
            "psnr_db_of_mean_mse": float(10 * math.log10(1.0 / float(mse.mean()))),
            "l1": float((recs - images).abs().mean() / 2), "images": len(images)}, recs


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Esser et al. 2021, eq. 7: ||grad_L rec|| / (||grad_L GAN|| + 1e-4) at the last layer L, clamped to [0, 1e4]."""
    rg = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gg = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rg.norm() / (gg.norm() + 1e-4)).clamp(0.0, 1e4).detach()


@dataclass
class VAETrainResult:
    run_dir: Path
    step: int
    status: str  # "finished" | "interrupted" | "budget"
    losses: list[float]
    images_per_s: float
    elapsed_s: float
    report: dict


class VAETrainer:
    """The autoencoder, its optional discriminator, optimizers, EMA and RNGs; :meth:`run` trains them."""

    lr_at = Trainer.lr_at  # warmup + constant/cosine: the diffusion trainer's schedule, read off config.train
    progress_fraction = Trainer.progress_fraction

    def __init__(self, config: VAETrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 overwrite: bool = False):
        self.config, self.run_dir, self.progress = config, Path(run_dir), progress
        prepare_run_dir(self.run_dir, resume=resume, overwrite=overwrite)  # before any work
        t, lc = config.train, config.loss
        if t.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown lr_schedule {t.lr_schedule!r}; valid: constant, cosine")
        if t.batch_size < 1:
            raise ValueError("train.batch_size must be >= 1")
        if config.data.resolution % config.vae.downsampling_factor:
            raise ValueError(f"data.resolution ({config.data.resolution}) must be a multiple of the autoencoder's "
                             f"downsampling factor {config.vae.downsampling_factor}")
        self.device = resolve_device(t.device)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.dataset, self.heldout, self.heldout_source = train_and_heldout(config.data, t.heldout_fraction)
        torch.manual_seed(t.seed)
        self.vae = AutoencoderKL(config.vae).to(self.device)
        self.ema = EMA(self.vae, t.ema_decay) if t.ema_decay is not None else None
        self.disc = self.disc_opt = None
        if lc.disc_start is not None:
            self.disc = PatchDiscriminator(config.vae.out_channels, lc.disc_channels, lc.disc_layers).to(self.device)
            self.disc_opt = adamw(self.disc.parameters(), t, lr=lc.disc_lr or t.lr)
        self.opt = adamw(self.vae.parameters(), t)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(t.seed + 1)
        self.order = DataOrder(len(self.dataset), config.data.seed, shuffle=config.data.kind != "shapes")
        self.step, self.elapsed = 0, 0.0
        if resume:
            self._resume()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(config.to_json())

    # -- state ---------------------------------------------------------------
    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {self.run_dir}")
        saved = vae_config_from_dict(read_json(ckpt / "config.json"))
        if saved.vae != self.config.vae or (saved.loss.disc_start is None) != (self.config.loss.disc_start is None):
            raise CheckpointError(f"--resume: the autoencoder/discriminator config differs from the one in {ckpt}; "
                                  "resume with the run's own config (omit --preset/--config)")
        load_state_strict(self.vae, load_tensors(ckpt / "model.safetensors"), str(ckpt))
        if self.ema is not None:
            load_state_strict(self.ema.shadow, load_tensors(ckpt / "ema.safetensors"), str(ckpt))
        state = read_json(ckpt / "state.json")
        tensors = load_tensors(ckpt / "state.safetensors")
        load_optimizer(self.opt, tensors, state["param_groups"])
        if self.disc is not None:
            load_state_strict(self.disc, load_tensors(ckpt / "disc.safetensors"), str(ckpt))
            load_optimizer(self.disc_opt, {"opt." + k[5:]: v for k, v in tensors.items() if k.startswith("dopt.")},
                            state["disc_param_groups"])
        self.noise_gen.set_state(tensors["rng.noise"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        truncate_log(self.run_dir / "log.jsonl", self.step)  # entries after the checkpoint are written again
        if self.ema is not None:
            self.ema.num_updates = state["ema_updates"]

    def save(self) -> Path:
        tensors, groups = optimizer_tensors(self.opt)
        tensors.update({"rng.noise": self.noise_gen.get_state(), "rng.torch": torch.get_rng_state()})
        state = {"step": self.step, "elapsed_s": self.elapsed, "param_groups": groups,
                 "ema_updates": self.ema.num_updates if self.ema is not None else 0}
        files = {"model.safetensors": self.vae.state_dict(), "ema.safetensors": self.export_weights().state_dict(),
                 "config.json": self.config.to_dict()}
        if self.disc is not None:
            d_tensors, state["disc_param_groups"] = optimizer_tensors(self.disc_opt)
            tensors.update({"d" + k: v for k, v in d_tensors.items()})
            files["disc.safetensors"] = self.disc.state_dict()
        files.update({"state.safetensors": tensors, "state.json": state})
        path = write_checkpoint(self.run_dir, self.step, files)
        prune_checkpoints(self.run_dir, self.config.train.keep_checkpoints)
        return path

    def export_weights(self) -> AutoencoderKL:
        """The weights that are evaluated and exported: EMA if enabled, else the raw ones."""
        return self.ema.shadow if self.ema is not None else self.vae

    # -- one step ------------------------------------------------------------
    def get_batch(self, step: int) -> torch.Tensor:
        bs = self.config.train.batch_size
        items = []
        for j in range(bs):
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch((step * bs + j) // len(self.dataset))
            items.append(self.dataset[self.order(step * bs + j)])
        return default_collate(items)["x"]

    def train_step(self) -> dict:
        t, lc = self.config.train, self.config.loss
        lr = self.lr_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.vae.train()
        x = self.get_batch(self.step).to(self.device)  # (B, 3, H, W) in [-1, 1]
        rec, post = self.vae(x, self.noise_gen)
        err = rec - x
        rec_loss = lc.l1_weight * err.abs().mean() + (lc.l2_weight * err.square().mean() if lc.l2_weight else 0.0)
        kl = post.kl().mean()  # summed over latent dims, averaged over the batch
        loss = rec_loss + lc.kl_weight * kl / x[0].numel()
        stats = {"rec": float(rec_loss.detach()), "kl": float(kl.detach())}
        gan_on = self.disc is not None and self.step >= lc.disc_start
        if gan_on:
            self.disc.requires_grad_(False)
            g_loss = hinge_g_loss(self.disc(rec))
            w = lc.disc_weight
            if lc.disc_adaptive:
                w = w * adaptive_gan_weight(rec_loss, g_loss, self.vae.decoder.conv_out.weight)
            loss = loss + w * g_loss
            stats.update({"g": float(g_loss.detach()), "g_weight": float(w)})
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"autoencoder loss became {float(loss.detach())} at step {self.step}; training "
                                   f"stopped. The last good checkpoint in {self.run_dir} is intact. Lower train.lr "
                                   "or loss.disc_weight.")
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), t.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if gan_on:
            self.disc.requires_grad_(True)
            for g in self.disc_opt.param_groups:
                g["lr"] = lr * (lc.disc_lr or t.lr) / t.lr
            d_loss = hinge_d_loss(self.disc(x), self.disc(rec.detach()))
            d_loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.disc.parameters(), t.grad_clip)
            self.disc_opt.step()
            self.disc_opt.zero_grad(set_to_none=True)
            stats["d"] = float(d_loss.detach())
        if self.ema is not None:
            self.ema.update(self.vae)
        self.step += 1
        stats["loss"] = float(loss.detach())
        return stats

    # -- outputs -------------------------------------------------------------
    def heldout_images(self) -> torch.Tensor:
        return _images(self.heldout, self.config.train.eval_images)

    def recon_grid(self, path: Path, images: torch.Tensor | None = None, n: int = 8) -> Path:
        """Held-out originals (top row) above their reconstructions (bottom row)."""
        x = (images if images is not None else self.heldout_images())[:n]
        vae = self.export_weights().eval()
        with torch.no_grad():
            rec = vae.decode(vae.encode(x.to(self.device)).mode()).cpu()
        grid = make_grid(to_uint8(torch.cat([x, rec])), ncols=len(x))
        return save_png(path, upscale(grid, 2))

    def finalize(self) -> dict:
        """Measure the latent scale on training images, write ``RUN/vae`` and ``RUN/report.json``."""
        t = self.config.train
        vae = self.export_weights().eval()
        scale = measure_latent_scale(vae, _images(self.dataset, t.scale_images), t.eval_batch_size)
        held = self.heldout_images()
        psnr, _ = reconstruction_psnr(vae, held, t.eval_batch_size)
        vae_config = dataclasses.replace(self.config.vae, scaling_factor=scale["scaling_factor"],
                                         shift_factor=scale["shift_factor"])
        save_vae(self.run_dir / RUN_VAE_DIR, config=vae_config, state=vae.state_dict(),
                 extra={"step": self.step, "weights": "ema" if self.ema is not None else "raw"})
        self.recon_grid(self.run_dir / "recon.png", held)
        report = {"step": self.step, "elapsed_s": self.elapsed, "weights": "ema" if self.ema is not None else "raw",
                  "train_images": len(self.dataset), "heldout": {"source": self.heldout_source, **psnr},
                  "latent": scale, "downsampling_factor": self.config.vae.downsampling_factor,
                  "parameters": sum(p.numel() for p in self.vae.parameters())}
        write_json(self.run_dir / "report.json", report)
        return report

    # -- the loop ------------------------------------------------------------
    def run(self, max_steps: int | None = None) -> VAETrainResult:
        """Train until ``max_steps`` (default: config), the time budget, or a signal; then :meth:`finalize`."""
        t = self.config.train
        max_steps = t.max_steps if max_steps is None else max_steps
        stop = threading.Event()
        losses: list[float] = []
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=max_steps, initial=self.step, desc="train-vae", unit="step", dynamic_ncols=True)
        status, imgs, t_run = "finished", 0, 0.0
        with _stop_on_signals(stop), open(self.run_dir / "log.jsonl", "a") as log:
            while self.step < max_steps:
                if t.time_budget_s is not None and self.elapsed >= t.time_budget_s:
                    status = "budget"
                    break
                t0 = time.perf_counter()
                stats = self.train_step()
                dt = time.perf_counter() - t0
                self.elapsed += dt
                t_run += dt
                imgs += t.batch_size
                losses.append(stats["loss"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"rec": f"{stats['rec']:.4f}", "img_s": f"{imgs / max(t_run, 1e-9):.1f}"})
                if self.step % t.log_every == 0 or self.step == max_steps:
                    log.write(json.dumps({"step": self.step, **stats, "lr": self.lr_at(self.step - 1),
                                          "images_per_s": imgs / max(t_run, 1e-9), "elapsed_s": self.elapsed}) + "\n")
                    log.flush()
                if t.ckpt_every and self.step % t.ckpt_every == 0:
                    self.save()
                if t.sample_every and self.step % t.sample_every == 0:
                    self.recon_grid(self.run_dir / "samples" / f"step-{self.step:07d}.png")
                if stop.is_set():
                    status = "interrupted"
                    break
        if bar is not None:
            bar.close()
        last = latest_checkpoint(self.run_dir)
        if last is None or last.name != f"ckpt-{self.step:07d}":
            self.save()
        report = self.finalize()
        return VAETrainResult(self.run_dir, self.step, status, losses, imgs / max(t_run, 1e-9), self.elapsed, report)


def train_vae(config: VAETrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
              max_steps: int | None = None, overwrite: bool = False) -> VAETrainResult:
    """Train the autoencoder of ``config`` into ``run_dir`` (see :class:`VAETrainer`)."""
    return VAETrainer(config, run_dir, resume=resume, progress=progress, overwrite=overwrite).run(max_steps)
