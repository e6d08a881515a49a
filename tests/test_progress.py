"""Progress inside long evaluations: a line per chunk of rates and problems, with rate and ETA."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import learned_opt
from eval import engine
from tasks import quadratic
from train import progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^(\w+): chunk (\d+)/(\d+) \((.*)\), ([0-9.e+-]+) s/chunk, ETA (\S+)$")


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_lines_give_the_chunk_its_rate_and_eta_and_leave_the_last_to_the_caller():
  clock, lines = Clock(), []
  bar = progress.Progress("adam", 5, lines.append, every=0.0, clock=clock)
  for seconds, detail in ((30, "lr 1e-06 to 3e-06"), (10, "b"), (10, "c"), (10, "d"), (10, "e")):
    clock.now += seconds
    bar.step(detail)
  assert lines == [
    "adam: chunk 1/5 (lr 1e-06 to 3e-06), 30 s/chunk, ETA 2:00",  # compiled in the first
    "adam: chunk 2/5 (b), 10 s/chunk, ETA 30s",  # the rate leaves the first chunk out
    "adam: chunk 3/5 (c), 10 s/chunk, ETA 20s",
    "adam: chunk 4/5 (d), 10 s/chunk, ETA 10s",
  ]  # no line for the fifth: the evaluation's own line for the optimizer follows


def test_lines_are_throttled_after_the_first_and_one_chunk_says_nothing():
  clock, lines = Clock(), []
  bar = progress.Progress("sgd", 100, lines.append, every=10.0, clock=clock)
  for _ in range(30):
    clock.now += 1.0
    bar.step()
  assert [line.split(",")[0] for line in lines] == [
    "sgd: chunk 1/100",
    "sgd: chunk 11/100",
    "sgd: chunk 21/100",
  ]
  assert lines[1] == "sgd: chunk 11/100, 1 s/chunk, ETA 1:29"
  quiet = []
  progress.Progress("sgd", 1, quiet.append, every=0.0, clock=clock).step()
  assert quiet == []


def test_duration():
  assert [progress.duration(s) for s in (0.4, 42, 60, 205, 3725)] == [
    "0s",
    "42s",
    "1:00",
    "3:25",
    "1:02:05",
  ]


def test_a_sweep_in_chunks_reports_each_and_gives_the_curves_of_one_sweep(monkeypatch):
  monkeypatch.setattr(progress, "EVERY_S", 0.0)
  opt = learned_opt.lstm_optimizer(hidden_size=4)
  saved = learned_opt.SavedOptimizer(opt, opt.init_meta_params(jax.random.key(0)))
  spec = engine.Spec(
    quadratic(dim=4),
    engine.Problems(5, seed=0),
    6,
    learned={"lstm": saved},
    baselines=("sgd",),
    tuning=engine.Tuning((1e-3, 1e-2, 5e-2, 1e-1, 0.5)),
  )
  whole = engine.run(spec, log=lambda s: None)
  logs = []
  chunked = engine.run(
    engine.Spec(**{**spec.__dict__, "lr_batch": 2, "problem_batch": 3}), log=logs.append
  )
  for got, want in zip(chunked, whole, strict=True):
    assert got.learning_rate == want.learning_rate
    assert got.record["tuning_scores"] == pytest.approx(want.record["tuning_scores"], rel=1e-6)
    np.testing.assert_allclose(got.curves["loss"], want.curves["loss"], rtol=1e-6)
  found = [LINE.match(line) for line in logs]
  chunks = [(m[1], int(m[2]), int(m[3]), m[4]) for m in found if m]
  assert chunks == [
    ("lstm", 1, 2, "problems 1-3 of 5"),
    ("sgd", 1, 6, "lr 0.001 to 0.01, problems 1-3 of 5"),
    ("sgd", 2, 6, "lr 0.001 to 0.01, problems 4-5 of 5"),
    ("sgd", 3, 6, "lr 0.05 to 0.1, problems 1-3 of 5"),
    ("sgd", 4, 6, "lr 0.05 to 0.1, problems 4-5 of 5"),
    ("sgd", 5, 6, "lr 0.5, problems 1-3 of 5"),
  ]
  # Between each optimizer's start line and its end line.
  starts = [i for i, line in enumerate(logs) if " of 2): " in line]
  assert logs[starts[0] + 1].startswith("lstm: chunk 1/2")
  assert logs[starts[1] + 1].startswith("sgd: chunk 1/6") and logs[-1].startswith("sgd: lr ")


@pytest.mark.slow
def test_the_evaluation_command_shows_progress_before_its_table(tmp_path):
  """Within a command whose stdout is a pipe (a log), the line comes as the chunk ends."""
  result = subprocess.run(
    [
      sys.executable, "-m", "eval.evaluate", "--checkpoint=pretrained:quadratic",
      f"--output_dir={tmp_path}", "--num_problems=4", "--num_steps=5", "--baselines=adam",
      "--lr_batch_size=10",
    ],
    cwd=ROOT, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  (first,) = [line for line in lines if line.startswith("adam: chunk 1/3 (lr 1e-06 to ")]
  assert LINE.match(first), first
  assert lines.index(first) < [i for i, line in enumerate(lines) if line.startswith("adam: lr")][0]
  (adam,) = [r for r in json.loads((tmp_path / "results.json").read_text())["optimizers"][1:]]
  assert len(adam["grid_final_means"]) == 30  # every rate of the three chunks
