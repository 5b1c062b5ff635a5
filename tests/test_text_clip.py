"""CLIP text towers against transformers (random tiny weights, float32), in every key layout
Stable Diffusion files use, and the SD text conditioners built on them."""

import json

import pytest
import torch

from sumie.io.checkpoint import CheckpointError
from sumie.text.clip import (ClipTextConfig, ClipTextTransformer, config_from_hf, convert_state_dict, load_clip_text,
                             load_clip_text_folder)
from sumie.text.clip_tokenizer import BOS, EOS, ClipTokenizer, bytes_to_unicode
from sumie.text.conditioner import SDTextConditioner, sdxl_vector_cond
from sumie.text.prompt import tokenize_weighted

transformers = pytest.importorskip("transformers")
RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def tokenizer():
    """Byte symbols, a few whole words, start/end tokens: 518 ids."""
    syms = list(bytes_to_unicode().values())
    tokens, merges = syms + [s + "</w>" for s in syms], []
    for w in ("cat", "dog"):
        merges += [(w[0], w[1]), (w[:2], w[2] + "</w>")]
        tokens += [w[:2], w + "</w>"]
    return ClipTokenizer({t: i for i, t in enumerate(tokens + [BOS, EOS])}, merges)


def hf_config(tok: ClipTokenizer, width=32, heads=4, layers=3, act="quick_gelu", proj=24, legacy_eos=False):
    return transformers.CLIPTextConfig(
        vocab_size=tok.vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=proj,
        bos_token_id=tok.bos_token_id, eos_token_id=2 if legacy_eos else tok.eos_token_id, pad_token_id=0)


def hf_model(cfg, projection=True, seed=0):
    """A transformers CLIP text model with weights large enough that every layer matters."""
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p) if p.ndim > 1 else 0.05 * torch.randn_like(p))
    return model


def published_layout(model) -> dict:
    """State dict with the ``text_model.`` level SD files use (transformers 5 drops it for CLIPTextModel)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in model.state_dict().items()}


def some_ids(tok: ClipTokenizer, pad_with_eos=True) -> torch.Tensor:
    t = tok.with_padding(pad_with_eos)
    return t(["a cat", "dog dog cat, and a much longer prompt with ünïcödé 🐱", ""]).input_ids


def check_tower(ours: ClipTextTransformer, ref_model, ids: torch.Tensor, projection=True):
    with torch.no_grad():
        ref = ref_model(ids, output_hidden_states=True)
        final_ln = getattr(ref_model, "text_model", ref_model).final_layer_norm
        assert rel_err(ours(ids).hidden, ref.last_hidden_state) < RTOL
        assert rel_err(ours(ids, skip=2, final_norm=False).hidden, ref.hidden_states[-2]) < RTOL
        assert rel_err(ours(ids, skip=2).hidden, final_ln(ref.hidden_states[-2])) < RTOL
        assert rel_err(ours(ids, skip=3).hidden, final_ln(ref.hidden_states[-3])) < RTOL
        pooled = ref.text_embeds if projection else ref.pooler_output
        assert rel_err(ours(ids).pooled, pooled) < RTOL


@pytest.mark.parametrize("act, projection, legacy_eos", [
    ("quick_gelu", False, True),  # OpenAI CLIP-L as diffusers' SD 1.x text_encoder (config eos id 2: argmax)
    ("gelu", False, False),  # OpenCLIP-H as diffusers' SD 2.x text_encoder
    ("gelu", True, False),  # OpenCLIP-bigG as SDXL's text_encoder_2 (CLIPTextModelWithProjection)
])
def test_diffusers_folder_matches_transformers(tokenizer, tmp_path, act, projection, legacy_eos):
    ref = hf_model(hf_config(tokenizer, act=act, legacy_eos=legacy_eos), projection)
    ref.save_pretrained(tmp_path)
    ours = load_clip_text_folder(tmp_path)
    assert ours.config.hidden_act == act and (ours.config.projection_dim is not None) == projection
    assert ours.config.eos_token_id == (None if legacy_eos else tokenizer.eos_token_id)
    for pad_with_eos in (True, False):
        check_tower(ours, ref, some_ids(tokenizer, pad_with_eos), projection)


def test_sd1_single_file_layout(tokenizer):
    ref = hf_model(hf_config(tokenizer, width=64, heads=1))
    prefix = "cond_stage_model.transformer."
    sd = {prefix + k: v for k, v in published_layout(ref).items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # other parts of the file are left alone
    ours = load_clip_text(sd, layout="hf", prefix=prefix, kind="clip-l")
    assert ours.config.num_attention_heads == 1  # width / 64
    check_tower(ours, ref, some_ids(tokenizer))
    # transformers before 4.x saved without the text_model. level
    old = {prefix + k.removeprefix("text_model."): v for k, v in published_layout(ref).items()}
    check_tower(load_clip_text(old, layout="hf", prefix=prefix, kind="clip-l"), ref, some_ids(tokenizer))


def to_openclip(hf_sd: dict) -> dict:
    """transformers names -> OpenCLIP's (written here independently of sumie's tables)."""
    out = {"token_embedding.weight": hf_sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": hf_sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": hf_sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": hf_sd["text_model.final_layer_norm.bias"],
           "text_projection": hf_sd["text_projection.weight"].T.contiguous(),
           "logit_scale": torch.tensor(4.6), "attn_mask": torch.full((77, 77), float("-inf")).triu(1)}
    i = 0
    while f"text_model.encoder.layers.{i}.layer_norm1.weight" in hf_sd:
        h, o = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[o + f"attn.in_proj_{p}"] = torch.cat([hf_sd[h + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            out[o + f"attn.out_proj.{p}"] = hf_sd[h + f"self_attn.out_proj.{p}"]
            out[o + f"ln_1.{p}"] = hf_sd[h + f"layer_norm1.{p}"]
            out[o + f"ln_2.{p}"] = hf_sd[h + f"layer_norm2.{p}"]
            out[o + f"mlp.c_fc.{p}"] = hf_sd[h + f"mlp.fc1.{p}"]
            out[o + f"mlp.c_proj.{p}"] = hf_sd[h + f"mlp.fc2.{p}"]
        i += 1
    return out


def test_sd2_single_file_openclip_layout(tokenizer):
    ref = hf_model(hf_config(tokenizer, width=64, heads=1, act="gelu", proj=48))
    prefix = "cond_stage_model.model."
    sd = {prefix + k: v for k, v in to_openclip(published_layout(ref)).items()}
    ours = load_clip_text(sd, layout="open_clip", prefix=prefix, kind="openclip-h")
    assert ours.config.hidden_act == "gelu" and ours.config.projection_dim == 48
    check_tower(ours, ref, some_ids(tokenizer, pad_with_eos=False))


def test_sd2_conditioner_reads_penultimate_with_final_norm(tokenizer):
    ref = hf_model(hf_config(tokenizer, width=64, heads=1, act="gelu"))
    sd = {"cond_stage_model.model." + k: v for k, v in to_openclip(published_layout(ref)).items()}
    cond = SDTextConditioner.from_state_dict("sd2", sd, tokenizer)
    out = cond.encode(["a cat", "dog"])
    ids = tokenizer.with_padding(False)(["a cat", "dog"]).input_ids
    assert (ids[:, -1] == 0).all()
    with torch.no_grad():
        hs = ref(ids, output_hidden_states=True).hidden_states[-2]
        expected = getattr(ref, "text_model", ref).final_layer_norm(hs)
    assert out.hidden.shape == (2, 77, 64)
    assert rel_err(out.hidden, expected) < RTOL
    assert out.attention_mask[0].tolist() == [1] * 4 + [0] * 73  # BOS a cat EOS


def test_sdxl_conditioner_and_vector_cond(tokenizer):
    """CLIP-L and bigG stand-ins in SDXL's single-file layout: penultimate hidden states without
    final norm, concatenated; pooled from bigG's projection; windows of 75 with weights."""
    ref_l = hf_model(hf_config(tokenizer, width=64, heads=1), projection=False, seed=1)
    ref_g = hf_model(hf_config(tokenizer, width=128, heads=2, act="gelu", proj=96), seed=2)
    sd = {"conditioner.embedders.0.transformer." + k: v for k, v in published_layout(ref_l).items()}
    sd.update({"conditioner.embedders.1.model." + k: v for k, v in to_openclip(published_layout(ref_g)).items()})
    cond = SDTextConditioner.from_state_dict("sdxl", sd, tokenizer)
    prompts = ["a (cat:1.3) and [dog]", "cat " * 90]
    out = cond.encode(prompts)
    assert out.hidden.shape == (2, 154, 192) and out.pooled.shape == (2, 96)

    for b, prompt in enumerate(prompts):
        hidden = []
        for ref, pad_eos in ((ref_l, True), (ref_g, False)):
            w = tokenize_weighted(tokenizer.with_padding(pad_eos), prompt)
            k = w.ids.shape[0]
            ids = torch.cat([w.ids, tokenizer.with_padding(pad_eos)([""]).input_ids.expand(2 - k, -1)])
            weights = torch.cat([w.weights, torch.ones(2 - k, 77)])
            with torch.no_grad():
                r = ref(ids, output_hidden_states=True)
            z = r.hidden_states[-2]  # (k, 77, D)
            zw = z * weights[..., None]
            zw = zw * (z.mean(dim=(1, 2), keepdim=True) / zw.mean(dim=(1, 2), keepdim=True))
            hidden.append(zw.reshape(1, 154, -1))
            if ref is ref_g:
                assert rel_err(out.pooled[b], r.text_embeds[0]) < RTOL
        assert rel_err(out.hidden[b:b + 1], torch.cat(hidden, dim=-1)) < RTOL

    cond.check_unet(192, 96 + 1536)
    c = cond.unet_cond(out, original_size=(768, 1024), crop_coords=(16, 0), target_size=(1024, 1024))
    assert c["y"].shape == (2, 96 + 1536)


def test_sdxl_vector_cond_matches_diffusers_time_ids():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    pooled = torch.randn(2, 1280)
    time_ids = torch.tensor([[896.0, 1152.0, 32.0, 64.0, 1024.0, 1024.0]] * 2)  # (h, w), (top, left), (h, w)
    proj = embeddings.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    expected = torch.cat([pooled, proj(time_ids.flatten()).reshape(2, -1)], dim=-1)
    got = sdxl_vector_cond(pooled, (896, 1152), (32, 64), (1024, 1024))
    assert got.shape == (2, 2816)
    assert torch.allclose(got, expected, atol=1e-5)
    per_sample = sdxl_vector_cond(pooled, torch.tensor([[896, 1152], [512, 512]]), (32, 64), (1024, 1024))
    assert torch.allclose(per_sample[0], expected[0], atol=1e-5) and not torch.allclose(per_sample[1], expected[1])


def test_presets_and_diffusers_sd2_depth():
    for name, width, layers, act in (("clip_l", 768, 12, "quick_gelu"), ("openclip_h", 1024, 24, "gelu"),
                                     ("openclip_bigg", 1280, 32, "gelu")):
        c = getattr(ClipTextConfig, name)()
        assert (c.hidden_size, c.num_hidden_layers, c.hidden_act, c.hidden_size // c.num_attention_heads) == \
            (width, layers, act, 64)
    # diffusers' SD 2.x text_encoder keeps 23 of the 24 blocks: "penultimate" is its last block
    c = config_from_hf({"vocab_size": 49408, "hidden_size": 1024, "num_hidden_layers": 23, "num_attention_heads": 16,
                        "intermediate_size": 4096, "hidden_act": "gelu", "projection_dim": 512, "eos_token_id": 2})
    assert c.full_depth == 24 and c.eos_token_id is None
    with torch.device("meta"):
        tower = ClipTextTransformer(c)
    assert tower.blocks_for_skip(2) == 23 and tower.blocks_for_skip(3) == 22
    with pytest.raises(ValueError, match="out of range"):
        tower.blocks_for_skip(1)


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def tiny_sd(tokenizer):
    return published_layout(hf_model(hf_config(tokenizer, width=64, heads=1)))


def test_shape_mismatch_names_the_tensor(tiny_sd):
    sd = dict(tiny_sd)
    key = "text_model.encoder.layers.1.mlp.fc1.weight"
    sd[key] = torch.zeros(100, 64)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.fc1\.weight"):
        load_clip_text(sd, layout="hf")


def test_unknown_missing_and_empty(tiny_sd):
    with pytest.raises(CheckpointError, match="no known CLIP text layout.*surprise"):
        load_clip_text({**tiny_sd, "text_model.surprise.weight": torch.zeros(1)}, layout="hf")
    sd = dict(tiny_sd)
    del sd["text_model.encoder.layers.2.layer_norm2.bias"]
    with pytest.raises(CheckpointError, match="missing 1 tensor"):
        load_clip_text(sd, layout="hf")
    with pytest.raises(CheckpointError, match="no text-encoder tensors under the prefix"):
        load_clip_text(tiny_sd, layout="hf", prefix="cond_stage_model.transformer.")
    with pytest.raises(CheckpointError, match="no known CLIP text layout"):
        load_clip_text(tiny_sd, layout="open_clip")  # the wrong layout
    with pytest.raises(ValueError, match="layout"):
        convert_state_dict(tiny_sd, "onnx")


def test_text_encoder_width_must_match_the_unet(tokenizer, tiny_sd):
    sd = {"cond_stage_model.transformer." + k: v for k, v in tiny_sd.items()}
    cond = SDTextConditioner.from_state_dict("sd1", sd, tokenizer)
    cond.check_unet(64)
    with pytest.raises(CheckpointError, match="64 wide, but the U-Net cross-attends to width 768"):
        cond.check_unet(768)


def test_bad_token_ids_and_tokenizer(tokenizer, tiny_sd):
    tower = load_clip_text(tiny_sd, layout="hf")
    with pytest.raises(ValueError, match="out of range"):
        tower(torch.tensor([[tokenizer.vocab_size + 5]]))
    with pytest.raises(ValueError, match="exceed"):
        tower(torch.zeros(1, 78, dtype=torch.long))
    small = ClipTokenizer({"a": 0, "a</w>": 1, BOS: 2, EOS: 3}, [])
    big = ClipTokenizer({**tokenizer.vocab, "extra": 99999}, [])
    from sumie.text.conditioner import ClipTextEncoder
    ClipTextEncoder(small, tower)
    with pytest.raises(ValueError, match="do not belong together"):
        ClipTextEncoder(big, tower)


def test_unknown_family():
    with pytest.raises(ValueError, match="no text conditioning known"):
        SDTextConditioner("flux", [])


def test_diffusers_folder_conditioner_negative_prompts_and_unet(tokenizer, tmp_path):
    """An SD 1.x diffusers layout end to end: cond/uncond of equal length feed a tiny U-Net."""
    from sumie.nn.unet import UNet, UNetConfig

    ref = hf_model(hf_config(tokenizer, width=64, heads=4), projection=False)
    ref.save_pretrained(tmp_path / "text_encoder")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(tokenizer.vocab), encoding="utf-8")
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges))
    cond = SDTextConditioner.from_diffusers("sd1", tmp_path)
    c, u = cond.encode_pair(["cat " * 100, "a dog"], ["", "blurry"])
    assert c.hidden.shape == u.hidden.shape == (2, 154, 64)
    ids = tokenizer(["a dog"]).input_ids
    with torch.no_grad():
        assert rel_err(c.hidden[1:, :77], ref(ids).last_hidden_state) < RTOL
    unet = UNet(UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(2,), num_heads=2, context_dim=cond.width, norm_groups=8))
    cond.check_unet(unet.config.context_dim, unet.config.adm_in_channels)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert unet(x, torch.ones(2), cond.unet_cond(c)).shape == x.shape
