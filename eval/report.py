"""What the engine's curves say: summaries, paired statistics, the verdict, tables (float64).

Every optimizer of one evaluation runs on the same problems, so comparisons are paired: the
mean and standard error of per-problem differences, which problem-to-problem difficulty does not
blur. ``verdict`` is the one "does it win" rule; figures are ``eval.plots``'.
"""

import json
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np


def stderr(values) -> float:
  """Standard error of the mean of ``values`` (problems,); 0.0 for fewer than two."""
  values = np.asarray(values, np.float64)
  return float(np.std(values, ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0


def paired(a, b) -> tuple[float, float]:
  """Mean and standard error of ``a - b`` over the same problems (both shaped (problems,))."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return float(np.mean(d)), stderr(d)


def run_means(curves) -> np.ndarray:
  """Per-problem mean loss over steps 1..T (eq. 3 with w_t = 1, over T): (problems,)."""
  curves = np.asarray(curves)
  return np.mean(curves[:, 1:] if curves.shape[1] > 1 else curves, axis=1)


def summarize(name: str, kind: str, curves, learning_rate: float | None) -> dict:
  """One optimizer's results from its loss curves shaped (problems, steps + 1)."""
  curves = np.asarray(curves)
  finals = curves[:, -1]
  means = run_means(curves)
  return {
    "name": name,
    "kind": kind,
    "learning_rate": learning_rate,
    "mean_curve": np.mean(curves, axis=0).tolist(),
    "median_curve": np.median(curves, axis=0).tolist(),
    "final_mean": float(np.mean(finals)),
    "final_stderr": stderr(finals),
    "final_median": float(np.median(finals)),
    "num_diverged": int(np.sum(~np.isfinite(finals))),
    "finals": finals.tolist(),  # per problem, in problem order: for paired comparisons
    "run_means": means.tolist(),
    "run_mean": float(np.mean(means)),
  }


def moments(prefix: str, curves) -> dict:
  """``{prefix}_final_*``, ``{prefix}_run_mean_*`` (mean, stderr) and mean/stderr curves."""
  c = np.asarray(curves, np.float64)
  out = {}
  for label, values in (("final", c[:, -1]), ("run_mean", run_means(c))):
    out[f"{prefix}_{label}_mean"] = float(np.mean(values))
    out[f"{prefix}_{label}_stderr"] = stderr(values)
  out[f"{prefix}_mean_curve"] = np.mean(c, axis=0).tolist()
  out[f"{prefix}_stderr_curve"] = (np.std(c, axis=0, ddof=1) / np.sqrt(c.shape[0])).tolist()
  return out


def pairs(kinds: Mapping[str, str], curves: Mapping[str, Mapping[str, np.ndarray]], steps) -> list:
  """Paired differences (learned - other) of each learned optimizer against every later one.

  Args:
    kinds: optimizer name -> "learned" or "baseline", in the results' order.
    curves: optimizer name -> {observable: (problems, T + 1)}, on the same problems.
    steps: steps at which differences are reported besides the mean over steps 1..T.

  Returns:
    Rows ``{"learned", "other", f"{obs}_run_mean": (mean, stderr), f"{obs}_steps": {step: ...}}``.
  """
  learned = [n for n, k in kinds.items() if k == "learned"]
  rows = []
  for i, a in enumerate(learned):
    for b in [n for n in kinds if n != a and n not in learned[: i + 1]]:
      row = {"learned": a, "other": b}
      for obs, x in curves[a].items():
        y = curves[b][obs]
        row[f"{obs}_run_mean"] = paired(run_means(x), run_means(y))
        row[f"{obs}_steps"] = {str(s): paired(x[:, s], y[:, s]) for s in steps}
      rows.append(row)
  return rows


def pm(value) -> str:
  """``(mean, stderr)`` as ``+0.0123 ± 0.0045``."""
  mean, err = value
  return f"{mean:+.4f} ± {err:.4f}"


class Verdict(NamedTuple):
  """The outcome of ``a`` against ``b`` on the same problems."""

  outcome: str  # "beats", "ties" or "loses"
  mean: float  # mean of a - b over the problems where both are finite (nan: none)
  stderr: float
  wins: int  # problems where a is lower (a non-finite value counts as +inf)
  both: int  # problems where both are finite


def verdict(a, b) -> Verdict:
  """Does ``a`` beat ``b``? Paired per problem, each shaped (problems,).

  ``a`` beats ``b`` when it diverges (is non-finite) on no more problems and the mean paired
  difference over the problems where both are finite is more than two standard errors below
  zero; it loses when it diverges on more, or the difference is more than two above; else ties.
  Fewer than two problems finite for both give no evidence either way: a tie (unless ``a``
  diverges on more).
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  a, b = np.where(np.isfinite(a), a, np.inf), np.where(np.isfinite(b), b, np.inf)
  both = np.isfinite(a) & np.isfinite(b)
  mean, err = paired(a[both], b[both]) if both.any() else (float("nan"), 0.0)
  worse = np.sum(~np.isfinite(a)) > np.sum(~np.isfinite(b))
  if worse:
    outcome = "loses"
  elif np.sum(both) < 2:
    outcome = "ties"
  else:
    outcome = "loses" if mean > 2 * err else "beats" if mean < -2 * err else "ties"
  return Verdict(outcome, mean, err, int(np.sum(a < b)), int(np.sum(both)))


def finite(values) -> np.ndarray:
  """The finite ``values``; one nan when none is."""
  values = np.asarray(values, float)
  return values[np.isfinite(values)] if np.isfinite(values).any() else np.full(1, np.nan)


def final_or_inf(summary: dict) -> float:
  """A summary's mean final loss; inf when any run diverged (it never wins)."""
  return summary["final_mean"] if summary["num_diverged"] == 0 else float("inf")


def best_baseline(results: dict) -> dict:
  """The baseline summary with the lowest ``final_or_inf``."""
  return min((r for r in results["optimizers"] if r["kind"] == "baseline"), key=final_or_inf)


def lr_text(result: dict) -> str:
  return "-" if result["learning_rate"] is None else f"{result['learning_rate']:.3g}"


def read_results(output_dir: str, names: Sequence[str]) -> dict[str, dict]:
  """``{name: results}`` of each ``output_dir/<name>/results.json`` there is, in ``names`` order."""
  found = {}
  for name in names:
    path = os.path.join(output_dir, name, "results.json")
    if os.path.isfile(path):
      with open(path) as f:
        found[name] = json.load(f)
  return found


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  """A markdown table's lines."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def format_table(results: dict) -> str:
  """A plain-text table: optimizer, learning rate, mean final loss +- stderr, median."""
  lines = [
    f"{'optimizer':<16}{'lr':>10}{'final mean':>14}{'stderr':>10}{'median':>12}{'diverged':>10}",
  ]
  for r in sorted(results["optimizers"], key=lambda r: r["final_mean"]):
    lines.append(
      f"{r['name']:<16}{lr_text(r):>10}{r['final_mean']:>14.4g}{r['final_stderr']:>10.2g}"
      f"{r['final_median']:>12.4g}{r['num_diverged']:>10d}"
    )
  return "\n".join(lines)


def write(path: str, content: dict | str) -> str:
  """Writes ``content`` (a dict as JSON, else text) to ``path`` atomically, making its folder."""
  from learned_opt.tree_files import atomic_write  # Deferred: only the commands that write.

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_write(path, (json.dumps(content) if isinstance(content, dict) else content).encode())
  return path


def refuse_existing(output_dir: str, name: str, overwrite: bool) -> None:
  """A usage error if ``output_dir`` already holds ``name`` (as process 0 sees it), unless
  ``overwrite``: an earlier evaluation's results are never replaced by accident."""
  from train import command_line, distributed  # Deferred: they import absl and jax.

  there = distributed.is_writer() and os.path.isfile(os.path.join(output_dir, name))
  if distributed.broadcast_bytes(b"1" if there else b"0") == b"1" and not overwrite:
    raise command_line.UsageError(
      f"--output_dir={output_dir!r} already holds {name}; pass --overwrite to replace it, or "
      "name another directory."
    )


def say(line: str) -> None:
  """Prints ``line`` on process 0 alone, the one that reports for every process of a run."""
  from train import distributed  # Deferred: it imports jax.

  if distributed.is_writer():
    print(line, flush=True)


def ranking_table(results: dict) -> str:
  """``eval.rank.rank``'s results as a markdown table: candidates best first, the baseline last,
  each loss ± its standard error and each paired difference to the baseline (``pm``)."""
  plain = lambda mean, err: f"{mean:.4f} ± {err:.4f}"
  b, step, T = results["baseline"], results["step"], results["num_steps"]
  tuning = b["tuning"]
  by = f"loss at step {step} of {T}" if results["rank_by"] == "step" else f"mean loss, steps 1..{T}"
  tuned = (
    "fixed by --baseline_lr"
    if tuning["fixed"]
    else f"tuned over {len(tuning['learning_rates'])} grid rates on {tuning['num_problems']} "
    f"{tuning['problems']} problems (seed {tuning['seed']}) for the loss at step {step}"
  )
  lines = [
    f"# Ranking by {by}",
    "",
    f"{results['num_problems']} held-out problems (seed {results['seed']}; never training or "
    f"validation problems) of task `{json.dumps(results['task'])}`. Baseline {b['name']}, lr "
    f"{b['learning_rate']:.3g}, {tuned}. Paired differences are candidate minus {b['name']} on the "
    "same problems (negative: the candidate is better), ± their standard error.",
    "",
    f"| rank | candidate | kind | meta-step | loss at step {step} | minus {b['name']} "
    f"| mean loss, steps 1..{T} | minus {b['name']} | diverged |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results["candidates"]:
    meta_step = "-" if r["meta_step"] is None else str(r["meta_step"])
    lines.append(
      f"| {r['rank']} | {r['name']} | {r['kind']} | {meta_step} "
      f"| {plain(r['step_loss'], r['step_loss_stderr'])} "
      f"| {pm((r['step_minus_baseline'], r['step_minus_baseline_stderr']))} "
      f"| {plain(r['run_mean'], r['run_mean_stderr'])} "
      f"| {pm((r['run_mean_minus_baseline'], r['run_mean_minus_baseline_stderr']))} "
      f"| {r['num_diverged']} |"
    )
  lines.append(
    f"| - | {b['name']} (lr {b['learning_rate']:.3g}) | baseline | - "
    f"| {plain(b['step_loss'], b['step_loss_stderr'])} | - "
    f"| {plain(b['run_mean'], b['run_mean_stderr'])} | - | {b['num_diverged']} |"
  )
  return "\n".join(lines) + "\n"


def run_each(names, run, output_dir: str, summary: str, summary_text, each, order=None) -> dict:
  """Runs ``run(name) -> results`` for each of ``names`` (every process) and reports each.

  After each, process 0 writes ``output_dir/NAME/results.json`` (with ``seconds``), calls
  ``each(results, directory)`` (figures, printed tables) and rewrites ``summary`` with
  ``summary_text({name: results})`` of every result in ``output_dir`` so far (``read_results``
  in ``order``, default ``names``). Results without optimizers are not written.

  Returns:
    ``{name: results}`` of this call's runs.
  """
  import time

  from train import distributed  # Deferred: it imports jax.

  done = {}
  for name in names:
    tic = time.time()
    done[name] = results = run(name)
    results["seconds"] = time.time() - tic
    if not results["optimizers"] or not distributed.is_writer():
      continue  # process 0 writes and prints
    directory = os.path.join(output_dir, name)
    write(os.path.join(directory, "results.json"), results)
    each(results, directory)
    write(summary, summary_text(read_results(output_dir, order or names)))
    print(f"Wrote {summary} ({results['seconds']:.0f} s)", flush=True)
  return done


def mean_pm(mean: float, err: float) -> str:
  """``0.3080 ± 0.0050``: a mean and its standard error in a table."""
  return f"{mean:.4f} ± {err:.4f}"


def summarize_observables(result, prefixes: Mapping[str, str]) -> dict:
  """An ``eval.engine.Result``'s summary over several curves, for a results file.

  ``moments`` of each curve under its prefix (``{"loss": "train", "test": "test"}``), the runs
  whose loss went non-finite, a baseline's tuning scores, the rates it was chosen from on the
  test problems (``chosen_on_test_problems_from``, when the cache gathered several) and seconds.
  """
  out = {"name": result.name, "kind": result.kind, "learning_rate": result.learning_rate}
  for curve, prefix in prefixes.items():
    out.update(moments(prefix, result.curves[curve]))
  out["num_diverged"] = int(np.sum(~np.all(np.isfinite(result.curves["loss"]), axis=1)))
  if result.kind == "baseline":
    out["tuning_scores"] = result.record.get("tuning_scores", {})
  if result.record.get("chosen_from"):
    out["chosen_on_test_problems_from"] = result.record["chosen_from"]
  return {**out, "seconds": result.record.get("seconds")}


def check_names(flag: str, names: Sequence[str], known) -> None:
  """A ``ValueError`` naming ``--flag`` when any of ``names`` is not one of ``known``."""
  if unknown := [n for n in names if n not in known]:
    raise ValueError(f"Unknown --{flag} {unknown}; choose from {list(known)}.")


def summary(header: str, all_results: Mapping[str, dict], titles, section) -> str:
  """An experiments' markdown summary: ``header``, then for each ``name: results`` a heading
  ``## name: titles[name]`` and the lines of ``section(results)``, each followed by a blank."""
  lines = [header, ""]
  for name, results in all_results.items():
    lines += [f"## {name}: {titles[name]}", "", *section(results), ""]
  return "\n".join(lines)


def summary_header(title: str, command: str, details: str) -> str:
  """A summary's first lines: ``# title`` and which command wrote it, with ``details``."""
  return f"# {title}\n\nWritten by `python -m experiments.{command}`{details}"


def tuning_text(results: dict) -> str:
  """How ``summarize_observables`` baselines' rates were chosen (the runs may differ)."""
  t, notes = results["tuning"], []
  rows = [r for r in results["optimizers"] if r["kind"] == "baseline"]
  swept = [r for r in rows if r.get("tuning_scores")]
  if swept:
    counts = sorted({len(r["tuning_scores"]) for r in swept})
    notes.append(
      f"{', '.join(r['name'] for r in swept)} tuned by {t['criterion']} on "
      f"{t['num_problems']} separate problems (seed {t['seed']}) over "
      f"{'/'.join(map(str, counts))} rates"
      + ("" if t["lr_stride"] == 1 else f" (coarse-to-fine, stride {t['lr_stride']})")
    )
  if any(r.get("chosen_on_test_problems_from") for r in rows):
    notes.append("where the lr cell lists rates, the best of those on the test problems")
  if any(not r.get("tuning_scores") and not r.get("chosen_on_test_problems_from") for r in rows):
    notes.append("'not tuned': one rate of the grid, chosen by hand")
  return "; ".join(notes) if notes else "none"


def lr_cell(r: dict) -> str:
  """An lr cell that says how an engine baseline's rate was chosen (``summarize_observables``)."""
  chosen = r.get("chosen_on_test_problems_from")
  if chosen:
    return f"{lr_text(r)} (best on the test problems of {', '.join(f'{x:.3g}' for x in chosen)})"
  untuned = r["kind"] == "baseline" and not r.get("tuning_scores")
  return lr_text(r) + (" (not tuned)" if untuned else "")


def verdict_vs_best(results: dict) -> str:
  """Whether the learned optimizer's final loss beats the best tuned baseline's, paired.

  Every optimizer runs on the same test problems (theta_0 and minibatch keys), so the verdict
  is ``eval.verdict`` of the per-problem differences (two standard errors).
  """
  learned = [r for r in results["optimizers"] if r["kind"] == "learned"][0]
  best = best_baseline(results)
  v = verdict(learned["finals"], best["finals"])
  outcome = {"beats": "beats", "loses": "does NOT beat"}.get(
    v.outcome, "ties (paired difference within two stderrs) with"
  )
  name = learned["name"]  # its kind: lstm, ntm_lbfgs, ...
  return (
    f"{name} {outcome} the best tuned baseline ({best['name']}, lr {best['learning_rate']:.3g}): "
    f"{learned['final_mean']:.4f} vs {best['final_mean']:.4f} (paired difference {name} - "
    f"{best['name']} {pm((v.mean, v.stderr))} over {len(learned['finals'])} shared test "
    "problems)."
  )


def verdict_vs_each(results: dict) -> str:
  """Whether the learned optimizer beats each tuned baseline at step T, paired by content.

  ``eval.verdict`` of the final losses; the mean over the run is reported beside it.
  """
  learned = [r for r in results["optimizers"] if r["kind"] == "learned"]
  if not learned:
    return "No learned optimizer in these results."
  lstm, lines, beaten = learned[0], [], []
  for r in (r for r in results["optimizers"] if r["kind"] == "baseline"):
    final = verdict(lstm["finals"], r["finals"])
    run = verdict(lstm["run_means"], r["run_means"])
    beaten.append(final.outcome == "beats")
    lines.append(
      f"- vs {r['name']} (lr {r['learning_rate']:.3g}, {r['num_diverged']} diverged): "
      f"final {pm(final[1:3])} over {final.both}, lower on {final.wins}/{len(r['finals'])}; "
      f"mean over the run {pm(run[1:3])}, "
      f"lower on {run.wins}"
    )
  head = "beats every tuned baseline" if all(beaten) else "does NOT beat every tuned baseline"
  return (
    f"{lstm['name']} {head} at step {results['num_steps']} (paired by content; a difference "
    "counts when more than 2 stderr):\n" + "\n".join(lines)
  )
