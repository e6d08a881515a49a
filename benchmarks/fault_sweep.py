r"""A larger fault-injection sweep than CI's (run by hand): every kill point of a longer job.

  python -m benchmarks.fault_sweep --work=/tmp/fault_sweep [--real_kills=all] [--num_epochs=6]

Runs ``tests/fs_faults.py`` (see its docstring) on a job with non-epoch checkpoints, three
checkpoints kept, progress lines every step and early stopping: snapshots at every file-system
mutation, each resumed in a child process and compared with the uninterrupted run's files
(optimizer, checkpoints, ``metrics.jsonl``, ``config.json``; no leftovers). ``--real_kills=all``
also SIGKILLs a real job at every mutation and checks it leaves exactly the snapshot (twice the
time). Prints the number of kill points, the failures and the wall time as one JSON line.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("work", "/tmp/fault_sweep", "Scratch directory (emptied first).")
flags.DEFINE_string("real_kills", "", "Mutations to SIGKILL a real job at: 'all' or 1,5,9.")
flags.DEFINE_integer("num_epochs", 6, "Epochs of the job (it may stop early).")
flags.DEFINE_integer("steps_per_epoch", 3, "Meta-steps per epoch.")
flags.DEFINE_integer("checkpoint_every", 2, "Meta-steps between checkpoints.")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
flags.DEFINE_integer("patience", 2, "Early-stopping patience (0: off).")
flags.DEFINE_float("meta_lr", 0.3, "Meta learning rate (0.3 makes validation wobble).")
flags.DEFINE_integer("seed", 0, "Seed (with meta_lr 0.3: saves at epochs 1, 2; stops at 4).")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(config: dict, kills: list[int]) -> dict:
  work = os.path.abspath(FLAGS.work)
  subprocess.run(["rm", "-rf", work], check=True)
  os.makedirs(work)
  spec = {
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
  print(
    json.dumps(
      {
        "kill_points": len(summary["events"]),
        "real_kills": FLAGS.real_kills or "none",
        "failures": summary["failures"],
        "seconds": round(time.time() - start, 1),
      }
    )
  )


if __name__ == "__main__":
  app.run(main)
