"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3 and app. G).

A convolutional encoder maps an image (B, 3, H, W) in [-1, 1] to a diagonal Gaussian
posterior over latents (B, z, H/f, W/f), f = 2 ** (levels - 1); a mirrored decoder maps a
latent back to pixels. Parameter names follow ``ldm/modules/diffusionmodules/model.py``
(``encoder.down.N.block.M``, ``encoder.mid.attn_1``, ``quant_conv``, ``decoder.up.N`` ...),
so the ``first_stage_model`` of every Stable Diffusion checkpoint loads by name.

The module knows nothing of noise levels. ``scaling_factor``/``shift_factor`` (Rombach et
al. 2022, sec. 4.3.2: rescale latents to unit variance) live in the config and are applied
by :meth:`AutoencoderKL.to_latent` / :meth:`from_latent` only, so training code can use the
raw posterior. Large images go through :meth:`encode_tiled` / :meth:`decode_tiled`: the
image is cut into overlapping tiles, each tile is processed alone, and the overlaps are
blended with linear ramps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import group_norm, upsample_nearest2x


@dataclass
class VAEConfig:
    """Hyper-parameters of :class:`AutoencoderKL` (names follow latent diffusion's ``ddconfig``)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4  # channels of the latent after quant_conv
    attn_resolutions: tuple[int, ...] = ()  # attention in the down/up path at these resolutions (SD: none)
    resolution: int = 256  # the training resolution; only used to place attn_resolutions
    norm_groups: int = 32
    dropout: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    # The Stable Diffusion 1.x/2.x autoencoder (kl-f8); SDXL retrained the same layout with a
    # different latent scale (Podell et al. 2023, sec. 2.4).
    @classmethod
    def sd(cls) -> "VAEConfig":
        return cls()

    @classmethod
    def sdxl(cls) -> "VAEConfig":
        return cls(scaling_factor=0.13025)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """A CPU-sized kl-f4 for tests: 2 downsamplings, 8 groups."""
        return cls(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, resolution=32)


class ResnetBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm + swish and a (1x1) shortcut, without time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, 1x1 convolutions for q, k, v and the output."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(n), self.k(n), self.v(n)))  # (B,1,HW,C)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding one pixel on the right and bottom only (LDM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample_nearest2x(x))


class _Mid(nn.Module):
    def __init__(self, channels: int, c: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, c.norm_groups, c.dropout)
        if c.mid_attention:
            self.attn_1 = AttnBlock(channels, c.norm_groups)
        self.block_2 = ResnetBlock(channels, channels, c.norm_groups, c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        if hasattr(self, "attn_1"):
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2 z, H/f, W/f)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        res, ch = c.resolution, c.ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(c.ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(c.num_res_blocks):
                stage.block.append(ResnetBlock(ch, c.ch * mult, c.norm_groups, c.dropout))
                ch = c.ch * mult
                if res in c.attn_resolutions:
                    stage.attn.append(AttnBlock(ch, c.norm_groups))
            if level != len(c.ch_mult) - 1:
                stage.downsample = Downsample(ch)
                res //= 2
            self.down.append(stage)
        self.mid = _Mid(ch, c)
        self.norm_out = group_norm(ch, c.norm_groups, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, out, f h, f w)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        levels = len(c.ch_mult)
        ch = c.ch * c.ch_mult[-1]
        res = c.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = _Mid(ch, c)
        up = []
        for level in reversed(range(levels)):  # built from the lowest resolution; stored as up[level]
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                stage.block.append(ResnetBlock(ch, c.ch * c.ch_mult[level], c.norm_groups, c.dropout))
                ch = c.ch * c.ch_mult[level]
                if res in c.attn_resolutions:
                    stage.attn.append(AttnBlock(ch, c.norm_groups))
            if level != 0:
                stage.upsample = Upsample(ch)
                res *= 2
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(ch, c.norm_groups, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) over latents, each (B, C, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as latent diffusion, keeps exp() finite

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample mean + std * n, Kingma & Welling 2014."""
        n = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * n

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent dimensions, (B,)."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def _ramp(n: int, overlap: int, left: bool, right: bool, device) -> torch.Tensor:
    """1-D blending weights of a tile of length ``n``: linear ramps of ``overlap`` samples on
    the sides that meet a neighbouring tile, 1 elsewhere."""
    w = torch.ones(n, device=device)
    if overlap > 0:
        r = (torch.arange(min(overlap, n), device=device, dtype=torch.float32) + 0.5) / overlap
        if left:
            w[: len(r)] = torch.minimum(w[: len(r)], r)
        if right:
            w[n - len(r):] = torch.minimum(w[n - len(r):], r.flip(0))
    return w


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]  # the last tile ends flush with the image


def tiled_apply(fn, x: torch.Tensor, tile: int, overlap: int, scale: float, out_channels: int) -> torch.Tensor:
    """Apply a translation-equivariant image map ``fn`` tile by tile and blend linearly.

    ``x`` is (B, C, H, W); tiles of ``tile`` x ``tile`` input pixels step by ``tile - overlap``;
    ``fn`` maps an (B, C, t, t) tile to (B, out_channels, t * scale, t * scale). Each output
    pixel is the weighted mean of the tiles covering it, with weights ramping linearly over
    the overlap (so neighbouring tiles cross-fade instead of meeting at a seam).
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    b, _, H, W = x.shape
    out_h, out_w = round(H * scale), round(W * scale)
    out = torch.zeros(b, out_channels, out_h, out_w, device=x.device, dtype=torch.float32)
    weight = torch.zeros(1, 1, out_h, out_w, device=x.device, dtype=torch.float32)
    ov = round(overlap * scale)
    ys, xs = _tile_starts(H, tile, tile - overlap), _tile_starts(W, tile, tile - overlap)
    for yi, y in enumerate(ys):
        for xi, x0 in enumerate(xs):
            y_out = fn(x[:, :, y: y + tile, x0: x0 + tile]).float()  # (B, out, th, tw)
            th, tw = y_out.shape[-2:]
            oy, ox = round(y * scale), round(x0 * scale)
            wy = _ramp(th, ov, yi > 0, yi < len(ys) - 1, x.device)
            wx = _ramp(tw, ov, xi > 0, xi < len(xs) - 1, x.device)
            w = wy[:, None] * wx[None, :]  # (th, tw)
            out[:, :, oy: oy + th, ox: ox + tw] += y_out * w
            weight[:, :, oy: oy + th, ox: ox + tw] += w
    return (out / weight).to(x.dtype)


class AutoencoderKL(nn.Module):
    """Latent diffusion's ``AutoencoderKL``: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> x``."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        if c.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.embed_dim, 1)
        elif c.embed_dim != c.z_channels:
            raise ValueError("embed_dim must equal z_channels without quant_conv")
        if c.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.config.use_quant_conv else h  # (B, 2 embed_dim, h, w)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Posterior over latents of an image (B, C, H, W) in [-1, 1]."""
        return DiagonalGaussian(self._moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image (B, C, f h, f w) in about [-1, 1] from an unscaled latent (B, embed_dim, h, w)."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Reconstruction and posterior, for training: decode(sample(encode(x)))."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    def encode_tiled(self, x: torch.Tensor, tile: int = 512, overlap: int = 64) -> DiagonalGaussian:
        """:meth:`encode` over overlapping ``tile``-pixel tiles (multiples of the factor f),
        blended linearly; equals :meth:`encode` when the image fits in one tile."""
        f = self.downsampling_factor
        if tile % f or overlap % f:
            raise ValueError(f"tile and overlap must be multiples of the downsampling factor {f}")
        moments = tiled_apply(self._moments, x, tile, overlap, 1.0 / f, 2 * self.config.embed_dim)
        return DiagonalGaussian(moments)

    def decode_tiled(self, z: torch.Tensor, tile: int = 64, overlap: int = 8) -> torch.Tensor:
        """:meth:`decode` over overlapping ``tile``-latent tiles, blended linearly."""
        return tiled_apply(self.decode, z, tile, overlap, float(self.downsampling_factor), self.config.out_channels)

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Unit-variance latent of the diffusion model: (z - shift) * scale (LDM sec. 4.3.2)."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_latent`."""
        return latent / self.config.scaling_factor + self.config.shift_factor
