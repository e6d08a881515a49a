"""Baselines, the learning-rate grid, comparisons and sharded sweeps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from eval import baselines, compare, plots, sharding
from tasks import quadratic
from train import inner


def test_paper_grid():
  grid = baselines.paper_learning_rates()
  assert len(grid) == 30
  np.testing.assert_allclose(grid[[0, 1, 2, 29]], [1e-6, 2e-6, 4e-6, 2**29 * 1e-6])


def test_best_learning_rate_treats_nan_as_worst():
  finals = jnp.array([[jnp.nan, 0.0], [1.0, 1.0], [0.5, 2.0]])
  assert baselines.best_learning_rate(finals) == 1


def test_grid_equals_separate_runs():
  """The vmapped grid gives each learning rate exactly what a run of its own gives."""
  task = quadratic(dim=4)
  params, keys = inner.sample_problems(task, jax.random.key(0), 3)
  lrs = jnp.array([1e-3, 1e-2, 5e-2])
  for name, make in baselines.BASELINES.items():
    grid = compare.rollout_lr_grid(task, make, lrs, (), params, keys, 5)
    chunked = compare.rollout_lr_grid(task, make, lrs, (), params, keys, 5, lr_batch_size=2)
    single = inner.rollout_batch(task, make(float(lrs[1])), (), params, keys, 5)
    np.testing.assert_allclose(grid[1], single, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(chunked, grid, rtol=1e-6, err_msg=name)


def test_rollout_curve_starts_at_theta0_and_follows_sgd():
  task = quadratic(dim=3)
  params, keys = inner.sample_problems(task, jax.random.key(1), 1)
  problem = jax.tree.map(lambda x: x[0], params)
  curve = inner.rollout(task, optax.sgd(0.01), (), problem, keys[0], 2)
  theta = task.init((), problem, jax.random.split(keys[0])[0])["theta"]
  w, y = problem["w"], problem["y"]
  expected = []
  for _ in range(3):
    expected.append(float(jnp.sum((w @ theta - y) ** 2)))
    theta = theta - 0.01 * 2 * w.T @ (w @ theta - y)
  np.testing.assert_allclose(curve, expected, rtol=1e-5)


def test_compare_table_and_plot(tmp_path):
  task = quadratic(dim=4)
  opt = learned_opt.lstm_optimizer(hidden_size=4)
  saved = learned_opt.SavedOptimizer(opt, opt.init_meta_params(jax.random.key(0)))
  results = compare.compare(
    task,
    {"lstm": saved},
    ["sgd", "adam"],
    num_problems=8,
    num_steps=10,
    learning_rates=[1e-3, 1e-2, 1e-1],
    log=lambda s: None,
  )
  names = [r["name"] for r in results["optimizers"]]
  assert names == ["lstm", "sgd", "adam"]
  for r in results["optimizers"]:
    assert len(r["mean_curve"]) == 11
    assert r["final_mean"] == pytest.approx(r["mean_curve"][-1], rel=1e-5)
  adam = results["optimizers"][2]
  assert adam["learning_rate"] == pytest.approx(
    [1e-3, 1e-2, 1e-1][int(np.argmin(adam["grid_final_means"]))]
  )
  table = compare.format_table(results)
  assert "adam" in table and "lstm" in table
  plots.plot_curves(results, str(tmp_path / "curves.png"))
  assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="Unknown baselines"):
    compare.compare(task, {}, ["lbfgs"], num_problems=2, num_steps=2)


def test_sharded_sweep_matches_single_device():
  assert jax.device_count() == 8, "tests/conftest.py fakes 8 CPU devices"
  task = quadratic(dim=4)
  params, keys = inner.sample_problems(task, jax.random.key(2), 16)
  sharded = sharding.shard_problems((params, keys))
  assert len(sharded[0]["w"].sharding.device_set) == 8
  run = jax.jit(lambda p, k: inner.rollout_batch(task, optax.adam(0.1), (), p, k, 5))
  np.testing.assert_allclose(run(*sharded), run(params, keys), rtol=1e-6)
  # Problem counts that do not divide over the devices run unsharded.
  odd = sharding.shard_problems(keys[:3])
  assert len(odd.sharding.device_set) == 1


def test_separate_tuning_problems_choose_the_rate_the_test_problems_then_run():
  task = quadratic(dim=4)
  lrs = [1e-3, 1e-2, 1e-1]
  results = compare.compare(
    task,
    {},
    ["sgd"],
    num_problems=4,
    num_steps=5,
    learning_rates=lrs,
    tune_problems=3,
    log=lambda s: None,
  )
  sgd = results["optimizers"][0]
  assert results["tuning"] == {
    "problems": "separate",
    "num_problems": 3,
    "seed": 1,
    "learning_rates": lrs,
  }
  tune = inner.sample_problems(task, compare.problem_key(1), 3)
  grid = compare.sweep(task, baselines.BASELINES["sgd"], lrs, *tune, 5)
  assert sgd["learning_rate"] == lrs[int(np.argmin(np.mean(grid[:, :, -1], axis=1)))]
  test = inner.sample_problems(task, compare.problem_key(0), 4)
  expected = inner.rollout_batch(task, optax.sgd(sgd["learning_rate"]), (), *test, 5)
  np.testing.assert_allclose(sgd["finals"], expected[:, -1], rtol=1e-5)


def test_learned_curves_in_problem_chunks_equal_one_batch():
  """Chunks of 3, 3 and 1 problems (each on its own mesh) give the all-at-once curves."""
  task = quadratic(dim=4)
  opt = learned_opt.lstm_optimizer(hidden_size=4, preprocess="log_sign")
  saved = learned_opt.SavedOptimizer(opt, opt.init_meta_params(jax.random.key(3)))
  params, keys = inner.sample_problems(task, jax.random.key(4), 7)
  whole = compare.learned_curves(task, saved, params, keys, 6)
  rollout = compare.learned_rollout(task, opt, 6)
  chunked = compare.learned_curves(
    task, saved, params, keys, 6, problem_batch_size=3, rollout=rollout
  )
  assert chunked.shape == (7, 7)
  np.testing.assert_array_equal(chunked, whole)  # bit for bit: problems never interact
