"""Pictures that explain diffusion: the forward process of an image, frame by frame.

The forward process of Ho et al. 2020 (eq. 4) in its variance-preserving form,
``z_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``, is what people picture as ink
dissolving in water: the image fades while the noise rises, and at t = T only noise is
left. (sumie's samplers work in the equivalent VE form x = z_t / sqrt(alpha_bar_t).)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .diffusion.schedules import DiscreteSchedule, sigma_to_alpha_bar
from .image import from_pil, make_grid, save_gif, save_png, to_uint8


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Read an image (any PIL mode, EXIF orientation applied, transparency on white:
    :func:`sumie.generation.images.load_image`), centre-crop it square and resize to ``size``:
    (3, size, size) in [-1, 1]."""
    from .generation.images import load_image as read_image

    img = read_image(Path(path))
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return from_pil(img.convert("RGBA").resize((size, size), Image.LANCZOS))


def forward_frames(x0: torch.Tensor, timesteps: torch.Tensor, schedule: DiscreteSchedule,
                   seed: int = 0) -> torch.Tensor:
    """z_t for each timestep with one shared eps (so frames morph smoothly): (T, 3, H, W) in VP scale."""
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sig = schedule.t_to_sigma(timesteps.double())
    ab = sigma_to_alpha_bar(sig).float()
    return ab.sqrt()[:, None, None, None] * x0[None] + (1 - ab).sqrt()[:, None, None, None] * eps[None]


def _label(img: np.ndarray, text: str) -> np.ndarray:
    """Add a white caption band under an (H, W, 3) image."""
    h, w, _ = img.shape
    out = Image.new("RGB", (w, h + 14), (255, 255, 255))
    out.paste(Image.fromarray(img), (0, 0))
    ImageDraw.Draw(out).text((2, h + 1), text, fill=(0, 0, 0))
    return np.asarray(out)


def explain_forward(image: str | Path, out_dir: str | Path, *, size: int = 128, frames: int = 8,
                    gif_frames: int = 48, beta_schedule: str = "linear", num_timesteps: int = 1000,
                    seed: int = 0) -> dict[str, Path]:
    """Write ``forward_strip.png`` (labelled frames) and ``forward.gif`` for ``image``."""
    if frames < 2 or gif_frames < 2:
        raise ValueError("need at least 2 frames")
    schedule = DiscreteSchedule.named(beta_schedule, num_timesteps)
    x0 = load_image(image, size)
    out_dir = Path(out_dir)
    T = num_timesteps - 1
    ts = torch.linspace(0, T, frames).round()
    strip_frames = to_uint8(forward_frames(x0, ts, schedule, seed).clamp(-1, 1))
    ab = schedule.alphas_cumprod
    labelled = [_label(f, f"t={int(t)} ab={float(ab[int(t)]):.2f}") for f, t in zip(strip_frames, ts)]
    strip = make_grid(np.stack([_label(to_uint8(x0), "x0 (clean)")] + labelled), ncols=frames + 1)
    # GIF: clean image, then the process with t growing (denser at small t, where change is visible)
    gts = (torch.linspace(0, 1, gif_frames) ** 1.5 * T).round()
    gif = to_uint8(forward_frames(x0, gts, schedule, seed).clamp(-1, 1))
    return {"strip": save_png(out_dir / "forward_strip.png", strip),
            "gif": save_gif(out_dir / "forward.gif", list(gif), duration_ms=60, final_hold_ms=1200)}


# ---------------------------------------------------------------------------
# The reverse process: x_sigma and the x0 estimate at every step
# ---------------------------------------------------------------------------

def vp_view(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x_sigma shown at unit scale: x / sqrt(1 + sigma^2) (the VP z_t that x is a rescaling of)."""
    return x / math.sqrt(1.0 + sigma**2)


def reverse_trajectory(denoiser, shape, *, cond=None, uncond=None, sampler: str = "heun", schedule: str | None = None,
                       steps: int = 30, guidance_scale: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, list]:
    """Sample one image and record, per sampler step, (sigma, x_sigma, x0 estimate), each (C, H, W)."""
    from .pipeline import sample
    from .samplers.base import StepInfo

    frames: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    def record(info: StepInfo) -> None:
        frames.append((info.sigma, info.x[0].detach().float().cpu(), info.denoised[0].detach().float().cpu()))

    x = sample(denoiser, shape, 1, cond=cond, uncond=uncond, sampler=sampler, schedule=schedule, steps=steps,
               guidance_scale=guidance_scale, seed=seed, callback=record)
    return x[0].float().cpu(), frames


def _pick(n: int, k: int) -> list[int]:
    """k indices spread over range(n), first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def reverse_pictures(final: torch.Tensor, frames: list, *, columns: int = 8, scale: int = 4) -> tuple[np.ndarray, list]:
    """A two-row strip (x_sigma above, x0 estimate below, ``columns`` steps + the result) and GIF frames."""
    from .image import upscale

    def show(t: torch.Tensor) -> np.ndarray:
        return upscale(to_uint8(t[:3].clamp(-1, 1)), scale)

    idx = _pick(len(frames), columns)
    top = [_label(show(vp_view(frames[i][1], frames[i][0])), f"x s={frames[i][0]:.3g}") for i in idx]
    bottom = [_label(show(frames[i][2]), f"x0^ step {i + 1}") for i in idx]
    top.append(_label(show(final), "result"))
    bottom.append(_label(show(final), f"{len(frames)} steps"))
    strip = make_grid(np.stack(top + bottom), ncols=len(top))
    gif = []
    for i, (sigma, x, d) in enumerate(frames):
        pair = np.concatenate([show(vp_view(x, sigma)), np.full((show(x).shape[0], 4, 3), 255, np.uint8), show(d)], 1)
        gif.append(_label(pair, f"{i + 1}/{len(frames)} s={sigma:.3g}"))
    pair = np.concatenate([show(final), np.full((show(final).shape[0], 4, 3), 255, np.uint8), show(final)], 1)
    gif.append(_label(pair, "result"))
    return strip, gif


def explain_reverse(run: str | Path, out_dir: str | Path, *, label: int | None = None, prompt: str | None = None,
                    sampler: str | None = None, schedule: str | None = None, steps: int | None = None,
                    guidance_scale: float | None = None, seed: int = 0, columns: int = 8, scale: int = 4,
                    ema: bool = True) -> dict[str, Path]:
    """Write ``reverse_strip.png`` and ``reverse.gif``: the reverse process of one image from a run."""
    from .generation import GenerationRequest, SumieFamily, generate
    from .samplers.base import StepInfo

    family = SumieFamily.load(run, ema=ema)
    config = family.config
    if family.conditioning == "caption":
        if label is not None:
            raise ValueError("this model is text-conditioned: use --prompt instead of --label/--shape/--color")
    elif family.conditioning == "class":
        if prompt:
            raise ValueError("this model has no text encoder; use --label or --shape/--color instead of --prompt")
        if label is None:
            raise ValueError(f"this model is class-conditional: choose what to draw with --label (0 to "
                             f"{config.model.num_classes - 1}) or --shape/--color")
        if not 0 <= label < config.model.num_classes:
            raise ValueError(f"class labels must be in [0, {config.model.num_classes}), got {label}")
    frames: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    def record(info: StepInfo) -> None:
        frames.append((info.sigma, info.x[:1].detach().float(), info.denoised[:1].detach().float()))

    req = GenerationRequest(prompt=(prompt or "") if family.conditioning == "caption" else "",
                            class_labels=[label] if family.conditioning == "class" else None, seed=seed,
                            sampler=sampler, schedule=schedule or None, steps=steps, guidance_scale=guidance_scale,
                            callback=record)
    result = generate(family, req)
    final = torch.from_numpy(result.images[0]).permute(2, 0, 1).float() / 127.5 - 1
    with family.space() as space, torch.no_grad():  # latent models: every frame is decoded to pixels
        frames = [(sig, space.decode(xs)[0].cpu(), space.decode(x0)[0].cpu()) for sig, xs, x0 in frames]
    strip, gif = reverse_pictures(final, frames, columns=columns, scale=scale)
    out_dir = Path(out_dir)
    return {"strip": save_png(out_dir / "reverse_strip.png", strip),
            "gif": save_gif(out_dir / "reverse.gif", gif, duration_ms=120, final_hold_ms=1500)}


# ---------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------

def read_log(run: str | Path) -> list[dict]:
    """Rows of ``RUN/log.jsonl``; a step logged twice (resumed run) keeps its last row; bad lines are errors."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {run} a run folder?")
    rows: dict[int, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[int(row["step"])] = row
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: not a log row with a 'step' ({e})") from e
    if not rows:
        raise ValueError(f"{path} has no rows yet")
    return [rows[k] for k in sorted(rows)]


def smooth(values: Sequence[float], alpha: float = 0.1) -> np.ndarray:
    """Exponential moving average with bias correction (as Adam's), so the first points are not pulled to 0."""
    out, m = [], 0.0
    for i, v in enumerate(values, 1):
        m = (1 - alpha) * m + alpha * v
        out.append(m / (1 - (1 - alpha) ** i))
    return np.asarray(out)


def explain_curves(run: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """``curves.png`` (every logged quantity against step) plus one PNG per quantity (loss.png, lr.png, ...).

    The loss is drawn raw and as an exponential moving average; any other numeric column of
    log.jsonl (learning rate, images/s, an EMA-model loss if a run logs one) gets its own panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(run)
    out_dir = Path(out_dir) if out_dir is not None else Path(run) / "curves"
    steps = np.asarray([r["step"] for r in rows])
    keys = [k for k in rows[-1] if k != "step" and all(isinstance(r.get(k), (int, float)) for r in rows)]
    keys.sort(key=lambda k: (k != "loss", k != "lr", k))

    def draw(ax, k):
        v = np.asarray([r[k] for r in rows], dtype=float)
        if k == "loss" or "loss" in k:
            ax.plot(steps, v, alpha=0.35, lw=0.8, label="logged")
            ax.plot(steps, smooth(v), lw=1.6, label="moving average")
            if (v > 0).all():
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.plot(steps, v, lw=1.4)
        ax.set_xlabel("step")
        ax.set_title(k, fontsize=10)
        ax.grid(alpha=0.3)

    paths = {}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        draw(ax, k)
    fig.suptitle(f"{Path(run).name}: {len(rows)} log rows, steps {steps[0]}-{steps[-1]}", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "curves.png", dpi=110)
    plt.close(fig)
    paths["curves"] = out_dir / "curves.png"
    for k in keys:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        draw(ax, k)
        fig.tight_layout()
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in k)
        fig.savefig(out_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        paths[k] = out_dir / f"{name}.png"
    return paths


# ---------------------------------------------------------------------------
# Cross-attention maps: which tokens painted which pixels
# ---------------------------------------------------------------------------

def attention_probs(attn, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of a :class:`sumie.nn.layers.Attention` for its inputs: (B, heads, N, M).

    The same projections and head split as ``Attention.forward``; ``tests/test_explain.py``
    checks that ``to_out(probs @ v)`` reproduces the layer's output.
    """
    b, n, _ = x.shape
    q, k = attn.to_q(x), attn.to_k(context)
    q, k = (t.reshape(b, t.shape[1], attn.heads, -1).transpose(1, 2) for t in (q, k))  # (B, h, N|M, d)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:  # (B, M) True where the token is real
        logits = logits.masked_fill(~mask[:, None, None, :].to(torch.bool), float("-inf"))
    return logits.float().softmax(-1)


class CrossAttentionMaps:
    """Capture the cross-attention probabilities of every ``attn2`` layer of a U-Net while it runs.

    Use as a context manager around sampling (or any forward calls). Each layer's probabilities
    are averaged over heads, reshaped to that layer's (h, w) token grid, bilinearly upsampled to
    ``image_size`` and summed; :meth:`maps` returns the mean over layers and calls,
    (B, M, H, W), one map per context token (Hertz et al. 2022, "Prompt-to-Prompt", sec. 3.1).
    Calls whose batch differs from ``batch_size`` (e.g. the doubled batch of classifier-free
    guidance) keep only their first ``batch_size`` rows, the conditional half.
    """

    def __init__(self, net: torch.nn.Module, image_size: tuple[int, int], batch_size: int | None = None):
        from .nn.layers import BasicTransformerBlock

        self.net, self.image_size, self.batch_size = net, tuple(image_size), batch_size
        self.layers = [(name, m.attn2) for name, m in net.named_modules()
                       if isinstance(m, BasicTransformerBlock) and m.has_cross]
        if not self.layers:
            raise ValueError("this network has no cross-attention layers (model.context_dim is unset): attention "
                             "maps need a text-conditioned U-Net")
        self._handles: list = []
        self.sum: torch.Tensor | None = None
        self.count = 0
        self.per_layer: dict[str, int] = {}

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            x = args[0]
            context = args[1] if len(args) > 1 else kwargs.get("context")
            mask = args[2] if len(args) > 2 else kwargs.get("mask")
            if context is None:
                return
            with torch.no_grad():
                p = attention_probs(module, x, context, mask).mean(1)  # (B, N, M)
                b = self.batch_size or p.shape[0]
                p = p[:b]
                H, W = self.image_size
                f = math.sqrt(H * W / p.shape[1])
                h, w = round(H / f), round(W / f)
                if h * w != p.shape[1]:
                    raise ValueError(f"layer {name}: {p.shape[1]} tokens do not tile a {H}x{W} image")
                m = p.transpose(1, 2).reshape(b, -1, h, w)  # (B, M, h, w)
                m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False) if (h, w) != (H, W) else m
                self.sum = m if self.sum is None else self.sum + m
                self.count += 1
                self.per_layer[name] = self.per_layer.get(name, 0) + 1
        return hook

    def __enter__(self) -> "CrossAttentionMaps":
        self._handles = [attn.register_forward_hook(self._hook(name), with_kwargs=True) for name, attn in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def maps(self) -> torch.Tensor:
        """Mean attention map per token over layers, heads and calls: (B, M, H, W); each pixel sums to 1 over M."""
        if self.sum is None:
            raise ValueError("no cross-attention was captured: run the network with a context inside the `with` block")
        return self.sum / self.count


def _colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 with matplotlib's inferno."""
    import matplotlib

    return (matplotlib.colormaps["inferno"](np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def attention_heatmaps(image: np.ndarray, maps: torch.Tensor, tokens: Sequence[str], scale: int = 4) -> np.ndarray:
    """The image followed by one heatmap per token, overlaid 50/50 and labelled: (H', W', 3) uint8.

    ``image`` (H, W, 3) uint8; ``maps`` (M, H, W); each map is normalised by its own maximum.
    """
    from .image import upscale

    if len(tokens) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {len(tokens)} token labels")
    tiles = [_label(upscale(image, scale), "image")]
    for m, tok in zip(maps.float().cpu().numpy(), tokens):
        heat = _colormap(m / max(float(m.max()), 1e-12))
        blend = (0.5 * image.astype(np.float32) + 0.5 * heat.astype(np.float32)).astype(np.uint8)
        tiles.append(_label(upscale(blend, scale), tok[:12]))
    return make_grid(np.stack(tiles), ncols=min(len(tiles), 8))


def token_labels(tokenizer, prompt: str) -> tuple[list[str], torch.Tensor]:
    """Readable labels of a prompt's real tokens and their positions in the context, from the tokenizer."""
    tok = tokenizer([prompt])
    ids, mask = tok.input_ids[0], tok.attention_mask[0].bool()
    vocab = getattr(tokenizer, "vocab", None)
    pos = mask.nonzero().flatten()
    return [str(vocab[int(ids[i])]) if vocab is not None else str(int(ids[i])) for i in pos], pos


def explain_attention(run: str | Path, prompt: str, out_dir: str | Path, *, sampler: str | None = None,
                      steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                      scale: int = 4) -> dict[str, Path]:
    """``attention.png``: a sample for ``prompt`` and, per token, where the U-Net's cross-attention looked
    (averaged over heads, layers and sampling steps). Needs a text-conditioned run."""
    from .generation import GenerationRequest, SumieFamily, generate

    family = SumieFamily.load(run)
    config = family.config
    if config.data.conditioning != "caption" or config.model.context_dim is None:
        raise ValueError("attention maps need a text-conditioned model (data.conditioning = 'caption'); "
                         f"{run} is conditioned on {config.data.conditioning!r}")
    enc, res = family.encoder, config.data.resolution
    with CrossAttentionMaps(family.denoiser_.net, (res, res), batch_size=1) as cap:  # maps at the image's size
        image = generate(family, GenerationRequest(prompt=prompt, sampler=sampler, steps=steps,
                                                   guidance_scale=guidance_scale, seed=seed)).images[0]
    labels, pos = token_labels(enc.tokenizer, prompt)
    grid = attention_heatmaps(image, cap.maps()[0, pos], labels, scale)
    return {"attention": save_png(Path(out_dir) / "attention.png", grid)}
