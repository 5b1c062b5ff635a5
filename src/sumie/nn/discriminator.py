"""The PatchGAN discriminator of pix2pix (Isola et al. 2017), as latent diffusion's autoencoder uses it.

Each output logit judges one overlapping patch of the input (70x70 pixels with three
layers), so the adversarial loss sharpens local texture without asking the autoencoder to
fool a global classifier. GroupNorm stands in for pix2pix's BatchNorm: no running
statistics, identical behaviour at batch size 1 and in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import group_norm


class PatchDiscriminator(nn.Module):
    """Image (B, C, H, W) -> patch logits (B, 1, ~H/2^n, ~W/2^n); 4x4 convolutions, LeakyReLU(0.2)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm_groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, n_layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1  # the last block keeps the resolution (pix2pix)
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False),
                       group_norm(out, norm_groups), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix initialisation: N(0, 0.02) convolutions
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator, Lim & Ye 2017: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))], halved (LDM)."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: -E[D(G(z))]."""
    return -logits_fake.mean()
