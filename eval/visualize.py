r"""What a learned optimizer does to one coordinate (section 4, Figures 9 and 10).

Follows one optimization trajectory of the learned optimizer and, at every step, records for a
chosen coordinate (a) the update each optimizer proposes given the same gradient history
(Figure 9), and (b) the update each would propose as a function of the current gradient value,
the history held fixed (Figure 10). The comparison optimizers (SGD, Adam) see exactly the
gradients of the learned optimizer's trajectory.

Example:
  python -m eval.visualize --checkpoint=runs/quadratic --output_dir=runs/quadratic/vis
"""

import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from jax.flatten_util import ravel_pytree

import learned_opt
from tasks.base import TaskFamily
from train import inner as inner_lib


class UpdateTraces(NamedTuple):
  """Updates proposed to one coordinate along one trajectory, per optimizer name."""

  proposed: dict  # name -> (steps,): the update proposed to the coordinate at each step
  gradient: jax.Array  # (steps,): the coordinate's gradient at each step
  gradient_grid: jax.Array  # (grid,): gradient values probed
  response: dict  # name -> (steps, grid): the update had the gradient been each grid value


def trace_updates(
  task: TaskFamily,
  optimizers: dict,
  follow: str,
  data,
  task_params,
  key: jax.Array,
  num_steps: int,
  coordinate: int,
  gradient_grid: jax.Array,
) -> UpdateTraces:
  """Runs the trajectory of ``optimizers[follow]`` and traces every optimizer on it.

  Args:
    optimizers: name -> optax transformation; all see the same gradients.
    follow: the optimizer whose updates move the parameters (``train.inner``'s step).
    data: the task's data set (``task.data``).
    coordinate: index into the flattened (``ravel_pytree``) parameter vector.
    gradient_grid: gradient values to probe, shaped (grid,).
  """
  init_key, data_key = jax.random.split(key)
  start = inner_lib.start(task, optimizers[follow], data, task_params, init_key, data_key)
  flat, unravel = ravel_pytree(start.params)
  if not 0 <= coordinate < flat.size:
    raise ValueError(f"coordinate={coordinate} is outside the {flat.size} parameters.")
  names = list(optimizers)

  def with_value(grads, value):
    return unravel(ravel_pytree(grads)[0].at[coordinate].set(value))

  def coordinate_of(tree):
    return ravel_pytree(tree)[0][coordinate]

  def step(carry, _):
    inner, states = carry
    _, grads = inner_lib.gradient(task, data, inner)
    proposed, response, new_states = {}, {}, {}
    for name in names:
      tx, state = optimizers[name], states[name]
      updates, new_states[name] = tx.update(grads, state, inner.params)
      proposed[name] = coordinate_of(updates)
      probe = lambda v, tx=tx, state=state: coordinate_of(
        tx.update(with_value(grads, v), state, inner.params)[0]
      )
      response[name] = jax.vmap(probe)(gradient_grid)
    inner = inner_lib.apply(optimizers[follow], inner, grads)
    return (inner, new_states), (proposed, coordinate_of(grads), response)

  states = {name: optimizers[name].init(start.params) for name in names}
  _, (proposed, gradient, response) = jax.lax.scan(step, (start, states), length=num_steps)
  return UpdateTraces(proposed, gradient, gradient_grid, response)


def plot_traces(traces: UpdateTraces, path: str, steps=(0, 1, 10, 20)) -> None:
  """Figure 9 (updates over steps) beside Figure 10 (update vs gradient at a few steps)."""
  from eval.plots import plt

  fig, axes = plt.subplots(1, 1 + len(steps), figsize=(4 * (1 + len(steps)), 3.2), dpi=110)
  for name, values in traces.proposed.items():
    axes[0].plot(values, label=name)
  axes[0].set(xlabel="step", ylabel="update", title="proposed updates")
  axes[0].legend(fontsize=8)
  for ax, step in zip(axes[1:], steps, strict=True):
    step = min(step, len(traces.gradient) - 1)
    for name, values in traces.response.items():
      ax.plot(traces.gradient_grid, values[step], label=name)
    ax.axvline(float(traces.gradient[step]), color="gray", linewidth=0.8, linestyle=":")
    ax.set(xlabel="gradient", ylabel="update", title=f"step {step}")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


FLAGS = flags.FLAGS


def define_flags():
  """Flags of the command; defined only when run as one, so importing this module is free."""
  flags.DEFINE_string(
    "checkpoint", None, "Saved learned optimizer: a directory or pretrained:NAME."
  )
  flags.DEFINE_string("output_dir", None, "Where traces.json and updates.png go.")
  flags.DEFINE_string("task", None, "Task family; default: the checkpoint's.")
  flags.DEFINE_integer("num_steps", 32, "Steps of the trajectory (the paper shows 32).")
  flags.DEFINE_integer("coordinate", 0, "Flattened index of the traced parameter.")
  flags.DEFINE_float("sgd_lr", 0.01, "SGD learning rate for the comparison.")
  flags.DEFINE_float("adam_lr", 0.1, "Adam learning rate for the comparison.")
  flags.DEFINE_float("grad_range", 10.0, "Probe gradients in [-grad_range, grad_range].")
  flags.DEFINE_integer("seed", 0, "Seed of the problem.")


def main(argv):
  del argv
  if not FLAGS.checkpoint:
    raise app.UsageError("--checkpoint is required (a directory or pretrained:NAME).")
  from eval import run_config
  from tasks import registry as task_registry

  try:
    run_config.check_output_dir(FLAGS.output_dir)
    path = run_config.resolve(FLAGS.checkpoint)
    (saved,) = run_config.load_all([(None, path)]).values()
    name, kwargs = run_config.task_settings([path], FLAGS.task, None)
    task = task_registry.get(name, **kwargs)
  except (ValueError, TypeError) as e:
    raise app.UsageError(str(e)) from e
  optimizers = {
    "LSTM": learned_opt.as_optax(saved),
    "ADAM": optax.adam(FLAGS.adam_lr),
    "SGD": optax.sgd(FLAGS.sgd_lr),
  }
  task_params, keys = inner_lib.sample_problems(task, jax.random.key(FLAGS.seed), 1)
  grid = jnp.linspace(-FLAGS.grad_range, FLAGS.grad_range, 101)
  run = jax.jit(
    lambda d, p, k: trace_updates(
      task, optimizers, "LSTM", d, p, k, FLAGS.num_steps, FLAGS.coordinate, grid
    )
  )
  traces = run(task.data, jax.tree.map(lambda x: x[0], task_params), keys[0])
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  with open(os.path.join(FLAGS.output_dir, "traces.json"), "w") as f:
    json.dump(jax.tree.map(lambda x: np.asarray(x).tolist(), traces._asdict()), f)
  plot_traces(traces, os.path.join(FLAGS.output_dir, "updates.png"))
  print(f"Wrote {FLAGS.output_dir}/traces.json and {FLAGS.output_dir}/updates.png")


if __name__ == "__main__":
  define_flags()
  jax.config.parse_flags_with_absl()
  app.run(main)
