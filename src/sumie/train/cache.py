"""A training cache: the run's first epochs, encoded once and replayed from device memory.

A latent-diffusion step spends much of its time outside the U-Net: decoding and augmenting
images, rendering procedural scenes, the frozen autoencoder's encoder (27% of a CPU step for
the bundled model), tokenizing captions, and on a GPU the host-to-device copies and the
worker processes that feed them. With ``train.cache_epochs = K`` the trainer reads the first
K epochs' examples once (positions ``0 .. K*N-1``, in the run's own order, so the same items
an uncached run would see; no more than the run's ``max_steps`` will read), encodes them with the training space (the latent posterior's
mean, the autoencoder being frozen), tokenizes their captions once, and keeps all of it on
the training device. Each step is then a gather from device memory; position ``j`` of the
run reads slot ``j mod K*N``, so epochs after the K-th replay the first K in order.

This is what an image-folder cache of latents does in SD fine-tuning scripts (kohya's
``cache_latents``, diffusers' ``--cache_latents``); a cached item is a pure function of its
position, so runs stay deterministic and resumable. Not cached: a frozen pretrained text
encoder's inputs (``text.kind = hf``), and posterior samples (``latent.sample_posterior``),
which would be frozen to one draw.
"""

from __future__ import annotations

import math
import os
import time

import torch
from torch.utils.data import DataLoader, Dataset


class EncodedCache:
    """Positions ``0 .. size-1`` of a run's data, encoded: latents, and labels or tokenized captions."""

    def __init__(self, positions: Dataset, size: int, *, encode, item_shape: tuple[int, ...], tokenize=None,
                 device: torch.device, num_workers: int = 0, chunk: int = 512, log=print):
        if size < 1:
            raise ValueError("a training cache needs at least one example (train.cache_epochs >= 1)")
        need, free = size * math.prod(item_shape) * 4, _free_memory(device)
        if need > free // 2:
            raise MemoryError(f"train.cache_epochs: {size} examples need {need / 2**30:.1f} GiB of latents on {device}, "
                              f"more than half the {free / 2**30:.1f} GiB free; lower train.cache_epochs")
        t0 = time.perf_counter()
        loader = DataLoader(_Range(positions, size), batch_size=chunk, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
        latents, labels, captions = [], [], []
        for batch in loader:
            latents.append(encode(batch["x"].to(device, non_blocking=True)).float())
            labels.append(torch.as_tensor(batch["label"]).long())
            captions += list(batch.get("caption", []))
        self.x0 = torch.cat(latents)  # (size, C, h, w) on the device
        self.label = torch.cat(labels).to(device)
        self.tokens = tokenize(captions).to(device) if tokenize is not None and captions else None
        self.size, self.device = size, device
        mib = self.x0.numel() * 4 / 2**20
        log(f"cache: {size} examples encoded in {time.perf_counter() - t0:.1f}s ({mib:.0f} MiB of latents "
            f"on {device})")

    def batch(self, start: int, n: int) -> dict:
        """The examples at run positions ``start .. start+n-1`` (index tensors stay on the device)."""
        slots = torch.arange(start, start + n, device=self.device) % self.size
        out = {"x0": self.x0[slots], "label": self.label[slots], "slots": slots}
        if self.tokens is not None:
            out["tokens"] = self.tokens.rows(slots)
        return out


def _free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or the host's physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class _Range(Dataset):
    """The first ``size`` items of an endless positions dataset, without its other keys."""

    def __init__(self, positions: Dataset, size: int):
        self.positions, self.size = positions, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, j: int) -> dict:
        item = self.positions[j]
        out = {"x": item["x"], "label": item.get("label", -1)}
        if "caption" in item:
            out["caption"] = item["caption"]
        return out
