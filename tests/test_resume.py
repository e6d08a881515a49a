"""Preemption: a job killed with SIGKILL and resumed ends with exactly the same phi."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from train import checkpoint, meta_step, trainer
from train.config import MetaTrainConfig

# Killed and resumed jobs in child processes, trained runs (slow tier).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
  '--task_kwargs={"dim": 4}',
  '--optimizer_kwargs={"hidden_size": 6}',
  "--unroll=5",
  "--horizon=10",
  "--num_problems=4",
  "--num_epochs=2",
  "--steps_per_epoch=30",
  "--valid_problems=8",
  "--checkpoint_every=5",
  "--log_every=10",
  "--meta_lr=0.01",
]
TOTAL = 60
# One device: the command line splits problems over every device, and 4 do not divide over the
# 8 that tests/conftest.py fakes (tests/test_multihost.py resumes on a mesh).
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def job(output_dir):
  return [sys.executable, "-m", "train.meta_train", f"--output_dir={output_dir}", *FLAGS]


def final_state_bytes(output_dir):
  path = os.path.join(output_dir, "checkpoints", f"step_{TOTAL:08d}", "state.msgpack")
  with open(path, "rb") as f:
    return f.read()


def test_kill_and_resume_equals_uninterrupted(tmp_path):
  reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
  subprocess.run(job(reference), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)

  proc = subprocess.Popen(
    job(resumed), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 240
  while time.time() < deadline and not checkpoint.all_steps(os.path.join(resumed, "checkpoints")):
    time.sleep(0.02)
  time.sleep(0.3)  # land somewhere after the first checkpoint, at an arbitrary moment
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = checkpoint.all_steps(os.path.join(resumed, "checkpoints"))
  assert killed_at and killed_at[-1] < TOTAL, f"job was not interrupted ({killed_at})"

  result = subprocess.run(
    job(resumed), cwd=ROOT, env=ENV, check=True, capture_output=True, text=True, timeout=300
  )
  assert "Resumed from meta-step" in result.stdout + result.stderr
  assert final_state_bytes(resumed) == final_state_bytes(reference)
  assert weights_bytes(resumed) == weights_bytes(reference)


def weights_bytes(output_dir):
  """The saved optimizer's weights file, as its record names it."""
  with open(os.path.join(output_dir, "optimizer.json")) as f:
    name = json.load(f)["weights_file"]
  with open(os.path.join(output_dir, name), "rb") as f:
    return f.read()


def small_config(output_dir, **overrides):
  settings = dict(
    output_dir=str(output_dir),
    task_kwargs={"dim": 4},
    optimizer_kwargs={"hidden_size": 6},
    unroll=5,
    horizon=10,
    num_problems=4,
    num_epochs=1,
    steps_per_epoch=6,
    valid_problems=8,
    checkpoint_every=2,
    keep_checkpoints=5,
  )
  return MetaTrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """One small finished run; tests copy it before damaging anything."""
  config = small_config(tmp_path_factory.mktemp("run") / "run")
  trainer.train(config, log=lambda s: None)
  return config


@pytest.fixture
def run_copy(finished_run, tmp_path):
  config = small_config(tmp_path / "run")
  shutil.copytree(finished_run.output_dir, config.output_dir)
  return config


@pytest.mark.parametrize("damage", ["truncate", "bit_flip"])
def test_broken_checkpoint_falls_back_to_previous_good_one(run_copy, damage):
  config = run_copy
  ckpt_dir = os.path.join(config.output_dir, "checkpoints")
  steps = checkpoint.all_steps(ckpt_dir)
  assert steps == [2, 4, 6]
  newest = os.path.join(ckpt_dir, f"step_{steps[-1]:08d}", "state.msgpack")
  data = bytearray(open(newest, "rb").read())
  if damage == "truncate":
    data = data[: len(data) // 3]
  else:
    data[len(data) // 2] ^= 0x10
  open(newest, "wb").write(bytes(data))
  task, opt = trainer.build(config)
  template = meta_step.init_state(config, task, opt)
  with pytest.raises(ValueError, match=r"step_00000006/state.msgpack is corrupt or truncated"):
    checkpoint.restore(os.path.dirname(newest), template)
  state, host = checkpoint.restore_latest(ckpt_dir, template)
  assert int(state.step) == 4
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.meta_params))


def test_checkpoint_from_another_config_is_refused(finished_run, tmp_path):
  config = finished_run
  other = MetaTrainConfig(
    output_dir=str(tmp_path / "o"),
    task_kwargs={"dim": 4},
    optimizer_kwargs={"hidden_size": 7},
    unroll=5,
    horizon=10,
    num_problems=4,
  )
  task, opt = trainer.build(other)
  template = meta_step.init_state(other, task, opt)
  path = os.path.join(config.output_dir, "checkpoints", "step_00000006")
  with pytest.raises(ValueError, match="does not fit this run's config"):
    checkpoint.restore(path, template)
