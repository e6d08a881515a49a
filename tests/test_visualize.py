"""Update traces (section 4): consistent with the optimizers they trace."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from eval import visualize
from tasks import quadratic
from train import inner


@pytest.mark.slow
def test_traces_agree_with_the_optimizers(tmp_path):
  task = quadratic(dim=3)
  opt = learned_opt.lstm_optimizer(hidden_size=5)
  lstm = learned_opt.as_optax(opt, opt.init_meta_params(jax.random.key(0)))
  optimizers = {"LSTM": lstm, "SGD": optax.sgd(0.05), "ADAM": optax.adam(0.1)}
  params, keys = inner.sample_problems(task, jax.random.key(1), 1)
  problem = jax.tree.map(lambda x: x[0], params)
  grid = jnp.linspace(-3.0, 3.0, 7)
  trace = lambda p, k: visualize.trace_updates(task, optimizers, "SGD", (), p, k, 4, 1, grid)
  traces = jax.jit(trace)(problem, keys[0])
  # SGD's response is -lr * g at every step, and its proposed update is -lr * the gradient.
  np.testing.assert_allclose(traces.response["SGD"], -0.05 * np.tile(grid, (4, 1)), rtol=1e-6)
  np.testing.assert_allclose(traces.proposed["SGD"], -0.05 * traces.gradient, rtol=1e-6)
  # The followed trajectory is SGD's: gradients match a plain SGD run on the same problem.
  theta = task.init((), problem, jax.random.split(keys[0])[0])["theta"]
  for t in range(4):
    g = 2 * problem["w"].T @ (problem["w"] @ theta - problem["y"])
    np.testing.assert_allclose(traces.gradient[t], g[1], rtol=1e-5)
    theta = theta - 0.05 * g
  # Adam's first update is -lr * sign(g) (bias-corrected moments), whatever g's size.
  np.testing.assert_allclose(traces.response["ADAM"][0], -0.1 * np.sign(grid), atol=1e-6)
  assert traces.response["LSTM"].shape == (4, 7)
  visualize.plot_traces(traces, str(tmp_path / "u.png"))
  assert (tmp_path / "u.png").stat().st_size > 0
