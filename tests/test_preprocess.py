"""Appendix A preprocessing, both branches, at 0 and at extreme values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_opt import preprocess


def reference(g, p):
  """The formula of Appendix A, written directly in numpy."""
  if abs(g) >= np.exp(-p):
    return np.log(abs(g)) / p, np.sign(g)
  return -1.0, np.exp(p) * g


@pytest.mark.parametrize("g", [3.0, -2.5, 1e-3, -1e-4, np.exp(-10.0), 1e-5, -4e-6, 0.0])
def test_log_sign_matches_formula(g):
  got = np.asarray(preprocess.log_sign(jnp.float32(g), p=10.0))
  np.testing.assert_allclose(got, reference(np.float32(g), 10.0), rtol=1e-5, atol=1e-6)


def test_log_sign_branches_meet_p():
  # Just above the threshold: big branch; just below: small branch with e^p g close to 1.
  p = 5.0
  above, below = np.exp(-p) * 1.01, np.exp(-p) * 0.99
  np.testing.assert_allclose(preprocess.log_sign(jnp.float32(above), p), [-0.998, 1.0], atol=1e-3)
  np.testing.assert_allclose(preprocess.log_sign(jnp.float32(below), p), [-1.0, 0.99], atol=1e-3)


def test_log_sign_shape_and_finite_everywhere():
  g = jnp.array([[0.0, 1e-30, -1e-30], [1e30, -1e30, jnp.inf]], jnp.float32)
  out = preprocess.log_sign(jnp.concatenate([g, -g]), 10.0)
  assert out.shape == (4, 3, 2)
  assert bool(jnp.all(jnp.isfinite(out)))


def test_log_sign_gradient_is_finite_at_zero():
  grad = jax.grad(lambda g: jnp.sum(preprocess.log_sign(g, 10.0)))(jnp.zeros(3))
  np.testing.assert_allclose(grad, np.exp(10.0) * np.ones(3), rtol=1e-6)


def test_scale_and_identity():
  g = jnp.array([1.0, -2.0])
  np.testing.assert_allclose(preprocess.scale(g, 0.5), [[0.5], [-1.0]])
  np.testing.assert_allclose(preprocess.identity(g), [[1.0], [-2.0]])


def test_unknown_preprocessing_names_choices():
  with pytest.raises(ValueError, match="log_sign"):
    preprocess.make("logsign")
  with pytest.raises(ValueError, match="p > 0"):
    preprocess.make("log_sign", p=0.0)
