r"""Evaluates trained optimizers against the paper's tuned baselines on fresh problems.

Example:
  python -m eval.evaluate --checkpoint=runs/quadratic --output_dir=runs/eval
  python -m eval.evaluate --checkpoint=pretrained:mnist_mlp --output_dir=runs/eval_mnist

Writes ``results.json`` (per optimizer: name, chosen learning rate or null, mean loss curve,
final loss mean and standard error), ``curves.png`` and prints a table. An ``--output_dir`` that
already holds a ``results.json`` is refused unless ``--overwrite`` is given. Problems are split
over every device of every process (or ``--num_devices`` of them); several processes start with
``--coordinator_address``, ...; process 0 alone writes and prints.
"""

import dataclasses
import os

from eval import baselines as baselines_lib
from eval import compare, plots, report, run_config
from tasks import registry as task_registry
from train import command_line, config_flags, distributed

RESULTS_FILE, FIGURE_FILE = "results.json", "curves.png"


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
  """What ``eval.evaluate`` compares and where it writes; each field is one flag of the command."""

  checkpoint: tuple[str, ...] = config_flags.setting(
    (),
    "Saved optimizer: a directory or pretrained:NAME (the shipped ones are listed below), "
    "optionally LABEL=...; repeat for several. Unlabelled ones are named by their kind (lstm, "
    "ntm_bfgs, ...). None: the baselines alone, on --task.",
    repeat=True,
  )
  task: str | None = config_flags.setting(
    None,
    "Task family (listed below); default: the one the first checkpoint trained on. MNIST is "
    "read from $MNIST_DIR, CIFAR-10 from $CIFAR10_DIR.",
  )
  task_kwargs: dict | None = config_flags.setting(
    None, "JSON task settings; default: the checkpoint's (see meta_train --help)."
  )
  baselines: tuple[str, ...] = config_flags.setting(
    tuple(baselines_lib.BASELINES),
    f"Baselines to tune and compare, from {', '.join(baselines_lib.BASELINES)}.",
  )
  num_problems: int = config_flags.setting(256, "Fresh test problems.")
  num_steps: int = config_flags.setting(100, "Optimization steps per problem.")
  seed: int = config_flags.setting(
    2016, "Seed of the test problems (a stream apart from training)."
  )
  lr_batch_size: int = config_flags.setting(0, "Learning rates vmapped at once (0: all 30).")
  problem_batch_size: int = config_flags.setting(
    0,
    "Problems a learned optimizer runs at once, the rest in further chunks (bounds memory: 256 "
    "MNIST problems need ~4.7 GiB at once, ~0.6 GiB in chunks of 32); 0: all at once. Same "
    "results.",
  )
  output_dir: str = config_flags.setting(
    "", f"Required. Where {RESULTS_FILE} and {FIGURE_FILE} go."
  )
  overwrite: bool = config_flags.setting(
    False, f"Replace a {RESULTS_FILE} already in --output_dir (default: refused)."
  )

  def __post_init__(self):
    config_flags.check_types(self)
    if not self.output_dir:
      raise ValueError("--output_dir is required (e.g. --output_dir=runs/eval).")
    for name in ("num_problems", "num_steps"):
      if getattr(self, name) <= 0:
        raise ValueError(f"--{name} must be positive, got {getattr(self, name)}.")
    for name, what in (("lr_batch_size", "all rates"), ("problem_batch_size", "all problems")):
      if getattr(self, name) < 0:
        raise ValueError(
          f"--{name} must be 0 ({what} at once) or positive, got {getattr(self, name)}."
        )
    unknown = [b for b in self.baselines if b not in baselines_lib.BASELINES]
    if unknown:
      raise ValueError(
        f"--baselines: unknown {', '.join(map(repr, unknown))}; choose from "
        f"{', '.join(baselines_lib.BASELINES)} (or --baselines= for none)."
      )


def main(config: EvaluateConfig) -> None:
  mesh = distributed.current_mesh()  # --num_devices of every process's devices; default all
  report.refuse_existing(config.output_dir, RESULTS_FILE, config.overwrite)
  try:
    specs = run_config.parse_checkpoint_specs(config.checkpoint)
    learned = run_config.load_all(specs)
    task_name, task_kwargs = run_config.task_settings(
      [path for _, path in specs], config.task, config.task_kwargs
    )
    task = task_registry.get(task_name, **task_kwargs)
  # TypeError: bad task settings; FileNotFoundError: no data set, no VGG16 weights.
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise command_line.UsageError(str(e)) from e
  results = compare.compare(
    task,
    learned,
    config.baselines,
    num_problems=config.num_problems,
    num_steps=config.num_steps,
    seed=config.seed,
    lr_batch_size=config.lr_batch_size or None,
    mesh=mesh,
    problem_batch_size=config.problem_batch_size or None,
  )  # problems split over the mesh's devices of every process (eval.sharding)
  if not distributed.is_writer():
    return  # process 0 writes and prints
  report.write(os.path.join(config.output_dir, RESULTS_FILE), results)
  plots.plot_curves(results, os.path.join(config.output_dir, FIGURE_FILE))
  print(report.format_table(results))
  print(f"Wrote {config.output_dir}/{RESULTS_FILE} and {config.output_dir}/{FIGURE_FILE}")


COMMAND = command_line.Command(
  main,
  EvaluateConfig,
  doc=__doc__,
  distributed=True,
  output=command_line.OutputDir("output_dir", (RESULTS_FILE, FIGURE_FILE), "evaluation"),
  help_sections=lambda: [command_line.tasks_section(), command_line.shipped_section("checkpoint")],
)


def run():
  """The command line: ``python -m eval.evaluate``, the console script ``learned-opt-eval``."""
  COMMAND.run()


if __name__ == "__main__":
  run()
