"""What the benchmarks measure against: the machine's matmul peak, its memory bandwidth and XLA's
FLOP counts.

Both are timed in the same process as the workload. On the 2-core VM the memory-bound
meta-steps (small matmuls, gates, the scan's saved values) ran ~1.7x slower for minutes at a time
while the matmul peak held (2026-12-05: the quadratic meta-step at 28-29 ms in every process for
~10 minutes, 16-17 ms before and after, the trainer alike), so the bandwidth is recorded beside
each workload, and before/after comparisons run interleaved.
"""

import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, *args, repeats: int) -> float:
  """Median wall seconds of ``jit(fn)(*args)`` after a first (compiling) call."""
  compiled = jax.jit(fn)
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    tic = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - tic)
  return statistics.median(times)


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of a jitted n x n float32 matmul (the machine's practical peak), median of calls."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  return 2 * n**3 / median_seconds(lambda x: x @ x, a, repeats=repeats)


def copy_bandwidth(megabytes: int = 256, repeats: int = 10) -> float:
  """Bytes/s read plus written by a jitted ``x + 1`` over ``megabytes`` of float32 (well past
  the caches), median of calls: the memory bandwidth a memory-bound step sees."""
  x = jnp.zeros((megabytes * 2**20 // 4,), jnp.float32)
  return 2 * x.nbytes / median_seconds(lambda v: v + 1.0, x, repeats=repeats)


def flops(analysis) -> float:
  """The ``flops`` of a ``cost_analysis()`` result (older jax: a list, one dict a computation)."""
  if isinstance(analysis, list):
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))
