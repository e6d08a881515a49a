"""Learned optimizers against tuned baselines on the same held-out problems (section 3).

Every baseline runs the paper's whole learning-rate grid as one jitted computation vmapped over
learning rates and problems; the learning rate with the lowest mean final loss is reported.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import learned_opt
from eval import baselines as baselines_lib
from eval import rollout as rollout_lib
from eval import sharding
from tasks.base import TaskFamily


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


def run_baseline(
  task: TaskFamily,
  name: str,
  task_params,
  keys: jax.Array,
  num_steps: int,
  learning_rates: Sequence[float],
  lr_batch_size: int | None = None,
) -> dict:
  """Sweeps one baseline over ``learning_rates``; returns the summary at the best one."""
  make_tx = baselines_lib.BASELINES[name]
  run = jax.jit(
    lambda lrs, p, k: rollout_lib.rollout_lr_grid(
      task, make_tx, lrs, p, k, num_steps, lr_batch_size
    )
  )
  curves = run(jnp.asarray(learning_rates, jnp.float32), task_params, keys)
  best = baselines_lib.best_learning_rate(curves[:, :, -1])
  summary = summarize(name, "baseline", np.asarray(curves[best]), float(learning_rates[best]))
  finals = np.asarray(curves[:, :, -1])
  summary["grid_final_means"] = [
    float(np.mean(np.where(np.isfinite(f), f, np.inf))) for f in finals
  ]
  return summary


def run_learned(
  task: TaskFamily, name: str, saved: learned_opt.SavedOptimizer, task_params, keys, num_steps
) -> dict:
  """Runs a trained optimizer through its optax face on every problem."""
  run = jax.jit(
    lambda phi, p, k: rollout_lib.rollout_batch(
      task, learned_opt.as_optax(saved.optimizer, phi), p, k, num_steps
    )
  )
  curves = np.asarray(run(saved.meta_params, task_params, keys))
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
  log=print,
) -> dict:
  """Evaluates learned optimizers and tuned baselines on the same fresh problems.

  Returns:
    ``{"task", "num_problems", "num_steps", "seed", "optimizers": [summary, ...]}``, learned
    optimizers first, each summary as in ``summarize``.
  """
  unknown = [b for b in baselines if b not in baselines_lib.BASELINES]
  if unknown:
    raise ValueError(
      f"Unknown baselines {unknown}; choose from {', '.join(baselines_lib.BASELINES)}."
    )
  learning_rates = (
    baselines_lib.paper_learning_rates() if learning_rates is None else np.asarray(learning_rates)
  )
  task_params, keys = rollout_lib.sample_problems(task, problem_key(seed), num_problems)
  task_params, keys = sharding.shard_problems((task_params, keys))
  results = []
  for name, saved in learned.items():
    results.append(run_learned(task, name, saved, task_params, keys, num_steps))
    log(f"{name}: final loss {results[-1]['final_mean']:.4g}")
  for name in baselines:
    results.append(
      run_baseline(task, name, task_params, keys, num_steps, learning_rates, lr_batch_size)
    )
    log(
      f"{name}: lr {results[-1]['learning_rate']:.3g}, final loss {results[-1]['final_mean']:.4g}"
    )
  return {
    "task": dict(task.config),
    "num_problems": num_problems,
    "num_steps": num_steps,
    "seed": seed,
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
