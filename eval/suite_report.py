"""The held-out suite's numbers: final losses, ratios to tuned Adam, speed-ups and the verdict.

Pure functions of loss curves shaped (problems, steps + 1), as ``eval.engine`` returns them.
A run's *final loss* is its mean training loss over the last ``window(steps)`` steps (5% of the
run), averaged over problems: one minibatch's loss is too noisy to rank optimizers by. A
learned optimizer *diverged* on a task when a loss is not finite or its final loss exceeds its
mean initial loss.

The *speed-up* compares steps to the same loss, from the problem-mean curve smoothed over the
same window: where tuned Adam reaches the learned optimizer's final loss at step ``s``, it is
``s / T`` (below 1: the learned optimizer is slower); where Adam never does, it is ``T / s'``,
``s'`` the step where the learned optimizer first reaches Adam's final loss (above 1).
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np

FLOORS = {"beats_adam_default": 0.8, "median_ratio": 1.0, "diverged": 0}  # docs/general.md's floors


def window(num_steps: int) -> int:
  """Steps averaged for a final loss: 5% of the run, at least 1."""
  return max(1, num_steps // 20)


def smoothed(curves: np.ndarray) -> np.ndarray:
  """The problem-mean curve (steps + 1,), each step the trailing mean over ``window`` steps."""
  mean = np.mean(np.asarray(curves, np.float64), axis=0)
  w = window(mean.shape[0] - 1)
  sums = np.cumsum(np.concatenate([[0.0], mean]))
  starts = np.maximum(np.arange(1, mean.shape[0] + 1) - w, 0)
  return (sums[1:] - sums[starts]) / (np.arange(1, mean.shape[0] + 1) - starts)


def curve_stride(num_steps: int) -> int:
  """Steps between the points of a curve kept for the figure: about 200 points a run."""
  return max(1, num_steps // 200)


def sampled(curves: np.ndarray) -> list[float]:
  """``smoothed(curves)`` at steps 0, s, 2s, ... (``s = curve_stride``), to 4 digits."""
  curve = smoothed(curves)[:: curve_stride(np.shape(curves)[1] - 1)]
  return [float(f"{x:.4g}") for x in curve]


def final_losses(curves: np.ndarray) -> np.ndarray:
  """Each problem's mean loss over the last ``window`` steps, (problems,); inf if not finite."""
  curves = np.asarray(curves, np.float64)
  values = np.mean(curves[:, -window(curves.shape[1] - 1) :], axis=1)
  return np.where(np.isfinite(values), values, np.inf)


def final_loss(curves: np.ndarray) -> float:
  """Mean over problems of ``final_losses``; inf if any is not finite."""
  return float(np.mean(final_losses(curves)))


def diverged(curves: np.ndarray) -> bool:
  """A loss not finite, or the final loss above the mean initial loss."""
  curves = np.asarray(curves, np.float64)
  return bool(not np.all(np.isfinite(curves)) or final_loss(curves) > np.mean(curves[:, 0]))


def _first_reach(curve: np.ndarray, level: float) -> int | None:
  hits = np.flatnonzero(curve <= level)
  return int(hits[0]) if hits.size else None


def speedup(learned: np.ndarray, adam: np.ndarray) -> float:
  """Steps tuned Adam needs for the learned optimizer's final loss over the run's steps (<= 1),
  or the run's steps over those the learned optimizer needs for Adam's final loss (> 1)."""
  steps = np.shape(learned)[1] - 1
  if not math.isfinite(final_loss(learned)):
    return 0.0
  reach = _first_reach(smoothed(adam), final_loss(learned))
  if reach is not None:
    return max(reach, 1) / steps
  mine = _first_reach(smoothed(learned), final_loss(adam))
  return steps / max(mine if mine is not None else steps, 1)


def _ratio(a: float, b: float) -> float:
  return a / b if b > 0 else math.inf


def task_row(name: str, curves: Mapping[str, np.ndarray], learned: str) -> dict:
  """One task's numbers for the learned optimizer ``learned``; ``curves`` maps every optimizer
  (``adam_1e-3``, ``adam``, ``nag``, ``adamw``, learned ones) to its loss curves.

  ``problem_ratios``: the ratio on each problem alone, which shows how much the mean's ratio
  owes to the few problems (theta_0, minibatches) a task runs.
  """
  finals = {k: final_loss(v) for k, v in curves.items()}
  mine, adam = final_losses(curves[learned]), final_losses(curves["adam"])
  per_problem = [_ratio(a, b) for a, b in zip(mine.tolist(), adam.tolist(), strict=True)]
  return {
    "task": name,
    "final_losses": finals,
    "ratio_to_tuned_adam": _ratio(finals[learned], finals["adam"]),
    "problem_ratios": per_problem,
    "beats_adam_default": finals[learned] < finals["adam_1e-3"],
    "diverged": diverged(curves[learned]),
    "speedup_vs_tuned_adam": speedup(curves[learned], curves["adam"]),
  }


def interquartile_mean(values: Sequence[float]) -> float:
  """Mean of the middle half of ``values`` (a quarter cut from each end, fractions weighted)."""
  x = np.sort(np.asarray(values, np.float64))
  n = x.size
  if n == 0:
    return math.nan
  low, high = n / 4, 3 * n / 4
  weights = np.clip(np.minimum(np.arange(1, n + 1), high) - np.maximum(np.arange(n), low), 0, 1)
  kept = weights > 0  # an infinite ratio outside the middle half does not count
  return float(np.sum(weights[kept] * x[kept]) / np.sum(weights[kept]))


def aggregate(rows: Sequence[dict]) -> dict:
  """The suite's summary of one learned optimizer's ``task_row``s, with the floors' verdict."""
  ratios = [r["ratio_to_tuned_adam"] for r in rows]
  summary = {
    "num_tasks": len(rows),
    "beats_adam_default": float(np.mean([r["beats_adam_default"] for r in rows])),
    "median_ratio": float(np.median(ratios)),
    "iqm_ratio": interquartile_mean(ratios),
    "median_speedup": float(np.median([r["speedup_vs_tuned_adam"] for r in rows])),
    "diverged": int(sum(r["diverged"] for r in rows)),
  }
  summary["meets_floors"] = bool(
    summary["beats_adam_default"] >= FLOORS["beats_adam_default"]
    and summary["median_ratio"] <= FLOORS["median_ratio"]
    and summary["diverged"] <= FLOORS["diverged"]
  )
  return summary


def _yes(flag: bool) -> str:
  return "yes" if flag else "no"


def markdown(results: dict) -> str:
  """The suite's results (``eval.suite``'s JSON) as markdown: a verdict and a table per learned
  optimizer, then every optimizer's final loss per task."""
  from eval.report import table  # Deferred: keeps this module free of the commands' imports.

  lines = [f"# Held-out suite: {', '.join(results['learned'])}", ""]
  for name, part in results["learned"].items():
    s = part["summary"]
    lines += [
      f"## {name}",
      "",
      f"Beats Adam at 1e-3 on {s['beats_adam_default']:.0%} of {s['num_tasks']} tasks; final-loss "
      f"ratio to per-task-tuned Adam: median {s['median_ratio']:.3f}, interquartile mean "
      f"{s['iqm_ratio']:.3f}; median speed-up {s['median_speedup']:.2f}x; diverged on "
      f"{s['diverged']}. Floors (>= 80%, <= 1.0, none): "
      f"{'met' if s['meets_floors'] else 'not met'}.",
      "",
    ]
    rows = [
      (r["task"], f"{r['ratio_to_tuned_adam']:.3f}",
       f"{min(r['problem_ratios']):.2f}-{max(r['problem_ratios']):.2f}",
       _yes(r["beats_adam_default"]), f"{r['speedup_vs_tuned_adam']:.2f}x", _yes(r["diverged"]))
      for r in part["tasks"]
    ]  # fmt: skip
    header = ("task", "ratio to tuned Adam", "per problem", "beats Adam 1e-3", "speed-up",
              "diverged")  # fmt: skip
    lines += table(header, rows) + [""]
  names = list(results["tasks"][0]["final_losses"]) if results["tasks"] else []
  rows = []
  for t in results["tasks"]:
    rates = t["learning_rates"]
    cells = [
      f"{t['final_losses'][n]:.4g}" + (f" (lr {rates[n]:.3g})" if rates.get(n) else "")
      for n in names
    ]
    rows.append((t["task"], f"{t['num_params']:,}", t["num_steps"], *cells))
  lines += ["## Final losses (mean of the last 5% of steps)", ""]
  lines += table(("task", "params", "steps", *names), rows)
  return "\n".join(lines) + "\n"


def figure(tasks: Sequence[dict], path: str) -> str:
  """One panel per task: every optimizer's smoothed problem-mean curve, log scale."""
  from eval.plots import plt  # Deferred: matplotlib only where a figure is drawn.

  cols = min(4, max(1, len(tasks)))
  rows = math.ceil(len(tasks) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), dpi=100, squeeze=False)
  for ax, t in zip(axes.flat, tasks, strict=False):
    for name, curve in t["mean_curves"].items():
      learned = name in t["learned"]
      steps = t["curve_stride"] * np.arange(len(curve))
      ax.plot(steps, curve, "-" if learned else "--", label=name, linewidth=1.8 if learned else 1)
    ax.set_yscale("log")
    ax.set_title(t["task"], fontsize=9)
    ax.grid(alpha=0.3, which="both")
  for ax in list(axes.flat)[len(tasks) :]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
