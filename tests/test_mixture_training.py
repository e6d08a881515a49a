"""Meta-training over a task mixture through the trainer: the bucket schedule, per-bucket
problems in the state, validation over buckets, resume and a mesh. Two tiny buckets on small
synthetic arrays (``tests/test_mixture.py``'s), never files."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from test_mixture import synthetic_sources

import learned_opt
from tasks import mixture
from train import distributed, memory, meta_step, trainer
from train.config import MetaTrainConfig


@pytest.fixture(scope="module")
def tiny_mixture():
  return mixture.mixture("tiny", sources=synthetic_sources(num=256))


def mixture_config(output_dir, **overrides):
  settings = dict(
    output_dir=str(output_dir),
    task="mixture",
    task_kwargs={"preset": "tiny"},
    optimizer="per_param_mlp",
    optimizer_kwargs={"hidden_size": 8},
    unroll=5,
    horizon=10,
    num_problems=4,
    meta_lr=3e-2,
    meta_objective="log_sum",
    num_epochs=2,
    steps_per_epoch=10,
    valid_problems=8,
    log_every=5,
    checkpoint_every=5,
    keep_checkpoints=10,
  )
  return MetaTrainConfig(**{**settings, **overrides})


def _array(x) -> np.ndarray:
  is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  return np.asarray(jax.random.key_data(x) if is_key else x)


def leaves_equal(a, b):
  return all(
    np.array_equal(_array(x), _array(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


@pytest.fixture(scope="module")
def finished(tiny_mixture, tmp_path_factory):
  """One finished tiny-mixture run: ``(config, state, progress, log lines)``."""
  config = mixture_config(tmp_path_factory.mktemp("mixture") / "run")
  lines = []
  state, progress = trainer.train(config, task=tiny_mixture, log=lines.append)
  return config, state, progress, lines


def test_bucket_schedule_is_a_function_of_seed_and_step(tiny_mixture):
  schedule = [mixture.bucket_index(tiny_mixture, 0, n) for n in range(40)]
  rebuilt = mixture.mixture("tiny", sources=synthetic_sources(num=16))  # other data, same buckets
  assert schedule == [mixture.bucket_index(rebuilt, 0, n) for n in reversed(range(40))][::-1]
  assert set(schedule) == {0, 1}
  assert schedule != [mixture.bucket_index(tiny_mixture, 1, n) for n in range(40)]


def test_a_mixture_state_holds_each_buckets_problems(tiny_mixture, tmp_path):
  config = mixture_config(tmp_path)
  optimizer = learned_opt.build(config.optimizer_config())
  state = jax.eval_shape(lambda: meta_step.init_state(config, tiny_mixture, optimizer))
  assert isinstance(state.inner, tuple) and len(state.inner) == 2
  quadratic, mlp = state.inner
  assert quadratic.params["theta"].shape == (4, 4)  # (problems,) + the quadratic's theta
  assert mlp.step.shape == (4,)
  with pytest.raises(ValueError, match="pass bucket=INDEX"):
    meta_step.make_train_step(config, tiny_mixture, optimizer)


def test_validation_scores_each_bucket_by_final_over_initial_loss():
  curves = {"a": np.array([[10.0, 5.0], [20.0, 5.0]]), "b": np.array([[2.0, 1.0], [2.0, np.nan]])}
  diverged, score, scores = trainer.validation_result(curves)
  assert diverged == 1 and scores == {"a": 0.375, "b": 0.5}
  assert score == pytest.approx(0.4375)
  assert trainer.validation_result(np.array([[3.0, 1.0], [3.0, 2.0]])) == (0, 1.5, None)


def test_the_memory_check_takes_the_largest_bucket(tiny_mixture, tmp_path):
  config = mixture_config(tmp_path)
  optimizer = learned_opt.build(config.optimizer_config())
  each = [memory.estimate(config, task, optimizer) for task in tiny_mixture.buckets]
  whole = memory.estimate(config, tiny_mixture, optimizer)
  assert whole.residual_bytes == max(m.residual_bytes for m in each)
  assert whole.data_bytes == sum(m.data_bytes for m in each)
  assert whole.total_bytes >= max(m.total_bytes for m in each)


def initial_score(config, mix):
  """The validation score of phi's random init, as ``trainer`` computes an epoch's."""
  optimizer = learned_opt.build(config.optimizer_config())
  phi = meta_step.init_state(config, mix, optimizer).meta_params
  curves = {}
  for b, task in enumerate(mix.buckets):
    problems = meta_step.sample_valid_problems(config, task, bucket=b)
    curves[task.name] = meta_step.make_validate(config, task, optimizer)(phi, task.data, *problems)
  return trainer.validation_result(curves)[1]


@pytest.mark.slow  # two bucket compiles, 20 meta-steps, two validations
def test_a_mixture_run_trains_and_records_every_bucket(tiny_mixture, finished):
  config, state, progress, lines = finished
  assert int(state.step) == 20 and progress.diverged_history == (0, 0)
  assert progress.best_valid < initial_score(config, tiny_mixture)  # validation improves
  names = set(tiny_mixture.names)
  compiled = [line for line in lines if line.startswith("compiled")]
  assert len(compiled) == 2  # one compile per bucket
  assert any("bucket quadratic_4" in line for line in lines if line.startswith("step"))
  records = [json.loads(line) for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
  steps = [r for r in records if "meta_loss" in r]
  assert steps and {r["bucket"] for r in steps} <= names
  drawn = [mixture.bucket_index(tiny_mixture, 0, r["step"] - 1) for r in steps]
  assert [r["bucket"] for r in steps] == [tiny_mixture.names[b] for b in drawn]
  epochs = [r for r in records if "epoch" in r]
  assert [set(r["valid_buckets"]) for r in epochs] == [names, names]
  for r in epochs:
    assert r["valid_final_loss"] == pytest.approx(np.mean(list(r["valid_buckets"].values())))
  saved = learned_opt.load(config.output_dir)
  assert leaves_equal(saved.meta_params, state.best_meta_params)
  with open(os.path.join(config.output_dir, "optimizer.json")) as f:
    assert set(json.load(f)["metadata"]["valid_buckets"]) == names


class Killed(Exception):
  """Stands for SIGKILL: the job stops between meta-steps, wherever it is."""


@pytest.mark.slow  # two more runs of a few meta-steps
def test_a_mixture_run_killed_between_meta_steps_resumes_bit_exact(
  tiny_mixture, finished, tmp_path
):
  reference, state, progress, _ = finished
  resumed = mixture_config(tmp_path / "resumed")

  def kill_at_step_15(line):  # logged before step 15's checkpoint: 11 to 15 are replayed
    if line.startswith("step 15/"):
      raise Killed

  with pytest.raises(Killed):
    trainer.train(resumed, task=tiny_mixture, log=kill_at_step_15)
  lines = []
  state_b, progress_b = trainer.train(resumed, task=tiny_mixture, log=lines.append)
  assert "Resumed from meta-step 10" in lines[0]
  assert leaves_equal(state, state_b)  # phi, Adam, every bucket's problems in flight
  assert progress_b.valid_history == progress.valid_history
  for step in (15, 20):
    paths = [os.path.join(c.output_dir, "checkpoints", f"step_{step:08d}", "state.msgpack")
             for c in (reference, resumed)]  # fmt: skip
    assert open(paths[0], "rb").read() == open(paths[1], "rb").read()


@pytest.mark.slow  # a mesh of 2 devices: two bucket compiles and 20 meta-steps
def test_a_mixture_run_on_two_devices_matches_one(tiny_mixture, finished, tmp_path):
  config, one, one_progress, _ = finished
  mesh = distributed.global_mesh(jax.devices()[:2])
  two_config = dataclasses.replace(config, output_dir=str(tmp_path / "two"))
  two, progress = trainer.train(two_config, task=tiny_mixture, log=lambda s: None, mesh=mesh)
  assert progress.diverged_history == one_progress.diverged_history
  # Two devices reduce in another order; 20 meta-Adam steps amplify float32 rounding to ~3e-4
  # relative in phi (measured with the zero-initialized read-out) and ~2e-3 in validation.
  np.testing.assert_allclose(progress.valid_history, one_progress.valid_history, rtol=5e-3)
  for a, b in zip(jax.tree.leaves(one.meta_params), jax.tree.leaves(two.meta_params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
