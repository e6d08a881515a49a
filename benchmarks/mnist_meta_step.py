r"""Compile time and meta-step time of the trainer's step on the MNIST base net (run by hand).

  MNIST_DIR=../shared/data/mnist python -m benchmarks.mnist_meta_step [--problems=2,8]

Builds the step exactly as ``train.trainer`` does (``train.meta_step.make_train_step`` with its
truncation workspace, jitted with the state and the workspace donated, ``task.data`` passed as an
argument) for the shipped MNIST recipe
(log_sign preprocessing, output scale 0.1, unroll 20), and prints one JSON line per problem count:
lowering + compile seconds, median seconds per meta-step over ``--repeats`` calls threading the
donated state and workspace, validation compile seconds, and the process's peak resident memory.
"""

import json
import resource
import time

import jax
from absl import app, flags

from train import meta_step, trainer
from train.config import MetaTrainConfig

flags.DEFINE_list("problems", ["2", "8"], "Problems per meta-step.")
flags.DEFINE_integer("repeats", 8, "Timed meta-steps after the first call.")
FLAGS = flags.FLAGS


def measure(num_problems: int) -> dict:
  config = MetaTrainConfig(
    output_dir="/tmp/unused",
    task="mnist_mlp",
    optimizer_kwargs={"preprocess": "log_sign", "output_scale": 0.1},
    num_problems=num_problems,
    unroll=20,
    horizon=100,
  )
  task, optimizer = trainer.build(config)
  state = meta_step.init_state(config, task, optimizer)
  tic = time.perf_counter()
  step = meta_step.make_train_step(config, task, optimizer, workspace=True)
  workspace = meta_step.new_workspace(config, optimizer, state)
  compiled = jax.jit(step, donate_argnums=(0, 2)).lower(state, task.data, workspace).compile()
  compile_s = time.perf_counter() - tic
  state, metrics, workspace = compiled(state, task.data, workspace)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(FLAGS.repeats):
    tic = time.perf_counter()
    state, metrics, workspace = compiled(state, task.data, workspace)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - tic)
  tic = time.perf_counter()
  problems = meta_step.sample_valid_problems(config, task)
  validate = jax.jit(meta_step.make_validate(config, task, optimizer))
  validate.lower(state.meta_params, task.data, *problems).compile()
  return {
    "problems": num_problems,
    "compile_s": round(compile_s, 2),
    "step_s_median": round(sorted(times)[len(times) // 2], 3),
    "validate_compile_s": round(time.perf_counter() - tic, 2),
    "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
  }


def main(argv):
  del argv
  print(json.dumps({"devices": [str(d) for d in jax.devices()], "jax": jax.__version__}))
  for problems in FLAGS.problems:
    print(json.dumps(measure(int(problems))), flush=True)


if __name__ == "__main__":
  app.run(main)
