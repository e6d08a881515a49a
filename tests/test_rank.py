"""eval.rank: a real run's checkpoints ranked on held-out problems against a tuned baseline."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import learned_opt
from eval import baselines, rank, run_config
from eval import curves as curves_lib
from tasks import quadratic
from train import inner, meta_step, trainer
from train.config import MetaTrainConfig

# Ranks a trained run's checkpoints, in-process and on the command line (slow tier).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished tiny quadratic run: checkpoints at meta-steps 4 and 8, the best phi saved."""
  config = MetaTrainConfig(
    output_dir=str(tmp_path_factory.mktemp("rank") / "run"),
    task_kwargs={"dim": 4},
    optimizer_kwargs={"hidden_size": 4},
    unroll=5,
    horizon=10,
    num_problems=4,
    num_epochs=2,
    steps_per_epoch=4,
    valid_problems=4,
    checkpoint_every=4,
    meta_lr=1e-2,
  )
  state, _ = trainer.train(config, log=lambda s: None)
  return config, state


def _same(a, b) -> bool:
  return all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def test_a_runs_candidates_are_its_checkpoints_and_its_best(run):
  config, state = run
  found = run_config.run_candidates(config.output_dir)
  assert [c.name for c in found] == ["run/step_4", "run/step_8", "run/best"]
  assert [c.meta_step for c in found[:2]] == [4, 8]
  assert _same(found[1].saved.meta_params, state.meta_params)  # phi at the last checkpoint
  best = found[2]
  at_best = {c.meta_step: c for c in found[:2]}[best.meta_step]
  assert _same(best.saved.meta_params, at_best.saved.meta_params)


def test_a_save_during_ranking_gives_the_best_its_own_step(tmp_path, monkeypatch):
  """A live run saving between the weights and the metadata read: the step is the weights'."""
  optimizer = learned_opt.build({"kind": "lstm", "hidden_size": 2, "num_layers": 1})
  phi = {step: optimizer.init_meta_params(jax.random.key(step)) for step in (10, 20)}
  learned_opt.save(str(tmp_path), optimizer, phi[10], metadata={"step": 10})
  load = learned_opt.load

  def load_then_save(path):
    saved = load(path)
    if learned_opt.load_metadata(path)["step"] == 10:
      learned_opt.save(str(tmp_path), optimizer, phi[20], metadata={"step": 20})
    return saved

  monkeypatch.setattr(learned_opt, "load", load_then_save)
  (best,) = run_config.run_candidates(str(tmp_path), with_checkpoints=False)
  assert best.meta_step == 20
  jax.tree.map(np.testing.assert_array_equal, best.saved.meta_params, phi[20])


def test_ranking_problems_are_neither_training_nor_validation_problems(run):
  config, _ = run
  task = quadratic(dim=4)
  sample = jax.jit(lambda key: inner.sample_problems(task, key, 4)[0]["w"])
  held_out = np.concatenate([sample(curves_lib.problem_key(seed)) for seed in (7, 8)])
  seen = [sample(meta_step.valid_key(config))]
  seen += [sample(meta_step.problem_key(config, s)) for s in range(0, 8, 2)]  # resampled every 2
  for w in seen:
    assert not np.any(np.all(np.isclose(held_out[:, None], w[None]), axis=(2, 3)))


def test_a_run_without_config_json_names_the_fix(run, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(run[0].output_dir, copy)
  os.remove(copy / "config.json")
  with pytest.raises(ValueError, match=r"has checkpoints but no config.json.*--checkpoint="):
    run_config.run_candidates(str(copy))


def _rank_cli(*flags):
  return subprocess.run(
    [sys.executable, "-m", "eval.rank", *flags],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_the_command_ranks_by_paired_differences_to_the_baseline(run, tmp_path):
  """The ranking's numbers against rollouts computed here, on the same held-out problems."""
  config, _ = run
  out = tmp_path / "ranking"
  result = _rank_cli(
    f"--run={config.output_dir}",
    f"--checkpoint=saved={config.output_dir}",  # a run's saved optimizer, as for several runs
    f"--output_dir={out}",
    "--baseline=sgd",
    "--baseline_lr=0.01",
    "--num_problems=6",
    "--num_steps=10",
    "--step=6",
    "--seed=11",
    "--problem_batch_size=4",  # 4 + 2: chunks must not change the numbers checked below
  )
  assert result.returncode == 0, result.stderr[-2000:]
  ranking = json.loads((out / "ranking.json").read_text())
  assert ranking["task"]["dim"] == 4  # from the run's config.json
  rows = {r["name"]: r for r in ranking["candidates"]}
  assert set(rows) == {"run/step_4", "run/step_8", "run/best", "saved"}
  assert rows["saved"]["step_loss"] == rows["run/best"]["step_loss"]
  losses = [r["step_loss"] for r in ranking["candidates"]]
  assert losses == sorted(losses) and [r["rank"] for r in ranking["candidates"]] == [1, 2, 3, 4]

  task = quadratic(dim=4)
  params, keys = inner.sample_problems(task, curves_lib.problem_key(11), 6)
  base = np.asarray(inner.rollout_batch(task, optax.sgd(0.01), (), params, keys, 10))
  candidates = run_config.run_candidates(config.output_dir)
  learned = jax.jit(
    lambda phi: inner.rollout_batch(
      task, learned_opt.as_optax(candidates[0].saved.optimizer, phi), (), params, keys, 10
    )
  )
  for c in candidates:
    curves, row = np.asarray(learned(c.saved.meta_params)), rows[c.name]
    d = curves[:, 6] - base[:, 6]
    np.testing.assert_allclose(row["step_loss"], np.mean(curves[:, 6]), rtol=1e-5)
    np.testing.assert_allclose(row["step_minus_baseline"], np.mean(d), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
      row["step_minus_baseline_stderr"], np.std(d, ddof=1) / np.sqrt(6), rtol=1e-4
    )
    d_run = np.mean(curves[:, 1:], axis=1) - np.mean(base[:, 1:], axis=1)
    np.testing.assert_allclose(row["run_mean_minus_baseline"], np.mean(d_run), rtol=1e-4, atol=1e-6)
    assert row["kind"] == "lstm"
  table = (out / "ranking.md").read_text()
  assert table.startswith("# Ranking by loss at step 6 of 10")
  assert "| 1 | " in table and "| minus sgd |" in table and "| sgd (lr 0.01) | baseline |" in table


def test_the_baseline_rate_is_the_grids_best_at_the_ranked_step():
  """NAG, tuned like every baseline: the grid point with the lowest mean loss at the step."""
  task = quadratic(dim=4)
  problems = inner.sample_problems(task, curves_lib.problem_key(5), 4)
  rates = [1e-3, 1e-2, 5e-2]
  sweep = curves_lib.compiled(task, baselines.BASELINES["nag"], 10, grid=True)
  grid = sweep((), (), np.asarray(rates, np.float32), *problems)[curves_lib.LOSS]
  curves, rate, means = rank.baseline_curves(
    task, "nag", num_problems=4, seed=5, tune_problems=0, num_steps=10, step=3,
    learning_rates=rates,
  )  # fmt: skip
  best = int(np.argmin(np.mean(grid[:, :, 3], axis=1)))
  assert rate == rates[best] and np.argmin(means) == best
  np.testing.assert_allclose(curves, grid[best], rtol=1e-6)
  fixed, rate, means = rank.baseline_curves(
    task, "nag", num_problems=4, seed=5, tune_problems=3, num_steps=10, step=3,
    learning_rates=rates, learning_rate=rates[1],
  )  # fmt: skip
  assert rate == rates[1] and means is None
  np.testing.assert_allclose(fixed, grid[1], rtol=1e-6)


def test_settings_it_cannot_use_are_named():
  with pytest.raises(ValueError, match=r"--step must be in \[1, --num_steps=10\], got 11"):
    rank.check_settings("adam", 4, 10, 11, 0, "step")
  with pytest.raises(ValueError, match="--baseline='adamw' is no baseline; choose from sgd, nag"):
    rank.check_settings("adamw", 4, 10, 10, 0, "step")
  with pytest.raises(ValueError, match="--num_problems must be >= 2"):
    rank.check_settings("adam", 1, 10, 10, 0, "step")


def test_a_directory_without_checkpoints_is_a_usage_error(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  result = _rank_cli(f"--run={empty}", f"--output_dir={tmp_path}/out")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert f"no checkpoints found at {empty}/checkpoints" in result.stderr
  assert not os.path.exists(tmp_path / "out")


_NOT_WRITER = """
import atexit
import sys

from eval import engine, rank
from train import distributed

distributed.is_writer = lambda: False  # as process 1 of a multi-process run
meshes = []
real = engine.run

def spy(spec, **kwargs):
  if spec.learned:
    meshes.append(spec.mesh.devices.size)
  return real(spec, **kwargs)

engine.run = spy
atexit.register(lambda: sys.stderr.write(f"MESHES {meshes}"))
rank.run()
"""


def test_only_process_0_writes_and_the_mesh_is_num_devices(run, tmp_path):
  config, _ = run
  out = tmp_path / "ranking"
  result = subprocess.run(
    [sys.executable, "-c", _NOT_WRITER, f"--run={config.output_dir}", "--nocheckpoints"]
    + [f"--output_dir={out}", "--baseline=sgd", "--baseline_lr=0.01", "--num_problems=4"]
    + ["--num_steps=3", "--num_devices=2"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "MESHES [2]" in result.stderr  # the one candidate ran on --num_devices devices
  assert result.stdout == "" and not out.exists()  # process 0 alone logs and writes
