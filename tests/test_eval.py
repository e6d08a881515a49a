"""Baselines, the learning-rate grid, comparisons and sharded sweeps."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from eval import baselines, compare, plots, report, sharding
from eval import curves as curves_lib
from tasks import quadratic
from train import inner


def test_paper_grid():
  grid = baselines.paper_learning_rates()
  assert len(grid) == 30
  np.testing.assert_allclose(grid[[0, 1, 2, 29]], [1e-6, 2e-6, 4e-6, 2**29 * 1e-6])


def test_best_learning_rate_treats_nan_as_worst():
  finals = jnp.array([[jnp.nan, 0.0], [1.0, 1.0], [0.5, 2.0]])
  assert baselines.best_learning_rate(finals) == 1


@pytest.mark.slow
def test_grid_equals_separate_runs():
  """The vmapped grid gives each learning rate exactly what a run of its own gives."""
  task = quadratic(dim=4)
  params, keys = inner.sample_problems(task, jax.random.key(0), 3)
  lrs = jnp.array([1e-3, 1e-2, 5e-2])
  for name, make in baselines.BASELINES.items():
    whole = curves_lib.compiled(task, make, 5, grid=True)
    in_twos = curves_lib.compiled(task, make, 5, grid=True, arg_batch=2)
    grid = whole((), (), lrs, params, keys)[curves_lib.LOSS]
    chunked = in_twos((), (), lrs, params, keys)[curves_lib.LOSS]
    single = inner.rollout_batch(task, make(float(lrs[1])), (), params, keys, 5)
    np.testing.assert_allclose(grid[1], single, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(chunked, grid, rtol=1e-6, err_msg=name)


@pytest.mark.slow
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


@pytest.mark.slow
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
  table = report.format_table(results)
  assert "adam" in table and "lstm" in table
  plots.plot_curves(results, str(tmp_path / "curves.png"))
  assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="Unknown baselines"):
    compare.compare(task, {}, ["lbfgs"], num_problems=2, num_steps=2)


@pytest.mark.slow
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


@pytest.mark.slow
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
  tune = inner.sample_problems(task, curves_lib.problem_key(1), 3)
  finals = [inner.rollout_batch(task, optax.sgd(lr), (), *tune, 5)[:, -1] for lr in lrs]
  assert sgd["learning_rate"] == lrs[int(np.argmin(np.mean(np.stack(finals), axis=1)))]
  test = inner.sample_problems(task, curves_lib.problem_key(0), 4)
  expected = inner.rollout_batch(task, optax.sgd(sgd["learning_rate"]), (), *test, 5)
  np.testing.assert_allclose(sgd["finals"], expected[:, -1], rtol=1e-5)


@pytest.mark.slow
def test_learned_curves_in_problem_chunks_equal_one_batch():
  """Chunks of 3, 3 and 1 problems (each on its own mesh) give the all-at-once curves."""
  task = quadratic(dim=4)
  opt = learned_opt.lstm_optimizer(hidden_size=4, preprocess="log_sign")
  saved = learned_opt.SavedOptimizer(opt, opt.init_meta_params(jax.random.key(3)))
  params, keys = inner.sample_problems(task, jax.random.key(4), 7)
  fn = curves_lib.compiled(task, lambda phi: learned_opt.as_optax(opt, phi), 6)
  whole = curves_lib.curves(task, fn, saved.meta_params, params, keys)[curves_lib.LOSS]
  chunked = curves_lib.curves(task, fn, saved.meta_params, params, keys, problem_batch=3)
  chunked = chunked[curves_lib.LOSS]
  assert chunked.shape == (7, 7)
  np.testing.assert_array_equal(chunked, whole)  # bit for bit: problems never interact


@pytest.mark.parametrize(
  "module, argv, message",
  [
    ("evaluate", ["--baselines=sgd,lbfgs"], "--baselines: unknown 'lbfgs'; choose from sgd, nag"),
    ("evaluate", ["--num_steps=0"], "--num_steps must be positive, got 0"),
    ("evaluate", ["--problem_batch_size=-1"], "--problem_batch_size must be 0 (all problems"),
    ("evaluate", ["--output_dir="], "--output_dir is required"),
    ("evaluate", ["--task_kwargs=[3]"], "--task_kwargs must be a JSON object"),
    ("rank", [], "Name what to rank: --run=DIR"),  # no --checkpoint, no --run
    ("rank", ["--baseline=adamw"], "--baseline='adamw' is no baseline; choose from sgd"),
    ("rank", ["--step=101"], r"--step must be in [1, --num_steps=100], got 101"),
    ("rank", ["--rank_by=final"], "--rank_by='final'; choose from step, run_mean"),
    ("rank", ["--baseline_lr=-1"], "--baseline_lr must be positive"),
  ],
)
def test_command_configs_name_the_flag_of_a_bad_value(module, argv, message):
  """``eval.evaluate``'s and ``eval.rank``'s flags, validated before anything compiles."""
  from eval import evaluate, rank
  from train import config_flags

  config_class = {"evaluate": evaluate.EvaluateConfig, "rank": rank.RankConfig}[module]
  base = ["prog", "--output_dir=out"] + (["--checkpoint=pretrained:quadratic"] if argv else [])
  with pytest.raises(ValueError, match=re.escape(message)):
    config_flags.parse(config_class, base + argv)


def test_command_configs_take_their_flags_one_for_one():
  from eval import evaluate, rank
  from train import config_flags

  config = config_flags.parse(
    evaluate.EvaluateConfig,
    ["prog", "--checkpoint=a", "--checkpoint=b=pretrained:quadratic", "--baselines=sgd,adam"]
    + ['--task_kwargs={"dim": 3}', "--output_dir=out", "--overwrite"],
  )
  assert config.checkpoint == ("a", "b=pretrained:quadratic")
  assert config.baselines == ("sgd", "adam") and config.task_kwargs == {"dim": 3}
  assert config.overwrite and (config.num_problems, config.seed) == (256, 2016)
  none = config_flags.parse(evaluate.EvaluateConfig, ["p", "--output_dir=o", "--baselines="])
  assert none.baselines == ()
  config = config_flags.parse(
    rank.RankConfig, ["prog", "--run=r1", "--run=r2", "--nocheckpoints", "--output_dir=out"]
  )
  assert config.run == ("r1", "r2") and not config.checkpoints
  assert (config.baseline, config.num_problems, config.seed, config.step) == ("adam", 64, 7, None)


def test_report_summary_names_and_experiment_texts():
  """The pieces every experiment's summary shares: headings, flag checks, tuning and verdicts."""
  report.check_names("experiments", ["a"], {"a": 1})
  with pytest.raises(ValueError, match=r"Unknown --experiments \['b'\]; choose from \['a'\]"):
    report.check_names("experiments", ["a", "b"], {"a": 1})
  header = report.summary_header("T", "x", ".")
  assert header == "# T\n\nWritten by `python -m experiments.x`."
  text = report.summary(header, {"a": {"v": 1}}, {"a": "A"}, lambda r: [str(r["v"])])
  assert text == f"{header}\n\n## a: A\n\n1\n"
  learned = report.summarize("lstm", "learned", [[1.0, 0.1], [1.0, 0.2], [1.0, 0.1]], None)
  adam = report.summarize("adam", "baseline", [[1.0, 0.5], [1.0, 0.6], [1.0, 0.55]], 0.1)
  results = {"optimizers": [learned, adam], "num_steps": 1}
  assert report.verdict_vs_best(results).startswith("lstm beats the best tuned baseline (adam")
  assert report.verdict_vs_each(results).startswith("lstm beats every tuned baseline at step 1")
  adam.update(tuning_scores={"0.1": 0.5, "0.2": 0.7})
  results["tuning"] = {"criterion": "c", "num_problems": 2, "seed": 3, "lr_stride": 1}
  assert (
    report.tuning_text(results) == "adam tuned by c on 2 separate problems (seed 3) over 2 rates"
  )
  assert (
    report.lr_cell(adam) == "0.1"
    and report.lr_cell({**adam, "tuning_scores": {}}) == "0.1 (not tuned)"
  )
