"""Stable Diffusion checkpoint loading against diffusers (test-only reference).

Tiny U-Nets and autoencoders with the block structure of SD 1.5, SD 2.1, SD inpainting and
SDXL (same block types, real cross-attention widths, linear projections, SDXL's
``text_time`` vector conditioning, per-level transformer depths) get random weights in
diffusers, are written as diffusers folders and as single files, loaded by sumie and run
on the same inputs; outputs must agree to 1e-4 relative in float32.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from sumie.io.checkpoint import CheckpointError
from sumie.io.sd import convert, family, load_sd, load_vae_file, open_weights, save_single_file
from sumie.io.sd.formats import save_diffusers
from sumie.nn.layers import timestep_embedding

diffusers = pytest.importorskip("diffusers")

TINY_UNETS = {
    "sd1": dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sd2": dict(block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=1024,
                attention_head_dim=(1, 2, 2), use_linear_projection=True, upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl": dict(block_out_channels=(64, 128, 128), layers_per_block=(1, 2, 1), cross_attention_dim=2048,
                 attention_head_dim=(1, 2, 2), use_linear_projection=True, transformer_layers_per_block=(1, 2, 3),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}
TINY_VAE = dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (norm scales and biases too), so any mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def _reference(name: str, in_channels: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, **TINY_UNETS[name])
    vae = diffusers.AutoencoderKL(sample_size=32, scaling_factor=0.13025 if name == "sdxl" else 0.18215, **TINY_VAE)
    return _perturb(unet, seed), _perturb(vae, seed + 1)


def _write_diffusers(folder, unet, vae, prediction="epsilon"):
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def sdxl_vector(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's vector conditioning (Podell et al. 2023, sec. 2.2): pooled text embedding and
    256-d sinusoidal embeddings of (original size, crop, target size), (B, 1280 + 6 * 256)."""
    emb = timestep_embedding(time_ids.flatten(), 256).reshape(time_ids.shape[0], -1)
    return torch.cat([pooled, emb], dim=1)


def _compare_unet(ref, ours, name, in_channels=4):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, in_channels, 16, 16, generator=g)
    t = torch.tensor([10.0, 871.0])
    ctx = torch.randn(2, 7, ref.config.cross_attention_dim, generator=g)
    kw, cond = {}, {"context": ctx}
    if name == "sdxl":
        pooled = torch.randn(2, 1280, generator=g)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 1024, 1024]])
        kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        cond["y"] = sdxl_vector(pooled, time_ids)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx, **kw).sample
        got = ours(x, t, cond)
    assert rel_err(got, expected) < 1e-4


def _compare_vae(ref, ours):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        mine = ours.encode(x)
        assert rel_err(mine.mean, post.mean) < 1e-4 and rel_err(mine.logvar, post.logvar) < 1e-4
        z = post.mean
        assert rel_err(ours.decode(z), ref.decode(z).sample) < 1e-4


@pytest.mark.parametrize("name,in_channels,fam", [("sd1", 4, "sd1"), ("sd2", 4, "sd2"), ("sdxl", 4, "sdxl"),
                                                  ("sd1", 9, "sd1-inpaint"), ("sd2", 9, "sd2-inpaint")])
def test_diffusers_folder_and_single_file_match_diffusers(tmp_path, name, in_channels, fam):
    ref_unet, ref_vae = _reference(name, in_channels)
    folder = _write_diffusers(tmp_path / "pipe", ref_unet, ref_vae)
    sd = load_sd(folder)
    assert sd.family.name == fam and sd.prediction == "eps"
    unet, vae = sd.build_unet(), sd.build_vae()
    assert vae.config.scaling_factor == ref_vae.config.scaling_factor
    _compare_unet(ref_unet, unet, name, in_channels)
    _compare_vae(ref_vae, vae)

    # the same weights through a single file (written by sumie), detected from shapes alone
    single = save_single_file(sd, tmp_path / "model.safetensors")
    sd2 = load_sd(single)
    assert sd2.family.name == fam and sd2.unet_config == sd.unet_config
    _compare_unet(ref_unet, sd2.build_unet(), name, in_channels)
    _compare_vae(ref_vae, sd2.build_vae())


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_conversion_round_trip_is_exact_and_diffusers_reads_our_folders(tmp_path, name):
    ref_unet, ref_vae = _reference(name, seed=3)
    src = _write_diffusers(tmp_path / "src", ref_unet, ref_vae, prediction="v_prediction")
    convert(src, tmp_path / "single.safetensors", "single-file")
    convert(tmp_path / "single.safetensors", tmp_path / "native", "sumie", prediction="v")
    back = convert(tmp_path / "native", tmp_path / "dst", "diffusers")
    assert back.prediction == "v"
    # diffusers itself loads the folder we wrote, and its tensors equal the originals bit for bit
    unet2 = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "dst" / "unet")
    vae2 = diffusers.AutoencoderKL.from_pretrained(tmp_path / "dst" / "vae")
    for a, b in ((ref_unet, unet2), (ref_vae, vae2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    sched = json.loads((tmp_path / "dst" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"


def test_sharded_diffusers_weights(tmp_path):
    ref_unet, ref_vae = _reference("sd1", seed=4)
    folder = tmp_path / "pipe"
    ref_unet.save_pretrained(folder / "unet", max_shard_size="200KB")
    ref_vae.save_pretrained(folder / "vae", max_shard_size="200KB")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    (folder / "model_index.json").write_text("{}")
    sd = load_sd(folder)
    _compare_unet(ref_unet, sd.build_unet(), "sd1")
    _compare_vae(ref_vae, sd.build_vae())


def test_separate_vae_file_overrides_the_checkpoint_vae(tmp_path):
    ref_unet, ref_vae = _reference("sdxl", seed=6)
    _, other_vae = _reference("sdxl", seed=9)
    folder = _write_diffusers(tmp_path / "pipe", ref_unet, ref_vae)
    other_vae.save_pretrained(tmp_path / "fixed_vae")  # a diffusers-named file with its config
    sd = load_sd(folder, vae=tmp_path / "fixed_vae" / "diffusion_pytorch_model.safetensors")
    _compare_vae(other_vae, sd.build_vae())
    # the same VAE as a latent-diffusion-named bare file keeps the model's latent scale
    from sumie.io.sd.tensors import write_safetensors

    write_safetensors(tmp_path / "vae_ldm.safetensors", sd.vae)
    cfg, _ = load_vae_file(tmp_path / "vae_ldm.safetensors", scaling_factor=0.13025)
    assert cfg.scaling_factor == 0.13025 and cfg == sd.vae_config


def test_text_encoders_are_handed_on_raw_with_kind_and_layout(tmp_path):
    ref_unet, ref_vae = _reference("sdxl", seed=1)
    sd = load_sd(_write_diffusers(tmp_path / "pipe", ref_unet, ref_vae))
    g = torch.Generator().manual_seed(0)
    d, layers = 1280, 2
    oc = {"token_embedding.weight": torch.randn(10, d, generator=g), "positional_embedding": torch.randn(77, d, generator=g),
          "ln_final.weight": torch.randn(d, generator=g), "ln_final.bias": torch.randn(d, generator=g),
          "text_projection": torch.randn(d, 16, generator=g)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        oc.update({p + "attn.in_proj_weight": torch.randn(3 * d, d, generator=g), p + "attn.in_proj_bias": torch.randn(3 * d, generator=g),
                   p + "attn.out_proj.weight": torch.randn(d, d, generator=g), p + "ln_1.weight": torch.randn(d, generator=g),
                   p + "mlp.c_fc.weight": torch.randn(8, d, generator=g), p + "mlp.c_proj.weight": torch.randn(d, 8, generator=g)})
    from sumie.io.sd.formats import TextEncoderWeights
    from sumie.io.sd.tensors import from_tensors

    sd.text_encoders["text_encoder_2"] = TextEncoderWeights("text_encoder_2", "openclip-bigg", "open_clip", from_tensors(oc))
    path = save_single_file(sd, tmp_path / "xl.safetensors")
    raw, _ = open_weights(path)
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in raw
    te = load_sd(path).text_encoders["text_encoder_2"]
    assert (te.kind, te.layout) == ("openclip-bigg", "open_clip")
    assert all(torch.equal(te.state_dict()[k], v) for k, v in oc.items())
    # through the Hugging Face layout of a diffusers folder and back: q/k/v split and re-fused
    save_diffusers(load_sd(path), tmp_path / "xl_diffusers")
    hf = load_sd(tmp_path / "xl_diffusers").text_encoders["text_encoder_2"]
    assert hf.layout == "hf" and "text_model.encoder.layers.1.self_attn.k_proj.weight" in hf.weights
    assert torch.equal(hf.state_dict()["text_projection.weight"], oc["text_projection"].t())
    again = hf.in_layout("open_clip")
    assert all(torch.equal(again[k].load(), v) for k, v in oc.items())


def test_v_prediction_detection_order(tmp_path):
    ref_unet, ref_vae = _reference("sd2", seed=2)
    sd = load_sd(_write_diffusers(tmp_path / "pipe", ref_unet, ref_vae))
    path = save_single_file(sd, tmp_path / "sd2.safetensors")
    got = load_sd(path)  # the converter wrote the folder's prediction into the header (issue 22 item 6)
    assert got.prediction == "eps" and "sumie.prediction" in got.notes[1]
    assert load_sd(path, prediction="v").prediction == "v"
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    v = load_sd(path)
    assert v.prediction == "v" and v.resolution == 768 and "yaml" in v.notes[1]


# ------------------------------------------------------------------------- bad input


def test_unknown_family_lists_what_was_found_and_expected(tmp_path):
    ref_unet, ref_vae = _reference("sd1")
    sd = load_sd(_write_diffusers(tmp_path / "pipe", ref_unet, ref_vae))
    k = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    sd.unet = {n: (r if "attn2.to_k" not in n and "attn2.to_v" not in n else r.map(lambda t: t[:, :500], (r.shape[0], 500)))
               for n, r in sd.unet.items()}
    assert sd.unet[k].shape[1] == 500
    path = save_single_file(sd, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=r"context_dim=500.*expected one of: sd1 \(context_dim=768"):
        load_sd(path)
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"unknown model family.*model\.diffusion_model.*\['foo\.'\]"):
        load_sd(tmp_path / "other.safetensors")


def test_truncated_file_is_refused(tmp_path):
    ref_unet, ref_vae = _reference("sd1")
    path = save_single_file(load_sd(_write_diffusers(tmp_path / "pipe", ref_unet, ref_vae)), tmp_path / "m.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_sd(cut)
    cut.write_bytes(data[:100])  # cut inside the header
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_sd(cut)


def test_mismatched_shape_names_the_tensor(tmp_path):
    ref_unet, ref_vae = _reference("sd1")
    sd = load_sd(_write_diffusers(tmp_path / "pipe", ref_unet, ref_vae))
    key = "middle_block.0.in_layers.2.bias"
    sd.unet[key] = sd.unet[key].map(lambda t: t[:-1], (sd.unet[key].shape[0] - 1,))
    with pytest.raises(CheckpointError, match=r"middle_block\.0\.in_layers\.2\.bias: file \(63,\) vs model \(64,\)"):
        sd.build_unet()
    vkey = "decoder.up.1.block.0.conv1.weight"
    sd.vae[vkey] = sd.vae[vkey].map(lambda t: t[:, :-1], (sd.vae[vkey].shape[0], sd.vae[vkey].shape[1] - 1, 3, 3))
    with pytest.raises(CheckpointError, match=r"decoder\.up\.1\.block\.0\.conv1\.weight"):
        sd.build_vae()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickles_need_the_flag_and_the_unpickler_refuses_code(tmp_path):
    ref_unet, ref_vae = _reference("sd1")
    sd = load_sd(_write_diffusers(tmp_path / "pipe", ref_unet, ref_vae))
    state = {**{f"model.diffusion_model.{k}": v.load() for k, v in sd.unet.items()},
             **{f"first_stage_model.{k}": v.load() for k, v in sd.vae.items()}}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, ckpt)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_sd(ckpt)
    loaded = load_sd(ckpt, allow_pickle=True)
    assert loaded.family.name == "sd1"
    _compare_unet(ref_unet, loaded.build_unet(), "sd1")

    marker = tmp_path / "pwned"
    for name, payload in (("zip.ckpt", None), ("raw.ckpt", pickle.dumps({"state_dict": _Exploit(marker)}))):
        bad = tmp_path / name
        if payload is None:
            torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Exploit(marker)}, bad)
        else:
            bad.write_bytes(payload)
        with pytest.raises(CheckpointError, match="refused|damaged"):
            load_sd(bad, allow_pickle=True)
        assert not marker.exists()
    # the exploit is real: what an unrestricted unpickler would call does create the marker
    fn, args = _Exploit(marker).__reduce__()
    fn(*args)
    assert marker.exists()


def test_unknown_family_name_and_layout_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model family"):
        family("sd3")
    with pytest.raises(ValueError, match="unknown target layout"):
        convert(tmp_path, tmp_path / "x", "onnx")


def test_cli_convert(tmp_path, capsys):
    from sumie.cli import main

    ref_unet, ref_vae = _reference("sd2", seed=8)
    src = _write_diffusers(tmp_path / "pipe", ref_unet, ref_vae, prediction="v_prediction")
    assert main(["convert", str(src), str(tmp_path / "m.safetensors"), "--to", "single-file"]) == 0
    out = capsys.readouterr().out
    assert "sd2" in out and "v-prediction" in out
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "half"), "--to", "sumie", "--half",
                 "--prediction", "v"]) == 0
    sd = load_sd(tmp_path / "half")
    assert sd.prediction == "v" and sd.unet["out.2.weight"].load().dtype == torch.float16
    assert main(["convert", str(src), str(tmp_path / "half"), "--to", "diffusers"]) == 2
    assert "exists" in capsys.readouterr().err
    torch.save({"x": torch.zeros(1)}, tmp_path / "m.ckpt")
    assert main(["convert", str(tmp_path / "m.ckpt"), str(tmp_path / "o.safetensors"), "--to", "single-file"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
