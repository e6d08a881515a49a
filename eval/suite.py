r"""The held-out suite: a saved optimizer, untuned, against Adam and tuned baselines on tasks it
never saw (``tasks.heldout``), and the verdict against the floors of docs/general.md.

Example:
  python -m eval.suite --optimizer=pretrained:NAME --output_dir=runs/suite
  python -m eval.suite --optimizer=mine=runs/general --optimizer=lstm=runs/lstm_mix \
      --output_dir=runs/suite --tasks=digits_mlp_4x64,zen_char_rnn

Per task, every optimizer runs on the same ``--num_problems`` problems (theta_0, minibatches):
each learned optimizer as saved, Adam at 1e-3 (what users run untuned), and Adam, NAG and AdamW
each tuned on those problems over the paper's learning-rate grid (1e-6 * 2^k) up to
``--max_learning_rate``, coarse to fine. Reported per task (``eval.suite_report``): the final-loss
ratio to tuned Adam, whether Adam at 1e-3 is beaten, a speed-up and divergence; over the suite,
the fraction of tasks beating Adam at 1e-3, the median and interquartile mean of the ratios.
Writes ``suite.json``, ``suite.md`` and ``suite.png`` (every task's curves). Curves are cached in
``--cache_dir`` (default ``--output_dir``/cache): a second optimizer reuses the baselines.
Problems are split over every device of every process; process 0 writes and prints.
"""

import dataclasses
import os

from eval import baselines as baselines_lib
from eval import engine, report, run_config, suite_report
from tasks import heldout
from tasks.base import num_params
from train import command_line, config_flags, distributed
from train import progress as progress_lib

FILES = ("suite.json", "suite.md", "suite.png")
TUNED = ("adam", "nag", "adamw")
ADAM_DEFAULT, DEFAULT_RATE = "adam_1e-3", 1e-3


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  """What ``eval.suite`` runs and where it writes; each field is one flag of the command."""

  optimizer: tuple[str, ...] = config_flags.setting(
    (),
    "Required. Saved optimizer: a run directory or pretrained:NAME, optionally LABEL=...; "
    "repeat for several (each is judged against the same baselines).",
    repeat=True,
  )
  tasks: tuple[str, ...] = config_flags.setting(
    (), "Held-out tasks to run (tasks.heldout); default: the whole suite (or --tiny's)."
  )
  tiny: bool = config_flags.setting(
    False, "Run the two tiny tasks (no data, seconds) instead: a check of the pipeline."
  )
  num_problems: int = config_flags.setting(4, "Problems per task (theta_0 and minibatches).")
  seed: int = config_flags.setting(2016, "Seed of the problems.")
  baselines: tuple[str, ...] = config_flags.setting(
    TUNED,
    f"Baselines tuned per task (adam required), from {', '.join(baselines_lib.ALL_BASELINES)}.",
  )
  max_learning_rate: float = config_flags.setting(
    1000.0, "Largest rate of the paper's grid 1e-6 * 2^k that tuning tries (default: all 30)."
  )
  stride: int = config_flags.setting(
    3, "Tuning sweeps every stride-th rate, then refines around the best (1: every rate)."
  )
  problem_batch_size: int = config_flags.setting(0, "Problems run at once (0: all).")
  lr_batch_size: int = config_flags.setting(0, "Learning rates vmapped at once (0: all).")
  mnist_dir: str | None = config_flags.setting(None, "MNIST's directory (default $MNIST_DIR).")
  cache_dir: str = config_flags.setting(
    "",
    "Where curves are cached (default: --output_dir/cache); suites sharing one reuse the "
    "baselines' tuned curves.",
  )
  output_dir: str = config_flags.setting("", f"Required. Where {', '.join(FILES)} go.")
  overwrite: bool = config_flags.setting(
    False, "Replace a suite.json already in --output_dir (default: refused)."
  )

  def __post_init__(self):
    config_flags.check_types(self)
    if not self.output_dir:
      raise ValueError("--output_dir is required (e.g. --output_dir=runs/suite).")
    if not self.optimizer:
      raise ValueError("--optimizer is required: a run directory or pretrained:NAME.")
    if self.num_problems <= 0 or self.stride <= 0 or not self.max_learning_rate >= 1e-6:
      raise ValueError("--num_problems and --stride must be positive, --max_learning_rate >= 1e-6.")
    report.check_names("baselines", self.baselines, baselines_lib.ALL_BASELINES)
    if "adam" not in self.baselines:
      raise ValueError("--baselines must include adam: ratios are to tuned Adam.")


def learning_rates(max_rate: float) -> tuple[float, ...]:
  """The paper's grid 1e-6 * 2^k, k = 0..29, up to ``max_rate``."""
  grid = baselines_lib.paper_learning_rates()
  return tuple(float(r) for r in grid[grid <= max_rate])


def selected(config: SuiteConfig) -> tuple[heldout.HeldOutTask, ...]:
  """The tasks ``--tasks`` names, else the whole suite (``--tiny``: the two tiny tasks)."""
  if config.tasks:
    return tuple(heldout.get(name, config.mnist_dir) for name in config.tasks)
  return heldout.tiny_suite() if config.tiny else heldout.suite(config.mnist_dir)


def run_task(config: SuiteConfig, held: heldout.HeldOutTask, learned: dict, mesh) -> dict:
  """Every optimizer on one task's problems: ``{"curves": {name: (problems, steps + 1)},
  "rates": {name: rate or None}}``."""
  family = held.build()
  common = dict(
    task=family,
    problems=engine.Problems(config.num_problems, config.seed),
    num_steps=held.num_steps,
    problem_batch=config.problem_batch_size or None,
    lr_batch=config.lr_batch_size or None,
    mesh=mesh,
    cache_dir=config.cache_dir or os.path.join(config.output_dir, "cache"),
  )
  grid = engine.Tuning(learning_rates(config.max_learning_rate), config.stride)
  tuned = engine.Spec(learned=learned, baselines=config.baselines, tuning=grid, **common)
  default = engine.Spec(baselines=("adam",), tuning=engine.Tuning((DEFAULT_RATE,)), **common)
  results = engine.run(tuned, report.say)
  results += [r._replace(name=ADAM_DEFAULT) for r in engine.run(default, report.say)]
  return {
    "family": family,
    "curves": {r.name: r.curves["loss"] for r in results},
    "rates": {r.name: r.learning_rate for r in results},
  }


def task_record(held, ran: dict, learned_names) -> dict:
  """One task in ``suite.json``: its size, the rates chosen, every final loss and the mean
  curves of the figure (``suite_report.sampled``)."""
  curves = ran["curves"]
  return {
    "task": held.name,
    "description": held.description,
    "num_params": num_params(ran["family"]),
    "num_steps": held.num_steps,
    "learned": list(learned_names),
    "learning_rates": ran["rates"],
    "final_losses": {k: suite_report.final_loss(v) for k, v in curves.items()},
    "curve_stride": suite_report.curve_stride(held.num_steps),
    "mean_curves": {k: suite_report.sampled(v) for k, v in curves.items()},
  }


def main(config: SuiteConfig) -> None:
  mesh = distributed.current_mesh()
  report.refuse_existing(config.output_dir, FILES[0], config.overwrite)
  try:
    learned = run_config.load_all(run_config.parse_checkpoint_specs(config.optimizer))
    tasks = selected(config)
    clash = sorted(set(learned) & {*config.baselines, ADAM_DEFAULT})
    if clash:
      raise ValueError(f"Optimizer labels {clash} are baselines' names; label them LABEL=...")
  except ValueError as e:
    raise command_line.UsageError(str(e)) from e
  records, rows = [], {name: [] for name in learned}
  progress = progress_lib.Progress("suite", len(tasks), report.say, every=0.0, unit="task")
  for i, held in enumerate(tasks):
    report.say(f"task {i + 1} of {len(tasks)}: {held.name} ({held.description})")
    ran = run_task(config, held, learned, mesh)
    progress.step(held.name)  # tasks differ in cost: the ETA is a rough guide
    records.append(task_record(held, ran, learned))
    for name in learned:
      rows[name].append(suite_report.task_row(held.name, ran["curves"], name))
  results = {
    "learned": {
      name: {"source": spec, "summary": suite_report.aggregate(rows[name]), "tasks": rows[name]}
      for name, spec in zip(learned, config.optimizer, strict=True)
    },
    "tasks": records,
    "settings": {**dataclasses.asdict(config), "floors": suite_report.FLOORS},
  }
  if not distributed.is_writer():
    return
  report.write(os.path.join(config.output_dir, FILES[0]), results)
  text = suite_report.markdown(results)
  report.write(os.path.join(config.output_dir, FILES[1]), text)
  suite_report.figure(records, os.path.join(config.output_dir, FILES[2]))
  print(text)
  print(f"Wrote {', '.join(os.path.join(config.output_dir, f) for f in FILES)}")


COMMAND = command_line.Command(
  main,
  SuiteConfig,
  doc=__doc__,
  distributed=True,
  output=command_line.OutputDir("output_dir", (*FILES, "cache"), "held-out suite"),
  help_sections=lambda: [command_line.shipped_section("optimizer")],
)


def run():
  """The command line: ``python -m eval.suite``."""
  COMMAND.run()


if __name__ == "__main__":
  run()
