"""Learned optimizers against tuned baselines on the same held-out problems (section 3).

``compare`` is the engine (``eval.engine``) with ``eval.evaluate``'s settings and the summaries
of ``eval.report``: every baseline runs the paper's learning-rate grid as one jitted computation
vmapped over learning rates and problems, and the learning rate with the lowest mean final loss
is reported. ``sweep`` runs one baseline over a grid of learning rates on given problems.
"""

from collections.abc import Mapping, Sequence

import numpy as np
from jax.sharding import Mesh

import learned_opt
from eval import baselines as baselines_lib
from eval import curves as curves_lib
from eval import engine, report
from tasks.base import TaskFamily
from train import distributed


def sweep(
  task, make_tx, learning_rates, task_params, keys, num_steps, lr_batch_size=None, mesh=None
):
  """Loss curves shaped (lrs, problems, num_steps + 1) of ``make_tx(lr)`` for every rate.

  One jitted computation, its problems split over ``mesh`` (default: every device of every
  process). Every process calls it together and gets the whole grid.
  """
  fn = curves_lib.compiled(task, make_tx, num_steps, (), True, lr_batch_size)
  rates = np.asarray(learning_rates, np.float32)
  return curves_lib.curves(task, fn, rates, task_params, keys, mesh=mesh, grid=True)[
    curves_lib.LOSS
  ]


def summaries(results: Sequence[engine.Result]) -> list[dict]:
  """``report.summarize`` of each engine result, with a baseline's ``grid_final_means``."""
  out = []
  for r in results:
    summary = report.summarize(r.name, r.kind, r.curves[curves_lib.LOSS], r.learning_rate)
    if r.record.get("tuning_scores"):
      summary["grid_final_means"] = list(r.record["tuning_scores"].values())
    out.append(summary)
  return out


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
  cache_dir: str | None = None,
  reuse: bool = True,
) -> dict:
  """Evaluates learned optimizers and tuned baselines on the same fresh problems.

  Test problems are ``problem_key(seed)``'s. With ``tune_problems > 0`` each baseline's grid is
  swept on that many separate problems (``problem_key(seed + 1)``) and the chosen rate alone runs
  on the test problems; with 0 the grid is swept on the test problems. Every computation is
  split over ``mesh``; every process calls this together and gets the same results. Problems run
  ``problem_batch_size`` at a time (None: all at once). ``cache_dir``/``reuse``: as in
  ``engine.Spec``.

  Returns:
    ``{"task", "num_problems", "num_steps", "seed", "tuning", "optimizers": [summary, ...]}``,
    learned optimizers first, each summary as in ``report.summarize``.
  """
  rates = baselines_lib.paper_learning_rates() if learning_rates is None else learning_rates
  rates = np.asarray(rates).tolist()
  spec = engine.Spec(
    task,
    engine.Problems(num_problems, seed),
    num_steps,
    learned=learned,
    baselines=tuple(baselines),
    tuning=engine.Tuning(
      tuple(rates), problems=engine.Problems(tune_problems, seed + 1) if tune_problems else None
    ),
    problem_batch=problem_batch_size,
    lr_batch=lr_batch_size,
    mesh=mesh,
    cache_dir=cache_dir,
    reuse=reuse,
  )
  engine.check(spec)
  say = log if distributed.is_writer() else (lambda s: None)  # process 0 reports
  found = engine.run(spec, log=say)
  reused = [r.name for r in found if r.kind == "baseline" and r.record.get("reused")]
  results = summaries(found)
  return {
    "task": dict(task.config),
    "num_problems": num_problems,
    "num_steps": num_steps,
    "seed": seed,
    "tuning": {
      "problems": "separate" if tune_problems else "test",
      "num_problems": tune_problems or num_problems,
      "seed": seed + 1 if tune_problems else seed,
      "learning_rates": rates,
    },
    "optimizers": results,
    **({"reused_baselines": reused} if reused else {}),  # from the cache (``engine.Spec``)
  }
