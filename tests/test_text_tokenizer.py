"""CLIP tokenizer: ids identical to transformers' CLIPTokenizer on awkward prompts, both padding
conventions, with a synthetic vocabulary (always) and OpenAI's vocabulary (when installed)."""

import json
from collections import Counter

import pytest

from sumie.text.clip_tokenizer import (BOS, EOS, ClipTokenizer, TokenizerError, bytes_to_unicode, clean_text,
                                       find_openai_bpe, split_words)

LONG = ", ".join(f"(detail {i}:1.{i % 10})" for i in range(60))
CORPUS = [
    "a photo of a cat", "", " ", "A  PHOTO\tof\na Cat!!", "  leading and trailing  ",
    "don't you're we've I'm they'll he'd it's DON'T 's's''s 'x",
    "&amp; &lt;b&gt;bold&lt;/b&gt; caf&eacute; &#39;quoted&#39; &nbsp;",
    "emoji 🐱‍👤 🏳️‍🌈 👍🏽 😀😃😄 🇯🇵 ❤️", "ΟΔΟΣ ΣΊΣΥΦΟΣ σοφός", "İstanbul ǅ ß ẞ ﬁ Ⅻ ½ ² ⁴ ① ١٢٣",
    "東京タワー、夜景 한국어 문장", "العربية עברית ไทย हिन्दी किताब", "cafe\u0301 e\u0301 n\u0303", "ＦＵＬＬ ｗｉｄｔｈ １２３",
    "(masterpiece:1.3), [blurry], ((best quality)), \\(literal\\), (unbalanced [too",
    "1234.5e-6 3.14159 v2.1 1,000,000 #hashtag @user 50% $5", "Hello,World;foo:bar|baz/qux\\quux~`^",
    "a<|endoftext|>b", "a <|startoftext|> b <|endoftext|>", "<|ENDOFTEXT|> x <|startoftext", "<|<|endoftext|>|>",
    "\u00a0nbsp\u3000ideographic\u2028ls\u2029ps\x1cfs\x85nel\u200bzwsp\u200dzwj\ufeffbom\t\r\n\x0b\x0c",
    "\x00\x01ctrl\x7f", "ゃゅょ ー〜 ｶﾀｶﾅ", "a" * 300, " ".join(["word"] * 120), LONG,
    "supercalifragilisticexpialidocious antidisestablishmentarianism", "💩" * 40, "---===***!!!???...",
]


def _train_merges(words: list[str], n: int) -> list[tuple[str, str]]:
    """A tiny BPE training (Sennrich et al. 2016) over byte-level words with CLIP's </w>."""
    byte = bytes_to_unicode()
    seqs = Counter()
    for w in words:
        syms = [byte[b] for b in w.encode("utf-8")]
        syms[-1] += "</w>"
        seqs[tuple(syms)] += 1
    merges = []
    for _ in range(n):
        pairs = Counter()
        for s, c in seqs.items():
            for p in zip(s, s[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new = Counter()
        for s, c in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new[tuple(out)] += c
        seqs = new
    return merges


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory):
    """vocab.json + merges.txt with all 512 byte symbols and merges learned from the corpus."""
    words = [w for text in CORPUS + ["photograph of the lovely cats and dogs, best quality"] * 5
             for w in split_words(clean_text(text))]
    merges = _train_merges(words, 400)
    syms = list(bytes_to_unicode().values())
    tokens = syms + [s + "</w>" for s in syms] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    folder = tmp_path_factory.mktemp("clip_tok")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    return folder


def _hf(folder, **kw):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), **kw)


def _compare(ours: ClipTokenizer, hf) -> None:
    for text in CORPUS:
        assert ours.encode_text(text) == hf(text, add_special_tokens=False)["input_ids"], repr(text)
    # one window, truncated and padded: SD's tokenizer call
    ref = hf(CORPUS, padding="max_length", max_length=77, truncation=True)
    got = ours(CORPUS)
    assert got.input_ids.tolist() == ref["input_ids"]
    assert got.attention_mask.tolist() == ref["attention_mask"]


def test_synthetic_vocab_matches_transformers_sd1_padding(synthetic_folder):
    ours = ClipTokenizer.from_folder(synthetic_folder, pad_with_eos=True)
    _compare(ours, _hf(synthetic_folder))
    assert ours.pad_token_id == ours.eos_token_id


def test_synthetic_vocab_matches_transformers_pad_zero(synthetic_folder):
    """SD 2.x / SDXL's second tokenizer: diffusers sets pad_token "!" (id 0), which transformers
    also splits out of the text as a special token; pad_token_special reproduces that."""
    hf = _hf(synthetic_folder, pad_token="!")
    assert hf.pad_token_id == 0
    ours = ClipTokenizer.from_folder(synthetic_folder, pad_with_eos=False, pad_token_special=True)
    _compare(ours, hf)
    row = ours(["a photo"]).input_ids[0].tolist()
    end = row.index(ours.eos_token_id)
    assert set(row[end + 1:]) == {0}


def test_pad_zero_keeps_text_ids_by_default(synthetic_folder):
    """OpenCLIP's convention: only the padding changes, "!" in the text stays ordinary BPE."""
    sd1 = ClipTokenizer.from_folder(synthetic_folder, pad_with_eos=True)
    sd2 = sd1.with_padding(False)
    for text in CORPUS:
        assert sd2.encode_text(text) == sd1.encode_text(text)
    a, b = sd1(["wow!! a cat"]).input_ids[0], sd2(["wow!! a cat"]).input_ids[0]
    n = int((a == sd1.eos_token_id).int().argmax()) + 1
    assert a[:n].tolist() == b[:n].tolist() and set(b[n:].tolist()) == {0}


def test_folder_padding_read_from_special_tokens_map(synthetic_folder, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((synthetic_folder / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    assert ClipTokenizer.from_folder(tmp_path).pad_token_id == 0
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": EOS}}))
    t = ClipTokenizer.from_folder(tmp_path)
    assert t.pad_token_id == t.eos_token_id


def test_bpe_merges_by_rank_not_by_position():
    byte = bytes_to_unicode()
    syms = list(byte.values())
    merges = [("b", "c</w>"), ("a", "b")]  # "abc": rank 0 merge wins although "ab" comes first
    vocab = {t: i for i, t in enumerate(syms + [s + "</w>" for s in syms] + ["bc</w>", "ab", BOS, EOS])}
    t = ClipTokenizer(vocab, merges)
    assert t.tokens("abc") == ["a", "bc</w>"]
    assert t.tokens("ab") == ["a", "b</w>"]  # ("a", "b</w>") is not the merge ("a", "b")
    assert t.tokens("abab") == ["ab", "a", "b</w>"]


def test_special_strings_and_unknown_symbols():
    vocab = {"a": 0, "a</w>": 1, BOS: 2, EOS: 3}
    t = ClipTokenizer(vocab, [])
    assert t.encode_text("a<|endoftext|>a") == [1, 3, 1]
    assert t.encode_text("é") == [t.unk_token_id] * 2  # two UTF-8 bytes, neither in the vocabulary


def test_bad_vocabulary_errors(tmp_path):
    with pytest.raises(TokenizerError, match="special token"):
        ClipTokenizer({"a": 0}, [])
    with pytest.raises(TokenizerError, match="vocab.json"):
        ClipTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({BOS: 0, EOS: 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match="two symbols"):
        ClipTokenizer.from_folder(tmp_path)


def test_missing_openai_bpe_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SUMIE_CLIP_BPE", str(tmp_path / "nope.txt.gz"))
    with pytest.raises(TokenizerError, match="does not exist"):
        find_openai_bpe()


def test_truncation():
    vocab = {"a": 0, "a</w>": 1, BOS: 2, EOS: 3}
    t = ClipTokenizer(vocab, [], model_max_length=5)
    assert t(["a a a a a a"]).input_ids.tolist() == [[2, 1, 1, 1, 3]]
    with pytest.raises(ValueError, match="more than"):
        t(["a a a a"], truncation=False)


@pytest.fixture(scope="module")
def openai_tokenizer():
    try:
        return ClipTokenizer.from_openai_bpe()
    except TokenizerError:
        pytest.skip("OpenAI's CLIP BPE file is not installed (pip install open-clip-torch --no-deps)")


def test_openai_vocabulary_known_ids(openai_tokenizer):
    """Ids published with CLIP ViT-L/14 (transformers' CLIPTokenizer documentation example)."""
    assert openai_tokenizer.vocab_size == 49408
    assert openai_tokenizer(["a photo of a cat"]).input_ids[0, :8].tolist() == \
        [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


def test_openai_vocabulary_matches_transformers(openai_tokenizer, tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "vocab.json").write_text(json.dumps(openai_tokenizer.vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(openai_tokenizer.ranks, key=openai_tokenizer.ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                         encoding="utf-8")
    _compare(openai_tokenizer, _hf(tmp_path))
    _compare(openai_tokenizer.with_padding(False, pad_token_special=True), _hf(tmp_path, pad_token="!"))
