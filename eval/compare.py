"""Learned optimizers against tuned baselines on the same held-out problems (section 3).

Every baseline runs the paper's whole learning-rate grid as one jitted computation vmapped over
learning rates and problems; the learning rate with the lowest mean final loss is reported.
"""

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import learned_opt
from eval import baselines as baselines_lib
from eval import sharding
from tasks.base import Data, TaskFamily
from train import inner as inner_lib


def problem_key(seed: int) -> jax.Array:
  """Key of the test problems; training (1) and validation (2) use other fold-ins."""
  return jax.random.fold_in(jax.random.key(seed), 3)


def summarize(name: str, kind: str, curves: np.ndarray, learning_rate: float | None) -> dict:
  """One optimizer's results from its loss curves shaped (problems, steps + 1)."""
  finals = curves[:, -1]
  n = finals.shape[0]
  return {
    "name": name,
    "kind": kind,
    "learning_rate": learning_rate,
    "mean_curve": np.mean(curves, axis=0).tolist(),
    "median_curve": np.median(curves, axis=0).tolist(),
    "final_mean": float(np.mean(finals)),
    "final_stderr": float(np.std(finals, ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
    "final_median": float(np.median(finals)),
    "num_diverged": int(np.sum(~np.isfinite(finals))),
    "finals": finals.tolist(),  # per problem, in problem order: for paired comparisons
  }


def rollout_lr_grid(
  task: TaskFamily,
  make_tx: Callable[[jax.Array], optax.GradientTransformation],
  learning_rates: jax.Array,
  data: Data,
  task_params,
  keys: jax.Array,
  num_steps: int,
  lr_batch_size: int | None = None,
) -> jax.Array:
  """Runs ``make_tx(lr)`` for every learning rate on every problem in one computation.

  Args:
    make_tx: ``lr -> optax transformation``; ``lr`` is a traced scalar.
    learning_rates: shaped (lrs,).
    lr_batch_size: learning rates vmapped at once (``lax.map`` over the rest) to bound memory;
      ``None`` vmaps them all.

  Returns:
    Losses shaped (lrs, problems, num_steps + 1).
  """
  run = lambda lr: inner_lib.rollout_batch(task, make_tx(lr), data, task_params, keys, num_steps)
  if lr_batch_size is None:
    return jax.vmap(run)(learning_rates)
  return jax.lax.map(run, learning_rates, batch_size=lr_batch_size)


def sweep(
  task: TaskFamily,
  make_tx,
  learning_rates: Sequence[float],
  task_params,
  keys: jax.Array,
  num_steps: int,
  lr_batch_size: int | None = None,
) -> np.ndarray:
  """Loss curves shaped (lrs, problems, num_steps + 1) of ``make_tx(lr)`` for every rate.

  One jitted computation; the task's data set is one of its arguments, never a constant in it.
  """
  run = jax.jit(
    lambda data, lrs, p, k: rollout_lr_grid(
      task, make_tx, lrs, data, p, k, num_steps, lr_batch_size
    )
  )
  return np.asarray(run(task.data, jnp.asarray(learning_rates, jnp.float32), task_params, keys))


def run_baseline(
  task: TaskFamily,
  name: str,
  task_params,
  keys: jax.Array,
  num_steps: int,
  learning_rates: Sequence[float],
  lr_batch_size: int | None = None,
  tune: tuple | None = None,
) -> dict:
  """Sweeps one baseline over ``learning_rates``; returns the summary at the best one.

  Args:
    tune: ``(task_params, keys)`` of separate tuning problems: the grid is swept on them and only
      the chosen rate runs on the test problems. ``None`` sweeps on the test problems.
  """
  make_tx = baselines_lib.BASELINES[name]
  grid = sweep(
    task, make_tx, learning_rates, *(tune or (task_params, keys)), num_steps, lr_batch_size
  )
  best = baselines_lib.best_learning_rate(grid[:, :, -1])
  rate = float(learning_rates[best])
  curves = (
    grid[best] if tune is None else sweep(task, make_tx, [rate], task_params, keys, num_steps)[0]
  )
  summary = summarize(name, "baseline", curves, rate)
  finals = np.where(np.isfinite(grid[:, :, -1]), grid[:, :, -1], np.inf)
  summary["grid_final_means"] = np.mean(finals, axis=1).tolist()
  return summary


def learned_curves(
  task: TaskFamily, saved: learned_opt.SavedOptimizer, task_params, keys, num_steps: int
) -> np.ndarray:
  """Loss curves shaped (problems, num_steps + 1) of a trained optimizer, through ``as_optax``."""
  run = jax.jit(
    lambda data, phi, p, k: inner_lib.rollout_batch(
      task, learned_opt.as_optax(saved.optimizer, phi), data, p, k, num_steps
    )
  )
  return np.asarray(run(task.data, saved.meta_params, task_params, keys))


def run_learned(
  task: TaskFamily, name: str, saved: learned_opt.SavedOptimizer, task_params, keys, num_steps
) -> dict:
  """Runs a trained optimizer on every problem; its summary as in ``summarize``."""
  curves = learned_curves(task, saved, task_params, keys, num_steps)
  return summarize(name, "learned", curves, None)


def compare(
  task: TaskFamily,
  learned: Mapping[str, learned_opt.SavedOptimizer],
  baselines: Sequence[str],
  *,
  num_problems: int = 256,
  num_steps: int = 100,
  seed: int = 0,
  learning_rates: Sequence[float] | None = None,
  lr_batch_size: int | None = None,
  tune_problems: int = 0,
  log=print,
) -> dict:
  """Evaluates learned optimizers and tuned baselines on the same fresh problems.

  Test problems are ``problem_key(seed)``'s. With ``tune_problems > 0`` each baseline's grid is
  swept on that many separate problems (``problem_key(seed + 1)``) and the chosen rate alone runs
  on the test problems; with 0 the grid is swept on the test problems.

  Returns:
    ``{"task", "num_problems", "num_steps", "seed", "tuning", "optimizers": [summary, ...]}``,
    learned optimizers first, each summary as in ``summarize``.
  """
  unknown = [b for b in baselines if b not in baselines_lib.BASELINES]
  if unknown:
    raise ValueError(
      f"Unknown baselines {unknown}; choose from {', '.join(baselines_lib.BASELINES)}."
    )
  learning_rates = (
    baselines_lib.paper_learning_rates() if learning_rates is None else np.asarray(learning_rates)
  )
  task_params, keys = inner_lib.sample_problems(task, problem_key(seed), num_problems)
  task_params, keys = sharding.shard_problems((task_params, keys))
  tune = None
  if tune_problems:
    tune = sharding.shard_problems(
      inner_lib.sample_problems(task, problem_key(seed + 1), tune_problems)
    )
  results = []
  for name, saved in learned.items():
    results.append(run_learned(task, name, saved, task_params, keys, num_steps))
    log(f"{name}: final loss {results[-1]['final_mean']:.4g}")
  for name in baselines:
    results.append(
      run_baseline(
        task, name, task_params, keys, num_steps, learning_rates, lr_batch_size, tune=tune
      )
    )
    log(
      f"{name}: lr {results[-1]['learning_rate']:.3g}, final loss {results[-1]['final_mean']:.4g}"
    )
  return {
    "task": dict(task.config),
    "num_problems": num_problems,
    "num_steps": num_steps,
    "seed": seed,
    "tuning": {
      "problems": "separate" if tune_problems else "test",
      "num_problems": tune_problems or num_problems,
      "seed": seed + 1 if tune_problems else seed,
      "learning_rates": np.asarray(learning_rates).tolist(),
    },
    "optimizers": results,
  }


def format_table(results: dict) -> str:
  """A plain-text table: optimizer, learning rate, mean final loss +- stderr, median."""
  lines = [
    f"{'optimizer':<16}{'lr':>10}{'final mean':>14}{'stderr':>10}{'median':>12}{'diverged':>10}",
  ]
  for r in sorted(results["optimizers"], key=lambda r: r["final_mean"]):
    lr = "-" if r["learning_rate"] is None else f"{r['learning_rate']:.3g}"
    lines.append(
      f"{r['name']:<16}{lr:>10}{r['final_mean']:>14.4g}{r['final_stderr']:>10.2g}"
      f"{r['final_median']:>12.4g}{r['num_diverged']:>10d}"
    )
  return "\n".join(lines)
