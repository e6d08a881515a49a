r"""Ranks saved optimizers on held-out problems against a tuned baseline: what to ship, one command.

Examples:
  # every checkpoint of a run (checkpoints/step_*) and the best optimizer it saved
  python -m eval.rank --run=runs/mnist_a --output_dir=runs/rank_a
  # the saved optimizers of several runs, and the shipped one
  python -m eval.rank --checkpoint=a=runs/mnist_a --checkpoint=b=runs/mnist_b \
    --checkpoint=shipped=pretrained:mnist_mlp --output_dir=runs/rank_ab

Every candidate and the baseline run the same problems, ``eval.compare.problem_key(seed)``'s
(fold-in 3 of the seed: never a training problem, fold-in 1, nor a validation problem, fold-in 2).
The default seed, 7, is neither ``eval.evaluate``'s test seed (2016) nor its tuning seed (2017),
so choosing a checkpoint here does not peek at the test problems. Candidates are ranked by the
mean loss at ``--step`` (or over steps 1..T, the paper's objective divided by T), each with its
paired difference to the baseline (candidate minus baseline, per problem) and that difference's
standard error. The baseline's learning rate is the paper's grid point (1e-6 * 2^k) with the
lowest mean loss at ``--step`` on ``--tune_problems`` separate problems (seed + 1; 0: on the
ranking problems themselves). Writes ``ranking.md`` and ``ranking.json`` under ``--output_dir``.

Problems are split over every device of every process (or ``--num_devices`` of them), as in
``eval.evaluate``; several processes start as there (``--coordinator_address``, ...). Every
process reads the candidates; process 0 alone logs and writes.
"""

import json
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import app, flags
from jax.sharding import Mesh

import learned_opt
from eval import baselines as baselines_lib
from eval import compare, run_config
from eval.stats import paired, stderr
from learned_opt.tree_files import atomic_write
from tasks import registry as task_registry
from tasks.base import TaskFamily
from train import checkpoint, command_line, distributed, meta_step, run_dir, saved_config, trainer
from train import config as config_lib
from train import inner as inner_lib

RANK_BY = ("step", "run_mean")


class Candidate(NamedTuple):
  """One optimizer to rank."""

  name: str  # unique in the ranking
  source: str  # the checkpoint or saved-optimizer directory it came from
  meta_step: int | None  # meta-steps of training behind its phi, where recorded
  saved: learned_opt.SavedOptimizer


def kind(candidate: Candidate) -> str:
  """The optimizer's kind (``lstm``, ``ntm_bfgs``, ...; ``partition`` for a partition)."""
  return candidate.saved.optimizer.config.get("kind", "learned")


def run_candidates(run: str, with_checkpoints: bool = True, log=print) -> list[Candidate]:
  """A run's checkpoints (phi at each ``checkpoints/step_*``) and its saved best optimizer.

  A checkpoint that does not read (corrupt, from another config) is skipped with a log line.

  Raises:
    ValueError: naming ``run`` when it is no directory, holds neither checkpoints nor a saved
      optimizer, or holds checkpoints without the ``config.json`` needed to read them.
  """
  if not os.path.isdir(run):
    raise ValueError(f"--run={run!r}: no such directory; name a meta-training run's --output_dir.")
  ckpt_dir = os.path.join(run, run_dir.CHECKPOINT_DIR)
  steps = checkpoint.all_steps(ckpt_dir) if with_checkpoints else []
  has_saved = os.path.isfile(os.path.join(run, learned_opt.serialization.RECORD_FILE))
  if not steps and not has_saved:
    what = (
      f"no checkpoints found at {ckpt_dir} (no step_* directories) and " if with_checkpoints else ""
    )
    raise ValueError(
      f"--run={run!r}: {what}no saved optimizer ({learned_opt.serialization.RECORD_FILE}) at "
      f"{run}. Name a meta-training run's --output_dir (it has {run_dir.CHECKPOINT_DIR}/step_*)."
    )
  label = os.path.basename(os.path.normpath(run))
  found = []
  if steps:
    config_path = os.path.join(run, run_dir.CONFIG_FILE)
    if not os.path.isfile(config_path):
      raise ValueError(
        f"--run={run!r} has checkpoints but no {run_dir.CONFIG_FILE}, which is needed to read "
        f"them; rank its saved optimizer alone with --checkpoint={run}."
      )
    config = config_lib.MetaTrainConfig(
      **saved_config.upgrade(saved_config.read_saved(config_path))
    )
    task, optimizer = trainer.build(config)
    template = jax.eval_shape(lambda: meta_step.init_state(config, task, optimizer))
    for step in steps:
      path = checkpoint.path_of(ckpt_dir, step)
      try:
        state, _ = checkpoint.restore(path, template, meta_step.upgrade_checkpoint)
      except ValueError as e:
        log(f"Skipping unusable checkpoint {path}: {e}")
        continue
      saved = learned_opt.SavedOptimizer(optimizer, state.meta_params)
      found.append(Candidate(f"{label}/step_{step}", path, step, saved))
  if has_saved:
    saved, step = _load_with_step(run)
    found.append(Candidate(f"{label}/best", run, step, saved))
  return found


def _load_with_step(path: str, attempts: int = 20) -> tuple[learned_opt.SavedOptimizer, Any]:
  """The optimizer saved in ``path`` and the meta-step its metadata names, of one save.

  A live run may save between reading the weights and reading the metadata; the metadata read
  before and after the load agree only if no save came in between (each names a later step).
  """
  for _ in range(attempts):
    before = learned_opt.load_metadata(path)
    saved = learned_opt.load(path)
    if learned_opt.load_metadata(path) == before:
      return saved, before.get("step")
  raise ValueError(f"{path} was saved to {attempts} times while reading it; rank it again.")


def saved_candidates(specs: Sequence[str]) -> list[Candidate]:
  """Candidates of ``--checkpoint`` specs (``DIR``, ``NAME=DIR``, ``pretrained:NAME``)."""
  parsed = run_config.parse_checkpoint_specs(specs)
  loaded = run_config.load_all(parsed)
  return [
    Candidate(name, path, learned_opt.load_metadata(path).get("step"), saved)
    for (name, saved), (_, path) in zip(loaded.items(), parsed, strict=True)
  ]


def unique_names(candidates: list[Candidate]) -> list[Candidate]:
  """The candidates with ``_2``, ``_3``, ... appended to repeated names."""
  seen, out = set(), []
  for c in candidates:
    name, n = c.name, 2
    while name in seen:
      name, n = f"{c.name}_{n}", n + 1
    seen.add(name)
    out.append(c._replace(name=name))
  return out


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
  problems: tuple,
  tune: tuple | None,
  num_steps: int,
  step: int,
  learning_rates: Sequence[float],
  learning_rate: float | None = None,
  lr_batch_size: int | None = None,
  mesh: Mesh | None = None,
) -> tuple[np.ndarray, float, list[float] | None]:
  """The baseline's curves (problems, num_steps + 1) on ``problems`` at its tuned rate.

  The rate is ``learning_rate`` if given, else the grid point with the lowest mean loss at
  ``step`` on ``tune``'s problems (on ``problems`` when ``tune`` is None). Sweeps split their
  problems over ``mesh`` (``compare.sweep``).

  Returns:
    ``(curves, learning rate, mean loss at step per grid point or None)``.
  """
  make_tx = baselines_lib.BASELINES[name]
  if learning_rate is not None:
    return (
      compare.sweep(task, make_tx, [learning_rate], *problems, num_steps, mesh=mesh)[0],
      learning_rate,
      None,
    )
  grid = compare.sweep(
    task, make_tx, learning_rates, *(tune or problems), num_steps, lr_batch_size, mesh
  )
  best = baselines_lib.best_learning_rate(grid[:, :, step])
  rate = float(learning_rates[best])
  at_step = np.where(np.isfinite(grid[:, :, step]), grid[:, :, step], np.inf)
  grid_means = np.mean(at_step, axis=1).tolist()
  if tune is None:
    return grid[best], rate, grid_means
  return compare.sweep(task, make_tx, [rate], *problems, num_steps, mesh=mesh)[0], rate, grid_means


def rank(
  task: TaskFamily,
  candidates: Sequence[Candidate],
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
  problems = inner_lib.sample_problems(task, compare.problem_key(seed), num_problems)
  tune = None
  if tune_problems and baseline_lr is None:
    tune = inner_lib.sample_problems(task, compare.problem_key(seed + 1), tune_problems)
  base, rate, grid_means = baseline_curves(
    task,
    baseline,
    problems,
    tune,
    num_steps,
    step,
    learning_rates,
    baseline_lr,
    lr_batch_size,
    mesh,
  )
  log(f"{baseline}: lr {rate:.3g}, mean loss at step {step} {np.mean(base[:, step]):.4g}")
  rollouts, rows = {}, []
  for c in candidates:
    key = json.dumps(dict(c.saved.optimizer.config), sort_keys=True, default=str)
    if key not in rollouts:  # a run's checkpoints share one compile
      rollouts[key] = compare.learned_rollout(task, c.saved.optimizer, num_steps)
    curves = compare.learned_curves(
      task, c.saved, *problems, num_steps, mesh, problem_batch_size=chunk, rollout=rollouts[key]
    )
    row = {"name": c.name, "kind": kind(c), "source": c.source, "meta_step": c.meta_step}
    row.update(score(curves, base, step))
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
    "problems": "eval.compare.problem_key(seed): fold-in 3, apart from training (1) and "
    "validation (2)",
    "rank_by": rank_by,
    "baseline": {
      "name": baseline,
      "learning_rate": rate,
      "tuning": {
        "fixed": baseline_lr is not None,
        "problems": "fixed rate"
        if baseline_lr is not None
        else ("separate" if tune else "ranking"),
        "num_problems": tune_problems if tune else (0 if baseline_lr is not None else num_problems),
        "seed": seed + 1 if tune else seed,
        "learning_rates": np.asarray(learning_rates).tolist(),
        "mean_loss_at_step": grid_means,
      },
      "step_loss": base_score["step_loss"],
      "step_loss_stderr": base_score["step_loss_stderr"],
      "run_mean": base_score["run_mean"],
      "run_mean_stderr": base_score["run_mean_stderr"],
      "num_diverged": base_score["num_diverged"],
    },
    "candidates": rows,
  }


def task_of(runs, specs, task=None, task_kwargs=None) -> tuple[str, dict]:
  """``(task name, kwargs)``: as given, else the first run's ``config.json``, else as recorded."""
  for run in runs:
    config_path = os.path.join(run, run_dir.CONFIG_FILE)
    if os.path.isfile(config_path):
      config = saved_config.upgrade(saved_config.read_saved(config_path))
      name = task or config["task"]
      return name, json.loads(task_kwargs) if task_kwargs else config["task_kwargs"]
  paths = list(runs) + [path for _, path in run_config.parse_checkpoint_specs(specs)]
  return run_config.task_settings(paths, task, task_kwargs)


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


def _pm(mean: float, stderr: float, signed: bool = False) -> str:
  return f"{mean:+.4f} ± {stderr:.4f}" if signed else f"{mean:.4f} ± {stderr:.4f}"


def markdown(results: dict) -> str:
  """The ranking as a markdown table, baseline row last."""
  b, step, T = results["baseline"], results["step"], results["num_steps"]
  tuning = b["tuning"]
  by = f"loss at step {step} of {T}" if results["rank_by"] == "step" else f"mean loss, steps 1..{T}"
  tuned = (
    "fixed by --baseline_lr"
    if tuning["fixed"]
    else f"tuned over {len(tuning['learning_rates'])} grid rates on {tuning['num_problems']} "
    f"{tuning['problems']} problems (seed {tuning['seed']}) for the loss at step {step}"
  )
  lines = [
    f"# Ranking by {by}",
    "",
    f"{results['num_problems']} held-out problems (seed {results['seed']}; never training or "
    f"validation problems) of task `{json.dumps(results['task'])}`. Baseline {b['name']}, lr "
    f"{b['learning_rate']:.3g}, {tuned}. Paired differences are candidate minus {b['name']} on the "
    "same problems (negative: the candidate is better), ± their standard error.",
    "",
    f"| rank | candidate | kind | meta-step | loss at step {step} | minus {b['name']} "
    f"| mean loss, steps 1..{T} | minus {b['name']} | diverged |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results["candidates"]:
    meta_step = "-" if r["meta_step"] is None else str(r["meta_step"])
    lines.append(
      f"| {r['rank']} | {r['name']} | {r['kind']} | {meta_step} "
      f"| {_pm(r['step_loss'], r['step_loss_stderr'])} "
      f"| {_pm(r['step_minus_baseline'], r['step_minus_baseline_stderr'], True)} "
      f"| {_pm(r['run_mean'], r['run_mean_stderr'])} "
      f"| {_pm(r['run_mean_minus_baseline'], r['run_mean_minus_baseline_stderr'], True)} "
      f"| {r['num_diverged']} |"
    )
  lines.append(
    f"| - | {b['name']} (lr {b['learning_rate']:.3g}) | baseline | - "
    f"| {_pm(b['step_loss'], b['step_loss_stderr'])} | - "
    f"| {_pm(b['run_mean'], b['run_mean_stderr'])} | - | {b['num_diverged']} |"
  )
  return "\n".join(lines) + "\n"


FLAGS = flags.FLAGS
distributed.define_flags()  # multi-process start-up (--coordinator_address, ...), --num_devices


def define_flags():
  """Flags of the command; defined only when run as one, so importing this module is free."""
  flags.DEFINE_multi_string(
    "run", [], "A meta-training run's --output_dir: rank its checkpoints and its saved optimizer."
  )
  flags.DEFINE_multi_string(
    "checkpoint", [], "A saved optimizer: DIR, NAME=DIR or pretrained:NAME; repeat for several."
  )
  flags.DEFINE_bool("checkpoints", True, "With --run: rank checkpoints/step_*, not only the best.")
  flags.DEFINE_string("task", None, "Task family; default: the one the first candidate trained on.")
  flags.DEFINE_string("task_kwargs", None, "JSON task settings; default: the candidate's.")
  flags.DEFINE_string("baseline", "adam", "Baseline to tune on the grid and pair against.")
  flags.DEFINE_float("baseline_lr", None, "Use this learning rate for the baseline, no sweep.")
  flags.DEFINE_integer("num_problems", 64, "Held-out problems to rank on.")
  flags.DEFINE_integer("num_steps", 100, "Optimization steps per problem (T).")
  flags.DEFINE_integer("step", None, "Rank by the mean loss at this step; default T.")
  flags.DEFINE_string("rank_by", "step", "step (loss at --step) or run_mean (steps 1..T).")
  flags.DEFINE_integer("seed", 7, "Seed of the ranking problems (not eval.evaluate's 2016/2017).")
  flags.DEFINE_integer("tune_problems", 16, "Problems (seed + 1) for the baseline's grid; 0: same.")
  flags.DEFINE_integer("lr_batch_size", 0, "Learning rates vmapped at once (0: all 30).")
  flags.DEFINE_integer(
    "problem_batch_size", 0, "Problems a learned optimizer runs at once (bounds memory; 0: all)."
  )
  flags.DEFINE_string("output_dir", None, "Where ranking.md and ranking.json go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    distributed.initialize_from_flags()  # before any JAX computation
    mesh = distributed.mesh_from_flags()  # --num_devices of every process's devices; default all
    writer = distributed.is_writer()
    log = (lambda s: print(s, flush=True)) if writer else (lambda s: None)  # process 0 reports
    if not FLAGS.run and not FLAGS.checkpoint:
      raise ValueError("Name what to rank: --run=DIR (a run's checkpoints) or --checkpoint=SPEC.")
    check_settings(
      FLAGS.baseline,
      FLAGS.num_problems,
      FLAGS.num_steps,
      FLAGS.num_steps if FLAGS.step is None else FLAGS.step,
      FLAGS.tune_problems,
      FLAGS.rank_by,
    )
    run_config.check_output_dir(FLAGS.output_dir)
    candidates = []
    for run in FLAGS.run:
      candidates += run_candidates(run, FLAGS.checkpoints, log)
    candidates = unique_names(candidates + saved_candidates(FLAGS.checkpoint))
    if not candidates:
      raise ValueError(f"No usable checkpoint in {FLAGS.run}; nothing to rank.")
    task_name, task_kwargs = task_of(FLAGS.run, FLAGS.checkpoint, FLAGS.task, FLAGS.task_kwargs)
    task = task_registry.get(task_name, **task_kwargs)
  except (ValueError, TypeError) as e:  # json errors are ValueErrors; bad kwargs TypeErrors
    raise app.UsageError(str(e)) from e
  results = rank(
    task,
    candidates,
    baseline=FLAGS.baseline,
    num_problems=FLAGS.num_problems,
    num_steps=FLAGS.num_steps,
    step=FLAGS.step,
    seed=FLAGS.seed,
    tune_problems=FLAGS.tune_problems,
    baseline_lr=FLAGS.baseline_lr,
    rank_by=FLAGS.rank_by,
    lr_batch_size=FLAGS.lr_batch_size or None,
    chunk=FLAGS.problem_batch_size or None,
    log=log,
    mesh=mesh,
  )
  if not writer:
    return  # process 0 writes and prints
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  table = markdown(results)
  atomic_write(os.path.join(FLAGS.output_dir, "ranking.json"), json.dumps(results).encode())
  atomic_write(os.path.join(FLAGS.output_dir, "ranking.md"), table.encode())
  print(table)
  print(f"Wrote {FLAGS.output_dir}/ranking.md and {FLAGS.output_dir}/ranking.json")


def run():
  """The command line, ``python -m eval.rank``."""
  define_flags()
  jax.config.parse_flags_with_absl()
  command_line.run(main)


if __name__ == "__main__":
  run()
