"""LoRA files on Stable Diffusion models (sumie.io.sd.lora) against diffusers' own key conversion.

A random LoRA on every Linear and Conv2d layer of a tiny SD 1.x U-Net (diffusers names,
kohya layout: 3x3 conv LoRA on resnets, 1x1 on proj_in/out) and on a tiny CLIP text tower
is converted by diffusers (``StableDiffusionPipeline.lora_state_dict`` then its PEFT key
conversion; diffusers needs the ``peft`` package only to *inject* adapters, not to convert
them) and merged into the diffusers U-Net and the transformers text model as
W += alpha/r * B @ A. sumie reads the kohya file and the converted files and must give the
same outputs (1e-4 relative, float32), merged or as hooks. With ``peft`` installed, diffusers'
own ``load_lora_weights`` (PEFT injection) is a second oracle.
"""

from __future__ import annotations

import pytest
import torch

from sumie.io.checkpoint import CheckpointError, save_tensors
from sumie.io.sd import keymaps
from sumie.io.sd.diffusers_config import unet_config_from_diffusers
from sumie.io.sd.lora import apply_loras, read_lora
from sumie.io.sd.tensors import from_tensors, materialize
from sumie.nn.unet import UNet
from sumie.text.clip import load_clip_text

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.utils.state_dict_utils import (convert_all_state_dict_to_peft,  # noqa: E402
                                              convert_unet_state_dict_to_peft)
from test_sd_checkpoints import TINY_UNETS, TINY_VAE, _perturb  # noqa: E402
from test_text_clip import published_layout  # noqa: E402

torch.set_num_threads(1)
RANK = 4


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def models():
    """(diffusers U-Net, transformers CLIP text model) with random weights."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, **TINY_UNETS["sd1"])
    unet = _perturb(unet, 0)
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=1, max_position_embeddings=16, hidden_act="quick_gelu")
    text = transformers.CLIPTextModel(cfg).eval()
    return unet, text


def sumie_models(models) -> dict:
    ref_unet, ref_text = models
    cfg = unet_config_from_diffusers(dict(ref_unet.config))
    unet = UNet(cfg).eval()
    unet.load_state_dict(materialize(keymaps.unet_from_diffusers(from_tensors(ref_unet.state_dict()), cfg)))
    text = {k: v.clone() for k, v in published_layout(ref_text).items()}  # the tower would share them
    return {"unet": unet, "text_encoder": load_clip_text(text, layout="hf")}


def random_kohya(ref_unet, ref_text, seed: int, skip=()) -> dict[str, torch.Tensor]:
    """A kohya-layout LoRA on every Linear/Conv2d (diffusers names), with alphas."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    layers = [("lora_unet_", n, m) for n, m in ref_unet.named_modules()] + \
             [("lora_te_", "text_model." + n.removeprefix("text_model."), m) for n, m in ref_text.named_modules()]
    for prefix, name, m in layers:
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or any(s in name for s in skip):
            continue
        w = m.weight
        down_shape = (RANK, w.shape[1], *w.shape[2:]) if w.ndim == 4 else (RANK, w.shape[1])
        up_shape = (w.shape[0], RANK, 1, 1) if w.ndim == 4 else (w.shape[0], RANK)
        key = prefix + name.replace(".", "_")
        sd[key + ".lora_down.weight"] = torch.randn(down_shape, generator=g) * 0.2
        sd[key + ".lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.2
        sd[key + ".alpha"] = torch.tensor(float(torch.randint(1, 8, (1,), generator=g)))
    return sd


# diffusers' kohya key heuristics mangle these (they are rarely trained); leave them out of its oracle
DIFFUSERS_SKIP = ("time_embedding", "conv_in", "conv_out")


def diffusers_peft(kohya: dict) -> dict[str, torch.Tensor]:
    """diffusers' conversion of a kohya LoRA to PEFT keys (``unet.``/``text_encoder.`` prefixes)."""
    no_alpha = {k: v for k, v in kohya.items() if "alpha" not in k}
    converted, _ = diffusers.StableDiffusionPipeline.lora_state_dict(no_alpha)
    unet = convert_unet_state_dict_to_peft({k[5:]: v for k, v in converted.items() if k.startswith("unet.")})
    text = convert_all_state_dict_to_peft({k: v for k, v in converted.items() if not k.startswith("unet.")})
    return {**{"unet." + k: v for k, v in unet.items()}, **text}, converted


def oracle(models, peft: dict, alphas: dict[str, float] | None, strength: float = 1.0):
    """Merge PEFT-named LoRA weights into copies of the reference models by hand."""
    import copy

    ref_unet, ref_text = (copy.deepcopy(m) for m in models)
    with torch.no_grad():
        for key, a in peft.items():
            if not key.endswith("lora_A.weight"):
                continue
            comp, mod = key.split(".", 1)
            mod = mod[: -len(".lora_A.weight")]
            b = peft[key.replace("lora_A", "lora_B")]
            model = ref_unet if comp == "unet" else ref_text
            if comp != "unet" and not hasattr(model, "text_model"):
                mod = mod.removeprefix("text_model.")
            layer = model.get_submodule(mod)
            scale = (alphas[(comp, mod)] if alphas else a.shape[0]) / a.shape[0] * strength
            layer.weight += (b.flatten(1) @ a.flatten(1)).reshape(layer.weight.shape) * scale
    return ref_unet, ref_text


def inputs():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 871.0]),
            torch.randn(2, 7, 768, generator=g), torch.randint(0, 100, (2, 16), generator=g))


def outputs_ref(ref_unet, ref_text):
    x, t, ctx, ids = inputs()
    with torch.no_grad():
        return ref_unet(x, t, encoder_hidden_states=ctx).sample, ref_text(ids).last_hidden_state


def outputs(models: dict):
    x, t, ctx, ids = inputs()
    with torch.no_grad():
        return models["unet"](x, t, {"context": ctx}), models["text_encoder"](ids).hidden


def check(got, expected, tol=1e-4):
    for a, b in zip(got, expected):
        assert rel_err(a, b) < tol


def test_kohya_and_diffusers_formats_match_diffusers(models, tmp_path):
    ref_unet, ref_text = models
    kohya = random_kohya(ref_unet, ref_text, seed=1, skip=DIFFUSERS_SKIP)
    save_tensors(tmp_path / "kohya.safetensors", kohya)
    peft, intermediate = diffusers_peft(kohya)
    assert any(k.startswith("unet.") and "resnets.0.conv1.lora_A" in k for k in peft)  # 3x3 conv LoRA included
    # the oracle: kohya alphas attached to diffusers' module names
    alphas = {}
    for key, a in peft.items():
        if key.endswith("lora_A.weight"):
            comp, mod = key.split(".", 1)
            mod = mod[: -len(".lora_A.weight")]
            kname = ("lora_unet_" if comp == "unet" else "lora_te_") + mod.replace(".", "_")
            alphas[(comp, mod.removeprefix("text_model.") if not hasattr(ref_text, "text_model") and comp != "unet"
                     else mod)] = float(kohya[kname + ".alpha"])
    expected = outputs_ref(*oracle(models, peft, alphas, strength=0.7))
    base = outputs(sumie_models(models))
    assert rel_err(base[0], expected[0]) > 1e-2  # the LoRA changes the output

    for merge in (True, False):
        ours = sumie_models(models)
        applied = apply_loras(ours, [(tmp_path / "kohya.safetensors", 0.7)], merge=merge)
        assert len(applied.deltas) == len(peft) // 2
        check(outputs(ours), expected)

    # diffusers' PEFT layout (no alphas: scale 1) and its older lora.down / to_q_lora layout
    save_tensors(tmp_path / "peft.safetensors", peft)
    save_tensors(tmp_path / "old.safetensors", intermediate)
    expected1 = outputs_ref(*oracle(models, peft, None))
    for name in ("peft", "old"):
        ours = sumie_models(models)
        assert read_lora(tmp_path / f"{name}.safetensors").format == "diffusers"
        apply_loras(ours, [(tmp_path / f"{name}.safetensors", 1.0)], merge=name == "peft")
        check(outputs(ours), expected1)


def test_ldm_names_whole_unet_and_merged_equals_hooks(models, tmp_path):
    """Every layer (conv_in, time embedding included), in latent-diffusion names as SDXL
    trainers write them: merged == unmerged == the diffusers-named file."""
    ref_unet, ref_text = models
    kohya = random_kohya(ref_unet, ref_text, seed=2)
    ours = sumie_models(models)
    table = {v: k for k, v in keymaps.unet_module_map(ours["unet"].config).items()}
    ldm = {}
    for k, v in kohya.items():
        name, _, suffix = k.partition(".")
        if name.startswith("lora_unet_"):
            diff = next(m for m, _ in ref_unet.named_modules() if "lora_unet_" + m.replace(".", "_") == name)
            name = "lora_unet_" + keymaps._lookup(diff + ".weight", table)[: -len(".weight")].replace(".", "_")
        ldm[f"{name}.{suffix}"] = v
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in ldm
    save_tensors(tmp_path / "diff.safetensors", kohya)
    save_tensors(tmp_path / "ldm.safetensors", ldm)
    results = []
    for path, merge in (("diff", True), ("ldm", True), ("ldm", False)):
        m = sumie_models(models)
        applied = apply_loras(m, [(tmp_path / f"{path}.safetensors", 0.5)], merge=merge)
        assert len(applied.deltas) == len(kohya) // 3
        results.append(outputs(m))
    for r in results[1:]:
        check(r, results[0], 1e-5)


def test_strength_zero_two_loras_and_removal(models, tmp_path):
    ref_unet, ref_text = models
    a, b = random_kohya(ref_unet, ref_text, seed=3), random_kohya(ref_unet, ref_text, seed=4)
    b = {k: v for k, v in b.items() if "attn2" in k or "lora_te_" in k}  # a partial LoRA
    save_tensors(tmp_path / "a.safetensors", a)
    save_tensors(tmp_path / "b.safetensors", b)
    ours = sumie_models(models)
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in ours.items()}
    base = outputs(ours)

    for merge in (True, False):  # strength 0 is the model itself, exactly
        applied = apply_loras(ours, [(tmp_path / "a.safetensors", 0.0)], merge=merge)
        assert all(torch.equal(x, y) for x, y in zip(outputs(ours), base))
        applied.remove()

    both = {}
    for merge in (True, False):
        applied = apply_loras(ours, [(tmp_path / "a.safetensors", 0.8), (tmp_path / "b.safetensors", -0.6)],
                              merge=merge)
        both[merge] = outputs(ours)
        applied.remove()  # bit-exact: merged restores the backup, hooks never touched the weights
        for c, m in ours.items():
            assert all(torch.equal(v, before[c][k]) for k, v in m.state_dict().items())
        assert all(torch.equal(x, y) for x, y in zip(outputs(ours), base))
    check(both[True], both[False], 1e-5)

    # the two LoRAs add: the weight change of both is the sum of each one's
    layer = ours["unet"].get_submodule("input_blocks.1.1.transformer_blocks.0.attn2.to_k")
    w0 = layer.weight.detach().clone()
    deltas = []
    for path, s in (("a", 0.8), ("b", -0.6)):
        applied = apply_loras(ours, [(tmp_path / f"{path}.safetensors", s)])
        deltas.append(layer.weight.detach() - w0)
        applied.remove()
    applied = apply_loras(ours, [(tmp_path / "a.safetensors", 0.8), (tmp_path / "b.safetensors", -0.6)])
    assert torch.allclose(layer.weight.detach() - w0, deltas[0] + deltas[1], atol=1e-6)
    applied.remove()
    # without a backup, removal subtracts the deltas again (exact up to rounding)
    applied = apply_loras(ours, [(tmp_path / "a.safetensors", 0.8)], backup=False)
    applied.remove()
    assert torch.allclose(layer.weight.detach(), w0, atol=1e-6)


def test_wrong_family_is_refused_and_nothing_is_applied(models, tmp_path):
    ref_unet, ref_text = models
    good = random_kohya(ref_unet, ref_text, seed=5)
    ours = sumie_models(models)
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in ours.items()}
    g = torch.Generator().manual_seed(0)
    # SDXL's cross-attention reads 2048-wide tokens; SDXL LoRAs name their U-Net layers the LDM way
    xl = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    cases = {
        xl: {xl + ".lora_down.weight": torch.randn(4, 2048, generator=g),
             xl + ".lora_up.weight": torch.randn(64, 4, generator=g)},
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": {
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 1280, generator=g),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(5120, 4, generator=g)},
        "lora_unet_input_blocks_7_1_proj_in": {  # a level the tiny U-Net does not have
            "lora_unet_input_blocks_7_1_proj_in.lora_down.weight": torch.randn(4, 64, generator=g),
            "lora_unet_input_blocks_7_1_proj_in.lora_up.weight": torch.randn(64, 4, generator=g)},
    }
    for i, (bad_key, bad) in enumerate(cases.items()):
        save_tensors(tmp_path / f"bad{i}.safetensors", {**good, **bad})
        save_tensors(tmp_path / "good.safetensors", good)
        with pytest.raises(CheckpointError, match=bad_key + r".*nothing was applied"):
            # the good file first: a failure in the second LoRA must not leave the first applied
            apply_loras(ours, [(tmp_path / "good.safetensors", 1.0), (tmp_path / f"bad{i}.safetensors", 1.0)])
        for c, m in ours.items():
            assert all(torch.equal(v, before[c][k]) for k, v in m.state_dict().items())
            assert not any(mod._forward_hooks for mod in m.modules())

    loha = {"lora_unet_conv_in.hada_w1_a": torch.zeros(4, 4), "lora_unet_conv_in.hada_w1_b": torch.zeros(4, 4)}
    save_tensors(tmp_path / "loha.safetensors", loha)
    with pytest.raises(CheckpointError, match="hada adapter"):
        read_lora(tmp_path / "loha.safetensors")
    half = {k: v for k, v in good.items() if not k.endswith("lora_up.weight")}
    with pytest.raises(CheckpointError, match="no matching up weight"):
        read_lora(half)


def diffusers_loaded(models, lora: dict[str, torch.Tensor], strength: float):
    """diffusers' own LoRA loading (its key conversion, then PEFT injection with the file's
    alphas) into copies of the reference models, at ``strength``."""
    import copy

    ref_unet, ref_text = (copy.deepcopy(m) for m in models)
    pipe = diffusers.StableDiffusionPipeline(vae=diffusers.AutoencoderKL(**TINY_VAE), text_encoder=ref_text,
                                             tokenizer=None, unet=ref_unet, scheduler=diffusers.DDIMScheduler(),
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(dict(lora), adapter_name="lora")
    pipe.set_adapters(["lora"], adapter_weights=[strength])
    return ref_unet, ref_text


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_diffusers_peft_loading_agrees(models, tmp_path, layout):
    """diffusers' ``load_lora_weights`` (PEFT adapters on the live modules) as the oracle for a
    kohya file (alpha 2, rank 4) and a PEFT-named file, U-Net and text encoder, strength 0.7.
    One alpha for all layers: diffusers 0.42 with peft 0.21 drops per-layer kohya alphas of
    attention and text-encoder layers ("alpha_pattern keys did not match any targeted module")
    and scales them by the most common alpha; per-layer alphas are checked by hand above."""
    pytest.importorskip("peft")
    ref_unet, ref_text = models
    kohya = {k: torch.tensor(2.0) if k.endswith(".alpha") else v
             for k, v in random_kohya(ref_unet, ref_text, seed=6, skip=DIFFUSERS_SKIP).items()}
    lora = kohya if layout == "kohya" else diffusers_peft(kohya)[0]
    save_tensors(tmp_path / "lora.safetensors", lora)
    expected = outputs_ref(*diffusers_loaded(models, lora, 0.7))
    # diffusers applied the LoRA to both models
    assert all(rel_err(a, b) > 1e-2 for a, b in zip(outputs(sumie_models(models)), expected))
    for merge in (True, False):
        ours = sumie_models(models)
        apply_loras(ours, [(tmp_path / "lora.safetensors", 0.7)], merge=merge)
        check(outputs(ours), expected)
