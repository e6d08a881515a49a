r"""Section 3.1, Figure 4 left: the LSTM variants against tuned baselines on 10-d quadratics.

Saved optimizers and tuned baselines on the same fresh problems (``eval.compare``): writes
``results.json``, ``curves.png`` and a markdown table of mean final losses, paired differences to
the best baseline and to the first optimizer, and each one's meta-training budget. Training and
evaluation together: experiments/quadratic_variants.sh; more: docs/ntm_bfgs.md.

Example:
  python -m experiments.quadratic_variants --output_dir=runs/qv/eval \
    --checkpoint=lstm=runs/qv/lstm --checkpoint=lstm_gac=runs/qv/lstm_gac
"""

import dataclasses
import os

import numpy as np

import experiments
from eval import compare, plots, report, run_config
from tasks import registry as task_registry
from train import Run, command_line, distributed
from train.config_flags import setting

RESULTS, FIGURE, SUMMARY = "results.json", "curves.png", "summary.md"


def _budget_cells(b: dict | None) -> list[str]:
  """Meta-steps (saved at), wall time and validation best / median / last of a run's budget."""
  if not b:
    return ["-", "-", "-"]
  wall = "-" if b["wall_seconds"] is None else f"{b['wall_seconds'] / 60:.1f} min"
  h = b["valid_history"]
  valid = f"{min(h):.3f} / {np.median(h):.3f} / {h[-1]:.3f}" if h else "-"
  return [f"{b['meta_steps']} ({b['saved_step']})", wall, valid]


def markdown(results: dict, budgets: dict, comparisons: dict) -> str:
  """The summary table and the paired comparisons as markdown."""
  learned = [r for r in results["optimizers"] if r["kind"] == "learned"]
  baselines = [r for r in results["optimizers"] if r["kind"] == "baseline"]
  best, first = report.best_baseline(results), learned[0]["name"]
  rows = [
    [r["name"], report.lr_text(r), report.mean_pm(r["final_mean"], r["final_stderr"]),
     f"{r['final_median']:.4f}", r["num_diverged"], *_budget_cells(budgets.get(r["name"]))]
    for r in learned + sorted(baselines, key=lambda r: r["final_mean"])
  ]  # fmt: skip
  header = ["optimizer", "lr", "mean final loss ± stderr", "median", "diverged",
            "meta-steps (saved phi at)", "meta-train wall time",
            "validation: best / median / last"]  # fmt: skip
  beats = {"beats": "yes", "loses": "no"}
  paired = [
    [r["name"], report.pm(comparisons[r["name"]]["vs_best_baseline"]),
     report.pm(comparisons[r["name"]]["vs_first"]),
     beats.get(report.verdict(r["finals"], best["finals"]).outcome, "no (within 2 stderr)")]
    for r in learned
  ]  # fmt: skip
  run, m = budgets.get(first, {}), budgets.get(first, {}).get("machine")
  machine = f"{m['cpu_count']} CPU cores ({m['processor']}), devices {m['devices']}" if m else None
  return "\n".join(
    [
      "# Quadratic variants (section 3.1, Figure 4 left)",
      "",
      f"{results['num_problems']} held-out 10-d quadratics f(theta) = ||W theta - y||^2 (test "
      f"seed {results['seed']}), {results['num_steps']} steps each; every optimizer sees the "
      "same problems and initial points. Baselines use the learning rate of the paper's grid "
      "(1e-6 * 2^k) with the lowest mean final loss. Lower is better.",
      "",
      *report.table(header, rows),
      "",
      f"Paired differences of final loss on the same problems (negative: the learned optimizer "
      f"is better), against the best baseline ({best['name']}, lr {best['learning_rate']:.3g}) "
      f"and against {first}:",
      "",
      *report.table(
        ["optimizer", f"minus {best['name']}", f"minus {first}", f"beats {best['name']}"], paired
      ),
      "",
      f"Meta-training: Adam (lr {run.get('meta_lr')}, meta-gradient global-norm clip "
      f"{run.get('meta_grad_clip') or 'off'}) on {run.get('num_problems')} problems "
      f"per meta-step, unrolls of {run.get('unroll')} steps of a {run.get('horizon')}-step "
      f"horizon, phi saved at the epoch ({run.get('steps_per_epoch')} meta-steps) with the best "
      f"loss on {run.get('valid_problems')} validation problems; wall time on "
      f"{machine or 'a machine the run did not record'}, "
      "validation included. The validation column summarizes the mean final loss on those "
      "problems after each epoch: its spread shows how far meta-training noise alone moves a "
      "variant.",
      "",
    ]
  )


@dataclasses.dataclass(frozen=True)
class QuadraticVariantsConfig(experiments.ExperimentConfig):
  """What ``experiments.quadratic_variants`` compares; each field is one flag of the command."""

  checkpoint: tuple[str, ...] = setting(
    [], "Required. NAME=DIR of a saved optimizer; repeat, LSTM first.", repeat=True
  )
  num_problems: int = setting(256, "Fresh test problems.")
  num_steps: int = setting(100, "Optimization steps per problem.")
  seed: int = setting(2016, "Seed of the test problems (a stream apart from training).")
  markdown: str | None = setting(None, f"Markdown summary path; default OUTPUT_DIR/{SUMMARY}.")

  def __post_init__(self):
    super().__post_init__()
    if not self.checkpoint:
      raise ValueError("At least one --checkpoint=NAME=DIR is required.")


def main(config: QuadraticVariantsConfig) -> None:
  try:
    specs = run_config.parse_checkpoint_specs(config.checkpoint)
    learned = run_config.load_all(specs)
  except ValueError as e:
    raise command_line.UsageError(str(e)) from e
  checkpoints = dict(zip(learned, (path for _, path in specs), strict=True))
  task = task_registry.get("quadratic", dim=10)
  results = compare.compare(  # problems split over the command's mesh; every process
    task, learned, config.baselines, num_problems=config.num_problems,
    num_steps=config.num_steps, seed=config.seed,
  )  # fmt: skip
  if not distributed.is_writer():
    return  # process 0 writes and prints
  # compare() ran every optimizer on the same problems, so per-problem finals pair up.
  best_finals = np.asarray(report.best_baseline(results)["finals"])
  finals = {
    r["name"]: np.asarray(r["finals"]) for r in results["optimizers"] if r["kind"] == "learned"
  }
  first = next(iter(finals.values()))
  comparisons = {
    name: {"vs_best_baseline": report.paired(f, best_finals), "vs_first": report.paired(f, first)}
    for name, f in finals.items()
  }
  budgets = {name: Run(path).budget() for name, path in checkpoints.items()}
  results.update(budgets=budgets, paired=comparisons)
  out = config.output_dir
  report.write(os.path.join(out, RESULTS), results)
  title = f"10-d quadratics, {config.num_problems} test problems"
  plots.plot_curves(results, os.path.join(out, FIGURE), title=title)
  path = report.write(
    config.markdown or os.path.join(out, SUMMARY), markdown(results, budgets, comparisons)
  )
  print(report.format_table(results))
  print(f"Wrote {out}/{RESULTS}, {out}/{FIGURE} and {path}")


COMMAND = experiments.command(
  main, QuadraticVariantsConfig, __doc__, (RESULTS, FIGURE, SUMMARY), "variants' evaluation"
)

run = COMMAND.run  # the command line (tests/multihost_worker.py starts it too)

if __name__ == "__main__":
  run()
