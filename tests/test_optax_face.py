"""as_optax inside optax.chain under jit, on a flax model; both call forms; NaN policy; errors."""

import chex
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
def saved():
  return learned_opt.pretrained("mnist_mlp")


def test_pretrained_trains_flax_model_in_chain_under_jit(saved):
  model = TinyMLP()
  x = jax.random.normal(jax.random.key(1), (32, 3))
  y = jnp.sin(x[:, :1])
  params = model.init(jax.random.key(2), x)
  loss_fn = lambda p: jnp.mean((model.apply(p, x) - y) ** 2)
  tx = optax.chain(optax.clip_by_global_norm(1.0), learned_opt.as_optax(saved))
  state = tx.init(params)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)  # a retrace on a later step fails the test
  def train_step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss

  first = float(loss_fn(params))
  for _ in range(100):  # the horizon it was trained for (slow early, fast late: docs/mnist.md)
    params, state, loss = train_step(params, state)
  assert float(loss_fn(params)) < 0.1 * first


def test_loaded_and_two_argument_forms_agree(saved):
  grads = {"x": jnp.array([0.3, -2.0, 1e-6])}
  forms = [
    learned_opt.as_optax(saved),
    learned_opt.as_optax(*saved),
    learned_opt.as_optax(saved.optimizer, saved.meta_params),
  ]
  updates = [tx.update(grads, tx.init(grads))[0]["x"] for tx in forms]
  assert float(jnp.max(jnp.abs(updates[0]))) > 0
  for other in updates[1:]:
    np.testing.assert_array_equal(other, updates[0])


def test_wrong_arguments_say_what_to_pass(saved):
  with pytest.raises(TypeError, match=r"without its weights phi; pass as_optax\(optimizer, meta"):
    learned_opt.as_optax(saved.optimizer)
  with pytest.raises(TypeError, match=r"saved at 'runs/q', pass as_optax\(learned_opt.load"):
    learned_opt.as_optax("runs/q")
  with pytest.raises(TypeError, match=r"pass as_optax\(saved\) alone"):
    learned_opt.as_optax(saved, saved.meta_params)
  with pytest.raises(TypeError, match=r"or \(optimizer, meta_params\), got tuple"):
    learned_opt.as_optax(tuple(saved))


def test_nan_policy(saved, backend):
  grads = {"x": jnp.array([1.0, jnp.nan, -1.0, jnp.inf, -jnp.inf])}
  propagate = learned_opt.as_optax(saved, backend=backend)
  updates, _ = propagate.update(grads, propagate.init(grads))
  # NaN and +-inf alike give NaN (a bounded LSTM read-out would make inf a small finite step).
  np.testing.assert_array_equal(np.isnan(updates["x"]), [False, True, False, True, True])
  zero = learned_opt.as_optax(saved, nan_policy="zero", backend=backend)
  updates, _ = zero.update(grads, zero.init(grads))
  clean, _ = zero.update({"x": jnp.array([1.0, 0.0, -1.0, 0.0, 0.0])}, zero.init(grads))
  np.testing.assert_array_equal(updates["x"], clean["x"])
  with pytest.raises(ValueError, match="nan_policy"):
    learned_opt.as_optax(saved, nan_policy="skip")


def test_wrong_state_is_a_clear_error(saved):
  tx = learned_opt.as_optax(saved)
  with pytest.raises(TypeError, match="init"):
    tx.update({"x": jnp.ones(2)}, optax.EmptyState())


@pytest.mark.parametrize(
  "grads, message",
  [
    ({"a": jnp.ones(4), "b": {"c": jnp.ones((2, 2))}}, r"gradient leaf \['a'\] has a shape"),
    ({"a": jnp.ones(3)}, r"no gradient for state leaf \['b'\]\['c'\]"),
    ({"a": jnp.ones(3), "b": {"d": jnp.ones((2, 2))}}, r"gradient leaf \['b'\]\['d'\] is not in"),
  ],
)
def test_gradients_unlike_the_params_name_the_leaf(saved, grads, message):
  tx = learned_opt.as_optax(saved)
  state = tx.init({"a": jnp.ones(3), "b": {"c": jnp.ones((2, 2))}})
  with pytest.raises(ValueError, match=message):
    tx.update(grads, state)
  with pytest.raises(ValueError, match=message):
    jax.jit(tx.update)(grads, state)
