"""sumie's Stable Diffusion pipeline against diffusers' StableDiffusionPipeline (test-only oracle).

Tiny random SD 1.x-style (eps) and SD 2.x-style (v-prediction, OpenCLIP-style text tower
padded with "!") pipelines are built in diffusers with the real cross-attention widths (so
sumie detects their family), saved as diffusers folders and, through sumie's converter, as
single files. Both libraries then generate from the same prompt and the same initial latents
(sumie's seeded noise handed to diffusers as ``latents=``; see ``sumie.pipelines.sd`` for
why that is needed), 20 steps, guidance 7.5: the uint8 images may differ by at most 1.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sumie.io.sd import load_sd, save_single_file
from sumie.pipelines import StableDiffusion
from sumie.pipelines.sd import scheduler_sigmas
from sumie.text.clip_tokenizer import BOS, EOS, bytes_to_unicode

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from test_sd_checkpoints import TINY_UNETS, TINY_VAE, _perturb  # noqa: E402

torch.set_num_threads(1)
PROMPT, NEGATIVE = "a cat and a dog", "dog"
SIZE = 32  # pixels; latents 8x8 (tiny VAE: factor 4)


def write_tokenizer(folder, pad: str):
    """A CLIP BPE vocabulary of byte symbols and a few words, as vocab.json + merges.txt."""
    syms = list(bytes_to_unicode().values())
    tokens, merges = syms + [s + "</w>" for s in syms], []
    for w in ("cat", "dog", "and"):
        merges += [(w[0], w[1]), (w[:2], w[2] + "</w>")]
        tokens += [w[:2], w + "</w>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + [BOS, EOS]))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
                                                               "pad_token": pad}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": pad}))
    return len(vocab), vocab[EOS]


def build_diffusers(tmp_path, kind: str):
    """A tiny random diffusers StableDiffusionPipeline saved to tmp_path / kind."""
    torch.manual_seed(0)
    sd2 = kind == "sd2"
    folder = tmp_path / kind
    vocab, eos = write_tokenizer(folder / "tokenizer", "!" if sd2 else EOS)
    tokenizer = transformers.CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"),
                                           str(folder / "tokenizer" / "merges.txt"), pad_token="!" if sd2 else EOS)
    tokenizer.model_max_length = 77
    width = 1024 if sd2 else 768
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=128, num_hidden_layers=2, num_attention_heads=width // 64,
        max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu", eos_token_id=eos)).eval()
    unet = _perturb(diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                                   **TINY_UNETS[kind]), 1)
    vae = _perturb(diffusers.AutoencoderKL(sample_size=SIZE, **TINY_VAE), 2)
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                 timestep_spacing="leading", prediction_type="v_prediction" if sd2 else "epsilon")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=diffusers.EulerDiscreteScheduler(**sched), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    write_tokenizer(folder / "tokenizer", "!" if sd2 else EOS)  # sumie reads vocab.json + merges.txt
    return pipe, folder, sched


def run_diffusers(pipe, sched: dict, scheduler: str, latents: torch.Tensor, steps: int = 20,
                  sigmas: list | None = None) -> np.ndarray:
    cls = {"euler": diffusers.EulerDiscreteScheduler, "ddim": diffusers.DDIMScheduler}[scheduler]
    # SD's DDIM config has clip_sample=False; set_alpha_to_one=True: sumie's DDIM ends at sigma 0
    extra = {"set_alpha_to_one": True, "clip_sample": False} if scheduler == "ddim" else {}
    pipe.scheduler = cls(**sched, **extra)
    kw = {"num_inference_steps": steps} if sigmas is None else {"sigmas": sigmas}
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, latents=latents, **kw,
                   num_images_per_prompt=latents.shape[0],
                   height=SIZE, width=SIZE, output_type="np").images
    return (out * 255).round().astype(np.uint8)


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_matches_diffusers_pipeline(tmp_path, kind):
    pipe, folder, sched = build_diffusers(tmp_path, kind)
    ours = StableDiffusion.from_pretrained(folder)
    assert ours.family == kind and ours.checkpoint.prediction == ("v" if kind == "sd2" else "eps")
    # the same timesteps as diffusers' Euler: 951, 901, ..., 1
    sig = scheduler_sigmas(ours.schedule, 20)
    ref = diffusers.EulerDiscreteScheduler(**sched)
    ref.set_timesteps(20)
    assert torch.allclose(sig.float(), ref.sigmas, rtol=1e-5)

    z = ours.initial_noise(2, SIZE, SIZE, 0.0, seed=3)  # unit noise z (sigma 0: no scaling)
    steps = []
    for sampler in ("euler", "ddim"):
        img = ours(PROMPT, NEGATIVE, n=2, steps=20, guidance_scale=7.5, sampler=sampler, seed=3, height=SIZE,
                   width=SIZE, callback=lambda info: steps.append(info.i))
        assert img.dtype == torch.uint8 and img.shape == (2, SIZE, SIZE, 3)
        expected = run_diffusers(pipe, sched, sampler, z)
        d = max_diff(img.numpy(), expected)
        print(f"{kind} {sampler}: max |sumie - diffusers| = {d}/255")
        assert d <= 1
        assert img.float().std() > 5  # not a flat image
    assert steps[:20] == list(range(20))

    # the same weights as a single file written by sumie's converter (SD 2.x: its text tower must not be cut
    # a second time on reading, issue 22 item 5; v-prediction is read back from the header, item 6). Single
    # files use A1111/ComfyUI's default noise levels, handed to diffusers' Euler as sigmas= (the final 0 included:
    # diffusers ends at the last sigma it is given)
    single = save_single_file(load_sd(folder), tmp_path / f"{kind}.safetensors")
    ours1 = StableDiffusion.from_pretrained(single, tokenizer=folder / "tokenizer")
    assert ours1.checkpoint.prediction == ours.checkpoint.prediction
    assert "sumie.prediction" in " ".join(ours1.checkpoint.notes)
    img = ours1(PROMPT, NEGATIVE, n=2, steps=20, sampler="euler", seed=3, height=SIZE, width=SIZE)
    sig, _ = ours1.sigmas(20)
    d = max_diff(img.numpy(), run_diffusers(pipe, sched, "euler", z, sigmas=sig.tolist()))
    print(f"{kind} single file euler: max diff {d}/255")
    assert d <= 1
    # seeds: image i of a batch is the image generated alone with seed + i
    alone = ours1(PROMPT, NEGATIVE, n=1, steps=20, sampler="euler", seed=4, height=SIZE, width=SIZE)
    assert max_diff(alone[0].numpy(), img[1].numpy()) <= 1


def test_lora_through_the_pipeline_and_tiled_decode(tmp_path):
    from sumie.io.checkpoint import CheckpointError, save_tensors

    pipe, folder, _ = build_diffusers(tmp_path, "sd1")
    ours = StableDiffusion.from_pretrained(folder)
    base = ours("a cat", steps=4, seed=1, height=SIZE, width=SIZE)
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    lora = {name + ".lora_down.weight": torch.randn(4, 768, generator=g),
            name + ".lora_up.weight": torch.randn(32, 4, generator=g),
            te + ".lora_down.weight": torch.randn(4, 768, generator=g) * 0.1,
            te + ".lora_up.weight": torch.randn(128, 4, generator=g)}
    save_tensors(tmp_path / "l.safetensors", lora)
    assert ours.load_lora(tmp_path / "l.safetensors", 0.0) == 2
    assert torch.equal(ours("a cat", steps=4, seed=1, height=SIZE, width=SIZE), base)  # strength 0
    ours.clear_loras()
    ours.load_lora(tmp_path / "l.safetensors", 1.0, merge=True)
    merged = ours("a cat", steps=4, seed=1, height=SIZE, width=SIZE)
    ours.clear_loras()
    ours.load_lora(tmp_path / "l.safetensors", 1.0, merge=False)
    hooked = ours("a cat", steps=4, seed=1, height=SIZE, width=SIZE)
    assert max_diff(merged, hooked) <= 1 and max_diff(merged, base) > 2
    ours.clear_loras()
    bad = {k.replace("_0_attn2_to_v", "_0_attn2_to_k"): (torch.randn(4, 2048) if "down" in k and "unet" in k else v)
           for k, v in lora.items()}
    save_tensors(tmp_path / "xl.safetensors", bad)
    with pytest.raises(CheckpointError, match="attn2_to_k.*nothing was applied"):
        ours.load_lora(tmp_path / "xl.safetensors")
    assert ours.loras == []
    # tiled decoding: one tile covering the whole latent is the plain decode
    ours.vae_tile = 8
    assert torch.equal(ours("a cat", steps=4, seed=1, height=SIZE, width=SIZE), base)


def test_keep_loaded_builds_each_stage_once_and_a_lora_rebuilds(tmp_path):
    from sumie.io.checkpoint import save_tensors

    pipe, folder, _ = build_diffusers(tmp_path, "sd1")
    plain = StableDiffusion.from_pretrained(folder)
    assert not plain.keep_loaded and plain.stream_weights in (0.2, 1.0)  # CPU: stages freed, U-Net streamed
    base = plain("a cat", steps=3, seed=1, height=SIZE, width=SIZE)
    for stream in (False, 0.5, True):
        other = StableDiffusion.from_pretrained(folder, stream_weights=stream)
        assert torch.equal(other("a cat", steps=3, seed=1, height=SIZE, width=SIZE), base)
    with pytest.raises(ValueError, match="fraction in"):
        StableDiffusion.from_pretrained(folder, stream_weights=1.5)
    kept = StableDiffusion.from_pretrained(folder, keep_loaded=True)
    builds = []
    for name in ("build_text", "build_unet"):
        orig = getattr(kept, name)
        setattr(kept, name, lambda *a, _o=orig, _n=name, **k: (builds.append(_n), _o(*a, **k))[1])
    for _ in range(2):
        assert torch.equal(kept("a cat", steps=3, seed=1, height=SIZE, width=SIZE), base)
    assert builds == ["build_text", "build_unet"] and set(kept._stages) == {"text", "unet", "vae"}
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
    g = torch.Generator().manual_seed(0)
    save_tensors(tmp_path / "l.safetensors", {name + ".lora_down.weight": torch.randn(4, 768, generator=g),
                                              name + ".lora_up.weight": torch.randn(32, 4, generator=g)})
    kept.load_lora(tmp_path / "l.safetensors", 1.0)
    assert max_diff(kept("a cat", steps=3, seed=1, height=SIZE, width=SIZE), base) > 2  # the LoRA is in use
    kept.clear_loras()
    assert torch.equal(kept("a cat", steps=3, seed=1, height=SIZE, width=SIZE), base)


def test_cli_generate_runs_a_diffusers_folder_with_a_lora(tmp_path, capsys):
    from PIL import Image

    from sumie.cli import main
    from sumie.io.checkpoint import save_tensors

    _, folder, _ = build_diffusers(tmp_path, "sd1")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
    g = torch.Generator().manual_seed(0)
    save_tensors(tmp_path / "l.safetensors", {name + ".lora_down.weight": torch.randn(4, 768, generator=g),
                                              name + ".lora_up.weight": torch.randn(32, 4, generator=g)})
    out = tmp_path / "sd.png"
    argv = ["generate", "a cat", "--model", str(folder), "--steps", "3", "--out", str(out),
            "--width", str(SIZE), "--height", str(SIZE)]
    assert main(argv + ["--lora", f"{tmp_path / 'l.safetensors'}:0.5"]) == 0
    assert f"1 image(s) of {SIZE}x{SIZE}" in capsys.readouterr().out
    assert Image.open(out).size == (SIZE, SIZE)
    assert main(argv + ["--lora", f"{tmp_path / 'l.safetensors'}:strong"]) == 2
    assert "FILE:STRENGTH" in capsys.readouterr().err


def test_size_not_a_multiple_of_the_model_factor_names_the_nearest_valid_size(tmp_path, capsys):
    from sumie.cli import main

    _, folder, _ = build_diffusers(tmp_path, "sd1")
    argv = ["generate", "a cat", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "x.png")]
    assert main(argv + ["--width", str(SIZE + 5), "--height", str(SIZE)]) == 2
    err = capsys.readouterr().err
    assert "must be multiples of" in err and f"--height {SIZE} --width {SIZE}" in err
    assert not (tmp_path / "x.png").exists()
