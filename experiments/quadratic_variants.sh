#!/usr/bin/env bash
# Section 3.1, Figure 4 left: LSTM, LSTM+GAC, NTM-BFGS and NTM-L-BFGS meta-trained on 10-d
# quadratics with the same budget, then evaluated on the same 256 held-out problems against the
# tuned baselines. Runs one training job at a time (the CPU is shared); a finished run (one with
# wall_seconds.txt) is not retrained.
#
#   bash experiments/quadratic_variants.sh runs/quadratic_variants [extra meta_train flags]
# EPOCHS, STEPS_PER_EPOCH and MARKDOWN (the summary path) may be set in the environment.
set -euo pipefail
OUT=${1:-runs/quadratic_variants}
shift || true
EPOCHS=${EPOCHS:-30}
STEPS_PER_EPOCH=${STEPS_PER_EPOCH:-100}
VARIANTS=(lstm lstm_gac ntm_bfgs ntm_lbfgs)
MARKDOWN=${MARKDOWN:-docs/results_quadratic_variants.md}
mkdir -p "$OUT"
for variant in "${VARIANTS[@]}"; do
  dir="$OUT/$variant"
  if [[ -f "$dir/wall_seconds.txt" ]]; then
    echo "$variant: already trained in $dir"
    continue
  fi
  start=$(date +%s)
  python -m train.meta_train --task=quadratic --optimizer="$variant" --output_dir="$dir" \
    --num_epochs="$EPOCHS" --steps_per_epoch="$STEPS_PER_EPOCH" --log_every=100 "$@"
  echo $(( $(date +%s) - start )) > "$dir/wall_seconds.txt"
done
python -m experiments.quadratic_variants --output_dir="$OUT/eval" \
  --markdown="$MARKDOWN" \
  $(for variant in "${VARIANTS[@]}"; do echo "--checkpoint=$variant=$OUT/$variant"; done)
cp "$OUT/eval/curves.png" "${MARKDOWN%.md}.png"
