"""Build networks and denoisers from a :class:`RunConfig`, and load trained ones from disk."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import RunConfig, from_dict
from .diffusion.precond import Denoiser, make_denoiser
from .diffusion.schedules import DiscreteSchedule
from .io.checkpoint import (MODEL_FILES, CheckpointError, check_state_shapes, load_state_strict, load_tensors,
                            read_json, resolve_checkpoint, write_folder)
from .latent import space_folder_for, vae_files
from .nn.unet import UNet
from .text.base import TextEncoder
from .text.bert import BertTextEncoder, encoder_width, verify_fingerprint
from .text.small import SmallTextEncoder, WordTokenizer

TEXT_FILES = {"model": "text_encoder.safetensors", "ema": "text_encoder_ema.safetensors",
              "tokenizer": "tokenizer.json"}
# text.kind = "hf": the frozen encoder is not copied; its folder and SHA-256s are recorded instead
FROZEN_TEXT_FILE = "text_encoder.json"
TEXT_KINDS = ("none", "small", "hf")


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
    if t.kind not in TEXT_KINDS:
        raise ValueError(f"unknown text.kind {t.kind!r}; valid: {', '.join(TEXT_KINDS)}")
    if t.kind == "hf" and not t.path:
        raise ValueError("text.kind = 'hf' needs text.path, a local folder in Hugging Face format "
                         "(e.g. a download of sentence-transformers/all-MiniLM-L6-v2)")
    if kind == "class" and m.num_classes is None:
        raise ValueError("data.conditioning = 'class' needs model.num_classes (or set data.conditioning = 'none')")
    if kind == "caption":
        if t.kind == "none":
            raise ValueError("data.conditioning = 'caption' needs a text encoder: set text.kind = 'small' "
                             "(or 'hf' with text.path)")
        if t.kind == "hf":
            width = encoder_width(t.path)
            if m.context_dim != width:
                raise ValueError(f"model.context_dim ({m.context_dim}) must equal the width of the text encoder in "
                                 f"{t.path} ({width}) so the U-Net can cross-attend to its tokens: set "
                                 f"model.context_dim={width}")
        elif m.context_dim != t.width:
            raise ValueError(f"model.context_dim ({m.context_dim}) must equal text.width ({t.width}) so the "
                             "U-Net can cross-attend to the text encoder's tokens")
    if t.pooled:
        if kind != "caption":
            raise ValueError("text.pooled feeds the prompt's pooled vector to the U-Net: it needs "
                             "data.conditioning = 'caption'")
        if m.adm_in_channels is None:  # its width is checked against the encoder's in build_text_encoder
            want = t.width if t.kind == "small" else "the encoder's pooled width"
            raise ValueError(f"text.pooled needs model.adm_in_channels = {want} (got {m.adm_in_channels}), "
                             "the width of the vector the U-Net adds to its timestep embedding")


def caption_corpus(dataset, limit: int = 20000) -> list[str]:
    """Captions to read a vocabulary from: a folder's own list, or the first ``limit`` procedural scenes."""
    if hasattr(dataset, "captions"):
        return [c for c in dataset.captions if c]
    if hasattr(dataset, "spec"):
        return [dataset.spec(i).caption for i in range(min(limit, len(dataset)))]
    raise ValueError(f"cannot read captions from a {type(dataset).__name__}")


def with_text_width(config: RunConfig) -> RunConfig:
    """``config`` with ``model.context_dim`` set to a frozen text encoder's width when it is unset."""
    t = config.text
    if t.kind != "hf" or not t.path or config.model.context_dim is not None or config.data.conditioning != "caption":
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, context_dim=encoder_width(t.path)))


def build_text_encoder(config: RunConfig, tokenizer: WordTokenizer | None = None, *,
                       path: str | Path | None = None) -> TextEncoder | None:
    """The text encoder for ``config.text`` (None when the run has none): a freshly initialised
    small one over ``tokenizer``, or the frozen pretrained one in ``path`` (default ``text.path``)."""
    if config.text.kind == "none":
        return None
    if config.text.kind == "hf":
        encoder = BertTextEncoder.from_folder(path or config.text.path, max_length=config.text.max_length)
    elif tokenizer is None:
        raise ValueError("a small text encoder is built over a tokenizer (WordTokenizer.build on the captions)")
    else:
        encoder = SmallTextEncoder(config.text, tokenizer)
    if config.text.pooled:
        adm = config.model.adm_in_channels
        if adm != encoder.pooled_width:
            raise ValueError(f"text.pooled: model.adm_in_channels is {adm} but the text encoder's pooled vector "
                             f"has width {encoder.pooled_width}; set model.adm_in_channels={encoder.pooled_width}")
        encoder.feeds_pooled = True
    return encoder


def load_text_encoder(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu"
                      ) -> TextEncoder | None:
    """The text encoder of a run, ``ckpt-*`` or exported model folder, or None for a model without one.
    A frozen one (text.kind = "hf") is loaded from the folder its ``text_encoder.json`` names, once
    the SHA-256 of its files is checked."""
    ckpt = resolve_checkpoint(path)
    config = from_dict(read_json(ckpt / "config.json"))
    if config.text.kind == "none":
        return None
    if config.text.kind == "hf":
        if not (ckpt / FROZEN_TEXT_FILE).is_file():
            raise CheckpointError(f"{ckpt} is missing {FROZEN_TEXT_FILE}, which names the frozen text encoder "
                                  "it was trained with; the model folder is incomplete")
        folder = verify_fingerprint(read_json(ckpt / FROZEN_TEXT_FILE), str(ckpt))
        return build_text_encoder(config, path=folder).to(device)
    for name in (TEXT_FILES["tokenizer"], TEXT_FILES["ema" if ema else "model"]):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt} is missing the text encoder's {name}; the model folder is incomplete")
    encoder = build_text_encoder(config, WordTokenizer.load(ckpt / TEXT_FILES["tokenizer"]))
    name = TEXT_FILES["ema" if ema else "model"]
    load_state_strict(encoder, load_tensors(ckpt / name), str(ckpt / name))
    return encoder.to(device).eval()


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
    EMA weights and tokenizer, or a frozen encoder's ``text_encoder.json``) cast to ``dtype``, plus
    ``extra_files`` (e.g. a model card).

    The folder loads with :func:`load_model` / :func:`load_text_encoder` like a checkpoint; it holds
    no optimizer state, so it cannot be resumed. Written atomically (temporary folder, then rename).
    """
    ckpt = resolve_checkpoint(src)
    config = read_json(ckpt / "config.json")
    run = from_dict(config)

    def cast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}

    files: dict[str, object] = {MODEL_FILES[0]: config, MODEL_FILES[1]: cast(load_tensors(ckpt / MODEL_FILES[1]))}
    if run.text.kind == "small":
        files[TEXT_FILES["ema"]] = cast(load_tensors(ckpt / TEXT_FILES["ema"]))
        files[TEXT_FILES["tokenizer"]] = read_json(ckpt / TEXT_FILES["tokenizer"])
    elif run.text.kind == "hf":  # the frozen encoder stays where it is: only its fingerprint
        files[FROZEN_TEXT_FILE] = read_json(ckpt / FROZEN_TEXT_FILE)
    if run.latent.vae is not None:  # a latent model carries its autoencoder (vae.json, vae.safetensors)
        files.update(vae_files(space_folder_for(ckpt, run), dtype))
    files.update(extra_files or {})
    return write_folder(dst, files)
