"""The evaluation engine: tuning, observables, chunks and meshes, the one fingerprinted cache."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

import learned_opt
from eval import baselines, cache, engine, report, sharding, tuning
from eval import curves as curves_lib
from tasks import quadratic
from train import inner

RATES = (1e-3, 1e-2, 5e-2, 1e-1)


def spec(**changes) -> engine.Spec:
  settings = {
    "task": quadratic(dim=4),
    "problems": engine.Problems(5, seed=0),
    "num_steps": 6,
    "baselines": ("sgd",),
    "tuning": engine.Tuning(RATES),
  }
  return engine.Spec(**{**settings, **changes})


def test_tuning_picks_the_argmin_and_the_curves_are_that_rates_runs():
  (sgd,) = engine.run(spec(), log=lambda s: None)
  scores = sgd.record["tuning_scores"]
  assert len(scores) == len(RATES)
  assert sgd.learning_rate == RATES[int(np.argmin(list(scores.values())))]
  params, keys = inner.sample_problems(quadratic(dim=4), curves_lib.problem_key(0), 5)
  expected = inner.rollout_batch(
    quadratic(dim=4), optax.sgd(sgd.learning_rate), (), params, keys, 6
  )
  np.testing.assert_allclose(sgd.curves["loss"], expected, rtol=1e-5)
  assert sgd.curves["loss"].shape == (5, 7)


@pytest.mark.slow
def test_tuning_at_a_step_and_on_separate_problems():
  separate = engine.Tuning(RATES, problems=engine.Problems(3, seed=9), step=2)
  (sgd,) = engine.run(spec(tuning=separate), log=lambda s: None)
  task = quadratic(dim=4)
  tune = inner.sample_problems(task, curves_lib.problem_key(9), 3)
  losses = [inner.rollout_batch(task, optax.sgd(r), (), *tune, 6)[:, 2] for r in RATES]
  assert sgd.learning_rate == RATES[int(np.argmin(tuning.score(np.stack(losses))))]


def test_coarse_to_fine_finds_the_whole_grids_choice_with_fewer_rates():
  grid = 1e-6 * 2.0 ** np.arange(30)
  for best in (0, 7, 13, 29):
    scores = (np.arange(30) - best) ** 2 + 1.0
    scores[best + 3 :] = np.inf  # larger rates diverge, as on a real task
    calls = []

    def evaluate(rates, scores=scores, calls=calls):
      calls.append(len(rates))
      return scores[np.searchsorted(grid, rates)]

    whole, _ = tuning.coarse_to_fine(evaluate, grid, 1)
    calls.clear()
    coarse, swept = tuning.coarse_to_fine(evaluate, grid, 4)
    assert whole == coarse == best
    assert sum(calls) == len(swept) <= 8 + 6 and len(calls) == 2
    assert all(np.isinf(swept[i]) for i in swept if i >= best + 3)


@pytest.mark.slow
def test_observables_read_the_same_trajectory_with_one_curve_per_problem():
  task = quadratic(dim=4)
  double = curves_lib.Observable(
    "double", lambda d, s, k: 2 * task.loss(d, s.task_params, s.params, inner.minibatch_key(s))
  )
  opt = learned_opt.lstm_optimizer(hidden_size=4)
  saved = learned_opt.SavedOptimizer(opt, opt.init_meta_params(jax.random.key(0)))
  results = engine.run(
    spec(observables=(double,), learned={"lstm": saved}, baselines=("adam",)), log=lambda s: None
  )
  for r in results:
    assert r.curves["loss"].shape == r.curves["double"].shape == (5, 7)
    np.testing.assert_allclose(r.curves["double"], 2 * r.curves["loss"], rtol=1e-6)


@pytest.mark.slow
def test_chunks_and_meshes_give_the_one_device_curves():
  assert jax.device_count() == 8, "tests/conftest.py fakes 8 CPU devices"
  opt = learned_opt.lstm_optimizer(hidden_size=4, preprocess="log_sign")
  saved = learned_opt.SavedOptimizer(opt, opt.init_meta_params(jax.random.key(3)))
  one = sharding.problems_mesh(jax.devices()[:1])
  base = spec(
    learned={"lstm": saved},
    problems=engine.Problems(7, seed=1),
    tuning=engine.Tuning(RATES[1:3]),
    mesh=one,
  )
  want = engine.run(base, log=lambda s: None)
  for changes in ({"problem_batch": 3}, {"mesh": None, "problem_batch": 2}):
    got = engine.run(spec(**{**base.__dict__, **changes}), log=lambda s: None)
    for g, w in zip(got, want, strict=True):
      assert g.learning_rate == w.learning_rate
      np.testing.assert_allclose(g.curves["loss"], w.curves["loss"], rtol=1e-6, err_msg=g.name)


@pytest.mark.slow
def test_cache_hits_give_identical_curves_and_a_changed_setting_recomputes(tmp_path):
  logs = []
  first = engine.run(spec(cache_dir=str(tmp_path)), log=logs.append)
  again = engine.run(spec(cache_dir=str(tmp_path)), log=logs.append)
  assert sum("reused" in s for s in logs) == 1
  np.testing.assert_array_equal(again[0].curves["loss"], first[0].curves["loss"])
  assert again[0].learning_rate == first[0].learning_rate
  changes = {
    "seed": {"problems": engine.Problems(5, seed=1)},
    "task kwargs": {"task": quadratic(dim=5)},
    "grid": {"tuning": engine.Tuning(RATES[:3])},
    "stride": {"tuning": engine.Tuning(RATES, stride=2)},
    "steps": {"num_steps": 5},
  }
  for what, change in changes.items():
    logs.clear()
    engine.run(spec(cache_dir=str(tmp_path), **change), log=logs.append)
    assert not any("reused" in s for s in logs), what
  logs.clear()
  engine.run(spec(cache_dir=str(tmp_path), reuse=False), log=logs.append)
  assert not any("reused" in s for s in logs)  # written, not read


def test_a_changed_data_set_changes_the_fingerprint():
  task = quadratic(dim=4)
  a = cache.task_fingerprint(task.config, {"x": np.zeros(3)})
  b = cache.task_fingerprint(task.config, {"x": np.ones(3)})
  c = cache.task_fingerprint({**task.config, "mnist_dir": "/elsewhere"}, {"x": np.zeros(3)})
  assert a != b and a == c  # where the data lies is not what it is


@pytest.mark.slow
def test_reuse_from_gathers_the_best_run_of_a_baseline_on_the_same_problems(tmp_path):
  runs = {"a": RATES[:1], "b": RATES[1:2], "c": RATES[2:3]}
  finals = {}
  for run, rates in runs.items():
    (r,) = engine.run(spec(tuning=engine.Tuning(rates), cache_dir=str(tmp_path / run)), log=print)
    finals[r.learning_rate] = np.mean(r.curves["loss"][:, -1])
  other = spec(problems=engine.Problems(5, seed=4), cache_dir=str(tmp_path / "d"))
  engine.run(other, log=print)  # other problems: never gathered
  dirs = [str(tmp_path / d) for d in "abcd"]
  (got,) = engine.run(spec(reuse_from=dirs), log=print)
  assert got.learning_rate == min(finals, key=finals.get)
  assert got.record["chosen_from"] == sorted(finals)


def test_the_verdict_pairs_problems_and_counts_divergence():
  hard = np.linspace(0.2, 0.6, 32)
  wobble = 0.002 * np.cos(np.arange(32))
  assert report.verdict(hard - 0.01 + wobble, hard).outcome == "beats"
  assert report.verdict(hard + 0.01 + wobble, hard).outcome == "loses"
  assert report.verdict(hard + 10 * wobble, hard).outcome == "ties"
  diverged = np.where(np.arange(32) < 2, np.nan, hard - 0.01)
  v = report.verdict(diverged, hard)
  assert v.outcome == "loses" and v.both == 30 and v.wins == 30


def test_paired_standard_error_is_that_of_the_differences():
  a, b = np.array([1.0, 2.0, 4.0]), np.array([0.5, 2.5, 3.0])
  mean, stderr = report.paired(a, b)
  assert mean == pytest.approx(np.mean(a - b))
  assert stderr == pytest.approx(np.std(a - b, ddof=1) / np.sqrt(3))


def test_unknown_baselines_are_refused():
  with pytest.raises(ValueError, match="Unknown baselines"):
    engine.run(spec(baselines=("lbfgs",)))
  assert "sgd" in baselines.BASELINES


def test_the_inner_loops_observe_hook_reads_every_theta_t_without_changing_the_losses():
  """``train.inner.run``'s hook: the states t = 0..T it reads are those the losses are of."""
  task = quadratic(dim=3)
  params, keys = inner.sample_problems(task, jax.random.key(5), 1)
  problem = jax.tree.map(lambda x: x[0], params)
  observe = lambda s: {"step": s.step, "theta": s.params["theta"]}
  plain = jax.jit(lambda: inner.rollout(task, optax.sgd(0.05), (), problem, keys[0], 4))()
  losses, seen = jax.jit(
    lambda: inner.rollout(task, optax.sgd(0.05), (), problem, keys[0], 4, observe)
  )()
  np.testing.assert_array_equal(losses, plain)
  np.testing.assert_array_equal(seen["step"], np.arange(5))
  assert seen["theta"].shape == (5, 3)
  w, y = problem["w"], problem["y"]
  at = [float(np.sum((w @ theta - y) ** 2)) for theta in seen["theta"]]
  np.testing.assert_allclose(at, losses, rtol=1e-5)  # quadratic: the loss needs no minibatch


def test_a_learned_optimizers_backend_is_part_of_its_cache_key():
  """The backend is no config setting (``learned_opt.backend``), so the key names it apart."""
  opt = learned_opt.lstm_optimizer(hidden_size=4)
  xla = learned_opt.with_backend(opt, "xla")
  assert xla.config == opt.config
  keys = {cache.fingerprint(engine._optimizer_key(o._replace(backend=b))) for o in (opt, xla)
          for b in ("auto", "xla", "cpu_kernels")}  # fmt: skip
  assert len(keys) == 3


def test_verdict_needs_two_finite_problems():
  assert report.verdict([1.0], [1.0000001]).outcome == "ties"
  assert report.verdict([1.0, 2.0], [np.inf, 3.0]).outcome == "ties"  # one pair left
  assert report.verdict([1.0, 2.0, 3.0], [1.5, 2.6, 3.4]).outcome == "beats"
  assert report.verdict([np.nan, 2.0], [1.0, 3.0]).outcome == "loses"  # diverged on more


@pytest.mark.parametrize(
  "change, message",
  [
    ({"num_steps": 0}, "num_steps must be positive"),
    ({"problems": engine.Problems(0, seed=1)}, "problems need a positive count"),
    ({"problem_batch": -1}, "problem_batch must be positive"),
    ({"tuning": engine.Tuning(step=11)}, "not a step of a 10-step run"),
    ({"baselines": ("lbfgs",)}, "Unknown baselines"),
  ],
)
def test_a_bad_spec_is_named_before_anything_runs(change, message):
  spec = engine.Spec(quadratic(dim=4), engine.Problems(3, seed=1), 10, baselines=("sgd",))
  with pytest.raises(ValueError, match=message):
    engine.check(dataclasses.replace(spec, **change))


def test_each_optimizer_announces_its_work_before_it_runs():
  logs = []
  engine.run(spec(baselines=("sgd", "adam")), log=logs.append)
  assert (
    logs[0]
    == "sgd (1 of 2): 5 problems x 6 steps, tuning over 4 learning rates on the test problems ..."
  )
  assert logs[1].startswith("sgd: lr ") and logs[2].startswith("adam (2 of 2): ")
