"""The MNIST experiment runner on tiny IDX files: tuning, results layout, summary table."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from mnist_files import write_mnist

import learned_opt
from eval import report
from experiments import mnist_experiments

# The MNIST runner end to end and on the command line (slow tier).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_experiment_tunes_on_grid_and_reports(tmp_path):
  write_mnist(str(tmp_path), sizes=(("train", 16), ("test", 4)))
  optimizer = learned_opt.lstm_optimizer(hidden_size=4, num_layers=1, preprocess="log_sign")
  saved = learned_opt.SavedOptimizer(optimizer, optimizer.init_meta_params(jax.random.key(0)))
  experiment = mnist_experiments.Experiment("relu", "tiny", {"hidden_sizes": [3]}, 3)
  results = mnist_experiments.run_experiment(
    experiment,
    saved,
    baselines=["sgd", "adam"],
    num_problems=3,
    tune_problems=2,
    seed=0,
    lr_batch_size=15,
    mnist_dir=str(tmp_path),
    log=lambda s: None,
  )
  names = [r["name"] for r in results["optimizers"]]
  assert names == ["lstm", "sgd", "adam"]
  assert results["task"]["hidden_sizes"] == [3] and results["num_steps"] == 3
  for r in results["optimizers"][1:]:
    means = r["grid_final_means"]
    assert (
      len(means) == 30
      and r["learning_rate"] == results["tuning"]["learning_rates"][int(np.argmin(means))]
    )
    assert len(r["mean_curve"]) == 4
  table = mnist_experiments.markdown({"relu": results}, "# t")
  assert "| lstm | - |" in table and "best tuned baseline" in table


def _summary(name, kind, finals, lr=None):
  """The summary ``eval.compare`` writes, for runs whose curves are just their final losses."""
  return report.summarize(name, kind, np.asarray(finals)[:, None], lr)


def test_verdict_pairs_the_shared_test_problems():
  # Problems differ a lot in difficulty, so unpaired stderrs hide a consistent 0.01 gap.
  hard = np.linspace(0.2, 0.6, 32)
  wobble = 0.002 * np.cos(np.arange(32))
  adam = _summary("adam", "baseline", hard, lr=0.03)
  sgd = _summary("sgd", "baseline", hard + 0.2, lr=1.0)
  worse = {"optimizers": [_summary("lstm", "learned", hard + 0.01 + wobble), adam, sgd]}
  assert "does NOT beat the best tuned baseline (adam, lr 0.03)" in mnist_experiments.verdict(worse)
  better = {"optimizers": [_summary("lstm", "learned", hard - 0.01 + wobble), adam, sgd]}
  assert "lstm beats the best tuned baseline (adam" in mnist_experiments.verdict(better)
  level = {"optimizers": [_summary("lstm", "learned", hard + 10 * wobble), adam, sgd]}
  assert "lstm ties" in mnist_experiments.verdict(level)
  # A learned optimizer of another kind is named as such, not as "LSTM".
  ntm = {"optimizers": [_summary("ntm_lbfgs", "learned", hard + 0.01 + wobble), adam, sgd]}
  assert mnist_experiments.verdict(ntm).startswith("ntm_lbfgs does NOT beat")
  assert "paired difference ntm_lbfgs - adam" in mnist_experiments.verdict(ntm)


_FAKE_RUN = """
import sys
import numpy as np
from eval import report
from experiments import mnist_experiments as m

def fake_run(experiment, saved, *, num_problems, seed, **unused):
  curves = np.linspace(2.0, 0.5, 4)[None, :] + 0.01 * np.arange(num_problems)[:, None]
  return {
    "task": {"name": "mnist_mlp"}, "num_problems": num_problems, "num_steps": 3, "seed": seed,
    "tuning": {"num_problems": 1, "problems": "separate"},
    "optimizers": [
      report.summarize("lstm", "learned", curves, None),
      report.summarize("adam", "baseline", curves + 0.1, 0.01),
    ],
  }

m.run_experiment = fake_run
m.COMMAND.run(sys.argv)
"""


def _run_cli(*flags, code=None, env=None):
  command = ["-c", code] if code else ["-m", "experiments.mnist_experiments"]
  return subprocess.run(
    [sys.executable, *command, *flags],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, **(env or {})},
  )


def test_the_summary_goes_under_the_output_dir_not_into_docs(tmp_path):
  write_mnist(str(tmp_path / "mnist"))
  out = tmp_path / "out"
  result = _run_cli(
    f"--output_dir={out}", "--experiments=base", f"--mnist_dir={tmp_path}/mnist", code=_FAKE_RUN
  )
  assert result.returncode == 0, result.stderr[-2000:]
  summary = (out / "results_mnist.md").read_text()
  assert "## base:" in summary and "| lstm | - |" in summary
  assert (out / "base" / "results.json").is_file() and (out / "base" / "curves.png").is_file()


def test_no_data_is_a_usage_error_without_a_traceback(tmp_path):
  (tmp_path / "empty").mkdir()
  out = tmp_path / "out"
  result = _run_cli(f"--output_dir={out}", env={"MNIST_DIR": str(tmp_path / "empty")})
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "MNIST file train-images-idx3-ubyte[.gz] is missing from" in result.stderr
  assert "$MNIST_DIR" in result.stderr  # and says how to point at the data
  assert not out.exists()  # refused before anything was written


def test_reuse_baselines_runs_only_the_ones_not_cached_for_the_same_setting(tmp_path):
  write_mnist(str(tmp_path), sizes=(("train", 16), ("test", 4)))
  optimizer = learned_opt.lstm_optimizer(hidden_size=4, num_layers=1, preprocess="log_sign")
  saved = learned_opt.SavedOptimizer(optimizer, optimizer.init_meta_params(jax.random.key(0)))
  experiment = mnist_experiments.Experiment("relu", "tiny", {"hidden_sizes": [3]}, 3)

  def run(baselines, tune_problems=2, reuse=True):
    logs = []
    results = mnist_experiments.run_experiment(
      experiment, saved, baselines=baselines, num_problems=3, tune_problems=tune_problems,
      seed=0, lr_batch_size=None, mnist_dir=str(tmp_path), log=logs.append,
      cache_dir=str(tmp_path / "cache"), reuse=reuse,
    )  # fmt: skip
    reused = sorted(s.split(":")[0] for s in logs if "reused" in s)
    return {r["name"]: r for r in results["optimizers"]}, reused

  first, reused = run(["adam"], reuse=False)
  assert reused == []
  both, reused = run(["adam", "sgd"])  # adds sgd, keeps adam's tuning and curves
  assert reused == ["adam", "lstm"] and list(both) == ["lstm", "adam", "sgd"]
  assert both["adam"] == first["adam"]
  _, reused = run(["sgd"])  # nothing to run
  assert reused == ["lstm", "sgd"]
  _, reused = run(["adam"], tune_problems=3)  # other tuning problems: adam runs again
  assert reused == ["lstm"]


_NOT_WRITER = """
import sys

import numpy as np

from eval import report
from experiments import mnist_experiments as m
from train import distributed

distributed.is_writer = lambda: False  # as process 1 of a multi-process run

def fake_run(experiment, saved, *, num_problems, seed, mesh, **unused):
  sys.stderr.write(f"MESH {mesh.devices.size}\\n")
  curves = np.linspace(2.0, 0.5, 4)[None, :] + 0.01 * np.arange(num_problems)[:, None]
  return {
    "task": {"name": "mnist_mlp"}, "num_problems": num_problems, "num_steps": 3, "seed": seed,
    "tuning": {"num_problems": 1, "problems": "separate"},
    "optimizers": [report.summarize("lstm", "learned", curves, None)],
  }

m.run_experiment = fake_run
m.COMMAND.run(sys.argv)
"""


def test_only_process_0_writes_and_the_mesh_is_num_devices(tmp_path):
  write_mnist(str(tmp_path / "mnist"))
  out = tmp_path / "out"
  result = _run_cli(
    f"--output_dir={out}",
    "--experiments=base",
    f"--mnist_dir={tmp_path}/mnist",
    "--num_devices=2",
    code=_NOT_WRITER,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "MESH 2\n" in result.stderr
  assert result.stdout == "" and not out.exists()  # process 0 alone prints and writes
