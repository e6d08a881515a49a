"""The one evaluation engine: a ``Spec`` of problems and optimizers -> curves (section 3).

A spec names the task and its test problems, the optimizers (saved learned ones; baselines from
``eval.baselines`` by name), how a baseline's learning rate is chosen (the paper's grid, whole or
coarse-to-fine, on separate tuning problems or on the test problems), extra per-step observables,
how problems are chunked and on which mesh they run. ``run(spec)`` gives every optimizer's curves
on the same problems (so differences pair up), learned optimizers first. Curves go through the
one cache (``eval.cache``) when the spec names a ``cache_dir``.

Example:
  >>> spec = engine.Spec(tasks.get("quadratic"), engine.Problems(256, seed=2016), 100,
  ...                    learned={"lstm": saved}, baselines=("adam", "sgd"))
  >>> for r in engine.run(spec): print(r.name, r.learning_rate, r.curves["loss"].shape)
"""

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

import learned_opt
from eval import baselines as baselines_lib
from eval import cache, tuning
from eval import curves as curves_lib
from learned_opt import tree_files
from tasks.base import TaskFamily
from train import inner as inner_lib
from train import progress as progress_lib

DRAWS = ("sample", "in_order")


class Problems(NamedTuple):
  """Which problems: ``count`` of them from ``seed``.

  ``draw="sample"``: ``train.inner.sample_problems`` with ``curves.problem_key(seed)``;
  ``"in_order"``: the first ``count`` contents of a neural-art family, each once, run keys
  ``split(key(seed), count)``.
  """

  count: int
  seed: int
  draw: str = "sample"


class Tuning(NamedTuple):
  """How a baseline's learning rate is chosen: the lowest mean loss at ``step`` (None: final).

  ``problems``/``task`` None: on the test problems/task, and the chosen rate's sweep curves are
  the results; else the grid is swept there and the chosen rate alone runs on the test problems.
  """

  learning_rates: tuple[float, ...] = tuple(baselines_lib.paper_learning_rates().tolist())
  stride: int = 1  # 1: the whole grid; s > 1: every s-th rate, then refine (``tuning``)
  problems: Problems | None = None
  task: TaskFamily | None = None
  step: int | None = None


@dataclasses.dataclass(frozen=True)
class Spec:
  """One evaluation: which problems, which optimizers, how tuned, chunked and cached.

  ``learned`` maps labels to saved optimizers; ``baselines`` names entries of
  ``eval.baselines.ALL_BASELINES``. ``observables`` are read on every trajectory beside the
  loss (``eval.curves``).
  """

  task: TaskFamily
  problems: Problems
  num_steps: int
  learned: Mapping[str, learned_opt.SavedOptimizer] = dataclasses.field(default_factory=dict)
  baselines: Sequence[str] = ()
  tuning: Tuning = Tuning()
  observables: Sequence[curves_lib.Observable] = ()
  problem_batch: int | None = None  # problems run at once (bounds memory); None: all
  lr_batch: int | None = None  # learning rates vmapped at once; None: all
  mesh: Mesh | None = None  # default: every device of every process
  cache_dir: str | None = None  # read and written; None: no cache
  reuse: bool = True  # read cache_dir (else only write it)
  reuse_from: Sequence[str] = ()  # more cache dirs, read only; see ``run``


class Result(NamedTuple):
  """One optimizer's curves on the spec's test problems."""

  name: str
  kind: str  # "learned" or "baseline"
  learning_rate: float | None
  curves: dict[str, np.ndarray]  # "loss" and each observable: (problems, num_steps + 1)
  record: dict  # tuning_scores {rate: score}, seconds, reused (a path) or chosen_from (rates)


def draw(task: TaskFamily, problems: Problems):
  """``(task_params, run_keys)``, each with a leading (count,) axis."""
  if problems.draw == "sample":
    return inner_lib.sample_problems(task, curves_lib.problem_key(problems.seed), problems.count)
  if problems.draw == "in_order":
    from tasks import neural_art  # the one family with a fixed list of problems

    params = neural_art.problems_in_order(task, problems.count)
    return params, jax.random.split(jax.random.key(problems.seed), problems.count)
  raise ValueError(f"Problems.draw must be one of {DRAWS}, got {problems.draw!r}.")


def check(spec: Spec) -> None:
  """A ``ValueError`` naming what is wrong with ``spec``, before anything compiles."""
  unknown = [b for b in spec.baselines if b not in baselines_lib.ALL_BASELINES]
  if unknown:
    raise ValueError(
      f"Unknown baselines {unknown}; choose from {', '.join(baselines_lib.ALL_BASELINES)}."
    )
  if spec.tuning.stride < 1 or not spec.tuning.learning_rates:
    raise ValueError("Tuning needs a stride >= 1 and at least one learning rate.")
  if spec.num_steps < 1:
    raise ValueError(f"num_steps must be positive, got {spec.num_steps}.")
  for what, problems in (("problems", spec.problems), ("tuning problems", spec.tuning.problems)):
    if problems is not None and problems.count < 1:
      raise ValueError(f"The {what} need a positive count, got {problems.count}.")
  for what, batch in (("problem_batch", spec.problem_batch), ("lr_batch", spec.lr_batch)):
    if batch is not None and batch < 0:
      raise ValueError(f"{what} must be positive (0 or None: all at once), got {batch}.")
  step = spec.tuning.step
  if step is not None and not -spec.num_steps - 1 <= step <= spec.num_steps:
    raise ValueError(
      f"Tuning.step={step} is not a step of a {spec.num_steps}-step run (0..{spec.num_steps})."
    )


def _problems_key(spec: Spec) -> str:
  observables = [
    {"name": o.name, "config": o.config, "data": cache.data_fingerprint(o.data)}
    for o in spec.observables
  ]
  return cache.fingerprint(
    {
      "version": cache.VERSION,
      "task": cache.task_fingerprint(spec.task.config, spec.task.data),
      "problems": spec.problems,
      "num_steps": spec.num_steps,
      "observables": observables,
    }
  )


def _tuning_key(t: Tuning) -> dict:
  task = None if t.task is None else cache.task_fingerprint(t.task.config, t.task.data)
  return {**t._replace(task=None)._asdict(), "task": task}


def _tuning_record(spec: Spec) -> dict:
  """How a baseline was tuned, in words a results file keeps."""
  t = spec.tuning
  where = "test" if t.problems is None and t.task is None else "separate"
  count = (t.problems or spec.problems).count
  return {"learning_rates": list(t.learning_rates), "stride": t.stride, "problems": where,
          "num_problems": count, "step": t.step}  # fmt: skip


def _chunks(count: int, batch: int | None) -> int:
  """How many chunks of ``batch`` (None or 0: all at once) ``count`` things run in."""
  return -(-count // min(batch or count, count))


def _sweep(
  spec, task, make_tx, rates, problems, observables, mesh, log=None, name=""
) -> dict[str, np.ndarray]:
  """Curves ``{name: (rates, problems, steps + 1)}`` of ``make_tx(rate)`` for every rate.

  Rates run ``spec.lr_batch`` at a time (default all at once), each batch over the problems in
  chunks of ``spec.problem_batch``; with more than one chunk, ``log`` gets progress lines
  (``train.progress``) labelled ``name``.
  """
  rates = np.asarray(rates, np.float32)
  batch = min(spec.lr_batch or len(rates), len(rates))
  fn = curves_lib.compiled(task, make_tx, spec.num_steps, observables, True)
  count = int(np.shape(problems[1])[0])
  per_batch = _chunks(count, spec.problem_batch)
  progress = progress_lib.Progress(
    name, _chunks(len(rates), batch) * per_batch, log or (lambda s: None)
  )
  parts = []
  for start in range(0, len(rates), batch):
    chunk = rates[start : start + batch]
    lr = f"lr {chunk[0]:.3g}" + (f" to {chunk[-1]:.3g}" if len(chunk) > 1 else "")

    def step(first, stop, total, lr=lr):
      progress.step(lr if per_batch == 1 else f"{lr}, problems {first + 1}-{stop} of {total}")

    # A short last chunk repeats its last rate up to the batch (dropped below): one compile.
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk))])
    out = curves_lib.curves(
      task, fn, padded, *problems, observables, spec.problem_batch, mesh, True, step
    )
    parts.append({k: v[: len(chunk)] for k, v in out.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def tune(spec: Spec, name: str, problems, mesh=None, log=None) -> tuple[float, dict, dict | None]:
  """A baseline's rate chosen as ``spec.tuning`` says (``log``: progress lines of a sweep that
  runs in chunks).

  Returns:
    ``(rate, {rate: score}, curves)``: scores of every rate swept (mean loss at the tuning
    step, inf where a run diverged; {} for a one-rate grid on separate problems); ``curves``
    are the chosen rate's on the test problems when tuned on them, else None.
  """
  t, make_tx = spec.tuning, baselines_lib.ALL_BASELINES[name]
  rates = np.asarray(t.learning_rates, np.float64)
  on_test = t.problems is None and t.task is None
  if len(rates) == 1 and not on_test:  # nothing to choose: no sweep
    return float(rates[0]), {}, None
  task = t.task or spec.task
  where = problems if on_test else draw(task, t.problems or spec.problems)
  observables = spec.observables if on_test else ()
  kept = {}

  def evaluate(subset):
    grid = _sweep(spec, task, make_tx, subset, where, observables, mesh, log, name)
    for i, rate in enumerate(subset):
      kept[float(rate)] = {k: v[i] for k, v in grid.items()}
    step = -1 if t.step is None else t.step
    return tuning.score(grid[curves_lib.LOSS][:, :, step])

  best, scores = tuning.coarse_to_fine(evaluate, rates, t.stride)
  rate = float(rates[best])
  swept = {float(rates[i]): s for i, s in sorted(scores.items())}
  return rate, swept, kept[rate] if on_test else None


def _learned_curves(
  spec, saved, problems, mesh, compiles: dict, log=None, name=""
) -> dict[str, np.ndarray]:
  """A learned optimizer's curves; one compile per optimizer config and backend (a run's
  checkpoints share one). Problems in chunks report progress to ``log``."""
  config = cache.fingerprint(_optimizer_key(saved.optimizer))
  if config not in compiles:
    make_tx = lambda phi: learned_opt.as_optax(saved.optimizer, phi)
    compiles[config] = curves_lib.compiled(spec.task, make_tx, spec.num_steps, spec.observables)
  fn = compiles[config]
  count = int(np.shape(problems[1])[0])
  progress = progress_lib.Progress(
    name, _chunks(count, spec.problem_batch), log or (lambda s: None)
  )
  step = lambda first, stop, total: progress.step(f"problems {first + 1}-{stop} of {total}")
  return curves_lib.curves(
    spec.task, fn, saved.meta_params, *problems, spec.observables, spec.problem_batch, mesh,
    on_chunk=step,
  )  # fmt: skip


def _optimizer_key(optimizer) -> dict:
  """What of a learned optimizer (besides phi) determines its curves: its config and the backend
  its update runs on (not a config setting; ``learned_opt.backend``)."""
  return {"config": optimizer.config, "backend": optimizer.backend}


def _baseline(spec, name, problems, mesh, log=None) -> tuple[float, dict, dict]:
  rate, scores, found = tune(spec, name, problems, mesh, log)
  if found is None:
    make_tx = baselines_lib.ALL_BASELINES[name]
    grid = _sweep(spec, spec.task, make_tx, [rate], problems, spec.observables, mesh, log, name)
    found = {k: v[0] for k, v in grid.items()}
  return rate, scores, found


def _reused(spec, name, kind, problems_key, key, log) -> Result | None:
  """The entry cached under ``key`` in ``cache_dir``, else from ``reuse_from``: a learned
  optimizer's under ``key``, a baseline's best on the test problems of any tuning."""
  own = [spec.cache_dir] if spec.reuse and spec.cache_dir else []
  for directory in own + (list(spec.reuse_from) if kind == "learned" else []):
    entry = cache.load(directory, name, problems_key, key)
    if entry is not None:
      log(f"{name}: reused its curves in {directory}")
      record = {**entry.record, "reused": directory}
      return Result(name, kind, record["learning_rate"], entry.curves, record)
  found = cache.gather(spec.reuse_from, name, problems_key) if kind == "baseline" else []
  if not found:
    return None
  best = min(found, key=lambda e: float(tuning.score(e.curves[curves_lib.LOSS][None, :, -1])[0]))
  record = {**best.record, "reused": "gathered"}
  if len(found) > 1:  # a choice made on the test problems
    record["chosen_from"] = sorted(e.record["learning_rate"] for e in found)
  log(f"{name}: reused the best of {len(found)} tuned runs (reuse_from)")
  return Result(name, kind, best.record["learning_rate"], best.curves, record)


def _work(spec: Spec, kind: str) -> str:
  """What an optimizer's run will do, for the line that starts it (a long sweep shows it began)."""
  runs = f"{spec.problems.count} problems x {spec.num_steps} steps"
  t = spec.tuning
  count = len(t.learning_rates)
  if kind == "learned" or count == 1:
    return runs
  rates = count if t.stride == 1 else f"1 in {t.stride} of {count}"
  where = "on the test problems" if t.problems is None and t.task is None else "on separate ones"
  return f"{runs}, tuning over {rates} learning rates {where}"


def _flushed(log: Callable[[str], None]) -> Callable[[str], None]:
  """``log``, then stdout flushed: a log file shows each line as it comes."""

  def say(line: str) -> None:
    log(line)
    sys.stdout.flush()

  return say


def run(spec: Spec, log: Callable[[str], None] = print) -> list[Result]:
  """Every optimizer of ``spec`` on its test problems: learned ones first, then baselines.

  ``log`` gets a line per optimizer as it starts and as it ends (its rate, mean final loss and
  seconds, or where it was reused from), and progress lines (``train.progress``: chunk, rate,
  ETA) while one runs in chunks (``lr_batch``, ``problem_batch``); stdout is flushed after each.

  With ``cache_dir``, an optimizer whose curves are cached under the same fingerprints is not
  run again, and new curves are saved there. ``reuse_from`` dirs are read too; for a baseline
  not cached under the same tuning, every entry there on the same test problems (whatever its
  tuning) is a candidate and the lowest mean final loss wins (``record["chosen_from"]`` lists
  the rates when there were several). Every process calls this together.
  """
  check(spec)
  log = _flushed(log)
  problems = draw(spec.task, spec.problems)
  caching = bool(spec.cache_dir or spec.reuse_from)
  problems_key = _problems_key(spec) if caching else ""
  todo = [(n, "learned", s) for n, s in spec.learned.items()]
  todo += [(n, "baseline", None) for n in spec.baselines]
  results, compiles = [], {}
  for name, kind, saved in todo:
    if kind == "learned":
      phi_hash = tree_files.encode(saved.meta_params)[1] if caching else ""
      key = {"optimizer": _optimizer_key(saved.optimizer), "phi": phi_hash}
    else:
      key = {"baseline": name, "tuning": _tuning_key(spec.tuning)}
    key = cache.fingerprint(key) if caching else ""
    found = _reused(spec, name, kind, problems_key, key, log) if caching else None
    if found is None:
      log(f"{name} ({len(results) + 1} of {len(todo)}): {_work(spec, kind)} ...")
      tic = time.time()
      if kind == "learned":
        c = _learned_curves(spec, saved, problems, spec.mesh, compiles, log, name)
        rate, scores = None, {}
      else:
        rate, scores, c = _baseline(spec, name, problems, spec.mesh, log)
      record = {"kind": kind, "learning_rate": rate, "seconds": time.time() - tic}
      record["tuning_scores"] = {f"{r:.6g}": s for r, s in scores.items()}
      if kind == "baseline":
        record["tuning"] = _tuning_record(spec)
      found = Result(name, kind, rate, c, record)
      lr = "" if rate is None else f"lr {rate:.3g}, "
      final = float(np.mean(c[curves_lib.LOSS][:, -1]))
      log(f"{name}: {lr}final loss {final:.4g} ({record['seconds']:.0f} s)")
      if spec.cache_dir:
        cache.save(spec.cache_dir, name, problems_key, key, cache.Entry(record, c))
    results.append(found)
  return results
