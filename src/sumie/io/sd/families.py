"""The registry of Stable Diffusion model families and their detection from weights.

A family is data: the U-Net features that identify it (cross-attention width, input
channels, vector-conditioning width, linear projections), how its attention heads are
laid out (not visible in the weights), its autoencoder's latent scale, its text encoders
and where a single-file checkpoint keeps them, and its default prediction target. The
U-Net structure itself (widths, levels, blocks, transformer depths) is read from tensor
shapes, as ComfyUI's ``model_detection.py`` does, so one family covers the published
model and any smaller model of the same design.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ...nn.unet import UNetConfig
from ...nn.vae import VAEConfig
from ..checkpoint import CheckpointError
from .tensors import Weights

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family: its diffusers folder, its kind, where single files keep it."""

    slot: str  # diffusers sub-folder: text_encoder, text_encoder_2
    kind: str  # clip-l (OpenAI CLIP ViT-L/14), openclip-h (ViT-H/14), openclip-bigg (ViT-bigG/14)
    prefix: str  # key prefix in single-file checkpoints
    layout: str  # layout below that prefix: "hf" (transformers CLIPTextModel) or "open_clip"


# token width of each tower kind; a family's towers, concatenated, are its U-Net's context_dim
TEXT_WIDTHS = {"clip-l": 768, "openclip-h": 1024, "openclip-bigg": 1280}


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    match: dict  # U-Net feature -> the value this family has
    heads: dict  # attention-head layout: {"num_heads": 8} or {"num_head_channels": 64}
    vae: Callable[[], VAEConfig]
    text_encoders: tuple[TextEncoderSpec, ...]
    pipeline: str  # diffusers pipeline class written to model_index.json
    prediction: str = "eps"
    resolution: int = 512
    v_resolution: int | None = None  # native resolution of the v-prediction variant
    v_prediction_test: bool = False  # apply ComfyUI's weight-statistics test for v-prediction

    def expected(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.match.items())

    def slots(self) -> str:
        """The text-encoder slots, e.g. "text_encoder (clip-l, 768 wide), text_encoder_2 (...)"."""
        return ", ".join(f"{s.slot} ({s.kind}, {TEXT_WIDTHS[s.kind]} wide)" for s in self.text_encoders)


_CLIP_L_SD1 = TextEncoderSpec("text_encoder", "clip-l", "cond_stage_model.transformer.", "hf")
_OPENCLIP_H_SD2 = TextEncoderSpec("text_encoder", "openclip-h", "cond_stage_model.model.", "open_clip")
_CLIP_L_XL = TextEncoderSpec("text_encoder", "clip-l", "conditioner.embedders.0.transformer.", "hf")
_OPENCLIP_G_XL = TextEncoderSpec("text_encoder_2", "openclip-bigg", "conditioner.embedders.1.model.", "open_clip")

FAMILIES: tuple[Family, ...] = (
    Family("sd1", "Stable Diffusion 1.x",
           {"context_dim": 768, "in_channels": 4, "adm_in_channels": None, "use_linear": False},
           {"num_heads": 8}, VAEConfig.sd, (_CLIP_L_SD1,), "StableDiffusionPipeline"),
    Family("sd1-inpaint", "Stable Diffusion 1.x inpainting",
           {"context_dim": 768, "in_channels": 9, "adm_in_channels": None, "use_linear": False},
           {"num_heads": 8}, VAEConfig.sd, (_CLIP_L_SD1,), "StableDiffusionInpaintPipeline"),
    Family("sd2", "Stable Diffusion 2.x",
           {"context_dim": 1024, "in_channels": 4, "adm_in_channels": None, "use_linear": True},
           {"num_head_channels": 64}, VAEConfig.sd, (_OPENCLIP_H_SD2,), "StableDiffusionPipeline",
           v_resolution=768, v_prediction_test=True),
    Family("sd2-inpaint", "Stable Diffusion 2.x inpainting",
           {"context_dim": 1024, "in_channels": 9, "adm_in_channels": None, "use_linear": True},
           {"num_head_channels": 64}, VAEConfig.sd, (_OPENCLIP_H_SD2,), "StableDiffusionInpaintPipeline"),
    Family("sdxl", "Stable Diffusion XL base",
           {"context_dim": 2048, "in_channels": 4, "adm_in_channels": 2816, "use_linear": True},
           {"num_head_channels": 64}, VAEConfig.sdxl, (_CLIP_L_XL, _OPENCLIP_G_XL), "StableDiffusionXLPipeline",
           resolution=1024),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


def family(name: str) -> Family:
    try:
        return FAMILY_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILY_BY_NAME)}") from None


# ---------------------------------------------------------------- reading structure from shapes


def _count(weights: Weights, pattern: str) -> int:
    """Number of consecutive indices i for which some key starts with pattern.format(i)."""
    n = 0
    while any(k.startswith(pattern.format(n)) for k in weights):
        n += 1
    return n


@dataclass
class UNetFeatures:
    """What the U-Net weights reveal; the family match uses the first four."""

    context_dim: int | None
    in_channels: int
    adm_in_channels: int | None
    use_linear: bool
    structure: dict = field(default_factory=dict)  # the UNetConfig fields read from shapes

    def as_dict(self) -> dict:
        return {"context_dim": self.context_dim, "in_channels": self.in_channels,
                "adm_in_channels": self.adm_in_channels, "use_linear": self.use_linear}


def unet_features(w: Weights) -> UNetFeatures:
    """Read a latent-diffusion-named U-Net's structure from tensor shapes (no data is read)."""
    if "input_blocks.0.0.weight" not in w or "out.2.weight" not in w:
        raise CheckpointError("no U-Net input/output convolution (input_blocks.0.0.weight, out.2.weight)")
    conv_in = w["input_blocks.0.0.weight"].shape
    mc = conv_in[0]
    mults, nres, depth = [], [], []
    context_dim, use_linear = None, False
    idx, level, count, lvl_depth = 1, 0, 0, 0
    while f"input_blocks.{idx}.0.op.weight" in w or f"input_blocks.{idx}.0.in_layers.2.weight" in w:
        if f"input_blocks.{idx}.0.op.weight" in w:  # downsampling closes a level
            nres.append(count)
            depth.append(lvl_depth)
            level, count, lvl_depth = level + 1, 0, 0
        else:
            if count == 0:
                mults.append(w[f"input_blocks.{idx}.0.in_layers.2.weight"].shape[0] // mc)
            count += 1
            t = f"input_blocks.{idx}.1."
            if t + "proj_in.weight" in w:
                lvl_depth = _count(w, t + "transformer_blocks.{}.")
                use_linear = len(w[t + "proj_in.weight"].shape) == 2
                k = t + "transformer_blocks.0.attn2.to_k.weight"
                if k in w:
                    context_dim = w[k].shape[1]
        idx += 1
    nres.append(count)
    depth.append(lvl_depth)
    mid_depth = _count(w, "middle_block.1.transformer_blocks.{}.") if "middle_block.1.proj_in.weight" in w else 0
    if mid_depth and context_dim is None and "middle_block.1.transformer_blocks.0.attn2.to_k.weight" in w:
        context_dim = w["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
        use_linear = len(w["middle_block.1.proj_in.weight"].shape) == 2
    adm = w["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in w else None
    structure = dict(
        in_channels=conv_in[1], out_channels=w["out.2.weight"].shape[0], model_channels=mc,
        channel_mult=tuple(mults), num_res_blocks=tuple(nres),
        attention_resolutions=tuple(2**i for i, d in enumerate(depth) if d > 0),
        transformer_depth=tuple(depth), transformer_depth_middle=mid_depth, middle_attention=mid_depth > 0,
        context_dim=context_dim, use_linear_in_transformer=use_linear, adm_in_channels=adm)
    if "label_emb.weight" in w:
        structure["num_classes"] = w["label_emb.weight"].shape[0] - 1
    return UNetFeatures(context_dim, conv_in[1], adm, use_linear, structure)


def detect_family(feats: UNetFeatures, source: str) -> Family:
    """The registered family whose features all match; otherwise an error listing both sides."""
    found = feats.as_dict()
    for fam in FAMILIES:
        if all(found[k] == v for k, v in fam.match.items()):
            return fam
    known = "; ".join(f"{f.name} ({f.expected()})" for f in FAMILIES)
    raise CheckpointError(f"{source}: unknown model family. Recognised a U-Net with "
                          f"{', '.join(f'{k}={v}' for k, v in found.items())}; expected one of: {known}")


def unet_config_for(fam: Family, feats: UNetFeatures) -> UNetConfig:
    """The structure read from the weights with the family's attention-head layout."""
    return UNetConfig(**feats.structure, **fam.heads, norm_groups=32)


def vae_config_from_weights(w: Weights, scaling_factor: float = 0.18215, shift_factor: float = 0.0) -> VAEConfig:
    """Read a latent-diffusion-named autoencoder's structure from tensor shapes."""
    need = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight", "encoder.conv_out.weight")
    missing = [k for k in need if k not in w]
    if missing:
        raise CheckpointError(f"no autoencoder found: missing {missing}")
    ch = w["encoder.conv_in.weight"].shape[0]
    levels = _count(w, "encoder.down.{}.")
    nres = _count(w, "encoder.down.0.block.{}.")
    mults = tuple(w[f"encoder.down.{i}.block.{nres - 1}.conv2.weight"].shape[0] // ch for i in range(levels))
    z = w["decoder.conv_in.weight"].shape[1]
    embed = w["post_quant_conv.weight"].shape[1] if "post_quant_conv.weight" in w else z
    attn = any(".attn." in k and (k.startswith("encoder.down.") or k.startswith("decoder.up.")) for k in w)
    if attn:
        raise CheckpointError("autoencoders with attention outside the middle block are not supported")
    return VAEConfig(in_channels=w["encoder.conv_in.weight"].shape[1], out_channels=w["decoder.conv_out.weight"].shape[0],
                     ch=ch, ch_mult=mults, num_res_blocks=nres, z_channels=z, embed_dim=embed,
                     use_quant_conv="quant_conv.weight" in w, use_post_quant_conv="post_quant_conv.weight" in w,
                     mid_attention="encoder.mid.attn_1.q.weight" in w, norm_groups=32,
                     scaling_factor=scaling_factor, shift_factor=shift_factor)


# ---------------------------------------------------------------- prediction target

_YAML_V = re.compile(r"^\s*parameterization:\s*['\"]?v['\"]?\s*$", re.MULTILINE)


def detect_prediction(fam: Family, unet: Weights, source: Path | None, override: str | None,
                      v_marker: bool = False, metadata: dict | None = None) -> tuple[str, str]:
    """(prediction, reason). Weights alone do not always tell eps from v; in order: the
    caller's ``override``; a sibling ``.yaml`` with ``parameterization: "v"`` (the original
    repositories ship one); the ``sumie.prediction`` header key sumie's converter writes; a
    ``v_pred`` marker tensor; for SD 2.x, ComfyUI's test (std of
    ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` above 0.09 in the published v
    models); else the family's default."""
    if override is not None:
        if override not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {override!r}")
        return override, "given explicitly"
    if source is not None and source.is_file():
        for yaml in (source.with_suffix(".yaml"), source.with_suffix(".yml")):
            if yaml.is_file():
                v = bool(_YAML_V.search(yaml.read_text(errors="replace")))
                return ("v" if v else "eps"), f"from {yaml.name}"
    written = (metadata or {}).get("sumie.prediction")
    if written is not None:
        if written not in ("eps", "v"):
            raise CheckpointError(f"{source}: header sumie.prediction={written!r} is not 'eps' or 'v'")
        return written, "from the file's header (sumie.prediction)"
    if v_marker:
        return "v", "v_pred marker tensor"
    key = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    if fam.v_prediction_test and key in unet:
        std = torch.std(unet[key].load().float(), unbiased=False).item()
        return ("v" if std > 0.09 else "eps"), f"std of {key} = {std:.3f} (ComfyUI's test, threshold 0.09)"
    return fam.prediction, f"{fam.name} default"
