"""A small transformer text encoder trained together with the diffusion model.

The CPU-sized counterpart of Stable Diffusion's frozen CLIP tower: a word-level tokenizer
whose vocabulary is read off the training captions, and a few pre-LN transformer layers
(Vaswani et al. 2017; pre-norm as in GPT-2) with learned positions and a bidirectional,
padding-masked self-attention. Its token states are the U-Net's cross-attention context
(Rombach et al. 2022, sec. 3.3); the pooled vector is the mean over real tokens.

Because it learns from scratch with the denoiser, it needs no download, and the empty
prompt (``[BOS][EOS]``) is the unconditional input of classifier-free guidance: condition
dropout during training replaces captions with it (Ho & Salimans 2022).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .base import TextConfig, TextEncoder, TextEncoderOutput, TokenizedBatch, Tokenizer

SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def split_words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks (any Unicode)."""
    return _WORD.findall(text.lower())


class WordTokenizer(Tokenizer):
    """Word-level tokenizer with a closed vocabulary; unknown words map to ``[UNK]``."""

    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3

    def __init__(self, vocab: list[str], model_max_length: int = 32):
        if list(vocab[:len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"a WordTokenizer vocabulary must start with {SPECIALS}")
        if model_max_length < 3:
            raise ValueError("model_max_length must leave room for [BOS], one word and [EOS]")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.model_max_length = model_max_length

    @classmethod
    def build(cls, texts: Iterable[str], model_max_length: int = 32, min_count: int = 1,
              max_size: int = 8192) -> "WordTokenizer":
        """Vocabulary of the words in ``texts`` seen at least ``min_count`` times, most frequent first."""
        counts = Counter(w for t in texts for w in split_words(t))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words[:max_size - len(SPECIALS)], model_max_length)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode_text(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_token_id) for w in split_words(text)]

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` outside the vocabulary (each once, in order; ASCII punctuation left out):
        they all become ``[UNK]``, so the model cannot tell them apart."""
        seen: dict[str, None] = {}
        for w in split_words(text):
            if w not in self.index and not (len(w) == 1 and w in string.punctuation):
                seen.setdefault(w)
        return list(seen)

    def __call__(self, prompts: list[str], max_length: int | None = None, truncation: bool = True) -> TokenizedBatch:
        n = max_length or self.model_max_length
        ids = torch.full((len(prompts), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), n), dtype=torch.long)
        for b, p in enumerate(prompts):
            words = self.encode_text(p)
            if len(words) > n - 2 and not truncation:
                raise ValueError(f"prompt of {len(words)} words is longer than the {n - 2} this tokenizer takes")
            row = self.wrap(words[:n - 2])
            ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = 1
        return TokenizedBatch(ids, mask)

    def wrap(self, word_ids: list[int]) -> list[int]:
        """One window's ids: ``[BOS] words [EOS]`` (padding follows)."""
        return [self.bos_token_id] + list(word_ids) + [self.eos_token_id]

    def to_json(self) -> dict:
        return {"kind": "word", "model_max_length": self.model_max_length, "vocab": self.vocab}

    @classmethod
    def from_json(cls, data: dict) -> "WordTokenizer":
        if data.get("kind") != "word":
            raise ValueError(f"not a word-level tokenizer file (kind={data.get('kind')!r})")
        return cls(data["vocab"], data["model_max_length"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        return cls.from_json(json.loads(Path(path).read_text()))


class _Block(nn.Module):
    """Pre-LN transformer layer: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])  # (B, H, N, d/H)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln_2(x))))


class SmallTextEncoder(nn.Module, TextEncoder):
    """Token + position embeddings, ``layers`` pre-LN blocks, a final LayerNorm."""

    def __init__(self, config: TextConfig, tokenizer: WordTokenizer):
        super().__init__()
        if tokenizer.model_max_length != config.max_length:
            raise ValueError(f"tokenizer window {tokenizer.model_max_length} != encoder max_length {config.max_length}")
        if config.width % config.heads:
            raise ValueError(f"text width {config.width} is not divisible by heads {config.heads}")
        self.config = config
        self.tokenizer = tokenizer
        self.width = self.pooled_width = config.width
        self.token_embedding = nn.Embedding(len(tokenizer), config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.width))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        self.blocks = nn.ModuleList(_Block(config.width, config.heads, config.mlp_ratio)
                                    for _ in range(config.layers))
        self.ln_final = nn.LayerNorm(config.width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoderOutput:
        """(B, L) ids and mask -> hidden (B, L, D), pooled (B, D) = mean over real tokens."""
        n = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.position_embedding[:n]
        keep = attention_mask.bool()
        for block in self.blocks:
            x = block(x, keep)
        x = self.ln_final(x)
        w = attention_mask.to(x.dtype)[..., None]
        pooled = (x * w).sum(1) / w.sum(1).clamp_min(1)
        return TextEncoderOutput(x, pooled, attention_mask)

    def encode(self, prompts: list[str]) -> TextEncoderOutput:
        """Prompts with A1111 weighting (``(word:1.3)``, ``(word)``, ``[word]``; :mod:`sumie.text.prompt`):
        the brackets are removed before tokenizing and each word's hidden state is multiplied by its
        weight (A1111's "No norm" emphasis: the outputs are LayerNormed, their mean is ~0, so the
        "Original" mean-restoring rescale is ill-conditioned here). The pooled output is not weighted.

        A prompt longer than the window (``max_length - 2`` words) is split into windows encoded
        separately and concatenated along the sequence, as A1111 does for CLIP: hidden (B, L*k, D)
        with its mask; shorter prompts of the batch get masked empty windows; pooled is the first
        window's."""
        return self.encode_tokens(self.tokenize(prompts))

    def tokenize(self, prompts: list[str]) -> "WindowedTokens":
        """Prompts -> the windows :meth:`encode` runs (ids, masks and word weights; see there).
        Kept apart so a training cache can tokenize its captions once (:mod:`sumie.train.cache`)."""
        from .prompt import parse_prompt_weights

        per = self.config.max_length - 2
        rows: list[tuple[list[int], list[float]]] = []
        for prompt in prompts:
            ids, ws = [], []
            for text, w in parse_prompt_weights(prompt):
                words = self.tokenizer.encode_text(text)
                ids += words
                ws += [w] * len(words)
            rows.append((ids, ws))
        k = max(1, max((len(ids) + per - 1) // per for ids, _ in rows))
        n = self.config.max_length
        input_ids = torch.full((k, len(rows), n), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((k, len(rows), n), dtype=torch.long)
        weights = torch.ones((k, len(rows), n))
        visible = torch.ones((k, len(rows), 1), dtype=torch.long)
        for b, (ids, ws) in enumerate(rows):
            for j in range(k):
                chunk, cw = ids[j * per:(j + 1) * per], ws[j * per:(j + 1) * per]
                if j > 0 and not chunk:
                    visible[j, b] = 0  # this prompt has fewer windows: an empty window, masked out below
                row = self.tokenizer.wrap(chunk)
                input_ids[j, b, :len(row)] = torch.tensor(row)
                mask[j, b, :len(row)] = 1
                weights[j, b, 1:1 + len(cw)] = torch.tensor(cw, dtype=torch.float32)
        return WindowedTokens(input_ids, mask, weights, visible)

    def encode_tokens(self, tokens: "WindowedTokens") -> TextEncoderOutput:
        """Encode :meth:`tokenize`'s windows (on any device) and join them as :meth:`encode` describes."""
        device = self.position_embedding.device
        tokens = tokens.to(device)
        outs = [self(tokens.input_ids[j], tokens.mask[j]) for j in range(tokens.input_ids.shape[0])]
        hidden = torch.cat([o.hidden for o in outs], dim=1)
        w = torch.cat(list(tokens.weights), dim=1).to(dtype=hidden.dtype)
        keep = torch.cat([o.attention_mask * tokens.visible[j] for j, o in enumerate(outs)], dim=1)
        return TextEncoderOutput(hidden * w[..., None], outs[0].pooled, keep)


@dataclass
class WindowedTokens:
    """Tokenized prompts as windows: ids and mask (k, B, L), word weights (k, B, L) and whether each
    window is real (k, B, 1); row b of every tensor is prompt b, so a batch is a gather on dim 1."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    visible: torch.Tensor

    def to(self, device) -> "WindowedTokens":
        return WindowedTokens(*(t.to(device, non_blocking=True) for t in
                                (self.input_ids, self.mask, self.weights, self.visible)))

    def rows(self, index: torch.Tensor) -> "WindowedTokens":
        """The prompts at ``index`` (B,) in that order."""
        return WindowedTokens(*(t[:, index] for t in (self.input_ids, self.mask, self.weights, self.visible)))


def ignored_words(encoder: TextEncoder, prompt: str) -> list[str]:
    """Words of ``prompt`` (A1111 weighting brackets removed) that a word-level encoder does not know;
    [] for encoders with subword tokenizers, which spell any word."""
    from .prompt import parse_prompt_weights

    tokenizer = getattr(encoder, "tokenizer", None)
    if not isinstance(tokenizer, WordTokenizer):
        return []
    words: dict[str, None] = {}
    for text, _ in parse_prompt_weights(prompt):
        words.update(dict.fromkeys(tokenizer.unknown_words(text)))
    return list(words)


def text_cond(encoder: TextEncoder, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The U-Net's condition for ``prompts`` (the empty prompt is unconditional): cross-attention
    tokens, and the pooled vector when the encoder feeds it (``text.pooled``)."""
    return encoder.encode(list(prompts)).as_cond(pooled=encoder.feeds_pooled)
