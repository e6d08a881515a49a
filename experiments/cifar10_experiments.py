r"""The CIFAR-10 experiments of section 3.3 (Figure 7) in one command: specs for ``eval.engine``.

Example:
  CIFAR10_DIR=../shared/data/cifar10 python -m experiments.cifar10_experiments \
    --learned=two_lstms=runs/cifar10_two_lstms,one_lstm=runs/cifar10_one_lstm \
    --output_dir=runs/cifar10_experiments

Each experiment (``EXPERIMENTS``) is a ``cifar10_conv`` setting: Figure 7's all ten classes on
the training or the test images, or held-out labels (``cifar5``, ``cifar2``). Every ``--learned``
optimizer and tuned baseline runs on the same problems (paired); each step records the minibatch
loss and the held-out loss on the other split. Curves are cached in ``<output_dir>/<experiment>/
cache`` (``--reuse_from`` gathers parallel runs). Writes ``results.json``, ``curves.npz``,
``curves.png`` per experiment and a markdown summary. More: docs/cifar10.md.
"""

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

import experiments
import learned_opt
import tasks
from eval import baselines as baselines_lib
from eval import cache, engine, plots, report
from eval import curves as curves_lib
from train import command_line
from train.config_flags import setting

HELD_OUT = (5, 6, 7, 8, 9)  # labels the "sub" optimizer (trained on 0..4) never saw
REPORT_STEPS = (10, 25, 50)  # steps where paired differences are reported besides the last


class Experiment(NamedTuple):
  name: str
  title: str  # the paper's panel it repeats
  classes: tuple[int, ...] | None  # None: all ten
  split: str = "train"  # the images the optimizee is trained on; the other split is held out


EXPERIMENTS = (
  Experiment("cifar10", "Fig. 7 left: CIFAR-10 problems on the training images", None),
  Experiment("cifar10_test", "Fig. 7 right: CIFAR-10 problems on the test images", None, "test"),
  Experiment("cifar5", "CIFAR-5: held-out labels 5-9 (training images)", HELD_OUT),
  Experiment("cifar2", "CIFAR-2: held-out labels 5 and 6 (training images)", HELD_OUT[:2]),
)
BY_NAME = {e.name: e for e in EXPERIMENTS}
SUMMARY = "results_cifar10.md"


class Curves(NamedTuple):
  """Per-problem losses of one optimizer, each shaped (problems, num_steps + 1)."""

  train: np.ndarray  # f(theta_t) on step t's minibatch: the objective being minimized
  test: np.ndarray  # loss of theta_t on a minibatch of the other split's images (held out)


def pairs(results: dict, curves: dict[str, Curves]) -> list[dict]:
  """``report.pairs`` at the final step, ``REPORT_STEPS`` and over the run, train and test."""
  num_steps = results["num_steps"]
  steps = [s for s in REPORT_STEPS if s < num_steps] + [num_steps]
  kinds = {r["name"]: r["kind"] for r in results["optimizers"]}
  return report.pairs(kinds, {n: c._asdict() for n, c in curves.items()}, steps)


@dataclasses.dataclass(frozen=True)
class Cifar10Config(experiments.ExperimentConfig):
  """What ``experiments.cifar10_experiments`` runs; each field is one flag of the command."""

  learned: tuple[str, ...] = setting(
    ["two_lstms=pretrained:cifar10_conv"],
    "Learned optimizers as NAME=DIR (a saved optimizer) or NAME=pretrained:NAME; empty: "
    "baselines only (they are cached for a later run).",
  )
  experiments: tuple[str, ...] = setting(list(BY_NAME), "Experiments to run.")
  num_problems: int = setting(64, "Fresh test problems per experiment.")
  num_steps: int = setting(100, "Optimizee steps per problem.")
  tune_problems: int = setting(4, "Separate problems the learning rates are tuned on.")
  lr_stride: int = setting(
    1, "1: tune on the whole paper grid; s > 1: every s-th rate, then refine."
  )
  lr_exponents: tuple[str, ...] = setting(
    [], "Tune on these k of the paper's grid 1e-6 * 2^k only (default all 30); one k: no tuning."
  )
  seed: int = setting(2016, "Seed of the test problems; tuning uses seed + 1.")
  lr_batch_size: int = setting(4, "Learning rates vmapped at once (bounds memory; 0: all).")
  problem_batch: int = setting(8, "Test problems vmapped at once (bounds memory; 0: all).")
  reuse_from: tuple[str, ...] = setting(
    [],
    "Other output dirs whose cached baselines and learned curves (same setting, same phi) are "
    "reused, e.g. of runs in parallel; of several runs of a baseline, the best on the test "
    "problems.",
  )
  task_kwargs: dict = setting(
    {}, "JSON changes to the cifar10_conv task (e.g. channels).", example='{"channels": [8]}'
  )
  summary: str | None = setting(None, f"Markdown summary; default OUTPUT_DIR/{SUMMARY}.")

  def __post_init__(self):
    super().__post_init__()
    report.check_names("experiments", self.experiments, BY_NAME)
    if self.num_problems < 2 or self.tune_problems < 1 or self.lr_stride < 1:
      raise ValueError("--num_problems must be >= 2, --tune_problems >= 1, --lr_stride >= 1.")
    if not all(k.isdigit() and int(k) < 30 for k in self.lr_exponents):
      raise ValueError(f"--lr_exponents must be integers 0..29, got {list(self.lr_exponents)}.")
    if "classes" in self.task_kwargs or "split" in self.task_kwargs:
      raise ValueError("--task_kwargs may not set classes or split (the experiments set them).")


def run_experiment(experiment: Experiment, learned: dict[str, learned_opt.SavedOptimizer],
                   config: Cifar10Config, directory: str, reuse_from: Sequence[str] = (),
                   log=print) -> tuple[dict, dict[str, Curves]]:  # fmt: skip
  """``(results, {optimizer name: Curves})`` of learned optimizers and tuned baselines on one
  setting (``eval.engine``), cached in ``directory/cache`` (``reuse_from``: other runs')."""
  c, seed = config, config.seed
  classes = None if experiment.classes is None else list(experiment.classes)
  kwargs = {**c.task_kwargs, "classes": classes}
  other = {"train": "test", "test": "train"}[experiment.split]
  task = tasks.get("cifar10_conv", split=experiment.split, **kwargs)
  test_task = tasks.get("cifar10_conv", split=other, **kwargs)
  grid = baselines_lib.paper_learning_rates()
  if c.lr_exponents:  # a subset 1e-6 * 2^k of the paper's grid
    grid = grid[np.asarray(sorted(int(k) for k in c.lr_exponents))]
  tuning = engine.Tuning(
    tuple(grid.tolist()), c.lr_stride, engine.Problems(c.tune_problems, seed + 1)
  )
  spec = engine.Spec(
    task, engine.Problems(c.num_problems, seed), c.num_steps, learned=learned,
    baselines=tuple(c.baselines), tuning=tuning, problem_batch=c.problem_batch or None,
    observables=(curves_lib.held_out_loss(test_task, "test"),), lr_batch=c.lr_batch_size or None,
    cache_dir=os.path.join(directory, "cache"), reuse_from=tuple(reuse_from),
  )  # fmt: skip
  found = engine.run(spec, log=lambda s: log(f"{experiment.name} {s}"))
  optimizers = [
    report.summarize_observables(r, {curves_lib.LOSS: "train", "test": "test"}) for r in found
  ]
  curves = {r.name: Curves(r.curves[curves_lib.LOSS], r.curves["test"]) for r in found}
  swept = {k for r in optimizers for k in r.get("tuning_scores", {})}
  results = {
    "experiment": experiment.name,
    "title": experiment.title,
    "task": {k: v for k, v in task.config.items() if k not in cache.LOCAL},
    "num_problems": c.num_problems,
    "num_steps": c.num_steps,
    "seed": seed,
    "tuning": {
      "num_problems": c.tune_problems,
      "seed": seed + 1,
      "criterion": "lowest mean final training loss",
      "grid": "1e-6 * 2^k, k = 0..29",
      "lr_stride": c.lr_stride,
      "rates_swept": len(swept),
    },  # fmt: skip
    "optimizers": optimizers,
  }
  results["pairs"] = pairs(results, curves)
  return results, curves


def plot(results: dict, path: str) -> None:
  """Mean training- and test-set loss against step side by side; learned solid, baselines dashed."""
  names = {"train": "training", "test": "test"}
  split = results["task"]["split"]
  other = {"train": "test", "test": "train"}[split]
  panels = [
    ("train_mean_curve", f"objective: {names[split]} images"),
    ("test_mean_curve", f"held out: {names[other]} images"),
  ]
  optimizers = sorted(results["optimizers"], key=lambda r: r["train_final_mean"])
  ylabel = f"mean loss over {results['num_problems']} problems"
  plots.figure(optimizers, path, panels, title=results["title"], ylabel=ylabel)


def markdown(results: dict) -> str:
  """One experiment's tables: every optimizer, then paired differences of each learned one."""
  t, name, split = results["tuning"], results["experiment"], results["task"]["split"]
  tuned = report.tuning_text(results)
  cell = lambda r, k: report.mean_pm(r[f"{k}_mean"], r[f"{k}_stderr"])
  keys = ("train_final", "train_run_mean", "test_final", "test_run_mean")
  rows = [
    [r["name"], report.lr_cell(r), *(cell(r, k) for k in keys), r["num_diverged"]]
    for r in sorted(results["optimizers"], key=lambda r: r["train_final_mean"])
  ]
  lines = [
    f"## {name}: {results['title']}",
    "",
    f"{results['num_problems']} test problems (seed {results['seed']}), {results['num_steps']} "
    f"steps, task `{json.dumps(results['task'])}`. Baselines: rates from the paper's grid "
    f"{t['grid']}, {tuned}. Loss: mean cross-entropy (nats) on a minibatch of "
    f"128 of the {split} images (the objective); held out: the same parameters on the other "
    "split's images. Lower is better.",
    "",
    *report.table(
      ["optimizer", "lr", "final loss", "mean over run", "held-out final",
       "held-out mean over run", "diverged"], rows,
    ),
  ]  # fmt: skip
  steps = list(results["pairs"][0]["train_steps"]) if results["pairs"] else []
  if steps:
    header = ["pair", "mean over run", *(f"step {s}" for s in steps)]
    pairs_rows = [
      [f"{p['learned']} - {p['other']}", report.pm(p["train_run_mean"]),
       *(report.pm(p["train_steps"][s]) for s in steps), report.pm(p["test_run_mean"]),
       report.pm(p["test_steps"][steps[-1]])]
      for p in results["pairs"]
    ]  # fmt: skip
    lines += [
      "",
      "Paired differences (first minus second, mean ± standard error over the shared test "
      "problems; negative: the first is lower) of the objective, and of the held-out loss:",
      "",
      *report.table([*header, "held-out mean over run", "held-out final"], pairs_rows),
    ]
  return "\n".join([*lines, "", f"![{name}]({name}/curves.png)", ""])


def summary_text(found: dict[str, dict], learned: Sequence[str] | None = None) -> str:
  """The summary of every experiment's results; ``learned``: default the first's sources."""
  learned = next(iter(found.values()))["learned_sources"] if learned is None else learned
  sources = ", ".join(f"`{s}`" for s in learned)
  title, details = (
    "CIFAR-10 results (section 3.3, Figure 7)",
    f" with learned optimizers {sources}.",
  )
  header = report.summary_header(title, "cifar10_experiments", details)
  return "\n".join([header, "", *map(markdown, found.values())])


def parse_learned(specs: Sequence[str]) -> dict[str, learned_opt.SavedOptimizer]:
  """``["name=dir", "name=pretrained:x"]`` -> ``{name: SavedOptimizer}``; ValueError if bad."""
  found = {}
  for spec in specs:
    name, sep, source = spec.partition("=")
    if not sep or not name or not source:
      raise ValueError(f"--learned entry {spec!r} is not NAME=DIR or NAME=pretrained:NAME.")
    if name in found or name in baselines_lib.BASELINES:
      raise ValueError(f"--learned name {name!r} is repeated or a baseline's name.")
    found[name] = learned_opt.load(learned_opt.shipped.resolve(source))
  return found


def main(config: Cifar10Config) -> None:
  try:
    learned = parse_learned(config.learned)
    tasks.get("cifar10_conv", split="test", **config.task_kwargs)  # no data: a usage error now
  except (ValueError, FileNotFoundError) as e:
    raise command_line.UsageError(str(e)) from e

  def run(name: str) -> dict:
    report.say(f"== {name}: {BY_NAME[name].title}")
    reuse_from = [os.path.join(d, name, "cache") for d in config.reuse_from]
    directory = os.path.join(config.output_dir, name)
    results, curves[name] = run_experiment(
      BY_NAME[name], learned, config, directory, reuse_from, report.say
    )
    return {**results, "learned_sources": list(config.learned)}

  def each(results: dict, directory: str) -> None:
    found = curves[results["experiment"]]
    arrays = {f"{n}/{s}": getattr(c, s) for n, c in found.items() for s in ("train", "test")}
    np.savez_compressed(os.path.join(directory, "curves.npz"), **arrays)
    plot(results, os.path.join(directory, "curves.png"))
    print(markdown(results), flush=True)

  curves, summary = {}, config.summary or os.path.join(config.output_dir, SUMMARY)
  text = lambda found: summary_text(found, config.learned)
  report.run_each(config.experiments, run, config.output_dir, summary, text, each, BY_NAME)


COMMAND = experiments.command(
  main, Cifar10Config, __doc__, (SUMMARY, *BY_NAME), "CIFAR-10 experiments' output"
)

run = COMMAND.run  # the command line (tests/multihost_worker.py starts it too)

if __name__ == "__main__":
  run()
