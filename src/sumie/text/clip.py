"""The CLIP text transformer (Radford et al. 2021) in the variants Stable Diffusion uses.

A GPT-2-style pre-LayerNorm transformer (Radford et al. 2019) over token + learned position
embeddings with a causal mask, a final LayerNorm, and a pooled vector read at the end-of-text
token, optionally through ``text_projection``. Presets:

* ``clip-l``        OpenAI CLIP ViT-L/14 text tower (SD 1.x, SDXL's first encoder): 768 wide,
                    12 layers, quick-GELU;
* ``openclip-h``    OpenCLIP ViT-H/14 (LAION-2B) text tower (SD 2.x): 1024 wide, 24 layers, GELU;
* ``openclip-bigg`` OpenCLIP ViT-bigG/14 text tower (SDXL's second encoder): 1280 wide, 32 layers, GELU;
* ``tiny``          for tests.

Weights load from two key layouts through declarative tables (:data:`HF_KEYS`,
:data:`OPENCLIP_KEYS`), every tensor's shape checked against the model, an error naming the
tensor otherwise:

* ``hf``: transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (diffusers
  ``text_encoder/``, ``text_encoder_2/``; SD 1.x single files under
  ``cond_stage_model.transformer.``, SDXL's under ``conditioner.embedders.0.transformer.``);
* ``open_clip``: OpenCLIP's names with fused q/k/v ``in_proj`` (SD 2.x single files under
  ``cond_stage_model.model.``, SDXL's under ``conditioner.embedders.1.model.``).

The loaders take a plain ``dict[str, Tensor]`` and a key prefix, so a checkpoint reader can
hand over whatever it found.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..io.checkpoint import CheckpointError, build_checked, load_tensors
from .base import check_transformer_config

LAYOUTS = ("hf", "open_clip")


@dataclass
class ClipTextConfig:
    """Hyper-parameters of :class:`ClipTextTransformer` (names follow transformers' ``CLIPTextConfig``)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI) or "gelu" (OpenCLIP, exact erf form)
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # width of text_projection; None: no projection
    # pooling position: the first token equal to eos_token_id; None: the largest id (OpenAI's argmax)
    eos_token_id: int | None = 49407
    # depth of the published tower this one was cut from: diffusers' SD 2.x text_encoder keeps
    # 23 of OpenCLIP-H's 24 blocks; layer selection counts from the end of the full tower
    full_depth: int | None = None

    def __post_init__(self):
        check_transformer_config(self.hidden_size, self.num_attention_heads, self.hidden_act, ACTIVATIONS)

    @property
    def depth(self) -> int:
        return self.full_depth or self.num_hidden_layers

    def to_dict(self) -> dict:
        return asdict(self)

    # Published text towers (OpenAI CLIP; OpenCLIP ViT-H-14 and ViT-bigG-14 model configs).
    @classmethod
    def clip_l(cls) -> "ClipTextConfig":
        return cls(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   hidden_act="quick_gelu", projection_dim=768)

    @classmethod
    def openclip_h(cls) -> "ClipTextConfig":
        return cls(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                   hidden_act="gelu", projection_dim=1024)

    @classmethod
    def openclip_bigg(cls) -> "ClipTextConfig":
        return cls(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                   hidden_act="gelu", projection_dim=1280)

    @classmethod
    def tiny(cls, vocab_size: int = 1000) -> "ClipTextConfig":
        return cls(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                   intermediate_size=64, hidden_act="gelu", projection_dim=24, eos_token_id=vocab_size - 1)


PRESETS: dict[str, Callable[[], ClipTextConfig]] = {
    "clip-l": ClipTextConfig.clip_l, "openclip-h": ClipTextConfig.openclip_h,
    "openclip-bigg": ClipTextConfig.openclip_bigg, "tiny": ClipTextConfig.tiny}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), the GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class ClipAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections, through SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d/h)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class ClipMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)): the pre-LN residual block."""

    def __init__(self, c: ClipTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attn = ClipAttention(c.hidden_size, c.num_attention_heads)
        self.ln_2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = ClipMLP(c.hidden_size, c.intermediate_size, c.hidden_act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


@dataclass
class ClipTextOutput:
    """hidden (B, L, D) after the selected block (final LayerNorm applied if asked), pooled
    (B, P): final-LayerNorm output of the last block at the end token, projected if the
    tower has ``text_projection`` (transformers' ``text_embeds``, else its ``pooler_output``)."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, then each block (transformers' order)


class ClipTextTransformer(nn.Module):
    """CLIP's text tower; ``forward(input_ids, skip=1, final_norm=True)``.

    ``skip`` is clip-skip as users know it: 1 is the last block of the (full) tower, 2 the
    penultimate (SD 2.x, SDXL), ... ``final_norm`` applies ``ln_final`` to that output
    (SD 1.x and 2.x do, SDXL does not)."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.config = c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.layers = nn.ModuleList(ClipLayer(c) for _ in range(c.num_hidden_layers))
        self.ln_final = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        if c.projection_dim is not None:
            self.text_projection = nn.Linear(c.hidden_size, c.projection_dim, bias=False)

    @property
    def width(self) -> int:
        return self.config.hidden_size

    @property
    def pooled_width(self) -> int:
        return self.config.projection_dim or self.config.hidden_size

    def blocks_for_skip(self, skip: int) -> int:
        """Number of blocks whose output clip-skip ``skip`` selects."""
        n = self.config.depth - skip + 1
        if skip < 1 or not 0 < n <= self.config.num_hidden_layers:
            raise ValueError(f"clip skip {skip} is out of range for a text tower of {self.config.num_hidden_layers} "
                             f"blocks (of {self.config.depth})")
        return n

    def forward(self, input_ids: torch.Tensor, *, skip: int = 1, final_norm: bool = True,
                attention_mask: torch.Tensor | None = None, output_hidden_states: bool = False) -> ClipTextOutput:
        b, n = input_ids.shape
        if n > self.config.max_position_embeddings:
            raise ValueError(f"{n} tokens exceed the {self.config.max_position_embeddings} positions of this "
                             "text encoder; split long prompts into windows (sumie.text.prompt)")
        if int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(f"token id out of range for a vocabulary of {self.config.vocab_size}: the tokenizer "
                             "does not belong to this text encoder")
        stop = self.blocks_for_skip(skip)
        x = self.token_embedding(input_ids) + self.position_embedding.weight[:n]  # (B, N, D)
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # causal
        if attention_mask is not None:  # also hide padding keys
            mask = mask[None, None] & attention_mask[:, None, None, :].to(torch.bool)
        states = [x]
        selected = None
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            states.append(x)
            if i + 1 == stop:
                selected = x
        last = self.ln_final(x)
        hidden = (last if stop == len(self.layers) else self.ln_final(selected)) if final_norm else selected
        pooled = last[torch.arange(b, device=x.device), self._eos_positions(input_ids)]  # (B, D)
        if self.config.projection_dim is not None:
            pooled = self.text_projection(pooled)
        return ClipTextOutput(hidden, pooled, tuple(states) if output_hidden_states else None)

    def _eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        eos = self.config.eos_token_id
        if eos is None:
            return input_ids.argmax(dim=-1)
        return (input_ids == eos).int().argmax(dim=-1)  # first end token (0 if there is none, as transformers)


# ---------------------------------------------------------------- key layouts

# transformers names -> sumie names; {i} is the block index
HF_KEYS: dict[str, str] = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "position_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection.weight",
    **{f"text_model.encoder.layers.{{i}}.{hf}.{p}": f"layers.{{i}}.{ours}.{p}"
       for hf, ours in (("self_attn.q_proj", "attn.q_proj"), ("self_attn.k_proj", "attn.k_proj"),
                        ("self_attn.v_proj", "attn.v_proj"), ("self_attn.out_proj", "attn.out_proj"),
                        ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
       for p in ("weight", "bias")},
}
HF_IGNORED = re.compile(r"(^|\.)position_ids$|^vision_model\.|^visual_projection\.|^logit_scale$")


def _split3(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.chunk(3, dim=0)[i]


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t()


# OpenCLIP names -> (sumie name, transform); the fused in_proj holds q, k, v stacked on dim 0,
# and text_projection is applied as x @ P, i.e. the transpose of a Linear weight
OPENCLIP_KEYS: dict[str, list[tuple[str, Callable | None]]] = {
    "token_embedding.weight": [("token_embedding.weight", None)],
    "positional_embedding": [("position_embedding.weight", None)],
    "ln_final.weight": [("ln_final.weight", None)],
    "ln_final.bias": [("ln_final.bias", None)],
    "text_projection": [("text_projection.weight", _transpose)],
    **{f"transformer.resblocks.{{i}}.attn.in_proj_{p}": [(f"layers.{{i}}.attn.{n}_proj.{p}", _split3(j))
                                                        for j, n in enumerate("qkv")] for p in ("weight", "bias")},
    **{f"transformer.resblocks.{{i}}.{oc}.{p}": [(f"layers.{{i}}.{ours}.{p}", None)]
       for oc, ours in (("attn.out_proj", "attn.out_proj"), ("ln_1", "ln_1"), ("ln_2", "ln_2"),
                        ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
       for p in ("weight", "bias")},
}
OPENCLIP_IGNORED = re.compile(r"^logit_scale$|^attn_mask$|^visual\.|(^|\.)position_ids$")


def _compile(table: dict) -> list[tuple[re.Pattern, object]]:
    return [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), v) for k, v in table.items()]


_HF_RULES = _compile(HF_KEYS)
_OPENCLIP_RULES = _compile(OPENCLIP_KEYS)


def convert_state_dict(sd: dict[str, torch.Tensor], layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors under ``prefix`` in ``layout`` ("hf" or "open_clip") -> sumie's names."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"no text-encoder tensors under the prefix {prefix!r}")
    if layout == "hf" and not any(k.startswith("text_model.") for k in sd):  # old transformers naming
        sd = {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in sd.items()}
    rules, ignored = (_HF_RULES, HF_IGNORED) if layout == "hf" else (_OPENCLIP_RULES, OPENCLIP_IGNORED)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in sd.items():
        for pattern, target in rules:
            m = pattern.match(key)
            if m is None:
                continue
            i = m.groupdict().get("i")
            targets = [(target, None)] if isinstance(target, str) else target
            for name, fn in targets:
                out[name.replace("{i}", i) if i is not None else name] = fn(t) if fn else t
            break
        else:
            if not ignored.search(key):
                unknown.append(prefix + key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} tensor(s) of no known CLIP text layout ({layout}), e.g. {unknown[:3]}")
    return out


def config_from_state_dict(sd: dict[str, torch.Tensor], *, hidden_act: str, num_attention_heads: int | None = None,
                           full_depth: int | None = None) -> ClipTextConfig:
    """Read the tower's sizes from sumie-named tensor shapes. Heads and activation are not
    visible in weights: heads default to width / 64 (true of all published CLIP towers); the
    end token is the last id of the vocabulary, as in every CLIP vocabulary."""
    need = ("token_embedding.weight", "position_embedding.weight", "layers.0.mlp.fc1.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a CLIP text tower: missing {missing}")
    vocab, width = sd["token_embedding.weight"].shape
    layers = 0
    while f"layers.{layers}.ln_1.weight" in sd:
        layers += 1
    proj = sd["text_projection.weight"].shape[0] if "text_projection.weight" in sd else None
    return ClipTextConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                          num_attention_heads=num_attention_heads or max(width // 64, 1),
                          intermediate_size=sd["layers.0.mlp.fc1.weight"].shape[0],
                          max_position_embeddings=sd["position_embedding.weight"].shape[0], hidden_act=hidden_act,
                          projection_dim=proj, eos_token_id=vocab - 1, full_depth=full_depth)


def _default_full_depth(c: ClipTextConfig) -> int | None:
    """diffusers' SD 2.x text_encoder: OpenCLIP-H cut to 23 blocks; layers count from the full 24."""
    h = ClipTextConfig.openclip_h()
    if (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (h.hidden_size, h.intermediate_size, 23):
        return 24
    return None


def build_clip_text(sd: dict[str, torch.Tensor], config: ClipTextConfig, what: str = "text encoder",
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ClipTextTransformer:
    """A frozen tower from sumie-named tensors; every tensor checked against the config's shape."""
    return build_checked(ClipTextTransformer, config, sd, what, dtype, device).requires_grad_(False)


def load_clip_text(sd: dict[str, torch.Tensor], *, layout: str, prefix: str = "", kind: str | None = None,
                   config: ClipTextConfig | None = None, num_attention_heads: int | None = None,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ClipTextTransformer:
    """A CLIP text tower from a raw state dict in ``layout`` ("hf" or "open_clip") under ``prefix``.

    ``kind`` (clip-l, openclip-h, openclip-bigg) supplies the activation the weights cannot
    show; without it "hf" means quick-GELU (OpenAI) and "open_clip" GELU. Sizes are read from
    shapes unless ``config`` is given."""
    ours = convert_state_dict(sd, layout, prefix)
    if config is None:
        act = PRESETS[kind]().hidden_act if kind in PRESETS else ("quick_gelu" if layout == "hf" else "gelu")
        config = config_from_state_dict(ours, hidden_act=act, num_attention_heads=num_attention_heads)
        config.full_depth = _default_full_depth(config)
    return build_clip_text(ours, config, f"CLIP text encoder ({layout}, prefix {prefix!r})", dtype, device)


def config_from_hf(cfg: dict) -> ClipTextConfig:
    """transformers' ``CLIPTextConfig`` JSON -> :class:`ClipTextConfig` (legacy eos id 2 = argmax pooling)."""
    cfg = cfg.get("text_config", cfg)
    eos = cfg.get("eos_token_id", 2)
    c = ClipTextConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                       num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                       intermediate_size=cfg["intermediate_size"],
                       max_position_embeddings=cfg.get("max_position_embeddings", 77),
                       hidden_act=cfg.get("hidden_act", "quick_gelu"), layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
                       projection_dim=cfg.get("projection_dim"), eos_token_id=None if eos == 2 else eos)
    return replace(c, full_depth=_default_full_depth(c))


def load_clip_text_folder(folder: str | Path, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu") -> ClipTextTransformer:
    """A diffusers/transformers ``text_encoder/`` folder: ``config.json`` + ``model.safetensors``
    (or shards behind ``model.safetensors.index.json``)."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder} has no config.json (a transformers CLIP text-encoder folder)")
    raw = json.loads(cfg_file.read_text())
    config = config_from_hf(raw)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_tensors(folder / shard))
    else:
        sd = load_tensors(folder / "model.safetensors")
    ours = convert_state_dict(sd, "hf")
    if "text_projection.weight" not in ours:  # CLIPTextModel: config names a projection it does not have
        config.projection_dim = None
    return build_clip_text(ours, config, f"CLIP text encoder {folder}", dtype, device)
