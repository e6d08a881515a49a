"""NAG among the tuned baselines, and that it is Nesterov's method, not heavy-ball momentum."""

import jax.numpy as jnp
import numpy as np
import optax

from eval import baselines

_W = jnp.array([[2.0, 0.5, 0.0], [0.0, 1.0, -0.3], [0.4, 0.0, 1.5]])
_Y = jnp.array([1.0, -2.0, 0.5])


def _grad(theta):
  """Gradient of ||W theta - y||^2."""
  return 2.0 * _W.T @ (_W @ theta - _Y)


def _optax_iterates(tx, theta, steps):
  state = tx.init(theta)
  iterates = [theta]
  for _ in range(steps):
    updates, state = tx.update(_grad(theta), state, theta)
    theta = optax.apply_updates(theta, updates)
    iterates.append(theta)
  return np.stack(iterates)


def test_nag_is_tuned_with_the_others():
  assert "nag" in baselines.BASELINES
  assert list(baselines.BASELINES)[:2] == ["sgd", "nag"]


def test_nag_follows_sutskever_nesterov_at_the_lookahead_point():
  """Sutskever et al. (2013): v <- mu v - lr grad(theta + mu v), theta <- theta + v.

  optax keeps the look-ahead point phi = theta + mu v as its parameters; with theta_0 = phi_0
  (v_0 = 0) its iterates must equal theta_t + mu v_t at every step.
  """
  lr, mu = 0.05, 0.9
  theta, v = jnp.array([0.3, -1.0, 2.0]), jnp.zeros(3)
  lookahead = [theta + mu * v]
  for _ in range(4):
    v = mu * v - lr * _grad(theta + mu * v)
    theta = theta + v
    lookahead.append(theta + mu * v)
  nag = _optax_iterates(baselines.BASELINES["nag"](lr), lookahead[0], 4)
  np.testing.assert_allclose(nag, np.stack(lookahead), rtol=1e-5, atol=1e-6)
  heavy_ball = _optax_iterates(optax.sgd(lr, momentum=mu), lookahead[0], 4)
  assert np.max(np.abs(heavy_ball[2:] - nag[2:])) > 1e-2  # the test tells the two apart
