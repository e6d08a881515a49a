"""Evaluation: tuned baselines, learned-vs-baseline comparisons, plots."""
