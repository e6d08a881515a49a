"""LSTM+GAC (section 2.2): global averaging cells share information across all leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt
from learned_opt import lstm

PARAMS = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((5,))}


def _grads(key):
  keys = jax.random.split(key, 2)
  return {"a": jax.random.normal(keys[0], (3, 4)), "b": jax.random.normal(keys[1], (5,))}


def _updates_after(opt, phi, grads_sequence):
  state = opt.init_state(phi, PARAMS)
  update = jax.jit(opt.update)
  for grads in grads_sequence:
    updates, state = update(phi, grads, state)
  return updates


def test_global_average_is_the_mean_over_every_coordinate_of_every_leaf():
  values = [
    jax.random.normal(jax.random.key(0), (3, 4, 6)),
    jax.random.normal(jax.random.key(1), (5, 6)),
  ]
  out = lstm.global_average(values, num_cells=2)
  flat = jnp.concatenate([v.reshape(-1, 6) for v in values])
  expected = jnp.mean(flat[:, -2:], axis=0)  # 17 coordinates weigh equally, not 2 leaf means.
  for o, v in zip(out, values, strict=True):
    np.testing.assert_allclose(
      o[..., -2:].reshape(-1, 2), jnp.broadcast_to(expected, (o[..., 0].size, 2)), rtol=1e-6
    )
    np.testing.assert_array_equal(o[..., :-2], v[..., :-2])  # Local cells untouched.


@pytest.mark.parametrize("global_cells", [0, 5])
def test_one_leaf_gradient_moves_the_other_leaf_update_only_with_gac(global_cells):
  opt = learned_opt.lstm_optimizer(global_cells=global_cells)
  phi = opt.init_meta_params(jax.random.key(0))
  grads = [_grads(jax.random.key(t)) for t in range(3)]
  changed = [dict(g) for g in grads]
  changed[-1]["b"] = grads[-1]["b"] + 3.0
  base = _updates_after(opt, phi, grads)
  moved = _updates_after(opt, phi, changed)
  difference = float(jnp.max(jnp.abs(base["a"] - moved["a"])))
  if global_cells:
    assert difference > 1e-6
  else:
    assert difference == 0.0  # Purely coordinatewise: leaf "a" never sees leaf "b".
  assert float(jnp.max(jnp.abs(base["b"] - moved["b"]))) > 1e-6


def test_lstm_gac_config_round_trips_through_the_training_config():
  from train.config import MetaTrainConfig

  given = MetaTrainConfig(output_dir="unused", optimizer="lstm_gac").optimizer_config()
  config = dict(learned_opt.build(given).config)
  assert config["kind"] == "lstm" and config["global_cells"] == 5
  assert "read_heads" not in config  # NTM settings do not leak into the LSTM's config.
  assert learned_opt.build(config).config == config
