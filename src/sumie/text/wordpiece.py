"""BERT's WordPiece tokenizer (Devlin et al. 2019; Wu et al. 2016, sec. 4.1), offline and without dependencies.

Reads a Hugging Face / sentence-transformers folder's ``vocab.txt`` (one token a line, the id
is the line number) and, when present, ``tokenizer_config.json`` (``do_lower_case``,
``strip_accents``, ``tokenize_chinese_chars``, ``model_max_length``) and
``sentence_bert_config.json`` (``max_seq_length``, ``do_lower_case``). Its steps reproduce
the ``tokenizers``-backed ``BertTokenizer`` (``BertTokenizerFast``) that transformers and
sentence-transformers load:

1. the literal special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (case-sensitive, those in the
   vocabulary) are cut out of the raw text and become their ids;
2. every other span is cleaned: U+0000, U+FFFD and control characters (categories Cc, Cf, Co,
   Cs, except tab, newline, carriage return) are dropped, White_Space characters become a
   space; CJK ideographs are surrounded by spaces;
3. accents are stripped (NFD, then nonspacing marks, category Mn, removed) and the text is
   lowercased one character at a time (a final capital sigma becomes ``σ``), when the
   vocabulary is uncased; accents follow ``do_lower_case`` unless ``strip_accents`` says;
4. split on whitespace, then every punctuation character (ASCII punctuation and categories P*)
   is a word of its own;
5. each word, greedy longest-match-first, becomes vocabulary pieces, the non-initial ones with
   the ``##`` prefix; a word of more than 100 characters, or with a part no piece matches, is
   one ``[UNK]``.

Where transformers' pure-Python ``BertTokenizer`` (``BertTokenizerLegacy`` in transformers 5)
disagrees with the ``tokenizers`` one, this follows the latter: unassigned code points (Cn) are
kept, not dropped; lowercasing is per character, not Python's ``str.lower`` with its final-sigma
rule; CJK extension E starts at U+2B920, not U+2B820; the text is not NFC-composed first (which
only matters for cased vocabularies). Tests check the ids against both on an awkward corpus, and
the cases above against the ``tokenizers`` one. A sweep of every code point (``"a{c}b {c}{c}x"``
through normalizer and pre-tokenizer) agreed with tokenizers 0.23 on all but 559 characters, all
new in (or re-categorised by) Unicode 9 and later, whose categories tokenizers' older tables and
Python 3.11's Unicode 14 see differently (e.g. newer nonspacing marks and punctuation that
tokenizers keeps inside words, letters of Unicode 15-16 that Python does not know).
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from .base import TokenizedBatch, Tokenizer
from .clip_tokenizer import TokenizerError

SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
MAX_WINDOW = 128  # default cap on a window: captions are short, and a U-Net cross-attends to every position
MAX_CHARS_PER_WORD = 100
# Unicode White_Space (what Rust's char::is_whitespace tests); the C0/C1 controls among them are
# dropped as controls first, except tab, newline and carriage return
_WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                        "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_CONTROL = frozenset(("Cc", "Cf", "Co", "Cs"))
# "Chinese characters" of BERT's basic tokenizer: the CJK Unified Ideographs blocks and extensions A-E,
# the compatibility ideographs and their supplement; tokenizers starts extension E at U+2B920 where
# the Python tokenizer has U+2B820, and so does this
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK)


def _is_punctuation(ch: str) -> bool:
    """ASCII punctuation (``!`` to ``/``, ``:`` to ``@``, ``[`` to backquote, ``{`` to ``~``) or category P*."""
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 \
        or unicodedata.category(ch)[0] == "P"


def normalize(text: str, *, lowercase: bool = True, strip_accents: bool | None = None,
              chinese_chars: bool = True) -> str:
    """BERT's normalizer (steps 2-3 above): clean, space out CJK, strip accents, lowercase."""
    out = []
    for ch in text:
        cp = ord(ch)
        if ch in "\t\n\r" or ch in _WHITESPACE and unicodedata.category(ch) != "Cc":
            out.append(" ")
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch) in _CONTROL:
            continue
        elif chinese_chars and _is_cjk(cp):
            out += [" ", ch, " "]
        else:
            out.append(ch)
    text = "".join(out)
    if lowercase if strip_accents is None else strip_accents:  # accents follow the case unless told
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    if lowercase:
        text = "".join(c.lower() for c in text)
    return text


def split_words(text: str) -> list[str]:
    """BERT's pre-tokenizer on normalized text: split on whitespace, punctuation marks on their own."""
    words: list[str] = []
    for chunk in text.split(" "):  # normalized text holds no whitespace but spaces
        start = 0
        for i, ch in enumerate(chunk):
            if _is_punctuation(ch):
                if i > start:
                    words.append(chunk[start:i])
                words.append(ch)
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


class WordPieceTokenizer(Tokenizer):
    """BERT WordPiece: ``[CLS]`` is the start token, ``[SEP]`` the end token, ``[PAD]`` padding.

    ``vocab`` lists the tokens by id (``vocab.txt``'s lines); a token listed twice has the id of
    its last line, as transformers reads the file."""

    def __init__(self, vocab: list[str], *, do_lower_case: bool = True, strip_accents: bool | None = None,
                 tokenize_chinese_chars: bool = True, model_max_length: int = MAX_WINDOW,
                 max_chars_per_word: int = MAX_CHARS_PER_WORD):
        self.vocab = list(vocab)
        self.index = {tok: i for i, tok in enumerate(self.vocab)}
        missing = [SPECIALS[k] for k in ("unk", "cls", "sep", "pad") if SPECIALS[k] not in self.index]
        if missing:
            raise TokenizerError(f"a BERT vocabulary needs the special tokens {', '.join(missing)}; "
                                 "is this a WordPiece vocab.txt?")
        if model_max_length < 3:
            raise ValueError(f"model_max_length must leave room for [CLS], a token and [SEP], got {model_max_length}")
        self.do_lower_case, self.strip_accents = do_lower_case, strip_accents
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.model_max_length = model_max_length
        self.max_chars_per_word = max_chars_per_word
        self.unk_token_id, self.bos_token_id = self.index[SPECIALS["unk"]], self.index[SPECIALS["cls"]]
        self.eos_token_id, self.pad_token_id = self.index[SPECIALS["sep"]], self.index[SPECIALS["pad"]]
        self.specials = {t: self.index[t] for t in SPECIALS.values() if t in self.index}
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(self.specials, key=len, reverse=True)))
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------ construction

    @classmethod
    def from_folder(cls, folder: str | Path, model_max_length: int | None = None) -> "WordPieceTokenizer":
        """A Hugging Face / sentence-transformers folder holding ``vocab.txt``. The window is
        ``model_max_length`` if given, else the folder's own limit (``sentence_bert_config.json``'s
        ``max_seq_length``, ``tokenizer_config.json``'s ``model_max_length``, ``config.json``'s
        ``max_position_embeddings``, in that order) capped at :data:`MAX_WINDOW`."""
        folder = Path(folder)
        vocab_file = folder / "vocab.txt"
        if not vocab_file.is_file():
            raise TokenizerError(f"{folder} has no vocab.txt (the WordPiece vocabulary of a BERT tokenizer folder)")
        with open(vocab_file, encoding="utf-8") as f:
            vocab = [line.rstrip("\n") for line in f]
        tc = _read_json(folder / "tokenizer_config.json")
        st = _read_json(folder / "sentence_bert_config.json")
        kw = {k: tc[k] for k in ("do_lower_case", "strip_accents", "tokenize_chinese_chars") if tc.get(k) is not None}
        if st.get("do_lower_case"):  # sentence-transformers lowercases before its tokenizer when this is set
            kw["do_lower_case"] = True
        if model_max_length is None:
            limits = [st.get("max_seq_length"), tc.get("model_max_length"),
                      _read_json(folder / "config.json").get("max_position_embeddings")]
            found = [int(n) for n in limits if isinstance(n, (int, float)) and 3 <= n < 1e6]  # 1e30: "no limit"
            model_max_length = min(found[0] if found else 512, MAX_WINDOW)
        return cls(vocab, model_max_length=model_max_length, **kw)

    def with_max_length(self, model_max_length: int) -> "WordPieceTokenizer":
        """The same vocabulary and rules with another window."""
        return WordPieceTokenizer(self.vocab, do_lower_case=self.do_lower_case, strip_accents=self.strip_accents,
                                  tokenize_chinese_chars=self.tokenize_chinese_chars,
                                  model_max_length=model_max_length, max_chars_per_word=self.max_chars_per_word)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    # ------------------------------------------------------------ encoding

    def _wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first pieces of one word; ``[UNK]`` for the whole word if any part fails."""
        if word in self._cache:
            return self._cache[word]
        if len(word) > self.max_chars_per_word:
            return [self.unk_token_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.index:
                    ids.append(self.index[piece])
                    start = end
                    break
            else:
                ids = [self.unk_token_id]
                break
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def _encode_span(self, text: str) -> list[int]:
        norm = normalize(text, lowercase=self.do_lower_case, strip_accents=self.strip_accents,
                         chinese_chars=self.tokenize_chinese_chars)
        return [i for word in split_words(norm) for i in self._wordpiece(word)]

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``[CLS]``/``[SEP]``, truncation or padding."""
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            ids += self._encode_span(text[start:m.start()])
            ids.append(self.specials[m.group()])
            start = m.end()
        return ids + self._encode_span(text[start:])

    def tokens(self, text: str) -> list[str]:
        """The vocabulary strings of ``encode_text`` (for inspection)."""
        return [self.vocab[i] for i in self.encode_text(text)]

    def __call__(self, prompts: list[str], max_length: int | None = None, truncation: bool = True) -> TokenizedBatch:
        """``[CLS] ids [SEP] [PAD]...`` rows of ``max_length`` (default ``model_max_length``)."""
        return TokenizedBatch.framed([self.encode_text(p) for p in prompts], max_length or self.model_max_length,
                                     self.bos_token_id, self.eos_token_id, self.pad_token_id, truncation)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}
