"""Pixel space and latent space behind one ``encode``/``decode`` interface.

Latent diffusion (Rombach et al. 2022) trains the denoiser on ``z = (E(x) - shift) * scale``,
the posterior of a frozen KL autoencoder rescaled to about unit variance (sec. 4.3.2), and
decodes samples with ``D(z / scale + shift)``. Pixel-space models use the identity. The
training loop and the samplers only ever see a *space*: ``encode(x) -> z``,
``decode(z) -> x``, ``latent_shape(resolution)`` (the habit of edm2's
``training/encoders.py``), so nothing else knows which one is in use.

An autoencoder folder (written by ``sumie train-vae`` as ``RUN/vae``) holds ``vae.json``
(format tag and the :class:`~sumie.nn.vae.VAEConfig`, whose ``scaling_factor`` and
``shift_factor`` were measured on the training data) and ``vae.safetensors``. A latent
diffusion run keeps its own copy in ``RUN/vae`` so the run folder is self-contained.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import RunConfig, from_dict
from .io.checkpoint import (CKPT_RE, CheckpointError, load_state_strict, load_tensors, read_json, resolve_checkpoint,
                            write_folder)
from .nn.vae import AutoencoderKL, VAEConfig

VAE_FORMAT = "sumie-vae-1"
VAE_MANIFEST = "vae.json"
VAE_WEIGHTS = "vae.safetensors"
RUN_VAE_DIR = "vae"  # where a run (VAE training or latent diffusion) keeps its autoencoder
IMAGE_CHANNELS = 3


class PixelSpace:
    """The identity: the denoiser works on images (B, C, H, W) in [-1, 1]."""

    downsampling_factor = 1

    def __init__(self, channels: int = IMAGE_CHANNELS):
        self.channels = channels

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return (self.channels, resolution, resolution)

    def to(self, device) -> "PixelSpace":
        return self


class LatentSpace:
    """A frozen autoencoder: ``encode(x) = (mean or sample of E(x) - shift) * scale``, ``decode(z) = D(z / scale + shift)``."""

    def __init__(self, vae: AutoencoderKL, scale: float | None = None, shift: float | None = None,
                 sample_posterior: bool = False):
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(vae.config.scaling_factor if scale is None else scale)
        self.shift = float(vae.config.shift_factor if shift is None else shift)
        self.sample_posterior = sample_posterior

    @property
    def channels(self) -> int:
        return self.vae.config.embed_dim

    @property
    def downsampling_factor(self) -> int:
        return self.vae.downsampling_factor

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, c, H/f, W/f)."""
        post = self.vae.encode(x)
        z = post.sample(generator) if self.sample_posterior else post.mode()
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, c, h, w) -> images (B, 3, f h, f w) in about [-1, 1]."""
        return self.vae.decode(z / self.scale + self.shift)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        f = self.downsampling_factor
        if resolution % f:
            raise ValueError(f"data.resolution ({resolution}) must be a multiple of the autoencoder's "
                             f"downsampling factor {f}")
        return (self.channels, resolution // f, resolution // f)

    def to(self, device) -> "LatentSpace":
        self.vae.to(device)
        return self


Space = PixelSpace | LatentSpace


@torch.no_grad()
def decode_samples(space: Space, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Sampler output (N, c, h, w) in the space -> images (N, 3, H, W), decoded in batches."""
    if isinstance(space, PixelSpace):
        return x
    return torch.cat([space.decode(x[i: i + batch_size]) for i in range(0, x.shape[0], batch_size)])


# ---------------------------------------------------------------------------
# autoencoder folders
# ---------------------------------------------------------------------------

def save_vae(folder: str | Path, vae: AutoencoderKL | None = None, *, config: VAEConfig | None = None,
             state: dict[str, torch.Tensor] | None = None, extra: dict | None = None) -> Path:
    """Write an autoencoder folder (``vae.json`` + ``vae.safetensors``) atomically."""
    config = config or vae.config
    state = state if state is not None else vae.state_dict()
    manifest = {"format": VAE_FORMAT, "vae": config.to_dict(), **(extra or {})}
    return write_folder(folder, {VAE_MANIFEST: manifest, VAE_WEIGHTS: state})


def find_vae_folder(path: str | Path) -> Path:
    """An autoencoder folder, or a run folder holding one in ``vae/``."""
    path = Path(path)
    for cand in (path, path / RUN_VAE_DIR):
        if (cand / VAE_MANIFEST).is_file() and (cand / VAE_WEIGHTS).is_file():
            return cand
    if not path.exists():
        raise FileNotFoundError(f"latent.vae: no such autoencoder folder {str(path)!r}; train one with "
                                "`sumie train-vae --out DIR` and set latent.vae = 'DIR/vae'")
    raise FileNotFoundError(f"latent.vae: {str(path)!r} holds no autoencoder ({VAE_MANIFEST} and {VAE_WEIGHTS}, "
                            f"directly or in {RUN_VAE_DIR}/); is it a `sumie train-vae` run folder?")


def read_vae_config(path: str | Path) -> VAEConfig:
    folder = find_vae_folder(path)
    manifest = read_json(folder / VAE_MANIFEST)
    if manifest.get("format") != VAE_FORMAT:
        raise CheckpointError(f"{folder / VAE_MANIFEST}: format {manifest.get('format')!r} is not {VAE_FORMAT!r}")
    return VAEConfig(**manifest["vae"])


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> AutoencoderKL:
    """The autoencoder of a folder written by :func:`save_vae` (or a run folder holding one), in eval mode."""
    folder = find_vae_folder(path)
    vae = AutoencoderKL(read_vae_config(folder))
    load_state_strict(vae, {k: v.float() for k, v in load_tensors(folder / VAE_WEIGHTS).items()},
                      str(folder / VAE_WEIGHTS))
    return vae.to(device).eval()


# ---------------------------------------------------------------------------
# RunConfig -> space
# ---------------------------------------------------------------------------

def check_space(config: RunConfig, vae_config: VAEConfig | None) -> None:
    """The U-Net's channels and the data resolution must fit the space; the error says how."""
    m = config.model
    if vae_config is None:
        if m.in_channels != IMAGE_CHANNELS or m.out_channels != IMAGE_CHANNELS:
            raise ValueError(f"model.in_channels/out_channels ({m.in_channels}/{m.out_channels}) must be "
                             f"{IMAGE_CHANNELS} for a pixel-space run; for latent diffusion set latent.vae to an "
                             "autoencoder folder (`sumie train-vae`)")
        return
    c, f = vae_config.embed_dim, vae_config.downsampling_factor
    if m.in_channels != c or m.out_channels != c:
        raise ValueError(f"model.in_channels/out_channels ({m.in_channels}/{m.out_channels}) must equal the "
                         f"autoencoder's latent channels ({c}) in latent.vae = {config.latent.vae!r}; "
                         f"set model.in_channels = {c} and model.out_channels = {c}")
    if config.data.resolution % f:
        raise ValueError(f"data.resolution ({config.data.resolution}) must be a multiple of the autoencoder's "
                         f"downsampling factor {f}")


def training_space(config: RunConfig, run_dir: str | Path, *, resume: bool = False,
                   device: str | torch.device = "cpu") -> Space:
    """The space a run trains in; a latent run's autoencoder is copied into ``run_dir/vae``
    (on resume, that copy is used, so the run keeps the autoencoder it started with)."""
    if config.latent.vae is None:
        check_space(config, None)
        return PixelSpace(config.model.in_channels)
    own = Path(run_dir) / RUN_VAE_DIR
    if resume and (own / VAE_MANIFEST).is_file():
        source = own
    else:
        source = find_vae_folder(config.latent.vae)
    vae = load_vae(source)
    check_space(config, vae.config)
    if source.resolve() != own.resolve():
        save_vae(own, vae, extra={"source": str(source)})
    return LatentSpace(vae, sample_posterior=config.latent.sample_posterior).to(device)


def space_folder_for(ckpt: Path, config: RunConfig) -> Path:
    """Where a trained latent model's autoencoder is: in the model folder itself (exported), in the
    run folder's ``vae/`` (a ``ckpt-*`` folder), else at ``latent.vae``."""
    cands = [ckpt, ckpt / RUN_VAE_DIR]
    if CKPT_RE.match(ckpt.name):
        cands.append(ckpt.parent / RUN_VAE_DIR)
    for cand in cands:
        if (cand / VAE_MANIFEST).is_file() and (cand / VAE_WEIGHTS).is_file():
            return cand
    return find_vae_folder(config.latent.vae)


def load_space(path: str | Path, config: RunConfig | None = None, device: str | torch.device = "cpu") -> Space:
    """The space of a trained run, ``ckpt-*`` or exported model folder (pixel space when it has no ``latent.vae``)."""
    ckpt = resolve_checkpoint(path)
    config = config or from_dict(read_json(ckpt / "config.json"))
    if config.latent.vae is None:
        return PixelSpace(config.model.in_channels)
    vae = load_vae(space_folder_for(ckpt, config))
    check_space(config, vae.config)
    return LatentSpace(vae, sample_posterior=config.latent.sample_posterior).to(device)


def vae_files(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, object]:
    """The two files of an autoencoder folder, for bundling into an exported model folder."""
    folder = find_vae_folder(path)
    tensors = load_tensors(folder / VAE_WEIGHTS)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return {VAE_MANIFEST: read_json(folder / VAE_MANIFEST), VAE_WEIGHTS: tensors}
