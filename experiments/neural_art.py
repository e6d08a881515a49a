r"""Neural art (section 3.4, Figures 6 and 8-10): meta-train, evaluate, draw, in one command.

Examples:
  python -m experiments.neural_art train --output_dir=runs/art
  python -m experiments.neural_art evaluate --checkpoint=runs/art --output_dir=runs/art_eval
  python -m experiments.neural_art figures --checkpoint=runs/art --output_dir=runs/art_eval

``train`` runs ``train.trainer.train`` with this experiment's recipe (``RECIPE``; the LSTM with
Appendix A preprocessing and no postprocessing, unrolls of 32, 128 steps per image).
``evaluate`` runs the trained optimizer and every tuned baseline on held-out test contents in
Figure 8's two settings (``SETTINGS``): each content is styled once (``problems_in_order``) and
every optimizer sees the same ones, so comparisons are paired. Baselines are tuned on
*validation* contents (never the test ones) over every ``--lr_stride``-th rate of the paper's
grid. ``figures`` writes styled images (content | LSTM | tuned Adam | style) and the update
plots of section 4 (Figures 9 and 10, Appendix C) for the three colour channels of a corner pixel.
"""

import json
import os
import time
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import learned_opt
from eval import baselines as baselines_lib
from eval import compare, plots, run_config, visualize
from learned_opt.tree_files import atomic_write
from tasks import neural_art
from tasks.base import TaskFamily
from train import command_line, distributed, run_dir, saved_config, trainer
from train import config as config_lib
from train import inner as inner_lib


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
# Meta-training recipe (section 3.4): the LSTM, Appendix A preprocessing, no postprocessing
# (output_scale is a constant factor, not a learned postprocessing), unrolls of 32, 128 steps.
RECIPE = {
  "optimizer": "lstm",
  "optimizer_kwargs": {"preprocess": "log_sign", "output_scale": 0.1},
  "unroll": 32,
  "horizon": 128,
  # Validation on the held-out contents (the paper's 20), at the split's own size.
  "valid_task_kwargs": {"split": "valid", "num_contents": None},
}


def train_config(output_dir: str, task_kwargs: dict, **overrides) -> config_lib.MetaTrainConfig:
  """The recipe as a validated ``MetaTrainConfig``; ``overrides`` are any of its fields.

  A run in ``output_dir`` keeps the validation it started with, so runs begun before the
  recipe validated on held-out contents (they validated on the training pool) still resume.
  """
  settings = {**RECIPE, **overrides}
  saved = os.path.join(output_dir, run_dir.CONFIG_FILE)
  if os.path.isfile(saved):
    settings["valid_task_kwargs"] = saved_config.read_saved(saved).get("valid_task_kwargs", {})
  return config_lib.MetaTrainConfig(
    output_dir=output_dir, task="neural_art", task_kwargs=task_kwargs, **settings
  )


def setting_task(train_kwargs: dict, setting: Setting, split: str, num: int) -> TaskFamily:
  """The family of ``setting`` on ``num`` contents of ``split``, from the training settings."""
  size = train_kwargs.get("size", 64) * setting.scale
  style = setting.style or train_kwargs.get("style", "immunohistochemistry")
  kwargs = {**train_kwargs, "split": split, "num_contents": num, "size": size, "style": style}
  return neural_art.neural_art(**kwargs)


def learned_name(saved) -> str:
  """A trained optimizer's label in tables and plots: its kind, e.g. ``LSTM``, ``NTM-LBFGS``."""
  return run_config.kind_name(saved).upper().replace("_", "-")


def run_keys(num: int) -> jax.Array:
  """Run keys of ``num`` problems; the loss and the content init use none of their randomness."""
  return jax.random.split(jax.random.key(0), num)


def with_run_means(summary: dict, curves: np.ndarray) -> dict:
  """Adds each problem's mean loss over steps 1..T (eq. 3 with w_t = 1, over T)."""
  summary["run_means"] = np.mean(curves[:, 1:], axis=1).tolist()
  summary["run_mean"] = float(np.mean(summary["run_means"]))
  return summary


def tuned_baseline(name, test_task, tune_task, num_test, num_tune, num_steps, rates, lr_batch):
  """A baseline tuned on ``tune_task``'s contents and run at its best rate on the test ones."""
  make_tx = baselines_lib.BASELINES[name]
  tune_params = neural_art.problems_in_order(tune_task, num_tune)
  grid = compare.sweep(
    tune_task, make_tx, rates, tune_params, run_keys(num_tune), num_steps, lr_batch
  )
  best = baselines_lib.best_learning_rate(grid[:, :, -1])
  rate = float(rates[best])
  test_params = neural_art.problems_in_order(test_task, num_test)
  curves = compare.sweep(test_task, make_tx, [rate], test_params, run_keys(num_test), num_steps)[0]
  summary = with_run_means(compare.summarize(name, "baseline", curves, rate), curves)
  finals = np.where(np.isfinite(grid[:, :, -1]), grid[:, :, -1], np.inf)
  summary["grid_final_means"] = np.mean(finals, axis=1).tolist()
  return summary


def learned_result(name, saved, test_task, num_test, num_steps) -> dict:
  """A trained optimizer on the test contents, in order."""
  params = neural_art.problems_in_order(test_task, num_test)
  curves = compare.learned_curves(test_task, saved, params, run_keys(num_test), num_steps)
  return with_run_means(compare.summarize(name, "learned", curves, None), curves)


def paired(learned: dict, baseline: dict, key: str) -> tuple[float, float, int, int]:
  """Learned - baseline per problem on ``key`` (``"finals"`` or ``"run_means"``).

  A non-finite value (a diverged run) counts as +inf: it loses to any finite one.

  Returns:
    ``(mean, stderr, wins, both)``: mean and standard error of the difference over the
    ``both`` problems where both are finite, and on how many problems of all the learned
    optimizer is lower.
  """
  a = np.asarray(learned[key], float)
  b = np.asarray(baseline[key], float)
  a, b = np.where(np.isfinite(a), a, np.inf), np.where(np.isfinite(b), b, np.inf)
  both = np.isfinite(a) & np.isfinite(b)
  diff = a[both] - b[both]
  mean = float(np.mean(diff)) if diff.size else float("nan")
  stderr = float(np.std(diff, ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0
  return mean, stderr, int(np.sum(a < b)), int(np.sum(both))


def verdict(results: dict) -> str:
  """Whether the learned optimizer beats each tuned baseline at step T, paired by content.

  It beats a baseline when it diverges on no more contents and its mean paired difference over
  the contents where neither diverged is more than two standard errors below zero.
  """
  learned = [r for r in results["optimizers"] if r["kind"] == "learned"]
  if not learned:
    return "No learned optimizer in these results."
  lstm, lines, beaten = learned[0], [], []
  for r in (r for r in results["optimizers"] if r["kind"] == "baseline"):
    margin, stderr, wins, both = paired(lstm, r, "finals")
    run_margin, run_stderr, run_wins, _ = paired(lstm, r, "run_means")
    beaten.append(lstm["num_diverged"] <= r["num_diverged"] and margin < -2 * stderr)
    lines.append(
      f"- vs {r['name']} (lr {r['learning_rate']:.3g}, {r['num_diverged']} diverged): "
      f"final {margin:+.4f} ± {stderr:.4f} over {both}, lower on {wins}/{len(r['finals'])}; "
      f"mean over the run {run_margin:+.4f} ± {run_stderr:.4f}, lower on {run_wins}"
    )
  head = "beats every tuned baseline" if all(beaten) else "does NOT beat every tuned baseline"
  return (
    f"{lstm['name']} {head} at step {results['num_steps']} (paired by content; a difference "
    "counts when more than 2 stderr):\n" + "\n".join(lines)
  )


def _finite(values) -> np.ndarray:
  values = np.asarray(values, float)
  return values[np.isfinite(values)] if np.isfinite(values).any() else np.full(1, np.nan)


def _stderr(values: np.ndarray) -> float:
  return float(np.std(values, ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0


def _rank(result: dict) -> tuple[int, float]:
  return result["num_diverged"], float(_finite(result["finals"]).mean())


def markdown(all_results: dict[str, dict], header: str) -> str:
  """One table per setting: lr, final loss (mean ± stderr), median, mean over the run."""
  lines = [header, ""]
  for name, results in all_results.items():
    lines += [
      f"## {name}: {_BY_NAME[name].title}",
      "",
      f"{results['num_problems']} test contents styled once each, {results['num_steps']} steps, "
      f"size {results['task']['size']}, style `{results['task']['style']}`; baselines tuned on "
      f"{results['tuning']['num_problems']} validation contents over "
      f"{len(results['tuning']['learning_rates'])} rates.",
      "",
      "| optimizer | lr | final loss, mean ± stderr | median | mean over steps 1..T | diverged |",
      "|---|---|---|---|---|---|",
    ]
    for r in sorted(results["optimizers"], key=_rank):
      lr = "-" if r["learning_rate"] is None else f"{r['learning_rate']:.3g}"
      finals, runs = _finite(r["finals"]), _finite(r["run_means"])
      note = f" (of {finals.size} not diverged)" if r["num_diverged"] else ""
      lines.append(
        f"| {r['name']} | {lr} | {finals.mean():.4f} ± {_stderr(finals):.4f}{note} | "
        f"{np.median(finals):.4f} | {runs.mean():.4f} | {r['num_diverged']} |"
      )
    lines += ["", verdict(results), ""]
  return "\n".join(lines)


def plot_figure8(results: dict, path: str, title: str) -> None:
  """Figure 8: each optimizer's median loss over the test contents against step, log scale.

  The median, not the mean, so a baseline that diverged on a few contents keeps its curve;
  the y-axis is cut a little above the loss at theta_0 (a baseline's early spike can leave it).
  """
  plt = plots.plt
  fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
  for r in sorted(results["optimizers"], key=_rank):
    curve = np.asarray(r["median_curve"], float)
    lr = "" if r["learning_rate"] is None else f" (lr {r['learning_rate']:.2g})"
    learned = r["kind"] == "learned"
    ax.plot(curve, "-" if learned else "--", linewidth=2 if learned else 1.2, label=r["name"] + lr)
  ax.set_yscale("log")
  # Zoom in as the paper does: from the lowest loss to a little above the loss at theta_0.
  curves = [np.asarray(r["median_curve"], float) for r in results["optimizers"]]
  low = min(float(np.nanmin(c)) for c in curves)
  ax.set_ylim(0.95 * low, 1.5 * max(float(c[0]) for c in curves))
  ax.set(xlabel="step", ylabel=f"median loss over {results['num_problems']} test contents")
  ax.set_title(title)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def evaluate(
  train_kwargs: dict,
  learned: dict,
  settings,
  output_dir: str,
  *,
  baselines=tuple(baselines_lib.BASELINES),
  num_problems: int = 32,
  tune_problems: int = 2,
  num_steps: int = 128,
  learning_rates=None,
  lr_batch_size: int | None = None,
  reuse_baselines: bool = False,
  log=print,
) -> dict:
  """Learned optimizers and tuned baselines in each setting; writes results, curves, summary.

  Returns:
    ``{setting name: results}``, each as ``eval.compare.compare`` returns plus ``run_means``.
  """
  rates = np.asarray(
    baselines_lib.paper_learning_rates() if learning_rates is None else learning_rates
  )
  everything = {}
  for setting in settings:
    tic = time.time()
    directory = os.path.join(output_dir, setting.name)
    path = os.path.join(directory, "results.json")
    test_task = setting_task(train_kwargs, setting, "test", num_problems)
    previous = None
    saved_results = distributed.read_on_writer(path) if reuse_baselines else None
    if saved_results is not None:  # process 0's copy, so every process reuses alike
      previous = json.loads(saved_results)
      if previous["num_problems"] != num_problems or previous["num_steps"] != num_steps:
        previous = None
    optimizers = [
      learned_result(name, saved, test_task, num_problems, num_steps)
      for name, saved in learned.items()
    ]
    if previous:
      optimizers += [r for r in previous["optimizers"] if r["kind"] == "baseline"]
    else:
      tune_task = setting_task(train_kwargs, setting, "valid", tune_problems)
      for name in baselines:
        optimizers.append(
          tuned_baseline(
            name, test_task, tune_task, num_problems, tune_problems, num_steps, rates, lr_batch_size
          )
        )
        log(
          f"{setting.name} {name}: lr {optimizers[-1]['learning_rate']:.3g} final "
          f"{optimizers[-1]['final_mean']:.4g}"
        )
    results = {
      "task": dict(test_task.config),
      "num_problems": num_problems,
      "num_steps": num_steps,
      "tuning": previous["tuning"]
      if previous
      else {
        "problems": "validation contents",
        "num_problems": tune_problems,
        "learning_rates": rates.tolist(),
      },
      "optimizers": optimizers,
      "seconds": time.time() - tic,
    }
    everything[setting.name] = results
    if distributed.is_writer():  # process 0 writes and reports
      os.makedirs(directory, exist_ok=True)
      atomic_write(path, json.dumps(results).encode())
      plot_figure8(results, os.path.join(directory, "curves.png"), setting.title)
      log(f"{setting.name}: {results['seconds']:.0f} s\n{compare.format_table(results)}")
  header = (
    "# Neural art results (section 3.4, Figure 8)\n\n"
    "Written by `python -m experiments.neural_art evaluate`."
  )
  if distributed.is_writer():
    atomic_write(
      os.path.join(output_dir, "results_neural_art.md"), markdown(everything, header).encode()
    )
  return everything


def final_images(task: TaskFamily, tx, task_params, num_steps: int) -> np.ndarray:
  """theta_T of ``tx`` on each problem, as uint8 images (problems, size, size, 3)."""
  num = jax.tree.leaves(task_params)[0].shape[0]

  def one(data, params, key):
    state = inner_lib.start(task, tx, data, params, key, key)
    return inner_lib.run(task, tx, data, state, num_steps)[1].params["image"]

  run = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
  return neural_art.styled_images(run(task.data, task_params, run_keys(num)))


def tuned_rate(output_dir: str, setting: str, name: str, default: float) -> float:
  """A baseline's tuned rate from ``evaluate``'s results in ``output_dir``, else ``default``."""
  path = os.path.join(output_dir, setting, "results.json")
  if os.path.isfile(path):
    with open(path) as f:
      for r in json.load(f)["optimizers"]:
        if r["name"] == name and r["learning_rate"] is not None:
          return float(r["learning_rate"])
  return default


def styled_figure(saved, train_kwargs, setting, output_dir, num, num_steps, adam_lr, contents=None):
  """Rows of content | LSTM | tuned Adam | style for the first ``num`` test contents; a PNG."""
  from PIL import Image

  kwargs = dict(train_kwargs, **({"contents": contents} if contents else {}))
  task = setting_task(kwargs, setting, "test", num)
  params = neural_art.problems_in_order(task, num)
  lstm = final_images(task, learned_opt.as_optax(saved), params, num_steps)
  adam = final_images(task, baselines_lib.BASELINES["adam"](adam_lr), params, num_steps)
  style = neural_art.art_images.style_image(task.config["style"], task.config["size"])
  rows = [
    np.concatenate([np.asarray(task.data.contents[i]), lstm[i], adam[i], style], axis=1)
    for i in range(num)
  ]
  grid = np.concatenate(rows, axis=0)
  scale = max(1, 256 // task.config["size"])
  image = Image.fromarray(grid).resize(
    (grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST
  )
  name = f"styled_{setting.name}{'_' + contents if contents else ''}.png"
  path = os.path.join(output_dir, name)
  image.save(path)
  return path


def trajectory_gradients(task, tx, data, task_params, key, num_steps: int) -> jax.Array:
  """Flattened gradients (num_steps, parameters) along ``tx``'s trajectory from ``key``.

  The trajectory of ``eval.visualize.trace_updates`` with the same arguments (same keys).
  """
  init_key, data_key = jax.random.split(key)
  state = inner_lib.start(task, tx, data, task_params, init_key, data_key)

  def body(state, _):
    _, grads = inner_lib.gradient(task, data, state)
    return inner_lib.apply(tx, state, grads), jax.flatten_util.ravel_pytree(grads)[0]

  return jax.lax.scan(body, state, length=num_steps)[1]


def update_figures(saved, train_kwargs, output_dir, num_steps, sgd_lr, adam_lr, coordinates):
  """Figures 9 and 10 (Appendix C) for each coordinate on the first test content; PNG paths.

  Each coordinate's gradients are probed over twice the largest gradient it sees along the
  LSTM's trajectory (the paper's +-400 is in the units of its own loss, not ours).
  """
  task = setting_task(train_kwargs, SETTINGS[0], "test", 1)
  params = jax.tree.map(lambda x: x[0], neural_art.problems_in_order(task, 1))
  key = run_keys(1)[0]
  optimizers = {
    "LSTM": learned_opt.as_optax(saved),
    "ADAM": baselines_lib.BASELINES["adam"](adam_lr),
    "SGD": baselines_lib.BASELINES["sgd"](sgd_lr),
  }
  seen = jax.jit(
    lambda d, p, k: trajectory_gradients(task, optimizers["LSTM"], d, p, k, num_steps)
  )(task.data, params, key)
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
    atomic_write(
      path.replace(".png", ".json"),
      json.dumps(jax.tree.map(lambda x: np.asarray(x).tolist(), traces._asdict())).encode(),
    )
    paths.append(path)
  return paths


FLAGS = flags.FLAGS


def define_flags():
  """Flags of the command; defined only when run as one, so importing this module is free."""
  flags.DEFINE_string("output_dir", None, "Run directory (train) or results directory.")
  flags.DEFINE_string("checkpoint", None, "Trained optimizer: a directory or pretrained:NAME.")
  flags.DEFINE_string(
    "task_kwargs", None, "JSON training-task settings; default: the checkpoint's."
  )
  flags.DEFINE_list("settings", [s.name for s in SETTINGS], "Figure 8 settings to evaluate.")
  flags.DEFINE_list("baselines", list(baselines_lib.BASELINES), "Baselines to tune.")
  flags.DEFINE_integer("num_problems", 32, "Test contents, each styled once.")
  flags.DEFINE_integer("tune_problems", 2, "Validation contents the learning rates are tuned on.")
  flags.DEFINE_integer("num_steps", 128, "Optimizee steps per image (the paper's 128).")
  flags.DEFINE_integer("lr_first", 0, "First rate, as an index into the paper's 30-rate grid.")
  flags.DEFINE_integer("lr_stride", 3, "Every lr_stride-th rate of the paper's grid from there.")
  flags.DEFINE_integer("lr_batch_size", 0, "Rates vmapped at once; 0: all.")
  flags.DEFINE_bool("reuse_baselines", False, "Keep the tuned baselines of existing results.")
  flags.DEFINE_bool("baselines_only", False, "evaluate: no learned optimizer (needs task_kwargs).")
  flags.DEFINE_integer("num_images", 4, "figures: test contents styled per setting.")
  flags.DEFINE_list("coordinates", ["0", "1", "2"], "figures: flattened pixel-channel indices.")
  flags.DEFINE_integer("trace_steps", 32, "figures: steps traced (Appendix C shows 32).")
  flags.DEFINE_integer("num_epochs", 100, "train: epochs of steps_per_epoch meta-steps.")
  flags.DEFINE_integer("steps_per_epoch", 20, "train: meta-steps per epoch (then validation).")
  flags.DEFINE_integer("num_problems_train", 4, "train: problems per meta-step.")
  flags.DEFINE_float("meta_lr", 3e-3, "train: Adam rate on phi.")
  distributed.define_flags()  # multi-process start-up (--coordinator_address, ...), --num_devices


def _train_kwargs() -> dict:
  if FLAGS.task_kwargs:
    return json.loads(FLAGS.task_kwargs)
  if not FLAGS.checkpoint:
    raise ValueError("--checkpoint or --task_kwargs is required.")
  name, kwargs = run_config.trained_task(run_config.resolve(FLAGS.checkpoint))
  if name != "neural_art":
    raise ValueError(f"--checkpoint={FLAGS.checkpoint} was trained on {name!r}, not neural_art.")
  return kwargs


def main(argv):
  if len(argv) != 2 or argv[1] not in ("train", "evaluate", "figures"):
    raise app.UsageError("Give one command: train, evaluate or figures.")
  command = argv[1]
  try:
    distributed.initialize_from_flags()  # before any JAX computation
    mesh = distributed.mesh_from_flags()  # --num_devices of every process's devices; default all
    run_config.check_output_dir(FLAGS.output_dir)
    unknown = [s for s in FLAGS.settings if s not in _BY_NAME]
    if unknown:
      raise ValueError(f"Unknown --settings {unknown}; choose from {list(_BY_NAME)}.")
    if command == "train":
      config = train_config(
        FLAGS.output_dir,
        json.loads(FLAGS.task_kwargs or "{}"),
        num_problems=FLAGS.num_problems_train,
        num_epochs=FLAGS.num_epochs,
        steps_per_epoch=FLAGS.steps_per_epoch,
        meta_lr=FLAGS.meta_lr,
        valid_problems=8,
      )
      trainer.build(config)
    else:
      kwargs = _train_kwargs()
      saved = None
      if not (command == "evaluate" and FLAGS.baselines_only):
        saved = learned_opt.load(run_config.resolve(FLAGS.checkpoint or ""))
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  say = lambda s: print(s, flush=True) if distributed.is_writer() else None  # process 0 reports
  if command == "train":
    try:  # problems split over the mesh, as train.meta_train does
      counts = {"num_problems_train": config.num_problems, "valid_problems": config.valid_problems}
      distributed.check_divides(config.num_problems, mesh, "num_problems_train", counts)
      with distributed.use_mesh(mesh):
        trainer.train(config, log=say)
    except distributed.MeshError as e:
      raise app.UsageError(str(e)) from e
  elif command == "evaluate":
    rates = baselines_lib.paper_learning_rates()[FLAGS.lr_first :: FLAGS.lr_stride]
    with distributed.use_mesh(mesh):  # the sweeps' problems split over it (eval.sharding)
      evaluate(
        kwargs,
        {} if saved is None else {learned_name(saved): saved},
        [_BY_NAME[s] for s in FLAGS.settings],
        FLAGS.output_dir,
        baselines=FLAGS.baselines,
        num_problems=FLAGS.num_problems,
        tune_problems=FLAGS.tune_problems,
        num_steps=FLAGS.num_steps,
        learning_rates=rates,
        lr_batch_size=FLAGS.lr_batch_size or None,
        reuse_baselines=FLAGS.reuse_baselines,
        log=say,
      )
  elif distributed.is_writer():  # figures: a few images on process 0's first device, no sweep
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    adam = tuned_rate(FLAGS.output_dir, SETTINGS[0].name, "adam", 0.02)
    sgd = tuned_rate(FLAGS.output_dir, SETTINGS[0].name, "sgd", 1.0)
    for setting in (_BY_NAME[s] for s in FLAGS.settings):
      rate = tuned_rate(FLAGS.output_dir, setting.name, "adam", adam)
      say(
        styled_figure(
          saved, kwargs, setting, FLAGS.output_dir, FLAGS.num_images, FLAGS.num_steps, rate
        )
      )
    coordinates = [int(c) for c in FLAGS.coordinates]
    for path in update_figures(
      saved, kwargs, FLAGS.output_dir, FLAGS.trace_steps, sgd, adam, coordinates
    ):
      say(path)


def run():
  """The command line: defines the flags, then runs ``main``."""
  define_flags()
  jax.config.parse_flags_with_absl()
  command_line.run(main)


if __name__ == "__main__":
  run()
