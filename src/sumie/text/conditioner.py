"""Prompts -> what a Stable Diffusion U-Net needs: ``context`` (B, 77*k, D) and SDXL's ``y``.

How each family reads its CLIP towers (Rombach et al. 2022; Podell et al. 2023, sec. 2.1-2.2):

=====  =======================  ==========  ===========  ==================  =======
family tower                    layer       final norm   padding             pooled
=====  =======================  ==========  ===========  ==================  =======
sd1    CLIP ViT-L/14            last        yes          end token           -
sd2    OpenCLIP ViT-H/14        penultimate yes          0                   -
sdxl   CLIP ViT-L/14            penultimate no           end token           -
sdxl   OpenCLIP ViT-bigG/14     penultimate no           0                   projected, into ``y``
=====  =======================  ==========  ===========  ==================  =======

SDXL concatenates the two towers' tokens (768 + 1280 = 2048 wide) and feeds the U-Net the
vector ``y`` = [pooled bigG (1280), Fourier features of original size, crop top-left and
target size (6 x 256)] = 2816 wide (:func:`sdxl_vector_cond`). Prompts are weighted and
split into 75-token windows as in AUTOMATIC1111 (:mod:`sumie.text.prompt`); the pooled
vector is the first window's, as A1111 and ComfyUI do. A negative prompt is one more prompt:
:meth:`SDTextConditioner.encode_pair` pads both to the same number of windows. An empty
negative prompt is encoded like any other (A1111, ComfyUI), not zeroed as diffusers' SDXL
pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.checkpoint import CheckpointError
from ..nn.layers import timestep_embedding
from .base import TextEncoder, TextEncoderOutput
from .clip import ClipTextTransformer, load_clip_text, load_clip_text_folder
from .clip_tokenizer import ClipTokenizer
from .prompt import apply_weights, batch_windows

SDXL_SIZE_EMBED = 256  # Fourier features per micro-conditioning number


@dataclass(frozen=True)
class TowerSpec:
    """How a family reads one tower: single-file prefix and layout, clip-skip, final norm, padding."""

    kind: str  # clip-l, openclip-h, openclip-bigg
    prefix: str
    layout: str  # "hf" or "open_clip"
    skip: int  # 1: last block, 2: penultimate
    final_norm: bool
    pad_with_eos: bool
    diffusers: str  # text-encoder sub-folder; the tokenizer folder is the same with "tokenizer"


FAMILY_TOWERS: dict[str, tuple[TowerSpec, ...]] = {
    "sd1": (TowerSpec("clip-l", "cond_stage_model.transformer.", "hf", 1, True, True, "text_encoder"),),
    "sd2": (TowerSpec("openclip-h", "cond_stage_model.model.", "open_clip", 2, True, False, "text_encoder"),),
    "sdxl": (TowerSpec("clip-l", "conditioner.embedders.0.transformer.", "hf", 2, False, True, "text_encoder"),
             TowerSpec("openclip-bigg", "conditioner.embedders.1.model.", "open_clip", 2, False, False,
                       "text_encoder_2")),
}


def family_towers(family: str) -> tuple[TowerSpec, ...]:
    """The tower specs of a family name (``sd1-inpaint`` reads its text like ``sd1``)."""
    base = family.split("-")[0]
    if base not in FAMILY_TOWERS:
        raise ValueError(f"no text conditioning known for family {family!r}; known: {', '.join(FAMILY_TOWERS)}")
    return FAMILY_TOWERS[base]


class ClipTextEncoder(TextEncoder):
    """One CLIP tower with its tokenizer, weighting and 75-token windows."""

    def __init__(self, tokenizer: ClipTokenizer, tower: ClipTextTransformer, *, skip: int = 1, final_norm: bool = True,
                 weighting: bool = True, comma_backtrack: int = 20):
        if tokenizer.vocab_size > tower.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the text encoder only "
                             f"{tower.config.vocab_size}: they do not belong together")
        if tokenizer.model_max_length > tower.config.max_position_embeddings:
            raise ValueError(f"tokenizer windows of {tokenizer.model_max_length} exceed the encoder's "
                             f"{tower.config.max_position_embeddings} positions")
        tower.blocks_for_skip(skip)  # validates
        self.tokenizer, self.tower = tokenizer, tower
        self.skip, self.final_norm = skip, final_norm
        self.weighting, self.comma_backtrack = weighting, comma_backtrack
        self.width, self.pooled_width = tower.width, tower.pooled_width

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEncoderOutput:
        ids, weights = batch_windows(self.tokenizer, prompts, weighting=self.weighting,
                                     comma_backtrack=self.comma_backtrack)  # (B, k, L)
        b, k, n = ids.shape
        p = next(self.tower.parameters())
        flat = ids.reshape(b * k, n).to(p.device)
        out = self.tower(flat, skip=self.skip, final_norm=self.final_norm)
        hidden = apply_weights(out.hidden, weights.reshape(b * k, n).to(p.device))  # (B*k, L, D)
        mask = _through_first_eos(flat, self.tokenizer.eos_token_id)
        return TextEncoderOutput(hidden.reshape(b, k * n, -1), out.pooled.reshape(b, k, -1)[:, 0],
                                 mask.reshape(b, k * n))


def _through_first_eos(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """1 up to and including each row's first end token, 0 on the padding after it."""
    is_eos = (ids == eos).int()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


class SDTextConditioner:
    """The text side of a Stable Diffusion family: one or two CLIP encoders composed."""

    def __init__(self, family: str, encoders: list[ClipTextEncoder]):
        specs = family_towers(family)
        if len(encoders) != len(specs):
            raise ValueError(f"{family} needs {len(specs)} text encoder(s), got {len(encoders)}")
        self.family, self.encoders = family, encoders
        self.width = sum(e.width for e in encoders)
        self.pooled_width = encoders[-1].pooled_width

    # ------------------------------------------------------------ construction

    @classmethod
    def from_towers(cls, family: str, towers: list[ClipTextTransformer], tokenizer: ClipTokenizer, *,
                    clip_skip: int | None = None, weighting: bool = True) -> "SDTextConditioner":
        """Towers in the family's order; one tokenizer's vocabulary serves all (the padding
        convention is set per tower). ``clip_skip`` overrides every tower's layer choice."""
        encoders = []
        for spec, tower in zip(family_towers(family), towers):
            tok = tokenizer.with_padding(spec.pad_with_eos)
            encoders.append(ClipTextEncoder(tok, tower, skip=clip_skip or spec.skip, final_norm=spec.final_norm,
                                            weighting=weighting))
        return cls(family, encoders)

    @classmethod
    def from_state_dict(cls, family: str, sd: dict[str, torch.Tensor], tokenizer: ClipTokenizer, *,
                        prefixes: tuple[str, ...] | None = None, clip_skip: int | None = None,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "SDTextConditioner":
        """From a single file's raw tensors (all of it, or just the text part); ``prefixes``
        overrides where each tower lives (e.g. ``("",)`` for a bare text-encoder file)."""
        specs = family_towers(family)
        prefixes = prefixes or tuple(s.prefix for s in specs)
        towers = [load_clip_text(sd, layout=s.layout, prefix=p, kind=s.kind, dtype=dtype, device=device)
                  for s, p in zip(specs, prefixes)]
        return cls.from_towers(family, towers, tokenizer, clip_skip=clip_skip)

    @classmethod
    def from_diffusers(cls, family: str, folder: str | Path, *, clip_skip: int | None = None,
                       dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       tokenizer: ClipTokenizer | None = None) -> "SDTextConditioner":
        """From a diffusers folder's ``text_encoder*/`` and ``tokenizer/`` sub-folders (``tokenizer``
        given: that one instead, e.g. for a folder converted from a single file, which has none)."""
        folder = Path(folder)
        specs = family_towers(family)
        towers = [load_clip_text_folder(folder / s.diffusers, dtype, device) for s in specs]
        tokenizer = tokenizer or ClipTokenizer.from_folder(folder / "tokenizer")
        return cls.from_towers(family, towers, tokenizer, clip_skip=clip_skip)

    # ------------------------------------------------------------ encoding

    def encode(self, prompts: list[str]) -> TextEncoderOutput:
        """Tokens of all towers side by side (B, 77*k, sum D); pooled of the last tower."""
        outs = [e.encode(prompts) for e in self.encoders]
        hidden = torch.cat([o.hidden for o in outs], dim=-1)
        return TextEncoderOutput(hidden, outs[-1].pooled, outs[0].attention_mask)

    def encode_pair(self, prompts: list[str], negative_prompts: list[str]) -> tuple[TextEncoderOutput, TextEncoderOutput]:
        """(cond, uncond) with the same number of 77-token windows."""
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
        both = self.encode(list(prompts) + list(negative_prompts))
        b = len(prompts)
        return (TextEncoderOutput(both.hidden[:b], both.pooled[:b], both.attention_mask[:b]),
                TextEncoderOutput(both.hidden[b:], both.pooled[b:], both.attention_mask[b:]))

    def unet_cond(self, out: TextEncoderOutput, *, original_size=(1024, 1024), crop_coords=(0, 0),
                  target_size=(1024, 1024)) -> dict[str, torch.Tensor]:
        """The U-Net's ``cond``: ``context`` and, for SDXL, ``y`` (sizes as (height, width))."""
        cond = {"context": out.hidden}
        if self.family.startswith("sdxl"):
            cond["y"] = sdxl_vector_cond(out.pooled, original_size, crop_coords, target_size)
        return cond

    def check_unet(self, context_dim: int | None, adm_in_channels: int | None = None) -> None:
        """Clear errors when these encoders do not fit the U-Net's cross-attention or ``y`` width."""
        if context_dim != self.width:
            widths = " + ".join(str(e.width) for e in self.encoders)
            raise CheckpointError(f"the text encoder(s) of this {self.family} model produce tokens {widths} = "
                                  f"{self.width} wide, but the U-Net cross-attends to width {context_dim}; the "
                                  "text-encoder file does not belong to this U-Net")
        if self.family.startswith("sdxl"):
            y = self.pooled_width + 6 * SDXL_SIZE_EMBED
            if adm_in_channels != y:
                raise CheckpointError(f"SDXL's vector conditioning is {self.pooled_width} pooled + 6 x "
                                      f"{SDXL_SIZE_EMBED} = {y} wide, but the U-Net expects {adm_in_channels}")


def _as_pairs(v, b: int, device) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32, device=device)
    return t.expand(b, 2) if t.ndim == 1 else t


def sdxl_vector_cond(pooled: torch.Tensor, original_size=(1024, 1024), crop_coords=(0, 0),
                     target_size=(1024, 1024)) -> torch.Tensor:
    """SDXL's ``y``: pooled (B, P) joined with 256 sinusoidal features (cos, sin; as the U-Net's
    timestep embedding) of each of original (h, w), crop (top, left), target (h, w), in that
    order (Podell et al. 2023, sec. 2.2; sgm's ``ConcatTimestepEmbedderND``). Sizes are pairs
    or (B, 2) tensors. Returns (B, P + 1536)."""
    b = pooled.shape[0]
    nums = torch.cat([_as_pairs(v, b, pooled.device) for v in (original_size, crop_coords, target_size)], 1)  # (B, 6)
    feats = timestep_embedding(nums.reshape(-1), SDXL_SIZE_EMBED).reshape(b, 6 * SDXL_SIZE_EMBED)
    return torch.cat([pooled, feats.to(pooled.dtype)], dim=1)
