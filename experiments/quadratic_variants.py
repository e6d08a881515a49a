r"""Section 3.1, Figure 4 left: the LSTM variants against tuned baselines on 10-d quadratics.

Evaluates saved optimizers and the tuned baselines on the same fresh problems (``eval.compare``)
and writes ``results.json``, ``curves.png`` and a markdown table holding every optimizer's mean
final loss, its paired difference to the best baseline and to the first optimizer (the plain
LSTM), and the meta-training budget of each learned optimizer.

Example (after training with experiments/quadratic_variants.sh):
  python -m experiments.quadratic_variants --output_dir=runs/qv/eval \
    --markdown=docs/results_quadratic_variants.md \
    --checkpoint=lstm=runs/qv/lstm --checkpoint=lstm_gac=runs/qv/lstm_gac \
    --checkpoint=ntm_bfgs=runs/qv/ntm_bfgs --checkpoint=ntm_lbfgs=runs/qv/ntm_lbfgs
"""

import json
import os

import jax
import numpy as np
from absl import app, flags

import learned_opt
from eval import baselines as baselines_lib
from eval import compare, plots, run_config
from eval.stats import paired
from learned_opt.tree_files import atomic_write
from tasks import registry as task_registry
from train import command_line, distributed

FLAGS = flags.FLAGS


def define_flags():
  """Flags of the command; defined only when run as one, so importing this module is free."""
  flags.DEFINE_multi_string("checkpoint", [], "NAME=DIR of a saved optimizer; repeat, LSTM first.")
  flags.DEFINE_list("baselines", list(baselines_lib.BASELINES), "Baselines to tune and compare.")
  flags.DEFINE_integer("num_problems", 256, "Fresh test problems.")
  flags.DEFINE_integer("num_steps", 100, "Optimization steps per problem.")
  flags.DEFINE_integer("seed", 2016, "Seed of the test problems (a stream apart from training).")
  flags.DEFINE_string("output_dir", None, "Where results.json and curves.png go.")
  flags.DEFINE_string("markdown", None, "Markdown summary path; default OUTPUT_DIR/summary.md.")
  distributed.define_flags()  # multi-process start-up (--coordinator_address, ...), --num_devices


def _read_json(path, default=None):
  if not os.path.isfile(path):
    return default
  with open(path) as f:
    return json.load(f)


def training_budget(directory: str) -> dict:
  """Meta-steps run, the step of the saved (best-validation) phi and wall time of a run."""
  config = _read_json(os.path.join(directory, "config.json"), {})
  records = []
  metrics_path = os.path.join(directory, "metrics.jsonl")
  if os.path.isfile(metrics_path):
    with open(metrics_path) as f:
      records = [json.loads(line) for line in f if line.strip()]
  steps = max([r.get("step", 0) for r in records] or [0])
  valid = [r["valid_final_loss"] for r in records if "valid_final_loss" in r]
  wall_path = os.path.join(directory, "wall_seconds.txt")
  wall = None
  if os.path.isfile(wall_path):
    with open(wall_path) as f:
      wall = float(f.read())
  saved = learned_opt.load_metadata(directory)
  return {
    "meta_steps": steps,
    "saved_step": saved.get("step"),
    "valid_final_loss": saved.get("valid_final_loss"),
    "valid_history": valid,  # validation final loss after every epoch
    "wall_seconds": wall,
    "meta_lr": config.get("meta_lr"),
    "meta_grad_clip": config.get("meta_grad_clip"),
    "num_problems": config.get("num_problems"),
    "unroll": config.get("unroll"),
    "horizon": config.get("horizon"),
    "steps_per_epoch": config.get("steps_per_epoch"),
    "valid_problems": config.get("valid_problems"),
    "machine": saved.get("machine"),  # recorded by the trainer since format 2 runs
  }


def _machine_words(machine: dict | None) -> str:
  """'2 CPU cores (x86_64), devices [...]' from a run's recorded machine, if it has one."""
  if not machine:
    return "a machine the run did not record"
  return f"{machine['cpu_count']} CPU cores ({machine['processor']}), devices {machine['devices']}"


def markdown(results: dict, budgets: dict, comparisons: dict) -> str:
  """The summary table and the paired comparisons as markdown."""
  learned = [r for r in results["optimizers"] if r["kind"] == "learned"]
  baselines = sorted(
    (r for r in results["optimizers"] if r["kind"] == "baseline"), key=lambda r: r["final_mean"]
  )
  best = baselines[0]
  lines = [
    "# Quadratic variants (section 3.1, Figure 4 left)",
    "",
    f"{results['num_problems']} held-out 10-d quadratics f(theta) = ||W theta - y||^2 (test "
    f"seed {results['seed']}), {results['num_steps']} steps each; every optimizer sees the "
    "same problems and initial points. Baselines use the learning rate of the paper's grid "
    "(1e-6 * 2^k) with the lowest mean final loss. Lower is better.",
    "",
    "| optimizer | lr | mean final loss ± stderr | median | diverged "
    "| meta-steps (saved phi at) | meta-train wall time | validation: best / median / last |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in learned + baselines:
    b = budgets.get(r["name"])
    lr = "-" if r["learning_rate"] is None else f"{r['learning_rate']:.3g}"
    budget, wall, valid = "-", "-", "-"
    if b:
      budget = f"{b['meta_steps']} ({b['saved_step']})"
      wall = "-" if b["wall_seconds"] is None else f"{b['wall_seconds'] / 60:.1f} min"
      history = b["valid_history"]
      if history:
        valid = f"{min(history):.3f} / {np.median(history):.3f} / {history[-1]:.3f}"
    lines.append(
      f"| {r['name']} | {lr} | {r['final_mean']:.4f} ± {r['final_stderr']:.4f} "
      f"| {r['final_median']:.4f} | {r['num_diverged']} | {budget} | {wall} | {valid} |"
    )
  lines += [
    "",
    f"Paired differences of final loss on the same problems (negative: the learned optimizer "
    f"is better), against the best baseline ({best['name']}, lr {best['learning_rate']:.3g}) "
    f"and against {learned[0]['name']}:",
    "",
    f"| optimizer | minus {best['name']} | minus {learned[0]['name']} | beats {best['name']} |",
    "|---|---|---|---|",
  ]
  for r in learned:
    c = comparisons[r["name"]]
    vs_best, vs_first = c["vs_best_baseline"], c["vs_first"]
    lines.append(
      f"| {r['name']} | {vs_best[0]:+.4f} ± {vs_best[1]:.4f} | {vs_first[0]:+.4f} ± "
      f"{vs_first[1]:.4f} | {'yes' if r['final_mean'] < best['final_mean'] else 'no'} |"
    )
  first = budgets.get(learned[0]["name"], {})
  lines += [
    "",
    f"Meta-training: Adam (lr {first.get('meta_lr')}, meta-gradient global-norm clip "
    f"{first.get('meta_grad_clip') or 'off'}) on {first.get('num_problems')} problems "
    f"per meta-step, unrolls of {first.get('unroll')} steps of a {first.get('horizon')}-step "
    f"horizon, phi saved at the epoch ({first.get('steps_per_epoch')} meta-steps) with the best "
    f"loss on {first.get('valid_problems')} validation problems; wall time on "
    f"{_machine_words(first.get('machine'))}, validation included. The validation column "
    "summarizes the mean final "
    "loss on those problems after each epoch: its spread shows how far meta-training noise "
    "alone moves a variant.",
    "",
  ]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.output_dir or not FLAGS.checkpoint:
    raise app.UsageError("--output_dir and at least one --checkpoint=NAME=DIR are required.")
  try:
    distributed.initialize_from_flags()  # before any JAX computation
    mesh = distributed.mesh_from_flags()  # --num_devices of every process's devices; default all
    run_config.check_output_dir(FLAGS.output_dir)
    specs = run_config.parse_checkpoint_specs(FLAGS.checkpoint)
    learned = run_config.load_all(specs)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  checkpoints = dict(zip(learned, (path for _, path in specs), strict=True))
  task = task_registry.get("quadratic", dim=10)
  results = compare.compare(  # problems split over the mesh (eval.sharding); every process
    task,
    learned,
    FLAGS.baselines,
    num_problems=FLAGS.num_problems,
    num_steps=FLAGS.num_steps,
    seed=FLAGS.seed,
    mesh=mesh,
  )
  if not distributed.is_writer():
    return  # process 0 writes and prints
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  # compare() ran every optimizer on the same problems, so per-problem finals pair up.
  best = min(
    (r for r in results["optimizers"] if r["kind"] == "baseline"), key=lambda r: r["final_mean"]
  )
  best_finals = np.asarray(best["finals"])
  finals = {
    r["name"]: np.asarray(r["finals"]) for r in results["optimizers"] if r["kind"] == "learned"
  }
  first = next(iter(finals.values()))
  comparisons = {
    name: {"vs_best_baseline": paired(f, best_finals), "vs_first": paired(f, first)}
    for name, f in finals.items()
  }
  budgets = {name: training_budget(path) for name, path in checkpoints.items()}
  results.update(budgets=budgets, paired=comparisons)
  atomic_write(os.path.join(FLAGS.output_dir, "results.json"), json.dumps(results).encode())
  plots.plot_curves(
    results,
    os.path.join(FLAGS.output_dir, "curves.png"),
    title=f"10-d quadratics, {FLAGS.num_problems} test problems",
  )
  summary = markdown(results, budgets, comparisons)
  path = FLAGS.markdown or os.path.join(FLAGS.output_dir, "summary.md")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_write(path, summary.encode())
  print(compare.format_table(results))
  print(f"Wrote {FLAGS.output_dir}/results.json, {FLAGS.output_dir}/curves.png and {path}")


def run():
  """The command line: defines the flags, then runs ``main``."""
  define_flags()
  jax.config.parse_flags_with_absl()
  command_line.run(main)


if __name__ == "__main__":
  run()
