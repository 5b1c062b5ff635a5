"""Stable Diffusion text-to-image (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models") from sumie's own parts.

    prompt -> CLIP conditioner (sumie.text) -> context
    noise  -> sampler(CFG(DiscreteDenoiser(U-Net))) over the model's sigmas -> latent
    latent -> / scaling_factor -> VAE decoder -> uint8 image

The checkpoint stays a lazy, memory-mapped :class:`~sumie.io.sd.SDCheckpoint`; each stage
(text encoders, U-Net, autoencoder) is built when it is needed and freed right after, so
at most one stage's weights are resident (safetensors pages are mapped, not copied); on CUDA
the stages are kept between calls instead (``keep_loaded``), so only the first call uploads them.
LoRAs are checked against the model when loaded and merged into (or hooked onto) each
stage as it is built.

The discrete schedule is the one the model was trained on: the betas of the diffusers
``scheduler_config.json`` (SD's ``scaled_linear`` 0.00085..0.012 for single files). The default
sampling timesteps are those diffusers' scheduler class for the chosen sampler takes from that
file, with the class's own defaults for keys the file lacks (:mod:`sumie.io.sd.scheduler`: SD 1.5's
config has no ``timestep_spacing``, so Euler spaces "linspace", DDIM "leading" + 1, DPM-Solver++
n + 1 intervals); single files use A1111's and ComfyUI's default. Where diffusers' last step ends
at timestep 0's noise level (DDIM/PNDM with ``set_alpha_to_one=False``, DEIS), so does sumie's.

Intentional differences from diffusers' ``StableDiffusionPipeline``:

* initial noise: x_T = z * sqrt(1 + sigma_0^2), the VP-consistent start (the std of
  x0 + sigma_0 eps for unit-variance latents), for every sampler and spacing. diffusers does
  the same for DDIM and for Euler with "leading" spacing, but starts Euler at z * sigma_0
  for "linspace"/"trailing" (its ``init_noise_sigma``); pass the same initial latents to
  compare (the tests do).
* the remaining per-sampler differences are listed in the README ("Parity with diffusers").
* the sampler's model input is c_in * x with c_noise = t(sigma) interpolated in log-sigma
  (k-diffusion's convention); on the scheduler's own timesteps this is t itself.
* prompts are weighted and split into 75-token windows as in A1111 (``sumie.text.prompt``);
  for prompts of one window without weights the encoding equals diffusers'.
* diffusers folders of SD 2.x store OpenCLIP-H cut after its penultimate block and read the
  stored tower's last block; a folder's tower is read that way whatever its size.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
from pathlib import Path
from typing import Callable

import torch

from ..diffusion.precond import DiscreteDenoiser
from ..diffusion.schedules import DiscreteSchedule, append_zero, discrete_sigmas, make_betas, rescale_zero_terminal_snr
from ..io.checkpoint import CheckpointError, on_meta
from ..io.sd import SDCheckpoint, load_sd
from ..io.sd.scheduler import config_sigmas, resolve_scheduler
from ..io.sd.lora import LoraDelta, apply_deltas, read_lora, resolve_all
from ..io.sd.tensors import drop_pages, materialize
from ..nn.unet import UNet
from ..pipeline import sigmas_for
from ..samplers import generators_for, randn
from ..text.clip_tokenizer import ClipTokenizer
from ..text.conditioner import SDTextConditioner, family_towers

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "timestep_spacing": "leading", "steps_offset": 1, "rescale_betas_zero_snr": False}


def scheduler_schedule(cfg: dict) -> DiscreteSchedule:
    """The training schedule a diffusers ``scheduler_config.json`` describes."""
    cfg = {**SD_SCHEDULER, **cfg}
    if cfg.get("trained_betas"):
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
    else:
        betas = make_betas(cfg["beta_schedule"], cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"])
    if cfg["rescale_betas_zero_snr"]:
        betas = rescale_zero_terminal_snr(betas)
    return DiscreteSchedule.from_betas(betas)


def scheduler_sigmas(schedule: DiscreteSchedule, steps: int, spacing: str = "leading", offset: int = 1) -> torch.Tensor:
    """The noise levels of diffusers' schedulers for ``steps`` steps: its timestep spacing
    (with ``steps_offset`` for "leading", as in DDIM/Euler ``set_timesteps``), plus a final 0."""
    if spacing != "leading" or offset == 0:
        return discrete_sigmas(schedule, steps, spacing)
    T = schedule.num_steps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    ts = (torch.arange(steps) * (T // steps) + offset).clamp(max=T - 1).flip(0)
    return append_zero(schedule.sigmas[ts])


def free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``): a finished
    stage's activations otherwise stay in the allocator's arenas and count towards peak memory."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def stream_blocks(unet: UNet, fraction: float = 1.0) -> list:
    """Forward hooks that drop a U-Net block's memory-mapped weight pages after the block has run
    (:func:`~sumie.io.sd.tensors.drop_pages`), for the first blocks in running order (input
    blocks, middle, output blocks) that hold ``fraction`` of the weights; remove them after.

    With ``fraction = 1`` at most one block's weights are resident; each step then reads every
    weight page again from the page cache (~3% of a CPU step for SD 1.5). A smaller fraction
    trades memory for that cost: the peak falls by about the streamed bytes less the largest
    streamed block."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"stream fraction must be in [0, 1], got {fraction}")
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    sizes = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks]
    budget, chosen, acc = fraction * sum(sizes), [], 0
    for block, size in zip(blocks, sizes):
        if acc >= budget:
            break
        chosen.append(block)
        acc += size

    def after(module, args, output) -> None:  # a forward hook must return None to keep the output
        drop_pages(module.parameters())

    return [b.register_forward_hook(after) for b in chosen]


def auto_stream_fraction(checkpoint: SDCheckpoint) -> float:
    """How much of the U-Net to stream on CPU by default: all of it when its weights would take more
    than a quarter of the memory available now (or that cannot be read: not Linux), so a laptop
    holds one block at a time; else the first fifth, which takes the peak below three quarters of
    a copying loader's at under 1% of the step time (benchmarks/sd_perf.py)."""
    weights = sum(math.prod(r.shape) for r in checkpoint.unet.values()) * 4  # fp32 bytes
    try:
        with open("/proc/meminfo") as fh:
            available = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 1.0
    return 1.0 if weights > available / 4 else 0.2


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to trim
        return None


_LIBC = _glibc()


class StableDiffusion:
    """Text-to-image with a Stable Diffusion 1.x / 2.x / XL checkpoint (see module docstring)."""

    def __init__(self, checkpoint: SDCheckpoint, *, tokenizer: ClipTokenizer | None = None,
                 scheduler: dict | None = None, text_folder: Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, vae_tile: int | None = None, keep_loaded: bool | None = None,
                 stream_weights: bool | float | None = None):
        c, z = checkpoint.unet_config.in_channels, checkpoint.vae_config.embed_dim
        if c not in (z, 2 * z + 1):  # latents, or inpainting's latents + mask + masked-image latents
            raise CheckpointError(f"{checkpoint.family.title} (U-Net with {c} input channels) does not fit its "
                                  f"{z}-channel VAE; this pipeline needs {z} or {2 * z + 1} (inpainting) channels")
        self.checkpoint = checkpoint
        self.family = checkpoint.family.name
        self.tokenizer, self.text_folder = tokenizer, text_folder
        self.scheduler = {**SD_SCHEDULER, **(scheduler or {})}
        # the folder's own scheduler_config.json as written (None: a single file, A1111/ComfyUI defaults)
        self.scheduler_file = scheduler
        # SDXL's model_index.json: an empty negative prompt is all zeros (hidden and pooled), not "" encoded
        self.zeros_for_empty_negative = False
        self.schedule = scheduler_schedule(self.scheduler)
        self.device, self.dtype = torch.device(device), dtype
        self.vae_tile = vae_tile  # latent tile size for tiled VAE decoding (None: whole image)
        self.loras: list[LoraDelta] = []
        self.merge_loras: list[bool] = []
        # keep each stage's modules between calls (default on CUDA, where a call should not re-upload
        # the weights); on CPU they are freed after each stage, which bounds peak memory
        self.keep_loaded = self.device.type == "cuda" if keep_loaded is None else keep_loaded
        self._stages: dict[str, torch.nn.Module] = {}
        # CPU: the U-Net's memory-mapped weights leave memory after each block has run (stream_blocks)
        # and are read again from the page cache next step. A float streams that fraction of the weights
        # (the first blocks); False or 0 keeps all resident; None: auto_stream_fraction on CPU.
        if stream_weights is None:
            stream_weights = auto_stream_fraction(self.checkpoint) if self.device.type == "cpu" else 0.0
        self.stream_weights = float(stream_weights)
        if not 0.0 <= self.stream_weights <= 1.0:
            raise ValueError(f"stream_weights must be a bool or a fraction in [0, 1], got {stream_weights!r}")

    def _stage(self, name: str, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """Stage ``name`` built now, or kept from an earlier call when ``keep_loaded``."""
        if not self.keep_loaded:
            return build()
        if name not in self._stages:
            self._stages[name] = build()
        return self._stages[name]

    def _stage_done(self) -> None:
        """A stage's modules were dropped: give their memory back (nothing to do if they are kept)."""
        if not self.keep_loaded:
            free_memory()

    def unload(self) -> None:
        """Drop the stages kept by ``keep_loaded`` (they are built again when next needed)."""
        self._stages.clear()
        free_memory()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, vae: str | Path | None = None, allow_pickle: bool = False,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        tokenizer: ClipTokenizer | str | Path | None = None, prediction: str | None = None,
                        vae_tile: int | None = None, text_encoders: dict[str, str | Path] | None = None,
                        keep_loaded: bool | None = None, stream_weights: bool | float | None = None
                        ) -> "StableDiffusion":
        """A single file, diffusers folder or sumie folder (:func:`sumie.io.sd.load_sd`). Single
        files carry no tokenizer: give ``tokenizer`` (a ``tokenizer/`` folder or a ClipTokenizer),
        else CLIP's BPE file is looked up (``ClipTokenizer.from_openai_bpe``). ``vae`` and
        ``text_encoders`` ({slot: file}, slots as in :mod:`sumie.io.sd.families`) replace the
        checkpoint's own; text encoders are checked against the U-Net's cross-attention first.
        ``keep_loaded`` keeps the built stages between calls (default: on CUDA only);
        ``stream_weights`` keeps at most one U-Net block's mapped weights resident (default: on CPU;
        a fraction streams only the first blocks holding that share of the weights)."""
        path = Path(path)
        sd = load_sd(path, allow_pickle=allow_pickle, prediction=prediction, vae=vae, text_encoders=text_encoders)
        scheduler, text_folder = None, None
        if path.is_dir() and (path / "model_index.json").is_file():
            cfg = path / "scheduler" / "scheduler_config.json"
            scheduler = json.loads(cfg.read_text()) if cfg.is_file() else {}
            if all((path / s.diffusers).is_dir() for s in family_towers(sd.family.name)) and not text_encoders:
                text_folder = path  # else the towers are built from sd.text_encoders, overrides included
        if isinstance(tokenizer, (str, Path)):
            tokenizer = ClipTokenizer.from_folder(tokenizer)
        elif tokenizer is None and text_folder is None:
            tok = path / "tokenizer" if path.is_dir() else None
            tokenizer = ClipTokenizer.from_folder(tok) if tok is not None and tok.is_dir() else \
                ClipTokenizer.from_openai_bpe()
        pipe = cls(sd, tokenizer=tokenizer, scheduler=scheduler, text_folder=text_folder, device=device, dtype=dtype,
                   vae_tile=vae_tile, keep_loaded=keep_loaded, stream_weights=stream_weights)
        if path.is_dir() and (path / "model_index.json").is_file():
            index = json.loads((path / "model_index.json").read_text())
            pipe.zeros_for_empty_negative = bool(index.get("force_zeros_for_empty_prompt", False))
        return pipe

    # ------------------------------------------------------------ stages

    def build_text(self) -> SDTextConditioner:
        """The CLIP conditioner, with LoRAs applied."""
        kw = dict(dtype=self.dtype, device=self.device)
        if self.text_folder is not None:
            cond = SDTextConditioner.from_diffusers(self.family, self.text_folder, tokenizer=self.tokenizer, **kw)
            if self.tokenizer is not None:
                for e, spec in zip(cond.encoders, family_towers(self.family)):
                    e.tokenizer = self.tokenizer.with_padding(spec.pad_with_eos)
            if self.family.startswith("sd2"):  # the folder's tower is already cut (module docstring)
                for e in cond.encoders:
                    if e.tower.config.full_depth is None:
                        e.tower.config.full_depth = e.tower.config.num_hidden_layers + 1
        else:
            specs = family_towers(self.family)
            missing = [s.diffusers for s in specs if s.diffusers not in self.checkpoint.text_encoders]
            if missing:
                raise CheckpointError(f"{self.checkpoint.source} holds no text encoder {missing}; load one with "
                                      "load_sd(..., text_encoders={...})")
            sd = {}
            for i, s in enumerate(specs):
                w = self.checkpoint.text_encoders[s.diffusers].in_layout(s.layout)
                sd.update({f"{i}.{k}": t for k, t in materialize(w).items()})
            cond = SDTextConditioner.from_state_dict(self.family, sd, self.tokenizer,
                                                     prefixes=tuple(f"{i}." for i in range(len(specs))), **kw)
            for e, s in zip(cond.encoders, specs):  # a tower stored already cut: read its last block
                if self.checkpoint.text_encoders[s.diffusers].cut:
                    e.tower.config.full_depth = e.tower.config.num_hidden_layers + 1
        self._apply(self._text_models(cond))
        return cond

    def _text_models(self, cond: SDTextConditioner) -> dict:
        return {s.diffusers: e.tower for s, e in zip(family_towers(self.family), cond.encoders)}

    def build_unet(self, meta: bool = False) -> UNet:
        """The U-Net (on the meta device: structure only, for checking LoRAs), with LoRAs applied."""
        if meta:
            with on_meta():
                return UNet(self.checkpoint.unet_config)
        unet = self.checkpoint.build_unet(self.dtype, self.device)
        self._apply({"unet": unet})
        return unet

    def _apply(self, models: dict) -> None:
        for merge in (True, False):
            deltas = [d for d, m in zip(self.loras, self.merge_loras) if m == merge and d.component in models]
            if deltas:
                apply_deltas(models, deltas, merge=merge, backup=False)

    def load_lora(self, path: str | Path, strength: float = 1.0, merge: bool = True) -> int:
        """Read a LoRA (kohya or diffusers/PEFT layout, :mod:`sumie.io.sd.lora`), check every key
        against this model now, and apply it to each stage it touches from the next call on;
        several LoRAs add up. Returns the number of layers it adapts."""
        lora = read_lora(path)
        models = {"unet": self.build_unet(meta=True)}
        if any(c != "unet" for c, _ in lora.pairs):
            cond = self.build_text_plain()
            models.update(self._text_models(cond))
        deltas = resolve_all(models, [(lora, strength)])
        self.loras += deltas
        self.merge_loras += [merge] * len(deltas)
        self.unload()  # kept stages lack the new LoRA
        return len(deltas)

    def build_text_plain(self) -> SDTextConditioner:
        saved, self.loras, self.merge_loras = (self.loras, self.merge_loras), [], []
        try:
            return self.build_text()
        finally:
            self.loras, self.merge_loras = saved

    def clear_loras(self) -> None:
        self.loras, self.merge_loras = [], []
        self.unload()

    # ------------------------------------------------------------ sampling

    def sigmas(self, steps: int, schedule: str | None = None, denoiser: DiscreteDenoiser | None = None,
               sampler: str = "euler") -> tuple[torch.Tensor, float]:
        """(sampling noise levels, final noise level): by default the timesteps diffusers' scheduler
        class for ``sampler`` takes from the folder's config (single files: A1111/ComfyUI's,
        :mod:`sumie.io.sd.scheduler`); leading/linspace/trailing override only its spacing; any
        other name is a sumie schedule."""
        if schedule is None or schedule in ("leading", "linspace", "trailing"):
            cfg = resolve_scheduler(self.scheduler_file, sampler)
            if schedule is not None:
                cfg.update(timestep_spacing=schedule, kind="ddim" if cfg["kind"] == "normal" else cfg["kind"])
            return config_sigmas(self.schedule, steps, cfg)
        return sigmas_for(denoiser, schedule, steps), 0.0

    def initial_noise(self, n: int, height: int, width: int, sigma_max: float, seed: int) -> torch.Tensor:
        """x_T = z * sqrt(1 + sigma_max^2), z ~ N(0, I) per sample from seeds seed .. seed+n-1; (n, C, h, w)."""
        f = self.checkpoint.vae_config.downsampling_factor
        c = self.checkpoint.vae_config.embed_dim  # latent channels (a 9-channel inpainting U-Net takes more)
        z = randn((n, c, height // f, width // f), generators_for(seed, n))
        return z * (1 + sigma_max**2) ** 0.5

    @torch.inference_mode()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, n: int = 1, steps: int = 20,
                 guidance_scale: float = 7.5, sampler: str = "euler", schedule: str | None = None, seed: int = 0,
                 height: int | None = None, width: int | None = None, callback: Callable | None = None,
                 eta: float | None = None, order: int | None = None, round_timesteps: bool = False
                 ) -> torch.Tensor:
        """Images (n, H, W, 3) uint8; image i is seeded with seed + i. A list of prompts gives one
        image per prompt (n is then ignored). ``order``: the solver order of the samplers that take
        one (lms, deis, uni_pc, uni_pc_bh2); a diffusers scheduler name brings its own default
        (``UniPCMultistepScheduler``: 2). ``round_timesteps``: feed the U-Net the nearest integer
        timestep, as diffusers' DPM-Solver/UniPC/DEIS do with Karras sigmas (README, parity).
        Runs :func:`sumie.generation.generate`, the one pipeline."""
        from ..generation import GenerationRequest, SDFamily, generate

        req = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, n=n, steps=steps,
                                guidance_scale=guidance_scale, sampler=sampler, schedule=schedule, seed=seed,
                                height=height, width=width, callback=callback, eta=eta, order=order,
                                round_timesteps=round_timesteps)
        return torch.from_numpy(generate(SDFamily(self), req).images)
