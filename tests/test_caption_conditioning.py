"""Caption conditioning: the small word-level text encoder trained with the U-Net."""

import subprocess
import sys

import pytest
import torch

from sumie.config import merge, preset
from sumie.io.checkpoint import latest_checkpoint, load_tensors
from sumie.models import TEXT_FILES, build_text_encoder, check_conditioning, load_model, load_text_encoder
from sumie.pipeline import sample
from sumie.text.small import TextConfig, SmallTextEncoder, WordTokenizer, split_words, text_cond
from sumie.train.loop import Trainer, train


@pytest.fixture
def text_config():
    cfg = preset("tiny-text")
    cfg.train.max_steps = 12
    cfg.train.ckpt_every = 6
    return cfg


def test_word_tokenizer_vocabulary_windows_and_round_trip(tmp_path):
    tok = WordTokenizer.build(["a red circle", "a blue square, on white", "A RED star"], model_max_length=6)
    assert tok.vocab[:4] == ["[PAD]", "[BOS]", "[EOS]", "[UNK]"] and tok.vocab[4] == "a"  # most frequent first
    assert split_words("Ein Kätzchen, 猫!") == ["ein", "kätzchen", ",", "猫", "!"]
    batch = tok(["a red circle", "", "a purple blob on white on a star"])
    red, circle = tok.index["red"], tok.index["circle"]
    assert batch.input_ids[0].tolist() == [1, tok.index["a"], red, circle, 2, 0]
    assert batch.input_ids[1].tolist() == [1, 2, 0, 0, 0, 0] and batch.attention_mask[1].sum() == 2
    assert batch.input_ids[2, 3] == tok.unk_token_id  # "blob" was never seen
    assert batch.input_ids[2, -1] == tok.eos_token_id  # truncated to the window, end token kept
    with pytest.raises(ValueError, match="longer than the 4"):
        tok(["a purple blob on white on a star"], truncation=False)
    tok.save(tmp_path / "tok.json")
    assert WordTokenizer.load(tmp_path / "tok.json").vocab == tok.vocab


SCENE = "a red circle at the top left on a white background"


def _encoder(max_length: int = 16, layers: int = 2) -> SmallTextEncoder:
    """A seeded, untrained encoder whose vocabulary is SCENE's words."""
    torch.manual_seed(0)
    tok = WordTokenizer.build([SCENE], model_max_length=max_length)
    return SmallTextEncoder(TextConfig(kind="small", width=32, layers=layers, heads=4, max_length=max_length),
                            tok).eval()


def test_encoder_rows_are_independent_of_padding_and_batch():
    enc = _encoder()
    with torch.no_grad():
        alone = enc.encode(["a red circle"])
        both = enc.encode(["a red circle", "a red circle at the top left on a white background"])
    n = int(alone.attention_mask.sum())
    assert alone.hidden.shape == (1, 16, 32) and alone.pooled.shape == (1, 32)
    torch.testing.assert_close(both.hidden[:1, :n], alone.hidden[:, :n])
    torch.testing.assert_close(both.pooled[:1], alone.pooled)
    assert not torch.allclose(both.pooled[0], both.pooled[1])


def test_conditioning_mismatches_are_clear_errors():
    cfg = preset("tiny-text")
    with pytest.raises(ValueError, match="set text.kind = 'small'"):
        check_conditioning(merge(cfg, {"text": {"kind": "none"}}))
    with pytest.raises(ValueError, match=r"context_dim \(32\) must equal text.width \(64\)"):
        check_conditioning(merge(cfg, {"text": {"width": 64}}))
    with pytest.raises(ValueError, match="valid: class, caption, none"):
        check_conditioning(merge(cfg, {"data": {"conditioning": "prompt"}}))


def test_pooled_prompt_vector_feeds_the_unet_and_mismatches_are_clear_errors(tmp_path):
    from sumie.models import build_denoiser

    cfg = merge(preset("tiny-text"), {"text": {"pooled": True}, "model": {"adm_in_channels": 32}})
    check_conditioning(cfg)
    with pytest.raises(ValueError, match="model.adm_in_channels = 32 \\(got None\\)"):
        check_conditioning(merge(preset("tiny-text"), {"text": {"pooled": True}}))
    with pytest.raises(ValueError, match="data.conditioning = 'caption'"):
        check_conditioning(merge(cfg, {"data": {"conditioning": "none"}}))
    tok = WordTokenizer.build([SCENE], model_max_length=cfg.text.max_length)
    enc = build_text_encoder(cfg, tok)
    assert enc.feeds_pooled and not _encoder().feeds_pooled
    with torch.no_grad():
        cond = text_cond(enc, ["a red circle", "a white square"])
    torch.testing.assert_close(cond["y"], enc.encode(["a red circle", "a white square"]).pooled)
    assert set(text_cond(_encoder(), ["a red circle"])) == {"context", "context_mask"}
    torch.manual_seed(0)
    den = build_denoiser(cfg)
    for p in den.parameters():  # zero-initialised output layers would hide any dependence
        torch.nn.init.normal_(p, std=0.2)
    x, sigma = torch.randn(1, 3, 16, 16), torch.tensor([1.0])
    with torch.no_grad():
        a = den(x, sigma, {**{k: v[:1] for k, v in cond.items()}})
        b = den(x, sigma, {**{k: v[:1] for k, v in cond.items()}, "y": cond["y"][1:]})  # same tokens, other pooled
    assert (a - b).abs().max() > 1e-3
    run = train(merge(cfg, {"train": {"max_steps": 4, "ckpt_every": 4}}), tmp_path / "run", progress=False)
    assert len(run.losses) == 4 and load_text_encoder(tmp_path / "run").feeds_pooled
    with pytest.raises(ValueError, match="set model.adm_in_channels=32"):
        build_text_encoder(merge(cfg, {"model": {"adm_in_channels": 16}}), tok)


def test_caption_model_trains_resumes_identically_and_samples(text_config, tmp_path):
    full = train(text_config, tmp_path / "a", progress=False)
    first = train(text_config, tmp_path / "b", progress=False, max_steps=6)
    rest = Trainer(text_config, tmp_path / "b", resume=True, progress=False).run()
    assert first.losses + rest.losses == full.losses  # text encoder state and its RNG use resume too
    ckpt = latest_checkpoint(tmp_path / "a")
    for name in TEXT_FILES.values():
        assert (ckpt / name).is_file()
    wa, wb = (load_tensors(latest_checkpoint(tmp_path / r) / TEXT_FILES["ema"]) for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    start = load_tensors(latest_checkpoint(tmp_path / "b") / TEXT_FILES["model"])  # the encoder did learn
    fresh = SmallTextEncoder(text_config.text, load_text_encoder(tmp_path / "a").tokenizer).state_dict()
    assert any(not torch.equal(start[k], fresh[k]) for k in fresh)

    den, cfg = load_model(tmp_path / "a")
    enc = load_text_encoder(tmp_path / "a")
    assert "circle" in enc.tokenizer.vocab and "background" in enc.tokenizer.vocab
    with torch.no_grad():
        x = sample(den, (3, 16, 16), 2, cond=text_cond(enc, ["a red circle", "a blue square"]),
                   uncond=text_cond(enc, ["", ""]), guidance_scale=3.0, steps=3, seed=5)
        x1 = sample(den, (3, 16, 16), 1, cond=text_cond(enc, ["a blue square"]), uncond=text_cond(enc, [""]),
                    guidance_scale=3.0, steps=3, seed=6)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    torch.testing.assert_close(x[1:], x1, atol=1e-3, rtol=0)  # per-sample seeding (up to batched-GEMM rounding)

    (ckpt / TEXT_FILES["tokenizer"]).unlink()
    with pytest.raises(Exception, match="missing the text encoder's tokenizer.json"):
        load_text_encoder(tmp_path / "a")


def test_cli_samples_a_prompt_and_rejects_labels(text_config, tmp_path):
    train(text_config, tmp_path / "run", progress=False)
    run = [sys.executable, "-m", "sumie.cli", "sample", str(tmp_path / "run"), "--n", "2", "--steps", "2"]
    res = subprocess.run(run + ["--prompt", "a red circle", "--out", str(tmp_path / "g.png")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "g.png").is_file()
    res = subprocess.run(run + ["--out", str(tmp_path / "u.png")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "unconditionally" in res.stderr
    res = subprocess.run(run + ["--shape", "circle", "--color", "red"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "--prompt" in res.stderr and "Traceback" not in res.stderr


def test_prompt_weighting_scales_the_weighted_words_only():
    enc = _encoder()
    with torch.no_grad():
        plain = enc.encode(["a red circle"])
        same = enc.encode(["a (red:1.0) circle"])
        up = enc.encode(["a (red:1.5) circle"])
        down = enc.encode(["a [red] circle"])
        broken = enc.encode(["a (red circle", "a red) circle ((", "猫 (:1.2) [[["])  # unbalanced: never a crash
    torch.testing.assert_close(same.hidden, plain.hidden)
    torch.testing.assert_close(up.pooled, plain.pooled)  # the pooled output is not weighted
    torch.testing.assert_close(up.hidden[0, 2], 1.5 * plain.hidden[0, 2])  # position 2 = "red" (after [BOS], "a")
    torch.testing.assert_close(up.hidden[0, [0, 1, 3, 4]], plain.hidden[0, [0, 1, 3, 4]])
    assert down.hidden[0, 2].norm() / down.hidden[0, 1].norm() < plain.hidden[0, 2].norm() / plain.hidden[0, 1].norm()
    assert torch.isfinite(broken.hidden).all() and broken.hidden.shape == (3, 16, 32)


def test_long_prompts_are_chunked_into_windows_and_batch_with_short_ones():
    from sumie.diffusion.guidance import concat_cond

    words = SCENE.split()
    enc = _encoder(max_length=8, layers=1)  # windows of 6 words
    long = " ".join(words)  # 11 words -> 2 windows
    with torch.no_grad():
        both = enc.encode([long, "a red circle"])
        first = enc.encode([" ".join(words[:6])])
        second = enc.encode([" ".join(words[6:])])
        short = enc.encode(["a red circle"])
    assert both.hidden.shape == (2, 16, 32) and both.attention_mask[0].sum() == 8 + 7
    torch.testing.assert_close(both.hidden[0, :8], first.hidden[0])
    torch.testing.assert_close(both.hidden[0, 8:], second.hidden[0])
    torch.testing.assert_close(both.pooled[0], first.pooled[0])  # pooled: the first window's
    assert both.attention_mask[1, 8:].sum() == 0  # the short prompt's second window is masked out
    torch.testing.assert_close(both.hidden[1, :5], short.hidden[0, :5])
    cond = concat_cond(text_cond(enc, [long]), text_cond(enc, [""]))  # CFG: long prompt, empty negative
    assert cond["context"].shape == (2, 16, 32) and cond["context_mask"][1, 8:].sum() == 0
