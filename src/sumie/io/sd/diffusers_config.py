"""diffusers ``config.json`` <-> sumie config dataclasses, for the U-Net and the autoencoder.

Only the design space of Stable Diffusion is accepted; a config that asks for anything
else (class embeddings, other time embeddings, scale-shift norms ...) is refused with the
offending field named, rather than loaded into a network that would compute something else.
"""

from __future__ import annotations

from ...nn.unet import UNetConfig
from ...nn.vae import VAEConfig
from ..checkpoint import CheckpointError
from .keymaps import level_has_attention, middle_has_attention

# Fields whose value must be the one Stable Diffusion uses; anything else is unsupported.
_UNET_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": 1e-5,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "reverse_transformer_layers_per_block": None,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}
_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _per_level(v, n: int, name: str) -> list:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise CheckpointError(f"diffusers U-Net config: {name} has {len(v)} entries for {n} levels")
        return list(v)
    return [v] * n


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    """A diffusers ``UNet2DConditionModel`` config -> :class:`UNetConfig`."""
    for k, v in _UNET_FIXED.items():
        if k in cfg and cfg[k] != v and not (k == "norm_eps" and abs(cfg[k] - v) < 1e-12):
            raise CheckpointError(f"diffusers U-Net config: {k}={cfg[k]!r} is not supported (sumie needs {v!r})")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    n = len(down)
    if any(t not in _DOWN for t in down) or any(t not in _UP for t in up):
        raise CheckpointError(f"diffusers U-Net config: unsupported block types {down} / {up}")
    attn = [_DOWN[t] for t in down]
    if [_UP[t] for t in up] != attn[::-1]:
        raise CheckpointError(f"diffusers U-Net config: up blocks {up} do not mirror down blocks {down}")
    boc = list(cfg["block_out_channels"])
    mc = boc[0]
    if any(b % mc for b in boc):
        raise CheckpointError(f"diffusers U-Net config: block_out_channels {boc} are not multiples of the first")
    nres = _per_level(cfg.get("layers_per_block", 2), n, "layers_per_block")
    tdepth = _per_level(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    heads = _per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), n, "attention_head_dim")
    # (diffusers' SD configs put the head *count* in attention_head_dim; num_attention_heads wins if set)
    used = [i for i in range(n) if attn[i]] + [n - 1]
    if len({heads[i] for i in used}) == 1:
        head_kw = {"num_heads": heads[used[0]]}
    elif len({boc[i] // heads[i] for i in used}) == 1 and all(boc[i] % heads[i] == 0 for i in used):
        head_kw = {"num_head_channels": boc[used[0]] // heads[used[0]]}
    else:
        raise CheckpointError(f"diffusers U-Net config: heads {heads} are neither a constant count nor a constant width")
    adm = None
    if cfg.get("addition_embed_type") is not None:
        if cfg["addition_embed_type"] != "text_time" or cfg.get("addition_time_embed_dim") != 256:
            raise CheckpointError(f"diffusers U-Net config: addition_embed_type={cfg['addition_embed_type']!r} "
                                  f"with addition_time_embed_dim={cfg.get('addition_time_embed_dim')} is not supported "
                                  "(SDXL's is 'text_time' with 256)")
        adm = cfg["projection_class_embeddings_input_dim"]
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4), model_channels=mc,
        channel_mult=tuple(b // mc for b in boc), num_res_blocks=tuple(nres),
        attention_resolutions=tuple(2**i for i in range(n) if attn[i]),
        transformer_depth=tuple(d if a else 0 for d, a in zip(tdepth, attn)), transformer_depth_middle=tdepth[-1],
        context_dim=cfg.get("cross_attention_dim", 1280), use_linear_in_transformer=bool(cfg.get("use_linear_projection")),
        adm_in_channels=adm, norm_groups=cfg.get("norm_num_groups", 32), dropout=cfg.get("dropout", 0.0), **head_kw)


def unet_config_to_diffusers(c: UNetConfig, sample_size: int) -> dict:
    """:class:`UNetConfig` -> a diffusers ``UNet2DConditionModel`` config (refuses what it cannot express)."""
    if c.num_classes is not None or c.patch_size != 1 or c.resblock_scale_shift or c.context_dim is None \
            or c.pos_embed:
        raise CheckpointError("only Stable-Diffusion-style U-Nets (cross-attention, no class labels, no patch stem, "
                              "no scale-shift norm, no position code) have a diffusers layout")
    n = len(c.channel_mult)
    attn = [level_has_attention(c, i) for i in range(n)]
    boc = [c.model_channels * m for m in c.channel_mult]
    heads = [b // c.num_head_channels if c.num_head_channels > 0 else c.num_heads for b in boc]
    cfg = {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size,
        "in_channels": c.in_channels, "out_channels": c.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": boc, "layers_per_block": list(c.num_res_blocks),
        "transformer_layers_per_block": [d if a else 1 for d, a in zip(c.transformer_depth, attn)],
        "attention_head_dim": heads, "cross_attention_dim": c.context_dim,
        "use_linear_projection": c.use_linear_in_transformer, "norm_num_groups": c.norm_groups, "norm_eps": 1e-5,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "dropout": c.dropout,
    }
    if not middle_has_attention(c) or c.transformer_depth_middle != cfg["transformer_layers_per_block"][-1]:
        raise CheckpointError("diffusers' mid block has attention as deep as the last level; this U-Net's differs")
    if c.adm_in_channels is not None:
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=c.adm_in_channels)
    return cfg


_VAE_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
    """A diffusers ``AutoencoderKL`` config -> :class:`VAEConfig`."""
    for k, v in _VAE_FIXED.items():
        if cfg.get(k, v) != v:
            raise CheckpointError(f"diffusers VAE config: {k}={cfg[k]!r} is not supported")
    if set(cfg.get("down_block_types", ["DownEncoderBlock2D"])) != {"DownEncoderBlock2D"} or \
            set(cfg.get("up_block_types", ["UpDecoderBlock2D"])) != {"UpDecoderBlock2D"}:
        raise CheckpointError("diffusers VAE config: only DownEncoderBlock2D/UpDecoderBlock2D are supported")
    boc = list(cfg["block_out_channels"])
    z = cfg.get("latent_channels", 4)
    return VAEConfig(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3), ch=boc[0],
                     ch_mult=tuple(b // boc[0] for b in boc), num_res_blocks=cfg.get("layers_per_block", 1),
                     z_channels=z, embed_dim=z, norm_groups=cfg.get("norm_num_groups", 32),
                     use_quant_conv=cfg.get("use_quant_conv", True), use_post_quant_conv=cfg.get("use_post_quant_conv", True),
                     mid_attention=cfg.get("mid_block_add_attention", True),
                     scaling_factor=cfg.get("scaling_factor", 0.18215), shift_factor=cfg.get("shift_factor") or 0.0)


def vae_config_to_diffusers(c: VAEConfig, sample_size: int) -> dict:
    """:class:`VAEConfig` -> a diffusers ``AutoencoderKL`` config."""
    if c.embed_dim != c.z_channels or c.attn_resolutions:
        raise CheckpointError("diffusers' AutoencoderKL needs embed_dim == z_channels and no attn_resolutions")
    n = len(c.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [c.ch * m for m in c.ch_mult], "layers_per_block": c.num_res_blocks,
        "latent_channels": c.z_channels, "norm_num_groups": c.norm_groups, "sample_size": sample_size,
        "scaling_factor": c.scaling_factor, "shift_factor": c.shift_factor or None, "act_fn": "silu",
        "use_quant_conv": c.use_quant_conv, "use_post_quant_conv": c.use_post_quant_conv,
        "mid_block_add_attention": c.mid_attention, "force_upcast": True,
    }
