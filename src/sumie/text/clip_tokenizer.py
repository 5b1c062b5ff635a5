"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), offline and without dependencies.

Byte-pair encoding of Sennrich et al. 2016 over the byte-to-unicode alphabet of GPT-2
(Radford et al. 2019), with CLIP's end-of-word marker ``</w>`` and its word-splitting
pattern. The vocabulary comes from either

* a Hugging Face / diffusers tokenizer folder: ``vocab.json`` + ``merges.txt``, or
* OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (merges only; the vocabulary is derived from
  them exactly as CLIP's ``SimpleTokenizer`` does). sumie does not ship that file: it is
  found inside an installed ``open_clip`` (``pip install open-clip-torch``) or
  ``clip`` package, or given by path.

Text cleanup follows transformers' ``CLIPTokenizer`` (the ``tokenizers``-backed one that
diffusers pipelines load), which does *not* run ``ftfy`` or unescape HTML entities as
OpenAI's and OpenCLIP's tokenizers do. Its steps, reproduced here exactly:

1. the literal strings ``<|startoftext|>`` and ``<|endoftext|>`` are cut out of the raw
   text (case-sensitive) and become their special ids;
2. every other span: Unicode NFC; each run of whitespace becomes one space (whitespace
   as Oniguruma's ``\\s``: ``\\t\\n\\v\\f\\r``, U+0085 and the Unicode space, line and
   paragraph separators); lowercase one character at a time (so a final capital sigma
   becomes ``σ``, not ``ς``);
3. split into words: the contractions ``'s 't 're 've 'm 'll 'd``, runs of letters,
   single digits, runs of anything else that is not whitespace; whitespace is dropped.
   (Lowercased special-token strings that were not matched in step 1, such as
   ``<|ENDOFTEXT|>``, split further into ``<|``, the word, ``|>``, as GPT-2's byte-level
   pattern that HF applies after CLIP's does.)
4. each word as UTF-8 bytes mapped to printable characters, ``</w>`` on its last symbol,
   merged by BPE rank; symbols missing from the vocabulary become the unknown token.

"Letters" and "digits" are Unicode general categories L* and N*, read from Python's
``unicodedata``; tests check the ids against transformers on an awkward corpus. A sweep of
every code point ("a{c}b {c}{c}", OpenAI's vocabulary) agreed with transformers 5.23 on all
characters assigned in Python 3.11's Unicode 14; the ~9,400 that differ were assigned later
(Unicode 15-16, e.g. Todhri, Garay), which the Oniguruma inside ``tokenizers`` knows and
Python 3.11 does not.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import os
import unicodedata
from functools import lru_cache
from pathlib import Path

from .base import TokenizedBatch, Tokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Oniguruma's \s for Unicode strings: White_Space minus nothing but the C0 separators below
_WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                        "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


class TokenizerError(RuntimeError, ValueError):
    """A tokenizer that cannot be built from the files given; the message says what to do (a
    ValueError too, so the CLI prints it as one line)."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters: printable
    Latin-1 bytes map to themselves, the rest to U+0100 onwards; printable ones come first."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "L"


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "N"


def clean_text(text: str) -> str:
    """HF CLIPTokenizer's normalizer: NFC, whitespace runs -> one space, per-character lowercase."""
    text = unicodedata.normalize("NFC", text)
    out, in_space = [], False
    for ch in text:
        if ch in _WHITESPACE:
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(ch.lower())
            in_space = False
    return "".join(out)


def split_words(text: str) -> list[str]:
    """CLIP's word pattern on cleaned text: contractions, letter runs, single digits, other runs."""
    words, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _WHITESPACE:
            i += 1
            continue
        if ch == "<" and (text.startswith(BOS, i) or text.startswith(EOS, i)):
            word = BOS if text.startswith(BOS, i) else EOS
            words += ["<|", word[2:-2], "|>"]  # GPT-2's byte-level split of the lowercased string
            i += len(word)
            continue
        if ch == "'":
            c = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if c is not None:
                words.append(c)
                i += len(c)
                continue
        j = i + 1
        if _is_letter(ch):
            while j < n and _is_letter(text[j]):
                j += 1
        elif not _is_number(ch):
            while j < n and not (text[j] in _WHITESPACE or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        words.append(text[i:j])
        i = j
    return words


class ClipTokenizer(Tokenizer):
    """CLIP byte-level BPE; ``pad_token_id`` is the EOS id (SD 1.x) or 0 (SD 2.x, SDXL's second).

    Padding with 0 changes padding only, as in OpenCLIP (which SD 2.x and SDXL were trained
    with), A1111 and ComfyUI. transformers, given a folder whose pad token is ``!`` (id 0,
    diffusers' SD 2.x and SDXL ``tokenizer_2``), also treats every ``!`` in the text as that
    special token, so ``cat!!`` becomes ``cat</w> ! !`` instead of ``cat</w> !!</w>``;
    ``pad_token_special=True`` reproduces that for exact parity with diffusers."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, pad_with_eos: bool = True,
                 model_max_length: int = 77, pad_token_special: bool = False):
        for tok in (BOS, EOS):
            if tok not in vocab:
                raise TokenizerError(f"CLIP vocabulary lacks the special token {tok}")
        self.vocab = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.bos_token_id, self.eos_token_id = vocab[BOS], vocab[EOS]
        self.unk_token_id = self.eos_token_id  # HF's CLIP unk_token is <|endoftext|>
        self.pad_token_id = self.eos_token_id if pad_with_eos else 0
        self.model_max_length = model_max_length
        self.pad_token_special = pad_token_special
        self._specials = self._special_strings()
        self._byte = bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------ construction

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, **kw) -> "ClipTokenizer":
        """An HF tokenizer's ``vocab.json`` and ``merges.txt``."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise TokenizerError(f"{merges_txt}: merge lines must hold two symbols, got {bad[0]!r}")
        return cls(vocab, merges, **kw)

    @classmethod
    def from_folder(cls, folder: str | Path, **kw) -> "ClipTokenizer":
        """A diffusers ``tokenizer/`` folder: ``vocab.json`` + ``merges.txt``, or only ``tokenizer.json``
        (as transformers 5 saves it; the BPE vocabulary and merges are inside); its
        ``special_tokens_map.json`` or ``tokenizer_config.json`` decides the padding token unless
        ``pad_with_eos`` is given."""
        folder = Path(folder)
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if not vocab.is_file() or not merges.is_file():
            if (folder / "tokenizer.json").is_file():
                return cls.from_tokenizer_json(folder / "tokenizer.json", **cls._folder_kw(folder, kw))
            raise TokenizerError(f"{folder} holds no vocab.json + merges.txt nor tokenizer.json (a CLIP tokenizer "
                                 "folder)")
        return cls.from_files(vocab, merges, **cls._folder_kw(folder, kw))

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, **kw) -> "ClipTokenizer":
        """A Hugging Face ``tokenizers`` file (``tokenizer.json``) of a byte-level BPE model: its
        ``model.vocab`` and ``model.merges`` (strings "a b" or pairs [a, b], by version)."""
        try:
            model = json.loads(Path(path).read_text(encoding="utf-8"))["model"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"{path}: not a tokenizers JSON file with a model section ({e})") from e
        if model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
            raise TokenizerError(f"{path}: a {model.get('type')!r} tokenizer; CLIP's is BPE with vocab and merges")
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise TokenizerError(f"{path}: merges must hold two symbols, got {bad[0]!r}")
        return cls(dict(model["vocab"]), merges, **kw)

    @staticmethod
    def _folder_kw(folder: Path, kw: dict) -> dict:
        kw = dict(kw)
        if "pad_with_eos" not in kw:
            pad = _pad_token_of(folder)
            if pad is not None:
                kw["pad_with_eos"] = pad == EOS
        if "model_max_length" not in kw:
            cfg = folder / "tokenizer_config.json"
            if cfg.is_file():
                n = json.loads(cfg.read_text(encoding="utf-8")).get("model_max_length")
                if isinstance(n, int) and 0 < n < 100_000:
                    kw["model_max_length"] = n
        return kw

    @classmethod
    def from_openai_bpe(cls, path: str | Path | None = None, **kw) -> "ClipTokenizer":
        """OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (from ``path``, ``$SUMIE_CLIP_BPE`` or an
        installed open_clip / clip package); vocabulary built as CLIP's ``SimpleTokenizer`` does."""
        path = Path(path) if path is not None else find_openai_bpe()
        try:
            lines = gzip.open(path).read().decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path} is not a gzipped CLIP BPE merges file ({e})") from e
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        symbols = list(bytes_to_unicode().values())
        words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
        return cls({w: i for i, w in enumerate(words)}, merges, **kw)

    # ------------------------------------------------------------ encoding

    def _special_strings(self) -> dict[str, int]:
        specials = {BOS: self.bos_token_id, EOS: self.eos_token_id}
        if self.pad_token_special and self.pad_token_id != self.eos_token_id:
            inv = {v: k for k, v in self.vocab.items()}
            specials[inv[self.pad_token_id]] = self.pad_token_id
        return specials

    def with_padding(self, pad_with_eos: bool, pad_token_special: bool = False) -> "ClipTokenizer":
        """The same vocabulary with the other padding convention."""
        t = copy.copy(self)
        t.pad_token_id = self.eos_token_id if pad_with_eos else 0
        t.pad_token_special = pad_token_special
        t._specials = t._special_strings()
        t._cache = self._cache
        return t

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _bpe(self, word: str) -> list[int]:
        """Merge the byte symbols of one word by lowest merge rank (Sennrich et al. 2016)."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        syms = [self._byte[b] for b in word.encode("utf-8")]
        syms[-1] += "</w>"
        while len(syms) > 1:
            best, best_rank = None, None
            for i in range(len(syms) - 1):
                r = self.ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            pair = (syms[best], syms[best + 1])
            merged, i = [], 0
            while i < len(syms):  # merge every occurrence of the best pair, left to right
                if i < len(syms) - 1 and (syms[i], syms[i + 1]) == pair:
                    merged.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    merged.append(syms[i])
                    i += 1
            syms = merged
        ids = [self.vocab.get(s, self.unk_token_id) for s in syms]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens, truncation or padding."""
        specials = self._specials
        ids: list[int] = []
        i = 0
        while True:
            hits = [(p, s) for s in specials if (p := text.find(s, i)) >= 0]
            j, special = min(hits, key=lambda h: (h[0], -len(h[1]))) if hits else (len(text), None)
            for word in split_words(clean_text(text[i:j])):
                ids += self._bpe(word)
            if special is None:
                return ids
            ids.append(specials[special])
            i = j + len(special)

    def tokens(self, text: str) -> list[str]:
        """The vocabulary strings of ``encode_text`` (for inspection)."""
        inv = {v: k for k, v in self.vocab.items()}
        return [inv[i] for i in self.encode_text(text)]

    def __call__(self, prompts: list[str], max_length: int | None = None, truncation: bool = True) -> TokenizedBatch:
        """``[BOS] ids [EOS] pad...`` rows of ``max_length`` (77): SD's single-window encoding."""
        return TokenizedBatch.framed([self.encode_text(p) for p in prompts], max_length or self.model_max_length,
                                     self.bos_token_id, self.eos_token_id, self.pad_token_id, truncation)


def _pad_token_of(folder: Path) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if f.is_file():
            pad = json.loads(f.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    return None


def find_openai_bpe() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz``: ``$SUMIE_CLIP_BPE``, else inside an installed
    ``open_clip`` or ``clip`` package (found without importing them)."""
    env = os.environ.get("SUMIE_CLIP_BPE")
    if env:
        if not Path(env).is_file():
            raise TokenizerError(f"$SUMIE_CLIP_BPE points to {env}, which does not exist (or give a diffusers "
                                 "tokenizer/ folder: --tokenizer DIR)")
        return Path(env)
    for pkg in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            p = Path(loc) / OPENAI_BPE_FILE
            if p.is_file():
                return p
    raise TokenizerError(
        f"CLIP's BPE vocabulary ({OPENAI_BPE_FILE}) was not found. sumie does not ship it; either "
        "give the tokenizer/ folder of a diffusers model (`--tokenizer DIR`: vocab.json + merges.txt, or "
        "tokenizer.json), install a package "
        "that carries it (`pip install open-clip-torch --no-deps`), or set $SUMIE_CLIP_BPE to the file.")
