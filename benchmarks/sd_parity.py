"""Full-size Stable Diffusion parity: sumie's U-Net and VAE against diffusers, random weights.

There are no published weights on the build machines, so the published *architectures*
(the unet/ and vae/ config.json of SD 1.5, SD 2.1 and SDXL base) are built in diffusers
with random weights, written as a diffusers folder, converted by sumie to a single file,
loaded from that file into sumie's modules, and run on the same inputs in float32.
Prints max abs / max relative (to max |reference|) differences per component.

    python benchmarks/sd_parity.py --families sd15 --latent 64 --image 512
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from sumie.io.sd import convert, load_sd
from sumie.nn.layers import timestep_embedding

_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
_SD_BLOCKS = dict(down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                  block_out_channels=[320, 640, 1280, 1280], layers_per_block=2)
PUBLISHED = {  # unet/config.json and vae/config.json of the released diffusers repositories
    "sd15": (dict(**_SD_BLOCKS, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
             dict(**_VAE, sample_size=512, scaling_factor=0.18215), "eps"),
    "sd21": (dict(**_SD_BLOCKS, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                  use_linear_projection=True, upcast_attention=True),
             dict(**_VAE, sample_size=768, scaling_factor=0.18215), "v"),
    "sdxl": (dict(sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
             dict(**_VAE, sample_size=1024, scaling_factor=0.13025), "eps"),
}


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval()


def _diff(name, got, ref):
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"  {name:<14} max|ref| {scale:10.4g}   max abs diff {err:.3e}   max rel diff {err / scale:.3e}", flush=True)
    return err / scale


def run(fam: str, latent: int, image: int, workdir: Path, skip_vae: bool) -> dict:
    import diffusers

    unet_cfg, vae_cfg, pred = PUBLISHED[fam]
    print(f"{fam}: building diffusers models with the published configs (random weights)", flush=True)
    torch.manual_seed(0)
    folder = workdir / f"{fam}-diffusers"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, latent, latent, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 77, unet_cfg["cross_attention_dim"], generator=g)
    kw, cond = {}, {"context": ctx}
    if fam == "sdxl":
        pooled = torch.randn(1, 1280, generator=g)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
        kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        cond["y"] = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(1, -1)], dim=1)
    img = torch.rand(1, 3, image, image, generator=g) * 2 - 1

    ref = {}
    unet = _perturb(diffusers.UNet2DConditionModel(**unet_cfg), 0)
    with torch.no_grad():
        t0 = time.time()
        ref["unet"] = unet(x, t, encoder_hidden_states=ctx, **kw).sample
        print(f"  diffusers U-Net forward {time.time() - t0:.1f}s", flush=True)
    unet.save_pretrained(folder / "unet")
    del unet
    gc.collect()
    vae = _perturb(diffusers.AutoencoderKL(**vae_cfg), 1)
    if not skip_vae:
        with torch.no_grad():
            t0 = time.time()
            post = vae.encode(img).latent_dist
            ref["mean"], ref["logvar"] = post.mean, post.logvar
            ref["decode"] = vae.decode(post.mean).sample
            print(f"  diffusers VAE encode+decode {time.time() - t0:.1f}s", flush=True)
    vae.save_pretrained(folder / "vae")
    del vae
    gc.collect()
    sched = folder / "scheduler"
    sched.mkdir()
    (sched / "scheduler_config.json").write_text(json.dumps(
        {"prediction_type": "v_prediction" if pred == "v" else "epsilon"}))
    (folder / "model_index.json").write_text("{}")

    single = workdir / f"{fam}.safetensors"
    convert(folder, single, "single-file")
    sd = load_sd(single, prediction=pred)
    print(f"  sumie detected family {sd.family.name}, prediction {sd.prediction}; {'; '.join(sd.notes)}")
    out = {}
    ours = sd.build_unet()
    with torch.no_grad():
        t0 = time.time()
        got = ours(x, t, cond)
        print(f"  sumie U-Net forward {time.time() - t0:.1f}s", flush=True)
    out["unet"] = _diff("U-Net", got, ref["unet"])
    del ours
    gc.collect()
    if not skip_vae:
        ours = sd.build_vae()
        with torch.no_grad():
            t0 = time.time()
            p = ours.encode(img)
            dec = ours.decode(ref["mean"])
            print(f"  sumie VAE encode+decode {time.time() - t0:.1f}s", flush=True)
        out["vae.mean"] = _diff("VAE enc mean", p.mean, ref["mean"])
        out["vae.logvar"] = _diff("VAE enc logvar", p.logvar, ref["logvar"])
        out["vae.decode"] = _diff("VAE decode", dec, ref["decode"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="sd15", help="comma list of sd15, sd21, sdxl")
    ap.add_argument("--latent", type=int, default=64, help="latent side for the U-Net")
    ap.add_argument("--image", type=int, default=512, help="image side for the VAE")
    ap.add_argument("--skip-vae", action="store_true")
    args = ap.parse_args()
    results = {}
    for fam in args.families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            results[fam] = run(fam, args.latent, args.image, Path(tmp), args.skip_vae)
    worst = max(v for r in results.values() for v in r.values())
    print(f"worst relative difference {worst:.3e} ({'PASS' if worst < 1e-4 else 'FAIL'} at 1e-4)")


if __name__ == "__main__":
    main()
