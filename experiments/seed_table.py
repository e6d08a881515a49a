r"""Seeds of one meta-training recipe, evaluated on the same problems, side by side.

Example:
  python -m experiments.seed_table --markdown=docs/results_quadratic_variants/seeds.md \
    --evaluations=docs/results_quadratic_variants/seed_0,docs/results_quadratic_variants/seed_1

Each directory holds the ``results.json`` of one evaluation (``experiments.quadratic_variants``
writes one per seed) of optimizers meta-trained with one seed. All must have run the same problems
(task, test seed, count and steps agree; refused otherwise), so the best baseline is one row and a
seed's spread is comparable with a problem's. Three tables: each optimizer's mean final loss per
seed with the mean and standard deviation over seeds; each learned optimizer's paired difference
(final loss, mean ± standard error over the problems) to its evaluation's best baseline per seed,
with how many seeds beat it (``eval.report.verdict``); the same against the first learned optimizer.
"""

import json
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
from absl import app, flags

from eval import report
from experiments.pair_results import check_same_problems

_EVALUATIONS = flags.DEFINE_list("evaluations", [], "Evaluation directories, one per seed.")
_TITLE = flags.DEFINE_string("title", None, "A heading for the tables (e.g. the recipe).")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write the tables here (default: print them).")


def load(directories: Sequence[str]) -> dict[str, dict]:
  """``{directory name: results.json}``; a ``ValueError`` if any ran other problems."""
  found = {}
  for directory in directories:
    with open(os.path.join(directory, "results.json")) as f:
      found[os.path.basename(os.path.normpath(directory))] = json.load(f)
  first = next(iter(found.values()))
  for directory, results in zip(directories[1:], list(found.values())[1:], strict=True):
    check_same_problems(first, results, directory)
  return found


def _find(results: dict, name: str, seed: str) -> dict:
  """The summary of optimizer ``name`` in one seed's results; a ``ValueError`` if it has none."""
  for r in results["optimizers"]:
    if r["name"] == name:
      return r
  raise ValueError(f"{seed} has no optimizer {name!r}: evaluate the same optimizers per seed.")


def _task_text(task) -> str:
  """A results file's task as ``name (key=value, ...)``."""
  if not isinstance(task, dict):
    return str(task)
  rest = ", ".join(f"{k}={v}" for k, v in task.items() if k != "name" and v is not None)
  return f"{task.get('name')} ({rest})" if rest else str(task.get("name"))


def _spread(values: Sequence[float]) -> str:
  """Mean ± standard deviation over seeds (not a standard error: the seeds are the population)."""
  values = np.asarray(values, np.float64)
  sd = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
  return f"{np.mean(values):.4f} ± {sd:.4f}"


def _paired_rows(evaluations: Mapping[str, dict], names, other) -> list[list[str]]:
  """Per optimizer in ``names``: its paired difference to ``other(results, seed)`` per seed and
  the seeds it beats it in."""
  rows = []
  for name in names:
    cells, wins = [], 0
    for seed, results in evaluations.items():
      v = report.verdict(_find(results, name, seed)["finals"], other(results, seed)["finals"])
      cells.append(report.pm((v.mean, v.stderr)))
      wins += v.outcome == "beats"
    rows.append([name, *cells, f"{wins} of {len(evaluations)}"])
  return rows


def markdown(evaluations: Mapping[str, dict], title: str | None = None) -> str:
  """The three tables (see the module docstring) as markdown, under ``# title`` if given."""
  seeds = list(evaluations)
  first = next(iter(evaluations.values()))
  learned = [r["name"] for r in first["optimizers"] if r["kind"] == "learned"]
  bests = {s: report.best_baseline(r) for s, r in evaluations.items()}
  best_names = sorted({b["name"] for b in bests.values()})
  finals = []
  for name in learned + best_names:
    means = [_find(results, name, seed) for seed, results in evaluations.items()]
    finals.append(
      [name, *(report.mean_pm(r["final_mean"], r["final_stderr"]) for r in means),
       _spread([r["final_mean"] for r in means])]
    )  # fmt: skip
  best = lambda results, seed: report.best_baseline(results)
  lead = lambda results, seed: _find(results, learned[0], seed)
  best_text = ", ".join(f"{s}: {b['name']} lr {b['learning_rate']:.3g}" for s, b in bests.items())
  return "\n".join(
    [
      *([f"# {title}", ""] if title else []),
      f"{first['num_problems']} test problems of `{_task_text(first['task'])}` (seed "
      f"{first['seed']}), {first['num_steps']} steps; one column per meta-training seed.",
      "",
      "Mean final loss ± standard error over the problems; last column: mean ± standard "
      "deviation of the seeds' means:",
      "",
      *report.table(["optimizer", *seeds, "over seeds"], finals),
      "",
      f"Paired differences of final loss to the best baseline ({best_text}); negative: the "
      "learned optimizer is better; last column: seeds in which it beats it by more than two "
      "standard errors (diverging on no more problems):",
      "",
      *report.table(["optimizer", *seeds, "beats it"], _paired_rows(evaluations, learned, best)),
      "",
      f"The same against {learned[0]} of the same seed:",
      "",
      *report.table(
        ["optimizer", *seeds, "beats it"], _paired_rows(evaluations, learned[1:], lead)
      ),
      "",
    ]
  )


def main(argv):
  del argv
  if len(_EVALUATIONS.value) < 2:
    raise app.UsageError("Give --evaluations=DIR,DIR[,...]: two or more evaluation directories.")
  try:
    text = markdown(load(_EVALUATIONS.value), _TITLE.value)
  except (OSError, KeyError, ValueError) as e:
    sys.exit(f"Error: {e}")
  if _MARKDOWN.value:
    print(f"Wrote {report.write(_MARKDOWN.value, text)}")
  else:
    print(text, end="")


if __name__ == "__main__":
  app.run(main)
