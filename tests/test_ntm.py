"""NTM-BFGS and NTM-L-BFGS (Appendix B): memory reads, window, optax face, saving."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from learned_opt import ntm

PARAMS = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((5,))}  # N = 17 coordinates.
N = 17


def _grads(t):
  keys = jax.random.split(jax.random.key(t), 2)
  return {"a": jax.random.normal(keys[0], (3, 4)), "b": jax.random.normal(keys[1], (5,))}


def _run(opt, phi, grads_sequence):
  state = opt.init_state(phi, PARAMS)
  update = jax.jit(opt.update)
  outs = []
  for grads in grads_sequence:
    updates, state = update(phi, grads, state)
    outs.append(updates)
  return outs, state


def _loud_phi(opt):
  """Random phi with write heads scaled up, so the memory visibly changes the reads."""
  phi = opt.init_meta_params(jax.random.key(0))
  return {**phi, "out": {"w": phi["out"]["w"] * 10.0, "b": phi["out"]["b"] + 0.1}}


def test_window_holding_the_whole_history_reads_like_the_dense_memory():
  dense = learned_opt.ntm_bfgs_optimizer()
  window = learned_opt.ntm_lbfgs_optimizer(memory_window=6)
  short = learned_opt.ntm_lbfgs_optimizer(memory_window=2)
  phi = _loud_phi(dense)
  grads = [_grads(t) for t in range(6)]
  dense_updates, dense_state = _run(dense, phi, grads)
  window_updates, _ = _run(window, phi, grads)
  short_updates, _ = _run(short, phi, grads)
  for d, w in zip(dense_updates, window_updates, strict=True):
    for key in d:
      np.testing.assert_allclose(w[key], d[key], rtol=2e-4, atol=1e-6)
  # Forgetting old writes changes the read once the history outgrows a short window.
  last = jnp.concatenate([short_updates[-1]["a"].ravel(), short_updates[-1]["b"].ravel()])
  full = jnp.concatenate([dense_updates[-1]["a"].ravel(), dense_updates[-1]["b"].ravel()])
  assert float(jnp.max(jnp.abs(last - full))) > 1e-4
  # M_t - I is a sum of 3 rank-one writes per step.
  assert np.linalg.matrix_rank(np.asarray(dense_state.memory - jnp.eye(N)), tol=1e-4) <= 3 * 6


@pytest.mark.parametrize("kind", ["ntm_bfgs", "ntm_lbfgs"])
def test_normalized_writes_are_the_plain_ones_with_right_vectors_over_n(kind):
  """normalize_writes writes a b^T / N: the same as the plain memory with b scaled by 1 / N."""
  normalized = learned_opt.build({"kind": kind, "normalize_writes": True})
  plain = learned_opt.build({"kind": kind})
  assert normalized.config["normalize_writes"] and not plain.config["normalize_writes"]
  phi = _loud_phi(plain)
  # Read-out columns: read_heads (1), then left (3), then right (3) write vectors.
  right = jnp.arange(phi["out"]["b"].shape[0]) >= 4
  scaled = {
    **phi,
    "out": {k: jnp.where(right, v / N, v) for k, v in phi["out"].items()},
  }
  grads = [_grads(t) for t in range(5)]
  got, _ = _run(normalized, phi, grads)
  expected, _ = _run(plain, scaled, grads)
  unscaled, _ = _run(plain, phi, grads)
  for g, e in zip(got, expected, strict=True):
    for key in g:
      np.testing.assert_allclose(g[key], e[key], rtol=2e-4, atol=1e-6)
  assert float(jnp.max(jnp.abs(got[-1]["a"] - unscaled[-1]["a"]))) > 1e-4


def test_window_state_does_not_grow_with_steps():
  opt = learned_opt.ntm_lbfgs_optimizer(memory_window=4, write_heads=3)
  phi = opt.init_meta_params(jax.random.key(0))
  shapes = lambda s: jax.tree.map(jnp.shape, s)
  _, after_2 = _run(opt, phi, [_grads(t) for t in range(2)])
  _, after_9 = _run(opt, phi, [_grads(t) for t in range(9)])
  assert shapes(after_2) == shapes(after_9)
  assert after_9.memory.left["a"].shape == (3, 4, 4, 3)  # leaf.shape + (window, write_heads)
  # Linear in N: controller (2 x 2 x 20 + 1) plus window (2 x 4 x 3) floats per coordinate.
  assert sum(x.size for x in jax.tree.leaves(after_9)) == N * (2 * 2 * 20 + 1 + 2 * 4 * 3)


@pytest.mark.parametrize("kind", ["ntm_bfgs", "ntm_lbfgs"])
def test_memory_is_shared_across_leaves_even_without_gac(kind):
  opt = learned_opt.build({"kind": kind, "global_cells": 0})
  phi = _loud_phi(opt)
  grads = [_grads(t) for t in range(3)]
  changed = [dict(g) for g in grads]
  changed[0]["b"] = grads[0]["b"] + 3.0
  base, _ = _run(opt, phi, grads)
  moved, _ = _run(opt, phi, changed)
  assert float(jnp.max(jnp.abs(base[-1]["a"] - moved[-1]["a"]))) > 1e-5


def test_dense_memory_refuses_large_problems_and_points_to_lbfgs():
  opt = learned_opt.ntm_bfgs_optimizer(max_params=16)
  phi = opt.init_meta_params(jax.random.key(0))
  with pytest.raises(ValueError, match="ntm_lbfgs"):
    opt.init_state(phi, PARAMS)
  with pytest.raises(ValueError, match="write_heads"):
    learned_opt.ntm_lbfgs_optimizer(write_heads=0)


def _descent_phi(opt, step):
  """Hand-set phi whose first read vector is -step * tanh(tanh(5 grad)); writes stay zero.

  Gates: input, output open and forget shut (biases +-10); unit 0 of each layer carries the
  gradient, so with M = I the update is a smooth sign descent.
  """
  phi = opt.init_meta_params(jax.random.key(0))
  layers = []
  for layer in phi["layers"]:
    hidden = layer["b"].shape[0] // 4
    b = jnp.concatenate(
      [jnp.full(hidden, 10.0), jnp.full(hidden, -10.0), jnp.zeros(hidden), jnp.full(hidden, 10.0)]
    )
    w = jnp.zeros_like(layer["w"]).at[0, 2 * hidden].set(5.0)
    layers.append({"w": w, "b": b})
  out_w = jnp.zeros_like(phi["out"]["w"]).at[0, 0].set(-step)
  return {"layers": layers, "out": {"w": out_w, "b": jnp.zeros_like(phi["out"]["b"])}}


@pytest.mark.parametrize("kind", ["ntm_bfgs", "ntm_lbfgs"])
def test_as_optax_under_jit_lowers_a_loss(kind):
  opt = learned_opt.build({"kind": kind})
  tx = learned_opt.as_optax(opt, _descent_phi(opt, 0.05))
  loss = lambda p: jnp.sum((p["a"] - 1.0) ** 2) + jnp.sum((p["b"] + 0.5) ** 2)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params)
      updates, state = tx.update(grads, state, params, value=value)  # extra args pass through
      return (optax.apply_updates(params, updates), state), value

    (params, state), losses = jax.lax.scan(step, (params, tx.init(params)), length=40)
    return loss(params), losses, state

  final, losses, state = run(PARAMS)
  assert np.isfinite(np.asarray(losses)).all()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
  assert float(final) < 0.05 * float(losses[0])


@pytest.mark.parametrize("kind", ["ntm_bfgs", "ntm_lbfgs"])
def test_random_phi_runs_100_steps_without_nan(kind):
  opt = learned_opt.build({"kind": kind})
  outs, state = _run(opt, _loud_phi(opt), [_grads(t % 7) for t in range(100)])
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((outs[-1], state)))


@pytest.mark.parametrize("kind", ["ntm_bfgs", "ntm_lbfgs"])
def test_save_load_round_trip_is_bit_exact(kind, tmp_path):
  opt = learned_opt.build({"kind": kind, "write_heads": 2})
  phi = _loud_phi(opt)
  learned_opt.save(str(tmp_path), opt, phi)
  loaded_opt, loaded_phi = learned_opt.load(str(tmp_path))
  assert loaded_opt.config == opt.config
  for x, y in zip(jax.tree.leaves(phi), jax.tree.leaves(loaded_phi), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  grads = [_grads(t) for t in range(3)]
  for a, b in zip(_run(opt, phi, grads)[0], _run(loaded_opt, loaded_phi, grads)[0], strict=True):
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_build_fills_ntm_defaults_and_rejects_bad_heads_and_windows():
  built = learned_opt.build({"kind": "ntm_lbfgs", "memory_window": 7}).config
  assert built["kind"] == "ntm_lbfgs" and built["memory_window"] == 7
  assert built["global_cells"] == 5 and built["write_heads"] == 3
  assert "memory_window" not in learned_opt.build({"kind": "ntm_bfgs"}).config
  with pytest.raises(ValueError, match="memory_window must be >= 1"):
    learned_opt.build({"kind": "ntm_lbfgs", "memory_window": 0})
  with pytest.raises(ValueError, match="read_heads and write_heads must be >= 1"):
    learned_opt.build({"kind": "ntm_bfgs", "read_heads": 0})


def test_flatten_is_ravel_order():
  leaves = [jnp.arange(24.0).reshape(3, 4, 2), jnp.arange(10.0).reshape(5, 2)]
  flat = ntm._flatten(leaves)
  np.testing.assert_array_equal(flat[:12], leaves[0].reshape(12, 2))
  for back, leaf in zip(ntm._unflatten(flat, leaves), leaves, strict=True):
    np.testing.assert_array_equal(back, leaf)
