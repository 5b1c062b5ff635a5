"""Full-size CLIP text towers: sumie against transformers, random weights, float32.

Builds each tower Stable Diffusion uses with transformers from its published configuration
(random weights, scaled so every layer matters), hands sumie the weights in the layout SD
files use (transformers names for CLIP-L, OpenCLIP names with fused q/k/v for ViT-H and
bigG), and prints the largest absolute and relative (max |a - b| / max |b|) differences of
the last hidden state, the penultimate layer (raw and through the final LayerNorm) and the
pooled, projected output. Needs ``pip install transformers``; about 8 GB of memory for bigG.

    python benchmarks/clip_parity.py [--towers clip-l openclip-h openclip-bigg] [--batch 2]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from sumie.text.clip import load_clip_text
from sumie.text.clip_tokenizer import ClipTokenizer, TokenizerError

# text configs as published: openai/clip-vit-large-patch14 (SD 1.x, SDXL text_encoder), OpenCLIP
# ViT-H-14 (SD 2.x; 24 blocks in its single files) and ViT-bigG-14 (SDXL text_encoder_2)
PUBLISHED = {
    "clip-l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768, layout="hf"),
    "openclip-h": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       hidden_act="gelu", projection_dim=1024, layout="open_clip"),
    "openclip-bigg": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280, layout="open_clip"),
}
PROMPTS = ["a photograph of an astronaut riding a horse, (masterpiece:1.2), [blurry]",
           "東京の夜景 🌃 &amp; café ünïcödé, very " + "long " * 80 + "prompt", "", "don't stop!!"]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights of unit-scale activations: N(0, 1/fan_in) matrices, perturbed LayerNorms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def published_layout(model) -> dict:
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in model.state_dict().items()}


def to_openclip(sd: dict) -> dict:
    """transformers names -> OpenCLIP names (as SD 2.x / SDXL single files store the tower)."""
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T.contiguous()}
    i = 0
    while f"text_model.encoder.layers.{i}.layer_norm1.weight" in sd:
        h, o = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[o + f"attn.in_proj_{p}"] = torch.cat([sd[h + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[o + f"{ours}.{p}"] = sd[h + f"{theirs}.{p}"]
        i += 1
    return out


def token_ids(batch: int, pad_with_eos: bool) -> torch.Tensor:
    try:
        tok = ClipTokenizer.from_openai_bpe(pad_with_eos=pad_with_eos)
        return tok(PROMPTS[:batch]).input_ids
    except TokenizerError:  # no vocabulary installed: random ids in CLIP's layout
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 49406, (batch, 77), generator=g)
        ids[:, 0], ids[:, 40] = 49406, 49407
        ids[:, 41:] = 49407 if pad_with_eos else 0
        return ids


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = float((a - b).abs().max())
    return d, d / float(b.abs().max())


def run(name: str, batch: int) -> list[tuple]:
    import transformers

    spec = dict(PUBLISHED[name])
    layout = spec.pop("layout")
    cfg = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5,
                                      bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **spec)
    ref = transformers.CLIPTextModelWithProjection(cfg).eval()
    randomize(ref, seed=len(name))
    sd = published_layout(ref)
    if layout == "open_clip":
        sd = to_openclip(sd)
    t0 = time.perf_counter()
    ours = load_clip_text(sd, layout=layout, kind=name)
    load_s = time.perf_counter() - t0
    ids = token_ids(batch, pad_with_eos=name == "clip-l")
    rows = []
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        final_ln = getattr(ref, "text_model", ref).final_layer_norm
        last = ours(ids)
        pen = ours(ids, skip=2, final_norm=False)
        pen_ln = ours(ids, skip=2)
        rows.append((name, "last hidden (final LN)", *diff(last.hidden, r.last_hidden_state)))
        rows.append((name, "penultimate", *diff(pen.hidden, r.hidden_states[-2])))
        rows.append((name, "penultimate + final LN", *diff(pen_ln.hidden, final_ln(r.hidden_states[-2]))))
        rows.append((name, "pooled (text_projection)", *diff(last.pooled, r.text_embeds)))
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"{name}: {n_params / 1e6:.1f}M parameters, {layout} layout, loaded in {load_s:.1f}s, ids {tuple(ids.shape)}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--towers", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED))
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for name in args.towers:
        rows += run(name, args.batch)
    print(f"\n{'tower':<15}{'output':<28}{'max abs diff':>14}{'max rel diff':>14}")
    for name, what, a, r in rows:
        print(f"{name:<15}{what:<28}{a:>14.3e}{r:>14.3e}")
    worst = max(r for *_, r in rows)
    print(f"\nworst relative difference {worst:.3e} ({'within' if worst <= 1e-4 else 'OUTSIDE'} 1e-4)")


if __name__ == "__main__":
    main()
