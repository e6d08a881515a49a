r"""The MNIST experiments of section 3.2 (Figures 4 and 5) in one command.

Example:
  MNIST_DIR=../shared/data/mnist python -m experiments.mnist_experiments \
    --checkpoint=runs/mnist_base --output_dir=runs/mnist_experiments

Each experiment (``EXPERIMENTS``) is one ``eval.compare`` spec: a trained optimizer and the
baselines, each re-tuned on the paper's grid for that setting, on the same fresh problems over
every device. Writes ``<output_dir>/<experiment>/results.json``, ``curves.png`` and a markdown
summary (``--summary``). More: docs/mnist.md.
"""

import dataclasses
import json
import os
from typing import Any, NamedTuple

import numpy as np

import experiments
import learned_opt
import tasks
from eval import compare, plots, report, run_config
from train import command_line, distributed
from train.config_flags import setting


class Experiment(NamedTuple):
  name: str
  title: str  # the paper's figure it repeats
  task_kwargs: dict[str, Any]  # changes to the base network (one hidden layer of 20 sigmoids)
  num_steps: int


EXPERIMENTS = (
  Experiment("base", "Fig. 4 centre: base network, 100 steps", {}, 100),
  Experiment("steps200", "Fig. 4 right: 200 steps, optimizer trained for 100", {}, 200),
  Experiment("hidden40", "Fig. 5 left: 40 hidden units", {"hidden_sizes": [40]}, 100),
  Experiment("two_layers", "Fig. 5 centre: two hidden layers", {"hidden_sizes": [20, 20]}, 100),
  Experiment("relu", "Fig. 5 right: ReLU activations", {"activation": "relu"}, 100),
)
_BY_NAME = {e.name: e for e in EXPERIMENTS}
SUMMARY = "results_mnist.md"
verdict = report.verdict_vs_best  # the learned optimizer against the best tuned baseline


def run_experiment(
  experiment: Experiment, saved: learned_opt.SavedOptimizer, *, mnist_dir=None, **options
) -> dict:
  """Learned optimizer and tuned baselines on one setting: ``eval.compare.compare``'s results
  with ``options`` (test problems of ``seed``, tuning ones of ``seed + 1``; 0: the test ones)."""
  task = tasks.get("mnist_mlp", mnist_dir=mnist_dir, **experiment.task_kwargs)
  learned = {saved.optimizer.config.get("kind", "learned"): saved}
  return compare.compare(task, learned, num_steps=experiment.num_steps, **options)


def markdown(all_results: dict[str, dict], header: str) -> str:
  """One table per experiment: optimizer, learning rate, mean final loss +- stderr, median."""

  def section(results: dict) -> list[str]:
    rows = [
      [r["name"], report.lr_text(r), report.mean_pm(r["final_mean"], r["final_stderr"]),
       f"{r['final_median']:.4f}", r["num_diverged"], f"{np.mean(r['mean_curve'][1:]):.4f}"]
      for r in sorted(results["optimizers"], key=report.final_or_inf)
    ]  # fmt: skip
    return [
      f"{results['num_problems']} test runs (seed {results['seed']}), {results['num_steps']} "
      f"steps, task `{json.dumps(results['task'])}`; learning rates tuned on "
      f"{results['tuning']['num_problems']} {results['tuning']['problems']} problems.",
      "",
      *report.table(["optimizer", "lr", "final loss (mean ± stderr)", "median", "diverged",
                     "mean over steps 1..T"], rows),
      "",
      verdict(results),
      "The last column is the paper's meta-objective (eq. 3, w_t = 1) divided by T.",
    ]  # fmt: skip

  return report.summary(header, all_results, {e.name: e.title for e in EXPERIMENTS}, section)


def summary_text(found: dict[str, dict], source: str | None = None) -> str:
  """The summary of every experiment's results; ``source``: default the first's optimizer."""
  source = next(iter(found.values()))["optimizer_source"] if source is None else source
  details = (
    f" with optimizer `{source}`. Losses are mean cross-entropy (nats) on the last step's "
    "minibatch (its size is the task's batch_size); lower is better."
  )
  title = "MNIST results (section 3.2, Figures 4 and 5)"
  return markdown(found, report.summary_header(title, "mnist_experiments", details))


@dataclasses.dataclass(frozen=True)
class MnistConfig(experiments.ExperimentConfig):
  """What ``experiments.mnist_experiments`` runs; each field is one flag of the command."""

  checkpoint: str | None = setting(
    None, "Saved optimizer: a directory or pretrained:NAME; default: --pretrained."
  )
  pretrained: str = setting("mnist_mlp", "Shipped optimizer used when no --checkpoint.")
  experiments: tuple[str, ...] = setting(
    [e.name for e in EXPERIMENTS],
    "Experiments to run: " + "; ".join(f"{e.name} ({e.title})" for e in EXPERIMENTS) + ".",
  )
  num_problems: int = setting(64, "Fresh test problems (runs) per experiment.")
  tune_problems: int = setting(8, "Problems for the LR sweep; 0: sweep on the test ones.")
  seed: int = setting(2016, "Seed of the test problems; tuning uses seed + 1.")
  lr_batch_size: int = setting(10, "Learning rates vmapped at once (bounds memory; 0: all).")
  problem_batch_size: int = setting(
    0, "Problems the learned optimizer runs at once (bounds memory; 0: all)."
  )
  mnist_dir: str | None = setting(None, "Directory of the MNIST IDX files; default $MNIST_DIR.")
  summary: str | None = setting(
    None, f"Markdown table of every experiment; default OUTPUT_DIR/{SUMMARY}."
  )
  reuse_baselines: bool = setting(
    False,
    "Reuse curves in OUTPUT_DIR/<experiment>/cache computed for the very same setting, test and "
    "tuning problems (eval.engine's cache); run only the rest.",
  )

  def __post_init__(self):
    super().__post_init__()
    report.check_names("experiments", self.experiments, _BY_NAME)
    if self.num_problems < 2 or self.tune_problems < 0:
      raise ValueError("--num_problems must be >= 2 and --tune_problems >= 0.")


def main(config: MnistConfig) -> None:
  try:
    source = config.checkpoint or f"learned_opt.pretrained({config.pretrained!r})"
    path = run_config.resolve(config.checkpoint or f"pretrained:{config.pretrained}")
    saved = learned_opt.load(path)
    tasks.get("mnist_mlp", mnist_dir=config.mnist_dir)  # no data: a usage error before compute
  except (ValueError, FileNotFoundError) as e:
    raise command_line.UsageError(str(e)) from e

  def run(name: str) -> dict:
    report.say(f"== {name}: {_BY_NAME[name].title}")
    options = {
      k: getattr(config, k) for k in ("baselines", "num_problems", "tune_problems", "seed")
    }
    results = run_experiment(
      _BY_NAME[name], saved, mnist_dir=config.mnist_dir, log=report.say,
      lr_batch_size=config.lr_batch_size or None, mesh=distributed.current_mesh(),
      problem_batch_size=config.problem_batch_size or None, reuse=config.reuse_baselines,
      cache_dir=os.path.join(config.output_dir, name, "cache"), **options,
    )  # fmt: skip
    return {**results, "optimizer_source": source}

  def each(results: dict, directory: str) -> None:
    title = _BY_NAME[os.path.basename(directory)].title
    plots.plot_curves(results, os.path.join(directory, "curves.png"), title=title)
    print(report.format_table(results), verdict(results), sep="\n", flush=True)

  summary = config.summary or os.path.join(config.output_dir, SUMMARY)
  text = lambda found: summary_text(found, source)
  report.run_each(config.experiments, run, config.output_dir, summary, text, each, _BY_NAME)


COMMAND = experiments.command(
  main, MnistConfig, __doc__, (SUMMARY, *_BY_NAME), "MNIST experiments' output"
)

run = COMMAND.run  # the command line (tests/multihost_worker.py starts it too)

if __name__ == "__main__":
  run()
