"""A frozen pretrained BERT encoder (Devlin et al. 2019) as a text encoder, e.g. a sentence-transformer.

The encoder: word + learned position + token-type embeddings, LayerNorm; then post-LN
transformer layers (Vaswani et al. 2017): ``x = LN(x + MHA(x))``, ``x = LN(x + MLP(x))`` with
GELU, attention hiding padding keys. Its last hidden states are the U-Net's cross-attention
context (Rombach et al. 2022, sec. 3.3); the pooled vector is sentence-transformers' pooling
(Reimers & Gurevych 2019): the mean over real tokens (``[CLS]`` and ``[SEP]`` included) unless
``1_Pooling/config.json`` asks for ``[CLS]``, max or sqrt-length pooling, L2-normalised when the
folder lists a ``Normalize`` module (all-MiniLM-L6-v2 does).

A folder in Hugging Face format (``save_pretrained`` of ``BertModel``, or a sentence-transformers
folder whose ``modules.json`` points at it, usually the root) holds ``config.json``, ``vocab.txt``
(:mod:`sumie.text.wordpiece`) and ``model.safetensors`` (or shards behind
``model.safetensors.index.json``). ``pytorch_model.bin`` is refused: sumie loads no pickles.
Weights are read through the declarative table :data:`HF_KEYS`, under the prefix ``bert.``
(``BertForMaskedLM``, ``BertForPreTraining``) or none, with every shape checked.

The encoder is frozen: no gradients, always in eval mode, ``encode`` under ``torch.no_grad``.
A model trained on it records where it was and the SHA-256 of its files
(:func:`fingerprint`), and checks them when loaded again (:func:`verify_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..io.checkpoint import CheckpointError, build_checked, load_tensors
from .base import TextEncoder, TextEncoderOutput, check_transformer_config
from .clip_tokenizer import TokenizerError
from .wordpiece import WordPieceTokenizer

SUPPORTED = "model_type 'bert' (BertModel and its sentence-transformers, e.g. all-MiniLM-L6-v2, bert-base-uncased)"
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu, "swish": F.silu}
# sentence-transformers' pooling modes, in the order it concatenates them
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")


@dataclass
class BertConfig:
    """Hyper-parameters of :class:`BertModel` (names follow transformers' ``BertConfig``)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        check_transformer_config(self.hidden_size, self.num_attention_heads, self.hidden_act, ACTIVATIONS)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> "BertConfig":
        """transformers' ``config.json`` of a BERT model; other architectures are refused by name."""
        kind = raw.get("model_type")
        if kind is None and any(str(a).startswith("Bert") for a in raw.get("architectures") or ()):
            kind = "bert"  # configs written before model_type existed
        if kind != "bert":
            raise ValueError(f"{source}: model_type {kind!r} is not supported; sumie reads {SUPPORTED}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: position_embedding_type {raw['position_embedding_type']!r} is not "
                             "supported; sumie reads BERT with absolute position embeddings")
        if raw.get("is_decoder"):
            raise ValueError(f"{source}: a BERT decoder (is_decoder) is not a text encoder")
        try:
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


class BertLayer(nn.Module):
    """Post-LN transformer layer: x = ln_1(x + MHA(x)), then x = ln_2(x + fc2(act(fc1(x))))."""

    def __init__(self, c: BertConfig):
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.ln_1 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.fc1, self.fc2 = nn.Linear(d, c.intermediate_size), nn.Linear(c.intermediate_size, d)
        self.ln_2 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, h, N, d/h)
        x = self.ln_1(x + self.out_proj(a.transpose(1, 2).reshape(b, n, d)))
        return self.ln_2(x + self.fc2(self.act(self.fc1(x))))


class BertModel(nn.Module):
    """BERT's encoder without the pooler: ``forward(input_ids, attention_mask)`` -> last hidden (B, N, D)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embedding = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.ln_embed = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, n = input_ids.shape
        if n > self.config.max_position_embeddings:
            raise ValueError(f"{n} tokens exceed the {self.config.max_position_embeddings} positions of this "
                             "text encoder")
        if int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(f"token id out of range for a vocabulary of {self.config.vocab_size}: the tokenizer "
                             "does not belong to this text encoder")
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.token_embedding(input_ids) + self.token_type_embedding(types)
        x = self.ln_embed(x + self.position_embedding.weight[:n])  # (B, N, D)
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # padding keys hidden
        for layer in self.layers:
            x = layer(x, keep)
        return x


# ---------------------------------------------------------------- key layout

# transformers' BertModel names -> sumie names; {i} is the layer index
HF_KEYS: dict[str, str] = {
    "embeddings.word_embeddings.weight": "token_embedding.weight",
    "embeddings.position_embeddings.weight": "position_embedding.weight",
    "embeddings.token_type_embeddings.weight": "token_type_embedding.weight",
    **{f"embeddings.LayerNorm.{p}": f"ln_embed.{p}" for p in ("weight", "bias")},
    **{f"encoder.layer.{{i}}.{hf}.{p}": f"layers.{{i}}.{ours}.{p}"
       for hf, ours in (("attention.self.query", "q_proj"), ("attention.self.key", "k_proj"),
                        ("attention.self.value", "v_proj"), ("attention.output.dense", "out_proj"),
                        ("attention.output.LayerNorm", "ln_1"), ("intermediate.dense", "fc1"),
                        ("output.dense", "fc2"), ("output.LayerNorm", "ln_2"))
       for p in ("weight", "bias")},
}
# buffers, the unused pooler, and the pre-training heads of BertForMaskedLM / BertForPreTraining
HF_IGNORED = re.compile(r"^embeddings\.(position_ids|token_type_ids)$|^pooler\.|^cls\.")
_RULES = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), v) for k, v in HF_KEYS.items()]
_OLD_LAYERNORM = re.compile(r"LayerNorm\.(gamma|beta)$")  # checkpoints converted from TensorFlow


def convert_state_dict(sd: dict[str, torch.Tensor], names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """transformers' BERT tensors (under ``bert.`` or no prefix) -> sumie's names; ``names``, if
    given, is filled with sumie name -> the file's name (for error messages)."""
    prefix = "bert." if any(k.startswith("bert.") for k in sd) else ""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in sd.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        name = _OLD_LAYERNORM.sub(lambda m: "LayerNorm." + ("weight" if m.group(1) == "gamma" else "bias"), name)
        for pattern, target in _RULES:
            m = pattern.match(name)
            if m is not None:
                i = m.groupdict().get("i")
                ours = target.replace("{i}", i) if i is not None else target
                out[ours] = t
                if names is not None:
                    names[ours] = key
                break
        else:
            if not HF_IGNORED.search(name):
                unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} tensor(s) of no known BERT layout, e.g. {unknown[:3]}; "
                              f"sumie reads {SUPPORTED}")
    return out


def build_bert(sd: dict[str, torch.Tensor], config: BertConfig, what: str = "BERT encoder",
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               names: dict[str, str] | None = None) -> BertModel:
    """A frozen encoder from sumie-named tensors; every tensor checked against the config's shape
    (errors use the file's tensor names where ``names`` gives them)."""
    return build_checked(BertModel, config, sd, what, dtype, device, names=names,
                         against="config").requires_grad_(False)


# ---------------------------------------------------------------- folders

@dataclass(frozen=True)
class FolderLayout:
    """Where a folder keeps its encoder, and the sentence-transformers pooling around it."""

    root: Path
    model_dir: Path
    pooling: tuple[str, ...] = ("mean_tokens",)
    normalize: bool = False


def read_layout(folder: str | Path) -> FolderLayout:
    """A plain transformers folder, or a sentence-transformers one (``modules.json``: Transformer,
    Pooling, Normalize modules; without it, ``1_Pooling/`` and ``2_Normalize/`` are looked for)."""
    root = Path(folder)
    if not root.is_dir():
        raise CheckpointError(f"text encoder folder not found: {root} (a local folder in Hugging Face format "
                              "with config.json, vocab.txt and model.safetensors)")
    model_dir, pooling_dir, normalize = root, root / "1_Pooling", (root / "2_Normalize").is_dir()
    modules_file = root / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file)
        if not isinstance(modules, list):
            raise CheckpointError(f"{modules_file} should list sentence-transformers modules")
        types = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
        unknown = sorted(set(types) - {"Transformer", "Pooling", "Normalize"})
        if unknown:
            raise CheckpointError(f"{modules_file}: sentence-transformers module(s) {unknown} are not supported; "
                                  "sumie reads Transformer, Pooling and Normalize")
        if "Transformer" in types:
            model_dir = root / types["Transformer"].get("path", "")
        pooling_dir = root / types["Pooling"].get("path", "1_Pooling") if "Pooling" in types else None
        normalize = "Normalize" in types
    pooling = ("mean_tokens",)
    if pooling_dir is not None and (pooling_dir / "config.json").is_file():
        pooling = read_pooling(pooling_dir / "config.json")
    return FolderLayout(root, model_dir, pooling, normalize)


def read_pooling(path: Path) -> tuple[str, ...]:
    """sentence-transformers' ``Pooling`` config -> the modes it concatenates."""
    cfg = _read_json(path)
    other = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v
                   and k[len("pooling_mode_"):] not in POOLING_MODES)
    if other:
        raise CheckpointError(f"{path}: pooling {other} is not supported; sumie pools with "
                              f"{', '.join(POOLING_MODES)}")
    modes = tuple(m for m in POOLING_MODES if cfg.get(f"pooling_mode_{m}"))
    if not modes:
        raise CheckpointError(f"{path} enables no pooling mode (pooling_mode_mean_tokens, ...)")
    return modes


def weight_files(model_dir: Path) -> list[Path]:
    """``model.safetensors`` or its shards; a folder with only pickled weights is refused."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if not shards or missing:
            raise CheckpointError(f"{index} names shard(s) that are not there: {missing or 'none listed'}")
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = [p.name for p in sorted(model_dir.glob("*.bin")) + sorted(model_dir.glob("*.pt*"))]
    if pickles:
        raise CheckpointError(
            f"{model_dir} holds {', '.join(pickles)} but no model.safetensors: those are pickles, and sumie "
            "does not load pickles (unpickling can run arbitrary code). Convert once with a tool you trust, e.g. "
            f"`python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{model_dir}')"
            f".save_pretrained('{model_dir}')\"`, which writes model.safetensors")
    raise CheckpointError(f"{model_dir} has no model.safetensors (the weights of a Hugging Face model folder)")


def load_bert_folder(folder: str | Path, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> BertModel:
    """The encoder of a transformers ``BertModel`` folder: ``config.json`` + safetensors weights."""
    model_dir = Path(folder)
    config = read_config(model_dir)
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        sd.update(load_tensors(f))
    names: dict[str, str] = {}
    ours = convert_state_dict(sd, names)
    return build_bert(ours, config, f"BERT encoder {model_dir}", dtype, device, names)


def encoder_width(folder: str | Path) -> int:
    """The token width (``hidden_size``) of the encoder in a folder, read from its config alone."""
    return read_config(read_layout(folder).model_dir).hidden_size


def read_config(model_dir: Path) -> BertConfig:
    """The :class:`BertConfig` of a transformers model folder's ``config.json``."""
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{model_dir} has no config.json (a Hugging Face model folder)")
    return BertConfig.from_hf(_read_json(cfg_file), str(cfg_file))


# ---------------------------------------------------------------- the text encoder

class BertTextEncoder(nn.Module, TextEncoder):
    """A frozen BERT with its WordPiece tokenizer: prompts -> hidden (B, L, D), pooled (B, P), mask (B, L).

    ``L`` is the tokenizer's window (``[CLS] tokens [SEP] [PAD]...``); longer prompts are truncated,
    as sentence-transformers does. With ``weighting``, A1111's ``(word:1.3)``, ``(word)``, ``[word]``
    weights are parsed off (:mod:`sumie.text.prompt`) and each token's hidden state is multiplied by
    its weight (the "No norm" emphasis of :class:`sumie.text.small.SmallTextEncoder`); ``BREAK`` is
    ignored (one window); the pooled vector is not weighted."""

    def __init__(self, model: BertModel, tokenizer: WordPieceTokenizer, *,
                 pooling: tuple[str, ...] = ("mean_tokens",), normalize: bool = False, weighting: bool = True):
        super().__init__()
        c = model.config
        if tokenizer.vocab_size > c.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the encoder only {c.vocab_size}: "
                             "they do not belong together")
        if tokenizer.model_max_length > c.max_position_embeddings:
            raise ValueError(f"a window of {tokenizer.model_max_length} tokens exceeds the encoder's "
                             f"{c.max_position_embeddings} positions")
        bad = [m for m in pooling if m not in POOLING_MODES]
        if bad or not pooling:
            raise ValueError(f"pooling must be some of {POOLING_MODES}, got {pooling}")
        self.bert, self.tokenizer = model, tokenizer
        self.pooling, self.normalize, self.weighting = tuple(pooling), normalize, weighting
        self.width = c.hidden_size
        self.pooled_width = c.hidden_size * len(self.pooling)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_folder(cls, folder: str | Path, *, max_length: int | None = None, weighting: bool = True,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "BertTextEncoder":
        """A local Hugging Face / sentence-transformers folder; ``max_length`` is the token window
        (default: the folder's, at most :data:`sumie.text.wordpiece.MAX_WINDOW`)."""
        layout = read_layout(folder)
        model = load_bert_folder(layout.model_dir, dtype, device)
        try:
            tokenizer = WordPieceTokenizer.from_folder(layout.model_dir, max_length)
        except TokenizerError as e:
            raise CheckpointError(str(e)) from None
        return cls(model, tokenizer, pooling=layout.pooling, normalize=layout.normalize, weighting=weighting)

    def train(self, mode: bool = True) -> "BertTextEncoder":
        """Frozen: stays in eval mode whatever a training loop asks."""
        return super().train(False)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """sentence-transformers' pooling of hidden (B, N, D) over real tokens -> (B, D * modes)."""
        w = attention_mask.to(hidden.dtype)[..., None]  # (B, N, 1)
        count = w.sum(1).clamp_min(1e-9)
        out = []
        for mode in self.pooling:
            if mode == "cls_token":
                out.append(hidden[:, 0])
            elif mode == "max_tokens":
                out.append(hidden.masked_fill(w == 0, -1e9).amax(1))
            elif mode == "mean_tokens":
                out.append((hidden * w).sum(1) / count)
            else:  # mean_sqrt_len_tokens
                out.append((hidden * w).sum(1) / count.sqrt())
        pooled = torch.cat(out, dim=1)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoderOutput:
        """(B, L) ids and mask -> last hidden states (B, L, D), pooled (B, P), the mask."""
        hidden = self.bert(input_ids, attention_mask)
        return TextEncoderOutput(hidden, self.pool(hidden, attention_mask), attention_mask)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEncoderOutput:
        """Prompts -> :class:`TextEncoderOutput`; the empty prompt is ``[CLS][SEP]``."""
        from .prompt import BREAK, parse_prompt_weights

        tok = self.tokenizer
        n = tok.model_max_length
        ids = torch.full((len(prompts), n), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), n), dtype=torch.long)
        weights = torch.ones((len(prompts), n))
        for b, prompt in enumerate(prompts):
            spans = parse_prompt_weights(prompt) if self.weighting else [(prompt, 1.0)]
            row, ws = [], []
            for text, w in spans:
                if w == -1.0 and text == BREAK:
                    continue
                part = tok.encode_text(text)
                row += part
                ws += [w] * len(part)
            row = [tok.bos_token_id, *row[:n - 2], tok.eos_token_id]
            ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = 1
            weights[b, 1:len(row) - 1] = torch.tensor(ws[:n - 2], dtype=torch.float32)
        p = self.bert.token_embedding.weight
        out = self(ids.to(p.device), mask.to(p.device))
        if bool((weights == 1).all()):
            return out
        hidden = out.hidden * weights.to(device=p.device, dtype=out.hidden.dtype)[..., None]
        return TextEncoderOutput(hidden, out.pooled, out.attention_mask)


# ---------------------------------------------------------------- provenance

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(folder: str | Path) -> dict:
    """Where a frozen encoder lives and the SHA-256 of its weights and vocabulary, for a model
    trained on it to record (``text_encoder.json``) instead of a copy of the weights."""
    layout = read_layout(folder)
    files = weight_files(layout.model_dir) + [layout.model_dir / "vocab.txt"]
    root = layout.root.resolve()
    return {"kind": "hf", "path": str(root),
            "sha256": {str(f.resolve().relative_to(root)): _sha256(f) for f in files if f.is_file()}}


def verify_fingerprint(ref: dict, where: str = "the model") -> Path:
    """The folder a :func:`fingerprint` names, once every file's SHA-256 is checked; errors say what differs."""
    root = Path(ref.get("path", ""))
    hint = f"(put it back, or edit \"path\" in {where}'s text_encoder.json to where it now is)"
    if not root.is_dir():
        raise CheckpointError(f"{where} was trained with the frozen text encoder at {root}, which is not there "
                              f"{hint}")
    for name, digest in ref.get("sha256", {}).items():
        f = root / name
        if not f.is_file():
            raise CheckpointError(f"{where} was trained with the text encoder at {root}, but its {name} is "
                                  f"missing {hint}")
        found = _sha256(f)
        if found != digest:
            raise CheckpointError(f"{f} is not the file {where} was trained with (SHA-256 {found[:12]}... vs "
                                  f"{digest[:12]}...): the text encoder at {root} has changed")
    return root


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
