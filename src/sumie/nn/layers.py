"""Sigma-agnostic building blocks of the U-Net.

Module and parameter names follow the latent-diffusion code of Rombach et al. 2022
(``ldm/modules/diffusionmodules/openaimodel.py``), itself derived from Dhariwal & Nichol
2021 ("Diffusion Models Beat GANs", ADM), so that Stable Diffusion state dicts map onto
sumie's modules by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (B,) timestep, Vaswani et al. 2017 sec. 3.5, in ADM's
    [cos, sin] order; returns (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


POS_FREQS = 4  # octaves of the 2-D position features: 4 * POS_FREQS features per token


def position_features(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D Fourier features of each cell of an h x w grid, (h*w, 4 * POS_FREQS).

    Cell centres are put on [-1, 1] in each axis, so a feature names a *relative* place
    ("top left" is the same vector at 8x8 and 16x16), and each coordinate u goes through
    sin/cos(2^k * pi * u / 2) for k < POS_FREQS: Fourier features of Tancik et al. 2020 (the
    2-D sinusoidal position code of Vaswani et al. 2017 sec. 3.5 on normalised coordinates).
    Row-major order, matching the (B, H*W, C) token layout of :class:`SpatialTransformer`.
    """
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)  # (HW, [y, x])
    args = grid[:, :, None] * (math.pi / 2 * 2.0 ** torch.arange(POS_FREQS, device=device))  # (HW, 2, F)
    return torch.cat([args.sin(), args.cos()], dim=-1).reshape(h * w, 4 * POS_FREQS).to(dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so a residual branch starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=eps)


class ResBlock(nn.Module):
    """Residual block with a timestep embedding added between its two convolutions (ADM)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 dropout: float = 0.0, groups: int = 32, scale_shift_norm: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.scale_shift_norm = scale_shift_norm
        self.in_layers = nn.Sequential(group_norm(channels, groups), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift_norm else 1)))
        self.out_layers = nn.Sequential(group_norm(out_channels, groups), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            norm, rest = self.out_layers[0], self.out_layers[1:]
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (ADM ``Downsample`` with ``conv_resample``)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.op(x)


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 2H, 2W), each pixel repeated 2x2: exactly
    ``F.interpolate(x, scale_factor=2, mode="nearest")``, written as a broadcast and a reshape.

    Its backward is a sum over each 2x2 block. Under ``torch.compile`` with bf16 autocast on
    CPU (torch 2.13, inductor), the gradient through ``upsample_nearest2d`` came back as zeros,
    so every layer below the first level of a U-Net stopped learning; the gradient of this form
    matches eager mode. Eager speed is the same (shapes-32 training step, A/B in one process).
    """
    b, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


UPSAMPLE_MODES = ("conv", "transposed")


class Upsample(nn.Module):
    """x2 upsampling. ``mode="conv"``: nearest neighbour, then a 3x3 convolution (ADM's and
    Stable Diffusion's ``Upsample``). ``mode="transposed"``: a 2x2 stride-2 transposed
    convolution, the "up-convolution" of Ronneberger et al. 2015 (U-Net): each input pixel
    becomes a learned 2x2 block, at 1/9 of the multiply-adds; the residual blocks that follow
    mix neighbours. Either way odd sizes are cropped by the U-Net to the skip's size."""

    def __init__(self, channels: int, out_channels: int | None = None, mode: str = "conv"):
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"unknown upsample mode {mode!r}; valid: {', '.join(UPSAMPLE_MODES)}")
        self.mode = mode
        out = out_channels or channels
        self.conv = (nn.Conv2d(channels, out, 3, padding=1) if mode == "conv"
                     else nn.ConvTranspose2d(channels, out, 2, stride=2))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(upsample_nearest2x(x) if self.mode == "conv" else x)


class Attention(nn.Module):
    """Multi-head (cross-)attention through ``scaled_dot_product_attention`` (Vaswani et al.
    2017), named as latent diffusion's ``CrossAttention``: to_q, to_k, to_v, to_out.0."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
        attn_mask = None
        if mask is not None:  # (B, M) True where the context token is real
            attn_mask = mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU feed-forward input, Shazeer 2020 ("GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, GEGLU MLP (latent diffusion).
    Without a context dimension the cross-attention layer is omitted."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.has_cross = context_dim is not None
        if self.has_cross:
            self.attn2 = Attention(dim, context_dim, heads, dim_head)
            self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.has_cross and context is not None:
            x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image tokens through ``depth`` transformer blocks, between 1x1 (or linear) projections
    (latent diffusion's ``SpatialTransformer``; ``use_linear`` as in SD 2.x and SDXL).

    ``pos_embed`` adds a learned projection of :func:`position_features` to the tokens before
    the blocks (zero-initialised, so it starts as the plain transformer): attention is otherwise
    blind to where a token sits, and cross-attention cannot tie "at the top left" to a place.
    Latent diffusion has no such term (its deep U-Net learns places from convolution padding);
    small sumie models need it. Off for the Stable Diffusion layouts."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1,
                 context_dim: int | None = None, use_linear: bool = False, groups: int = 32,
                 dropout: float = 0.0, pos_embed: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.pos_proj = zero_module(nn.Linear(4 * POS_FREQS, inner, bias=False)) if pos_embed else None
        self.norm = group_norm(channels, groups, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = zero_module(nn.Linear(inner, channels))
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = zero_module(nn.Conv2d(inner, channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, H*W, C), contiguous: LayerNorm and adds run dense
        if self.use_linear:
            x = self.proj_in(x)
        if self.pos_proj is not None:
            x = x + self.pos_proj(position_features(h, w, x.device, x.dtype))
        for block in self.transformer_blocks:
            x = block(x, context, mask)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
