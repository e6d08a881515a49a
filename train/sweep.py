r"""A sweep of meta-training runs: the meta learning rate by random search (section 3), one command.

Example:
  python -m train.sweep --task=quadratic --num_runs=8 --output_dir=runs/sweep_quadratic
  python -m train.sweep --task=mnist_mlp --num_runs=4 --meta_lr_range=3e-4,3e-2 \
    --seeds=0,1,2,3 --parallel=2 --output_dir=runs/sweep_mnist

Every flag of ``train.meta_train`` (task, preset, optimizer, unroll, ...) sets every run, except
--meta_lr and --seed, which the sweep draws: run i meta-trains with a meta-lr drawn log-uniformly
from --meta_lr_range by --sweep_seed, and seed i (or the i-th of --seeds). Each run is an
ordinary meta-training run in OUTPUT_DIR/runs/run_NN, all validating on the same problems. After
the runs, each run's best saved optimizer is scored on --select_problems selection problems that
no run trained or validated on and no test uses, and the best score wins (fewest diverged
problems, then lowest mean final loss). Writes OUTPUT_DIR/sweep.json, summary.md (the table and
every run's validation after each epoch; printed too), validation.png (the same as a figure) and
winner/, the chosen optimizer (learned_opt.load) with the whole sweep in its
metadata. Running the same command again resumes unfinished runs and skips finished ones.
"""

import dataclasses
import json
import math
import os
import sys

from absl import flags

import learned_opt
from learned_opt import tree_files
from train import command_line, config_flags, meta_train, sweep_runs
from train.config import MetaTrainConfig
from train.run import Run, RunDirError

SWEEP_JSON, SUMMARY_MD, WINNER_DIR = "sweep.json", "summary.md", "winner"
VALIDATION_PNG = "validation.png"
MARKS = (
  sweep_runs.RUNS_DIR,
  sweep_runs.LOGS_DIR,
  SWEEP_JSON,
  SUMMARY_MD,
  WINNER_DIR,
  VALIDATION_PNG,
)
DRAWN = {"meta_lr": "--meta_lr_range", "seed": "--seeds"}  # run settings the sweep sets


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """The sweep's own settings; each field is one flag of ``train.sweep``."""

  output_dir: str = config_flags.setting(
    "",
    "Required. The sweep's directory: runs/run_NN (each a meta-training run), logs/, sweep.json, "
    "summary.md and winner/.",
  )
  num_runs: int = config_flags.setting(4, "Runs K in the sweep.")
  meta_lr_range: tuple[str, ...] = config_flags.setting(
    ("1e-4", "1e-2"),
    "LOW,HIGH: meta learning rates are drawn log-uniformly in [LOW, HIGH] (default 1e-4,1e-2).",
  )
  seeds: tuple[str, ...] = config_flags.setting(
    (), "One seed per run (--seed of each meta-training run); default: 0 .. K-1."
  )
  sweep_seed: int = config_flags.setting(
    0, "Seed of the meta-lr draw; run i's rate depends on it and i alone."
  )
  parallel: int = config_flags.setting(
    1,
    "Runs at once, each a `python -m train.meta_train` process (one GPU each where there are "
    "several); 1: one after another.",
  )
  select_problems: int = config_flags.setting(
    64, "Selection problems the winner is chosen on (per bucket of a mixture)."
  )
  select_seed: int = config_flags.setting(
    0, "Seed of the selection problems (fold-in 4: no training, validation or test problem)."
  )

  def __post_init__(self):
    config_flags.check_types(self)
    if not self.output_dir:
      raise ValueError("--output_dir is required (e.g. --output_dir=runs/sweep).")
    if self.num_runs < 1:
      raise ValueError(f"--num_runs must be >= 1, got {self.num_runs} (e.g. --num_runs=4).")
    self.lr_range()
    seeds = self.seed_list()
    if seeds and len(seeds) != self.num_runs:
      raise ValueError(
        f"--seeds names {len(seeds)} seeds for --num_runs={self.num_runs}; give one per run, or "
        "leave --seeds out for 0 .. K-1."
      )
    for name in ("parallel", "select_problems"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
    if self.sweep_seed < 0 or self.select_seed < 0:
      raise ValueError("--sweep_seed and --select_seed must be >= 0.")

  def lr_range(self) -> tuple[float, float]:
    """``(low, high)`` of ``--meta_lr_range``; a ValueError naming the flag if it is not one."""
    bad = ValueError(
      f"--meta_lr_range={','.join(self.meta_lr_range)} must be LOW,HIGH with 0 < LOW <= HIGH "
      "(e.g. --meta_lr_range=1e-4,1e-2)."
    )
    try:
      low, high = (float(x) for x in self.meta_lr_range)
    except ValueError as e:
      raise bad from e
    if not (0 < low <= high and math.isfinite(high)):
      raise bad
    return low, high

  def seed_list(self) -> list[int]:
    try:
      seeds = [int(s) for s in self.seeds]
    except ValueError as e:
      raise ValueError(f"--seeds must be integers, e.g. --seeds=0,1,2; got {self.seeds}.") from e
    if any(s < 0 for s in seeds):
      raise ValueError(f"--seeds must be >= 0, got {seeds}.")
    return seeds


@dataclasses.dataclass(frozen=True)
class Job:
  """The sweep's settings and the meta-training config every run starts from."""

  sweep: SweepConfig
  base: MetaTrainConfig  # the preset under the flags given; meta_lr and seed are drawn per run

  @property
  def output_dir(self) -> str:
    return self.sweep.output_dir


def _define_train_flags(flag_values: flags.FlagValues) -> None:
  """meta_train's flags (its config's fields and --preset), but --output_dir, the sweep's."""
  scratch = flags.FlagValues()
  config_flags.define(MetaTrainConfig, scratch, meta_train.COMMAND.help_note)
  for name in scratch:
    if name != "output_dir":
      flag_values[name] = scratch[name]
  meta_train.COMMAND.more_flags(flag_values)


def job_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Job:
  """The validated job of the flags given, or a ValueError naming a flag."""
  sweep = config_flags.from_flags(SweepConfig, flag_values)
  for name, instead in DRAWN.items():
    if flag_values[name].present:
      raise ValueError(f"--{name} is drawn per run by the sweep; set {instead} instead.")
  return Job(sweep, meta_train.config_from_flags(flag_values))


def _finite(x):
  return x if isinstance(x, int | float) and math.isfinite(x) else None


def validation_history(run_dir: str) -> list[list]:
  """``[[meta-step, validation loss], ...]``: the run's validation after each epoch so far (a
  diverged one as None; ``Run.validations``), as JSON keeps it."""
  return [[step, _finite(loss)] for step, loss in Run(run_dir).validations()]


def records(runs, scores: dict, statuses: dict[str, str]) -> list[dict]:
  """One record per run: settings, its own best validation and step, its validation after each
  epoch, its selection score."""
  rows = []
  for run in runs:
    best = Run(run.config.output_dir).best_metadata()
    found = scores.get(run.config.output_dir)
    rows.append({
      "run": run.name,
      "meta_lr": run.meta_lr,
      "seed": run.seed,
      "status": statuses.get(run.name, "not run"),
      "best_valid": _finite(best.get("valid_final_loss")),
      "best_step": best.get("step"),
      "selection_score": None if found is None else _finite(found[1]),
      "selection_diverged": None if found is None else found[0],
      "validation": validation_history(run.config.output_dir),
    })  # fmt: skip
  return rows


def choose_winner(rows: list[dict]) -> str | None:
  """The run with the best selection result: fewest diverged, then lowest score; None if none."""
  scored = [r for r in rows if r["selection_score"] is not None]
  if not scored:
    return None
  return min(scored, key=lambda r: (r["selection_diverged"], r["selection_score"]))["run"]


def _number(x, spec=".4g") -> str:
  return "-" if x is None else format(x, spec)


def summary_table(rows: list[dict], winner: str | None, select_problems: int) -> str:
  """The sweep as a markdown table, the winner marked."""
  lines = [
    "| run | meta-lr | seed | best validation | step | selection score | status |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    name = f"**{r['run']}** (winner)" if r["run"] == winner else r["run"]
    score = _number(r["selection_score"])
    if r["selection_diverged"]:
      score += f" ({r['selection_diverged']} of {select_problems} diverged)"
    lines.append(
      f"| {name} | {r['meta_lr']:.3g} | {r['seed']} | {_number(r['best_valid'])} | "
      f"{_number(r['best_step'], 'd')} | {score} | {r['status']} |"
    )
  return "\n".join(lines) + "\n"


def validation_table(rows: list[dict]) -> str:
  """Validation against meta-steps, a column per run: does a run still improve where it stops?"""
  losses = {r["run"]: dict(r["validation"]) for r in rows}
  steps = sorted({step for history in losses.values() for step in history})
  lines = [
    "| meta-step | " + " | ".join(r["run"] for r in rows) + " |",
    "|---" * (len(rows) + 1) + "|",
  ]
  for step in steps:
    cells = [_number(losses[r["run"]].get(step)) for r in rows]
    lines.append(f"| {step} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_validation(rows: list[dict], path: str) -> None:
  """Writes validation loss against meta-steps, a line per run, its best step marked, to
  ``path`` (PNG)."""
  import matplotlib  # noqa: PLC0415  (deferred: only a finished sweep draws)

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # noqa: PLC0415

  figure, axes = plt.subplots(figsize=(6, 4))
  for r in rows:
    points = [(step, loss) for step, loss in r["validation"] if loss is not None]
    if not points:
      continue
    steps, losses = zip(*points, strict=True)
    (line,) = axes.plot(steps, losses, marker=".", label=f"{r['run']} (meta-lr {r['meta_lr']:.3g})")
    if r["best_step"] in steps:
      axes.plot(r["best_step"], losses[steps.index(r["best_step"])], "o", color=line.get_color())
  axes.set_xlabel("meta-step")
  axes.set_ylabel("validation: mean final loss")
  axes.legend()
  figure.tight_layout()
  tmp = path + ".tmp"
  figure.savefig(tmp, format="png", dpi=100)
  plt.close(figure)
  os.replace(tmp, path)


def export_winner(output_dir: str, run_dir: str, sweep_record: dict) -> str:
  """Saves the winner's best optimizer to OUTPUT_DIR/winner with its training record (as the
  trainer saved it), where it came from, and the whole sweep; returns the directory."""
  saved, step = Run(run_dir).best()
  metadata = dict(Run(run_dir).best_metadata())
  metadata["exported_from"] = {"run_dir": os.path.abspath(run_dir), "step": step, "which": "best"}
  metadata["sweep"] = sweep_record
  target = os.path.join(output_dir, WINNER_DIR)
  if os.path.isdir(target):
    tree_files.remove_temporaries(target)  # of an export that was killed
  learned_opt.save(target, saved.optimizer, saved.meta_params, metadata=metadata)
  return target


def _write(output_dir: str, record: dict, table: str) -> None:
  tree_files.atomic_write(
    os.path.join(output_dir, SWEEP_JSON), json.dumps(record, indent=2, sort_keys=True).encode()
  )
  tree_files.atomic_write(os.path.join(output_dir, SUMMARY_MD), table.encode())


def main(job: Job) -> None:
  sweep, out = job.sweep, job.output_dir
  meta_lrs = sweep_runs.draw_meta_lrs(sweep.num_runs, *sweep.lr_range(), sweep.sweep_seed)
  seeds = sweep_runs.run_seeds(sweep.num_runs, sweep.seed_list())
  runs = sweep_runs.plan(job.base, out, meta_lrs, seeds)
  try:
    for run in runs:  # a run of other settings is refused before anything starts
      Run(run.config.output_dir).check_resumable(run.config)
  except RunDirError as e:
    raise command_line.UsageError(str(e)) from e
  settings = {
    **dataclasses.asdict(sweep),
    "meta_lrs": meta_lrs,
    "base": json.loads(job.base.to_json()),  # meta_lr, seed and output_dir: each run's own
    "selection": "best optimizer of each run; problems of fold-in 4 of --select_seed's key",
  }
  statuses = {r.name: "finished before" for r in runs if sweep_runs.is_finished(r.config)}
  todo = [r for r in runs if r.name not in statuses]
  for name in statuses:
    print(f"{name}: finished before; skipped", flush=True)
  try:
    codes = sweep_runs.launch(todo, out, sweep.parallel, log=lambda s: print(s, flush=True))
  except ValueError as e:  # --parallel over the GPUs
    raise command_line.UsageError(str(e)) from e
  statuses.update({n: "done" if c == 0 else f"exit {c}" for n, c in codes.items()})
  if any(c in sweep_runs.PREEMPTED for c in codes.values()):
    print("Stopped by a signal; run the same command to resume.", file=sys.stderr, flush=True)
    sys.exit(75)
  print(f"Scoring each run's best optimizer on {sweep.select_problems} selection problems.")
  paths = [r.config.output_dir for r in runs]
  scores = sweep_runs.selection_scores(job.base, paths, sweep.select_problems, sweep.select_seed)
  rows = records(runs, scores, statuses)
  winner = choose_winner(rows)
  table = summary_table(rows, winner, sweep.select_problems)
  record = {"settings": settings, "runs": rows, "winner": winner, "table": table}
  validation = "\nValidation (mean final loss) after each epoch:\n\n" + validation_table(rows)
  _write(out, record, table + validation)
  plot_validation(rows, os.path.join(out, VALIDATION_PNG))
  print(table + validation, flush=True)
  if winner is not None:
    target = export_winner(out, os.path.join(out, sweep_runs.RUNS_DIR, winner), record)
    print(f"Winner {winner}; saved in {target} (learned_opt.load({target!r})).")
  failed = [n for n, c in codes.items() if c != 0]
  if failed or winner is None:
    what = f"{', '.join(failed)} failed" if failed else "no run saved an optimizer"
    sys.exit(f"{what}; see {out}/logs or the output above, then run the same command again.")


COMMAND = command_line.Command(
  main,
  SweepConfig,
  doc=__doc__,
  config_from_flags=job_from_flags,
  help_sections=meta_train.COMMAND.help_sections,
  more_flags=_define_train_flags,
  output=command_line.OutputDir("output_dir", MARKS, "sweep"),
)


if __name__ == "__main__":
  COMMAND.run()
