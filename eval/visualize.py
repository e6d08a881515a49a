r"""What a learned optimizer does to one coordinate (section 4, Figures 9 and 10).

Follows one optimization trajectory of the learned optimizer and, at every step, records for a
chosen coordinate (a) the update each optimizer proposes given the same gradient history
(Figure 9), and (b) the update each would propose as a function of the current gradient value,
the history held fixed (Figure 10). The comparison optimizers (SGD, Adam) see exactly the
gradients of the learned optimizer's trajectory.

Example:
  python -m eval.visualize --checkpoint=runs/quadratic --output_dir=runs/quadratic/vis
"""

import dataclasses
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import learned_opt
from tasks.base import TaskFamily
from train import command_line, config_flags
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


def plot_traces(
  traces: UpdateTraces, path: str, steps=(0, 1, 10, 20), title: str = "", followed: str = ""
) -> None:
  """Figure 9 (updates along the trajectory) above Figure 10 (update against gradient).

  Args:
    steps: the steps whose response curves get a panel each (clipped to the trajectory).
    title: the figure's title.
    followed: the optimizer whose trajectory this is, for the subtitle.
  """
  from eval.plots import plt

  names = sorted(traces.proposed, key=lambda name: name != followed)  # the followed one first
  colors = {name: f"C{i}" for i, name in enumerate(names)}
  fig = plt.figure(figsize=(12, 7.5), dpi=110)
  grid = fig.add_gridspec(2, len(steps), height_ratios=(1, 1), hspace=0.6, wspace=0.3)
  over_steps = fig.add_subplot(grid[0, :])
  for name in names:
    over_steps.plot(traces.proposed[name], color=colors[name], marker=".", label=name)
  over_steps.axhline(0.0, color="black", linewidth=0.6)
  gradient_axis = over_steps.twinx()  # gradients are often 10-100x the updates: own scale
  gradient_axis.plot(
    traces.gradient, color="gray", linestyle=":", label="gradient seen (right axis)"
  )
  gradient_axis.set_ylabel("gradient", color="gray")
  over_steps.set(
    xlabel="step of the trajectory",
    ylabel="update to the coordinate",
    title="(a) The update each optimizer proposes, given the same gradient history (Fig. 9)",
  )
  over_steps.grid(alpha=0.3)
  for column, step in enumerate(steps):
    step = min(step, len(traces.gradient) - 1)
    ax = fig.add_subplot(grid[1, column])
    for name in names:
      ax.plot(traces.gradient_grid, traces.response[name][step], color=colors[name])
    ax.axvline(float(traces.gradient[step]), color="gray", linewidth=0.9, linestyle=":")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set(xlabel=f"gradient at step {step}", title=f"step {step}")
    if column == 0:
      ax.set_ylabel("proposed update")
    ax.grid(alpha=0.3)
  fig.text(
    0.5,
    0.445,
    "(b) The update as a function of the current gradient, the history held fixed (Fig. 10); "
    "dotted: the gradient actually seen",
    ha="center",
    fontsize=11,
  )
  handles, labels = over_steps.get_legend_handles_labels()
  more_handles, more_labels = gradient_axis.get_legend_handles_labels()
  handles, labels = handles + more_handles, labels + more_labels
  fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 0.945))
  subtitle = f", along the trajectory of the {followed} optimizer" if followed else ""
  fig.suptitle((title or "Updates to one coordinate") + subtitle, fontsize=13, y=0.99)
  fig.subplots_adjust(top=0.85, bottom=0.08, left=0.07, right=0.94)
  fig.savefig(path)
  plt.close(fig)


TRACES_FILE, FIGURE_FILE = "traces.json", "updates.png"


@dataclasses.dataclass(frozen=True)
class VisualizeConfig:
  """What ``eval.visualize`` traces; each field is one flag of the command."""

  checkpoint: str = config_flags.setting(
    "", "Required. Saved learned optimizer: a directory or pretrained:NAME."
  )
  output_dir: str = config_flags.setting("", f"Required. Where {TRACES_FILE} and {FIGURE_FILE} go.")
  task: str | None = config_flags.setting(
    None,
    "Task family (quadratic, mnist_mlp, ...); default: the one the checkpoint trained on. MNIST "
    "is read from $MNIST_DIR, CIFAR-10 from $CIFAR10_DIR.",
  )
  num_steps: int = config_flags.setting(32, "Steps of the trajectory (the paper shows 32).")
  coordinate: int = config_flags.setting(0, "Flattened index of the traced parameter.")
  sgd_lr: float = config_flags.setting(0.01, "SGD learning rate for the comparison.")
  adam_lr: float = config_flags.setting(0.1, "Adam learning rate for the comparison.")
  grad_range: float = config_flags.setting(10.0, "Probe gradients in [-grad_range, grad_range].")
  seed: int = config_flags.setting(0, "Seed of the problem.")

  def __post_init__(self):
    config_flags.check_types(self)
    if not self.checkpoint:
      raise ValueError("--checkpoint is required (a directory or pretrained:NAME).")
    if not self.output_dir:
      raise ValueError("--output_dir is required (e.g. --output_dir=runs/quadratic/vis).")
    for name in ("num_steps", "sgd_lr", "adam_lr", "grad_range"):
      if not getattr(self, name) > 0:
        raise ValueError(f"--{name} must be positive, got {getattr(self, name)!r}.")
    if self.coordinate < 0:
      raise ValueError(f"--coordinate={self.coordinate} is not an index; give one >= 0.")


def main(config: VisualizeConfig) -> None:
  from eval import run_config
  from tasks import registry as task_registry

  try:
    path = run_config.resolve(config.checkpoint)
    (saved,) = run_config.load_all([(None, path)]).values()
    name, kwargs = run_config.task_settings([path], config.task, None)
    task = task_registry.get(name, **kwargs)
  except (ValueError, TypeError, FileNotFoundError) as e:  # no data set, no VGG16 weights
    raise command_line.UsageError(str(e)) from e
  learned = f"learned ({saved.optimizer.config.get('kind', 'optimizer')})"
  optimizers = {
    learned: learned_opt.as_optax(saved),
    f"Adam (lr {config.adam_lr:g})": optax.adam(config.adam_lr),
    f"SGD (lr {config.sgd_lr:g})": optax.sgd(config.sgd_lr),
  }
  task_params, keys = inner_lib.sample_problems(task, jax.random.key(config.seed), 1)
  grid = jnp.linspace(-config.grad_range, config.grad_range, 101)
  run = jax.jit(
    lambda d, p, k: trace_updates(
      task, optimizers, learned, d, p, k, config.num_steps, config.coordinate, grid
    )
  )
  try:
    traces = run(task.data, jax.tree.map(lambda x: x[0], task_params), keys[0])
  except ValueError as e:  # a --coordinate outside the parameters
    raise command_line.UsageError(f"--coordinate: {e}") from e
  os.makedirs(config.output_dir, exist_ok=True)
  with open(os.path.join(config.output_dir, TRACES_FILE), "w") as f:
    json.dump(jax.tree.map(lambda x: np.asarray(x).tolist(), traces._asdict()), f)
  title = f"Coordinate {config.coordinate} of a {name} problem, seed {config.seed}"
  figure = os.path.join(config.output_dir, FIGURE_FILE)
  plot_traces(traces, figure, title=title, followed=learned)
  print(f"Wrote {config.output_dir}/{TRACES_FILE} and {figure}")


COMMAND = command_line.Command(
  main,
  VisualizeConfig,
  doc=__doc__,
  output=command_line.OutputDir("output_dir", (TRACES_FILE, FIGURE_FILE), "visualization"),
  help_sections=lambda: [command_line.tasks_section(), command_line.shipped_section("checkpoint")],
)


if __name__ == "__main__":
  COMMAND.run()
