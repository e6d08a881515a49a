"""Bad settings fail before anything compiles, naming the flag and a valid example."""

import json
import math
import os
import subprocess
import sys

import pytest

from train.config import MetaTrainConfig, check_output_dir
from train.saved_config import differences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"task": "cifar100"}, r"--task='cifar100' is unknown.*--task=quadratic"),
    ({"optimizer": "gru"}, r"--optimizer='gru' is unknown.*--optimizer=lstm"),
    ({"unroll": 50, "horizon": 20}, r"--unroll=50 is longer than --horizon=20"),
    ({"unroll": 30, "horizon": 100}, r"not a multiple of --unroll=30"),
    ({"meta_lr": 0.0}, r"--meta_lr must be positive, got 0.0 \(e.g. --meta_lr="),
    ({"meta_lr": -1.0}, r"--meta_lr must be positive, got -1.0 \(e.g. --meta_lr=0.003, the"),
    ({"unroll": 0, "horizon": 0}, r"--unroll must be positive, got 0 \(e.g. --unroll=20, the"),
    ({"keep_checkpoints": 0}, r"--keep_checkpoints must be positive.*--keep_checkpoints=3, the"),
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
    ({"valid_seed": -2}, r"--valid_seed=-2 is not a seed.*-1 to validate on --seed's"),
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


@pytest.mark.slow
def test_command_line_rejects_bad_flag_before_compiling(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "train.meta_train", f"--output_dir={tmp_path}/run", "--unroll=200"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert result.stderr.splitlines()[-1].startswith("Error: --unroll=200 is longer than --horizon")
  # One line, not absl's help page (the module docstring and every flag) before it.
  assert "--helpfull" not in result.stderr + result.stdout and "--task_kwargs" not in result.stderr
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


@pytest.mark.slow
def test_command_line_refuses_a_count_that_does_not_divide_and_leaves_no_folder(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "train.meta_train",
      f"--output_dir={tmp_path}/new/run",
      "--num_problems=12",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "--num_problems=12 does not divide over the 8 devices" in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "new")  # refused before anything was made


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


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"meta_lr": float("inf")}, r"--meta_lr must be a finite number, got inf"),
    ({"meta_grad_clip": float("nan")}, r"--meta_grad_clip must be a finite number, got nan"),
    ({"meta_lr_final_ratio": float("nan")}, r"--meta_lr_final_ratio must be a finite number"),
    ({"optimizer_kwargs": {"output_scale": float("inf")}}, r"'output_scale'.*finite number"),
    ({"optimizer_kwargs": {"input_scale": float("nan")}}, r"'input_scale'.*finite number"),
    ({"unroll": 5.0, "horizon": 10}, r"--unroll must be int, got 5.0"),
    ({"task_kwargs": {"dims": 4}}, r"--task_kwargs: task 'quadratic' has no setting 'dims'.*dim="),
    ({"task_kwargs": {"dim": 2.5}}, r"--task_kwargs: setting 'dim' .* must be int, got 2.5"),
    ({"task_kwargs": {"dim": "4"}}, r"setting 'dim' .* must be int, got '4' \(str\)"),
    ({"task": "mnist_mlp", "task_kwargs": {"hidden_sizes": [20, "x"]}}, r"'hidden_sizes'"),
  ],
)
def test_invalid_numbers_and_task_settings_are_refused(overrides, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    MetaTrainConfig(**{"output_dir": str(tmp_path), **overrides})


def test_task_settings_of_the_right_types_pass(tmp_path):
  MetaTrainConfig(output_dir=str(tmp_path), task="mnist_mlp", task_kwargs={"hidden_sizes": [8]})
  MetaTrainConfig(output_dir=str(tmp_path), task="mnist_mlp", task_kwargs={"init_std": 1})


def test_num_epochs_may_grow_on_resume_unless_the_schedule_depends_on_it(tmp_path):
  saved = json.loads(MetaTrainConfig(output_dir=str(tmp_path), num_epochs=2).to_json())
  assert differences(saved, MetaTrainConfig(output_dir=str(tmp_path), num_epochs=5)) == []
  assert "can only grow" in differences(saved, MetaTrainConfig(output_dir="x", num_epochs=1))[0]
  cosine = {**saved, "meta_lr_schedule": "cosine"}
  (changed,) = differences(
    cosine, MetaTrainConfig(output_dir="x", num_epochs=5, meta_lr_schedule="cosine")
  )
  assert "--num_epochs (saved 2, now 5; with --meta_lr_schedule=cosine" in changed


@pytest.mark.slow
def test_command_line_refuses_a_resume_without_a_traceback(tmp_path):
  """A refused resume is a usage error found before compiling, naming the flag."""
  run = tmp_path / "run"
  (run / "checkpoints" / "step_00000001").mkdir(parents=True)
  (run / "config.json").write_text(MetaTrainConfig(output_dir=str(run), meta_lr=0.5).to_json())
  result = subprocess.run(
    [sys.executable, "-m", "train.meta_train", f"--output_dir={run}", "--meta_lr=0.25"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "--meta_lr (saved 0.5, now 0.25)" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["checkpoints", "metrics.jsonl"])
def test_output_tree_problems_are_found_before_compiling(name, tmp_path):
  from train import run_dir, trainer

  config = MetaTrainConfig(output_dir=str(tmp_path))
  path = tmp_path / name
  if name == "checkpoints":
    path.write_text("x")
  else:
    path.mkdir()
  with pytest.raises(run_dir.RunDirError, match=f"{name} must be a"):
    trainer.train(config, log=lambda s: None)
  assert not (tmp_path / "config.json").exists()


def test_no_optimizer_saved_exits_non_zero_without_claiming_one(tmp_path, monkeypatch, capsys):
  from train import meta_train, run_dir, trainer

  diverged = run_dir.Progress(math.inf, (math.inf,), False, (128,))
  monkeypatch.setattr(trainer, "train", lambda config, log: (None, diverged))
  with pytest.raises(SystemExit) as exit_info:
    meta_train.main(MetaTrainConfig(output_dir=str(tmp_path)))
  assert "No optimizer saved" in str(exit_info.value.code)
  assert "128 of 128 diverged" in str(exit_info.value.code)
  assert "optimizer saved in" not in capsys.readouterr().out
