r"""Evaluates trained optimizers against the paper's tuned baselines on fresh problems.

Example:
  python -m eval.evaluate --checkpoint=runs/quadratic --output_dir=runs/eval
  python -m eval.evaluate --checkpoint=pretrained:mnist_mlp --output_dir=runs/eval_mnist

Writes ``results.json`` (per optimizer: name, chosen learning rate or null, mean loss curve,
final loss mean and standard error), ``curves.png`` and prints a table.
"""

import json
import os

import jax
from absl import app, flags

import learned_opt
from eval import baselines as baselines_lib
from eval import compare, plots, run_config
from learned_opt.tree_files import atomic_write
from tasks import registry as task_registry
from train import command_line, distributed

flags.DEFINE_multi_string(
  "checkpoint",
  [],
  "Saved optimizer: a directory or pretrained:NAME (NAME one of "
  f"{', '.join(learned_opt.pretrained_names())}), optionally LABEL=...; repeat for several. "
  "Unlabelled ones are named by their kind (lstm, ntm_bfgs, ...). None: the baselines alone, "
  "on --task.",
)
flags.DEFINE_string(
  "task",
  None,
  f"Task family ({', '.join(task_registry.names())}); default: the one the first checkpoint "
  "trained on. MNIST is read from $MNIST_DIR, CIFAR-10 from $CIFAR10_DIR.",
)
flags.DEFINE_string(
  "task_kwargs", None, "JSON task settings; default: the checkpoint's (see meta_train --help)."
)
flags.DEFINE_list(
  "baselines",
  list(baselines_lib.BASELINES),
  f"Baselines to tune and compare, from {', '.join(baselines_lib.BASELINES)}.",
)
flags.DEFINE_integer("num_problems", 256, "Fresh test problems.")
flags.DEFINE_integer("num_steps", 100, "Optimization steps per problem.")
flags.DEFINE_integer("seed", 2016, "Seed of the test problems (a stream apart from training).")
flags.DEFINE_integer("lr_batch_size", 0, "Learning rates vmapped at once (0: all 30).")
flags.DEFINE_integer(
  "problem_batch_size",
  0,
  "Problems a learned optimizer runs at once, the rest in further chunks (bounds memory: 256 "
  "MNIST problems need ~4.7 GiB at once, ~0.6 GiB in chunks of 32); 0: all at once. Same results.",
)
flags.DEFINE_string("output_dir", None, "Required. Where results.json and curves.png go.")
distributed.define_flags()  # multi-process start-up (--coordinator_address, ...), --num_devices

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for flag in ("num_problems", "num_steps"):
    if FLAGS[flag].value <= 0:
      raise app.UsageError(f"--{flag} must be positive, got {FLAGS[flag].value}.")
  if FLAGS.problem_batch_size < 0:
    raise app.UsageError(
      f"--problem_batch_size must be 0 (all problems at once) or positive, got "
      f"{FLAGS.problem_batch_size}."
    )
  try:
    distributed.initialize_from_flags()  # before any JAX computation
    mesh = distributed.mesh_from_flags()  # --num_devices of every process's devices; default all
    run_config.check_output_dir(FLAGS.output_dir)
    specs = run_config.parse_checkpoint_specs(FLAGS.checkpoint)
    learned = run_config.load_all(specs)
    task_name, task_kwargs = run_config.task_settings(
      [path for _, path in specs], FLAGS.task, FLAGS.task_kwargs
    )
    task = task_registry.get(task_name, **task_kwargs)
  except (ValueError, TypeError) as e:  # json errors are ValueErrors; bad kwargs TypeErrors
    raise app.UsageError(str(e)) from e
  results = compare.compare(
    task,
    learned,
    FLAGS.baselines,
    num_problems=FLAGS.num_problems,
    num_steps=FLAGS.num_steps,
    seed=FLAGS.seed,
    lr_batch_size=FLAGS.lr_batch_size or None,
    mesh=mesh,
    problem_batch_size=FLAGS.problem_batch_size or None,
  )  # problems split over the mesh's devices of every process (eval.sharding)
  if not distributed.is_writer():
    return  # process 0 writes and prints
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  atomic_write(os.path.join(FLAGS.output_dir, "results.json"), json.dumps(results).encode())
  plots.plot_curves(results, os.path.join(FLAGS.output_dir, "curves.png"))
  print(compare.format_table(results))
  print(f"Wrote {FLAGS.output_dir}/results.json and {FLAGS.output_dir}/curves.png")


def run():
  """The console script's entry point (``learned-opt-train`` / ``learned-opt-eval``)."""
  jax.config.parse_flags_with_absl()
  command_line.run(main)


if __name__ == "__main__":
  run()
