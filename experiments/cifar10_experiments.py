r"""The CIFAR-10 experiments of section 3.3 (Figure 7) in one command.

Example:
  CIFAR10_DIR=../shared/data/cifar10 python -m experiments.cifar10_experiments \
    --learned=two_lstms=runs/cifar10_two_lstms,one_lstm=runs/cifar10_one_lstm \
    --output_dir=runs/cifar10_experiments

Experiments (``--experiments``), each a task setting of ``tasks.get("cifar10_conv", ...)``:

- ``cifar10``: all ten classes, the net trained on the training images (Figure 7, left);
- ``cifar10_test``: the same on the 10000 test images, which meta-training never drew from
  (Figure 7, right: "performance on a held-out test set");
- ``cifar5``: the held-out labels 5..9 (dog frog horse ship truck), for an optimizer
  meta-trained on labels 0..4 beside ones trained on labels that include 5..9;
- ``cifar2``: two of the held-out labels, 5 and 6 (dog, frog).

Every experiment runs every ``--learned`` optimizer (``NAME=DIR`` of a saved optimizer, or
``NAME=pretrained:cifar10_conv``) and every baseline on the same fresh test problems (theta_0
and minibatch keys from ``eval.compare.problem_key(seed)``, so differences are paired). Each
step records the loss on the step's minibatch (the objective the optimizer minimizes, from the
experiment's split) and the loss of the same parameters on a minibatch of 128 images of the
same classes from the other split (held out: generalization).

Baselines are tuned on the paper's grid 1e-6 * 2^k, k < 30, by the lowest mean final training
loss on ``--tune_problems`` separate problems (seed + 1). On a CPU the whole grid is costly, so
``--lr_stride=s > 1`` sweeps every s-th rate first and then the rates within s - 1 grid points
of the best one: the same choice as the whole grid whenever the mean final loss has one minimum
over the rates at that spacing. The output says which grid and how many tuning problems were
used. Tuned baselines (and their test-problem curves) are kept in
``<output_dir>/<experiment>/baselines.npz``, a learned optimizer's curves in
``learned_<name>.npz``, and reused by a later run with the same setting (and phi); so baselines
can be run while optimizers are still meta-training (``--learned=``), in parallel processes
with their own output dirs, and gathered by one last run with ``--reuse_from``.

Writes ``<output_dir>/<experiment>/results.json``, ``curves.npz`` (per-problem curves),
``curves.png`` (training and test loss against step) and a markdown summary with paired
standard errors (``--summary``, default ``<output_dir>/results_cifar10.md``).
"""

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import learned_opt
import tasks
from eval import baselines as baselines_lib
from eval import compare, sharding
from eval.stats import paired
from learned_opt import tree_files
from learned_opt.tree_files import atomic_write
from train import command_line, distributed
from train import inner as inner_lib

HELD_OUT = (5, 6, 7, 8, 9)  # labels the "sub" optimizer (trained on 0..4) never saw
REPORT_STEPS = (10, 25, 50)  # steps where paired differences are reported besides the last


class Experiment(NamedTuple):
  name: str
  title: str  # the paper's panel it repeats
  classes: tuple[int, ...] | None  # None: all ten
  split: str = "train"  # the images the optimizee is trained on; the other split is held out


EXPERIMENTS = (
  Experiment("cifar10", "Fig. 7 left: CIFAR-10 problems on the training images", None),
  Experiment("cifar10_test", "Fig. 7 right: CIFAR-10 problems on the test images", None, "test"),
  Experiment("cifar5", "CIFAR-5: held-out labels 5-9 (training images)", HELD_OUT),
  Experiment("cifar2", "CIFAR-2: held-out labels 5 and 6 (training images)", HELD_OUT[:2]),
)
BY_NAME = {e.name: e for e in EXPERIMENTS}


class Curves(NamedTuple):
  """Per-problem losses of one optimizer, each shaped (problems, num_steps + 1)."""

  train: np.ndarray  # f(theta_t) on step t's minibatch: the objective being minimized
  test: np.ndarray  # loss of theta_t on a minibatch of the other split's images (held out)


# ---------------------------------------------------------------------------------------------
# Rollouts recording training- and test-set losses.


def rollout_train_test(task, test_task, tx, data, test_data, task_params, key, num_steps: int):
  """One problem optimized for ``num_steps`` steps, as ``train.inner.rollout`` does.

  The training losses equal ``inner.rollout``'s for the same key (same theta_0, same
  minibatches); the test loss at step t is theta_t's loss on test minibatch ``fold_in(k, t)``
  with ``k = fold_in(key, 1)``, a key the training minibatches do not use.

  Returns:
    ``(train_losses, test_losses)``, each shaped (num_steps + 1,).
  """
  init_key, data_key = jax.random.split(key)
  test_key = jax.random.fold_in(key, 1)
  state = inner_lib.start(task, tx, data, task_params, init_key, data_key)

  def test_loss(state):
    return test_task.loss(
      test_data, state.task_params, state.params, jax.random.fold_in(test_key, state.step)
    )

  def body(state, _):
    loss, grads = inner_lib.gradient(task, data, state)
    held_out = test_loss(state)
    return inner_lib.apply(tx, state, grads), (loss, held_out)

  state, (train, test) = jax.lax.scan(body, state, length=num_steps)
  final = task.loss(data, state.task_params, state.params, inner_lib.minibatch_key(state))
  return jnp.append(train, final), jnp.append(test, test_loss(state))


def run_curves(
  task,
  test_task,
  make_tx: Callable[[Any], Any],
  tx_args,
  task_params,
  keys,
  num_steps: int,
  problem_batch: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> Curves:
  """``rollout_train_test`` on every problem, ``problem_batch`` problems vmapped at a time.

  ``make_tx(tx_args)`` builds the optax transformation inside the jitted computation, so
  ``tx_args`` (phi, a learning rate) is an argument rather than a baked-in constant.

  The problems are split over ``mesh`` (default: ``eval.sharding.problems_mesh()``) in whole
  batches of ``problem_batch``, on as few devices as hold as many batches each (as
  ``eval.sharding.fit_mesh`` picks), padded at the end with copies of the last problem whose
  curves are dropped. Each device maps over its own share, so every problem is vmapped with the
  same others as on one device: the curves are those of one device, bit for bit on tiny CIFAR
  problems on 8 faked CPU devices (also with a last, partial batch, which is vmapped with the
  padding; XLA does not promise that). Every process calls this together and gets every curve.
  """
  count = int(np.shape(keys)[0])
  batch = problem_batch or 1  # None: lax.map runs the problems one by one
  mesh = sharding.fit_mesh(-(-count // batch), mesh or sharding.problems_mesh())
  extra = -(-count // (batch * mesh.devices.size)) * batch * mesh.devices.size - count
  pad = lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])
  problems = jax.tree.map(pad, (task_params, keys)) if extra else (task_params, keys)
  task_params, keys = distributed.put(problems, distributed.problems_sharding(mesh))
  whole = distributed.replicated(mesh)

  def run(data, test_data, tx_args, task_params, keys):  # one device's problems
    one = lambda pk: rollout_train_test(
      task, test_task, make_tx(tx_args), data, test_data, pk[0], pk[1], num_steps
    )
    return jax.lax.map(one, (task_params, keys), batch_size=problem_batch)

  split, same = jax.sharding.PartitionSpec(sharding.AXIS), jax.sharding.PartitionSpec()
  # check_vma off: the optimizee's zero-initialized state starts out the same on every device.
  specs = {"in_specs": (same, same, same, split, split), "out_specs": split}
  per_device = jax.shard_map(run, mesh=mesh, check_vma=False, **specs)
  placed = distributed.put((task.data, test_task.data, tx_args), whole)
  train, test = distributed.to_host(jax.jit(per_device)(*placed, task_params, keys))
  return Curves(train[:count], test[:count])


# ---------------------------------------------------------------------------------------------
# Baseline tuning on (a subset of) the paper's grid.


def coarse_to_fine(
  evaluate: Callable[[np.ndarray], np.ndarray], grid: np.ndarray, stride: int
) -> tuple[int, dict[int, float]]:
  """Index into ``grid`` with the lowest score, sweeping every ``stride``-th rate, then refining.

  Args:
    evaluate: rates (n,) -> mean final losses (n,) (non-finite: diverged).
    stride: 1 sweeps the whole grid; s > 1 sweeps indices 0, s, 2s, ... and then every index
      within s - 1 of the best of those.

  Returns:
    ``(best index, {index: score of every rate swept})``.
  """
  scores: dict[int, float] = {}

  def sweep(indices):
    indices = [i for i in indices if i not in scores]
    if indices:
      values = evaluate(grid[np.asarray(indices)])
      scores.update(
        {
          i: float(v) if np.isfinite(v) else float("inf")
          for i, v in zip(indices, values, strict=True)
        }
      )

  sweep(range(0, len(grid), stride))
  if stride > 1:
    best = min(scores, key=scores.get)
    sweep(range(max(best - stride + 1, 0), min(best + stride, len(grid))))
  best = min(scores, key=lambda i: (scores[i], i))
  return best, scores


def tune_baseline(
  task, name: str, grid: np.ndarray, stride: int, tune, num_steps: int, lr_batch_size: int | None
) -> tuple[float, dict[float, float]]:
  """The learning rate of ``grid`` with the lowest mean final training loss on ``tune``.

  Args:
    tune: ``(task_params, keys)`` of the tuning problems.

  Returns:
    ``(rate, {rate: mean final loss})`` over the rates swept (inf where any run diverged).
  """
  make_tx = baselines_lib.BASELINES[name]

  def evaluate(rates):
    curves = compare.sweep(task, make_tx, rates, *tune, num_steps, lr_batch_size)
    finals = curves[:, :, -1]
    return np.where(np.all(np.isfinite(finals), axis=1), np.mean(finals, axis=1), np.inf)

  if len(grid) == 1:  # nothing to choose: no sweep
    return float(grid[0]), {}
  best, scores = coarse_to_fine(evaluate, grid, stride)
  return float(grid[best]), {float(grid[i]): s for i, s in sorted(scores.items())}


# ---------------------------------------------------------------------------------------------
# Statistics.


def run_mean(curves: np.ndarray) -> np.ndarray:
  """Per-problem mean loss over steps 1..T (eq. 3 with w_t = 1, divided by T): (problems,)."""
  return np.mean(curves[:, 1:], axis=1)


def summarize(name: str, kind: str, curves: Curves, learning_rate: float | None) -> dict:
  """One optimizer's summary: means and standard errors of final and run-mean losses."""
  out = {"name": name, "kind": kind, "learning_rate": learning_rate}
  for split in ("train", "test"):
    c = np.asarray(getattr(curves, split), np.float64)
    n = c.shape[0]
    for label, values in (("final", c[:, -1]), ("run_mean", run_mean(c))):
      out[f"{split}_{label}_mean"] = float(np.mean(values))
      out[f"{split}_{label}_stderr"] = float(np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    out[f"{split}_mean_curve"] = np.mean(c, axis=0).tolist()
    out[f"{split}_stderr_curve"] = (np.std(c, axis=0, ddof=1) / np.sqrt(n)).tolist()
  out["num_diverged"] = int(np.sum(~np.all(np.isfinite(curves.train), axis=1)))
  return out


def pairs(results: dict, curves: dict[str, Curves]) -> list[dict]:
  """Paired differences (learned - other) for every learned optimizer against every other one.

  At the final step, at ``REPORT_STEPS``, and of the run mean, on training and test images.
  """
  rows = []
  learned = [r["name"] for r in results["optimizers"] if r["kind"] == "learned"]
  others = [r["name"] for r in results["optimizers"]]
  num_steps = results["num_steps"]
  steps = [s for s in REPORT_STEPS if s < num_steps] + [num_steps]
  for a in learned:
    for b in others:
      if a == b or (b in learned and learned.index(b) < learned.index(a)):
        continue
      row = {"learned": a, "other": b}
      for split in ("train", "test"):
        x, y = getattr(curves[a], split), getattr(curves[b], split)
        row[f"{split}_run_mean"] = paired(run_mean(x), run_mean(y))
        row[f"{split}_steps"] = {str(s): paired(x[:, s], y[:, s]) for s in steps}
      rows.append(row)
  return rows


# ---------------------------------------------------------------------------------------------
# One experiment.


def _fingerprint(setting: dict) -> str:
  return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:16]


def _load_cache(path: str, fingerprint: str, key: str = "fingerprint") -> dict | None:
  """``{name: (summary, Curves)}`` saved with the same ``key`` fingerprint, else None.

  Read as process 0 sees it (the one that writes caches), so every process reuses alike.
  """
  data = distributed.read_on_writer(path)
  if data is None:
    return None
  with np.load(io.BytesIO(data), allow_pickle=False) as f:
    if key not in f or str(f[key]) != fingerprint:
      return None
    summaries = json.loads(str(f["summaries"]))
    return {
      s["name"]: (s, Curves(f[f"{s['name']}/train"], f[f"{s['name']}/test"])) for s in summaries
    }


def _save_cache(path: str, fingerprint: str, found: dict, problems: str = "") -> None:
  """Writes ``found``; ``problems`` fingerprints the test problems alone (not the tuning).

  Process 0 alone writes (and creates the directory); the others return.
  """
  if not distributed.is_writer():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = {"fingerprint": np.asarray(fingerprint), "problems": np.asarray(problems)}
  arrays["summaries"] = np.asarray(json.dumps([s for s, _ in found.values()]))
  for name, (_, curves) in found.items():
    arrays[f"{name}/train"], arrays[f"{name}/test"] = curves.train, curves.test
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def gather(paths: Sequence[str], problems: str) -> dict:
  """Baselines cached in ``paths`` for the same test problems (fingerprint ``problems``).

  Of several runs of one baseline (e.g. parallel runs at different rates), the one with the
  lowest mean final loss on the test problems is kept, and its summary lists the rates it was
  chosen from (a choice made on the test problems, as ``eval.compare`` does when it tunes on
  them).
  """
  gathered: dict[str, list] = {}
  for path in paths:
    for name, value in (_load_cache(path, problems, key="problems") or {}).items():
      gathered.setdefault(name, []).append(value)
  found = {}
  for name, values in gathered.items():
    summary, c = min(values, key=lambda v: v[0]["train_final_mean"])
    if len(values) > 1:
      rates = sorted(v[0]["learning_rate"] for v in values)
      summary = {**summary, "chosen_on_test_problems_from": rates}
    found[name] = (summary, c)
  return found


def run_experiment(
  experiment: Experiment,
  learned: dict[str, learned_opt.SavedOptimizer],
  *,
  baselines: Sequence[str],
  num_problems: int,
  tune_problems: int,
  num_steps: int,
  lr_stride: int,
  lr_exponents: Sequence[int] | None = None,
  seed: int,
  directory: str,
  task_kwargs: dict | None = None,
  reuse_from: Sequence[str] = (),
  lr_batch_size: int | None = None,
  problem_batch: int | None = None,
  log=print,
) -> tuple[dict, dict[str, Curves]]:
  """Learned optimizers and tuned baselines on one setting's test problems.

  Tuned baselines are cached in ``directory/baselines.npz`` and learned optimizers' curves in
  ``directory/learned_<name>.npz``, each keyed by every setting that changes it (a learned
  optimizer's by its config and phi's hash), and reused; so are those in the directories of
  ``reuse_from`` (paths of other runs' ``baselines.npz``) for the same setting.

  Returns:
    ``(results, {optimizer name: Curves})``.
  """
  kwargs = {
    **(task_kwargs or {}),
    "classes": None if experiment.classes is None else list(experiment.classes),
  }
  other = {"train": "test", "test": "train"}[experiment.split]
  task = tasks.get("cifar10_conv", split=experiment.split, **kwargs)
  test_task = tasks.get("cifar10_conv", split=other, **kwargs)
  grid = baselines_lib.paper_learning_rates()
  if lr_exponents is not None:  # a subset 1e-6 * 2^k of the paper's grid
    grid = grid[np.asarray(sorted(lr_exponents))]
  task_params, keys = inner_lib.sample_problems(task, compare.problem_key(seed), num_problems)
  tune = inner_lib.sample_problems(task, compare.problem_key(seed + 1), tune_problems)
  optimizers, curves = [], {}

  setting = {
    "task": {
      k: v for k, v in task.config.items() if k not in ("cifar10_dir", "cache_dir", "tfds_data_dir")
    },
    "num_problems": num_problems,
    "tune_problems": tune_problems,
    "num_steps": num_steps,
    "lr_stride": lr_stride,
    "seed": seed,
    **({} if lr_exponents is None else {"lr_exponents": sorted(lr_exponents)}),
  }
  for name, saved in learned.items():
    # Cached by everything the curves depend on, phi included (its hash).
    learned_setting = {
      **{k: setting[k] for k in ("task", "num_problems", "num_steps", "seed")},
      "optimizer": saved.optimizer.config,
      "phi_sha256": tree_files.encode(saved.meta_params)[1],
    }
    cache_path = os.path.join(directory, f"learned_{name}.npz")
    found = {}
    for path in (
      cache_path,
      *(os.path.join(os.path.dirname(p), os.path.basename(cache_path)) for p in reuse_from),
    ):
      found = _load_cache(path, _fingerprint(learned_setting)) or {}
      if found:
        log(f"{experiment.name} {name}: reused its curves in {path}")
        break
    if not found:
      tic = time.time()
      c = run_curves(
        task,
        test_task,
        lambda phi, opt=saved.optimizer: learned_opt.as_optax(opt, phi),
        saved.meta_params,
        task_params,
        keys,
        num_steps,
        problem_batch,
      )
      found = {name: ({**summarize(name, "learned", c, None), "seconds": time.time() - tic}, c)}
      _save_cache(cache_path, _fingerprint(learned_setting), found)
      log(
        f"{experiment.name} {name}: final training loss "
        f"{found[name][0]['train_final_mean']:.4g} ({time.time() - tic:.0f} s)"
      )
    optimizers.append(found[name][0])
    curves[name] = found[name][1]

  cache_path = os.path.join(directory, "baselines.npz")
  found = _load_cache(cache_path, _fingerprint(setting)) or {}
  # Baselines run elsewhere on the same test problems (e.g. parallel runs, each tuned its own
  # way): of several runs of one baseline, the lowest mean final loss on the test problems wins.
  problems = _fingerprint({k: setting[k] for k in ("task", "num_problems", "num_steps", "seed")})
  for name, value in gather(reuse_from, problems).items():
    found.setdefault(name, value)
  for name in baselines:
    if name in found:
      log(f"{experiment.name} {name}: reused the tuned baseline (cache or --reuse_from)")
      continue
    tic = time.time()
    rate, scores = tune_baseline(task, name, grid, lr_stride, tune, num_steps, lr_batch_size)
    c = run_curves(
      task,
      test_task,
      baselines_lib.BASELINES[name],
      jnp.float32(rate),
      task_params,
      keys,
      num_steps,
      problem_batch,
    )
    summary = summarize(name, "baseline", c, rate)
    summary.update(
      tuning_scores={f"{r:.6g}": s for r, s in scores.items()}, seconds=time.time() - tic
    )
    found[name] = (summary, c)
    _save_cache(cache_path, _fingerprint(setting), found, problems)
    log(
      f"{experiment.name} {name}: lr {rate:.3g} ({len(scores)} rates tuned), final training "
      f"loss {summary['train_final_mean']:.4g} ({time.time() - tic:.0f} s)"
    )
  for name in baselines:
    optimizers.append(found[name][0])
    curves[name] = found[name][1]

  swept = sorted({r for s, _ in found.values() for r in s.get("tuning_scores", {})}, key=float)
  results = {
    "experiment": experiment.name,
    "title": experiment.title,
    "task": setting["task"],
    "num_problems": num_problems,
    "num_steps": num_steps,
    "seed": seed,
    "tuning": {
      "num_problems": tune_problems,
      "seed": seed + 1,
      "criterion": "lowest mean final training loss",
      "grid": "1e-6 * 2^k, k = 0..29",
      "lr_stride": lr_stride,
      "rates_swept": len(swept),
    },
    "optimizers": optimizers,
  }
  results["pairs"] = pairs(results, curves)
  return results, curves


# ---------------------------------------------------------------------------------------------
# Reports.


def plot(results: dict, path: str) -> None:
  """Mean training- and test-set loss against step side by side; learned solid, baselines dashed."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), dpi=110, sharey=True)
  ranked = sorted(results["optimizers"], key=lambda r: r["train_final_mean"])
  names = {"train": "training", "test": "test"}
  other = {"train": "test", "test": "train"}[results["task"]["split"]]
  labels = (
    f"objective: {names[results['task']['split']]} images",
    f"held out: {names[other]} images",
  )
  for ax, split, label in zip(axes, ("train", "test"), labels, strict=True):
    for r in ranked:
      curve = np.asarray(r[f"{split}_mean_curve"], dtype=float)
      name = (
        r["name"] if r["learning_rate"] is None else f"{r['name']} (lr {r['learning_rate']:.2g})"
      )
      learned = r["kind"] == "learned"
      ax.plot(
        np.arange(curve.size),
        curve,
        "-" if learned else "--",
        label=name,
        linewidth=2 if learned else 1.2,
      )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(label)
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel(f"mean loss over {results['num_problems']} problems")
  axes[1].legend(fontsize=7)
  fig.suptitle(results["title"])
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _pm(value: tuple[float, float] | list) -> str:
  mean, stderr = value
  return f"{mean:+.4f} ± {stderr:.4f}"


def _tuning_text(results: dict) -> str:
  """How the baselines' rates were chosen, from their summaries (runs may differ)."""
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


def markdown(results: dict) -> str:
  """One experiment's tables: every optimizer, then paired differences of each learned one."""
  t = results["tuning"]
  lines = [
    f"## {results['experiment']}: {results['title']}",
    "",
    f"{results['num_problems']} test problems (seed {results['seed']}), {results['num_steps']} "
    f"steps, task `{json.dumps(results['task'])}`. Baselines: rates from the paper's grid "
    f"{t['grid']}, "
    + _tuning_text(results)
    + ". Loss: mean cross-entropy (nats) on a minibatch of 128 of the "
    f"{results['task']['split']} images (the objective); held out: the same parameters on "
    "the other split's images. Lower is better.",
    "",
    "| optimizer | lr | final loss | mean over run | held-out final | held-out mean over run "
    "| diverged |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in sorted(results["optimizers"], key=lambda r: r["train_final_mean"]):
    lr = "-" if r["learning_rate"] is None else f"{r['learning_rate']:.3g}"
    if r.get("chosen_on_test_problems_from"):
      lr += (
        " (best on the test problems of "
        + ", ".join(f"{x:.3g}" for x in r["chosen_on_test_problems_from"])
        + ")"
      )
    elif r["kind"] == "baseline" and not r.get("tuning_scores"):
      lr += " (not tuned)"
    cells = [
      f"{r[f'{s}_{k}_mean']:.4f} ± {r[f'{s}_{k}_stderr']:.4f}"
      for s in ("train", "test")
      for k in ("final", "run_mean")
    ]
    lines.append(f"| {r['name']} | {lr} | " + " | ".join(cells) + f" | {r['num_diverged']} |")
  steps = list(results["pairs"][0]["train_steps"]) if results["pairs"] else []
  if steps:
    lines += [
      "",
      "Paired differences (first minus second, mean ± standard error over the shared test "
      "problems; negative: the first is lower) of the objective, and of the held-out loss:",
      "",
      "| pair | mean over run | "
      + " | ".join(f"step {s}" for s in steps)
      + " | held-out mean over run | held-out final |",
      "|---|---|" + "---|" * len(steps) + "---|---|",
    ]
    for p in results["pairs"]:
      lines.append(
        f"| {p['learned']} - {p['other']} | {_pm(p['train_run_mean'])} | "
        + " | ".join(_pm(p["train_steps"][s]) for s in steps)
        + f" | {_pm(p['test_run_mean'])} | {_pm(p['test_steps'][steps[-1]])} |"
      )
  lines += ["", f"![{results['experiment']}]({results['experiment']}/curves.png)", ""]
  return "\n".join(lines)


def write_summary(output_dir: str, path: str, header: str) -> None:
  """Markdown of every experiment's results.json under ``output_dir``, in the paper's order."""
  parts = [header, ""]
  for experiment in EXPERIMENTS:
    found = os.path.join(output_dir, experiment.name, "results.json")
    if os.path.isfile(found):
      with open(found) as f:
        parts.append(markdown(json.load(f)))
  atomic_write(path, "\n".join(parts).encode())


# ---------------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def define_flags():
  """Flags of the command; defined only when run as one, so importing this module is free."""
  flags.DEFINE_list(
    "learned",
    ["two_lstms=pretrained:cifar10_conv"],
    "Learned optimizers as NAME=DIR (a saved optimizer) or NAME=pretrained:NAME; empty: "
    "baselines only (they are cached for a later run).",
  )
  flags.DEFINE_list("experiments", [e.name for e in EXPERIMENTS], "Experiments to run.")
  flags.DEFINE_list("baselines", list(baselines_lib.BASELINES), "Baselines to tune and compare.")
  flags.DEFINE_integer("num_problems", 64, "Fresh test problems per experiment.")
  flags.DEFINE_integer("num_steps", 100, "Optimizee steps per problem.")
  flags.DEFINE_integer("tune_problems", 4, "Separate problems the learning rates are tuned on.")
  flags.DEFINE_integer(
    "lr_stride", 1, "1: tune on the whole paper grid; s > 1: every s-th rate, then refine."
  )
  flags.DEFINE_list(
    "lr_exponents",
    None,
    "Tune on these k of the paper's grid 1e-6 * 2^k only (default all 30); one k: no tuning.",
  )
  flags.DEFINE_integer("seed", 2016, "Seed of the test problems; tuning uses seed + 1.")
  flags.DEFINE_integer("lr_batch_size", 4, "Learning rates vmapped at once (bounds memory).")
  flags.DEFINE_integer("problem_batch", 8, "Test problems vmapped at once (bounds memory).")
  flags.DEFINE_list(
    "reuse_from",
    [],
    "Other output dirs whose tuned baselines and learned curves (same setting, same phi) are "
    "reused, e.g. of runs in parallel.",
  )
  flags.DEFINE_string("task_kwargs", "{}", "JSON changes to the cifar10_conv task (e.g. channels).")
  flags.DEFINE_string("output_dir", None, "Where each experiment's results go.")
  flags.DEFINE_string("summary", None, "Markdown summary; default OUTPUT_DIR/results_cifar10.md.")
  distributed.define_flags()  # multi-process start-up (--coordinator_address, ...), --num_devices


def parse_learned(specs: Sequence[str]) -> dict[str, learned_opt.SavedOptimizer]:
  """``["name=dir", "name=pretrained:x"]`` -> ``{name: SavedOptimizer}``; ValueError if bad."""
  found = {}
  for spec in specs:
    name, sep, source = spec.partition("=")
    if not sep or not name or not source:
      raise ValueError(f"--learned entry {spec!r} is not NAME=DIR or NAME=pretrained:NAME.")
    if name in found or name in baselines_lib.BASELINES:
      raise ValueError(f"--learned name {name!r} is repeated or a baseline's name.")
    if source.startswith("pretrained:"):
      found[name] = learned_opt.pretrained(source.removeprefix("pretrained:"))
    else:
      found[name] = learned_opt.load(source)
  return found


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.output_dir:
    raise app.UsageError("--output_dir is required (e.g. --output_dir=runs/cifar10_experiments).")
  unknown = [name for name in FLAGS.experiments if name not in BY_NAME]
  if unknown:
    raise app.UsageError(f"Unknown --experiments {unknown}; choose from {list(BY_NAME)}.")
  bad = [b for b in FLAGS.baselines if b not in baselines_lib.BASELINES]
  if bad:
    raise app.UsageError(f"Unknown --baselines {bad}; choose from {list(baselines_lib.BASELINES)}.")
  if FLAGS.num_problems < 2 or FLAGS.tune_problems < 1 or FLAGS.lr_stride < 1:
    raise app.UsageError("--num_problems must be >= 2, --tune_problems >= 1, --lr_stride >= 1.")
  try:
    distributed.initialize_from_flags()  # before any JAX computation
    mesh = distributed.mesh_from_flags()  # --num_devices of every process's devices; default all
    task_kwargs = json.loads(FLAGS.task_kwargs)
    if not isinstance(task_kwargs, dict) or "classes" in task_kwargs or "split" in task_kwargs:
      raise ValueError(
        "--task_kwargs must be a JSON object without classes or split (experiments set them)."
      )
    learned = parse_learned(FLAGS.learned)
    tasks.get("cifar10_conv", split="test", **task_kwargs)  # no data: a usage error now
  except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
    raise app.UsageError(str(e)) from e
  header = (
    "# CIFAR-10 results (section 3.3, Figure 7)\n\n"
    "Written by `python -m experiments.cifar10_experiments` with learned optimizers "
    + ", ".join(f"`{s}`" for s in FLAGS.learned)
    + "."
  )
  summary = FLAGS.summary or os.path.join(FLAGS.output_dir, "results_cifar10.md")
  writer = distributed.is_writer()  # process 0 writes and prints; every process computes
  say = lambda s: print(s, flush=True) if writer else None
  for name in FLAGS.experiments:
    experiment = BY_NAME[name]
    say(f"== {name}: {experiment.title}")
    tic = time.time()
    directory = os.path.join(FLAGS.output_dir, name)
    if writer:
      os.makedirs(directory, exist_ok=True)
    with distributed.use_mesh(mesh):  # the sweeps' and rollouts' problems split over it
      results, curves = run_experiment(
        experiment,
        learned,
        baselines=FLAGS.baselines,
        num_problems=FLAGS.num_problems,
        tune_problems=FLAGS.tune_problems,
        num_steps=FLAGS.num_steps,
        lr_stride=FLAGS.lr_stride,
        lr_exponents=None if FLAGS.lr_exponents is None else [int(k) for k in FLAGS.lr_exponents],
        seed=FLAGS.seed,
        directory=directory,
        task_kwargs=task_kwargs,
        reuse_from=[os.path.join(d, name, "baselines.npz") for d in FLAGS.reuse_from],
        lr_batch_size=FLAGS.lr_batch_size or None,
        problem_batch=FLAGS.problem_batch or None,
        log=say,
      )
    results["seconds"] = time.time() - tic
    results["learned_sources"] = list(FLAGS.learned)
    if not results["optimizers"] or not writer:
      continue
    atomic_write(os.path.join(directory, "results.json"), json.dumps(results).encode())
    arrays = {f"{n}/{s}": getattr(c, s) for n, c in curves.items() for s in ("train", "test")}
    np.savez_compressed(os.path.join(directory, "curves.npz"), **arrays)
    plot(results, os.path.join(directory, "curves.png"))
    print(markdown(results), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(summary)), exist_ok=True)
    write_summary(FLAGS.output_dir, summary, header)
    print(f"Wrote {summary} ({results['seconds']:.0f} s)", flush=True)


def run():
  """The command line: defines the flags, then runs ``main``."""
  define_flags()
  jax.config.parse_flags_with_absl()
  command_line.run(main)


if __name__ == "__main__":
  run()
