"""Key tables between sumie (= original latent-diffusion names) and the diffusers layout.

Each table maps a *module* prefix in sumie's U-Net or autoencoder to the prefix of the
same module in diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL``; parameter names
below a module are identical on both sides (transformer blocks keep latent diffusion's
names in diffusers). Tables are built from the model config, so one function per model
describes the whole correspondence and the reverse direction is the inverted dict.
Facts from diffusers' ``loaders/single_file_utils.py`` and ComfyUI's
``comfy/diffusers_convert.py``; the code is sumie's own.

The text-encoder section converts between the Hugging Face ``CLIPTextModel`` layout and
the OpenCLIP layout that SD 2.x and SDXL single files use (fused ``in_proj`` q/k/v).
"""

from __future__ import annotations

import re

import torch

from ...nn.unet import UNetConfig
from ...nn.vae import VAEConfig
from ..checkpoint import CheckpointError
from .tensors import TensorRef, Weights

# ---------------------------------------------------------------- U-Net

_UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_UNET_RESNET = {  # ADM ResBlock -> diffusers ResnetBlock2D
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}


def level_has_attention(c: UNetConfig, level: int) -> bool:
    return 2**level in c.attention_resolutions and c.transformer_depth[level] > 0


def middle_has_attention(c: UNetConfig) -> bool:
    return c.middle_attention and c.transformer_depth_middle > 0


def unet_module_map(c: UNetConfig) -> dict[str, str]:
    """sumie U-Net module prefix -> diffusers ``UNet2DConditionModel`` module prefix."""
    m = dict(_UNET_TOP)

    def resnet(ours: str, theirs: str) -> None:
        m.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in _UNET_RESNET.items()})

    n = len(c.channel_mult)
    idx = 1
    for level in range(n):
        for j in range(c.num_res_blocks[level]):
            resnet(f"input_blocks.{idx}.0", f"down_blocks.{level}.resnets.{j}")
            if level_has_attention(c, level):
                m[f"input_blocks.{idx}.1"] = f"down_blocks.{level}.attentions.{j}"
            idx += 1
        if level != n - 1:
            m[f"input_blocks.{idx}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            idx += 1
    resnet("middle_block.0", "mid_block.resnets.0")
    if middle_has_attention(c):
        m["middle_block.1"] = "mid_block.attentions.0"
    resnet(f"middle_block.{2 if middle_has_attention(c) else 1}", "mid_block.resnets.1")
    idx = 0
    for i, level in enumerate(reversed(range(n))):
        for j in range(c.num_res_blocks[level] + 1):
            resnet(f"output_blocks.{idx}.0", f"up_blocks.{i}.resnets.{j}")
            k = 1
            if level_has_attention(c, level):
                m[f"output_blocks.{idx}.1"] = f"up_blocks.{i}.attentions.{j}"
                k = 2
            if level and j == c.num_res_blocks[level]:
                m[f"output_blocks.{idx}.{k}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
            idx += 1
    return m


# ---------------------------------------------------------------- autoencoder

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Old diffusers checkpoints (before 0.14) name the attention projections differently.
_VAE_ATTN_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_ATTN_CONV = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")  # 1x1 conv here, Linear there


def vae_module_map(c: VAEConfig) -> dict[str, str]:
    """sumie autoencoder module prefix -> diffusers ``AutoencoderKL`` module prefix."""
    if c.attn_resolutions:
        raise CheckpointError("diffusers' AutoencoderKL has no attention outside the middle block; "
                              f"this VAE has attn_resolutions={c.attn_resolutions}")
    m = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        m.update({f"{side}.conv_in": f"{side}.conv_in", f"{side}.norm_out": f"{side}.conv_norm_out",
                  f"{side}.conv_out": f"{side}.conv_out"})
        for a, b in (("block_1", "resnets.0"), ("block_2", "resnets.1")):
            m.update({f"{side}.mid.{a}.{x}": f"{side}.mid_block.{b}.{y}" for x, y in _VAE_RESNET.items()})
        m.update({f"{side}.mid.attn_1.{x}": f"{side}.mid_block.attentions.0.{y}" for x, y in _VAE_ATTN.items()})
    n = len(c.ch_mult)
    for level in range(n):
        for j in range(c.num_res_blocks):
            m.update({f"encoder.down.{level}.block.{j}.{x}": f"encoder.down_blocks.{level}.resnets.{j}.{y}"
                      for x, y in _VAE_RESNET.items()})
        if level != n - 1:
            m[f"encoder.down.{level}.downsample.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
    for i, level in enumerate(reversed(range(n))):
        for j in range(c.num_res_blocks + 1):
            m.update({f"decoder.up.{level}.block.{j}.{x}": f"decoder.up_blocks.{i}.resnets.{j}.{y}"
                      for x, y in _VAE_RESNET.items()})
        if level != 0:
            m[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    return m


# ---------------------------------------------------------------- renaming


def _lookup(key: str, table: dict[str, str]) -> str | None:
    """Rename ``key`` by the longest module prefix of it found in ``table``."""
    i = len(key)
    while (i := key.rfind(".", 0, i)) > 0:
        hit = table.get(key[:i])
        if hit is not None:
            return hit + key[i:]
    return None


def rename(weights: Weights, table: dict[str, str], what: str) -> Weights:
    """Rename every key through ``table``; keys it does not cover are an error naming them."""
    out, unknown = {}, []
    for k, ref in weights.items():
        new = _lookup(k, table)
        if new is None:
            unknown.append(k)
        else:
            out[new] = ref
    if unknown:
        raise CheckpointError(f"{what}: {len(unknown)} tensor(s) have no counterpart in this layout, "
                              f"e.g. {sorted(unknown)[:4]}; the file does not match its config")
    return out


def unet_from_diffusers(weights: Weights, c: UNetConfig) -> Weights:
    return rename(weights, {v: k for k, v in unet_module_map(c).items()}, "diffusers U-Net")


def unet_to_diffusers(weights: Weights, c: UNetConfig) -> Weights:
    return rename(weights, unet_module_map(c), "sumie U-Net")


def vae_from_diffusers(weights: Weights, c: VAEConfig) -> Weights:
    legacy = {}
    for k, ref in weights.items():
        for old, new in _VAE_ATTN_LEGACY.items():
            k = k.replace(f"attentions.0.{old}.", f"attentions.0.{new}.")
        legacy[k] = ref
    out = rename(legacy, {v: k for k, v in vae_module_map(c).items()}, "diffusers VAE")
    for k, ref in out.items():
        if _VAE_ATTN_CONV.search(k) and len(ref.shape) == 2:
            out[k] = ref.map(lambda t: t[:, :, None, None], ref.shape + (1, 1))
    return out


def vae_to_diffusers(weights: Weights, c: VAEConfig) -> Weights:
    out = {}
    for k, ref in weights.items():
        if _VAE_ATTN_CONV.search(k) and len(ref.shape) == 4:
            ref = ref.map(lambda t: t[:, :, 0, 0], ref.shape[:2])
        out[k] = ref
    return rename(out, vae_module_map(c), "sumie VAE")


# ---------------------------------------------------------------- CLIP text encoders

_HF_TO_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                         "self_attn.out_proj": "attn.out_proj"}
_HF_TO_OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                       "text_model.embeddings.position_embedding.weight": "positional_embedding",
                       "text_model.final_layer_norm.weight": "ln_final.weight",
                       "text_model.final_layer_norm.bias": "ln_final.bias"}
_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OC_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def text_hf_to_openclip(w: Weights) -> Weights:
    """Hugging Face CLIP text weights -> OpenCLIP names (q, k, v fused into ``in_proj``)."""
    out: Weights = {}
    qkv: dict[tuple[int, str], dict[str, TensorRef]] = {}
    for k, ref in w.items():
        if k in _HF_TO_OPENCLIP_TOP:
            out[_HF_TO_OPENCLIP_TOP[k]] = ref
        elif k == "text_projection.weight":  # Linear (P, D) -> matrix used as x @ W, (D, P)
            out["text_projection"] = ref.map(lambda t: t.t().contiguous(), ref.shape[::-1])
        elif m := _HF_LAYER.match(k):
            i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, kind), {})[mod[10]] = ref
            elif mod in _HF_TO_OPENCLIP_LAYER:
                out[f"transformer.resblocks.{i}.{_HF_TO_OPENCLIP_LAYER[mod]}.{kind}"] = ref
            else:
                raise CheckpointError(f"text encoder: unknown tensor {k}")
        elif k.endswith("position_ids"):
            continue  # a buffer some transformers versions saved
        else:
            raise CheckpointError(f"text encoder: unknown tensor {k}")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"text encoder layer {i}: q/k/v {kind} incomplete ({sorted(parts)})")
        refs = [parts["q"], parts["k"], parts["v"]]
        shape = (sum(r.shape[0] for r in refs),) + refs[0].shape[1:]
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = TensorRef(
            shape, lambda refs=refs: torch.cat([r.load() for r in refs], dim=0))
    return out


def text_openclip_to_hf(w: Weights) -> Weights:
    """OpenCLIP text weights -> Hugging Face ``CLIPTextModel(WithProjection)`` names."""
    top = {v: k for k, v in _HF_TO_OPENCLIP_TOP.items()}
    layer = {v: k for k, v in _HF_TO_OPENCLIP_LAYER.items()}
    out: Weights = {}
    for k, ref in w.items():
        if k in top:
            out[top[k]] = ref
        elif k == "text_projection":
            out["text_projection.weight"] = ref.map(lambda t: t.t().contiguous(), ref.shape[::-1])
        elif m := _OC_LAYER.match(k):
            i, rest = int(m.group(1)), m.group(2)
            pre = f"text_model.encoder.layers.{i}"
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                d = ref.shape[0] // 3
                for j, name in enumerate("qkv"):
                    out[f"{pre}.self_attn.{name}_proj.{kind}"] = ref.map(
                        lambda t, j=j, d=d: t[j * d:(j + 1) * d].contiguous(), (d,) + ref.shape[1:])
            else:
                mod, kind = rest.rsplit(".", 1)
                if mod not in layer:
                    raise CheckpointError(f"text encoder: unknown tensor {k}")
                out[f"{pre}.{layer[mod]}.{kind}"] = ref
        elif k in ("logit_scale", "attn_mask") or k.startswith("visual."):
            continue  # the contrastive temperature, the causal mask, the image tower: not text weights
        else:
            raise CheckpointError(f"text encoder: unknown tensor {k}")
    return out
