"""One interface for tokenizers and text encoders.

A text encoder turns a batch of prompts into what a denoiser cross-attends to and what
its vector conditioning needs:

    encoder.encode(prompts) -> TextEncoderOutput(hidden (B, L, D), pooled (B, P), attention_mask (B, L))

``hidden`` is the token sequence (the U-Net's ``cond["context"]``), ``pooled`` one vector per
prompt (SDXL's ``y``, or a class-like embedding), ``attention_mask`` 1 where a position
holds a real token (start/end tokens included) and 0 where it holds padding. Encoders
with a causal mask (CLIP) leave padding unmasked in their own attention, as Stable
Diffusion was trained; the mask is there for encoders and denoisers that want it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import torch


@dataclass
class TextConfig:
    """The text side of a run. ``kind = "small"``: :class:`sumie.text.small.SmallTextEncoder` of
    ``width``, ``layers``, ``heads``, trained with the denoiser (its vocabulary comes from the
    tokenizer). ``kind = "hf"``: a frozen pretrained BERT-family encoder
    (:class:`sumie.text.bert.BertTextEncoder`, e.g. all-MiniLM-L6-v2) read from the local folder
    ``path``; its own width is the U-Net's ``context_dim`` and ``width``, ``layers``, ``heads`` are
    unused. Both take prompts in windows of ``max_length`` tokens."""

    kind: str = "none"  # none | small | hf
    width: int = 128
    layers: int = 2
    heads: int = 4
    max_length: int = 32
    mlp_ratio: int = 4
    path: str | None = None  # kind = "hf": a local folder in Hugging Face format
    # also hand the pooled prompt vector to the U-Net as its vector condition ``y`` (added to the timestep
    # embedding, so AdaGN sees the whole prompt at every place), as Imagen (Saharia et al. 2022, sec. 2.1 / app.
    # F) and SDXL (Podell et al. 2023, sec. 2.1) do; needs model.adm_in_channels = the pooled width
    pooled: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def check_transformer_config(hidden_size: int, heads: int, act: str, activations: dict) -> None:
    """The checks a text transformer's config (transformers' names) must pass before it is built."""
    if act not in activations:
        raise ValueError(f"hidden_act must be one of {sorted(activations)}, got {act!r}")
    if hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by {heads} heads")


@dataclass
class TokenizedBatch:
    """Token ids (B, L) and their attention mask (B, L), 1 on real tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @classmethod
    def framed(cls, id_lists: list[list[int]], n: int, bos: int, eos: int, pad: int,
               truncation: bool = True) -> "TokenizedBatch":
        """One window per prompt: ``bos ids eos pad...`` rows of length ``n`` (ids cut to ``n - 2``,
        or an error without ``truncation``), mask 1 on bos, ids and eos."""
        rows, masks = [], []
        for ids in id_lists:
            if len(ids) > n - 2:
                if not truncation:
                    raise ValueError(f"prompt is {len(ids)} tokens, more than the {n - 2} of one window")
                ids = ids[: n - 2]
            ids = [bos, *ids, eos]
            masks.append([1] * len(ids) + [0] * (n - len(ids)))
            rows.append(ids + [pad] * (n - len(ids)))
        return cls(torch.tensor(rows, dtype=torch.long).reshape(len(id_lists), n),
                   torch.tensor(masks, dtype=torch.long).reshape(len(id_lists), n))


@dataclass
class TextEncoderOutput:
    """hidden (B, L, D) token embeddings, pooled (B, P), attention_mask (B, L)."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self):
        b, n = self.hidden.shape[:2]
        if self.hidden.ndim != 3 or self.pooled.ndim != 2 or self.pooled.shape[0] != b \
                or tuple(self.attention_mask.shape) != (b, n):
            raise ValueError(f"inconsistent text-encoder output: hidden {tuple(self.hidden.shape)}, "
                             f"pooled {tuple(self.pooled.shape)}, mask {tuple(self.attention_mask.shape)}")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextEncoderOutput":
        return TextEncoderOutput(self.hidden.to(device, dtype), self.pooled.to(device, dtype),
                                 self.attention_mask.to(device))

    def as_cond(self, pooled: bool = False) -> dict[str, torch.Tensor]:
        """The U-Net's conditioning dict entries: ``context`` and ``context_mask``, and with
        ``pooled`` the pooled vector as ``y`` (the U-Net's vector condition)."""
        cond = {"context": self.hidden, "context_mask": self.attention_mask}
        if pooled:
            cond["y"] = self.pooled
        return cond


class Tokenizer(ABC):
    """Text -> token ids. ``encode_text`` gives the bare ids of one string; calling the
    tokenizer gives padded windows ``[BOS] ids [EOS] pad...`` of ``model_max_length``."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    model_max_length: int

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens, truncation or padding."""

    @abstractmethod
    def __call__(self, prompts: list[str], max_length: int | None = None, truncation: bool = True) -> TokenizedBatch:
        """A batch of single-window encodings."""

    @property
    def chunk_length(self) -> int:
        """Prompt tokens per window once the start and end tokens are in (75 for CLIP)."""
        return self.model_max_length - 2


class TextEncoder(ABC):
    """Prompts -> :class:`TextEncoderOutput`; ``width`` is D, ``pooled_width`` is P."""

    width: int
    pooled_width: int
    feeds_pooled: bool = False  # text.pooled: the condition carries the pooled vector as ``y`` too

    @abstractmethod
    def encode(self, prompts: list[str]) -> TextEncoderOutput:
        """Encode a batch of prompts."""

    def check_context_width(self, context_dim: int | None, what: str = "the U-Net") -> None:
        """A clear error when this encoder's token width is not what the denoiser cross-attends to."""
        if context_dim is not None and context_dim != self.width:
            raise ValueError(f"text encoder produces tokens of width {self.width}, but {what} cross-attends to "
                             f"width {context_dim} (context_dim); the text encoder does not belong to this model")
