r"""Paired differences between optimizers of two evaluations on the same problems.

Example:
  python -m experiments.pair_results \
    --learned=runs/c10_eval/cifar10:sweep_winner --others=docs/results_cifar10/cifar10

An evaluation directory (``experiments.cifar10_experiments``' per-experiment folder) holds
``results.json`` and ``curves.npz``; two such evaluations ran the same problems when their task,
seed, number of problems and steps agree (the problems' theta_0 and minibatches come from
``eval.curves.problem_key(seed)``). This prints, as markdown, the paired differences (learned minus
other, mean ± standard error over the problems) of one optimizer of the first against every
optimizer of the others, over the run and at steps 10, 25, 50 and the last, on the objective's
curve: how a newly evaluated optimizer compares with baselines tuned and run before, without
running them again. It refuses evaluations of different problems.
"""

import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from eval import report

STEPS = (10, 25, 50)
LEARNED = ""  # the compared optimizer's key among the others' "NAME (DIR)" keys: no collision
SAME_PROBLEMS = ("task", "seed", "num_problems", "num_steps")  # results.json fields that must agree

_LEARNED = flags.DEFINE_string("learned", None, "DIR:NAME, the optimizer compared.")
_OTHERS = flags.DEFINE_list("others", [], "Evaluation directories of the other optimizers.")
_CURVE = flags.DEFINE_enum(
  "curve", "train", ["train", "test"], "Curve compared: train (the objective) or test (held out)."
)


def load(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
  """``(results.json, {name/curve: (problems, steps + 1)})`` of one evaluation directory."""
  with open(os.path.join(directory, "results.json")) as f:
    results = json.load(f)
  with np.load(os.path.join(directory, "curves.npz")) as z:
    return results, {k: z[k] for k in z.files}


def check_same_problems(a: dict, b: dict, where: str) -> None:
  """A ``ValueError`` naming the first setting in which two evaluations' problems differ."""
  for field in SAME_PROBLEMS:
    if a[field] != b[field]:
      raise ValueError(f"{where} ran other problems: {field} {b[field]!r}, not {a[field]!r}.")


def rows(learned: np.ndarray, others: dict[str, tuple[np.ndarray, float | None]]):
  """``(rows, steps)``: per other optimizer its name, learning rate and ``report.pairs``'
  differences over the run and at each step."""
  last = learned.shape[1] - 1
  steps = [s for s in STEPS if s < last] + [last]
  kinds = {LEARNED: "learned", **dict.fromkeys(others, "baseline")}
  curves = {LEARNED: {"loss": learned}, **{n: {"loss": c} for n, (c, _) in others.items()}}
  out = []
  for pair, (_, rate) in zip(report.pairs(kinds, curves, steps), others.values(), strict=True):
    cells = [pair["loss_run_mean"], *(pair["loss_steps"][str(s)] for s in steps)]
    out.append([pair["other"], "-" if rate is None else f"{rate:.3g}", *map(report.pm, cells)])
  return out, steps


def table(learned_spec: str, others: Sequence[str], curve: str = "train") -> str:
  """The markdown table of ``learned_spec`` (DIR:NAME) against every optimizer in ``others``."""
  directory, _, name = learned_spec.rpartition(":")
  results, curves = load(directory)
  mine = curves[f"{name}/{curve}"]
  found = {}
  for other in others:
    theirs, their_curves = load(other)
    check_same_problems(results, theirs, other)
    same_dir = os.path.realpath(other) == os.path.realpath(directory)
    for r in theirs["optimizers"]:
      if not (same_dir and r["name"] == name):  # not itself; a namesake elsewhere is another run
        found[f"{r['name']} ({other})"] = (their_curves[f"{r['name']}/{curve}"], r["learning_rate"])
  body, steps = rows(mine, found)
  header = ["other", "lr", "mean over run", *[f"step {s}" for s in steps]]
  return "\n".join(report.table(header, body)) + "\n"


def main(argv):
  del argv
  if not _LEARNED.value or ":" not in _LEARNED.value or not _OTHERS.value:
    raise app.UsageError("Give --learned=DIR:NAME and --others=DIR[,DIR...].")
  try:
    print(table(_LEARNED.value, _OTHERS.value, _CURVE.value), end="")
  except (OSError, KeyError, ValueError) as e:
    sys.exit(f"Error: {e}")


if __name__ == "__main__":
  app.run(main)
