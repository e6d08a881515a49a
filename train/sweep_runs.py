"""The runs of a meta-learning-rate sweep: drawn, launched as meta-training jobs, and scored.

Pure parts first (drawing the meta-lrs, each run's config and command line), then the side
effects: ``launch`` runs ``python -m train.meta_train`` per unfinished run, ``N`` at a time
(one accelerator each where there are several), and ``selection_scores`` scores each run's best
saved optimizer on the selection problems (``selection_key``), which no run trained or validated
on and no test uses.
"""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from train import checkpoint, config_flags
from train.config import MetaTrainConfig
from train.run import Run

RUNS_DIR, LOGS_DIR = "runs", "logs"
# Fold-ins of a seed's key: 1 training (train.meta_step.problem_key), 2 validation (valid_key),
# 3 the test and ranking problems (eval.curves.problem_key); 4 is the sweep's selection alone.
SELECTION_FOLD_IN = 4
PREEMPTED = (75, 130)  # train.preemption's statuses: a signal or Ctrl-C; the run resumes


class PlannedRun(NamedTuple):
  """One run of the sweep: its name, meta learning rate, seed and full meta-training config."""

  name: str  # run_00, run_01, ...
  meta_lr: float
  seed: int
  config: MetaTrainConfig  # output_dir: SWEEP/runs/NAME


def draw_meta_lrs(num_runs: int, low: float, high: float, sweep_seed: int) -> list[float]:
  """``num_runs`` meta learning rates, log-uniform in [low, high] (section 3's random search).

  Run ``i``'s rate depends on ``sweep_seed`` and ``i`` alone, so a larger ``num_runs`` keeps the
  rates drawn before (``numpy``'s generator draws in sequence).
  """
  rng = np.random.default_rng(sweep_seed)
  return [float(x) for x in np.exp(rng.uniform(math.log(low), math.log(high), num_runs))]


def run_seeds(num_runs: int, seeds: Sequence[int]) -> list[int]:
  """The seeds given (one per run), or 0 .. num_runs - 1."""
  return list(seeds) if seeds else list(range(num_runs))


def plan(
  base: MetaTrainConfig,
  output_dir: str,
  meta_lrs: Sequence[float],
  seeds: Sequence[int],
) -> list[PlannedRun]:
  """One ``PlannedRun`` per (meta-lr, seed); every run validates on the same problems
  (``--valid_seed``, or seed 0's where it is -1), so their validation losses compare."""
  valid_seed = base.valid_seed if base.valid_seed != -1 else 0
  runs = []
  for i, (lr, seed) in enumerate(zip(meta_lrs, seeds, strict=True)):
    name = f"run_{i:02d}"
    path = os.path.join(output_dir, RUNS_DIR, name)
    config = dataclasses.replace(
      base, meta_lr=lr, seed=seed, valid_seed=valid_seed, output_dir=path
    )
    runs.append(PlannedRun(name, lr, seed, config))
  return runs


def _flag_value(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, dict):
    return json.dumps(value, sort_keys=True)
  return repr(value) if isinstance(value, float) else str(value)


def meta_train_argv(config: MetaTrainConfig) -> list[str]:
  """``python -m train.meta_train`` flags that give exactly ``config`` (``--preset=none`` and
  every setting that differs from the config's default)."""
  argv = ["--preset=none"]
  for name, (field, _, _) in config_flags.fields(MetaTrainConfig).items():
    value = getattr(config, name)
    if value != config_flags.default(field):
      argv.append(f"--{name}={_flag_value(value)}")
  return argv


def is_finished(config: MetaTrainConfig) -> bool:
  """Whether the run in ``config.output_dir`` has ended (all meta-steps, or stopped early) and
  saved a best optimizer: the sweep does not start it again."""
  run = Run(config.output_dir)
  steps = run.steps()
  if not steps or not run.has_best():
    return False
  try:
    meta = checkpoint.read_meta(run.checkpoint_path(steps[-1]))
  except (OSError, ValueError, KeyError):
    return False  # meta_train decides what to do with a damaged checkpoint
  return meta["step"] >= config.total_steps or bool(meta["host"].get("early_stopped"))


def device_slots(parallel: int) -> list[dict[str, str]]:
  """Environment changes of each of ``parallel`` concurrent runs: one GPU each where the machine
  has several, else none (they share the CPUs or the one device).

  Raises:
    ValueError: more concurrent runs than GPUs.
  """
  if parallel == 1:
    return [{}]
  probe = "import jax; d = jax.local_devices(); print(d[0].platform, len(d))"
  found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
  platform, count = (
    (found.stdout.split() + ["cpu", "1"])[:2] if found.returncode == 0 else ("cpu", 1)
  )
  count = int(count)
  if platform != "gpu" or count < 2:
    share = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if platform == "gpu" else {}
    return [dict(share) for _ in range(parallel)]
  if parallel > count:
    raise ValueError(
      f"--parallel={parallel} but this machine has {count} GPUs (one run a GPU); give "
      f"--parallel={count} or less."
    )
  visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(count)))).split(",")
  return [{"CUDA_VISIBLE_DEVICES": visible[i]} for i in range(parallel)]


def launch(
  runs: Sequence[PlannedRun], output_dir: str, parallel: int, log: Callable[[str], None] = print
) -> dict[str, int]:
  """Runs ``python -m train.meta_train`` for every run, ``parallel`` at a time; their exit codes.

  With ``parallel`` 1 a run's output goes to this process's; otherwise to ``logs/NAME.log``.
  After a run is preempted (exit 75 or 130), or this process gets SIGTERM (passed on to the
  running runs, which checkpoint and exit 75) or SIGINT (which a terminal sends them too), no new
  run starts; the others finish.
  """
  slots = device_slots(parallel)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train/'s parent
  path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
  waiting, active, codes, signals = list(runs), {}, {}, []  # active: slot -> (run, process, log)

  def on_signal(signum, frame):
    del frame
    signals.append(signum)
    for _, process, _ in active.values():
      if signum == signal.SIGTERM:
        process.send_signal(signum)

  handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while waiting or active:
      stopping = signals or any(code in PREEMPTED for code in codes.values())
      free = [s for s in range(len(slots)) if s not in active]
      while waiting and free and not stopping:
        run, slot = waiting.pop(0), free.pop(0)
        active[slot] = (
          run,
          *_start(run, output_dir, parallel, {**slots[slot], "PYTHONPATH": path}, log),
        )
      for slot, (run, process, out) in list(active.items()):
        if process.poll() is None:
          continue
        codes[run.name] = process.returncode
        if out:
          out.close()
        log(f"{run.name}: {'done' if process.returncode == 0 else f'exit {process.returncode}'}")
        del active[slot]
      if active:
        time.sleep(0.2)
      if stopping and not active:
        break
  finally:
    for s, handler in handlers.items():
      signal.signal(s, handler)
  if signals:
    codes.setdefault("sweep", 75)  # this process was signalled: the sweep stops here
  return codes


def _start(run: PlannedRun, output_dir: str, parallel: int, env: dict, log):
  """Starts one run's meta-training process; ``(process, log file or None)``."""
  argv = [sys.executable, "-m", "train.meta_train", *meta_train_argv(run.config)]
  out = None
  if parallel > 1:
    os.makedirs(os.path.join(output_dir, LOGS_DIR), exist_ok=True)
    out = open(os.path.join(output_dir, LOGS_DIR, f"{run.name}.log"), "a")  # noqa: SIM115
  where = f" (output in {out.name})" if out else ""
  log(f"{run.name}: meta-lr {run.meta_lr:.3g}, seed {run.seed}: starting{where}")
  stderr = subprocess.STDOUT if out else None
  process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=stderr)
  return process, out


def selection_key(seed: int):
  """Key of the selection problems: fold-in 4 of ``seed``'s, apart from every other stream."""
  import jax  # Deferred: planning and launching need no JAX in this process.

  return jax.random.fold_in(jax.random.key(seed), SELECTION_FOLD_IN)


def selection_scores(
  base: MetaTrainConfig, run_dirs: Sequence[str], num_problems: int, seed: int
) -> dict[str, tuple[int, float] | None]:
  """Each run's best saved optimizer on the selection problems, scored as validation scores
  (``train.trainer.validation_result``: problems diverged, mean final loss of the others).

  Problems come from the runs' validation family (``--valid_task_kwargs``), ``num_problems``
  of them (per bucket of a mixture) from ``selection_key(seed)``, run for ``horizon`` steps.

  Returns:
    ``{run_dir: (diverged, score)}``; None for a run that saved no optimizer.
  """
  import jax

  from train import inner as inner_lib
  from train import meta_step, trainer

  task = trainer.validation_task(base, trainer.build_task(base, base.task_kwargs))
  optimizer = trainer.build_optimizer(base)
  buckets = meta_step.buckets(task)
  key = selection_key(seed)
  mixture = meta_step.is_mixture(task)
  keys = [jax.random.fold_in(key, b) if mixture else key for b in range(len(buckets))]
  draw = lambda t, k: inner_lib.sample_problems(t, k, num_problems)
  problems = [draw(t, k) for t, k in zip(buckets, keys, strict=True)]
  validators = [jax.jit(meta_step.make_validate(base, t, optimizer)) for t in buckets]
  scores = {}
  for path in run_dirs:
    run = Run(path)
    if not run.has_best():
      scores[path] = None
      continue
    phi = run.best()[0].meta_params
    curves = [
      np.asarray(v(phi, t.data, *p)) for v, t, p in zip(validators, buckets, problems, strict=True)
    ]
    curves = dict(zip(task.names, curves, strict=True)) if mixture else curves[0]
    diverged, score, _ = trainer.validation_result(curves)
    scores[path] = (diverged, score)
  return scores
