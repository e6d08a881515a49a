"""Bad settings fail before anything compiles, naming the flag and a valid example."""

import os
import subprocess
import sys

import pytest

from train.config import MetaTrainConfig, check_output_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"task": "cifar100"}, r"--task='cifar100' is unknown.*--task=quadratic"),
    ({"optimizer": "gru"}, r"--optimizer='gru' is unknown.*--optimizer=lstm"),
    ({"unroll": 50, "horizon": 20}, r"--unroll=50 is longer than --horizon=20"),
    ({"unroll": 30, "horizon": 100}, r"not a multiple of --unroll=30"),
    ({"meta_lr": 0.0}, r"--meta_lr must be positive, got 0.0 \(e.g. --meta_lr="),
    ({"meta_lr": -1e-3}, r"--meta_lr must be positive"),
    ({"num_problems": 0}, r"--num_problems must be positive"),
    ({"optimizer_kwargs": {"hidden_size": -2}}, r"--optimizer_kwargs=.*hidden_size.*positive"),
    ({"optimizer_kwargs": {"preprocess": "log"}}, r"preprocessing 'log'.*log_sign"),
    ({"optimizer_kwargs": {"hiden_size": 8}}, r"--optimizer_kwargs=.*hiden_size"),
    ({"optimizer": "lstm_gac", "optimizer_kwargs": {"global_cells": 30}}, r"global_cells"),
    ({"optimizer_kwargs": []}, r"--optimizer_kwargs must be a JSON object"),
    ({"meta_grad_clip": -1.0}, r"--meta_grad_clip must be >= 0"),
    ({"meta_objective": "max"}, r"--meta_objective='max' is unknown.*sum, log_sum"),
    ({"meta_lr_schedule": "step"}, r"--meta_lr_schedule='step' is unknown.*cosine"),
    ({"meta_lr_final_ratio": 1.5}, r"--meta_lr_final_ratio=1.5 must lie in \[0, 1\]"),
    ({"output_dir": ""}, r"--output_dir is required"),
  ],
)
def test_bad_settings_are_named(overrides, message, tmp_path):
  settings = {"output_dir": str(tmp_path), **overrides}
  with pytest.raises(ValueError, match=message):
    MetaTrainConfig(**settings)


def test_output_dir_that_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(ValueError, match="exists and is not a directory"):
    check_output_dir(str(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_output_dir_not_writable(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  with pytest.raises(ValueError, match="not writable"):
    check_output_dir(str(locked / "run"))


def test_command_line_rejects_bad_flag_before_compiling(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "train.meta_train", f"--output_dir={tmp_path}/run", "--unroll=200"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "--unroll=200 is longer than --horizon=100" in result.stderr + result.stdout
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "train.meta_train",
      f"--output_dir={tmp_path}/run",
      "--task_kwargs={dim",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0 and "--task_kwargs is not valid JSON" in result.stderr


def test_output_dir_that_cannot_be_created(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(ValueError, match="cannot be created.*name a writable path"):
    check_output_dir(str(path / "run"))


def test_missing_data_directory_fails_when_the_task_is_built(tmp_path):
  from train import trainer

  config = MetaTrainConfig(
    output_dir=str(tmp_path), task="mnist_mlp", task_kwargs={"mnist_dir": str(tmp_path / "none")}
  )
  with pytest.raises(ValueError, match=r"MNIST directory .*none' does not exist.*MNIST_DIR"):
    trainer.build(config)
