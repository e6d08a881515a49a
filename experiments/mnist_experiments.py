r"""The MNIST experiments of section 3.2 (Figures 4 and 5) in one command.

Example:
  MNIST_DIR=../shared/data/mnist python -m experiments.mnist_experiments \
    --checkpoint=runs/mnist_base --output_dir=runs/mnist_experiments

Each experiment runs a trained optimizer and the seven baselines (NAG among them) on the same fresh
problems; every baseline's learning rate is re-tuned for that very setting over the paper's grid
(1e-6 * 2^k, k < 30). With ``--tune_problems=N > 0`` the grid is swept on N separate tuning
problems and the chosen rate is then run on the test problems (the whole grid on 64 test problems
is out of reach of a 2-core CPU); ``--tune_problems=0`` sweeps the grid on the test problems, as
``eval.evaluate`` does. Writes ``<output_dir>/<experiment>/results.json`` and ``curves.png`` and a
markdown table (``--summary``, default ``<output_dir>/results_mnist.md``).

Problems are split over every device of every process (or ``--num_devices`` of them), and
several processes start, as in ``eval.evaluate``; process 0 alone prints and writes, and the
results ``--reuse_baselines`` reads are process 0's, sent to the others.
"""

import json
import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import app, flags
from jax.sharding import Mesh

import learned_opt
import tasks
from eval import baselines as baselines_lib
from eval import compare, plots, run_config
from eval.stats import paired
from learned_opt.tree_files import atomic_write
from train import command_line, distributed


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

FLAGS = flags.FLAGS
distributed.define_flags()  # multi-process start-up (--coordinator_address, ...), --num_devices


def define_flags():
  """Flags of the command; defined only when run as one, so importing this module is free."""
  flags.DEFINE_string(
    "checkpoint", None, "Saved optimizer: a directory or pretrained:NAME; default: --pretrained."
  )
  flags.DEFINE_string("pretrained", "mnist_mlp", "Shipped optimizer used when no --checkpoint.")
  flags.DEFINE_list(
    "experiments",
    [e.name for e in EXPERIMENTS],
    "Experiments to run: " + "; ".join(f"{e.name} ({e.title})" for e in EXPERIMENTS) + ".",
  )
  flags.DEFINE_list("baselines", list(baselines_lib.BASELINES), "Baselines to tune and compare.")
  flags.DEFINE_integer("num_problems", 64, "Fresh test problems (runs) per experiment.")
  flags.DEFINE_integer("tune_problems", 8, "Problems for the LR sweep; 0: sweep on the test ones.")
  flags.DEFINE_integer("seed", 2016, "Seed of the test problems; tuning uses seed + 1.")
  flags.DEFINE_integer("lr_batch_size", 10, "Learning rates vmapped at once (bounds memory).")
  flags.DEFINE_string("mnist_dir", None, "Directory of the MNIST IDX files; default $MNIST_DIR.")
  flags.DEFINE_string(
    "output_dir", None, "Required. Where each experiment's results.json and curves.png go."
  )
  flags.DEFINE_string(
    "summary", None, "Markdown table of every experiment; default OUTPUT_DIR/results_mnist.md."
  )
  flags.DEFINE_bool(
    "reuse_baselines",
    False,
    "Keep the tuned baselines of an existing results.json of the same setting, test and tuning "
    "problems; run only the --baselines it lacks and add them.",
  )
  flags.DEFINE_integer(
    "problem_batch_size", 0, "Problems the learned optimizer runs at once (bounds memory; 0: all)."
  )


def run_experiment(
  experiment: Experiment,
  saved: learned_opt.SavedOptimizer,
  *,
  baselines,
  num_problems: int,
  tune_problems: int,
  seed: int,
  lr_batch_size: int | None,
  mnist_dir: str | None = None,
  log=print,
  problem_batch_size: int | None = None,
  mesh: Mesh | None = None,
) -> dict:
  """Learned optimizer and tuned baselines on one setting: ``eval.compare.compare``'s results.

  Test problems are ``compare.problem_key(seed)``'s, as in ``eval.evaluate``; tuning problems
  are ``compare.problem_key(seed + 1)``'s, or the test problems when ``tune_problems == 0``.
  Problems are split over ``mesh`` (default: every device of every process).
  """
  task = tasks.get("mnist_mlp", mnist_dir=mnist_dir, **experiment.task_kwargs)
  return compare.compare(
    task,
    {saved.optimizer.config.get("kind", "learned"): saved},
    baselines,
    num_problems=num_problems,
    num_steps=experiment.num_steps,
    seed=seed,
    lr_batch_size=lr_batch_size,
    tune_problems=tune_problems,
    log=log,
    problem_batch_size=problem_batch_size,
    mesh=mesh,
  )


def verdict(results: dict) -> str:
  """Whether the learned optimizer's mean final loss beats every tuned baseline's.

  Every optimizer runs on the same test problems (theta_0 and minibatch keys), so the verdict
  rests on the paired per-problem differences: beats or loses when their mean is more than two
  standard errors from zero, ties otherwise.
  """
  learned = [r for r in results["optimizers"] if r["kind"] == "learned"][0]
  best = min((r for r in results["optimizers"] if r["kind"] == "baseline"), key=_final)
  margin, stderr = paired(learned["finals"], best["finals"])
  if abs(margin) <= 2 * stderr:
    outcome = "ties (paired difference within two stderrs) with"
  else:
    outcome = "beats" if margin < 0 else "does NOT beat"
  name = learned["name"]  # its kind: lstm, ntm_lbfgs, ...
  return (
    f"{name} {outcome} the best tuned baseline ({best['name']}, lr {best['learning_rate']:.3g}): "
    f"{learned['final_mean']:.4f} vs {best['final_mean']:.4f} (paired difference {name} - "
    f"{best['name']} {margin:+.4f} ± {stderr:.4f} over {len(learned['finals'])} shared test "
    "problems)."
  )


def _final(result: dict) -> float:
  return result["final_mean"] if result["num_diverged"] == 0 else float("inf")


def markdown(all_results: dict[str, dict], header: str) -> str:
  """One table per experiment: optimizer, learning rate, mean final loss +- stderr, median."""
  lines = [header, ""]
  for name, results in all_results.items():
    experiment = _BY_NAME[name]
    lines += [
      f"## {name}: {experiment.title}",
      "",
      f"{results['num_problems']} test runs (seed {results['seed']}), {results['num_steps']} "
      "steps, task "
      f"`{json.dumps(results['task'])}`; learning rates tuned on "
      f"{results['tuning']['num_problems']} {results['tuning']['problems']} problems.",
      "",
      "| optimizer | lr | final loss (mean ± stderr) | median | diverged | mean over steps 1..T |",
      "|---|---|---|---|---|---|",
    ]
    for r in sorted(results["optimizers"], key=_final):
      lr = "-" if r["learning_rate"] is None else f"{r['learning_rate']:.3g}"
      lines.append(
        f"| {r['name']} | {lr} | {r['final_mean']:.4f} ± {r['final_stderr']:.4f} | "
        f"{r['final_median']:.4f} | {r['num_diverged']} | {np.mean(r['mean_curve'][1:]):.4f} |"
      )
    lines += [
      "",
      verdict(results),
      "The last column is the paper's meta-objective (eq. 3, w_t = 1) divided by T.",
      "",
    ]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.output_dir:
    raise app.UsageError("--output_dir is required (e.g. --output_dir=runs/mnist_experiments).")
  unknown = [name for name in FLAGS.experiments if name not in _BY_NAME]
  if unknown:
    raise app.UsageError(
      f"Unknown --experiments {', '.join(unknown)}; choose from {', '.join(_BY_NAME)}."
    )
  if FLAGS.num_problems < 2 or FLAGS.tune_problems < 0:
    raise app.UsageError("--num_problems must be >= 2 and --tune_problems >= 0.")
  try:
    distributed.initialize_from_flags()  # before any JAX computation
    mesh = distributed.mesh_from_flags()  # --num_devices of every process's devices; default all
    run_config.check_output_dir(FLAGS.output_dir)
    saved = (
      learned_opt.load(run_config.resolve(FLAGS.checkpoint))
      if FLAGS.checkpoint
      else learned_opt.pretrained(FLAGS.pretrained)
    )
    tasks.get("mnist_mlp", mnist_dir=FLAGS.mnist_dir)  # no data: a usage error before compute
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  writer = distributed.is_writer()
  say = print if writer else (lambda *a, **k: None)  # process 0 reports
  source = FLAGS.checkpoint or f"learned_opt.pretrained({FLAGS.pretrained!r})"
  header = (
    "# MNIST results (section 3.2, Figures 4 and 5)\n\n"
    "Written by `python -m experiments.mnist_experiments` with optimizer "
    f"`{source}`. Losses are mean cross-entropy (nats) on the last step's minibatch (its size is "
    "the task's batch_size); lower is better."
  )
  for name in FLAGS.experiments:
    experiment = _BY_NAME[name]
    say(f"== {name}: {experiment.title}", flush=True)
    tic = time.time()
    directory = os.path.join(FLAGS.output_dir, name)
    previous = (
      _reusable(directory, experiment, FLAGS.num_problems, FLAGS.seed, FLAGS.tune_problems, say)
      if FLAGS.reuse_baselines
      else None
    )
    cached = [r for r in previous["optimizers"] if r["kind"] == "baseline"] if previous else []
    missing = [b for b in FLAGS.baselines if b not in {r["name"] for r in cached}]
    results = run_experiment(
      experiment,
      saved,
      baselines=missing,
      num_problems=FLAGS.num_problems,
      tune_problems=FLAGS.tune_problems,
      seed=FLAGS.seed,
      lr_batch_size=FLAGS.lr_batch_size or None,
      mnist_dir=FLAGS.mnist_dir,
      log=lambda s: say(s, flush=True),
      problem_batch_size=FLAGS.problem_batch_size or None,
      mesh=mesh,
    )
    if cached:
      results = with_cached_baselines(results, cached, FLAGS.baselines)
      say(
        f"Reused the tuned baselines {', '.join(results['reused_baselines'])} of "
        f"{directory}/results.json; ran {', '.join(missing) or 'none'}",
        flush=True,
      )
    results["seconds"] = time.time() - tic
    results["optimizer_source"] = source
    if not writer:
      continue  # process 0 writes and prints
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, "results.json"), json.dumps(results).encode())
    plots.plot_curves(results, os.path.join(directory, "curves.png"), title=experiment.title)
    print(compare.format_table(results))
    print(verdict(results), f"({results['seconds']:.0f} s)", flush=True)
    # Rewritten after every experiment, over all results in output_dir.
    summary = FLAGS.summary or os.path.join(FLAGS.output_dir, "results_mnist.md")
    os.makedirs(os.path.dirname(os.path.abspath(summary)), exist_ok=True)
    atomic_write(summary, markdown(_saved_results(FLAGS.output_dir), header).encode())
    print(f"Wrote {summary}", flush=True)


def with_cached_baselines(results: dict, cached: list[dict], order) -> dict:
  """``results`` with the ``cached`` baseline summaries added, baselines in ``order``.

  Baselines just run win over a cached one of the same name; cached baselines not in ``order``
  follow the others. ``results["reused_baselines"]`` names the cached ones kept.
  """
  ran = {r["name"] for r in results["optimizers"]}
  kept = [r for r in cached if r["name"] not in ran]
  learned = [r for r in results["optimizers"] if r["kind"] != "baseline"]
  baselines = [r for r in results["optimizers"] if r["kind"] == "baseline"] + kept
  position = {name: i for i, name in enumerate(order)}
  baselines.sort(key=lambda r: position.get(r["name"], len(position)))
  return {
    **results,
    "optimizers": learned + baselines,
    "reused_baselines": [r["name"] for r in kept],
  }


def _reusable(
  directory: str,
  experiment: Experiment,
  num_problems: int,
  seed: int,
  tune_problems: int,
  log=print,
) -> dict | None:
  """A results.json in ``directory`` for the same setting, test and tuning problems, else None.

  Process 0's file, on every process (all call this together), so all run the same baselines.
  """
  path = os.path.join(directory, "results.json")
  data = distributed.read_on_writer(path)
  if data is None:
    return None
  grid = baselines_lib.paper_learning_rates()
  try:
    previous = json.loads(data)
    tuning = previous["tuning"]
    rates = tuning["learning_rates"]
    saved_and_now = {
      "steps": (previous["num_steps"], experiment.num_steps),
      "test problems": (previous["num_problems"], num_problems),
      "seed": (previous["seed"], seed),
      "task": (
        {k: previous["task"].get(k) for k in experiment.task_kwargs},
        experiment.task_kwargs,
      ),
      "tuning problems": (
        (tuning["problems"], tuning["num_problems"]),
        ("separate" if tune_problems else "test", tune_problems or num_problems),
      ),
      "learning-rate grid": (len(rates) == len(grid) and np.allclose(rates, grid), True),
    }
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    log(f"Not reusing {path}: unreadable ({e!r}); running every baseline.", flush=True)
    return None
  changed = [
    f"{name} (saved {saved}, now {now})"
    for name, (saved, now) in saved_and_now.items()
    if saved != now
  ]
  if changed:
    log(f"Not reusing {path}: another {'; '.join(changed)}; running every baseline.", flush=True)
    return None
  return previous


def _saved_results(output_dir: str) -> dict[str, dict]:
  """Every experiment's results.json under ``output_dir``, in the paper's order."""
  found = {}
  for experiment in EXPERIMENTS:
    path = os.path.join(output_dir, experiment.name, "results.json")
    if os.path.isfile(path):
      with open(path) as f:
        found[experiment.name] = json.load(f)
  return found


def run():
  """The command line, ``python -m experiments.mnist_experiments``."""
  define_flags()
  jax.config.parse_flags_with_absl()
  command_line.run(main)


if __name__ == "__main__":
  run()
