"""Choosing a baseline's learning rate on the paper's grid: whole, or coarse-to-fine."""

from collections.abc import Callable

import numpy as np


def score(losses: np.ndarray) -> np.ndarray:
  """Mean over problems of ``losses`` shaped (rates, problems); inf where any run diverged."""
  losses = np.asarray(losses)
  return np.where(np.all(np.isfinite(losses), axis=1), np.mean(losses, axis=1), np.inf)


def coarse_to_fine(
  evaluate: Callable[[np.ndarray], np.ndarray], grid: np.ndarray, stride: int
) -> tuple[int, dict[int, float]]:
  """Index into ``grid`` with the lowest score, sweeping every ``stride``-th rate, then refining.

  Args:
    evaluate: rates (n,) -> scores (n,) (non-finite: diverged), e.g. ``score`` of final losses.
    stride: 1 sweeps the whole grid; s > 1 sweeps indices 0, s, 2s, ... and then every index
      within s - 1 of the best of those: the whole grid's choice whenever the score has one
      minimum over the rates at that spacing.

  Returns:
    ``(best index, {index: score of every rate swept})``; ties go to the smaller index.
  """
  scores: dict[int, float] = {}

  def sweep(indices):
    indices = [i for i in indices if i not in scores]
    if indices:
      values = evaluate(np.asarray(grid)[np.asarray(indices)])
      for i, v in zip(indices, values, strict=True):
        scores[i] = float(v) if np.isfinite(v) else float("inf")

  sweep(range(0, len(grid), stride))
  if stride > 1:
    best = min(scores, key=lambda i: (scores[i], i))
    sweep(range(max(best - stride + 1, 0), min(best + stride, len(grid))))
  return min(scores, key=lambda i: (scores[i], i)), scores
