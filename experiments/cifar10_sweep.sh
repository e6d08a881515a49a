#!/usr/bin/env bash
# Section 3.3, Figure 7 left with the paper's protocol: the two-LSTM CIFAR-10 optimizer
# meta-trained by a sweep (meta-lr by random search, the paper's w_t = 1 objective, 1000
# meta-steps a run = 5x the shipped optimizer's 200), then its winner evaluated on 64 held-out
# problems against Adam tuned on the whole 30-rate grid on 4 problems and the shipped optimizer.
# Usage (docs/cifar10.md): CIFAR10_DIR=... bash experiments/cifar10_sweep.sh runs/cifar10_sweep
# RUNS, PARALLEL and BASELINES may be set in the environment. Both steps resume when re-run.
set -euo pipefail
OUT=${1:-runs/cifar10_sweep}
RUNS=${RUNS:-2}
PARALLEL=${PARALLEL:-2}
BASELINES=${BASELINES:-adam}
python -m train.sweep --task=cifar10_conv --meta_objective=sum --num_epochs=10 \
  --steps_per_epoch=100 --num_runs="$RUNS" --meta_lr_range=1e-3,1e-2 \
  --seeds="$(seq -s, 0 $((RUNS - 1)))" --parallel="$PARALLEL" --select_problems=16 \
  --output_dir="$OUT/sweep"
python -m experiments.cifar10_experiments --experiments=cifar10 --baselines="$BASELINES" \
  --learned="sweep_winner=$OUT/sweep/winner,two_lstms=pretrained:cifar10_conv" \
  --output_dir="$OUT/eval"
