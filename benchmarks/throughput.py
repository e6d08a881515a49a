r"""Timing harness (run by hand, not a test): meta-training throughput and update cost.

  python benchmarks/throughput.py [--sizes=16384,1048576] [--repeats=20]

Reports (a) meta-training throughput on 10-d quadratics, 128 problems, unroll 20, in meta-steps
per second and optimizee steps per second (problems x unroll x meta-steps, backprop included);
(b) the time of one jitted ``learned_opt.as_optax`` update against one ``optax.adam`` update on the
same float32 parameters, as a ratio.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

import learned_opt  # noqa: E402
from train import meta_step, trainer  # noqa: E402
from train.config import MetaTrainConfig  # noqa: E402

flags.DEFINE_list("sizes", ["16384", "1048576"], "Parameter counts for the update benchmark.")
flags.DEFINE_integer("repeats", 20, "Timed calls per measurement (after a warm-up call).")
flags.DEFINE_integer("num_problems", 128, "Problems per meta-step.")
flags.DEFINE_integer("unroll", 20, "Unroll length.")
FLAGS = flags.FLAGS


def timed(fn, *args, repeats):
  """Median wall time of ``fn(*args)`` over ``repeats`` calls, after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def meta_training_throughput():
  config = MetaTrainConfig(
    output_dir="/tmp/unused", num_problems=FLAGS.num_problems, unroll=FLAGS.unroll, horizon=100
  )
  task, opt = trainer.build(config)
  state = meta_step.init_state(config, task, opt)
  step = jax.jit(meta_step.make_train_step(config, task, opt))
  seconds = timed(lambda s: step(s, task.data)[1].meta_loss, state, repeats=FLAGS.repeats)
  inner_steps = FLAGS.num_problems * FLAGS.unroll / seconds
  print(
    f"meta-training, quadratic dim 10, {FLAGS.num_problems} problems, unroll {FLAGS.unroll}: "
    f"{1 / seconds:.1f} meta-steps/s, {inner_steps:,.0f} optimizee steps/s (backprop included)"
  )


def update_cost(size):
  params = {"w": jnp.ones((size // 64, 64), jnp.float32)}
  grads = jax.tree.map(lambda p: 0.01 * p, params)
  opt = learned_opt.lstm_optimizer()
  learned = learned_opt.as_optax(opt, opt.init_meta_params(jax.random.key(0)))
  adam = optax.adam(1e-3)
  results = {}
  for name, tx in (("learned", learned), ("adam", adam)):
    update = jax.jit(lambda g, s, tx=tx: tx.update(g, s)[0])
    results[name] = timed(update, grads, tx.init(params), repeats=FLAGS.repeats)
  print(
    f"update of {size:,} params: as_optax(lstm) {results['learned'] * 1e3:.2f} ms, "
    f"optax.adam {results['adam'] * 1e3:.3f} ms, ratio {results['learned'] / results['adam']:.0f}x"
  )


def main(argv):
  del argv
  print(f"devices: {jax.devices()}")
  meta_training_throughput()
  for size in FLAGS.sizes:
    update_cost(int(size))


if __name__ == "__main__":
  app.run(main)
