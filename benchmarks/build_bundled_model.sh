#!/usr/bin/env bash
# Rebuild sumie's bundled text-to-image model (src/sumie/assets/emoji-64) from scratch on a CPU.
# Usage: bash benchmarks/build_bundled_model.sh [SECONDS_OF_TRAINING] [THREADS]
# The shipped model: a 540 s autoencoder run (1 thread), then 4600 s of U-Net training (the first
# 460 s on 1 thread, the rest on 2); see src/sumie/assets/emoji-64/MODEL_CARD.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_BUDGET=${1:-4600}
THREADS=${2:-2}
DATA=${SUMIE_DATA:-data/emoji}
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
