"""Shipped optimizers: found by name inside the package, loaded, and usable through optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from learned_opt import shipped


def test_mnist_optimizer_ships_and_loads_by_name():
  assert "mnist_mlp" in learned_opt.pretrained_names()
  saved = learned_opt.pretrained("mnist_mlp")
  config = dict(saved.optimizer.config)
  assert config["preprocess"] == "log_sign" and config["output_scale"] == 0.1
  assert config["hidden_size"] == 20 and config["num_layers"] == 2
  metadata = shipped.metadata("mnist_mlp")
  assert metadata["task"] == "mnist_mlp" and "command" in metadata
  template = saved.optimizer.init_meta_params(jax.random.key(0))
  assert jax.tree.structure(saved.meta_params) == jax.tree.structure(template)
  assert not all(
    np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(saved.meta_params), jax.tree.leaves(template), strict=True)
  ), "the shipped weights should be trained, not the seed-0 initialization"


def test_shipped_optimizer_lowers_a_small_mlp_loss():
  """The MNIST optimizer, through optax, trains a tiny sigmoid MLP on separable data."""
  tx = learned_opt.as_optax(learned_opt.pretrained("mnist_mlp"))
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.uniform(keys[0], (64, 16))
  labels = (x[:, 0] > x[:, 1]).astype(jnp.int32)
  params = {
    "w0": 0.1 * jax.random.normal(keys[1], (16, 8)),
    "w1": 0.1 * jax.random.normal(keys[2], (8, 2)),
  }

  def loss(p):
    logits = jax.nn.sigmoid(x @ p["w0"]) @ p["w1"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(p, state):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  state, first = tx.init(params), float(loss(params))
  for _ in range(40):
    params, state = step(params, state)
  assert float(loss(params)) < 0.9 * first


def test_unknown_name_lists_available():
  with pytest.raises(
    ValueError, match="No pretrained optimizer named 'nope'; available: .*mnist_mlp"
  ):
    learned_opt.pretrained("nope")


def test_lookup_is_generic_over_subdirectories(tmp_path, monkeypatch):
  optimizer = learned_opt.lstm_optimizer(hidden_size=3, num_layers=1)
  phi = optimizer.init_meta_params(jax.random.key(1))
  for name in ("quadratic", "another"):
    learned_opt.save(str(tmp_path / name), optimizer, phi, metadata={"task": name})
  (tmp_path / "not_an_optimizer").mkdir()
  monkeypatch.setattr(shipped, "_root", lambda: str(tmp_path))
  assert learned_opt.pretrained_names() == ("another", "quadratic")
  loaded = learned_opt.pretrained("quadratic")
  assert loaded.optimizer.config == optimizer.config
  np.testing.assert_array_equal(loaded.meta_params["out"]["w"], phi["out"]["w"])
  assert shipped.metadata("another") == {"task": "another"}
