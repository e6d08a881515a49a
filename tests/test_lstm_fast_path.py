"""The LSTM optimizer's fast update (rows, one tanh pass, vmap folded) equals a plain reference.

The reference below is the paper's cell written for one coordinate and vmapped over all of them,
as ``learned_opt/lstm.py`` computed it before it was made fast; the shipped optimizers were
trained with that. Every test runs on both backends (the ``backend`` fixture, conftest.py).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt
from learned_opt import lstm, lstm_rows

RTOL, ATOL = 1e-5, 1e-6
SMALL = {"hidden_size": 6, "global_cells": 2}  # two layers, as in the paper, but 6 units

TREES = {
  "multi_leaf": {"w": jnp.ones((3, 4)), "b": jnp.zeros((5,)), "nested": [jnp.ones((2, 1, 2))]},
  "scalar": jnp.array(0.5),
  "empty": {},
  "bf16": {"bf16": jnp.ones((3,), jnp.bfloat16), "f32": jnp.ones((2,), jnp.float32)},
}


def reference_cell(layer, x, h, c):
  """The paper's LSTM cell for ONE coordinate: x (in,), h and c (hidden,)."""
  z = jnp.concatenate([x, h]) @ layer["w"] + layer["b"]
  i, f, g, o = jnp.split(z, 4)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


def reference_preprocess(g, preprocess, p=10.0):
  """(N,) gradients -> (N, features): identity, or Appendix A's log/sign pair."""
  if preprocess == "none":
    return g[:, None]
  big = jnp.abs(g) >= jnp.exp(-p)
  first = jnp.where(big, jnp.log(jnp.where(big, jnp.abs(g), 1.0)) / p, -1.0)
  second = jnp.where(big, jnp.sign(g), jnp.exp(p) * g)
  return jnp.stack([first, second], axis=-1)


def reference_update(phi, grads, state, config):
  """One step on every coordinate of every leaf, one coordinate at a time (vmap)."""
  leaves, treedef = jax.tree.flatten(grads)
  if not leaves:
    return grads, state
  states = treedef.flatten_up_to(state)
  x = reference_preprocess(
    jnp.concatenate([jnp.ravel(g).astype(jnp.float32) for g in leaves]), config["preprocess"]
  )
  hidden = jnp.concatenate([s.hidden.reshape((-1,) + s.hidden.shape[-2:]) for s in states])
  cell = jnp.concatenate([s.cell.reshape((-1,) + s.cell.shape[-2:]) for s in states])
  k = config["global_cells"]
  hs, cs = [], []
  for index, layer in enumerate(phi["layers"]):
    h, c = jax.vmap(functools.partial(reference_cell, layer))(x, hidden[:, index], cell[:, index])
    if k:  # GAC: one mean over all coordinates of all leaves.
      h = h.at[:, -k:].set(jnp.broadcast_to(jnp.mean(h[:, -k:], axis=0), h[:, -k:].shape))
    hs.append(h)
    cs.append(c)
    x = h
  out = jax.vmap(lambda h: h @ phi["out"]["w"] + phi["out"]["b"])(x)[:, 0]
  out = config["output_scale"] * out
  hidden, cell = jnp.stack(hs, axis=1), jnp.stack(cs, axis=1)
  updates, new_states, start = [], [], 0
  for g in leaves:
    stop = start + g.size
    updates.append(out[start:stop].reshape(g.shape).astype(g.dtype))
    new_states.append(
      lstm.CoordinateState(
        hidden[start:stop].reshape(g.shape + hidden.shape[1:]),
        cell[start:stop].reshape(g.shape + cell.shape[1:]),
      )
    )
    start = stop
  return treedef.unflatten(updates), treedef.unflatten(new_states)


def random_like(tree, key):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  return treedef.unflatten(
    [
      jax.random.normal(k, jnp.shape(x)).astype(jnp.result_type(x))
      for k, x in zip(keys, leaves, strict=False)
    ]
  )


def random_phi(opt, key):
  """Initial phi plus noise, so no weight is special (zero biases, forget-gate ones)."""
  phi = opt.init_meta_params(key)
  return jax.tree.map(lambda w: w + 0.3 * jax.random.normal(key, w.shape), phi)


def assert_trees_close(actual, expected, rtol=RTOL, atol=ATOL):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.shape == e.shape and a.dtype == e.dtype
    # A float32 difference may round a bf16 update to the neighbouring value, 2^-8 away.
    tolerance = 2**-7 if a.dtype == jnp.bfloat16 else rtol
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=tolerance, atol=atol
    )


def two_steps(update, phi, grads, state):
  """Two updates with different gradients, so the second one reads a non-zero state."""
  first, state = update(phi, grads, state)
  second, state = update(phi, jax.tree.map(lambda g: -2 * g, grads), state)
  return (first, second), state


PLAIN = {"global_cells": 0, "preprocess": "none"}
GAC_LOG_SIGN = {"global_cells": 2, "preprocess": "log_sign", "output_scale": 0.1}


@pytest.mark.parametrize(
  "tree, settings",
  [
    ("multi_leaf", PLAIN),
    ("multi_leaf", GAC_LOG_SIGN),
    ("scalar", GAC_LOG_SIGN),  # GAC over one coordinate
    ("empty", PLAIN),
    ("empty", GAC_LOG_SIGN),
    ("bf16", GAC_LOG_SIGN),
  ],
)
def test_update_equals_reference(tree, settings, backend):
  opt = learned_opt.lstm_optimizer(**{**SMALL, **settings}, backend=backend)
  phi = random_phi(opt, jax.random.key(0))
  params = TREES[tree]
  grads = random_like(params, jax.random.key(1))
  state = opt.init_state(phi, params)
  expected = two_steps(functools.partial(reference_update, config=opt.config), phi, grads, state)
  assert_trees_close(jax.jit(functools.partial(two_steps, opt.update))(phi, grads, state), expected)


def test_nested_vmap_update_equals_reference(backend):
  """vmap folds the problems into the rows; GAC must still average each problem on its own."""
  opt = learned_opt.lstm_optimizer(**SMALL, backend=backend)
  phi = random_phi(opt, jax.random.key(0))
  params = TREES["multi_leaf"]
  grads = jax.vmap(lambda k: random_like(params, k))(jax.random.split(jax.random.key(1), 6))
  state = jax.vmap(lambda g: opt.init_state(phi, g))(grads)
  grads = jax.tree.map(lambda g: g.reshape((2, 3) + g.shape[1:]), grads)  # (seeds, problems)
  state = jax.tree.map(lambda s: s.reshape((2, 3) + s.shape[1:]), state)
  nested = lambda update: jax.vmap(jax.vmap(functools.partial(two_steps, update, phi)))
  expected = nested(functools.partial(reference_update, config=opt.config))(grads, state)
  assert_trees_close(jax.jit(nested(opt.update))(grads, state), expected)


def meta_loss(update, phi, grads, state):
  """A 3-step scan unroll; the loss reads every update, so d/d phi goes through the state."""

  def step(state, scale):
    updates, state = update(phi, jax.tree.map(lambda g: scale * g, grads), state)
    return state, sum(jnp.sum(jnp.sin(u.astype(jnp.float32))) for u in jax.tree.leaves(updates))

  _, losses = jax.lax.scan(step, state, jnp.array([1.0, -0.5, 2.0]))
  return jnp.sum(losses)


@pytest.mark.slow
def test_meta_gradient_through_scan_equals_reference(backend):
  """grad of a vmap over problems, as the trainer takes it, and vmap of grad (per problem)."""
  opt = learned_opt.lstm_optimizer(
    **SMALL, preprocess="log_sign", output_scale=0.1, backend=backend
  )
  phi = random_phi(opt, jax.random.key(0))
  params = TREES["multi_leaf"]
  grads = jax.vmap(lambda k: random_like(params, k))(jax.random.split(jax.random.key(1), 3))
  state = jax.vmap(lambda g: opt.init_state(phi, g))(grads)

  def both(phi, grads, state):
    loss = functools.partial(meta_loss, opt.update)
    total = lambda p: jnp.sum(jax.vmap(loss, in_axes=(None, 0, 0))(p, grads, state))
    return jax.grad(total)(phi), jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(phi, grads, state)

  of_sum, per_problem = jax.jit(both)(phi, grads, state)
  reference = functools.partial(reference_update, config=opt.config)
  expected = jax.vmap(jax.grad(functools.partial(meta_loss, reference)), in_axes=(None, 0, 0))(
    phi, grads, state
  )
  assert_trees_close(per_problem, expected, rtol=1e-4, atol=1e-5)
  assert_trees_close(of_sum, jax.tree.map(lambda g: jnp.sum(g, axis=0), expected), 1e-4, 1e-5)


@pytest.mark.slow
def test_blockwise_path_equals_reference(monkeypatch, backend):
  """Steps over more than BLOCK_ROWS coordinates run block by block, a remainder, then GAC."""
  monkeypatch.setattr(lstm_rows, "BLOCK_ROWS", 4)  # 11 coordinates: two blocks and 3 rows
  params = {"w": jnp.ones((2, 4)), "b": jnp.ones((3,))}
  opt = learned_opt.lstm_optimizer(**SMALL, preprocess="log_sign", backend=backend)
  phi = random_phi(opt, jax.random.key(0))
  grads = random_like(params, jax.random.key(1))
  state = opt.init_state(phi, params)
  reference = functools.partial(reference_update, config=opt.config)
  assert_trees_close(
    jax.jit(functools.partial(two_steps, opt.update))(phi, grads, state),
    two_steps(reference, phi, grads, state),
  )
  actual = jax.jit(jax.grad(functools.partial(meta_loss, opt.update)))(phi, grads, state)
  expected = jax.grad(functools.partial(meta_loss, reference))(phi, grads, state)
  assert_trees_close(actual, expected, rtol=1e-4, atol=1e-5)


def load_shipped(name):
  try:
    return learned_opt.pretrained(name)
  except (AttributeError, ImportError, ValueError):  # the loader module is being renamed
    return learned_opt.load(os.path.join(os.path.dirname(learned_opt.__file__), "pretrained", name))


@pytest.mark.parametrize("name", ["quadratic", "mnist_mlp"])
def test_shipped_optimizers_equal_reference(name, backend):
  opt, phi = load_shipped(name)
  opt = learned_opt.with_backend(opt, backend)
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
  grads = jax.tree.map(lambda g: 0.1 * g, random_like(params, jax.random.key(2)))
  state = opt.init_state(phi, params)
  expected = two_steps(functools.partial(reference_update, config=opt.config), phi, grads, state)
  assert_trees_close(jax.jit(functools.partial(two_steps, opt.update))(phi, grads, state), expected)
