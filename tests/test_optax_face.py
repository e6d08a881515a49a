"""as_optax inside optax.chain under jit, on a flax model; NaN policy; bad state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt


class TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.tanh(nn.Dense(8)(x)))


@pytest.fixture(scope="module")
def trained_quadratic_opt():
  """A quickly meta-trained LSTM (small, 150 meta-steps) shared by the tests in this module."""
  from tasks import quadratic
  from train import unroll

  task = quadratic(dim=6)
  opt = learned_opt.lstm_optimizer(hidden_size=10)
  phi = opt.init_meta_params(jax.random.key(0))
  meta = optax.adam(3e-3)
  meta_state = meta.init(phi)

  @jax.jit
  def step(phi, meta_state, key):
    inner = unroll.init_inner_batch(task, opt, phi, key, 16)
    grads = jax.grad(
      lambda p: unroll.meta_loss(p, inner, task=task, optimizer=opt, num_steps=10)[0]
    )(phi)
    updates, meta_state = meta.update(grads, meta_state)
    return optax.apply_updates(phi, updates), meta_state

  for i in range(150):
    phi, meta_state = step(phi, meta_state, jax.random.key(i))
  return opt, phi


def test_trains_flax_model_in_chain_under_jit(trained_quadratic_opt):
  opt, phi = trained_quadratic_opt
  model = TinyMLP()
  x = jax.random.normal(jax.random.key(1), (32, 3))
  y = jnp.sin(x[:, :1])
  params = model.init(jax.random.key(2), x)
  loss_fn = lambda p: jnp.mean((model.apply(p, x) - y) ** 2)
  tx = optax.chain(optax.clip_by_global_norm(1.0), learned_opt.as_optax(opt, phi))
  state = tx.init(params)

  @jax.jit
  def train_step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss

  first = float(loss_fn(params))
  for _ in range(50):
    params, state, loss = train_step(params, state)
  assert float(loss_fn(params)) < 0.7 * first
  assert train_step._cache_size() == 1


def test_nan_policy(trained_quadratic_opt):
  opt, phi = trained_quadratic_opt
  grads = {"x": jnp.array([1.0, jnp.nan, -1.0])}
  propagate = learned_opt.as_optax(opt, phi)
  updates, _ = propagate.update(grads, propagate.init(grads))
  assert bool(jnp.isnan(updates["x"][1]))
  zero = learned_opt.as_optax(opt, phi, nan_policy="zero")
  updates, _ = zero.update(grads, zero.init(grads))
  clean, _ = zero.update({"x": jnp.array([1.0, 0.0, -1.0])}, zero.init(grads))
  np.testing.assert_array_equal(updates["x"], clean["x"])
  with pytest.raises(ValueError, match="nan_policy"):
    learned_opt.as_optax(opt, phi, nan_policy="skip")


def test_wrong_state_is_a_clear_error(trained_quadratic_opt):
  tx = learned_opt.as_optax(*trained_quadratic_opt)
  with pytest.raises(TypeError, match="init"):
    tx.update({"x": jnp.ones(2)}, optax.EmptyState())
