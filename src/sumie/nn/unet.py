"""The U-Net: one configurable class from 100k-parameter CPU toys to Stable Diffusion.

Architecture of Ronneberger et al. 2015 as used for diffusion by Ho et al. 2020 and
Dhariwal & Nichol 2021 (ADM), with the spatial transformers and cross-attention of
Rombach et al. 2022 (latent diffusion) and the vector conditioning of Podell et al. 2023
(SDXL). The layout and parameter names are those of latent diffusion's ``UNetModel``, so
``UNetConfig`` can express the SD 1.x, 2.x and XL U-Nets (see ``UNetConfig.sd15`` and
friends) and their state dicts load by name.

The network is sigma-agnostic: it is called as ``net(x, c_noise, cond)`` and the
preconditioning in ``sumie.diffusion.precond`` decides what c_noise and the output mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (UPSAMPLE_MODES, Downsample, ResBlock, SpatialTransformer, Upsample, group_norm, timestep_embedding,
                     zero_module)


def _per_level(values, n: int) -> tuple[int, ...]:
    """A per-level tuple; a uniform one (as a resolved config stores an int) follows the level count,
    so overriding ``channel_mult`` alone keeps working on a dumped config."""
    values = tuple(values)
    if len(values) != n and len(set(values)) == 1:
        return values[:1] * n
    return values


@dataclass
class UNetConfig:
    """Hyper-parameters of :class:`UNet` (names follow latent diffusion's ``UNetModel``)."""

    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int | tuple[int, ...] = 2
    # attention at these downsampling factors (1 = full resolution), as in latent diffusion
    attention_resolutions: tuple[int, ...] = (2,)
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None
    num_heads: int = 4
    num_head_channels: int = -1  # if > 0, heads = channels // num_head_channels (SD 2.x, SDXL)
    context_dim: int | None = None  # width of the token sequence for cross-attention
    use_linear_in_transformer: bool = False
    num_classes: int | None = None  # class-label embedding (one extra "null" class is added for CFG)
    adm_in_channels: int | None = None  # vector conditioning (SDXL's "y")
    dropout: float = 0.0
    norm_groups: int = 32
    resblock_scale_shift: bool = False
    middle_attention: bool = True
    # > 1: fold p x p pixel patches into channels before the first convolution and unfold after
    # the last (pixel unshuffle, Shi et al. 2016), so the network runs at 1/p resolution: the cheap
    # stem of Hoogeboom et al. 2023 ("simple diffusion") for small CPU models. 1 for SD layouts.
    patch_size: int = 1
    # learned 2-D position code on the tokens of every spatial transformer (layers.SpatialTransformer):
    # lets small models place what a prompt asks for ("at the top left"); False for SD layouts
    pos_embed: bool = False
    # "conv": nearest x2 then a 3x3 conv (ADM, SD layouts); "transposed": a 2x2 stride-2 transposed conv,
    # 1/9 of the multiply-adds (layers.Upsample)
    upsample: str = "conv"

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        n = len(self.channel_mult)
        if isinstance(self.num_res_blocks, int):
            self.num_res_blocks = (self.num_res_blocks,) * n
        if isinstance(self.transformer_depth, int):
            self.transformer_depth = (self.transformer_depth,) * n
        self.num_res_blocks = _per_level(self.num_res_blocks, n)
        self.transformer_depth = _per_level(self.transformer_depth, n)
        if len(self.num_res_blocks) != n or len(self.transformer_depth) != n:
            raise ValueError("num_res_blocks and transformer_depth need one entry per channel_mult level")
        if self.transformer_depth_middle is None:
            self.transformer_depth_middle = self.transformer_depth[-1]
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"unknown model.upsample {self.upsample!r}; valid: {', '.join(UPSAMPLE_MODES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    # Published layouts (Rombach et al. 2022; Stability AI's v2 and SDXL configs).
    @classmethod
    def sd15(cls) -> "UNetConfig":
        return cls(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   attention_resolutions=(4, 2, 1), transformer_depth=1, num_heads=8, context_dim=768)

    @classmethod
    def sd21(cls) -> "UNetConfig":
        return cls(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   attention_resolutions=(4, 2, 1), transformer_depth=1, num_head_channels=64, context_dim=1024,
                   use_linear_in_transformer=True)

    @classmethod
    def sdxl(cls) -> "UNetConfig":
        return cls(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2,
                   attention_resolutions=(4, 2), transformer_depth=(0, 2, 10), num_head_channels=64,
                   context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose ResBlocks take the embedding and transformers take the context."""

    def forward(self, x, emb, context=None, mask=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """Latent-diffusion U-Net; ``forward(x, c_noise, cond)`` with ``cond`` a dict holding any of
    ``class_labels`` (B,), ``context`` (B, N, context_dim), ``context_mask`` (B, N), ``y`` (B, adm)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch = c.model_channels
        emb_dim = ch * 4
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.num_classes is not None and c.adm_in_channels is not None:
            raise ValueError("num_classes and adm_in_channels are exclusive (both feed label_emb)")
        if c.num_classes is not None:
            # index num_classes is the "no class" token used for classifier-free guidance
            self.label_emb = nn.Embedding(c.num_classes + 1, emb_dim)
        elif c.adm_in_channels is not None:
            # the last layer starts at zero (ADM's habit for added branches): a fresh vector condition adds
            # nothing, so train.init_from can switch text.pooled on and start from the same function
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(),
                                                         zero_module(nn.Linear(emb_dim, emb_dim))))

        def transformer(channels: int, depth: int) -> SpatialTransformer:
            if c.num_head_channels > 0:
                heads, dim_head = channels // c.num_head_channels, c.num_head_channels
            else:
                heads, dim_head = c.num_heads, channels // c.num_heads
            return SpatialTransformer(channels, heads, dim_head, depth, c.context_dim, c.use_linear_in_transformer,
                                      c.norm_groups, c.dropout, c.pos_embed)

        def resblock(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, c.dropout, c.norm_groups, c.resblock_scale_shift)

        p2 = c.patch_size**2
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c.in_channels * p2, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks[level]):
                layers: list[nn.Module] = [resblock(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions and c.transformer_depth[level] > 0:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        middle: list[nn.Module] = [resblock(ch, ch)]
        if c.middle_attention and c.transformer_depth_middle > 0:
            middle.append(transformer(ch, c.transformer_depth_middle))
        middle.append(resblock(ch, ch))
        self.middle_block = TimestepEmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(c.channel_mult))[::-1]:
            for i in range(c.num_res_blocks[level] + 1):
                layers = [resblock(ch + skip_chans.pop(), c.model_channels * mult)]
                ch = c.model_channels * mult
                if ds in c.attention_resolutions and c.transformer_depth[level] > 0:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                if level and i == c.num_res_blocks[level]:
                    layers.append(Upsample(ch, mode=c.upsample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch, c.norm_groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, c.out_channels * p2, 3, padding=1)))

    @property
    def downsampling_factor(self) -> int:
        """Input sizes that are multiples of this avoid padding/cropping inside the network."""
        return self.config.patch_size * 2 ** (len(self.config.channel_mult) - 1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        cond = cond or {}
        c = self.config
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(c_noise, c.model_channels).to(x.dtype))  # (B, 4*ch)
        if c.num_classes is not None:
            labels = cond.get("class_labels")
            if labels is None:  # unconditional: the null class
                labels = torch.full((x.shape[0],), c.num_classes, device=x.device, dtype=torch.long)
            labels = torch.where(labels < 0, torch.full_like(labels, c.num_classes), labels)
            emb = emb + self.label_emb(labels.long()).to(emb.dtype)
        elif c.adm_in_channels is not None:
            y = cond.get("y")
            if y is None:
                raise ValueError(f"this U-Net needs the vector conditioning cond['y'] of width {c.adm_in_channels} "
                                 "(SDXL's pooled text + micro-conditioning, or the pooled prompt with text.pooled)")
            emb = emb + self.label_emb(y.to(emb.dtype))
        context, mask = cond.get("context"), cond.get("context_mask")
        if c.context_dim is not None and context is None:
            raise ValueError(f"this U-Net cross-attends to a token sequence: pass cond['context'] "
                             f"of shape (B, N, {c.context_dim})")
        if context is not None:
            context = context.to(x.dtype)

        extra = cond.get("concat")  # extra input channels, e.g. SD inpainting's mask + masked-image latents
        if extra is not None:
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        if x.shape[1] != c.in_channels:
            raise ValueError(f"this U-Net takes {c.in_channels} input channels, got {x.shape[1]}"
                             + ("; an inpainting U-Net needs a mask (cond['concat'])" if extra is None else ""))
        p = c.patch_size
        if p > 1:
            if x.shape[-1] % p or x.shape[-2] % p:
                raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
            x = F.pixel_unshuffle(x, p)  # (B, C*p*p, H/p, W/p)
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context, mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, mask)
        for block in self.output_blocks:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:  # odd sizes: crop the upsampled map
                h = h[..., : skip.shape[-2], : skip.shape[-1]]
            h = block(torch.cat([h, skip], dim=1), emb, context, mask)
        h = self.out(h)
        return F.pixel_shuffle(h, p) if p > 1 else h
