"""The evaluation commands as a user runs them: shipped optimizers by name, usage errors (one
line each, ``cli_checks``; tests/test_newcomer.py walks every command)."""

import json
import os
import re
import subprocess
import sys

import pytest
from cli_checks import assert_one_line_error

# Command lines in child processes (slow tier).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *flags):
  return subprocess.run(
    [sys.executable, "-m", module, *flags],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_evaluate_a_shipped_optimizer_by_name_on_its_recorded_task(tmp_path):
  out = tmp_path / "eval"
  result = run(
    "eval.evaluate",
    "--checkpoint=pretrained:quadratic",
    f"--output_dir={out}",
    "--num_problems=4",
    "--num_steps=5",
    "--baselines=sgd",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads((out / "results.json").read_text())
  assert results["task"] == {"name": "quadratic", "dim": 10}  # from the optimizer's metadata
  assert [r["name"] for r in results["optimizers"]] == ["lstm", "sgd"]  # named by its kind
  again = run("eval.evaluate", "--checkpoint=pretrained:quadratic", f"--output_dir={out}")
  assert again.returncode == 1 and "Traceback" not in again.stderr
  assert f"--output_dir='{out}' already holds results.json; pass --overwrite" in again.stderr
  # In chunks of 3 problems (3 + 1 of the 4) the learned optimizer's results are the same.
  chunked = run(
    "eval.evaluate",
    "--checkpoint=pretrained:quadratic",
    f"--output_dir={out}",
    "--overwrite",
    "--num_problems=4",
    "--num_steps=5",
    "--baselines=",
    "--problem_batch_size=3",
  )
  assert chunked.returncode == 0, chunked.stderr[-2000:]
  (lstm,) = json.loads((out / "results.json").read_text())["optimizers"]  # replaced
  assert lstm == results["optimizers"][0]


@pytest.mark.parametrize("bad", ["missing", "empty", "step_dir", "unknown_name"])
def test_a_bad_checkpoint_is_a_usage_error_naming_it(tmp_path, bad):
  paths = {
    "missing": str(tmp_path / "nope"),
    "empty": str(tmp_path),
    "step_dir": str(tmp_path / "checkpoints" / "step_00000004"),
    "unknown_name": "pretrained:nope",
  }
  os.makedirs(tmp_path / "checkpoints" / "step_00000004")
  result = run("eval.evaluate", f"--checkpoint={paths[bad]}", f"--output_dir={tmp_path}/o")
  expected = (
    "No pretrained optimizer named 'nope'" if bad == "unknown_name" else "No saved optimizer"
  )
  assert_one_line_error(result, expected)
  assert not os.path.exists(tmp_path / "o")  # a failed run leaves no empty output folder


@pytest.mark.parametrize("module", ["eval.evaluate", "eval.visualize"])
def test_an_output_dir_under_a_file_is_refused_before_compute(tmp_path, module):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  result = run(module, "--checkpoint=pretrained:quadratic", f"--output_dir={blocker}/out")
  assert_one_line_error(result, "is a file, not a directory")


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--output_dir={file}"], "exists and is not a directory; name a directory"),
    (['--task_kwargs={{"dims": 3}}'], "--task_kwargs: task 'quadratic' has no setting 'dims'"),
    (["--problem_batch_size=-1"], "--problem_batch_size must be 0 (all problems at once) or"),
    (["--baselines=sgd,lbfgs"], "--baselines: unknown 'lbfgs'; choose from sgd, nag, rmsprop"),
  ],
)
def test_evaluate_usage_errors_name_the_flag(tmp_path, flags, message):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  flags = [f.format(file=blocker) for f in flags]
  if not any(f.startswith("--output_dir") for f in flags):
    flags.append(f"--output_dir={tmp_path}/out")
  assert_one_line_error(run("eval.evaluate", "--checkpoint=pretrained:quadratic", *flags), message)
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
  "task, task_kwargs, message",
  [
    (None, "{dim", "--task_kwargs is not valid JSON"),
    (None, "[3]", "--task_kwargs must be a JSON object"),
    ("quadratics", None, "--task='quadratics' is unknown; choose one of"),
    (None, '{"dim": "ten"}', "setting 'dim' of task 'quadratic' must be int"),
  ],
)
def test_task_settings_errors_name_the_flag(task, task_kwargs, message):
  from eval import run_config

  path = run_config.resolve("pretrained:quadratic")
  with pytest.raises(ValueError, match=re.escape(message)):
    run_config.task_settings([path], task, task_kwargs)


@pytest.mark.parametrize(
  "module, expected",
  [
    ("eval.evaluate", ("--checkpoint", "--baselines", "--overwrite", "--num_devices", "Tasks")),
    ("eval.rank", ("--run", "--checkpoint", "--baseline_lr", "--rank_by", "Shipped optimizers")),
    ("eval.suite", ("--optimizer", "--tiny", "--cache_dir", "--max_learning_rate", "Shipped")),
  ],
)
def test_help_lists_the_commands_flags(module, expected):
  result = run(module, "--help")
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
  for flag in expected:
    assert flag in result.stdout, flag


@pytest.mark.parametrize(
  "flags, message",
  [
    ([], "--optimizer is required"),
    (
      ["--optimizer=pretrained:quadratic", "--tasks=mnist_cnn"],
      "Unknown held-out task 'mnist_cnn'",
    ),
    (["--optimizer=adam=pretrained:quadratic", "--tiny"], "are baselines' names"),
  ],
)
def test_suite_usage_errors_are_one_line_and_leave_nothing(tmp_path, flags, message):
  assert_one_line_error(run("eval.suite", *flags, f"--output_dir={tmp_path}/out"), message)
  assert not os.path.exists(tmp_path / "out")


def test_rank_usage_errors_are_one_line_and_leave_nothing(tmp_path):
  result = run(
    "eval.rank", "--checkpoint=pretrained:quadratic", "--rank_by=x", f"--output_dir={tmp_path}/o"
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip() == "Error: --rank_by='x'; choose from step, run_mean."
  assert not os.path.exists(tmp_path / "o")
