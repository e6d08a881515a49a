"""The resume promise under every kill point: a meta-training job stopped at any file-system
mutation (and resumed) ends with exactly the files of an uninterrupted run.

The job is tiny but does all a run does: checkpoints every meta-step (pruned to one), saves the
optimizer at two validation improvements and stops early at the third epoch. ``tests/fs_faults.py``
takes a snapshot of the output directory at each mutation of the reference run (what a SIGKILL
there leaves; a write is torn in half), resumes each snapshot in a child process, and checks a few
real SIGKILLs leave exactly their snapshot. See ``benchmarks/fault_sweep.py`` for larger sweeps.
"""

import json
import os
import subprocess
import sys

import pytest

# Fault injection: a job resumed at every kill point (slow tier).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# meta_lr 0.3, seed 1: validation improves at epochs 1 and 2 and worsens at 3 (early stop).
CONFIG = {
  "task_kwargs": {"dim": 2},
  "optimizer_kwargs": {"hidden_size": 2, "num_layers": 1},
  "unroll": 2,
  "horizon": 4,
  "num_problems": 2,
  "num_epochs": 4,
  "steps_per_epoch": 2,
  "valid_problems": 4,
  "log_every": 2,
  "checkpoint_every": 2,
  "keep_checkpoints": 1,
  "patience": 1,
  "meta_lr": 0.3,
  "seed": 1,
}


def sweep(tmp_path, config, kills=(), mode="train"):
  """Runs the fault-injection driver; returns its summary (events and failures)."""
  spec = {
    "mode": mode,
    "work": str(tmp_path / "work"),
    "config": config,
    "kills": list(kills),
    "jax_config": {
      "jax_compilation_cache_dir": str(tmp_path / "jax_cache"),
      "jax_persistent_cache_min_compile_time_secs": 0,
      "jax_persistent_cache_min_entry_size_bytes": -1,
    },
  }
  spec_path = tmp_path / "spec.json"
  spec_path.write_text(json.dumps(spec))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT}
  result = subprocess.run(
    [sys.executable, os.path.join(ROOT, "tests", "fs_faults.py"), str(spec_path)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-5000:]
  return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_every_kill_point_resumes_to_the_uninterrupted_outputs(tmp_path):
  summary, log = sweep(tmp_path, CONFIG, kills=(4, 31))
  kinds = {kind for kind, _ in summary["events"]}
  assert {"replace", "unlink", "rmdir", "write"} <= kinds, kinds
  assert any(path == "optimizer.json" for _, path in summary["events"])
  assert not summary["failures"], "\n".join(summary["failures"]) + "\n" + log[-3000:]


def test_every_kill_point_of_an_export_reruns_to_the_uninterrupted_export(tmp_path):
  """train.export killed at each mutation of --output (into a new directory, and --overwrite of
  an earlier export): the output loads whenever it holds a record, and the same command rerun
  leaves exactly the bytes of an uninterrupted export."""
  config = {**CONFIG, "num_epochs": 2, "keep_checkpoints": 2}  # checkpoints at steps 2 and 4
  summary, log = sweep(tmp_path, config, kills=(3,), mode="export")
  assert summary["kill_points"].get("fresh", 0) >= 5, summary
  assert summary["kill_points"].get("overwrite", 0) >= 6, summary
  assert not summary["failures"], "\n".join(summary["failures"]) + "\n" + log[-3000:]
