"""The paper's experiments as runnable scripts over the four packages (not library code).

Run them from the repository root, e.g. ``python -m experiments.mnist_experiments --help``.
"""

import dataclasses

from eval.baselines import BASELINES
from eval.report import check_names
from train import command_line, config_flags
from train.config_flags import setting


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """The flags every experiment's config shares (its own fields follow)."""

  output_dir: str = setting("", "Required. Where the results, figures and summary go.")
  baselines: tuple[str, ...] = setting(list(BASELINES), "Baselines to tune and compare.")

  def __post_init__(self):
    config_flags.check_types(self)
    if not self.output_dir:
      raise ValueError("--output_dir is required (e.g. --output_dir=runs/NAME).")
    check_names("baselines", self.baselines, BASELINES)


def command(main, config, doc: str, files, what: str, **kwargs) -> command_line.Command:
  """An experiment's command: ``config``'s fields as flags, on every process, writing ``files``
  (names that may already be in ``--output_dir``; ``what``: what they are)."""
  output = command_line.OutputDir("output_dir", tuple(files), what)
  return command_line.Command(main, config, doc=doc, distributed=True, output=output, **kwargs)
