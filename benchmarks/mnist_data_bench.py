r"""How the MNIST data reaches the jitted loss: compile and step times, closure vs argument.

Example:
  MNIST_DIR=../shared/data/mnist python -m benchmarks.mnist_data_bench

``tasks.mnist`` closes over the device arrays; jax 0.10 embeds a closed-over array as a constant
in the lowered program. This measures what that costs against passing the same arrays as a
jit argument, for one problem and for a vmapped batch of problems.
"""

import time

import jax
import jax.numpy as jnp

from tasks import mnist as mnist_task
from tasks import mnist_data


def _time(fn, *args, repeats=5):
  lowered_at = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  compiled_at = time.perf_counter()
  compiled = lowered.compile()
  done_at = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  run_at = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(compiled(*args))
  step = (time.perf_counter() - run_at) / repeats
  hlo_mb = len(lowered.as_text()) / 1e6
  return compiled_at - lowered_at, done_at - compiled_at, step, hlo_mb


def main():
  load_at = time.perf_counter()
  data = mnist_data.load("train")
  jax.block_until_ready(data)
  print(f"load + transfer of the training split: {time.perf_counter() - load_at:.2f} s")
  task = mnist_task.mnist_mlp()
  sizes = (mnist_task.INPUT_SIZE, 20, 10)

  def loss_with_data(split, params, key):
    index = jax.random.randint(key, (128,), 0, split.labels.shape[0])
    x = split.images[index].reshape(128, -1).astype(jnp.float32) / 255.0
    logits = mnist_task.mlp_logits(params, x, jax.nn.sigmoid)
    return mnist_task.cross_entropy(logits, split.labels[index])

  for problems in (1, 64):
    keys = jax.random.split(jax.random.key(0), problems)
    params = jax.vmap(lambda k: mnist_task.init_mlp(k, sizes, 0.1))(keys)
    closure = jax.vmap(jax.value_and_grad(lambda p, k: task.loss({}, p, k)))
    argument = jax.vmap(jax.value_and_grad(loss_with_data, argnums=1), in_axes=(None, 0, 0))
    for name, fn, args in (
      ("closed over", closure, (params, keys)),
      ("argument", argument, (data, params, keys)),
    ):
      lower, compile_s, step, hlo_mb = _time(fn, *args)
      print(
        f"{problems:3d} problems, data {name:11s}: lower {lower:.2f} s, compile {compile_s:.2f} s, "
        f"step {1e3 * step:.1f} ms, HLO {hlo_mb:.1f} MB"
      )


if __name__ == "__main__":
  main()
