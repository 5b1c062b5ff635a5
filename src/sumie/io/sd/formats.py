"""Stable Diffusion weights in three layouts, read into one :class:`SDCheckpoint` and written back.

* single file: one safetensors (or, with ``allow_pickle``, a ``.ckpt``) with the original
  latent-diffusion key names, U-Net under ``model.diffusion_model.``, autoencoder under
  ``first_stage_model.``, text encoders under ``cond_stage_model.`` / ``conditioner.embedders.N.``;
* diffusers folder: ``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder*/``,
  ``scheduler/`` sub-folders, each weight file possibly sharded behind an ``*.index.json``;
* sumie native: ``sumie.json`` (family, prediction, configs) next to ``unet.safetensors``,
  ``vae.safetensors`` and ``text_encoder*.safetensors`` in sumie's own key names.

Text-encoder weights are not interpreted here: they are handed on as raw tensors tagged with
their kind (clip-l, openclip-h, openclip-bigg) and key layout, for ``sumie.text`` to build.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...nn.unet import UNet, UNetConfig
from ...nn.vae import AutoencoderKL, VAEConfig
from ...text.conditioner import SDXL_SIZE_EMBED
from ..checkpoint import CheckpointError, check_state_shapes, on_meta, read_json, write_json
from . import keymaps
from .diffusers_config import (unet_config_from_diffusers, unet_config_to_diffusers, vae_config_from_diffusers,
                               vae_config_to_diffusers)
from .families import (TEXT_WIDTHS, UNET_PREFIX, VAE_PREFIXES, Family, TextEncoderSpec, detect_family,
                       detect_prediction, family, unet_config_for, unet_features, vae_config_from_weights)
from .tensors import Weights, materialize, open_safetensors, open_sharded, open_weights, write_safetensors

NATIVE_MANIFEST = "sumie.json"
NATIVE_FORMAT = "sumie-sd/1"
_TEXT_KIND_BY_WIDTH = {w: k for k, w in TEXT_WIDTHS.items()}


@dataclass
class TextEncoderWeights:
    """Raw text-encoder tensors: ``kind`` names the model, ``layout`` the key convention
    ("hf": transformers ``CLIPTextModel`` names; "open_clip": OpenCLIP's)."""

    slot: str
    kind: str
    layout: str
    weights: Weights
    # SD 2.x's OpenCLIP-H already cut after its penultimate block, as diffusers stores it: read its
    # last block (not its penultimate). Hugging-Face layout implies it; single files say so in the header.
    cut: bool = False

    def __post_init__(self):
        if self.kind == "openclip-h" and self.layout == "hf":
            self.cut = True

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return materialize(self.weights, dtype)

    @property
    def width(self) -> int | None:
        """Token width (the token embedding's); None without a token embedding."""
        return _text_width(self.weights, self.layout)

    @property
    def pooled_width(self) -> int | None:
        """Width of the pooled output: the projection's, else the token width."""
        if self.layout == "open_clip" and "text_projection" in self.weights:
            return self.weights["text_projection"].shape[1]  # (D, P)
        if self.layout == "hf" and "text_projection.weight" in self.weights:
            return self.weights["text_projection.weight"].shape[0]  # (P, D)
        return self.width

    def in_layout(self, layout: str) -> Weights:
        if layout == self.layout:
            return self.weights
        if layout == "open_clip":
            return keymaps.text_hf_to_openclip(self.weights)
        return keymaps.text_openclip_to_hf(self.weights)


@dataclass
class SDCheckpoint:
    """A Stable Diffusion model in sumie's terms; tensors stay lazy until a build or save."""

    family: Family
    prediction: str  # "eps" or "v"
    unet_config: UNetConfig
    vae_config: VAEConfig
    unet: Weights
    vae: Weights
    text_encoders: dict[str, TextEncoderWeights] = field(default_factory=dict)
    source: str = ""
    notes: list[str] = field(default_factory=list)  # how family and prediction were decided

    @property
    def resolution(self) -> int:
        f = self.family
        return f.v_resolution if self.prediction == "v" and f.v_resolution else f.resolution

    def build_unet(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> UNet:
        return _build(UNet, self.unet_config, self.unet, dtype, device, f"{self.source} (U-Net)")

    def build_vae(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AutoencoderKL:
        return _build(AutoencoderKL, self.vae_config, self.vae, dtype, device, f"{self.source} (VAE)")


def check_shapes(expected: dict[str, tuple], weights: Weights, what: str) -> None:
    """Every expected tensor present with its shape, nothing extra; the error names tensors."""
    check_state_shapes(expected, {k: w.shape for k, w in weights.items()}, what)


def _build(cls, config, weights: Weights, dtype, device, what: str):
    with on_meta():
        module = cls(config)
    check_shapes({k: tuple(v.shape) for k, v in module.state_dict().items()}, weights, what)
    module.load_state_dict(materialize(weights, dtype), assign=True)
    return module.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------- reading


def _strip(weights: Weights, prefix: str) -> Weights:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _text_width(w: Weights, layout: str) -> int | None:
    key = "token_embedding.weight" if layout == "open_clip" else "text_model.embeddings.token_embedding.weight"
    return w[key].shape[1] if key in w else None


def _text_kind(w: Weights, layout: str) -> str:
    width = _text_width(w, layout)
    return _TEXT_KIND_BY_WIDTH.get(width, f"unknown-{width}")


def _hf_text_names(w: Weights) -> Weights:
    """transformers names under ``text_model.``: old single files and transformers 5's
    ``CLIPTextModel.save_pretrained`` leave the prefix out; position ids are dropped."""
    if not any(k.startswith("text_model.") for k in w):
        w = {("" if k.startswith("text_projection") else "text_model.") + k: v for k, v in w.items()}
    return {k: v for k, v in w.items() if not k.endswith("position_ids")}


def _text_from_single(raw: Weights, spec: TextEncoderSpec, cut_slots: set[str] = frozenset()
                      ) -> TextEncoderWeights | None:
    w = _strip(raw, spec.prefix)
    if not w:
        return None
    if spec.layout == "hf":
        w = _hf_text_names(w)
    w = {k: v for k, v in w.items() if not k.endswith("position_ids")}
    return TextEncoderWeights(spec.slot, _text_kind(w, spec.layout), spec.layout, w,
                              cut=spec.slot in cut_slots)


def _cut_slots(meta: dict) -> set[str]:
    return set(filter(None, (meta or {}).get("sumie.text_cut", "").split(",")))


def load_single_file(path: str | Path, *, allow_pickle: bool = False, prediction: str | None = None,
                     family_name: str | None = None) -> SDCheckpoint:
    """A latent-diffusion single-file checkpoint (``.safetensors``; ``.ckpt`` with ``allow_pickle``)."""
    path = Path(path)
    raw, meta = open_weights(path, allow_pickle=allow_pickle)
    unet = _strip(raw, UNET_PREFIX)
    if not unet:
        prefixes = sorted({k.split(".", 1)[0] + "." for k in raw})
        raise CheckpointError(f"{path}: unknown model family. No U-Net found: expected keys under {UNET_PREFIX!r}; "
                              f"the file's top-level prefixes are {prefixes[:8]}")
    feats = unet_features(unet)
    fam = family(family_name) if family_name else detect_family(feats, str(path))
    vae_prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in raw)), None)
    if vae_prefix is None:
        raise CheckpointError(f"{path}: no autoencoder (keys under 'first_stage_model.'); load a separate VAE file")
    vae = _strip(raw, vae_prefix)
    proto = fam.vae()
    vae_cfg = vae_config_from_weights(vae, proto.scaling_factor, proto.shift_factor)
    pred, why = detect_prediction(fam, unet, path, prediction, v_marker="v_pred" in raw, metadata=meta)
    texts = {}
    for spec in fam.text_encoders:
        te = _text_from_single(raw, spec, _cut_slots(meta))
        if te is not None:
            texts[spec.slot] = te
    return SDCheckpoint(fam, pred, unet_config_for(fam, feats), vae_cfg, unet, vae, texts, str(path),
                        [f"family {fam.name}: {fam.expected()}", f"prediction {pred}: {why}"])


def _component_weights(folder: Path, stem: str, allow_pickle: bool) -> Weights:
    """The weights of one diffusers component folder, whole or sharded, fp32 or fp16 variant."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return open_safetensors(folder / name)[0]
        if (folder / f"{name}.index.json").is_file():
            return open_sharded(folder / f"{name}.index.json")
    for name in (f"{stem}.bin", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return open_weights(folder / name, allow_pickle=allow_pickle)[0]
    raise CheckpointError(f"{folder}: no {stem}.safetensors (or sharded {stem}.safetensors.index.json) found")


def load_diffusers(folder: str | Path, *, allow_pickle: bool = False, prediction: str | None = None,
                   family_name: str | None = None) -> SDCheckpoint:
    """A diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder*/``)."""
    folder = Path(folder)
    unet_cfg = unet_config_from_diffusers(read_json(folder / "unet" / "config.json"))
    unet = keymaps.unet_from_diffusers(_component_weights(folder / "unet", "diffusion_pytorch_model", allow_pickle),
                                       unet_cfg)
    feats = unet_features(unet)
    fam = family(family_name) if family_name else detect_family(feats, str(folder))
    unet_cfg = _family_heads(unet_cfg, fam)
    vae_cfg = vae_config_from_diffusers(read_json(folder / "vae" / "config.json"))
    vae = keymaps.vae_from_diffusers(_component_weights(folder / "vae", "diffusion_pytorch_model", allow_pickle),
                                     vae_cfg)
    why = "given explicitly"
    if prediction is None:
        sched = folder / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            kind = read_json(sched).get("prediction_type", "epsilon")
            prediction, why = {"epsilon": "eps", "v_prediction": "v"}.get(kind), f"scheduler prediction_type={kind}"
            if prediction is None:
                raise CheckpointError(f"{sched}: prediction_type {kind!r} is not supported (epsilon, v_prediction)")
        else:
            prediction, why = fam.prediction, f"{fam.name} default (no scheduler config)"
    texts = {}
    for spec in fam.text_encoders:
        sub = folder / spec.slot
        if sub.is_dir():
            w = _hf_text_names(_component_weights(sub, "model", allow_pickle))
            texts[spec.slot] = TextEncoderWeights(spec.slot, _text_kind(w, "hf"), "hf", w)
    return SDCheckpoint(fam, prediction, unet_cfg, vae_cfg, unet, vae, texts, str(folder),
                        [f"family {fam.name}: {fam.expected()}", f"prediction {prediction}: {why}"])


def _heads(c: UNetConfig) -> list[int]:
    """Head count of each level that has attention, and of the middle block."""
    used = [i for i in range(len(c.channel_mult)) if keymaps.level_has_attention(c, i)] + [len(c.channel_mult) - 1]
    return [c.model_channels * c.channel_mult[i] // c.num_head_channels if c.num_head_channels > 0 else c.num_heads
            for i in used]


def _family_heads(c: UNetConfig, fam: Family) -> UNetConfig:
    """Express the head layout as the family does when that describes the same heads, so a
    model read from any layout has one config."""
    alt = dataclasses.replace(c, num_heads=fam.heads.get("num_heads", UNetConfig.num_heads),
                              num_head_channels=fam.heads.get("num_head_channels", -1))
    return alt if _heads(alt) == _heads(c) else c


def load_native(folder: str | Path) -> SDCheckpoint:
    folder = Path(folder)
    m = read_json(folder / NATIVE_MANIFEST)
    if m.get("format") != NATIVE_FORMAT:
        raise CheckpointError(f"{folder / NATIVE_MANIFEST}: format {m.get('format')!r} is not {NATIVE_FORMAT!r}")
    texts = {slot: TextEncoderWeights(slot, t["kind"], t["layout"], open_safetensors(folder / f"{slot}.safetensors")[0],
                                      cut=t.get("cut", False))
             for slot, t in m.get("text_encoders", {}).items()}
    return SDCheckpoint(family(m["family"]), m["prediction"], UNetConfig(**m["unet"]), VAEConfig(**m["vae"]),
                        open_safetensors(folder / "unet.safetensors")[0], open_safetensors(folder / "vae.safetensors")[0],
                        texts, str(folder), [f"native manifest {NATIVE_FORMAT}"])


def load_vae_file(path: str | Path, *, scaling_factor: float = 0.18215, allow_pickle: bool = False
                  ) -> tuple[VAEConfig, Weights]:
    """A separate autoencoder file (e.g. the fp16-fixed SDXL VAE): latent-diffusion or diffusers
    names, bare or under ``first_stage_model.``/``vae.``; a diffusers ``config.json`` beside it wins."""
    path = Path(path)
    w, _ = open_weights(path, allow_pickle=allow_pickle)
    for p in VAE_PREFIXES:
        if any(k.startswith(p) for k in w):
            w = _strip(w, p)
    if any(".down_blocks." in k or ".mid_block." in k for k in w):  # diffusers names
        cfg_path = path.parent / "config.json"
        if cfg_path.is_file():
            cfg = vae_config_from_diffusers(read_json(cfg_path))
        else:
            n = sum(1 for i in range(16) if f"encoder.down_blocks.{i}.resnets.0.conv1.weight" in w)
            nres = sum(1 for j in range(16) if f"encoder.down_blocks.0.resnets.{j}.conv1.weight" in w)
            ch = w["encoder.conv_in.weight"].shape[0]
            cfg = VAEConfig(ch=ch, ch_mult=tuple(w[f"encoder.down_blocks.{i}.resnets.{nres - 1}.conv2.weight"].shape[0] // ch
                                                 for i in range(n)), num_res_blocks=nres,
                            z_channels=w["decoder.conv_in.weight"].shape[1], embed_dim=w["decoder.conv_in.weight"].shape[1],
                            scaling_factor=scaling_factor)
        w = keymaps.vae_from_diffusers(w, cfg)
        scaling_factor = cfg.scaling_factor if cfg_path.is_file() else scaling_factor
    return vae_config_from_weights(w, scaling_factor), w


def load_text_encoder_file(path: str | Path, slot: str = "text_encoder", *, allow_pickle: bool = False
                           ) -> TextEncoderWeights:
    """A separate text-encoder file in Hugging Face or OpenCLIP names (known prefixes stripped),
    or a diffusers ``text_encoder*/`` folder."""
    path = Path(path)
    if path.is_dir():
        w = _component_weights(path, "model", allow_pickle)
    else:
        w, _ = open_weights(path, allow_pickle=allow_pickle)
    for p in ("cond_stage_model.transformer.", "cond_stage_model.model.", "conditioner.embedders.0.transformer.",
              "conditioner.embedders.1.model.", "conditioner.embedders.0.model."):
        if all(k.startswith(p) for k in w):
            w = _strip(w, p)
    layout = "open_clip" if any(k.startswith("transformer.resblocks.") for k in w) else "hf"
    w = _hf_text_names(w) if layout == "hf" else {k: v for k, v in w.items() if not k.endswith("position_ids")}
    return TextEncoderWeights(slot, _text_kind(w, layout), layout, w)


def load_sd(path: str | Path, *, allow_pickle: bool = False, prediction: str | None = None,
            family_name: str | None = None, vae: str | Path | None = None,
            text_encoders: dict[str, str | Path] | None = None) -> SDCheckpoint:
    """Any Stable Diffusion checkpoint -> :class:`SDCheckpoint`, with optional VAE and
    text-encoder overrides (files replacing the checkpoint's own)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint: {path}")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            sd = load_diffusers(path, allow_pickle=allow_pickle, prediction=prediction, family_name=family_name)
        elif (path / NATIVE_MANIFEST).is_file():
            sd = load_native(path)
            if prediction is not None:
                sd.prediction = prediction
        else:
            raise CheckpointError(f"{path} is a folder without model_index.json (diffusers) or {NATIVE_MANIFEST} (sumie)")
    else:
        sd = load_single_file(path, allow_pickle=allow_pickle, prediction=prediction, family_name=family_name)
    if vae is not None:
        sd.vae_config, sd.vae = load_vae_file(vae, scaling_factor=sd.vae_config.scaling_factor, allow_pickle=allow_pickle)
        sd.notes.append(f"VAE from {vae}")
    if text_encoders:
        override_text_encoders(sd, text_encoders, allow_pickle=allow_pickle)
    return sd


def _text_spec(sd: SDCheckpoint, slot: str, source: str) -> TextEncoderSpec:
    spec = next((s for s in sd.family.text_encoders if s.slot == slot), None)
    if spec is None:
        raise CheckpointError(f"{source}: {sd.family.title} ({sd.family.name}) has no text-encoder slot {slot!r}; "
                              f"its slots are {sd.family.slots()}")
    return spec


def check_text_encoder(sd: SDCheckpoint, te: TextEncoderWeights, source: str = "text encoder") -> None:
    """A text encoder fits its slot of ``sd``: its token width is the U-Net's cross-attention
    width less the family's other towers (SD 1.x: CLIP-L 768; SD 2.x: OpenCLIP-H 1024; SDXL:
    768 + 1280 = 2048), its kind the slot's, and SDXL's pooled tower fills the vector ``y``."""
    fam, spec = sd.family, _text_spec(sd, te.slot, source)
    tail = f"; {fam.name} text-encoder slots: {fam.slots()}"
    if te.width is None:
        raise CheckpointError(f"{source}: no token embedding found ({te.layout} names): not a CLIP text "
                              f"encoder{tail}")
    ctx = sd.unet_config.context_dim
    expected = ctx - sum(TEXT_WIDTHS[s.kind] for s in fam.text_encoders if s.slot != te.slot)
    if te.width != expected or te.kind != spec.kind:
        whole = f", its part of the U-Net's cross-attention width {ctx}" if len(fam.text_encoders) > 1 else \
            " (the U-Net's cross-attention width)"
        raise CheckpointError(f"{source}: a text encoder {te.width} wide ({te.kind}) does not fit slot {te.slot!r} "
                              f"of {fam.title} ({fam.name}), which takes {spec.kind} {expected} wide{whole}{tail}")
    adm = sd.unet_config.adm_in_channels
    if adm is not None and spec is fam.text_encoders[-1]:  # SDXL: y = [pooled, 6 x 256 size features]
        pooled = adm - 6 * SDXL_SIZE_EMBED
        if te.pooled_width != pooled:
            raise CheckpointError(f"{source}: pooled output {te.pooled_width} wide, but {fam.name}'s U-Net takes "
                                  f"{pooled} pooled + 6 x {SDXL_SIZE_EMBED} = {adm} in its vector conditioning{tail}")


def override_text_encoders(sd: SDCheckpoint, text_encoders: dict[str, str | Path], *,
                           allow_pickle: bool = False) -> SDCheckpoint:
    """Replace ``sd``'s text encoders by files ({slot: file or diffusers folder}); every file is
    read and checked (:func:`check_text_encoder`) before any slot is replaced."""
    loaded = []
    for slot, p in text_encoders.items():
        _text_spec(sd, slot, str(p))
        te = load_text_encoder_file(p, slot, allow_pickle=allow_pickle)
        check_text_encoder(sd, te, str(p))
        loaded.append((te, p))
    for te, p in loaded:
        sd.text_encoders[te.slot] = te
        sd.notes.append(f"{te.slot} from {p}")
    return sd


# ---------------------------------------------------------------- writing


def save_single_file(sd: SDCheckpoint, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a latent-diffusion single-file ``.safetensors``."""
    path = Path(path)
    out: Weights = {}
    out.update({UNET_PREFIX + k: v for k, v in sd.unet.items()})
    out.update({"first_stage_model." + k: v for k, v in sd.vae.items()})
    for spec in sd.family.text_encoders:
        te = sd.text_encoders.get(spec.slot)
        if te is not None:
            out.update({spec.prefix + k: v for k, v in te.in_layout(spec.layout).items()})
    meta = {"sumie.family": sd.family.name, "sumie.prediction": sd.prediction}
    cut = [s for s, te in sd.text_encoders.items() if te.cut]
    if cut:  # the tower lacks its last block (diffusers' SD 2.x form): say so, or a reader cuts again
        meta["sumie.text_cut"] = ",".join(cut)
    write_safetensors(path, out, meta, dtype)
    return path


def _text_config(te: TextEncoderWeights, w: Weights) -> dict:
    """A transformers ``CLIPTextConfig`` for Hugging-Face-layout text weights."""
    tok = w["text_model.embeddings.token_embedding.weight"].shape
    layers = sum(1 for k in w if k.endswith("self_attn.q_proj.weight"))
    cfg = {"architectures": ["CLIPTextModelWithProjection" if "text_projection.weight" in w else "CLIPTextModel"],
           "model_type": "clip_text_model", "vocab_size": tok[0], "hidden_size": tok[1],
           "max_position_embeddings": w["text_model.embeddings.position_embedding.weight"].shape[0],
           "intermediate_size": w["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
           "num_hidden_layers": layers, "num_attention_heads": tok[1] // 64,
           "hidden_act": "quick_gelu" if te.kind == "clip-l" else "gelu", "layer_norm_eps": 1e-5}
    if "text_projection.weight" in w:
        cfg["projection_dim"] = w["text_projection.weight"].shape[0]
    return cfg


def _diffusers_text(te: TextEncoderWeights) -> Weights:
    w = te.in_layout("hf")
    if te.kind == "openclip-h" and not te.cut:
        # SD 2.x conditions on the penultimate layer; diffusers stores the text encoder without the
        # last layer and without the projection (``num_hidden_layers`` 23), as its own converter does.
        last = sum(1 for k in w if k.endswith("self_attn.q_proj.weight")) - 1
        w = {k: v for k, v in w.items()
             if not k.startswith(f"text_model.encoder.layers.{last}.") and k != "text_projection.weight"}
    return w


def save_diffusers(sd: SDCheckpoint, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers pipeline folder (weights, configs, model_index.json, scheduler)."""
    folder = Path(folder)
    latent = sd.resolution // sd.vae_config.downsampling_factor
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "vae").mkdir(parents=True, exist_ok=True)
    write_json(folder / "unet" / "config.json", unet_config_to_diffusers(sd.unet_config, latent))
    write_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors",
                      keymaps.unet_to_diffusers(sd.unet, sd.unet_config), dtype=dtype)
    write_json(folder / "vae" / "config.json", vae_config_to_diffusers(sd.vae_config, sd.resolution))
    write_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors",
                      keymaps.vae_to_diffusers(sd.vae, sd.vae_config), dtype=dtype)
    index = {"_class_name": sd.family.pipeline, "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    for slot, te in sd.text_encoders.items():
        w = _diffusers_text(te)
        (folder / slot).mkdir(exist_ok=True)
        cfg = _text_config(te, w)
        write_json(folder / slot / "config.json", cfg)
        write_safetensors(folder / slot / "model.safetensors", w, dtype=dtype)
        index[slot] = ["transformers", cfg["architectures"][0]]
        tok = "tokenizer" + slot[len("text_encoder"):]
        src_tok = Path(sd.source) / tok
        if src_tok.is_dir() and not (folder / tok).exists():  # tokenizer files travel unchanged
            shutil.copytree(src_tok, folder / tok)
            index[tok] = ["transformers", "CLIPTokenizer"]
    (folder / "scheduler").mkdir(exist_ok=True)
    write_json(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading",
        "prediction_type": "v_prediction" if sd.prediction == "v" else "epsilon"})
    write_json(folder / "model_index.json", index)
    return folder


def save_native(sd: SDCheckpoint, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write sumie's native layout: ``sumie.json`` + one safetensors per component."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "unet.safetensors", sd.unet, dtype=dtype)
    write_safetensors(folder / "vae.safetensors", sd.vae, dtype=dtype)
    for slot, te in sd.text_encoders.items():
        write_safetensors(folder / f"{slot}.safetensors", te.weights, dtype=dtype)
    write_json(folder / NATIVE_MANIFEST, {
        "format": NATIVE_FORMAT, "family": sd.family.name, "prediction": sd.prediction,
        "unet": sd.unet_config.to_dict(), "vae": sd.vae_config.to_dict(),
        "text_encoders": {s: {"kind": t.kind, "layout": t.layout, "cut": t.cut} for s, t in sd.text_encoders.items()}})
    return folder


WRITERS = {"single-file": save_single_file, "diffusers": save_diffusers, "sumie": save_native}


def convert(src: str | Path, dst: str | Path, to: str, *, allow_pickle: bool = False, prediction: str | None = None,
            dtype: torch.dtype | None = None, vae: str | Path | None = None,
            text_encoders: dict[str, str | Path] | None = None) -> SDCheckpoint:
    """Read any layout (with optional VAE and text-encoder overrides), write ``to``
    ("single-file", "diffusers" or "sumie")."""
    if to not in WRITERS:
        raise ValueError(f"unknown target layout {to!r}; choose from {', '.join(WRITERS)}")
    dst = Path(dst)
    if dst.exists() and (dst.is_file() or any(dst.iterdir())):
        raise ValueError(f"{dst} exists; choose a new destination")
    sd = load_sd(src, allow_pickle=allow_pickle, prediction=prediction, vae=vae, text_encoders=text_encoders)
    WRITERS[to](sd, dst, dtype)
    return sd
