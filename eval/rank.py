r"""Ranks saved optimizers on held-out problems against a tuned baseline: what to ship, one command.

Examples:
  # every checkpoint of a run (checkpoints/step_*) and the best optimizer it saved
  python -m eval.rank --run=runs/mnist_a --output_dir=runs/rank_a
  # the saved optimizers of several runs, and the shipped one
  python -m eval.rank --checkpoint=a=runs/mnist_a --checkpoint=b=runs/mnist_b \
    --checkpoint=shipped=pretrained:mnist_mlp --output_dir=runs/rank_ab

Every candidate and the baseline run the same problems, ``eval.curves.problem_key(seed)``'s
(fold-in 3 of the seed: never a training problem, fold-in 1, nor a validation problem, fold-in 2).
The default seed, 7, is neither ``eval.evaluate``'s test seed (2016) nor its tuning seed (2017),
so choosing a checkpoint here does not peek at the test problems. Candidates are ranked by the
mean loss at ``--step`` (or over steps 1..T, the paper's objective divided by T), each with its
paired difference to the baseline (candidate minus baseline, per problem) and that difference's
standard error. The baseline's learning rate is the paper's grid point (1e-6 * 2^k) with the
lowest mean loss at ``--step`` on ``--tune_problems`` separate problems (seed + 1; 0: on the
ranking problems themselves). Writes ``ranking.md`` and ``ranking.json`` under ``--output_dir``.

The baseline and the candidates run through the evaluation engine (``eval.engine``): one run
for the baseline and its tuning, one for every candidate (a run's checkpoints share a compile).
Problems are split over every device of every process (or ``--num_devices`` of them), as in
``eval.evaluate``; several processes start as there (``--coordinator_address``, ...). Every
process reads the candidates (``eval.run_config.run_candidates``: phi alone, through
``train.Run``); process 0 alone logs and writes.
"""

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from eval import baselines as baselines_lib
from eval import curves as curves_lib
from eval import engine, report, run_config
from eval.report import paired, stderr
from learned_opt.tree_files import atomic_write
from tasks import registry as task_registry
from tasks.base import TaskFamily
from train import command_line, config_flags, distributed

RANK_BY = ("step", "run_mean")


def score(curves: np.ndarray, baseline_curves: np.ndarray, step: int) -> dict:
  """Loss at ``step`` and mean over steps 1..T, each with its paired difference to the baseline.

  Args:
    curves, baseline_curves: losses shaped (problems, T + 1) on the same problems.
  """
  at_step, run_mean = curves[:, step], np.mean(curves[:, 1:], axis=1)
  base_step, base_mean = baseline_curves[:, step], np.mean(baseline_curves[:, 1:], axis=1)
  step_diff, run_diff = paired(at_step, base_step), paired(run_mean, base_mean)
  return {
    "step_loss": float(np.mean(at_step)),
    "step_loss_stderr": stderr(at_step),
    "step_minus_baseline": step_diff[0],
    "step_minus_baseline_stderr": step_diff[1],
    "run_mean": float(np.mean(run_mean)),
    "run_mean_stderr": stderr(run_mean),
    "run_mean_minus_baseline": run_diff[0],
    "run_mean_minus_baseline_stderr": run_diff[1],
    "num_diverged": int(np.sum(~np.all(np.isfinite(curves), axis=1))),
  }


def baseline_curves(
  task: TaskFamily,
  name: str,
  *,
  num_problems: int,
  seed: int,
  tune_problems: int,
  num_steps: int,
  step: int,
  learning_rates: Sequence[float],
  learning_rate: float | None = None,
  lr_batch_size: int | None = None,
  mesh: Mesh | None = None,
) -> tuple[np.ndarray, float, list[float] | None]:
  """The baseline's curves (problems, num_steps + 1) on the ranking problems at its tuned rate.

  One ``engine.run``: the rate is ``learning_rate`` if given, else the grid point with the
  lowest mean loss at ``step`` on ``tune_problems`` problems of ``seed + 1`` (0: on the ranking
  problems, ``num_problems`` of ``seed``).

  Returns:
    ``(curves, learning rate, mean loss at step per grid point or None)``.
  """
  fixed = learning_rate is not None
  tune = engine.Problems(tune_problems, seed + 1) if tune_problems and not fixed else None
  spec = engine.Spec(
    task,
    engine.Problems(num_problems, seed),
    num_steps,
    baselines=(name,),
    tuning=engine.Tuning(
      (learning_rate,) if fixed else tuple(np.asarray(learning_rates, np.float64).tolist()),
      problems=tune,
      step=step,
    ),
    lr_batch=lr_batch_size,
    mesh=mesh,
  )
  (b,) = engine.run(spec, log=lambda s: None)
  grid_means = None if fixed else list(b.record["tuning_scores"].values())
  return b.curves[curves_lib.LOSS], b.learning_rate, grid_means


def rank(
  task: TaskFamily,
  candidates: Sequence[run_config.Candidate],
  *,
  baseline: str = "adam",
  num_problems: int = 64,
  num_steps: int = 100,
  step: int | None = None,
  seed: int = 7,
  tune_problems: int = 16,
  learning_rates: Sequence[float] | None = None,
  baseline_lr: float | None = None,
  rank_by: str = "step",
  lr_batch_size: int | None = None,
  chunk: int | None = None,
  log=print,
  mesh: Mesh | None = None,
) -> dict:
  """Scores every candidate and the tuned baseline on the same held-out problems, best first.

  Returns:
    ``{"task", "num_problems", "num_steps", "step", "seed", "rank_by", "baseline": {...},
    "candidates": [{"rank", "name", "kind", "source", "meta_step", **score(...)}, ...]}``,
    sorted by ``rank_by`` (a candidate with a diverged problem ranks after every finite one).
    ``chunk`` problems at a time run a candidate (``None``: all at once); results do not change.
    Every computation splits its problems over ``mesh`` (default: every device of every
    process); every process calls this together and gets the same results; process 0 logs.
  """
  log = log if distributed.is_writer() else (lambda s: None)
  step = num_steps if step is None else step
  check_settings(baseline, num_problems, num_steps, step, tune_problems, rank_by)
  learning_rates = (
    baselines_lib.paper_learning_rates() if learning_rates is None else np.asarray(learning_rates)
  )
  tune_count = tune_problems if baseline_lr is None else 0
  base, rate, grid_means = baseline_curves(
    task,
    baseline,
    num_problems=num_problems,
    seed=seed,
    tune_problems=tune_count,
    num_steps=num_steps,
    step=step,
    learning_rates=learning_rates,
    learning_rate=baseline_lr,
    lr_batch_size=lr_batch_size,
    mesh=mesh,
  )
  log(f"{baseline}: lr {rate:.3g}, mean loss at step {step} {np.mean(base[:, step]):.4g}")
  candidates = run_config.unique_names(list(candidates))
  spec = engine.Spec(
    task,
    engine.Problems(num_problems, seed),
    num_steps,
    learned={c.name: c.saved for c in candidates},
    problem_batch=chunk,
    mesh=mesh,
  )  # a run's checkpoints share one compile (one optimizer config)
  found = {r.name: r.curves[curves_lib.LOSS] for r in engine.run(spec, log=lambda s: None)}
  rows = []
  for c in candidates:
    kind = run_config.kind_name(c.saved)  # lstm, ntm_bfgs, ...; partition
    row = {"name": c.name, "kind": kind, "source": c.source, "meta_step": c.meta_step}
    row.update(score(found[c.name], base, step))
    rows.append(row)
    log(f"{c.name}: loss at step {step} {row['step_loss']:.4g}")
  metric = "step_loss" if rank_by == "step" else "run_mean"
  rows.sort(key=lambda r: (not math.isfinite(r[metric]) or r["num_diverged"] > 0, r[metric]))
  for i, r in enumerate(rows):
    r["rank"] = i + 1
  base_score = score(base, base, step)
  return {
    "task": dict(task.config),
    "num_problems": num_problems,
    "num_steps": num_steps,
    "step": step,
    "seed": seed,
    "problems": "eval.curves.problem_key(seed): fold-in 3, apart from training (1) and "
    "validation (2)",
    "rank_by": rank_by,
    "baseline": {
      "name": baseline,
      "learning_rate": rate,
      "tuning": {
        "fixed": baseline_lr is not None,
        "problems": "fixed rate"
        if baseline_lr is not None
        else ("separate" if tune_count else "ranking"),
        "num_problems": tune_count or (0 if baseline_lr is not None else num_problems),
        "seed": seed + 1 if tune_count else seed,
        "learning_rates": np.asarray(learning_rates).tolist(),
        "mean_loss_at_step": grid_means,
      },
      **{k: base_score[k] for k in ("step_loss", "step_loss_stderr", "run_mean")},
      **{k: base_score[k] for k in ("run_mean_stderr", "num_diverged")},
    },
    "candidates": rows,
  }


def check_settings(baseline, num_problems, num_steps, step, tune_problems, rank_by) -> None:
  """Raises ValueError naming the flag of a setting the ranking cannot use."""
  if baseline not in baselines_lib.BASELINES:
    raise ValueError(
      f"--baseline={baseline!r} is no baseline; choose from {', '.join(baselines_lib.BASELINES)}."
    )
  if num_problems < 2:
    raise ValueError(f"--num_problems must be >= 2 for a standard error, got {num_problems}.")
  if num_steps < 1:
    raise ValueError(f"--num_steps must be positive, got {num_steps}.")
  if not 1 <= step <= num_steps:
    raise ValueError(f"--step must be in [1, --num_steps={num_steps}], got {step}.")
  if tune_problems < 0:
    raise ValueError(f"--tune_problems must be >= 0, got {tune_problems}.")
  if rank_by not in RANK_BY:
    raise ValueError(f"--rank_by={rank_by!r}; choose from {', '.join(RANK_BY)}.")


RANKING_MD, RANKING_JSON = "ranking.md", "ranking.json"


@dataclasses.dataclass(frozen=True)
class RankConfig:
  """What ``eval.rank`` ranks and how; each field is one flag of the command."""

  run: tuple[str, ...] = config_flags.setting(
    (),
    "A meta-training run's --output_dir: rank its checkpoints and its saved optimizer; repeat "
    "for several.",
    repeat=True,
  )
  checkpoint: tuple[str, ...] = config_flags.setting(
    (),
    "A saved optimizer: DIR, NAME=DIR or pretrained:NAME (listed below); repeat for several.",
    repeat=True,
  )
  checkpoints: bool = config_flags.setting(
    True, "With --run: rank checkpoints/step_*, not only the best."
  )
  task: str | None = config_flags.setting(
    None, "Task family (listed below); default: the one the first candidate trained on."
  )
  task_kwargs: dict | None = config_flags.setting(
    None, "JSON task settings; default: the candidate's."
  )
  baseline: str = config_flags.setting(
    "adam",
    f"Baseline to tune on the grid and pair against, one of {', '.join(baselines_lib.BASELINES)}.",
  )
  baseline_lr: float | None = config_flags.setting(
    None, "Use this learning rate for the baseline, no sweep."
  )
  num_problems: int = config_flags.setting(64, "Held-out problems to rank on.")
  num_steps: int = config_flags.setting(100, "Optimization steps per problem (T).")
  step: int | None = config_flags.setting(None, "Rank by the mean loss at this step; default T.")
  rank_by: str = config_flags.setting("step", "step (loss at --step) or run_mean (steps 1..T).")
  seed: int = config_flags.setting(
    7, "Seed of the ranking problems (not eval.evaluate's 2016/2017)."
  )
  tune_problems: int = config_flags.setting(
    16, "Problems (seed + 1) for the baseline's grid; 0: the ranking problems."
  )
  lr_batch_size: int = config_flags.setting(0, "Learning rates vmapped at once (0: all 30).")
  problem_batch_size: int = config_flags.setting(
    0, "Problems a learned optimizer runs at once (bounds memory; 0: all). Same results."
  )
  output_dir: str = config_flags.setting("", f"Required. Where {RANKING_MD} and {RANKING_JSON} go.")

  def __post_init__(self):
    config_flags.check_types(self)
    if not self.run and not self.checkpoint:
      raise ValueError("Name what to rank: --run=DIR (a run's checkpoints) or --checkpoint=SPEC.")
    if not self.output_dir:
      raise ValueError("--output_dir is required (e.g. --output_dir=runs/rank).")
    step = self.num_steps if self.step is None else self.step
    check_settings(
      self.baseline, self.num_problems, self.num_steps, step, self.tune_problems, self.rank_by
    )
    if self.baseline_lr is not None and not self.baseline_lr > 0:
      raise ValueError(f"--baseline_lr must be positive, got {self.baseline_lr}.")
    for name, what in (("lr_batch_size", "all rates"), ("problem_batch_size", "all problems")):
      if getattr(self, name) < 0:
        raise ValueError(
          f"--{name} must be 0 ({what} at once) or positive, got {getattr(self, name)}."
        )


def main(config: RankConfig) -> None:
  mesh = distributed.current_mesh()  # --num_devices of every process's devices; default all
  writer = distributed.is_writer()
  log = (lambda s: print(s, flush=True)) if writer else (lambda s: None)  # process 0 reports
  try:
    candidates = []
    for run in config.run:
      candidates += run_config.run_candidates(run, config.checkpoints, log)
    candidates += run_config.saved_candidates(config.checkpoint)
    candidates = run_config.unique_names(candidates)
    if not candidates:
      raise ValueError(f"No usable checkpoint in {list(config.run)}; nothing to rank.")
    task_name, task_kwargs = run_config.task_of(
      config.run, config.checkpoint, config.task, config.task_kwargs
    )
    task = task_registry.get(task_name, **task_kwargs)
  # TypeError: bad task settings; FileNotFoundError: no data set, no VGG16 weights.
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise command_line.UsageError(str(e)) from e
  results = rank(
    task,
    candidates,
    baseline=config.baseline,
    num_problems=config.num_problems,
    num_steps=config.num_steps,
    step=config.step,
    seed=config.seed,
    tune_problems=config.tune_problems,
    baseline_lr=config.baseline_lr,
    rank_by=config.rank_by,
    lr_batch_size=config.lr_batch_size or None,
    chunk=config.problem_batch_size or None,
    log=log,
    mesh=mesh,
  )
  if not writer:
    return  # process 0 writes and prints
  os.makedirs(config.output_dir, exist_ok=True)
  table = report.ranking_table(results)
  atomic_write(os.path.join(config.output_dir, RANKING_JSON), json.dumps(results).encode())
  atomic_write(os.path.join(config.output_dir, RANKING_MD), table.encode())
  print(table)
  print(f"Wrote {config.output_dir}/{RANKING_MD} and {config.output_dir}/{RANKING_JSON}")


COMMAND = command_line.Command(
  main,
  RankConfig,
  doc=__doc__,
  distributed=True,
  output=command_line.OutputDir("output_dir", (RANKING_MD, RANKING_JSON), "ranking"),
  help_sections=lambda: [command_line.tasks_section(), command_line.shipped_section("checkpoint")],
)


def run():
  """The command line, ``python -m eval.rank``."""
  COMMAND.run()


if __name__ == "__main__":
  run()
