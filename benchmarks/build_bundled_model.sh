#!/usr/bin/env bash
# Rebuild sumie's bundled text-to-image model (src/sumie/assets/emoji-64) from scratch on a CPU.
# Usage: bash benchmarks/build_bundled_model.sh [SECONDS_OF_TRAINING] [THREADS]
# The shipped model: 6000 s on one Zen 2 core (~52 training images/s); see its MODEL_CARD.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_BUDGET=${1:-6000}
THREADS=${2:-1}
DATA=${SUMIE_DATA:-data/emoji}
RUN=${SUMIE_RUN:-runs/emoji64}
[ -f "$DATA/metadata.jsonl" ] || sumie data emoji "$DATA"          # Noto Emoji + Twemoji via npm, integrity-checked
sumie train --preset emoji-64 --set data.path="$DATA" --set train.num_threads="$THREADS" \
    --time-budget "$SECONDS_BUDGET" --out "$RUN" --no-progress
python benchmarks/bundled_model_report.py "$RUN" --data "$DATA"     # adherence, FD/KID, timing, grids
sumie export "$RUN" src/sumie/assets/emoji-64 --card src/sumie/assets/emoji-64/MODEL_CARD.md
