#!/usr/bin/env bash
# Rebuild sumie's bundled text-to-image model (src/sumie/assets/emoji-64) from scratch on a CPU.
# Usage: bash benchmarks/build_bundled_model.sh [SECONDS_OF_TRAINING] [THREADS]
# The first (CPU) version of the bundled model: a 540 s autoencoder run (1 thread), then 4600 s of U-Net training (the first
# 460 s on 1 thread, the rest on 2); see src/sumie/assets/emoji-64/MODEL_CARD.md.
#
# Usage: bash benchmarks/build_bundled_model.sh finetune [SECONDS_OF_TRAINING] [THREADS]
# The shipped model's last step (2,700 s on the 2-core Zen 4): fine-tune the model in
# src/sumie/assets/emoji-64 with the place code (model.pos_embed) and the pooled prompt vector
# (text.pooled) switched on, noise levels shifted up, into runs/emoji64-finetune; export it by hand.
# (The shipped run started from the GPU-trained version: `git checkout 0c13862 -- src/sumie/assets/emoji-64`.)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${SUMIE_DATA:-data/emoji}
if [ "${1:-}" = finetune ]; then
    [ -f "$DATA/metadata.jsonl" ] || sumie data emoji "$DATA"
    exec sumie train --preset emoji-64 --set data.path="$DATA" --set latent.vae=src/sumie/assets/emoji-64 \
        --set train.init_from=src/sumie/assets/emoji-64 --set model.pos_embed=true --set text.pooled=true \
        --set model.adm_in_channels=128 --set diffusion.p_mean=-0.4 --set diffusion.p_std=1.4 \
        --set data.shapes_fraction=0.5 --set data.seed=2 --set train.lr=1e-3 --set train.warmup_steps=100 \
        --set train.lr_schedule=constant --set train.compile=true --set train.num_threads="${3:-2}" \
        --set train.ckpt_every=1000 --time-budget "${2:-2700}" --out "${SUMIE_RUN:-runs/emoji64-finetune}" --no-progress
fi
SECONDS_BUDGET=${1:-4600}
THREADS=${2:-2}
VAE=${SUMIE_VAE_RUN:-runs/vae-emoji-f4}
RUN=${SUMIE_RUN:-runs/emoji64-latent}
[ -f "$DATA/metadata.jsonl" ] || sumie data emoji "$DATA"          # Noto Emoji + Twemoji via npm, integrity-checked
[ -f "$VAE/vae/vae.json" ] || sumie train-vae --preset emoji-f4 --set data.path="$DATA" --time-budget 540 \
    --out "$VAE" --no-progress                                       # kl-f4 autoencoder, held-out PSNR in $VAE/report.json
sumie train --preset emoji-64 --set data.path="$DATA" --set latent.vae="$VAE/vae" \
    --set train.num_threads="$THREADS" --time-budget "$SECONDS_BUDGET" --out "$RUN" --no-progress
sumie export "$RUN" src/sumie/assets/emoji-64 --card src/sumie/assets/emoji-64/MODEL_CARD.md
python benchmarks/bundled_model_report.py src/sumie/assets/emoji-64 --data "$DATA" \
    --out benchmarks/results/bundled                                 # timing, adherence, guidance sweep, grids
sumie eval sweep src/sumie/assets/emoji-64 --data "$DATA" --steps 10,20,50 --sampler heun,dpmpp_2m,euler \
    --n 256 --out benchmarks/results/bundled/eval_sweep               # FD/KID (sumie features) on emoji
