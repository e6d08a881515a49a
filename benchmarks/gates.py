r"""CPU time per row of one LSTM layer's parts, forward + backward (run by hand, not a test).

  python -m benchmarks.gates [--rows=31820] [--hidden=20] [--repeats=100] [--rounds=3]

Times, on ``--rows`` rows (default 31,820: the MNIST base net's 15,910 coordinates x 2 problems,
one layer of one optimizee step of the ``mnist_mlp`` preset's meta-step), in one process and
round by round: the gates and their VJP in XLA (``lstm_rows.xla_gates``) and by the CPU kernels
(``learned_opt.kernels.stack.gates``), and the layer's matmul ``[x, h] @ W`` and its
VJP with a 2 x hidden fan-in (the second layer's). CPU time (all threads, ``time.process_time``)
is what a call costs when other jobs share the cores; wall time is printed beside it.
"""

import time

import jax
from absl import app, flags

from learned_opt import lstm_rows
from learned_opt.kernels import stack

flags.DEFINE_integer("rows", 31820, "Rows (coordinates x problems) of the layer.")
flags.DEFINE_integer("hidden", 20, "LSTM units.")
flags.DEFINE_integer("repeats", 100, "Timed calls per part, after one compiled call.")
flags.DEFINE_integer("rounds", 3, "Rounds; each times every part once.")
FLAGS = flags.FLAGS


def _pullback(fn):
  """``(primals, cotangents) -> VJP``: forward and backward as one jitted call."""
  return jax.jit(lambda primals, cotangents: jax.vjp(fn, *primals)[1](cotangents))


def main(argv):
  del argv
  rows, hidden = FLAGS.rows, FLAGS.hidden
  keys = jax.random.split(jax.random.key(0), 6)
  z = jax.random.normal(keys[0], (rows, 4 * hidden))
  c = jax.random.normal(keys[1], (rows, hidden))
  dh, dc = (jax.random.normal(k, (rows, hidden)) for k in keys[2:4])
  xh = jax.random.normal(keys[4], (rows, 2 * hidden))
  w = 0.1 * jax.random.normal(keys[5], (2 * hidden, 4 * hidden))
  parts = {}
  names = stack.targets()  # built (or found in the cache) before the timing
  for label, kernels in (("xla", None), ("cpu_kernels", names)):
    call = _pullback(lambda z, c, kernels=kernels: lstm_rows.gates(z, c, kernels))
    jax.block_until_ready(call((z, c), (dh, dc)))
    parts[f"gates fwd+bwd ({label})"] = (call, ((z, c), (dh, dc)))
  parts["matmul fwd+bwd (xla)"] = (_pullback(lambda a, b: a @ b), ((xh, w), z))
  results = {name: [] for name in parts}
  for _ in range(FLAGS.rounds):
    for name, (call, args) in parts.items():
      jax.block_until_ready(call(*args))
      cpu, wall = time.process_time(), time.perf_counter()
      for _ in range(FLAGS.repeats):
        out = call(*args)
      jax.block_until_ready(out)
      results[name].append(
        ((time.process_time() - cpu) / FLAGS.repeats, (time.perf_counter() - wall) / FLAGS.repeats)
      )
  print(f"{rows} rows, hidden {hidden}, jax {jax.__version__}, {jax.devices()[0]}")
  for name, runs in results.items():
    cpu = sorted(r[0] for r in runs)[len(runs) // 2]
    wall = sorted(r[1] for r in runs)[len(runs) // 2]
    print(f"{name:26s} {1e9 * cpu / rows:7.0f} ns CPU a row {1e9 * wall / rows:7.0f} ns wall")


if __name__ == "__main__":
  app.run(main)
