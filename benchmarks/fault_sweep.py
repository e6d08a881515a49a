r"""A larger fault-injection sweep than CI's (run by hand): every kill point of a longer job.

  python -m benchmarks.fault_sweep --work=/tmp/fault_sweep [--real_kills=all] [--num_epochs=6]

Runs ``tests/fs_faults.py`` (see its docstring) on a job with non-epoch checkpoints, three
checkpoints kept, progress lines every step and early stopping: snapshots at every file-system
mutation, each resumed in a child process and compared with the uninterrupted run's files
(optimizer, checkpoints, ``metrics.jsonl``, ``config.json``; no leftovers). ``--real_kills=all``
also SIGKILLs a real job at every mutation and checks it leaves exactly the snapshot (twice the
time). Then (unless ``--noexport``) the same for ``train.export`` of the finished job's newest
checkpoint, into a new directory and ``--overwrite`` of an earlier export: each kill point is
rerun and must leave the uninterrupted export's bytes. Then (unless ``--nopreemption``) a job is
sent a real SIGTERM after each of its meta-steps in turn (and once before the first): each must
exit with ``train.preemption.EXIT_STATUS`` and, rerun, end with the uninterrupted run's files.
Prints the number of kill points, the failures and the wall time as one JSON line.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from train import preemption

flags.DEFINE_string("work", "/tmp/fault_sweep", "Scratch directory (emptied first).")
flags.DEFINE_string("real_kills", "", "Mutations to SIGKILL a real job at: 'all' or 1,5,9.")
flags.DEFINE_integer("num_epochs", 6, "Epochs of the job (it may stop early).")
flags.DEFINE_integer("steps_per_epoch", 3, "Meta-steps per epoch.")
flags.DEFINE_integer("checkpoint_every", 2, "Meta-steps between checkpoints.")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
flags.DEFINE_integer("patience", 2, "Early-stopping patience (0: off).")
flags.DEFINE_float("meta_lr", 0.3, "Meta learning rate (0.3 makes validation wobble).")
flags.DEFINE_integer("seed", 0, "Seed (with meta_lr 0.3: saves at epochs 1, 2; stops at 4).")
flags.DEFINE_bool("export", True, "Also sweep train.export's kill points.")
flags.DEFINE_bool("preemption", True, "Also SIGTERM a job after each meta-step and resume it.")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(config: dict, kills: list[int], mode: str = "train") -> dict:
  work = os.path.abspath(FLAGS.work)
  subprocess.run(["rm", "-rf", work], check=True)
  os.makedirs(work)
  spec = {
    "mode": mode,
    "work": os.path.join(work, "sweep"),
    "config": config,
    "kills": kills,
    "jax_config": {
      "jax_compilation_cache_dir": os.path.join(work, "jax_cache"),
      "jax_persistent_cache_min_compile_time_secs": 0,
      "jax_persistent_cache_min_entry_size_bytes": -1,
    },
  }
  spec_path = os.path.join(work, "spec.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT}
  result = subprocess.run(
    [sys.executable, os.path.join(ROOT, "tests", "fs_faults.py"), spec_path],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  config = {
    "task_kwargs": {"dim": 2},
    "optimizer_kwargs": {"hidden_size": 2, "num_layers": 1},
    "unroll": 2,
    "horizon": 4,
    "num_problems": 2,
    "num_epochs": FLAGS.num_epochs,
    "steps_per_epoch": FLAGS.steps_per_epoch,
    "valid_problems": 4,
    "log_every": 1,
    "checkpoint_every": FLAGS.checkpoint_every,
    "keep_checkpoints": FLAGS.keep_checkpoints,
    "patience": FLAGS.patience,
    "meta_lr": FLAGS.meta_lr,
    "seed": FLAGS.seed,
  }
  start = time.time()
  kills = [] if FLAGS.real_kills in ("", "all") else [int(k) for k in FLAGS.real_kills.split(",")]
  summary = _sweep(config, kills)
  if FLAGS.real_kills == "all":
    summary = _sweep(config, list(range(1, len(summary["events"]) + 1)))
  report = {
    "kill_points": len(summary["events"]),
    "real_kills": FLAGS.real_kills or "none",
    "failures": summary["failures"],
  }
  if FLAGS.export:
    exported = _sweep(config, kills, mode="export")
    if FLAGS.real_kills == "all":
      exported = _sweep(
        config, list(range(1, max(exported["kill_points"].values(), default=0) + 1)), "export"
      )
    report.update(export_kill_points=exported["kill_points"], export_failures=exported["failures"])
  if FLAGS.preemption:
    points, failures = _preemption_sweep(config)
    report.update(preemption_points=points, preemption_failures=failures)
  print(json.dumps({**report, "seconds": round(time.time() - start, 1)}))


# Runs the command line with a real SIGTERM sent to itself after meta-step $SIGTERM_AFTER of this
# process (0: before the first, while compiling).
_SIGNALLED_JOB = """
import os, signal, sys
from train import meta_step, meta_train
after, jit_train_step = int(os.environ["SIGTERM_AFTER"]), meta_step.jit_train_step
def signalled(*args, **kwargs):
  step, calls = jit_train_step(*args, **kwargs), [0]
  if not after:
    os.kill(os.getpid(), signal.SIGTERM)
  def call(*a):
    out = step(*a)
    calls[0] += 1
    if calls[0] == after:
      os.kill(os.getpid(), signal.SIGTERM)
    return out
  return call
meta_step.jit_train_step = signalled
sys.argv[0] = "meta_train"
meta_train.run()
"""


def _preemption_sweep(config: dict) -> tuple[int, list[str]]:
  """SIGTERM after each meta-step of the job, then a rerun; failures name the step."""
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import fs_faults  # noqa: PLC0415 (the tests' tree comparison)

  work = os.path.join(os.path.abspath(FLAGS.work), "preemption")
  cache = os.path.join(work, "jax_cache")
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "",
    "PYTHONPATH": ROOT,
    "JAX_COMPILATION_CACHE_DIR": cache,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
  }
  flags_of = lambda out: (
    [f"--output_dir={out}"]
    + [f"--{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in config.items()]
  )
  run = lambda args, **extra: subprocess.run(
    [sys.executable, *args], cwd=ROOT, env={**env, **extra}, capture_output=True, text=True
  )
  reference = os.path.join(work, "reference")
  run(["-m", "train.meta_train", *flags_of(reference)]).check_returncode()
  want = fs_faults.tree(reference)
  with open(os.path.join(reference, "metrics.jsonl")) as f:
    total = max(json.loads(line).get("step", 0) for line in f)
  failures = []
  for after in range(total):
    out = os.path.join(work, f"after_{after}")
    stopped = run(["-c", _SIGNALLED_JOB, *flags_of(out)], SIGTERM_AFTER=str(after))
    if stopped.returncode != preemption.EXIT_STATUS or "Traceback" in stopped.stderr:
      last = stopped.stderr.strip().splitlines()[-1:]
      failures.append(f"SIGTERM after step {after}: exit {stopped.returncode} {last}")
      continue
    resumed = run(["-m", "train.meta_train", *flags_of(out)])
    problems = fs_faults.differences(fs_faults.tree(out), want)
    if resumed.returncode or problems:
      problems += resumed.stderr.strip().splitlines()[-1:] if resumed.returncode else []
      failures.append(f"SIGTERM after step {after}: rerun exit {resumed.returncode} {problems}")
  return total, failures


if __name__ == "__main__":
  app.run(main)
