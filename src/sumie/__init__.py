"""sumie: text-to-image diffusion, built from the forward process up.

The whole system rests on one contract::

    denoiser(x, sigma, cond) -> estimate of the clean x0

with ``x = x0 + sigma * eps`` (the variance-exploding form of Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", eq. 1).
"""

__version__ = "0.1.0"
