"""What the benchmarks measure against: the machine's matmul peak and XLA's FLOP counts."""

import statistics
import time

import jax
import jax.numpy as jnp


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of a jitted n x n float32 matmul (the machine's practical peak), median of calls."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  times = []
  for _ in range(repeats):
    tic = time.perf_counter()
    jax.block_until_ready(matmul(a))
    times.append(time.perf_counter() - tic)
  return 2 * n**3 / statistics.median(times)


def flops(analysis) -> float:
  """The ``flops`` of a ``cost_analysis()`` result (older jax: a list, one dict a computation)."""
  if isinstance(analysis, list):
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))
