"""Statistics over the same problems: standard errors and paired differences (float64)."""

import numpy as np


def stderr(values) -> float:
  """Standard error of the mean of ``values`` (problems,); 0.0 for fewer than two."""
  values = np.asarray(values, np.float64)
  return float(np.std(values, ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0


def paired(a, b) -> tuple[float, float]:
  """Mean and standard error of ``a - b`` over the same problems (both shaped (problems,))."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return float(np.mean(d)), stderr(d)
