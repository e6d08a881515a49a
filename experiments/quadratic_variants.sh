#!/usr/bin/env bash
# Section 3.1, Figure 4 left: LSTM, LSTM+GAC, NTM-BFGS and NTM-L-BFGS meta-trained with one
# budget, one job at a time (a run with wall_seconds.txt is not retrained), then evaluated on 256
# held-out problems against the tuned baselines. Usage (docs/ntm_bfgs.md):
#   bash experiments/quadratic_variants.sh runs/quadratic_variants [extra meta_train flags]
# EPOCHS, STEPS_PER_EPOCH and MARKDOWN (the summary path) may be set in the environment. Every
# setting that changes results is pinned to what docs/results_quadratic_variants*.md were made
# with (their "Meta-training" line; --meta_lr=1e-3, not today's default); extra flags override.
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
  python -m train.meta_train --preset=none --task=quadratic --optimizer="$variant" \
    --output_dir="$dir" \
    --num_epochs="$EPOCHS" --steps_per_epoch="$STEPS_PER_EPOCH" --log_every=100 \
    --meta_lr=1e-3 --meta_lr_schedule=constant --num_problems=128 --unroll=20 --horizon=100 \
    --valid_problems=128 --seed=0 --meta_objective=sum --meta_grad_clip=0 "$@"
  echo $(( $(date +%s) - start )) > "$dir/wall_seconds.txt"
done
python -m experiments.quadratic_variants --output_dir="$OUT/eval" \
  --markdown="$MARKDOWN" --num_problems=256 --num_steps=100 --seed=2016 \
  $(for variant in "${VARIANTS[@]}"; do echo "--checkpoint=$variant=$OUT/$variant"; done)
cp "$OUT/eval/curves.png" "${MARKDOWN%.md}.png"
