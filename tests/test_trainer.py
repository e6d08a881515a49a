"""The meta-training job end to end: outputs, determinism, learning, non-finite steps."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt
from tasks import quadratic
from tasks.base import TaskFamily
from train import trainer, unroll
from train.config import MetaTrainConfig


def tiny_config(output_dir, **overrides):
  settings = dict(
    output_dir=str(output_dir),
    task_kwargs={"dim": 4},
    hidden_size=6,
    unroll=5,
    horizon=10,
    num_problems=4,
    num_epochs=2,
    steps_per_epoch=4,
    valid_problems=8,
    log_every=2,
    checkpoint_every=3,
    meta_lr=1e-2,
  )
  settings.update(overrides)
  return MetaTrainConfig(**settings)


def leaves_equal(a, b):
  return all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def test_outputs_and_same_seed_same_result(tmp_path):
  state_a, host_a = trainer.train(tiny_config(tmp_path / "a"), log=lambda s: None)
  state_b, host_b = trainer.train(tiny_config(tmp_path / "b"), log=lambda s: None)
  assert leaves_equal(state_a.meta_params, state_b.meta_params)
  assert host_a["valid_history"] == host_b["valid_history"]
  assert int(state_a.step) == 8 and len(host_a["valid_history"]) == 2
  run = tmp_path / "a"
  saved = json.load(open(run / "config.json"))
  assert saved["task_kwargs"] == {"dim": 4}
  records = [json.loads(line) for line in open(run / "metrics.jsonl")]
  assert [r["epoch"] for r in records if "epoch" in r] == [1, 2]
  assert all(np.isfinite(r["meta_loss"]) for r in records if "meta_loss" in r)
  # The best phi is what learned_opt.load(output_dir) returns.
  _, phi = learned_opt.load(str(run))
  assert leaves_equal(phi, state_a.best_meta_params)
  assert sorted(os.listdir(run / "checkpoints")) == [
    "step_00000004",
    "step_00000006",
    "step_00000008",
  ]
  other = trainer.train(tiny_config(tmp_path / "c", seed=1), log=lambda s: None)[0]
  assert not leaves_equal(other.meta_params, state_a.meta_params)


def test_resume_refuses_a_different_config(tmp_path):
  trainer.train(tiny_config(tmp_path), log=lambda s: None)
  with pytest.raises(ValueError, match="different config"):
    trainer.train(tiny_config(tmp_path, meta_lr=0.5), log=lambda s: None)


def test_resume_accepts_a_config_saved_before_a_field_existed(tmp_path):
  """A run started before a field was added used that field's default: it resumes."""
  config = tiny_config(tmp_path)
  trainer.train(config, log=lambda s: None)
  path = tmp_path / "config.json"
  saved = json.load(open(path))
  del saved["meta_lr_schedule"], saved["meta_lr_final_ratio"]
  path.write_text(json.dumps(saved))
  logs = []
  state, _ = trainer.train(config, log=logs.append)
  assert int(state.step) == 8 and "Resumed from meta-step 8" in logs[0]
  with pytest.raises(ValueError, match="different config"):
    trainer.train(tiny_config(tmp_path, meta_lr_schedule="cosine"), log=lambda s: None)


def test_cosine_meta_learning_rate_decays_to_its_final_ratio(tmp_path):
  config = tiny_config(tmp_path, meta_lr_schedule="cosine", meta_lr_final_ratio=0.1)
  schedule = trainer.meta_learning_rate(config)
  assert schedule(0) == pytest.approx(1e-2)
  assert schedule(config.total_steps // 2) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))
  assert schedule(config.total_steps) == pytest.approx(1e-3)
  assert trainer.meta_learning_rate(tiny_config(tmp_path)) == 1e-2
  # Adam on a constant gradient steps by exactly lr_k per entry: the schedule is what is applied.
  meta_opt = trainer.meta_optimizer(config)
  grads = {"w": jnp.array([2.0, -0.5])}
  opt_state = meta_opt.init(grads)
  for k in range(config.total_steps):
    updates, opt_state = meta_opt.update(grads, opt_state)
    np.testing.assert_allclose(updates["w"], [-schedule(k), schedule(k)], rtol=1e-4)


def test_learned_optimizer_learns(tmp_path):
  """A short real meta-training run must beat its own untrained starting point by far."""
  config = tiny_config(
    tmp_path,
    task_kwargs={"dim": 10},
    hidden_size=20,
    unroll=20,
    horizon=100,
    num_problems=32,
    num_epochs=1,
    steps_per_epoch=150,
    valid_problems=64,
    meta_lr=3e-3,
    log_every=50,
    checkpoint_every=1000,
  )
  task, opt = trainer.build(config)
  validate = jax.jit(trainer.make_validate(config, task, opt))
  start = trainer.init_state(config, task, opt).meta_params
  before = float(jnp.mean(validate(start)[:, -1]))
  _, host = trainer.train(config, log=lambda s: None)
  assert host["best_valid"] < before / 5, (before, host["best_valid"])


def tagged_quadratic(poisoned_tags=()):
  """A quadratic whose loss is NaN on problems whose random tag is in ``poisoned_tags``."""
  base = quadratic(dim=4)
  poisoned = jnp.asarray(poisoned_tags, jnp.float32).reshape(-1)

  def sample(key):
    return {**base.sample(key), "tag": jax.random.uniform(jax.random.fold_in(key, 99))}

  def loss(task_params, params, key):
    value = base.loss(task_params, params, key)
    bad = jnp.any(task_params["tag"] == poisoned)
    return jnp.where(bad, jnp.nan, value)

  return TaskFamily("quadratic", sample, base.init, loss, base.config)


def test_nan_at_a_chosen_meta_step_is_skipped(tmp_path):
  config = tiny_config(tmp_path, num_epochs=3)
  chosen = 4  # problems are resampled every horizon / unroll = 2 meta-steps
  clean = tagged_quadratic()
  _, opt = trainer.build(config)
  phi = opt.init_meta_params(jax.random.key(0))
  drawn = unroll.init_inner_batch(clean, opt, phi, trainer.problem_key(config, chosen), 4)
  messages = []
  state, host = trainer.train(
    config, task=tagged_quadratic(drawn.task_params["tag"][:1]), log=messages.append
  )
  assert host["skipped"] == 1
  assert any(f"Non-finite meta-step {chosen} " in m for m in messages)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.meta_params))
  _, saved = learned_opt.load(config.output_dir)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(saved))


def test_always_nan_stops_with_a_message(tmp_path):
  always = TaskFamily(
    "quadratic",
    quadratic(dim=4).sample,
    quadratic(dim=4).init,
    lambda p, theta, key: jnp.nan * jnp.sum(theta["theta"]),
    {"name": "quadratic"},
  )
  config = tiny_config(tmp_path, max_consecutive_skips=3)
  with pytest.raises(
    trainer.NonFiniteError, match=r"3 consecutive non-finite .* step 2 on task quadratic"
  ):
    trainer.train(config, task=always, log=lambda s: None)
  assert not os.path.exists(os.path.join(config.output_dir, "optimizer.json"))


def test_early_stopping_is_remembered(tmp_path):
  config = tiny_config(tmp_path, num_epochs=6, patience=1, meta_lr=5.0, meta_grad_clip=0.0)
  messages = []
  _, host = trainer.train(config, log=messages.append)
  if not host["early_stopped"]:
    pytest.fail(f"expected early stopping with a huge meta_lr; history {host['valid_history']}")
  assert len(host["valid_history"]) < 6
  again = []
  trainer.train(config, log=again.append)
  assert any("already stopped early" in m for m in again)
