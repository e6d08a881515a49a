r"""Neural art (section 3.4, Figures 6 and 8-10): evaluate and draw, one stage a command.

Examples:
  python -m train.meta_train --task=neural_art --output_dir=runs/art   # meta-training
  python -m experiments.neural_art evaluate --checkpoint=runs/art --output_dir=runs/art_eval
  python -m experiments.neural_art figures --checkpoint=runs/art --output_dir=runs/art_eval

``evaluate``: the trained optimizer and every baseline (tuned on validation contents over every
``--lr_stride``-th rate of the paper's grid) on the same held-out test contents, in Figure 8's
two settings (``SETTINGS``). ``figures``: styled images (content | LSTM | tuned Adam | style) and
the update plots of Figures 9 and 10 for a corner pixel's channels. More: docs/neural_art.md.
"""

import dataclasses
import importlib.resources
import json
import os
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

import experiments
import learned_opt
from eval import baselines as baselines_lib
from eval import compare, engine, plots, report, run_config, visualize
from eval import curves as curves_lib
from tasks import art_images, neural_art, vgg16
from tasks.base import TaskFamily
from train import Run, command_line, distributed
from train import config as config_lib
from train import inner as inner_lib
from train.config_flags import setting


class Setting(NamedTuple):
  name: str
  title: str  # the paper's figure it repeats
  scale: int  # test resolution over the training resolution
  style: str | None  # None: the training style


SETTINGS = (
  Setting("train_style", "Fig. 8 left: training style, training resolution", 1, None),
  Setting("new_style_2x", "Fig. 8 right: new style, double resolution", 2, "hubble_deep_field"),
)
_BY_NAME = {s.name: s for s in SETTINGS}
SUMMARY = "results_neural_art.md"
STAGES = ("evaluate", "figures")
TUNING_FIELDS = ("num_problems", "learning_rates")  # of the first tuned baseline's record


def train_config(output_dir: str, task_kwargs: dict, **overrides) -> config_lib.MetaTrainConfig:
  """``python -m train.meta_train --task=neural_art``'s config: the ``neural_art`` preset on
  ``task_kwargs`` and ``overrides``; a run in ``output_dir`` keeps the validation it began with."""
  preset = importlib.resources.files("train").joinpath("configs", "neural_art.json")
  settings = {**json.loads(preset.read_text()), "task_kwargs": task_kwargs, **overrides}
  del settings["description"]
  run = Run(output_dir)
  if run.has_config():
    settings["valid_task_kwargs"] = run.saved_config().get("valid_task_kwargs", {})
  return config_lib.MetaTrainConfig(output_dir=output_dir, **settings)


def setting_task(train_kwargs: dict, setting: Setting, split: str, num: int) -> TaskFamily:
  """The family of ``setting`` on ``num`` contents of ``split``, from the training settings."""
  size = train_kwargs.get("size", 64) * setting.scale
  style = setting.style or train_kwargs.get("style", "immunohistochemistry")
  kwargs = {**train_kwargs, "split": split, "num_contents": num, "size": size, "style": style}
  return neural_art.neural_art(**kwargs)


def learned_name(saved) -> str:
  """A trained optimizer's label in tables and plots: its kind, e.g. ``LSTM``, ``NTM-LBFGS``."""
  return run_config.kind_name(saved).upper().replace("_", "-")


def problems(num: int) -> engine.Problems:
  """The first ``num`` contents, each styled once; the loss and the content init use no key."""
  return engine.Problems(num, seed=0, draw="in_order")


def _rank(result: dict) -> tuple[int, float]:
  return result["num_diverged"], float(report.finite(result["finals"]).mean())


def markdown(all_results: dict[str, dict], header: str) -> str:
  """One table per setting: lr, final loss (mean ± stderr), median, mean over the run."""

  def section(results: dict) -> list[str]:
    rows = []
    for r in sorted(results["optimizers"], key=_rank):
      finals, runs = report.finite(r["finals"]), report.finite(r["run_means"])
      note = f" (of {finals.size} not diverged)" if r["num_diverged"] else ""
      rows.append(
        [r["name"], report.lr_text(r), report.mean_pm(finals.mean(), report.stderr(finals)) + note,
         f"{np.median(finals):.4f}", f"{runs.mean():.4f}", r["num_diverged"]]
      )  # fmt: skip
    return [
      f"{results['num_problems']} test contents styled once each, {results['num_steps']} steps, "
      f"size {results['task']['size']}, style `{results['task']['style']}`; baselines tuned on "
      f"{results['tuning']['num_problems']} validation contents over "
      f"{len(results['tuning']['learning_rates'])} rates.",
      "",
      *report.table(["optimizer", "lr", "final loss, mean ± stderr", "median",
                     "mean over steps 1..T", "diverged"], rows),
      "",
      report.verdict_vs_each(results),
    ]  # fmt: skip

  return report.summary(header, all_results, {s.name: s.title for s in SETTINGS}, section)


def summary_text(found: dict[str, dict]) -> str:
  """The summary of every setting's results."""
  title = "Neural art results (section 3.4, Figure 8)"
  return markdown(found, report.summary_header(title, "neural_art evaluate", "."))


def evaluate(train_kwargs: dict, learned: dict, settings, output_dir: str, *,
             baselines=tuple(baselines_lib.BASELINES), num_problems=32, tune_problems=2,
             num_steps=128, learning_rates=None, lr_batch_size=None, reuse_baselines=False,
             log=print) -> dict:  # fmt: skip
  """``{setting name: results}`` of learned optimizers and baselines (tuned on ``tune_problems``
  validation contents) in each setting; writes results, curves, summary. Curves are cached in
  ``<output_dir>/<setting>/cache``; with ``reuse_baselines`` a baseline cached there for the same
  test contents is reused whatever grid it was tuned on (of several, the best on them)."""
  rates = np.asarray(
    baselines_lib.paper_learning_rates() if learning_rates is None else learning_rates
  ).tolist()
  chosen = {s.name: s for s in settings}

  def run(name: str) -> dict:
    test_task = setting_task(train_kwargs, chosen[name], "test", num_problems)
    tune_task = setting_task(train_kwargs, chosen[name], "valid", tune_problems)
    cache_dir = os.path.join(output_dir, name, "cache")
    tuning = engine.Tuning(tuple(rates), problems=problems(tune_problems), task=tune_task)
    spec = engine.Spec(
      test_task, problems(num_problems), num_steps, learned=learned, tuning=tuning,
      baselines=tuple(baselines), lr_batch=lr_batch_size, cache_dir=cache_dir,
      reuse=reuse_baselines, reuse_from=(cache_dir,) if reuse_baselines else (),
    )  # fmt: skip
    found = engine.run(spec, log=lambda s: log(f"{name} {s}"))
    tuned = [r.record["tuning"] for r in found if r.record.get("tuning")]
    tuned = tuned[0] if tuned else {"num_problems": tune_problems, "learning_rates": rates}
    return {
      "task": dict(test_task.config), "num_problems": num_problems, "num_steps": num_steps,
      "tuning": {"problems": "validation contents", **{k: tuned[k] for k in TUNING_FIELDS}},
      "optimizers": compare.summaries(found),
    }  # fmt: skip

  def each(results: dict, directory: str) -> None:
    name = os.path.basename(directory)
    # Figure 8: the median, zoomed, so a baseline diverged on a few contents keeps its curve.
    optimizers = sorted(results["optimizers"], key=_rank)
    ylabel = f"median loss over {num_problems} test contents"
    path, title = os.path.join(directory, "curves.png"), chosen[name].title
    plots.figure(optimizers, path, [("median_curve", "")], title=title, ylabel=ylabel, zoom=True)
    log(f"{name}: {results['seconds']:.0f} s\n{report.format_table(results)}")

  summary = os.path.join(output_dir, SUMMARY)
  return report.run_each(list(chosen), run, output_dir, summary, summary_text, each, _BY_NAME)


def final_images(task: TaskFamily, tx, task_params, num_steps: int) -> np.ndarray:
  """theta_T of ``tx`` on each problem, as uint8 images (problems, size, size, 3)."""
  num = jax.tree.leaves(task_params)[0].shape[0]
  keys = engine.draw(task, problems(num))[1]

  def one(data, params, key):
    state = inner_lib.start(task, tx, data, params, key, key)
    return inner_lib.run(task, tx, data, state, num_steps)[1].params["image"]

  run = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
  return neural_art.styled_images(run(task.data, task_params, keys))


def tuned_rate(output_dir: str, setting: str, name: str, default: float) -> float:
  """A baseline's tuned rate from ``evaluate``'s results in ``output_dir``, else ``default``."""
  found = report.read_results(output_dir, [setting]).get(setting, {"optimizers": []})
  rates = [r["learning_rate"] for r in found["optimizers"] if r["name"] == name]
  return float(rates[0]) if rates and rates[0] is not None else default


def styled_figure(saved, train_kwargs, setting, output_dir, num, num_steps, adam_lr, contents=None):
  """Rows of content | LSTM | tuned Adam | style for the first ``num`` test contents; a PNG."""
  kwargs = dict(train_kwargs, **({"contents": contents} if contents else {}))
  task = setting_task(kwargs, setting, "test", num)
  params = engine.draw(task, problems(num))[0]
  lstm = final_images(task, learned_opt.as_optax(saved), params, num_steps)
  adam = final_images(task, baselines_lib.BASELINES["adam"](adam_lr), params, num_steps)
  style = neural_art.art_images.style_image(task.config["style"], task.config["size"])
  rows = [[np.asarray(task.data.contents[i]), lstm[i], adam[i], style] for i in range(num)]
  name = f"styled_{setting.name}{'_' + contents if contents else ''}.png"
  return plots.image_grid(rows, os.path.join(output_dir, name))


def update_figures(saved, train_kwargs, output_dir, num_steps, sgd_lr, adam_lr, coordinates):
  """Figures 9 and 10 (Appendix C) for each coordinate on the first test content; PNG paths.

  Each coordinate's gradients are probed over twice the largest gradient it sees along the
  LSTM's trajectory (the paper's +-400 is in the units of its own loss, not ours).
  """
  task = setting_task(train_kwargs, SETTINGS[0], "test", 1)
  params, key = jax.tree.map(lambda x: x[0], engine.draw(task, problems(1)))
  optimizers = {
    "LSTM": learned_opt.as_optax(saved),
    "ADAM": baselines_lib.BASELINES["adam"](adam_lr),
    "SGD": baselines_lib.BASELINES["sgd"](sgd_lr),
  }
  # Flattened gradients along the LSTM's trajectory: eval.visualize.trace_updates' (same keys).
  grad = lambda d, s, k: jax.flatten_util.ravel_pytree(inner_lib.gradient(task, d, s)[1])[0]
  observe = (curves_lib.Observable("gradient", grad, task.data),)
  rollout = lambda d, p, k: curves_lib.rollout(
    task, optimizers["LSTM"], d, (d,), p, k, num_steps, observe
  )["gradient"][:-1]
  seen = jax.jit(rollout)(task.data, params, key)
  paths = []
  for coordinate in coordinates:
    largest = float(jnp.max(jnp.abs(seen[:, coordinate])))
    grid = jnp.linspace(-2 * largest, 2 * largest, 101)
    run = jax.jit(
      lambda d, p, k, g, c=coordinate: visualize.trace_updates(
        task, optimizers, "LSTM", d, p, k, num_steps, c, g
      )
    )
    traces = run(task.data, params, key, grid)
    path = os.path.join(output_dir, f"updates_coordinate{coordinate}.png")
    visualize.plot_traces(traces, path, steps=(0, 1, num_steps // 2, num_steps - 1))
    report.write(
      path.replace(".png", ".json"),
      jax.tree.map(lambda x: np.asarray(x).tolist(), traces._asdict()),
    )
    paths.append(path)
  return paths


@dataclasses.dataclass(frozen=True)
class NeuralArtConfig(experiments.ExperimentConfig):
  """What a stage of ``experiments.neural_art`` does; the stage is the first word, each other
  field one flag of the command."""

  stage: str = setting("evaluate", f"The stage: {' or '.join(STAGES)}.")
  checkpoint: str | None = setting(None, "Trained optimizer: a directory or pretrained:NAME.")
  task_kwargs: dict | None = setting(
    None, "JSON training-task settings; default: the checkpoint's.", example='{"size": 64}'
  )
  settings: tuple[str, ...] = setting(list(_BY_NAME), "Figure 8 settings to evaluate.")
  num_problems: int = setting(32, "Test contents, each styled once.")
  tune_problems: int = setting(2, "Validation contents the learning rates are tuned on.")
  num_steps: int = setting(128, "Optimizee steps per image (the paper's 128).")
  lr_first: int = setting(0, "First rate, as an index into the paper's 30-rate grid.")
  lr_stride: int = setting(3, "Every lr_stride-th rate of the paper's grid from there.")
  lr_batch_size: int = setting(0, "Rates vmapped at once; 0: all.")
  reuse_baselines: bool = setting(
    False, "Reuse curves cached in OUTPUT_DIR/<setting>/cache (same setting)."
  )
  baselines_only: bool = setting(False, "evaluate: no learned optimizer (needs --task_kwargs).")
  num_images: int = setting(4, "figures: test contents styled per setting.")
  coordinates: tuple[str, ...] = setting(
    ["0", "1", "2"], "figures: flattened pixel-channel indices."
  )
  trace_steps: int = setting(32, "figures: steps traced (Appendix C shows 32).")

  def __post_init__(self):
    if self.stage == "train":
      raise ValueError(
        "meta-training is `python -m train.meta_train --task=neural_art --output_dir=DIR` (the "
        "neural_art preset; flags given there replace its settings)."
      )
    if self.stage not in STAGES:
      raise ValueError(f"Give one stage first: {' or '.join(STAGES)}, not {self.stage!r}.")
    super().__post_init__()
    report.check_names("settings", self.settings, _BY_NAME)
    if not all(c.isdigit() for c in self.coordinates):
      raise ValueError(f"--coordinates must be indices >= 0, got {list(self.coordinates)}.")
    if not (self.checkpoint or self.task_kwargs is not None and self.baselines_only):
      raise ValueError("--checkpoint is required (or --baselines_only with --task_kwargs).")


def _train_kwargs(config: NeuralArtConfig) -> dict:
  if config.task_kwargs is not None:
    return config.task_kwargs
  name, kwargs = run_config.trained_task(run_config.resolve(config.checkpoint))
  if name != "neural_art":
    raise ValueError(f"--checkpoint={config.checkpoint} was trained on {name!r}, not neural_art.")
  return kwargs


def main(config: NeuralArtConfig) -> None:
  try:
    kwargs = _train_kwargs(config)
    learned = config.stage == "figures" or not config.baselines_only
    saved = learned_opt.load(run_config.resolve(config.checkpoint)) if learned else None
  except (ValueError, FileNotFoundError) as e:
    raise command_line.UsageError(str(e)) from e
  settings, out = [_BY_NAME[s] for s in config.settings], config.output_dir
  made = not os.path.exists(out)
  try:
    if config.stage == "evaluate":
      rates = baselines_lib.paper_learning_rates()[config.lr_first :: config.lr_stride]
      evaluate(
        kwargs, {} if saved is None else {learned_name(saved): saved}, settings, out,
        baselines=config.baselines, num_problems=config.num_problems, learning_rates=rates,
        tune_problems=config.tune_problems, num_steps=config.num_steps, log=report.say,
        lr_batch_size=config.lr_batch_size or None, reuse_baselines=config.reuse_baselines,
      )  # fmt: skip
    elif distributed.is_writer():  # figures: a few images on process 0's first device, no sweep
      os.makedirs(out, exist_ok=True)
      adam = tuned_rate(out, SETTINGS[0].name, "adam", 0.02)
      sgd = tuned_rate(out, SETTINGS[0].name, "sgd", 1.0)
      for case in settings:
        rate = tuned_rate(out, case.name, "adam", adam)
        print(styled_figure(saved, kwargs, case, out, config.num_images, config.num_steps, rate))
      coordinates = [int(c) for c in config.coordinates]
      for path in update_figures(saved, kwargs, out, config.trace_steps, sgd, adam, coordinates):
        print(path, flush=True)
  except (vgg16.WeightsError, art_images.ImagesError) as e:  # no VGG16 weights, no images:
    if made and os.path.isdir(out) and not os.listdir(out):  # found as the first setting starts
      os.rmdir(out)  # a start that failed leaves nothing
    raise command_line.UsageError(str(e)) from e


FILES = (SUMMARY, *_BY_NAME, *(f"styled_{s}.png" for s in _BY_NAME))
COMMAND = experiments.command(
  main, NeuralArtConfig, __doc__, FILES, "neural-art output", positional="stage"
)

run = COMMAND.run  # the command line (tests/multihost_worker.py starts it too)

if __name__ == "__main__":
  run()
