"""Typed run configuration: dataclasses, named presets, TOML/YAML files, strict keys.

A run is described by one :class:`RunConfig`; the resolved config is written as
``config.json`` into every run folder (the habit of nanoGPT's ``GPTConfig`` and edm2's
``training_options.json``). Unknown keys are errors that list the valid keys.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .nn.unet import UNetConfig
from .text.base import TextConfig


@dataclass
class DiffusionConfig:
    """The diffusion process and its training objective."""

    parameterization: str = "edm"  # eps | v | x0 | edm
    beta_schedule: str = "linear"  # discrete schedules only: linear | scaled_linear | cosine
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False
    sigma_data: float = 0.5  # EDM
    sigma_min: float = 0.002  # EDM sampling range
    sigma_max: float = 80.0
    p_mean: float = -1.2  # EDM log-normal training sigma
    p_std: float = 1.2
    loss_weighting: str = "native"  # native | min_snr
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.0

    # fields that shape the training objective only (not the denoiser): a fine-tune may change them
    OBJECTIVE_FIELDS: ClassVar[tuple[str, ...]] = ("p_mean", "p_std", "loss_weighting", "min_snr_gamma",
                                                   "noise_offset")


@dataclass
class DataConfig:
    kind: str = "shapes"  # shapes | folder
    resolution: int = 32
    path: str | None = None  # image folder for kind = "folder"
    background: str = "plain"  # shapes: plain | textured | mixed
    max_objects: int = 1
    seed: int = 0
    random_flip: bool = True
    conditioning: str = "class"  # class | caption | none
    split: str | None = None  # folder: only images whose metadata.jsonl row has this "split" (e.g. "train")
    shapes_fraction: float = 0.0  # folder: this fraction of examples are procedural shapes scenes instead


@dataclass
class TrainConfig:
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 200
    lr_schedule: str = "constant"  # constant | cosine (decays over max_steps or time_budget_s)
    lr_min_ratio: float = 0.1
    max_steps: int = 10_000
    time_budget_s: float | None = None  # stop after this many seconds of training, if set
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.999
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | fp32 | bf16 | fp16
    cond_drop_prob: float = 0.1  # condition dropout for classifier-free guidance
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 1000
    sample_n: int = 16
    log_every: int = 25
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int | None = None
    num_workers: int = 0  # data-loading worker processes (0: load in the training process); order unchanged
    cache_epochs: int = 0  # > 0: encode the first K epochs once and replay them from device memory (train/cache.py)
    compile: bool = False  # torch.compile the U-Net for training (inductor): ~1.5 min of compiling on 2 CPU
    # cores when its cache is cold, then ~1.2x more images/s on CPU; falls back to eager with a warning if it fails.
    init_from: str | None = None  # start from this model's EMA weights (run, ckpt-* or exported folder): fine-tuning


@dataclass
class SampleConfig:
    sampler: str = "heun"
    schedule: str = "karras"
    steps: int = 30
    rho: float = 7.0
    eta: float = 0.0
    guidance_scale: float = 1.0


@dataclass
class LatentConfig:
    """Latent diffusion (Rombach et al. 2022): train and sample in a frozen autoencoder's latent space."""

    vae: str | None = None  # autoencoder folder (`sumie train-vae` writes RUN/vae); None: pixel space
    sample_posterior: bool = False  # encode training images to a posterior sample instead of its mean


@dataclass
class RunConfig:
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------

def _shapes_model(**kw) -> UNetConfig:
    from .data.shapes import NUM_CLASSES

    base = dict(in_channels=3, out_channels=3, model_channels=48, channel_mult=(1, 2, 2), num_res_blocks=1,
                attention_resolutions=(4,), num_heads=4, num_classes=NUM_CLASSES, norm_groups=8, patch_size=2)
    base.update(kw)
    return UNetConfig(**base)


def _preset_shapes32() -> RunConfig:
    """Class-conditional (shape x colour) pixel model at 32x32, sized for minutes on 2 CPU cores:
    a 1.4M-parameter U-Net behind a 2x2 patch stem, with AdaGN conditioning (scale and shift of
    the normalised features, Dhariwal & Nichol 2021) and transposed-convolution upsampling,
    constant LR after warmup (the EMA does the averaging), condition dropout for classifier-free
    guidance at sampling time. Measured in the README (``benchmarks/train_shapes.py``)."""
    return RunConfig(model=_shapes_model(model_channels=32, resblock_scale_shift=True, upsample="transposed"),
                     data=DataConfig(kind="shapes", resolution=32),
                     train=TrainConfig(batch_size=32, lr=2e-3, max_steps=20000, warmup_steps=100,
                                       lr_schedule="constant", ckpt_every=500, sample_every=1000, ema_decay=0.998),
                     sample=SampleConfig(guidance_scale=5.0))


def _preset_tiny() -> RunConfig:
    """A few-second model for tests and smoke runs."""
    return RunConfig(model=_shapes_model(model_channels=16, channel_mult=(1, 2), attention_resolutions=(2,),
                                         norm_groups=8, num_heads=2, patch_size=1),
                     data=DataConfig(kind="shapes", resolution=16),
                     train=TrainConfig(batch_size=16, lr=2e-3, max_steps=40, warmup_steps=5, ckpt_every=20,
                                       sample_every=0, sample_n=4, log_every=10, ema_decay=0.9),
                     sample=SampleConfig(steps=8))


def _preset_shapes_text32() -> RunConfig:
    """Text-to-image on captioned `shapes` scenes of one or two objects at 32x32: a small word-level
    transformer text encoder trained with the U-Net, cross-attention at 1/4 and 1/8 resolution."""
    text = TextConfig(kind="small", width=128, layers=2, heads=4, max_length=32)
    return RunConfig(model=_shapes_model(model_channels=32, num_classes=None, context_dim=text.width,
                                         attention_resolutions=(2, 4)),
                     text=text, data=DataConfig(kind="shapes", resolution=32, max_objects=2, conditioning="caption"),
                     train=TrainConfig(batch_size=32, lr=2e-3, max_steps=20000, warmup_steps=100,
                                       lr_schedule="cosine", ckpt_every=500, sample_every=1000, ema_decay=0.998),
                     sample=SampleConfig(guidance_scale=5.0))


def _preset_tiny_text() -> RunConfig:
    """A few-second caption-conditioned model for tests and smoke runs."""
    cfg = _preset_tiny()
    cfg.text = TextConfig(kind="small", width=32, layers=1, heads=2, max_length=24)
    cfg.model = _shapes_model(model_channels=16, channel_mult=(1, 2), attention_resolutions=(2,), norm_groups=8,
                              num_heads=2, patch_size=1, num_classes=None, context_dim=32)
    cfg.data.conditioning = "caption"
    return cfg


def _preset_emoji64() -> RunConfig:
    """The bundled text-to-image model: latent diffusion (Rombach et al. 2022) on emoji artwork
    (``sumie data emoji``) with 40% captioned shapes scenes of one or two objects mixed in, at
    64x64, in the 16x16x4 latent space of a kl-f4 autoencoder (``sumie train-vae --preset
    emoji-f4``); the word-level text encoder is trained with the U-Net. Set data.path to the
    emoji folder and latent.vae to the autoencoder folder (RUN/vae)."""
    cfg = _preset_emoji64_pixel()
    cfg.model.in_channels = cfg.model.out_channels = 4
    cfg.model.patch_size = 1
    cfg.diffusion.sigma_data = 1.0  # latents are scaled to unit variance
    return cfg


def _preset_emoji64_pixel() -> RunConfig:
    """The same data and U-Net in pixel space behind a 4x4 patch stem (the U-Net runs at 16x16).
    Kept for comparison: at equal training time it leaves visible high-frequency noise that the
    latent model does not (the 64-channel first level carries 48 pixel values per token)."""
    text = TextConfig(kind="small", width=128, layers=2, heads=4, max_length=32)
    return RunConfig(model=_shapes_model(model_channels=64, num_classes=None, context_dim=text.width,
                                         attention_resolutions=(2, 4), patch_size=4),
                     text=text,
                     data=DataConfig(kind="folder", resolution=64, split="train", random_flip=False,
                                     shapes_fraction=0.4, max_objects=2, conditioning="caption"),
                     train=TrainConfig(batch_size=32, lr=2e-3, max_steps=200_000, warmup_steps=200,
                                       lr_schedule="cosine", ckpt_every=500, sample_every=2000, ema_decay=0.999),
                     sample=SampleConfig(sampler="heun", steps=20, guidance_scale=4.0))


def _preset_tiny_latent() -> RunConfig:
    """The tiny model on the 8x8x4 latents of a kl-f4 autoencoder of 32x32 shapes (set latent.vae)."""
    cfg = _preset_tiny()
    cfg.model.in_channels = cfg.model.out_channels = 4
    cfg.data.resolution = 32
    cfg.diffusion.sigma_data = 1.0  # latents are scaled to unit variance
    return cfg


PRESETS = {"shapes-32": _preset_shapes32, "shapes-text-32": _preset_shapes_text32, "tiny": _preset_tiny,
           "tiny-text": _preset_tiny_text, "emoji-64": _preset_emoji64, "emoji-64-pixel": _preset_emoji64_pixel}
PRESETS["tiny-latent"] = _preset_tiny_latent


def preset(name: str) -> RunConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}") from None


# ---------------------------------------------------------------------------
# dicts and files -> dataclasses, with strict keys
# ---------------------------------------------------------------------------

def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args:
            try:
                return _coerce(a, value, where)
            except (TypeError, ValueError):
                continue
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise TypeError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _from_dict(cls: type, data: Any, where: str = "config") -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a table of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(repr(k) for k in unknown)} in {where}; "
                         f"valid keys: {', '.join(sorted(fields))}")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def merge(config: RunConfig, updates: dict) -> RunConfig:
    """Return ``config`` with the nested ``updates`` applied (strict keys)."""
    base = dataclasses.asdict(config)
    unknown = sorted(set(updates) - set(base))
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(map(repr, unknown))} in config; "
                         f"valid sections: {', '.join(sorted(base))}")
    for section, values in updates.items():
        if not isinstance(values, dict):
            raise TypeError(f"config section {section!r} must be a table of keys")
        sub_cls = type(getattr(config, section))
        valid = {f.name for f in dataclasses.fields(sub_cls)}
        bad = sorted(set(values) - valid)
        if bad:
            raise ValueError(f"unknown key(s) {', '.join(map(repr, bad))} in [{section}]; "
                             f"valid keys: {', '.join(sorted(valid))}")
        base[section].update(values)
    return _from_dict(type(config), base, "config")


def from_dict(data: dict) -> RunConfig:
    return _from_dict(RunConfig, data, "config")


def read_config_file(path: str | Path) -> dict:
    """Read a TOML (.toml), YAML (.yaml/.yml) or JSON file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        return tomllib.loads(text)
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    if suffix == ".json":
        return json.loads(text)
    raise ValueError(f"unsupported config file {path.name}: use .toml, .yaml, .yml or .json")


def parse_override(text: str) -> dict:
    """``section.key=value`` (value parsed as JSON when possible) -> {section: {key: value}}."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"override {text!r} must look like section.key=value, e.g. train.max_steps=500")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return {section: {name: value}}


def resolve(preset_name: str | None = "shapes-32", file: str | Path | None = None,
            overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Preset, then file, then ``section.key=value`` overrides, each strictly checked."""
    config = preset(preset_name) if preset_name else RunConfig()
    if file is not None:
        config = merge(config, read_config_file(file))
    for o in overrides:
        config = merge(config, parse_override(o))
    return config
