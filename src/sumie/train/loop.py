"""The one training loop: data -> loss -> AdamW with warmup, clipping, EMA, checkpoints.

Deterministic and resumable: the data order is a pure function of (seed, step), and the
checkpoint carries every RNG state, so ``--resume`` reproduces the loss trajectory of an
uninterrupted run. SIGINT/SIGTERM save a checkpoint at the next step boundary; a
non-finite loss stops the run with the last good checkpoint left whole.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from ..config import DataConfig, RunConfig, from_dict
from ..diffusion.losses import DiffusionLoss
from ..diffusion.precond import Denoiser
from ..diffusion.schedules import LogNormalSigma, UniformTimestepSigma
from ..image import make_grid, save_png, to_uint8, upscale
from ..latent import decode_samples, training_space
from ..io.checkpoint import (CheckpointError, latest_checkpoint, load_tensors, prune_checkpoints, read_json,
                             resolve_checkpoint, write_checkpoint)
from ..models import (FROZEN_TEXT_FILE, TEXT_FILES, build_denoiser, build_text_encoder, caption_corpus,
                      check_conditioning, load_state_strict, with_text_width)
from ..text.bert import fingerprint
from ..text.small import WordTokenizer, text_cond
from ..pipeline import class_cond, sample
from .ema import EMA
from .optim import adamw, load_optimizer, optimizer_tensors
from .rundir import prepare_run_dir, truncate_log


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    status: str  # "finished" | "interrupted" | "budget"
    losses: list[float]
    images_per_s: float
    elapsed_s: float
    first_step_s: float = 0.0  # this process's first step: with train.compile it includes compiling


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device = 'cpu'")
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX: Zen 4+, Sapphire Rapids+),
    where oneDNN's bf16 matmul and convolution run about 2x faster than fp32. Without them
    (e.g. Zen 2, most laptops) bf16 is emulated and ~200x slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision``. ``auto``: bf16 on CUDA GPUs that support it and on
    CPUs with native bf16 (:func:`cpu_has_native_bf16`; 1.3x more training images/s for the
    shapes-32 preset on 2 Zen 4 cores), else fp32. Weights, optimizer state and EMA stay fp32
    (mixed precision, Micikevicius et al. 2018)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class DataOrder:
    """Index of the j-th example of the run: epoch-wise permutations seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._perm: tuple[int, torch.Tensor] | None = None

    def __call__(self, position: int) -> int:
        if not self.shuffle:
            return position % self.n
        epoch, k = divmod(position, self.n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][k])


class RunPositions(Dataset):
    """The run's examples by position ``j`` (the j-th example drawn since step 0): the dataset's
    epoch is set for ``j`` before the item is read, so an item is a pure function of ``j`` in any
    process and worker-loaded batches equal those loaded in the training process."""

    def __init__(self, dataset: Dataset, order: DataOrder):
        self.dataset, self.order = dataset, order

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, position: int) -> dict:
        if hasattr(self.dataset, "set_epoch"):  # flips/crops/scenes are a pure function of (item, epoch)
            self.dataset.set_epoch(position // len(self.dataset))
        return self.dataset[self.order(position)]


def batch_positions(first_step: int, grad_accum: int, batch_size: int):
    """Positions of every micro-batch from ``first_step`` on, in training order."""
    k = first_step * grad_accum
    while True:
        yield list(range(k * batch_size, (k + 1) * batch_size))
        k += 1


def dataset_for(d: DataConfig) -> Dataset:
    """The dataset a :class:`DataConfig` describes."""
    if d.kind == "shapes":
        from ..data.shapes import ShapesConfig, ShapesDataset

        return ShapesDataset(ShapesConfig(resolution=d.resolution, background=d.background,
                                          max_objects=d.max_objects, seed=d.seed))
    if d.kind == "folder":
        from ..data.folder import ImageFolderDataset

        if not d.path:
            raise ValueError("data.kind = 'folder' needs data.path, the folder of images")
        if not 0.0 <= d.shapes_fraction < 1.0:
            raise ValueError(f"data.shapes_fraction must be in [0, 1), got {d.shapes_fraction}")
        folder = ImageFolderDataset(d.path, d.resolution, random_flip=d.random_flip, seed=d.seed, split=d.split)
        if d.shapes_fraction == 0:
            return folder
        from ..data.mix import FolderWithShapes
        from ..data.shapes import ShapesConfig, ShapesDataset

        shapes = ShapesDataset(ShapesConfig(resolution=d.resolution, background=d.background,
                                            max_objects=d.max_objects, seed=d.seed))
        return FolderWithShapes(folder, shapes, d.shapes_fraction)
    raise ValueError(f"unknown data kind {d.kind!r}; valid: shapes, folder")


def make_loss(config: RunConfig, denoiser: Denoiser) -> DiffusionLoss:
    d = config.diffusion
    if d.parameterization == "edm":
        sampler = LogNormalSigma(d.p_mean, d.p_std)
    else:
        sampler = UniformTimestepSigma(denoiser.schedule)
    return DiffusionLoss(sampler, d.loss_weighting, d.min_snr_gamma, d.noise_offset)


def drop_mask(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool: which examples lose their condition (CFG's condition dropout, Ho & Salimans 2022);
    drawn on the CPU from ``generator`` so cached and uncached runs drop the same examples."""
    return torch.rand(n, generator=generator) < p if p > 0 else torch.zeros(n, dtype=torch.bool)


def batch_to_cond(config: RunConfig, batch: dict, device, generator: torch.Generator,
                  text_encoder=None) -> dict | None:
    """Condition dict for a batch, with condition dropout (p = cond_drop_prob) for CFG: a dropped
    class becomes the null class, a dropped caption the empty prompt."""
    kind = config.data.conditioning
    if kind == "none":
        return None
    drop = drop_mask(batch["x"].shape[0], config.train.cond_drop_prob, generator)
    if kind == "caption":
        captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
        return text_cond(text_encoder, captions)
    labels = batch["label"].to(device).long()
    labels = torch.where(drop.to(device), torch.full_like(labels, -1), labels)
    return class_cond(labels, device)


@contextmanager
def _stop_on_signals(flag: threading.Event):
    """Turn SIGINT/SIGTERM into a flag checked at step boundaries (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def handler(signum, frame):
        if flag.is_set():  # a second signal: give up at once
            raise KeyboardInterrupt
        flag.set()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Trainer:
    """Holds the model, optimizer, EMA and RNGs of one run; :meth:`run` trains it."""

    def __init__(self, config: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 overwrite: bool = False):
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        prepare_run_dir(self.run_dir, resume=resume, overwrite=overwrite)  # before any work
        t = config.train
        if t.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown lr_schedule {t.lr_schedule!r}; valid: constant, cosine")
        if t.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"unknown precision {t.precision!r}; valid: auto, fp32, bf16, fp16")
        if t.grad_accum < 1 or t.batch_size < 1:
            raise ValueError("train.batch_size and train.grad_accum must be >= 1")
        self.device = resolve_device(t.device)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.config = config = with_text_width(config)  # a frozen text encoder's width, if context_dim is unset
        check_conditioning(config)
        self.space = training_space(config, self.run_dir, resume=resume, device=self.device)  # pixels or latents
        self.dataset: Dataset = dataset_for(config.data)
        torch.manual_seed(t.seed)
        self.denoiser = build_denoiser(config).to(self.device)
        self.ema = EMA(self.denoiser.net, t.ema_decay)
        self.text = self.text_ema = None
        self.text_fingerprint = None
        if config.text.kind == "hf":  # frozen and pretrained: recorded by folder and SHA-256, never trained or saved
            self.text_fingerprint = fingerprint(config.text.path)
            self.text = build_text_encoder(config).to(self.device)
        elif config.text.kind != "none":  # trained with the U-Net; its vocabulary is read off the captions
            ckpt = latest_checkpoint(self.run_dir) if resume else None
            if ckpt is None and t.init_from:  # fine-tuning keeps the vocabulary its embeddings were trained on
                ckpt = resolve_checkpoint(t.init_from)
            tok_file = ckpt / TEXT_FILES["tokenizer"] if ckpt is not None else None
            tokenizer = (WordTokenizer.load(tok_file) if tok_file is not None and tok_file.is_file() else
                         WordTokenizer.build(caption_corpus(self.dataset), config.text.max_length))
            self.text = build_text_encoder(config, tokenizer).to(self.device)
            self.text_ema = EMA(self.text, t.ema_decay)
        self.opt = adamw(self.trainable_parameters(), t)
        self.loss_fn = make_loss(config, self.denoiser)
        self.amp_dtype = autocast_dtype(t.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.noise_gen = torch.Generator(device=self.device).manual_seed(t.seed + 1)
        self.cond_gen = torch.Generator().manual_seed(t.seed + 2)
        self._compile_pending = bool(t.compile)
        if t.compile:  # an instance attribute: state_dict keys, the EMA copy and exports are unaffected
            self.denoiser.net.forward = torch.compile(self.denoiser.net.forward)
        self.order = DataOrder(len(self.dataset), config.data.seed, shuffle=config.data.kind != "shapes")
        self.positions = RunPositions(self.dataset, self.order)
        if t.num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0, got {t.num_workers}")
        if t.cache_epochs < 0:
            raise ValueError(f"train.cache_epochs must be >= 0, got {t.cache_epochs}")
        if t.cache_epochs and (config.text.kind == "hf" or config.latent.sample_posterior):
            raise ValueError("train.cache_epochs caches latents and tokenized captions of a trained text encoder; "
                             "it does not support text.kind = 'hf' or latent.sample_posterior: set it to 0")
        self.cache = None  # built at the first step (train/cache.py)
        self._batches, self._next_batch = None, None
        self.step = 0
        self.elapsed = 0.0
        if resume:
            self._resume()
        elif t.init_from:
            self._init_from(t.init_from)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(config.to_json())

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        trained_text = self.text_ema is not None  # a frozen text encoder has no EMA and no trainable parameters
        return list(self.denoiser.net.parameters()) + (list(self.text.parameters()) if trained_text else [])

    # -- state ---------------------------------------------------------------
    def _init_from(self, path: str) -> None:
        """Start from another model's EMA weights (U-Net and trained text encoder; a fresh optimizer
        at step 0): the architecture, diffusion and text settings must be the same, except that this
        run may add ``model.pos_embed``, whose zero-initialised projections keep their start values
        (the fine-tune begins as the same function and learns to use positions), may add
        ``text.pooled`` (with ``model.adm_in_channels``), whose new embedding ends in a zero-initialised
        layer for the same reason, and may train on another noise-level distribution or loss weighting
        (they shape the objective, not the model)."""
        ckpt = resolve_checkpoint(path)
        other = from_dict(read_json(ckpt / "config.json"))
        m = self.config.model
        add_pos = m.pos_embed and not other.model.pos_embed
        if add_pos:
            other.model = dataclasses.replace(other.model, pos_embed=True)
        add_pooled = self.config.text.pooled and not other.text.pooled and other.model.adm_in_channels is None
        if add_pooled:
            other.model = dataclasses.replace(other.model, adm_in_channels=m.adm_in_channels)
            other.text = dataclasses.replace(other.text, pooled=True)
        d = self.config.diffusion
        other.diffusion = dataclasses.replace(other.diffusion,
                                              **{f: getattr(d, f) for f in d.OBJECTIVE_FIELDS})
        may_differ = {"model": "model.pos_embed, and model.adm_in_channels with text.pooled, may be switched on",
                      "diffusion": f"only {', '.join(d.OBJECTIVE_FIELDS)} may differ",
                      "text": "only text.pooled may be switched on"}
        for section, allowed in may_differ.items():
            if getattr(other, section) != getattr(self.config, section):
                raise CheckpointError(f"train.init_from: the [{section}] config of {ckpt} differs from this run's; "
                                      f"fine-tuning needs the same architecture (start from its config.json; "
                                      f"{allowed})")
        pairs = [(self.denoiser.net, self.ema, "ema.safetensors")]
        if self.text_ema is not None:
            pairs.append((self.text, self.text_ema, TEXT_FILES["ema"]))
        for module, ema, name in pairs:
            weights = load_tensors(ckpt / name)
            if module is self.denoiser.net:
                new = (".pos_proj.",) * add_pos + ("label_emb.",) * add_pooled
                weights.update({k: v for k, v in module.state_dict().items() if any(n in k for n in new)})
            load_state_strict(module, weights, str(ckpt))
            load_state_strict(ema.shadow, weights, str(ckpt))
            ema.num_updates = 10**6  # the average starts at these weights with the full decay, no warm-up

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {self.run_dir}")
        saved = from_dict(read_json(ckpt / "config.json"))
        if saved.model != self.config.model or saved.diffusion != self.config.diffusion:
            raise CheckpointError(f"--resume: the model/diffusion config differs from the one in {ckpt}; "
                                  "resume with the run's own config (omit --preset/--config)")
        load_state_strict(self.denoiser.net, load_tensors(ckpt / "model.safetensors"), str(ckpt))
        load_state_strict(self.ema.shadow, load_tensors(ckpt / "ema.safetensors"), str(ckpt))
        if self.text_ema is not None:
            load_state_strict(self.text, load_tensors(ckpt / TEXT_FILES["model"]), str(ckpt))
            load_state_strict(self.text_ema.shadow, load_tensors(ckpt / TEXT_FILES["ema"]), str(ckpt))
        if self.text_fingerprint is not None and \
                read_json(ckpt / FROZEN_TEXT_FILE).get("sha256") != self.text_fingerprint["sha256"]:
            raise CheckpointError(f"--resume: the text encoder in {self.config.text.path} is not the one {ckpt} was "
                                  f"trained with (see {ckpt / FROZEN_TEXT_FILE})")
        state = read_json(ckpt / "state.json")
        tensors = load_tensors(ckpt / "state.safetensors")
        load_optimizer(self.opt, tensors, state["param_groups"])
        self.noise_gen.set_state(tensors["rng.noise"])
        self.cond_gen.set_state(tensors["rng.cond"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        truncate_log(self.run_dir / "log.jsonl", self.step)  # entries after the checkpoint are written again
        self.ema.num_updates = state["ema_updates"]
        if self.text_ema is not None:
            self.text_ema.num_updates = state["ema_updates"]

    def save(self) -> Path:
        opt_tensors, groups = optimizer_tensors(self.opt)
        opt_tensors.update({"rng.noise": self.noise_gen.get_state(), "rng.cond": self.cond_gen.get_state(),
                            "rng.torch": torch.get_rng_state()})
        files = {
            "model.safetensors": self.denoiser.net.state_dict(),
            "ema.safetensors": self.ema.shadow.state_dict(),
            "state.safetensors": opt_tensors,
            "state.json": {"step": self.step, "elapsed_s": self.elapsed, "ema_updates": self.ema.num_updates,
                           "param_groups": groups},
            "config.json": self.config.to_dict(),
        }
        if self.text_fingerprint is not None:
            files[FROZEN_TEXT_FILE] = self.text_fingerprint
        elif self.text is not None:
            files[TEXT_FILES["model"]] = self.text.state_dict()
            files[TEXT_FILES["ema"]] = self.text_ema.shadow.state_dict()
            files[TEXT_FILES["tokenizer"]] = self.text.tokenizer.to_json()
        path = write_checkpoint(self.run_dir, self.step, files)
        prune_checkpoints(self.run_dir, self.config.train.keep_checkpoints)
        return path

    # -- one step ------------------------------------------------------------
    def progress_fraction(self, step: int) -> float:
        """How far the run is, in [0, 1]: by steps, or by the time budget if that comes first."""
        t = self.config.train
        frac = step / max(1, t.max_steps)
        if t.time_budget_s:
            frac = max(frac, self.elapsed / t.time_budget_s)
        return min(1.0, frac)

    def lr_at(self, step: int) -> float:
        """Linear warmup, then constant or cosine decay to ``lr_min_ratio * lr`` (Loshchilov & Hutter 2017)."""
        t = self.config.train
        lr = t.lr * min(1.0, (step + 1) / max(1, t.warmup_steps))
        if t.lr_schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * self.progress_fraction(step)))
            lr *= t.lr_min_ratio + (1 - t.lr_min_ratio) * decay
        return lr

    def get_batch(self, step: int, micro: int) -> dict:
        """Micro-batch ``micro`` of ``step``: from the worker processes when train.num_workers > 0
        (they run ahead of the training step), else read here; the same items either way."""
        t = self.config.train
        if t.num_workers > 0:
            if self._batches is None or self._next_batch != (step, micro):
                self._start_workers(step)
            batch = next(self._batches)
            self._next_batch = (step, micro + 1) if micro + 1 < t.grad_accum else (step + 1, 0)
            return batch
        start = (step * t.grad_accum + micro) * t.batch_size
        return default_collate([self.positions[start + j] for j in range(t.batch_size)])

    def cached_batch(self, step: int, micro: int) -> tuple[torch.Tensor, dict | None]:
        """``(x0, cond)`` of micro-batch ``micro`` from the device cache (train.cache_epochs), with the
        condition dropout :func:`batch_to_cond` applies, drawn from the same generator."""
        t, kind = self.config.train, self.config.data.conditioning
        if self.cache is None:
            from .cache import EncodedCache

            tokenize = None
            if kind == "caption":
                tokenize = lambda caps: self.text.tokenize(list(caps) + [""])  # noqa: E731 - last row: empty prompt
            size = min(t.cache_epochs * len(self.dataset), t.max_steps * t.grad_accum * t.batch_size)
            self.cache = EncodedCache(self.positions, size, device=self.device,
                                      item_shape=self.space.latent_shape(self.config.data.resolution),
                                      encode=lambda x: self.space.encode(x, generator=self.noise_gen),
                                      tokenize=tokenize, num_workers=t.num_workers,
                                      log=lambda m: print(m, flush=True))
        batch = self.cache.batch((step * t.grad_accum + micro) * t.batch_size, t.batch_size)
        if kind == "none":
            return batch["x0"], None
        drop = drop_mask(t.batch_size, t.cond_drop_prob, self.cond_gen).to(self.device, non_blocking=True)
        if kind == "caption":
            rows = torch.where(drop, torch.full_like(batch["slots"], self.cache.size), batch["slots"])
            return batch["x0"], self.text.encode_tokens(self.cache.tokens.rows(rows)).as_cond(
                pooled=self.text.feeds_pooled)
        return batch["x0"], class_cond(torch.where(drop, torch.full_like(batch["label"], -1), batch["label"]),
                                       self.device)

    def _start_workers(self, step: int) -> None:
        from torch.utils.data import DataLoader

        t = self.config.train
        loader = DataLoader(self.positions, batch_sampler=batch_positions(
            step, t.grad_accum, t.batch_size), num_workers=t.num_workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=4)
        self._batches, self._next_batch = iter(loader), (step, 0)

    def train_step(self) -> torch.Tensor:
        """One optimizer step (all micro-batches); returns the loss (a 0-d device tensor). With
        train.compile the first step compiles the U-Net; if that fails (no C++ compiler, an unsupported op) the step is redone
        eagerly, from the same random state, and training goes on without compilation."""
        if not self._compile_pending:
            return self._train_step()
        self._compile_pending = False
        rng = self.noise_gen.get_state(), self.cond_gen.get_state()
        try:
            return self._train_step()
        except TrainingDiverged:
            raise
        except Exception as e:  # noqa: BLE001 - any compiler failure; a real error recurs eagerly below
            del self.denoiser.net.forward  # back to the class's eager forward
            self.opt.zero_grad(set_to_none=True)
            self.noise_gen.set_state(rng[0])
            self.cond_gen.set_state(rng[1])
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"train.compile: torch.compile failed ({type(e).__name__}: {reason}); "
                          "training without it", RuntimeWarning, stacklevel=2)
            return self._train_step()

    def _train_step(self) -> torch.Tensor:
        """One optimizer step; returns its loss as a 0-d tensor on the training device, read by
        :meth:`run` only where it logs or checkpoints (a non-finite one stops the run there)."""
        t = self.config.train
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.denoiser.train()
        if self.text is not None:
            self.text.train()
        total = 0.0
        for micro in range(t.grad_accum):
            if t.cache_epochs:
                x0, cond = self.cached_batch(self.step, micro)
            else:
                batch = self.get_batch(self.step, micro)
                x0 = self.space.encode(batch["x"].to(self.device), generator=self.noise_gen)
                cond = batch_to_cond(self.config, batch, self.device, self.cond_gen, self.text)
            ctx = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext())
            with ctx:
                loss = self.loss_fn(self.denoiser, x0, cond, generator=self.noise_gen).mean() / t.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total = total + loss.detach().float()  # stays on the device: no synchronisation per micro-batch
        if self.scaler:
            self.scaler.unscale_(self.opt)
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), t.grad_clip)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.denoiser.net)
        if self.text_ema is not None:
            self.text_ema.update(self.text)
        self.step += 1
        return total

    # -- periodic outputs ----------------------------------------------------
    def ema_denoiser(self) -> Denoiser:
        den = build_denoiser(self.config).to(self.device)
        den.net.load_state_dict(self.ema.shadow.state_dict())
        return den.eval()

    def sample_grid(self) -> Path:
        t, s, d = self.config.train, self.config.sample, self.config.data
        n = t.sample_n
        cond = uncond = None
        guidance = 1.0
        if d.conditioning == "class":
            cond = class_cond([i % self.config.model.num_classes for i in range(n)], self.device)
            uncond, guidance = class_cond([-1] * n, self.device), s.guidance_scale
        elif d.conditioning == "caption":
            with torch.no_grad():
                text = self.text_ema.shadow if self.text_ema is not None else self.text  # frozen: no EMA
                cond = text_cond(text, [self.dataset[self.order(i)]["caption"] for i in range(n)])
                uncond, guidance = text_cond(text, [""] * n), s.guidance_scale
        den = self.ema_denoiser()
        x = sample(den, self.space.latent_shape(d.resolution), n, cond=cond, uncond=uncond, sampler=s.sampler,
                   schedule=s.schedule, steps=s.steps, rho=s.rho, guidance_scale=guidance, seed=0)
        x = decode_samples(self.space, x)
        grid = make_grid(to_uint8(x[:, :3]))
        return save_png(self.run_dir / "samples" / f"step-{self.step:07d}.png", upscale(grid, 2))

    # -- the loop ------------------------------------------------------------
    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train until ``max_steps`` (default: config), the time budget, or a signal."""
        t = self.config.train
        max_steps = t.max_steps if max_steps is None else max_steps
        stop = threading.Event()
        losses: list[float] = []
        log_path = self.run_dir / "log.jsonl"
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        status = "finished"
        imgs = 0
        t_run = first_step_s = 0.0
        pending: list[torch.Tensor] = []  # losses of steps not yet read back from the device
        first = self.step

        def check() -> None:
            """Read the pending losses (one synchronisation) and stop at the first non-finite one,
            before anything is logged or saved from the weights it produced."""
            if not pending:
                return
            values = torch.stack(pending).tolist()
            pending.clear()
            for i, v in enumerate(values):
                if not math.isfinite(v):
                    raise TrainingDiverged(
                        f"loss became {v} at step {first + len(losses) + i}; training stopped. The last good "
                        f"checkpoint in {self.run_dir} is intact. Lower train.lr, raise train.warmup_steps, "
                        "or use precision = 'fp32'.")
            losses.extend(values)

        with _stop_on_signals(stop), open(log_path, "a") as log:
            while self.step < max_steps:
                if t.time_budget_s is not None and self.elapsed >= t.time_budget_s:
                    status = "budget"
                    break
                t0 = time.perf_counter()
                pending.append(self.train_step())
                dt = time.perf_counter() - t0
                first_step_s = first_step_s or dt
                self.elapsed += dt
                t_run += dt
                imgs += t.batch_size * t.grad_accum
                ips = imgs / max(t_run, 1e-9)
                logging = self.step % t.log_every == 0 or self.step == max_steps
                saving = bool(t.ckpt_every and self.step % t.ckpt_every == 0)
                if logging or saving or bar is not None and self.step % 10 == 0:
                    check()
                if bar is not None:
                    bar.update(1)
                    post = {"loss": f"{losses[-1]:.4f}", "img_s": f"{ips:.1f}"} if losses else {}
                    if t.time_budget_s:  # the bar's own ETA assumes max_steps; the budget may end sooner
                        post["budget_left"] = f"{max(0.0, t.time_budget_s - self.elapsed):.0f}s"
                    bar.set_postfix(post, refresh=False)
                if logging:
                    log.write(json.dumps({"step": self.step, "loss": losses[-1], "lr": self.lr_at(self.step - 1),
                                          "images_per_s": ips, "elapsed_s": self.elapsed}) + "\n")
                    log.flush()
                if saving:
                    self.save()
                if t.sample_every and self.step % t.sample_every == 0:
                    self.sample_grid()
                if stop.is_set():
                    status = "interrupted"
                    break
            check()
        if bar is not None:
            bar.close()
        self._batches = None  # ends the worker processes, if any
        last = latest_checkpoint(self.run_dir)
        if last is None or last.name != f"ckpt-{self.step:07d}":
            self.save()
        return TrainResult(self.run_dir, self.step, status, losses, imgs / max(t_run, 1e-9), self.elapsed, first_step_s)


def train(config: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          max_steps: int | None = None, overwrite: bool = False) -> TrainResult:
    """Train ``config`` into ``run_dir`` (see :class:`Trainer`)."""
    return Trainer(config, run_dir, resume=resume, progress=progress, overwrite=overwrite).run(max_steps)
