"""Frozen pretrained BERT text encoder (text.kind = "hf") and its WordPiece tokenizer: token ids equal
to transformers' BertTokenizer (pure Python) and BertTokenizerFast on an awkward corpus, hidden states
equal to a tiny random transformers BertModel, sentence-transformers pooling, bad input, and a
tiny caption model trained and sampled on it."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sumie.config import resolve
from sumie.io.checkpoint import CheckpointError, latest_checkpoint
from sumie.models import FROZEN_TEXT_FILE, TEXT_FILES, check_conditioning, export_model, load_text_encoder
from sumie.text.bert import BertTextEncoder, fingerprint, verify_fingerprint
from sumie.text.wordpiece import WordPieceTokenizer

transformers = pytest.importorskip("transformers")

WORDS = ["a", "at", "background", "black", "blue", "bottom", "center", "circle", "cross", "dark", "diamond",
         "gray", "green", "in", "large", "left", "light", "medium", "on", "orange", "pink", "purple", "red",
         "right", "small", "square", "star", "the", "top", "triangle", "white", "yellow",
         "cafe", "un", "play", "east", "東", "京", "🐱", "ο", "δ"]
PIECES = ["##aff", "##able", "##ing", "##ed", "##s", "##er", "##ern", "##ο", "##δ", "##σ", "##ς"]
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(33, 127)]
         + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + WORDS + PIECES)
CASED_EXTRA = ["Café", "café", "Red", "RED", "##é"]

# Both transformers tokenizers agree on these; so must sumie.
CORPUS = [
    "a red circle", "", " ", "A  RED\tcircle\non the TOP-left!!", "  leading and trailing  ",
    "Café crème brûlée naïve résumé", "cafe\u0301 e\u0301 n\u0303 CAFÉ", "σοφός Σίσυφος",
    "İstanbul ǅ ß ẞ ﬁ Ⅻ ½ ² ① ١٢٣",
    "東京タワー、夜景 한국어 문장 東京東", "العربية עברית ไทย हिन्दी", "ＦＵＬＬ ｗｉｄｔｈ １２３",
    "emoji 🐱‍👤 🏳️‍🌈 👍🏽 😀😃😄 🇯🇵 ❤️ 🐱🐱 a🐱b",
    "(masterpiece:1.3), [blurry], ((best quality)), \\(literal\\), (unbalanced [too",
    "1234.5e-6 3.14159 v2.1 1,000,000 #hashtag @user 50% $5", "Hello,World;foo:bar|baz/qux\\quux~`^",
    "unaffable playing played plays eastern Eastern", "a [SEP] b [MASK]c [CLS][CLS] [sep] [UNK] [PAD] x[SEP]y",
    "\u00a0nbsp\u3000ideographic\u2028ls\u2029ps\x1cfs\x85nel\u200bzwsp\u200dzwj\ufeffbom\t\r\n\x0b\x0c\u1680o",
    "\x00\x01ctrl\x7f \ufffdreplacement \ue000private", "a" * 100, "a" * 101, "ab" * 60 + " red",
    " ".join(["circle"] * 200), "supercalifragilisticexpialidocious", "---===***!!!???...", "\u0301\u0301 ",
]
# Where the two disagree (see sumie.text.wordpiece): unassigned code points, the final-sigma rule,
# CJK extension E's first 256; sumie follows the tokenizers-backed one.
FAST_ONLY = ["a\u0378b red", "ΟΔΟΣ οδοσ", "a\U0002B820b a\U0002B920b 東"]


def _slow_tokenizer_class():
    try:  # transformers 5: the pure-Python tokenizer is BertTokenizerLegacy; BertTokenizer is the fast one
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
        return BertTokenizerLegacy
    except ImportError:
        return transformers.BertTokenizer


def _write_vocab(folder, vocab=VOCAB, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _tiny_config(**kw):
    base = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64, hidden_act="gelu")
    return transformers.BertConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random BertModel written by transformers' save_pretrained (safetensors), with vocab.txt."""
    folder = tmp_path_factory.mktemp("bert") / "tiny-bert"
    torch.manual_seed(0)
    model = transformers.BertModel(_tiny_config(), add_pooling_layer=True).eval()
    model.save_pretrained(folder, safe_serialization=True)
    _write_vocab(folder)
    return folder


def _hf_batch(folder, prompts, n):
    tok = transformers.BertTokenizerFast.from_pretrained(str(folder))
    return tok(prompts, padding="max_length", truncation=True, max_length=n, return_tensors="pt")


# ---------------------------------------------------------------- tokenizer

def test_wordpiece_ids_equal_both_transformers_tokenizers(tmp_path):
    folder = _write_vocab(tmp_path / "tok")
    ours = WordPieceTokenizer.from_folder(folder)
    slow = _slow_tokenizer_class()(str(folder / "vocab.txt"))
    fast = transformers.BertTokenizerFast.from_pretrained(str(folder))
    for text in CORPUS:
        want = fast(text, add_special_tokens=False)["input_ids"]
        assert slow(text, add_special_tokens=False)["input_ids"] == want, text  # the oracles agree here
        assert ours.encode_text(text) == want, (text, ours.tokens(text))
    for text in FAST_ONLY:
        want = fast(text, add_special_tokens=False)["input_ids"]
        assert slow(text, add_special_tokens=False)["input_ids"] != want, text  # a real disagreement
        assert ours.encode_text(text) == want, text
    assert ours.tokens("unaffable playing") == ["un", "##aff", "##able", "play", "##ing"]
    assert ours.encode_text("a" * 101) == [ours.unk_token_id]  # over 100 characters: one [UNK]
    # windows: [CLS] ids [SEP] [PAD]..., truncated, exactly as transformers pads and truncates
    batch = ours(CORPUS, max_length=20)
    want = fast(CORPUS, padding="max_length", truncation=True, max_length=20, return_tensors="pt")
    assert torch.equal(batch.input_ids, want["input_ids"]) and torch.equal(batch.attention_mask, want["attention_mask"])
    assert batch.input_ids[1].tolist()[:3] == [2, 3, 0]  # the empty prompt: [CLS] [SEP] [PAD]
    with pytest.raises(ValueError, match="more than the 18"):
        ours([" ".join(["circle"] * 30)], max_length=20, truncation=False)


def test_wordpiece_cased_vocabulary_and_folder_settings(tmp_path):
    folder = _write_vocab(tmp_path / "cased", VOCAB + CASED_EXTRA,
                          {"do_lower_case": False, "model_max_length": 1000000000000000019884624838656})
    ours = WordPieceTokenizer.from_folder(folder)
    fast = transformers.BertTokenizerFast.from_pretrained(str(folder))
    for text in CORPUS + FAST_ONLY + ["Café RED Red red café"]:
        assert ours.encode_text(text) == fast(text, add_special_tokens=False)["input_ids"], text
    assert ours.model_max_length == 128  # no real limit in the folder: 512, capped at MAX_WINDOW
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 40, "do_lower_case": False}))
    assert WordPieceTokenizer.from_folder(folder).model_max_length == 40
    assert WordPieceTokenizer.from_folder(folder, model_max_length=16).model_max_length == 16
    with pytest.raises(Exception, match=r"special tokens \[CLS\]"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "a"])


# ---------------------------------------------------------------- encoder

PROMPTS = ["a red circle at the top left", "", "Café crème: a (small) 東京 star!!", " ".join(["square"] * 40)]


def test_hidden_states_and_mean_pooling_equal_transformers(hf_folder):
    ref_model = transformers.BertModel.from_pretrained(str(hf_folder)).eval()
    enc = BertTextEncoder.from_folder(hf_folder, max_length=24, weighting=False)
    assert (enc.width, enc.pooled_width, enc.tokenizer.model_max_length) == (32, 32, 24)
    b = _hf_batch(hf_folder, PROMPTS, 24)
    out = enc.encode(PROMPTS)
    assert torch.equal(out.attention_mask.cpu(), b["attention_mask"])
    with torch.no_grad():
        ref = ref_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    torch.testing.assert_close(out.hidden, ref, atol=1e-5, rtol=0)
    w = b["attention_mask"][..., None].float()
    torch.testing.assert_close(out.pooled, (ref * w).sum(1) / w.sum(1), atol=1e-5, rtol=0)
    # frozen: no gradients, stays in eval mode, nothing to train
    assert not any(p.requires_grad for p in enc.parameters())
    assert enc.train().training is False and out.hidden.grad_fn is None


def test_sentence_transformers_layout_cls_pooling_normalize_and_bert_prefix(hf_folder, tmp_path):
    st = tmp_path / "st"
    shutil.copytree(hf_folder, st)
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    enc = BertTextEncoder.from_folder(st, max_length=16, weighting=False)
    b = _hf_batch(hf_folder, PROMPTS[:3], 16)
    with torch.no_grad():
        ref = transformers.BertModel.from_pretrained(str(hf_folder)).eval()(**b).last_hidden_state
    torch.testing.assert_close(enc.encode(PROMPTS[:3]).pooled, F.normalize(ref[:, 0], dim=1), atol=1e-5, rtol=0)

    mlm = tmp_path / "mlm"  # BertForMaskedLM: tensors under "bert.", plus the "cls." head
    torch.manual_seed(1)
    model = transformers.BertForMaskedLM(_tiny_config()).eval()
    model.save_pretrained(mlm, safe_serialization=True)
    _write_vocab(mlm)
    with torch.no_grad():
        ref = model.bert(**_hf_batch(mlm, PROMPTS, 16)).last_hidden_state
    enc = BertTextEncoder.from_folder(mlm, max_length=16, weighting=False)
    torch.testing.assert_close(enc.encode(PROMPTS).hidden, ref, atol=1e-5, rtol=0)


def test_prompt_weights_scale_token_states_not_pooled(hf_folder):
    enc = BertTextEncoder.from_folder(hf_folder, max_length=16)
    plain, up = enc.encode(["a red circle"]), enc.encode(["a (red:1.5) circle"])
    torch.testing.assert_close(up.hidden[0, 2], 1.5 * plain.hidden[0, 2])  # position 2 = "red" (after [CLS], "a")
    torch.testing.assert_close(up.hidden[0, [0, 1, 3, 4]], plain.hidden[0, [0, 1, 3, 4]])
    torch.testing.assert_close(up.pooled, plain.pooled)
    assert enc.encode(["a red BREAK circle"]).attention_mask.sum() == 5


# ---------------------------------------------------------------- bad input

def test_bad_folders_are_clear_errors(hf_folder, tmp_path):
    with pytest.raises(CheckpointError, match="text encoder folder not found"):
        BertTextEncoder.from_folder(tmp_path / "nowhere")

    def variant(name, drop=(), edit_config=None):
        d = tmp_path / name
        shutil.copytree(hf_folder, d)
        for f in drop:
            (d / f).unlink()
        if edit_config:
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(edit_config)
            (d / "config.json").write_text(json.dumps(cfg))
        return d

    with pytest.raises(CheckpointError, match="no config.json"):
        BertTextEncoder.from_folder(variant("no-config", ["config.json"]))
    with pytest.raises(CheckpointError, match="no vocab.txt"):
        BertTextEncoder.from_folder(variant("no-vocab", ["vocab.txt"]))
    pickled = variant("pickled", ["model.safetensors"])
    (pickled / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="pytorch_model.bin .*pickles.*does not load pickles"):
        BertTextEncoder.from_folder(pickled)
    with pytest.raises(ValueError, match="model_type 'mpnet' is not supported; sumie reads model_type 'bert'"):
        BertTextEncoder.from_folder(variant("mpnet", edit_config={"model_type": "mpnet"}))
    with pytest.raises(CheckpointError, match=r"encoder.layer.0.intermediate.dense.weight: file \(64, 32\) vs "
                                              r"config \(48, 32\)"):
        BertTextEncoder.from_folder(variant("shape", edit_config={"intermediate_size": 48}))
    with pytest.raises(CheckpointError, match=r"missing \d+ tensor\(s\), e.g. \['layers.2"):
        BertTextEncoder.from_folder(variant("deeper", edit_config={"num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"word_embeddings.weight: file \(187, 32\) vs config \(50, 32\)"):
        BertTextEncoder.from_folder(variant("vocab", edit_config={"vocab_size": 50}))
    _write_vocab(variant("big-vocab"), VOCAB + ["extra"])
    with pytest.raises(ValueError, match="tokenizer has 188 tokens, the encoder only 187"):
        BertTextEncoder.from_folder(tmp_path / "big-vocab")

    ref = fingerprint(hf_folder)
    assert set(ref["sha256"]) == {"model.safetensors", "vocab.txt"}
    moved = variant("moved")
    ref_moved = fingerprint(moved)
    assert verify_fingerprint(ref_moved) == moved.resolve()
    (moved / "vocab.txt").write_text("\n".join(VOCAB + ["extra"]) + "\n")
    with pytest.raises(CheckpointError, match="vocab.txt is not the file the model was trained with"):
        verify_fingerprint(ref_moved)
    shutil.rmtree(moved)
    with pytest.raises(CheckpointError, match="frozen text encoder at .*moved, which is not there"):
        verify_fingerprint(ref_moved)


# ---------------------------------------------------------------- training and sampling on it

def test_caption_model_trains_exports_and_generates_on_a_frozen_encoder(hf_folder, tmp_path):
    from sumie.generate import TextToImage
    from sumie.train.loop import train

    overrides = ["text.kind=hf", f"text.path={hf_folder}", "train.max_steps=3", "train.ckpt_every=3",
                 "train.batch_size=4"]
    with pytest.raises(ValueError, match=r"model.context_dim \(16\) must equal the width of the text encoder in "
                                         r".*tiny-bert \(32\).*set model.context_dim=32"):
        check_conditioning(resolve("tiny-text", None, overrides + ["model.context_dim=16"]))
    with pytest.raises(ValueError, match="text.kind = 'hf' needs text.path"):
        check_conditioning(resolve("tiny-text", None, ["text.kind=hf"]))
    cfg = resolve("tiny-text", None, overrides + ["model.context_dim=null"])  # null: the encoder's width

    result = train(cfg, tmp_path / "run", progress=False)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["context_dim"] == 32 and saved["text"]["kind"] == "hf"
    ckpt = latest_checkpoint(tmp_path / "run")
    assert (ckpt / FROZEN_TEXT_FILE).is_file() and not (ckpt / TEXT_FILES["model"]).exists()
    assert json.loads((ckpt / FROZEN_TEXT_FILE).read_text()) == fingerprint(hf_folder)

    exported = export_model(tmp_path / "run", tmp_path / "model")
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "ema.safetensors", FROZEN_TEXT_FILE]
    assert isinstance(load_text_encoder(exported), BertTextEncoder)
    g = TextToImage.load(exported)("a red circle", n=2, seed=0, steps=2, sampler="euler")
    assert g.images.shape == (2, 16, 16, 3) and g.images.dtype == np.uint8

    ref = json.loads((exported / FROZEN_TEXT_FILE).read_text())
    ref["sha256"]["model.safetensors"] = "0" * 64  # as if the encoder folder had been replaced
    (exported / FROZEN_TEXT_FILE).write_text(json.dumps(ref))
    with pytest.raises(CheckpointError, match="model.safetensors is not the file .* was trained with"):
        TextToImage.load(exported)
    (exported / FROZEN_TEXT_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"missing {FROZEN_TEXT_FILE}"):
        load_text_encoder(exported)
