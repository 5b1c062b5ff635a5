"""Text-encoder overrides of Stable Diffusion checkpoints (``load_sd(..., text_encoders=...)``).

A replacement tower must fit its slot: the U-Net cross-attends to the family's towers'
tokens side by side (SD 1.x: CLIP-L 768; SD 2.x: OpenCLIP-H 1024; SDXL: CLIP-L 768 +
OpenCLIP-bigG 1280 = 2048, with bigG's 1280-wide pooled output in SDXL's vector ``y``).
Towers that fit replace the checkpoint's own, and the conditioner's output then equals
diffusers' ``encode_prompt`` with the replacement tower; towers that do not fit, and unknown
slots, are errors that name the file, the widths and the family, before any slot changes.
"""

from __future__ import annotations

import re

import pytest
import torch

from sumie.io.checkpoint import CheckpointError, save_tensors
from sumie.io.sd import keymaps, load_sd, override_text_encoders
from sumie.io.sd.tensors import from_tensors, materialize
from sumie.pipelines import StableDiffusion
from sumie.text.clip_tokenizer import EOS

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from test_sd_checkpoints import _reference, _write_diffusers  # noqa: E402
from test_sd_pipeline import build_diffusers, write_tokenizer  # noqa: E402

torch.set_num_threads(1)
PROMPT = "a cat and a dog"


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def clip_tower(width: int, seed: int, vocab: int, eos: int, *, projection: int | None = None,
               act: str = "quick_gelu", layers: int = 2):
    """A random transformers CLIP text tower (heads of 64 channels, as sumie assumes)."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=width // 64,
                                      max_position_embeddings=77, hidden_act=act, eos_token_id=eos,
                                      projection_dim=projection or width)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(cfg).eval()


def save_tower(model, folder):
    model.save_pretrained(folder)
    return folder / "model.safetensors"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny diffusers SD 1.x pipeline folder, another 768-wide tower and a 512-wide one."""
    tmp = tmp_path_factory.mktemp("sd1")
    pipe, folder, _ = build_diffusers(tmp, "sd1")
    cfg = pipe.text_encoder.config
    other = clip_tower(768, 7, cfg.vocab_size, cfg.eos_token_id)
    narrow = clip_tower(512, 8, cfg.vocab_size, cfg.eos_token_id, layers=1)
    return pipe, folder, other, save_tower(other, tmp / "other"), save_tower(narrow, tmp / "narrow")


def encode_diffusers(pipe, text_encoder=None):
    if text_encoder is not None:
        pipe.text_encoder, original = text_encoder, pipe.text_encoder
    with torch.no_grad():
        out = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    if text_encoder is not None:
        pipe.text_encoder = original
    return out


def test_sd1_override_replaces_the_tower(sd1):
    pipe, folder, other, other_file, _ = sd1
    base = StableDiffusion.from_pretrained(folder).build_text().encode([PROMPT]).hidden
    assert rel_err(base, encode_diffusers(pipe)) < 1e-4
    expected = encode_diffusers(pipe, other)
    assert rel_err(base, expected) > 1e-2  # a different tower, a different conditioning
    for source in (other_file, other_file.parent):  # a file, or a diffusers text_encoder/ folder
        ours = StableDiffusion.from_pretrained(folder, text_encoders={"text_encoder": source})
        assert f"text_encoder from {source}" in ours.checkpoint.notes
        assert rel_err(ours.build_text().encode([PROMPT]).hidden, expected) < 1e-4


def test_sd1_wrong_width_or_slot_is_refused_and_nothing_replaced(sd1):
    _, folder, _, other_file, narrow_file = sd1
    msg = r": a text encoder 512 wide .* slot 'text_encoder' of Stable Diffusion 1\.x \(sd1\), which takes clip-l 768"
    with pytest.raises(CheckpointError, match=re.escape(str(narrow_file)) + msg):
        StableDiffusion.from_pretrained(folder, text_encoders={"text_encoder": narrow_file})
    sd = load_sd(folder)
    own, notes = sd.text_encoders["text_encoder"], list(sd.notes)
    for bad, match in (({"text_encoder": other_file, "text_encoder_2": other_file},
                        r"no text-encoder slot 'text_encoder_2'; its slots are text_encoder \(clip-l, 768 wide\)"),
                       ({"text_encoder": other_file, "text_encoders": other_file}, "no text-encoder slot"),
                       ({"text_encoder": narrow_file}, r"512 wide \(unknown-512\)")):
        with pytest.raises(CheckpointError, match=match):
            override_text_encoders(sd, bad)
        assert sd.text_encoders == {"text_encoder": own} and sd.notes == notes


def test_sdxl_overrides_fill_both_slots_and_are_checked_together(tmp_path):
    ref_unet, ref_vae = _reference("sdxl", seed=2)
    folder = _write_diffusers(tmp_path / "xl", ref_unet, ref_vae)
    vocab, eos = write_tokenizer(folder / "tokenizer", EOS)
    write_tokenizer(tmp_path / "tokenizer_2", "!")
    te1 = clip_tower(768, 1, vocab, eos)
    te2 = clip_tower(1280, 2, vocab, eos, projection=1280, act="gelu")
    te1_file = save_tower(te1, tmp_path / "te1")
    # bigG as OpenCLIP names it (as in SDXL single files), to read both layouts
    te2_file = tmp_path / "te2_open_clip.safetensors"
    save_tensors(te2_file, materialize(keymaps.text_hf_to_openclip(from_tensors(te2.state_dict()))))

    ours = StableDiffusion.from_pretrained(folder, text_encoders={"text_encoder": te1_file,
                                                                  "text_encoder_2": te2_file})
    assert {s: t.layout for s, t in ours.checkpoint.text_encoders.items()} == {"text_encoder": "hf",
                                                                                "text_encoder_2": "open_clip"}
    got = ours.build_text().encode([PROMPT])

    def tok(f, pad):
        t = transformers.CLIPTokenizer(str(f / "vocab.json"), str(f / "merges.txt"), pad_token=pad)
        t.model_max_length = 77
        return t

    ref = diffusers.StableDiffusionXLPipeline(vae=ref_vae, text_encoder=te1, text_encoder_2=te2,
                                              tokenizer=tok(folder / "tokenizer", EOS),
                                              tokenizer_2=tok(tmp_path / "tokenizer_2", "!"), unet=ref_unet,
                                              scheduler=diffusers.EulerDiscreteScheduler())
    with torch.no_grad():
        hidden, _, pooled, _ = ref.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert got.hidden.shape[-1] == 2048
    assert rel_err(got.hidden, hidden) < 1e-4 and rel_err(got.pooled, pooled) < 1e-4

    # an SD 2.x tower (OpenCLIP-H, 1024) in bigG's slot; a bigG whose projection is not 1280; the
    # good CLIP-L given first must not be left in place
    sd = load_sd(folder, text_encoders={"text_encoder": te1_file, "text_encoder_2": te2_file})
    before, notes = dict(sd.text_encoders), list(sd.notes)
    h_file = save_tower(clip_tower(1024, 3, vocab, eos, projection=1024, act="gelu", layers=1), tmp_path / "h")
    small_proj = save_tower(clip_tower(1280, 4, vocab, eos, projection=512, act="gelu", layers=1), tmp_path / "p")
    other_l = save_tower(clip_tower(768, 5, vocab, eos), tmp_path / "l")
    for bad, match in ((h_file, r"a text encoder 1024 wide \(openclip-h\) does not fit slot 'text_encoder_2' of "
                                r"Stable Diffusion XL base \(sdxl\), which takes openclip-bigg 1280 wide, its part "
                                r"of the U-Net's cross-attention width 2048"),
                       (small_proj, r"pooled output 512 wide.* 1280 pooled \+ 6 x 256 = 2816")):
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(bad))}: {match}"):
            override_text_encoders(sd, {"text_encoder": other_l, "text_encoder_2": bad})
        assert sd.text_encoders == before and sd.notes == notes
    with pytest.raises(CheckpointError, match=r"768 wide .* slot 'text_encoder_2'.*slots: text_encoder \(clip-l, "
                                              r"768 wide\), text_encoder_2 \(openclip-bigg, 1280 wide\)"):
        load_sd(folder, text_encoders={"text_encoder_2": other_l})


def test_cli_generate_and_convert_take_text_encoders(sd1, tmp_path, capsys):
    from sumie.cli import main

    _, folder, _, other_file, narrow_file = sd1
    argv = ["generate", "a cat", "--model", str(folder), "--steps", "2", "--out", str(tmp_path / "a.png"),
            "--width", "32", "--height", "32"]
    assert main(argv + ["--text-encoder", str(other_file)]) == 0
    capsys.readouterr()
    assert main(argv + ["--text-encoder", f"text_encoder_2={other_file}"]) == 2
    assert "its slots are text_encoder (clip-l, 768 wide)" in capsys.readouterr().err
    assert main(argv + ["--text-encoder", f"text_encoder={narrow_file}"]) == 2
    assert "512 wide" in capsys.readouterr().err

    dst = tmp_path / "m.safetensors"
    assert main(["convert", str(folder), str(dst), "--to", "single-file", "--text-encoder",
                 f"text_encoder={other_file}"]) == 0
    assert f"text_encoder from {other_file}" in capsys.readouterr().out
    te = load_sd(dst).text_encoders["text_encoder"].state_dict()
    expected = load_sd(folder, text_encoders={"text_encoder": other_file}).text_encoders["text_encoder"].state_dict()
    assert te.keys() == expected.keys() and all(torch.equal(te[k], expected[k]) for k in te)
    assert main(["convert", str(folder), str(tmp_path / "n.safetensors"), "--to", "single-file", "--text-encoder",
                 str(narrow_file)]) == 2
    assert not (tmp_path / "n.safetensors").exists()
