"""LoRA files for Stable Diffusion models: read, map onto sumie's modules, merge or hook.

LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") stores, for
some Linear or Conv2d layers W (out, in[, kh, kw]), a pair ``down`` (r, in[, kh, kw]) and
``up`` (out, r[, 1, 1]) and optionally ``alpha``; the adapted layer is

    W' = W + strength * (alpha / r) * up @ down          (alpha defaults to r)

For a convolution ``down`` is itself a convolution with W's kernel, stride and padding and
``up`` a 1x1 convolution (kohya's "LoCon" conv LoRA), so the delta is ``up @ down`` over
the flattened kernel. A LoRA is thus a set of per-weight deltas keyed by module name
(ComfyUI's ``model_patcher.py`` idea), applied in one of two ways:

* merged: W + dW replaces the weight tensor (no cost per step; the original tensor, maybe a
  memory-mapped file page, is never written); ``remove()`` puts the original back
  (bit-exact) or, if it was not kept, subtracts the deltas again;
* unmerged: a forward hook adds the low-rank path ``strength * scale * up(down(x))`` to the
  layer's output; the weights are never touched, so removing the hook restores the model
  exactly.

File layouts read (keys are mapped through :mod:`.keymaps`' latent-diffusion <-> diffusers
tables and :data:`sumie.text.clip.HF_KEYS`, so any naming the tables know is accepted):

* kohya / A1111: ``lora_unet_<module path with _>.lora_down.weight``, ``.lora_up.weight``,
  ``.alpha``; U-Net paths in diffusers names (SD 1.x/2.x trainers) or latent-diffusion names
  (SDXL trainers, ComfyUI); text encoders under ``lora_te_`` (``lora_te1_``/``lora_te2_`` for
  SDXL's two towers) in transformers names;
* diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, the older
  ``<module>.lora.down.weight`` / ``lora.up.weight`` and ``lora_linear_layer.down/up``, the
  attention-processor form ``<attn>.processor.to_q_lora.down.weight``, with ``text_encoder.``
  / ``text_encoder_2.`` prefixes (text modules as transformers 4 names them, ``text_model.encoder...``,
  or as transformers 5 does, ``encoder...``) and optional ``<module>.alpha``. PEFT files written by
  diffusers' ``save_lora_weights`` keep alpha only in the safetensors header: ``lora_adapter_metadata``,
  JSON of each component's ``LoraConfig`` (``unet.lora_alpha``, ``unet.alpha_pattern``, ...).

Every key is checked against the loaded model (module exists, is Linear or Conv2d, ranks and
shapes agree) before any weight changes; a LoRA made for another family (an SDXL LoRA on SD
1.5) is refused with the first offending key named, and nothing is applied.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...text.clip import HF_KEYS
from ..checkpoint import CheckpointError, save_tensors
from . import keymaps
from .tensors import TensorRef, from_tensors, open_weights

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                 "lora_te2_": "text_encoder_2"}
_KOHYA_PART = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# dotted (diffusers / PEFT) suffixes -> part; tried in order
_DOTTED_PART = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
                (".lora_linear_layer.up.weight", "up"), (".lora_down.weight", "down"), (".lora_up.weight", "up"),
                (".alpha", "alpha"))
_PROCESSOR = re.compile(r"^(?P<attn>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\."
                        r"(?P<part>down|up)\.weight$")
_PROC_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROC_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_DIFFUSERS_UNET_TOP = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "conv_norm_out.",
                       "time_embedding.", "add_embedding.")
# kohya-family parts sumie does not implement, named in the error
_OTHER_KINDS = ("hada_", "lokr_", "lora_mid", "dora_scale", "oft_", "diff", "w_norm", "b_norm")


@dataclass
class LoraPair:
    """One low-rank pair as the file spells it (not yet matched to a model)."""

    component: str  # unet, text_encoder, text_encoder_2
    name: str  # module name in the file's convention (dotted, or kohya's with underscores)
    kohya: bool
    key: str = ""  # the file key of the down weight (or the first key seen), for messages
    down: TensorRef | None = None
    up: TensorRef | None = None
    alpha: TensorRef | None = None
    alpha_value: float | None = None  # from the header (PEFT lora_adapter_metadata) when no alpha tensor


@dataclass
class LoraFile:
    """A parsed LoRA: its pairs by (component, file module name), tensors still lazy."""

    source: str
    pairs: dict[tuple[str, str], LoraPair] = field(default_factory=dict)
    format: str = ""  # "kohya" or "diffusers"

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass
class LoraDelta:
    """One resolved delta: ``strength * scale * up @ down`` for sumie module ``module``."""

    key: str
    component: str
    module: str
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r)
    scale: float  # strength * alpha / r

    def weight_delta(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """dW = scale * up @ down, in the layer's weight shape (float32 product, cast once)."""
        d = (self.up.float() @ self.down.float().flatten(1)) * self.scale
        return d.reshape(shape).to(dtype)


# ---------------------------------------------------------------- reading


def _part_of_kohya(key: str) -> tuple[str, str, str] | None:
    for prefix, comp in _KOHYA_PREFIX.items():
        if key.startswith(prefix):
            name, _, suffix = key.partition(".")
            return comp, name[len(prefix):], suffix
    return None


def _dotted_component(key: str) -> tuple[str, str]:
    key = key.removeprefix("base_model.model.")
    for comp in ("text_encoder_2", "text_encoder", "unet"):
        if key.startswith(comp + "."):
            return comp, key[len(comp) + 1:]
    if key.startswith("text_model."):
        return "text_encoder", key
    return "unet", key


_TEXT_TOP = ("encoder.", "embeddings.", "final_layer_norm.")


def _text_model_name(comp: str, rest: str) -> str:
    """transformers 5 saves a CLIPTextModel's LoRA keys without ``text_model.``: put it back."""
    return "text_model." + rest if comp.startswith("text") and rest.startswith(_TEXT_TOP) else rest


def _peft_alphas(meta: dict[str, str], source: str) -> dict[str, dict]:
    """{component: {"lora_alpha": a, "alpha_pattern": {...}}} from diffusers' ``lora_adapter_metadata``
    header (keys "<component>.<LoraConfig field>"; bare fields apply to every component)."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"LoRA {source}: lora_adapter_metadata is not JSON ({e})") from e
    out: dict[str, dict] = {}
    for key, value in cfg.items():
        comp, _, field_ = key.rpartition(".")
        if field_ in ("lora_alpha", "alpha_pattern"):
            out.setdefault(comp or "*", {})[field_] = value
    return out


def _peft_alpha(conf: dict, name: str) -> float | None:
    """PEFT's rule: an ``alpha_pattern`` key matching the module name's end wins over ``lora_alpha``."""
    for pattern, a in (conf.get("alpha_pattern") or {}).items():
        if name == pattern or re.match(rf"(.*\.)?{pattern}$", name):
            return float(a)
    return float(conf["lora_alpha"]) if conf.get("lora_alpha") is not None else None  # bare U-Net keys (PEFT adapters saved from the U-Net alone)


def read_lora(path: str | Path | dict[str, torch.Tensor]) -> LoraFile:
    """Group a LoRA file's tensors (or a state dict) into low-rank pairs; nothing is read yet.
    Unsupported adapter kinds (LoHa, LoKr, DoRA, ...) and dangling halves are errors."""
    if isinstance(path, dict):
        weights, source = from_tensors(path), "<state dict>"
    else:
        weights, meta = open_weights(path)
        source = str(path)
    alphas = _peft_alphas(meta if not isinstance(path, dict) else {}, source)
    lora = LoraFile(source)
    kinds = set()
    for key in sorted(weights):
        ref = weights[key]
        k = _part_of_kohya(key)
        if k is not None:
            comp, name, suffix = k
            part = _KOHYA_PART.get(suffix)
            kohya = True
        else:
            comp, rest = _dotted_component(key)
            part, name, kohya = None, None, False
            m = _PROCESSOR.match(rest)
            if m:
                table = _PROC_TEXT if comp.startswith("text") else _PROC_UNET
                name, part = f"{m['attn']}.{table[m['proj']]}", m["part"]
            else:
                for suffix, p in _DOTTED_PART:
                    if rest.endswith(suffix):
                        name, part = _text_model_name(comp, rest[: -len(suffix)]), p
                        break
        if part is None:
            other = next((o for o in _OTHER_KINDS if o in key), None)
            what = f"a {other.rstrip('_')} adapter tensor, which sumie does not support" if other else \
                "not a LoRA tensor of any known layout"
            raise CheckpointError(f"LoRA {source}: key {key!r} is {what} (supported: kohya lora_down/lora_up/alpha, "
                                  "diffusers/PEFT lora_A/lora_B, lora.down/lora.up); nothing was applied")
        kinds.add("kohya" if kohya else "diffusers")
        pair = lora.pairs.setdefault((comp, name), LoraPair(comp, name, kohya, key))
        setattr(pair, part, ref)
        if part == "down":
            pair.key = key
    for pair in lora.pairs.values():
        conf = alphas.get(pair.component, alphas.get("*"))
        if pair.alpha is None and conf and not pair.kohya:
            pair.alpha_value = _peft_alpha(conf, pair.name)
        if pair.down is None or pair.up is None:
            raise CheckpointError(f"LoRA {source}: {pair.key!r} has no matching "
                                  f"{'up' if pair.up is None else 'down'} weight; the file is incomplete")
    lora.format = "+".join(sorted(kinds))
    return lora


# ---------------------------------------------------------------- module names


def _lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def unet_names(unet: nn.Module) -> dict[str, str]:
    """Every spelling of each LoRA-able U-Net layer -> its sumie (latent-diffusion) name:
    latent-diffusion and diffusers names, dotted and with underscores (kohya)."""
    table = keymaps.unet_module_map(unet.config)
    names: dict[str, str] = {}
    for ours in _lora_layers(unet):
        theirs = keymaps._lookup(ours + ".weight", table)
        for n in (ours, theirs[: -len(".weight")] if theirs else None):
            if n is not None:
                names[n] = ours
                names[n.replace(".", "_")] = ours
    return names


def text_names(tower: nn.Module) -> dict[str, str]:
    """The same for a CLIP text tower: transformers and sumie names, dotted and underscored."""
    n_layers = tower.config.num_hidden_layers
    hf_of = {}
    for hf, ours in HF_KEYS.items():
        if not hf.endswith(".weight"):
            continue
        for i in range(n_layers if "{i}" in hf else 1):
            hf_of[ours.replace("{i}", str(i))[: -len(".weight")]] = hf.replace("{i}", str(i))[: -len(".weight")]
    names: dict[str, str] = {}
    for ours in _lora_layers(tower):
        for n in (ours, hf_of.get(ours)):
            if n is not None:
                names[n] = ours
                names[n.replace(".", "_")] = ours
    return names


def module_names(models: dict[str, nn.Module]) -> dict[str, dict[str, str]]:
    return {comp: (unet_names(m) if comp == "unet" else text_names(m)) for comp, m in models.items()}


# ---------------------------------------------------------------- resolving


def _check_shapes(layer: nn.Module, down: tuple, up: tuple) -> str | None:
    """Why (down, up) cannot adapt ``layer``, or None."""
    w = tuple(layer.weight.shape)
    out_f, in_f = w[0], w[1]
    kernel = w[2:]
    if len(down) not in (2, 4) or len(up) not in (2, 4):
        return f"down {down} / up {up} are neither matrices nor convolution kernels"
    r = down[0]
    if up[1] != r or (len(up) == 4 and up[2:] != (1, 1)):
        return f"up {up} does not follow down {down} (rank {r})"
    if up[0] != out_f:
        return f"up {up} has {up[0]} outputs, the layer {out_f} (weight {w})"
    if len(down) == 2:
        ok = down[1] == in_f and all(k == 1 for k in kernel)
    else:
        ok = down[1] == in_f and (down[2:] == kernel or (not kernel and down[2:] == (1, 1)))
    return None if ok else f"down {down} does not fit the layer's weight {w}"


def resolve(lora: LoraFile, models: dict[str, nn.Module], strength: float = 1.0,
            names: dict[str, dict[str, str]] | None = None) -> list[LoraDelta]:
    """Match every pair to a layer of ``models`` ({"unet": UNet, "text_encoder": tower, ...})
    and read its tensors. The first pair (in key order) that has no layer or does not fit is
    an error naming its key; nothing is returned, so nothing can have been applied."""
    names = names or module_names(models)
    deltas = []
    for (comp, name), pair in sorted(lora.pairs.items(), key=lambda kv: kv[1].key):
        where = f"LoRA {lora.source}: {pair.key}"
        tail = "; the LoRA was made for another model (family or size), nothing was applied"
        if comp not in models:
            raise CheckpointError(f"{where}: this model has no {comp}{tail}")
        ours = names[comp].get(name)
        if ours is None:
            raise CheckpointError(f"{where}: no layer {name!r} in this model's {comp}{tail}")
        layer = models[comp].get_submodule(ours)
        why = _check_shapes(layer, pair.down.shape, pair.up.shape)
        if why:
            raise CheckpointError(f"{where}: {why} ({comp} layer {ours}){tail}")
        down, up = pair.down.load(), pair.up.load()
        r = down.shape[0]
        alpha = float(pair.alpha.load()) if pair.alpha is not None else \
            pair.alpha_value if pair.alpha_value is not None else float(r)
        if len(down.shape) == 4 and isinstance(layer, nn.Linear):
            down = down.flatten(1)
        if len(down.shape) == 2 and isinstance(layer, nn.Conv2d):
            down = down[:, :, None, None]
        deltas.append(LoraDelta(pair.key, comp, ours, down, up.flatten(1), strength * alpha / r))
    return deltas


# ---------------------------------------------------------------- applying


class _LowRankHook:
    """Forward hook: output + scale * up(down(x)) (unmerged LoRA)."""

    def __init__(self, layer: nn.Module, delta: LoraDelta):
        p = layer.weight
        self.down = delta.down.to(device=p.device, dtype=p.dtype)
        self.up = delta.up.to(device=p.device, dtype=p.dtype)
        self.scale = delta.scale
        self.conv = isinstance(layer, nn.Conv2d)

    def __call__(self, layer: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if self.conv:  # down: the layer's kernel, stride and padding; up: 1x1
            h = F.conv2d(x, self.down, None, layer.stride, layer.padding, layer.dilation)
            h = F.conv2d(h, self.up[:, :, None, None])
        else:
            h = F.linear(F.linear(x, self.down), self.up)
        return output + self.scale * h


class AppliedLoras:
    """What :func:`apply_loras` changed; :meth:`remove` undoes it."""

    def __init__(self, merged: list[tuple[nn.Module, LoraDelta]], hooks: list,
                 originals: dict[int, tuple[nn.Module, torch.Tensor]], deltas: list[LoraDelta]):
        self.merged, self.hooks, self.originals, self.deltas = merged, hooks, originals, deltas

    @torch.no_grad()
    def remove(self) -> None:
        """Unhook, and give merged layers back their original weight tensors (bit-exact) or,
        where they were not kept, subtract the deltas again."""
        for h in self.hooks:
            h.remove()
        for layer, original in self.originals.values():
            layer.weight.data = original
        for layer, d in reversed(self.merged):
            if id(layer) not in self.originals:
                layer.weight.sub_(d.weight_delta(layer.weight.shape, layer.weight.dtype).to(layer.weight.device))
        self.hooks, self.merged, self.originals = [], [], {}


def resolve_all(models: dict[str, nn.Module], loras: list[tuple[LoraFile | str | Path, float]]) -> list[LoraDelta]:
    """:func:`resolve` for several (LoRA, strength) pairs; raises before returning anything."""
    names = module_names(models)
    deltas: list[LoraDelta] = []
    for lora, strength in loras:
        lora = lora if isinstance(lora, LoraFile) else read_lora(lora)
        deltas += resolve(lora, models, strength, names)
    return deltas


@torch.no_grad()
def apply_deltas(models: dict[str, nn.Module], deltas: list[LoraDelta], *, merge: bool = True,
                 backup: bool = True) -> AppliedLoras:
    """Apply resolved deltas: add them into the weights (``merge``) or hook the layers.

    Merging never writes into a layer's existing weight tensor, which may be a page of a
    memory-mapped file shared by every module built from it, or shared with another model:
    the first delta on a layer makes a new tensor W + dW, later ones add into that. With
    ``backup`` the original tensor is kept (no copy) for a bit-exact :meth:`AppliedLoras.remove`."""
    merged, hooks, originals, owned = [], [], {}, set()
    for d in deltas:
        if d.scale == 0:
            continue
        layer = models[d.component].get_submodule(d.module)
        if merge:
            w = layer.weight
            dw = d.weight_delta(w.shape, w.dtype).to(w.device)
            if id(layer) in owned:
                w.add_(dw)
            else:
                if backup:
                    originals[id(layer)] = (layer, w.data)
                w.data = w.data + dw
                owned.add(id(layer))
            merged.append((layer, d))
        else:
            hooks.append(layer.register_forward_hook(_LowRankHook(layer, d)))
    return AppliedLoras(merged, hooks, originals, [d for d in deltas if d.scale != 0])


def apply_loras(models: dict[str, nn.Module], loras: list[tuple[LoraFile | str | Path, float]], *,
                merge: bool = True, backup: bool = True) -> AppliedLoras:
    """Apply several LoRAs, each with its strength, merged into the weights or as hooks.

    All files are read and checked against ``models`` first; any mismatch raises before a
    single weight changes. ``backup`` (merged only) keeps each patched layer's original
    tensor so that removal is bit-exact; without it removal subtracts the deltas (exact up
    to rounding) and the originals can be freed.
    """
    return apply_deltas(models, resolve_all(models, loras), merge=merge, backup=backup)


def save_kohya(path: str | Path, deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]) -> None:
    """Write ``{kohya module name: (down, up, alpha)}`` as a kohya-layout safetensors file
    (for tests and for exporting LoRAs trained with sumie)."""
    out = {}
    for name, (down, up, alpha) in deltas.items():
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_tensors(path, out)
