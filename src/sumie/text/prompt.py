"""Prompt weighting and long prompts, in the meaning users know from AUTOMATIC1111's web UI.

Syntax (``modules/prompt_parser.py`` of stable-diffusion-webui, ``parse_prompt_attention``):

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1; nesting
  multiplies; ``(text:1.3)`` multiplies by 1.3 instead of 1.1;
* ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters; a lone ``\\`` is dropped;
* a bracket that is never closed weights everything after it (as if closed at the end); a
  closing bracket with no opener, and ``:`` outside ``(...:w)``, are literal text;
* ``BREAK`` (a whole word, upper case) ends the current 75-token window.

Two deliberate differences: a malformed weight such as ``(a:1.2.3)`` makes A1111 raise
(``float("1.2.3")``); here the ``:1.2.3)`` is kept as literal text, the ``(`` stays open.
And a ``BREAK`` inside brackets still breaks (A1111 scales its marker weight and then
no longer recognises it).

Long prompts (``modules/sd_hijack_clip.py``, ``tokenize_line``): each weighted span is
tokenized on its own; tokens fill windows of 75, each wrapped as ``[BOS] tokens [EOS] pad``;
when a window fills up and a comma lies within the last ``comma_backtrack`` (20) tokens, the
tokens after that comma move on to the next window. Each window is encoded separately and
the results are concatenated along the sequence: (B, 77*k, D).

Weights are applied after the encoder ("Original" emphasis): hidden states are multiplied
by their token's weight, then rescaled so their mean is what it was. A1111 takes that mean
over the whole batch it happens to encode; here it is per prompt and window, which is the
same for the single prompts A1111 encodes and keeps prompts in a batch independent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .base import Tokenizer

BREAK = "BREAK"
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# Lexemes of the weighting syntax, tried in this order at each position.
_LEXEME = re.compile(r"""
    \\[()\[\]\\]         # escaped bracket or backslash
  | \\                   # lone backslash (dropped)
  | \(                   # open round
  | \[                   # open square
  | :([+-]?[.\d]+)\)     # weight and close round
  | \)                   # close round
  | ]                    # close square
  | [^\\()\[\]:]+        # plain text
  | :                    # literal colon
""", re.X)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """A prompt -> (text, weight) spans in order, equal neighbours merged; ``(BREAK, -1.0)``
    marks a window break. A1111's ``parse_prompt_attention``, same floats in the same order."""
    res: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, m: float) -> None:
        for span in res[start:]:
            if not span[2]:
                span[1] *= m

    for m in _LEXEME.finditer(text):
        lex, weight = m.group(0), m.group(1)
        if lex.startswith("\\"):
            res.append([lex[1:], 1.0, False])
        elif lex == "(":
            round_open.append(len(res))
        elif lex == "[":
            square_open.append(len(res))
        elif weight is not None and round_open and _FLOAT.fullmatch(weight):
            multiply_from(round_open.pop(), float(weight))
        elif lex == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif lex == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(lex)):
                if i > 0:
                    res.append([BREAK, -1.0, True])
                res.append([part, 1.0, False])
    for pos in round_open:
        multiply_from(pos, ROUND_MULTIPLIER)
    for pos in square_open:
        multiply_from(pos, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0, False]]
    merged: list[list] = [res[0]]
    for span in res[1:]:
        last = merged[-1]
        if not span[2] and not last[2] and span[1] == last[1]:
            last[0] += span[0]
        else:
            merged.append(span)
    return [(t, w) for t, w, _ in merged]


@dataclass
class PromptWindows:
    """One prompt as k windows of ``[BOS] tokens [EOS] pad``: ids (k, L) and weights (k, L)."""

    ids: torch.Tensor
    weights: torch.Tensor
    token_count: int  # prompt tokens, without start/end/padding


@dataclass
class _Window:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def tokenize_weighted(tokenizer: Tokenizer, prompt: str, *, weighting: bool = True,
                      comma_backtrack: int = 20) -> PromptWindows:
    """A1111's ``tokenize_line``: weighted spans -> windows of ``chunk_length`` prompt tokens."""
    spans = parse_prompt_weights(prompt) if weighting else [(prompt, 1.0)]
    n = tokenizer.chunk_length
    comma = _comma_id(tokenizer)
    windows: list[_Window] = []
    cur = _Window()
    last_comma = -1
    count = 0

    def close() -> None:
        nonlocal cur, last_comma
        windows.append(cur)
        cur, last_comma = _Window(), -1

    for text, weight in spans:
        if weight == -1.0 and text == BREAK:
            close()
            continue
        for tok in tokenizer.encode_text(text):
            count += 1
            if tok == comma:
                last_comma = len(cur.tokens)
            elif (comma_backtrack and len(cur.tokens) == n and last_comma != -1
                  and len(cur.tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1  # the text after the last comma moves to the next window
                moved = _Window(cur.tokens[cut:], cur.weights[cut:])
                del cur.tokens[cut:], cur.weights[cut:]
                close()
                cur = moved
            if len(cur.tokens) == n:
                close()
            cur.tokens.append(tok)
            cur.weights.append(weight)
    if cur.tokens or not windows:
        close()

    ids, weights = [], []
    for w in windows:
        pad = n - len(w.tokens)
        ids.append([tokenizer.bos_token_id, *w.tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
        weights.append([1.0, *w.weights, 1.0] + [1.0] * pad)
    return PromptWindows(torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32), count)


def _comma_id(tokenizer: Tokenizer) -> int | None:
    vocab = getattr(tokenizer, "vocab", None)
    return vocab.get(",</w>") if isinstance(vocab, dict) else None


def empty_window(tokenizer: Tokenizer) -> tuple[list[int], list[float]]:
    """The window of an empty prompt (A1111's ``empty_chunk``), used to even out batches."""
    n = tokenizer.chunk_length
    return ([tokenizer.bos_token_id, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * n, [1.0] * (n + 2))


def batch_windows(tokenizer: Tokenizer, prompts: list[str], **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ids (B, k, L) and weights (B, k, L); shorter prompts are padded with empty
    windows to the longest prompt's k, as A1111 does within a batch."""
    per = [tokenize_weighted(tokenizer, p, **kw) for p in prompts]
    k = max(p.ids.shape[0] for p in per)
    e_ids, e_w = empty_window(tokenizer)
    ids, weights = [], []
    for p in per:
        extra = k - p.ids.shape[0]
        ids.append(torch.cat([p.ids, torch.tensor(e_ids, dtype=torch.long).expand(extra, -1)]))
        weights.append(torch.cat([p.weights, torch.tensor(e_w).expand(extra, -1)]))
    return torch.stack(ids), torch.stack(weights)


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on one window: hidden (B, L, D) times weights (B, L), then
    rescaled per prompt so that its mean is unchanged."""
    if bool((weights == 1).all()):
        return hidden
    mean = hidden.mean(dim=(1, 2), keepdim=True)
    out = hidden * weights[..., None].to(hidden.dtype)
    return out * (mean / out.mean(dim=(1, 2), keepdim=True))
