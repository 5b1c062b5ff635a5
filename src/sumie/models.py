"""Build networks and denoisers from a :class:`RunConfig`, and load trained ones from disk."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import RunConfig, from_dict
from .diffusion.precond import Denoiser, make_denoiser
from .diffusion.schedules import DiscreteSchedule
from .io.checkpoint import MODEL_FILES, CheckpointError, load_tensors, read_json, resolve_checkpoint, write_folder
from .nn.unet import UNet
from .text.small import SmallTextEncoder, WordTokenizer

TEXT_FILES = {"model": "text_encoder.safetensors", "ema": "text_encoder_ema.safetensors",
              "tokenizer": "tokenizer.json"}


def build_schedule(config: RunConfig) -> DiscreteSchedule | None:
    d = config.diffusion
    if d.parameterization == "edm":
        return None
    return DiscreteSchedule.named(d.beta_schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr)


def build_denoiser(config: RunConfig) -> Denoiser:
    """A freshly initialised network wrapped in the configured preconditioning."""
    d = config.diffusion
    net = UNet(config.model)
    return make_denoiser(net, d.parameterization, schedule=build_schedule(config), sigma_data=d.sigma_data,
                         sigma_min=d.sigma_min, sigma_max=d.sigma_max)


def check_conditioning(config: RunConfig) -> None:
    """The data's conditioning, the text side and the U-Net must agree; the error says how."""
    kind, m, t = config.data.conditioning, config.model, config.text
    if kind not in ("class", "caption", "none"):
        raise ValueError(f"unknown data.conditioning {kind!r}; valid: class, caption, none")
    if t.kind not in ("none", "small"):
        raise ValueError(f"unknown text.kind {t.kind!r}; valid: none, small")
    if kind == "class" and m.num_classes is None:
        raise ValueError("data.conditioning = 'class' needs model.num_classes (or set data.conditioning = 'none')")
    if kind == "caption":
        if t.kind == "none":
            raise ValueError("data.conditioning = 'caption' needs a text encoder: set text.kind = 'small'")
        if m.context_dim != t.width:
            raise ValueError(f"model.context_dim ({m.context_dim}) must equal text.width ({t.width}) so the "
                             "U-Net can cross-attend to the text encoder's tokens")


def caption_corpus(dataset, limit: int = 20000) -> list[str]:
    """Captions to read a vocabulary from: a folder's own list, or the first ``limit`` procedural scenes."""
    if hasattr(dataset, "captions"):
        return [c for c in dataset.captions if c]
    if hasattr(dataset, "spec"):
        return [dataset.spec(i).caption for i in range(min(limit, len(dataset)))]
    raise ValueError(f"cannot read captions from a {type(dataset).__name__}")


def build_text_encoder(config: RunConfig, tokenizer: WordTokenizer) -> SmallTextEncoder | None:
    """A freshly initialised text encoder for ``config.text`` (None when the run has none)."""
    if config.text.kind == "none":
        return None
    return SmallTextEncoder(config.text, tokenizer)


def load_text_encoder(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu"
                      ) -> SmallTextEncoder | None:
    """The trained text encoder of a run or ``ckpt-*`` folder, or None for a model without one."""
    ckpt = resolve_checkpoint(path)
    config = from_dict(read_json(ckpt / "config.json"))
    if config.text.kind == "none":
        return None
    for name in (TEXT_FILES["tokenizer"], TEXT_FILES["ema" if ema else "model"]):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt} is missing the text encoder's {name}; the model folder is incomplete")
    encoder = build_text_encoder(config, WordTokenizer.load(ckpt / TEXT_FILES["tokenizer"]))
    name = TEXT_FILES["ema" if ema else "model"]
    load_state_strict(encoder, load_tensors(ckpt / name), str(ckpt / name))
    return encoder.to(device).eval()


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names every missing, unexpected or mis-shaped tensor."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
        if bad:
            parts.append("shape mismatch: " + "; ".join(bad[:3]))
        raise CheckpointError(f"{source} does not match the model config: " + ", ".join(parts))
    module.load_state_dict(state)


def load_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> tuple[Denoiser, RunConfig]:
    """Load a trained denoiser from a run folder or ``ckpt-*`` folder (EMA weights by default)."""
    ckpt = resolve_checkpoint(path)
    config = from_dict(read_json(ckpt / "config.json"))
    denoiser = build_denoiser(config)
    name = "ema.safetensors" if ema else "model.safetensors"
    if not ema and not (ckpt / name).is_file():
        raise CheckpointError(f"{ckpt} is an exported model folder with only the EMA weights; "
                              "drop --raw to use them")
    load_state_strict(denoiser.net, load_tensors(ckpt / name), str(ckpt / name))
    return denoiser.to(device).eval(), config


def export_model(src: str | Path, dst: str | Path, *, dtype: torch.dtype = torch.float16,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Write the inference-only model folder of a run: config, EMA weights (and the text encoder's
    EMA weights and tokenizer) cast to ``dtype``, plus ``extra_files`` (e.g. a model card).

    The folder loads with :func:`load_model` / :func:`load_text_encoder` like a checkpoint; it holds
    no optimizer state, so it cannot be resumed. Written atomically (temporary folder, then rename).
    """
    ckpt = resolve_checkpoint(src)
    config = read_json(ckpt / "config.json")

    def cast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}

    files: dict[str, object] = {MODEL_FILES[0]: config, MODEL_FILES[1]: cast(load_tensors(ckpt / MODEL_FILES[1]))}
    if from_dict(config).text.kind != "none":
        files[TEXT_FILES["ema"]] = cast(load_tensors(ckpt / TEXT_FILES["ema"]))
        files[TEXT_FILES["tokenizer"]] = read_json(ckpt / TEXT_FILES["tokenizer"])
    if from_dict(config).latent.vae is not None:  # a latent model carries its autoencoder (vae.json, vae.safetensors)
        from .latent import space_folder_for, vae_files

        files.update(vae_files(space_folder_for(ckpt, from_dict(config)), dtype))
    files.update(extra_files or {})
    return write_folder(dst, files)
