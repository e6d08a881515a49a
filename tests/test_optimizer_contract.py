"""One contract suite run over every learned-optimizer variant (shapes, dtypes, jit, vmap)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt

VARIANTS = {
  "lstm": lambda: learned_opt.lstm_optimizer(hidden_size=8),
  "lstm_log_sign": lambda: learned_opt.lstm_optimizer(
    hidden_size=8, preprocess="log_sign", output_scale=0.1
  ),
  "lstm_scale": lambda: learned_opt.lstm_optimizer(
    hidden_size=8, preprocess="scale", input_scale=0.1
  ),
  "lstm_gac": lambda: learned_opt.lstm_optimizer(hidden_size=8, global_cells=3),
}

PARAMS = {
  "w": jnp.ones((3, 4)),
  "b": jnp.zeros((4,)),
  "scalar": jnp.array(0.5),
  "nested": [jnp.full((2, 1, 2), -1.0)],
}


def grads_like(params, key):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
    [jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves, strict=True)]
  )


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
  opt = VARIANTS[request.param]()
  return opt, opt.init_meta_params(jax.random.key(0))


def test_state_keeps_leaf_shapes(variant):
  opt, phi = variant
  state = opt.init_state(phi, PARAMS)
  for leaf, leaf_state in zip(
    jax.tree.leaves(PARAMS), jax.tree.structure(PARAMS).flatten_up_to(state), strict=True
  ):
    for array in jax.tree.leaves(leaf_state):
      assert array.shape[: leaf.ndim] == leaf.shape


def test_update_shapes_dtypes_and_state_structure(variant):
  opt, phi = variant
  state = opt.init_state(phi, PARAMS)
  updates, new_state = jax.jit(opt.update)(phi, grads_like(PARAMS, jax.random.key(1)), state)
  assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(PARAMS), strict=True):
    assert u.shape == p.shape and u.dtype == p.dtype
    assert bool(jnp.all(jnp.isfinite(u)))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_empty_tree_and_scalar(variant):
  opt, phi = variant
  updates, _ = opt.update(phi, {}, opt.init_state(phi, {}))
  assert updates == {}
  scalar = jnp.array(2.0)
  updates, _ = opt.update(phi, scalar, opt.init_state(phi, scalar))
  assert updates.shape == ()


def test_mixed_precision_leaves(variant):
  opt, phi = variant
  params = {"bf16": jnp.ones((3,), jnp.bfloat16), "f32": jnp.ones((2,), jnp.float32)}
  updates, _ = jax.jit(opt.update)(phi, params, opt.init_state(phi, params))
  assert updates["bf16"].dtype == jnp.bfloat16 and updates["f32"].dtype == jnp.float32


def test_integer_leaves_fail_clearly(variant):
  opt, phi = variant
  with pytest.raises(TypeError, match=r"\['count'\].*int32.*optax.masked"):
    opt.init_state(phi, {"w": jnp.ones(2), "count": jnp.zeros((), jnp.int32)})


def test_as_optax_lowers_a_loss(variant):
  """Even untrained phi moves params; training is tested elsewhere. Here: it runs and is stable."""
  opt, phi = variant
  tx = learned_opt.as_optax(opt, phi)
  params = {"x": jnp.linspace(-1.0, 1.0, 5)}
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, value=jnp.float32(1.0)))
  for _ in range(3):
    updates, state = step(params, state, params)
    params = optax.apply_updates(params, updates)
  assert bool(jnp.all(jnp.isfinite(params["x"])))
  assert step._cache_size() == 1  # no recompilation on later calls


def test_coordinatewise_invariance_to_order():
  """Without GAC each coordinate is updated independently of the others (section 2.1)."""
  opt = VARIANTS["lstm"]()
  phi = opt.init_meta_params(jax.random.key(0))
  g = jax.random.normal(jax.random.key(3), (6,))
  perm = jnp.array([5, 2, 0, 1, 4, 3])
  u, _ = opt.update(phi, g, opt.init_state(phi, g))
  u_perm, _ = opt.update(phi, g[perm], opt.init_state(phi, g))
  np.testing.assert_allclose(u[perm], u_perm, rtol=1e-6)


@pytest.mark.parametrize("global_cells, should_move", [(3, True), (0, False)])
def test_gac_averages_across_leaves(global_cells, should_move):
  """A change to one leaf's gradient moves another leaf's update only with GAC."""
  opt = learned_opt.lstm_optimizer(hidden_size=8, global_cells=global_cells)
  phi = opt.init_meta_params(jax.random.key(0))
  grads = {"a": jnp.ones(3), "b": jnp.ones(2)}
  state = opt.init_state(phi, grads)

  def two_steps(g):
    # Two steps, so averaged activations also reach the read-out through the recurrence.
    _, s = opt.update(phi, g, state)
    return opt.update(phi, g, s)[0]

  base = two_steps(grads)
  moved = two_steps({"a": grads["a"] * 50.0, "b": grads["b"]})
  changed = not np.allclose(base["b"], moved["b"], rtol=1e-6, atol=0)
  assert changed == should_move


def test_gac_mean_is_over_all_coordinates():
  values = [jnp.arange(6.0).reshape(3, 2), jnp.array([[10.0, 20.0]])]
  out = learned_opt.lstm.global_average(values, 1)
  mean = (1 + 3 + 5 + 20) / 4
  np.testing.assert_allclose(out[0], [[0, mean], [2, mean], [4, mean]])
  np.testing.assert_allclose(out[1], [[10, mean]])


def test_vmap_over_problems_equals_one_by_one(variant):
  opt, phi = variant
  grads = jax.random.normal(jax.random.key(4), (5, 7))  # 5 problems of 7 parameters
  state = jax.vmap(lambda g: opt.init_state(phi, g))(grads)
  batched, _ = jax.vmap(opt.update, in_axes=(None, 0, 0))(phi, grads, state)
  for i in range(5):
    single, _ = opt.update(phi, grads[i], opt.init_state(phi, grads[i]))
    np.testing.assert_allclose(batched[i], single, rtol=1e-5, atol=1e-7)


def test_float64_leaves_under_x64(variant):
  opt, phi = variant
  enable_x64 = getattr(jax, "enable_x64", None)
  if enable_x64 is None:  # older JAX
    from jax.experimental import enable_x64
  with enable_x64(True):
    params = {"f64": jnp.ones((3,), jnp.float64), "bf16": jnp.ones((2,), jnp.bfloat16)}
    tx = learned_opt.as_optax(opt, phi)
    updates, _ = jax.jit(tx.update)(params, tx.init(params))
    assert updates["f64"].dtype == jnp.float64 and updates["bf16"].dtype == jnp.bfloat16
