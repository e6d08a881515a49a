"""One contract suite run over every learned-optimizer variant (``variant`` in conftest.py):
state shapes, dtypes, jit without retracing, vmap, x64, and a loss that goes down."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt


def grads_like(params, key):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
    [jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves, strict=True)]
  )


def test_state_keeps_leaf_shapes(variant, params):
  """Per-coordinate state is shaped ``leaf.shape + (...)``, so it shards like the parameter."""
  state = variant.optimizer.init_state(variant.meta_params, params)
  per_leaf, shared = variant.leaf_states(state, params)
  for leaf, leaf_state in zip(jax.tree.leaves(params), per_leaf, strict=True):
    arrays = jax.tree.leaves(leaf_state)
    assert arrays and all(a.shape[: leaf.ndim] == leaf.shape for a in arrays)
  n = sum(x.size for x in jax.tree.leaves(params))
  # Only NTM-BFGS keeps an array over all coordinates: its dense (N, N) memory.
  assert [a.shape for a in shared] == ([(n, n)] if variant.name == "ntm_bfgs" else [])


def test_state_grows_linearly_or_is_refused(variant):
  """State is linear in N, except the dense memory, which is quadratic and capped."""
  opt, phi = variant.optimizer, variant.meta_params

  def state_size(n):
    params = {"conv": jax.ShapeDtypeStruct((n // 2,), jnp.float32)}
    params["fc"] = jax.ShapeDtypeStruct((n - n // 2,), jnp.float32)
    return sum(x.size for x in jax.tree.leaves(jax.eval_shape(opt.init_state, phi, params)))

  if variant.name == "ntm_bfgs":
    assert state_size(40) - 2 * state_size(20) == 40**2 - 2 * 20**2
    with pytest.raises(ValueError, match="ntm_lbfgs"):
      state_size(opt.config["max_params"] + 1)
  else:
    assert state_size(40) == 2 * state_size(20) > 0
    assert state_size(10_000) == 500 * state_size(20)


def test_update_shapes_dtypes_and_state_structure(variant, params):
  opt, phi = variant.optimizer, variant.meta_params
  state = opt.init_state(phi, params)
  updates, new_state = jax.jit(opt.update)(phi, grads_like(params, jax.random.key(1)), state)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
    assert u.shape == p.shape and u.dtype == p.dtype
    assert bool(jnp.all(jnp.isfinite(u)))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)


def test_empty_tree_and_scalar(variant):
  opt, phi = variant.optimizer, variant.meta_params
  scalar = jnp.array(2.0)
  updates, _ = opt.update(phi, scalar, opt.init_state(phi, scalar))
  assert updates.shape == ()
  updates, _ = opt.update(phi, {}, opt.init_state(phi, {}))
  assert updates == {}


def test_mixed_precision_leaves(variant):
  opt, phi = variant.optimizer, variant.meta_params
  params = {"conv": jnp.ones((3,), jnp.bfloat16), "fc": jnp.ones((2,), jnp.float32)}
  updates, _ = jax.jit(opt.update)(phi, params, opt.init_state(phi, params))
  assert updates["conv"].dtype == jnp.bfloat16 and updates["fc"].dtype == jnp.float32


def test_integer_leaves_fail_clearly(variant):
  opt, phi = variant.optimizer, variant.meta_params
  with pytest.raises(TypeError, match=r"\['count'\].*int32.*optax.masked"):
    opt.init_state(phi, {"w": jnp.ones(2), "count": jnp.zeros((), jnp.int32)})


def descent_phi(config, phi, lr):
  """Hand-set phi whose update is ``-lr * s(grad)``, ``s`` odd, increasing, ``|s| < 0.77``
  (the per-parameter MLP: Adam's step at ``lr``).

  Gates: input and output open, forget shut (biases +-10); unit 0 of every layer carries the
  sign-carrying input feature (the gradient, or ``sgn g`` under ``log_sign``) through
  ``tanh(5 x)``; the read-out takes unit 0 alone. Global averaging cells (the last units) and
  NTM writes get zero weight, so the NTM memory stays ``I`` and its read is the update.
  """
  if config["kind"] == "partition":
    return {label: descent_phi(config["optimizers"][label], phi[label], lr) for label in phi}
  if config["kind"] == "per_param_mlp":  # a zero read-out is Adam at lr (learned_opt.per_param_mlp)
    out = jax.tree.map(jnp.zeros_like, phi["out"])
    return {**phi, "out": out, "log_lr": jnp.log(jnp.float32(lr))}
  feature = 1 if config["preprocess"] == "log_sign" else 0
  layers = []
  for layer in phi["layers"]:
    hidden = layer["b"].shape[0] // 4
    b = jnp.concatenate([jnp.full(hidden, 10.0), jnp.full(hidden, -10.0), jnp.zeros(hidden)])
    b = jnp.concatenate([b, jnp.full(hidden, 10.0)])
    layers.append({"w": jnp.zeros_like(layer["w"]).at[feature, 2 * hidden].set(5.0), "b": b})
    feature = 0  # upper layers read unit 0 of the layer below
  out_w = jnp.zeros_like(phi["out"]["w"]).at[0, 0].set(-lr / config["output_scale"])
  return {"layers": layers, "out": {"w": out_w, "b": jnp.zeros_like(phi["out"]["b"])}}


def test_as_optax_lowers_a_loss(variant, params):
  """With a hand-set descent phi every variant minimizes a quadratic through optax, under jit,
  with extra arguments passed through and no retracing after the first step."""
  opt = variant.optimizer
  tx = learned_opt.as_optax(opt, descent_phi(opt.config, variant.meta_params, lr=0.1))
  loss = lambda p: sum(jnp.sum((x - 0.5) ** 2) for x in jax.tree.leaves(p))
  state = tx.init(params)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state, value

  losses = []
  for _ in range(40):
    params, state, value = step(params, state)
    losses.append(float(value))
  assert losses[-1] < 0.02 * losses[0]
  assert all(b < a for a, b in zip(losses[:14], losses[1:15], strict=True))
  assert losses[-1] < 0.01 * losses[0]


def test_permuting_coordinates_permutes_updates(variant):
  """Coordinates are exchangeable (section 2.1): GAC means and NTM memory reads are symmetric
  in the coordinates too, so every variant commutes with a permutation within a leaf."""
  opt, phi = variant.optimizer, variant.meta_params
  grads = grads_like({"conv": jnp.zeros(3), "fc": jnp.zeros(6)}, jax.random.key(3))
  perm = jnp.array([5, 2, 0, 1, 4, 3])
  permuted = {"conv": grads["conv"], "fc": grads["fc"][perm]}

  def two_steps(g):
    _, s = opt.update(phi, g, opt.init_state(phi, g))
    return opt.update(phi, g, s)[0]

  base, moved = two_steps(grads), two_steps(permuted)
  np.testing.assert_allclose(moved["fc"], base["fc"][perm], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(moved["conv"], base["conv"], rtol=1e-5, atol=1e-7)


def test_coordinates_are_independent_exactly_when_coordinatewise(variant):
  """A change to one coordinate's gradient moves the other coordinates' updates iff the
  variant couples coordinates (GAC, NTM memory); a coordinatewise one leaves them bit-equal."""
  opt, phi = variant.optimizer, variant.meta_params
  grads = grads_like({"conv": jnp.zeros(3), "fc": jnp.zeros(4)}, jax.random.key(5))
  changed = {"conv": grads["conv"], "fc": grads["fc"].at[0].mul(-50.0)}

  def two_steps(g):
    # Two steps, so averaged activations also reach the read-out through the recurrence.
    _, s = opt.update(phi, g, opt.init_state(phi, g))
    return opt.update(phi, g, s)[0]

  base, moved = two_steps(grads), two_steps(changed)
  assert float(jnp.max(jnp.abs(base["fc"][0] - moved["fc"][0]))) > 1e-6
  difference = float(jnp.max(jnp.abs(base["fc"][1:] - moved["fc"][1:])))
  if variant.coordinatewise:
    assert difference == 0.0
    np.testing.assert_array_equal(base["conv"], moved["conv"])
  else:
    assert difference > 1e-6


def test_vmap_over_problems_equals_one_by_one(variant):
  opt, phi = variant.optimizer, variant.meta_params
  grads = grads_like({"conv": jnp.zeros((3, 3)), "fc": jnp.zeros((3, 5))}, jax.random.key(4))
  first_step = lambda g: opt.update(phi, g, opt.init_state(phi, g))[0]
  batched = jax.jit(jax.vmap(first_step))(grads)
  single = jax.jit(first_step)
  for i in range(3):
    chex.assert_trees_all_close(
      jax.tree.map(lambda x, i=i: x[i], batched),
      single(jax.tree.map(lambda x, i=i: x[i], grads)),
      rtol=1e-5,
      atol=1e-7,
    )


def test_float64_leaves_under_x64(variant):
  opt, phi = variant.optimizer, variant.meta_params
  enable_x64 = getattr(jax, "enable_x64", None)
  if enable_x64 is None:  # older JAX
    from jax.experimental import enable_x64
  with enable_x64(True):
    params = {"conv": jnp.ones((3,), jnp.float64), "fc": jnp.ones((2,), jnp.bfloat16)}
    tx = learned_opt.as_optax(opt, phi)
    updates, _ = jax.jit(tx.update)(params, tx.init(params))
    assert updates["conv"].dtype == jnp.float64 and updates["fc"].dtype == jnp.bfloat16
