"""Learned optimizers against tuned baselines on the same held-out problems (section 3).

Every baseline runs the paper's whole learning-rate grid as one jitted computation vmapped over
learning rates and problems; the learning rate with the lowest mean final loss is reported. The
problems are split over a mesh (by default every device of every process, ``eval.sharding``),
padded to a multiple of its devices; problems never interact, so results equal a one-device run.
"""

from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh

import learned_opt
from eval import baselines as baselines_lib
from eval import sharding, stats
from tasks.base import Data, TaskFamily
from train import distributed
from train import inner as inner_lib


def problem_key(seed: int) -> jax.Array:
  """Key of the test problems; training (1) and validation (2) use other fold-ins."""
  return jax.random.fold_in(jax.random.key(seed), 3)


def summarize(name: str, kind: str, curves: np.ndarray, learning_rate: float | None) -> dict:
  """One optimizer's results from its loss curves shaped (problems, steps + 1)."""
  finals = curves[:, -1]
  return {
    "name": name,
    "kind": kind,
    "learning_rate": learning_rate,
    "mean_curve": np.mean(curves, axis=0).tolist(),
    "median_curve": np.median(curves, axis=0).tolist(),
    "final_mean": float(np.mean(finals)),
    "final_stderr": stats.stderr(finals),
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
  mesh: Mesh | None = None,
) -> np.ndarray:
  """Loss curves shaped (lrs, problems, num_steps + 1) of ``make_tx(lr)`` for every rate.

  One jitted computation, its problems split over ``mesh`` (default: every device of every
  process); the task's data set is one of its arguments, never a constant in it. Every process
  calls it together and gets the whole grid.
  """
  problems = (task_params, keys)
  (task_params, keys), count, mesh = sharding.place_problems(
    problems, mesh or sharding.problems_mesh()
  )
  whole = distributed.replicated(mesh)
  lrs = distributed.put(np.asarray(learning_rates, np.float32), whole)
  run = jax.jit(
    lambda data, lrs, p, k: rollout_lr_grid(
      task, make_tx, lrs, data, p, k, num_steps, lr_batch_size
    )
  )
  grid = run(distributed.put(task.data, whole), lrs, task_params, keys)
  return distributed.to_host(grid)[:, :count]


def run_baseline(
  task: TaskFamily,
  name: str,
  task_params,
  keys: jax.Array,
  num_steps: int,
  learning_rates: Sequence[float],
  lr_batch_size: int | None = None,
  tune: tuple | None = None,
  mesh: Mesh | None = None,
) -> dict:
  """Sweeps one baseline over ``learning_rates``; returns the summary at the best one.

  Args:
    tune: ``(task_params, keys)`` of separate tuning problems: the grid is swept on them and only
      the chosen rate runs on the test problems. ``None`` sweeps on the test problems.
    mesh: as in ``sweep``.
  """
  make_tx = baselines_lib.BASELINES[name]
  problems = tune or (task_params, keys)
  grid = sweep(task, make_tx, learning_rates, *problems, num_steps, lr_batch_size, mesh)
  best = baselines_lib.best_learning_rate(grid[:, :, -1])
  rate = float(learning_rates[best])
  curves = (
    grid[best]
    if tune is None
    else sweep(task, make_tx, [rate], task_params, keys, num_steps, mesh=mesh)[0]
  )
  summary = summarize(name, "baseline", curves, rate)
  finals = np.where(np.isfinite(grid[:, :, -1]), grid[:, :, -1], np.inf)
  summary["grid_final_means"] = np.mean(finals, axis=1).tolist()
  return summary


def learned_rollout(task: TaskFamily, optimizer, num_steps: int) -> Callable:
  """``(data, phi, task_params, keys) -> losses (problems, num_steps + 1)`` through ``as_optax``.

  One jitted function: optimizers of one config (a run's checkpoints) share it, and so one
  compile per problem-chunk shape and mesh, when it is passed to ``learned_curves``.
  """
  return jax.jit(
    lambda data, phi, p, k: inner_lib.rollout_batch(
      task, learned_opt.as_optax(optimizer, phi), data, p, k, num_steps
    )
  )


def learned_curves(
  task: TaskFamily,
  saved: learned_opt.SavedOptimizer,
  task_params,
  keys,
  num_steps: int,
  mesh: Mesh | None = None,
  problem_batch_size: int | None = None,
  rollout: Callable | None = None,
) -> np.ndarray:
  """Loss curves shaped (problems, num_steps + 1) of a trained optimizer, through ``as_optax``.

  Problems split over ``mesh`` as in ``sweep``; phi replicated.

  Args:
    problem_batch_size: problems run at once, the rest in further chunks of as many, to bound
      memory (a coordinatewise LSTM keeps its state for every coordinate of every problem);
      ``None`` runs them all at once. Problems never interact: the curves do not change.
    rollout: ``learned_rollout(task, saved.optimizer, num_steps)``, to reuse its compiles;
      default: a new one.
  """
  rollout = rollout or learned_rollout(task, saved.optimizer, num_steps)
  mesh = mesh or sharding.problems_mesh()
  count = int(np.shape(keys)[0])
  chunk = min(problem_batch_size or count, count)
  placed, parts = {}, []  # data and phi on each mesh a chunk runs on
  for start in range(0, count, chunk):
    part = jax.tree.map(lambda x, s=start: x[s : s + chunk], (task_params, keys))
    part, part_count, part_mesh = sharding.place_problems(part, mesh)
    if part_mesh not in placed:
      whole = distributed.replicated(part_mesh)
      placed[part_mesh] = distributed.put((task.data, saved.meta_params), whole)
    parts.append(distributed.to_host(rollout(*placed[part_mesh], *part))[:part_count])
  return np.concatenate(parts)


def run_learned(
  task: TaskFamily,
  name: str,
  saved: learned_opt.SavedOptimizer,
  task_params,
  keys,
  num_steps,
  mesh: Mesh | None = None,
  problem_batch_size: int | None = None,
) -> dict:
  """Runs a trained optimizer on every problem (``learned_curves``); its ``summarize``."""
  curves = learned_curves(task, saved, task_params, keys, num_steps, mesh, problem_batch_size)
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
  mesh: Mesh | None = None,
  problem_batch_size: int | None = None,
) -> dict:
  """Evaluates learned optimizers and tuned baselines on the same fresh problems.

  Test problems are ``problem_key(seed)``'s. With ``tune_problems > 0`` each baseline's grid is
  swept on that many separate problems (``problem_key(seed + 1)``) and the chosen rate alone runs
  on the test problems; with 0 the grid is swept on the test problems. Every computation is
  split over ``mesh`` (default: every device of every process); every process calls this
  together and gets the same results. A learned optimizer runs ``problem_batch_size`` problems
  at a time (``learned_curves``; None: all at once).

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
  mesh = mesh or sharding.problems_mesh()
  log = log if distributed.is_writer() else (lambda s: None)  # process 0 reports
  task_params, keys = inner_lib.sample_problems(task, problem_key(seed), num_problems)
  tune = None
  if tune_problems:
    tune = inner_lib.sample_problems(task, problem_key(seed + 1), tune_problems)
  results = []
  for name, saved in learned.items():
    results.append(
      run_learned(task, name, saved, task_params, keys, num_steps, mesh, problem_batch_size)
    )
    log(f"{name}: final loss {results[-1]['final_mean']:.4g}")
  for name in baselines:
    results.append(
      run_baseline(
        task, name, task_params, keys, num_steps, learning_rates, lr_batch_size, tune, mesh
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
