"""train.sweep: the meta-lr random search (section 3) as one command, on tiny quadratics.

Fast: the pure parts in-process (drawing meta-lrs, each run's config and command line, choosing
the winner, the table, the flags). Slow: one sweep end to end in child processes (runs, resume,
skip, winner export) and its one-line usage errors.
"""

import json
import math
import os
import re

import jax
import numpy as np
import pytest
from absl import flags
from cli_checks import assert_one_line_error, run

import learned_opt
from train import config_flags, meta_step, sweep, sweep_runs
from train.config import MetaTrainConfig
from train.run import Run

TINY = {
  "task_kwargs": {"dim": 3},
  "num_problems": 8,
  "valid_problems": 8,
  "unroll": 5,
  "horizon": 10,
  "steps_per_epoch": 5,
  "log_every": 5,
  "checkpoint_every": 5,
}
FLAGS = [f"--{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in TINY.items()]
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def test_meta_lrs_are_log_uniform_in_the_range_and_reproducible():
  lrs = sweep_runs.draw_meta_lrs(4000, 1e-4, 1e-2, sweep_seed=3)
  assert all(1e-4 <= x <= 1e-2 for x in lrs)
  decades = np.log10(lrs)  # uniform in [-4, -2]: each half decade holds about a quarter
  counts = np.histogram(decades, bins=4, range=(-4, -2))[0]
  assert np.all(np.abs(counts / 4000 - 0.25) < 0.03), counts
  assert sweep_runs.draw_meta_lrs(4000, 1e-4, 1e-2, sweep_seed=3) == lrs
  assert sweep_runs.draw_meta_lrs(5, 1e-4, 1e-2, sweep_seed=4) != lrs[:5]
  # More runs keep the rates of the earlier ones (a grown sweep resumes its runs).
  assert sweep_runs.draw_meta_lrs(3, 1e-4, 1e-2, sweep_seed=3) == lrs[:3]
  assert sweep_runs.draw_meta_lrs(2, 5e-3, 5e-3, sweep_seed=0) == pytest.approx([5e-3, 5e-3])


def test_plan_gives_each_run_its_rate_seed_and_directory_and_one_validation_set(tmp_path):
  base = MetaTrainConfig(output_dir=str(tmp_path), **TINY)
  runs = sweep_runs.plan(base, str(tmp_path), [1e-3, 2e-3, 3e-3], sweep_runs.run_seeds(3, []))
  assert [r.name for r in runs] == ["run_00", "run_01", "run_02"]
  assert [r.seed for r in runs] == [0, 1, 2] == [r.config.seed for r in runs]
  assert [r.config.meta_lr for r in runs] == [1e-3, 2e-3, 3e-3]
  assert {r.config.valid_seed for r in runs} == {0}  # all validate on the same problems
  assert runs[1].config.output_dir == os.path.join(str(tmp_path), "runs", "run_01")
  assert sweep_runs.run_seeds(2, [5, 9]) == [5, 9]


def test_the_meta_train_command_line_gives_back_the_runs_config(tmp_path):
  base = MetaTrainConfig(output_dir="x", second_order=True, meta_lr_schedule="cosine", **TINY)
  (planned,) = sweep_runs.plan(base, str(tmp_path), [1.234567891e-3], [7])
  argv = sweep_runs.meta_train_argv(planned.config)
  assert argv[0] == "--preset=none"
  assert config_flags.parse(MetaTrainConfig, ["meta_train", *argv[1:]]) == planned.config


def test_selection_problems_are_apart_from_training_validation_and_test():
  config = MetaTrainConfig(output_dir="x", seed=7, **TINY)
  data = lambda k: tuple(np.asarray(jax.random.key_data(k)).ravel())
  others = {
    data(meta_step.problem_key(config, 0)),
    data(meta_step.valid_key(config)),
    data(jax.random.fold_in(jax.random.key(7), 3)),  # eval.curves.problem_key(7)
  }
  assert data(sweep_runs.selection_key(7)) not in others


def _rows(scores):
  return [
    {"run": f"run_{i:02d}", "meta_lr": 1e-3 * (i + 1), "seed": i, "status": "done",
     "best_valid": 1.0 + i, "best_step": 10, "selection_score": s, "selection_diverged": d,
     "validation": [[10, 1.0 + i], [20, 1.5 + i]]}
    for i, (s, d) in enumerate(scores)
  ]  # fmt: skip


def test_the_winner_has_the_best_selection_result():
  assert sweep.choose_winner(_rows([(3.0, 0), (2.0, 0), (5.0, 0)])) == "run_01"
  # A diverged selection problem counts before the mean, as in validation.
  assert sweep.choose_winner(_rows([(3.0, 0), (2.0, 1), (None, None)])) == "run_00"
  assert sweep.choose_winner(_rows([(None, None)])) is None


def test_the_table_lists_every_run_and_marks_the_winner():
  rows = _rows([(3.0, 0), (2.0, 1), (None, None)])
  table = sweep.summary_table(rows, "run_00", select_problems=16)
  lines = table.splitlines()
  assert lines[0].split("|")[1:-1] == [
    " run ", " meta-lr ", " seed ", " best validation ", " step ", " selection score ", " status "
  ]  # fmt: skip
  assert len(lines) == 2 + 3
  assert lines[2].startswith("| **run_00** (winner) | 0.001 | 0 | 1 | 10 | 3 |")
  assert "(1 of 16 diverged)" in lines[3] and "winner" not in lines[3]
  assert "| run_02 | 0.003 | 2 | 3 | 10 | - |" in lines[4]


def test_the_validation_table_has_a_row_per_meta_step_and_a_column_per_run(tmp_path):
  rows = _rows([(3.0, 0), (2.0, 0)])
  rows[1]["validation"] = [[10, 2.0], [20, None], [30, 1.25]]  # longer, one epoch diverged
  lines = sweep.validation_table(rows).splitlines()
  assert lines[0] == "| meta-step | run_00 | run_01 |" and lines[1] == "|---|---|---|"
  assert lines[2:] == ["| 10 | 1 | 2 |", "| 20 | 1.5 | - |", "| 30 | - | 1.25 |"]
  sweep.plot_validation(rows, str(tmp_path / "v.png"))
  assert (tmp_path / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_history_reads_every_epoch_of_the_metrics_log(tmp_path):
  records = [
    {"step": 5, "meta_loss": 1.0},
    {"epoch": 1, "step": 10, "valid_final_loss": 2.5, "valid_diverged": 0},
    {"step": 15, "meta_loss": 1.0},
    {"epoch": 2, "step": 20, "valid_final_loss": float("nan"), "valid_diverged": 8},
  ]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  assert sweep.validation_history(str(tmp_path)) == [[10, 2.5], [20, None]]


def _flag_values(argv):
  values = flags.FlagValues()
  config_flags.define(sweep.SweepConfig, values)
  sweep._define_train_flags(values)  # noqa: SLF001
  values(["sweep", *argv])
  return values


def test_flags_build_the_job_and_refuse_what_the_sweep_draws():
  job = sweep.job_from_flags(_flag_values(["--output_dir=s", "--num_runs=2", "--unroll=5"]))
  assert job.output_dir == "s" and job.sweep.num_runs == 2 and job.base.unroll == 5
  assert job.sweep.lr_range() == (1e-4, 1e-2)
  for argv, says in [
    (["--meta_lr=0.1"], "--meta_lr is drawn per run by the sweep; set --meta_lr_range"),
    (["--seed=3"], "--seed is drawn per run by the sweep; set --seeds"),
    (["--meta_lr_range=1e-2,1e-4"], "--meta_lr_range=1e-2,1e-4 must be LOW,HIGH"),
    (["--meta_lr_range=1e-3"], "must be LOW,HIGH"),
    (["--meta_lr_range=0,1"], "must be LOW,HIGH"),
    (["--num_runs=0"], "--num_runs must be >= 1"),
    (["--num_runs=3", "--seeds=1,2"], "--seeds names 2 seeds for --num_runs=3"),
    (["--parallel=0"], "--parallel must be >= 1"),
  ]:
    with pytest.raises(ValueError, match=re.escape(says)):
      sweep.job_from_flags(_flag_values(["--output_dir=s", *argv]))


def _sweep(out, *more, env=ONE_DEVICE):
  argv = ["train.sweep", f"--output_dir={out}", "--num_runs=2", "--select_problems=16", *FLAGS]
  return run([*argv, *more], env=env, timeout=300)


def _said(result):
  return result.stdout + result.stderr


@pytest.mark.slow
def test_a_sweep_runs_resumes_skips_and_exports_its_winner(tmp_path):
  out = tmp_path / "sweep"
  first = _sweep(out, "--num_epochs=1", "--parallel=2", "--sweep_seed=5")
  assert first.returncode == 0, _said(first)[-3000:]
  record = json.loads((out / "sweep.json").read_text())
  lrs = sweep_runs.draw_meta_lrs(2, 1e-4, 1e-2, sweep_seed=5)
  assert [r["meta_lr"] for r in record["runs"]] == lrs
  assert [r["seed"] for r in record["runs"]] == [0, 1]
  for r in record["runs"]:  # each an ordinary meta-training run
    found = Run(out / "runs" / r["run"])
    assert found.config().meta_lr == r["meta_lr"] and found.config().seed == r["seed"]
    assert found.has_best() and found.steps() == [5]
    assert r["best_step"] == 5 and r["best_valid"] == found.best_metadata()["valid_final_loss"]
    assert math.isfinite(r["selection_score"]) and r["status"] == "done"
  best = min(record["runs"], key=lambda r: (r["selection_diverged"], r["selection_score"]))
  assert record["winner"] == best["run"]
  summary = (out / "summary.md").read_text()
  assert f"**{best['run']}** (winner)" in summary and summary in first.stdout
  assert "| meta-step | run_00 | run_01 |" in summary and (out / "validation.png").is_file()
  for r in record["runs"]:  # its one epoch's validation, as the run logged it
    assert r["validation"] == [
      [5, pytest.approx(Run(out / "runs" / r["run"]).budget()["valid_history"][0])]
    ]
  saved = learned_opt.load(out / "winner")
  phi = Run(out / "runs" / best["run"]).best()[0].meta_params
  assert jax.tree.all(jax.tree.map(np.array_equal, saved.meta_params, phi))
  metadata = learned_opt.load_metadata(out / "winner")
  assert [r["run"] for r in metadata["sweep"]["runs"]] == ["run_00", "run_01"]
  assert metadata["sweep"]["winner"] == best["run"] and metadata["step"] == 5

  names = [r["run"] for r in record["runs"]]
  metrics = {n: (out / "runs" / n / "metrics.jsonl").read_bytes() for n in names}
  again = _sweep(out, "--num_epochs=1", "--sweep_seed=5")  # finished runs are not redone
  assert again.returncode == 0, _said(again)[-3000:]
  assert "run_00: finished before; skipped" in again.stdout and "starting" not in again.stdout
  assert all((out / "runs" / n / "metrics.jsonl").read_bytes() == m for n, m in metrics.items())
  assert json.loads((out / "sweep.json").read_text())["runs"][0]["status"] == "finished before"

  longer = _sweep(out, "--num_epochs=2", "--sweep_seed=5")  # a second epoch: each run resumes
  assert longer.returncode == 0, _said(longer)[-3000:]
  assert longer.stdout.count("Resumed from meta-step 5") == 2, _said(longer)[-3000:]
  assert all(Run(out / "runs" / n).steps()[-1] == 10 for n in metrics)


@pytest.mark.slow
def test_usage_errors_are_one_line_and_write_nothing(tmp_path):
  out = tmp_path / "sweep"
  assert_one_line_error(_sweep(out, "--meta_lr_range=1,0.1"), "--meta_lr_range=1,0.1 must be")
  assert_one_line_error(_sweep(out, "--num_runs=0"), "--num_runs must be >= 1")
  assert not out.exists()
