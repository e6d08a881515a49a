"""Separate optimizers (and phi) per parameter group, as in the paper's CIFAR-10 run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt
from learned_opt import parameter_groups


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


@pytest.fixture(scope="module")
def cnn_params():
  return SmallCNN().init(jax.random.key(0), jnp.ones((1, 6, 6, 2)))


def test_conv_fc_labels(cnn_params):
  labels = {
    jax.tree_util.keystr(path): parameter_groups.conv_fc(path, leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(cnn_params)
  }
  assert labels == {
    "['params']['Conv_0']['bias']": "conv",
    "['params']['Conv_0']['kernel']": "conv",
    "['params']['Dense_0']['bias']": "fc",
    "['params']['Dense_0']['kernel']": "fc",
  }


def test_each_group_uses_its_own_phi(cnn_params):
  opt = learned_opt.partition(
    {
      "conv": learned_opt.lstm_optimizer(hidden_size=4),
      "fc": learned_opt.lstm_optimizer(hidden_size=6),
    }
  )
  phi = opt.init_meta_params(jax.random.key(1))
  assert phi["conv"]["layers"][0]["w"].shape[1] == 16 and phi["fc"]["layers"][0]["w"].shape[1] == 24
  # Silence the fc optimizer's read-out: fc updates vanish, conv updates do not.
  phi["fc"]["out"] = jax.tree.map(jnp.zeros_like, phi["fc"]["out"])
  grads = jax.tree.map(jnp.ones_like, cnn_params)
  tx = learned_opt.as_optax(opt, phi)
  updates, _ = jax.jit(tx.update)(grads, tx.init(cnn_params))
  assert float(jnp.max(jnp.abs(updates["params"]["Dense_0"]["kernel"]))) == 0.0
  assert float(jnp.max(jnp.abs(updates["params"]["Conv_0"]["kernel"]))) > 0.0
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(cnn_params), strict=True):
    assert u.shape == p.shape


def test_round_trip_and_missing_group(cnn_params, tmp_path):
  opt = learned_opt.partition(
    {"conv": learned_opt.lstm_optimizer(4), "fc": learned_opt.lstm_optimizer(4)}
  )
  phi = opt.init_meta_params(jax.random.key(2))
  learned_opt.save(str(tmp_path), opt, phi)
  loaded, loaded_phi = learned_opt.load(str(tmp_path))
  assert loaded.config == opt.config
  for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(loaded_phi), strict=True):
    np.testing.assert_array_equal(a, b)
  only_fc = learned_opt.partition({"fc": learned_opt.lstm_optimizer(4)})
  with pytest.raises(ValueError, match=r"Conv_0.*label 'conv'.*only has optimizers for \('fc',\)"):
    only_fc.init_state(only_fc.init_meta_params(jax.random.key(0)), cnn_params)


def test_global_averaging_stays_within_a_group():
  """GAC couples the coordinates of a group, never those of another group (section 3.3)."""
  opt = learned_opt.partition(
    {
      "conv": learned_opt.lstm_optimizer(hidden_size=4, global_cells=2),
      "fc": learned_opt.lstm_optimizer(hidden_size=4, global_cells=2),
    }
  )
  phi = opt.init_meta_params(jax.random.key(3))
  grads = {"conv": jnp.array([0.5, -1.0, 2.0]), "fc": jnp.array([1.0, 0.3])}
  changed = {**grads, "conv": grads["conv"].at[0].mul(-50.0)}

  def two_steps(g):
    _, s = opt.update(phi, g, opt.init_state(phi, g))
    return opt.update(phi, g, s)[0]

  base, moved = two_steps(grads), two_steps(changed)
  assert float(jnp.max(jnp.abs(base["conv"][1:] - moved["conv"][1:]))) > 1e-6
  np.testing.assert_array_equal(base["fc"], moved["fc"])
