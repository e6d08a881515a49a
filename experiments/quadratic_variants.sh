#!/usr/bin/env bash
# Section 3.1, Figure 4 left: LSTM, LSTM+GAC, NTM-BFGS and NTM-L-BFGS meta-trained with one
# budget per seed, one job at a time (a run with wall_seconds.txt is not retrained), each seed's
# optimizers evaluated on the same 256 held-out problems against the tuned baselines, then the
# seeds side by side. Usage (docs/ntm_bfgs.md):
#   bash experiments/quadratic_variants.sh runs/quadratic_variants [extra meta_train flags]
# Environment: EPOCHS (of 100 meta-steps), SEEDS (meta-training seeds) and RESULTS (where each
# seed's results.json, summary.md and curves.png go, in seed_<s>/, and seeds.md). Every setting
# that changes results is pinned to what docs/results_quadratic_variants/ was made with (each
# summary's "Meta-training" line: --meta_lr=1e-3, not today's default, and the meta-gradient
# clipped at norm 10); extra flags override (the first, unclipped round of 2026-11-22:
# EPOCHS=30 ... --meta_grad_clip=0).
set -euo pipefail
OUT=${1:-runs/quadratic_variants}
shift || true
EPOCHS=${EPOCHS:-20}
SEEDS=${SEEDS:-0 1 2}
RESULTS=${RESULTS:-docs/results_quadratic_variants}
VARIANTS=(lstm lstm_gac ntm_bfgs ntm_lbfgs)
evaluations=()
for seed in $SEEDS; do
  for variant in "${VARIANTS[@]}"; do
    dir="$OUT/seed_$seed/$variant"
    if [[ -f "$dir/wall_seconds.txt" ]]; then
      echo "$variant, seed $seed: already trained in $dir"
      continue
    fi
    start=$(date +%s)
    python -m train.meta_train --preset=none --task=quadratic --optimizer="$variant" \
      --output_dir="$dir" --seed="$seed" \
      --num_epochs="$EPOCHS" --steps_per_epoch=100 --log_every=100 \
      --meta_lr=1e-3 --meta_lr_schedule=constant --num_problems=128 --unroll=20 --horizon=100 \
      --valid_problems=128 --meta_objective=sum --meta_grad_clip=10 "$@"
    echo $(( $(date +%s) - start )) > "$dir/wall_seconds.txt"
  done
  python -m experiments.quadratic_variants --output_dir="$RESULTS/seed_$seed" \
    --num_problems=256 --num_steps=100 --seed=2016 \
    $(for variant in "${VARIANTS[@]}"; do echo "--checkpoint=$variant=$OUT/seed_$seed/$variant"; done)
  evaluations+=("$RESULTS/seed_$seed")
done
if (( ${#evaluations[@]} > 1 )); then
  python -m experiments.seed_table --markdown="$RESULTS/seeds.md" \
    --title="Quadratic variants (section 3.1), $EPOCHS epochs of 100 meta-steps per run" \
    --evaluations="$(IFS=,; echo "${evaluations[*]}")"
fi
