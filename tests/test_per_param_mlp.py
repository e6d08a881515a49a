"""The per-parameter MLP optimizer (``learned_opt.per_param_mlp``): what its design promises
beyond the contract suite (``tests/test_optimizer_contract.py`` runs it as ``per_param_mlp``)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from learned_opt import per_param_mlp
from tasks import quadratic
from train import inner as inner_lib
from train import unroll


def grads_like(params, key, scale=1.0):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
    [scale * jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves, strict=True)]
  )


PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros((4,)), "s": jnp.ones(())}


def adam_phi(phi, lr):
  """phi whose read-out is zero: the update is exactly Adam's at ``lr``."""
  return {**phi, "out": jax.tree.map(jnp.zeros_like, phi["out"]), "log_lr": jnp.log(lr)}


def run_steps(opt, phi, grads_seq, params=PARAMS):
  state = opt.init_state(phi, params)
  update = jax.jit(opt.update)
  updates = []
  for grads in grads_seq:
    u, state = update(phi, grads, state)
    updates.append(u)
  return updates


def test_build_by_kind_and_size():
  opt = learned_opt.build({"kind": "per_param_mlp"})
  assert opt.config == learned_opt.per_param_mlp_optimizer().config
  assert learned_opt.build(opt.config).config == opt.config
  phi = opt.init_meta_params(jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(phi)) == 1507  # "a few thousand" at most
  small = learned_opt.build({"kind": "per_param_mlp", "hidden_size": 8, "num_layers": 1})
  assert sum(x.size for x in jax.tree.leaves(small.init_meta_params(jax.random.key(0)))) < 200


@pytest.mark.parametrize(
  "settings, match",
  [
    ({"progress_features": 5}, "progress_features"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"hidden_size": 0}, "hidden_size"),
  ],
)
def test_bad_settings_fail_clearly(settings, match):
  with pytest.raises(ValueError, match=match):
    learned_opt.build({"kind": "per_param_mlp", **settings})


def test_zero_readout_is_adam():
  """With the read-out at zero the update is Adam's (betas 0.9, 0.999), step for step."""
  opt = per_param_mlp.per_param_mlp_optimizer()
  phi = adam_phi(opt.init_meta_params(jax.random.key(0)), 3e-3)
  grads_seq = [grads_like(PARAMS, jax.random.key(i)) for i in range(5)]
  adam = optax.adam(3e-3)
  state = adam.init(PARAMS)
  for ours, grads in zip(run_steps(opt, phi, grads_seq), grads_seq, strict=True):
    theirs, state = adam.update(grads, state)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-9)


def test_init_is_adam_at_its_learning_rate():
  opt = per_param_mlp.per_param_mlp_optimizer(learning_rate=2e-3)
  phi = opt.init_meta_params(jax.random.key(1))
  grads_seq = [grads_like(PARAMS, jax.random.key(i)) for i in range(5)]
  chex.assert_trees_all_equal(
    run_steps(opt, phi, grads_seq), run_steps(opt, adam_phi(phi, 2e-3), grads_seq)
  )


@pytest.mark.parametrize("factor", [1e3, 1e-3])
def test_update_is_invariant_to_the_gradient_scale(factor):
  """Every input is scale-free, so scaling all gradients by ``factor`` leaves the updates (and
  hence the tracked parameters and later inputs) unchanged, with a read-out far from zero."""
  opt = per_param_mlp.per_param_mlp_optimizer(hidden_size=16)
  phi = opt.init_meta_params(jax.random.key(2))
  out_w = 0.3 * jax.random.normal(jax.random.key(3), phi["out"]["w"].shape)
  phi = {**phi, "out": {"w": out_w, "b": jnp.full((2,), 0.1)}}  # the MLP matters
  grads_seq = [grads_like(PARAMS, jax.random.key(i)) for i in range(4)]
  scaled = [jax.tree.map(lambda g: factor * g, grads) for grads in grads_seq]
  base, moved = run_steps(opt, phi, grads_seq), run_steps(opt, phi, scaled)
  adam = run_steps(opt, adam_phi(phi, 1e-3), grads_seq)
  assert (
    max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(adam), strict=True)
    )
    > 1e-4
  )  # the read-out changes the updates a lot ...
  # ... but not with the scale (up to Adam's eps = 1e-8 against sqrt(v) ~ 1e-3 at factor 1e-3,
  # a 1e-5 change of the inputs that the MLP may amplify; the steps are ~1e-3).
  chex.assert_trees_all_close(moved, base, rtol=1e-3, atol=1e-7)


def test_state_tracks_the_parameters():
  opt = per_param_mlp.per_param_mlp_optimizer()
  phi = opt.init_meta_params(jax.random.key(0))
  state, update = opt.init_state(phi, PARAMS), jax.jit(opt.update)
  params = PARAMS
  for i in range(3):
    updates, state = update(phi, grads_like(PARAMS, jax.random.key(i)), state)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_close(jax.tree.map(lambda s: s.params, state, is_leaf=_is_leaf), params)
  assert all(int(s.step.max()) == 3 for s in jax.tree.leaves(state, is_leaf=_is_leaf))


def _is_leaf(x):
  return isinstance(x, per_param_mlp.LeafState)


def test_untrained_phi_lowers_a_quadratic():
  """phi at its init (Adam at 1e-3, nearly) makes steady progress on the paper's quadratics."""
  opt = per_param_mlp.per_param_mlp_optimizer()
  tx = learned_opt.as_optax(opt, opt.init_meta_params(jax.random.key(0)))
  task = quadratic(dim=10)
  problems, keys = inner_lib.sample_problems(task, jax.random.key(3), 8)
  rollout = lambda data, problems, keys: inner_lib.rollout_batch(
    task, tx, data, problems, keys, 300
  )
  losses = jax.jit(rollout)(task.data, problems, keys)
  assert bool(jnp.all(jnp.isfinite(losses)))
  assert bool(jnp.all(losses[:, -1] < 0.8 * losses[:, 0]))


def test_hand_set_phi_lowers_a_loss_like_the_contract():
  """``test_as_optax_lowers_a_loss``'s thresholds, with this optimizer's descent phi (Adam at
  0.1: the read-out at zero)."""
  opt = per_param_mlp.per_param_mlp_optimizer(hidden_size=8)
  tx = learned_opt.as_optax(opt, adam_phi(opt.init_meta_params(jax.random.key(0)), 0.1))
  params = {"conv": jnp.ones((2, 2, 1, 2)), "dense": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
  loss = lambda p: sum(jnp.sum((x - 0.5) ** 2) for x in jax.tree.leaves(p))

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  state, losses = tx.init(params), []
  for _ in range(40):
    params, state, value = step(params, state)
    losses.append(float(value))
  assert all(b < a for a, b in zip(losses[:14], losses[1:15], strict=True))
  assert losses[-1] < 0.01 * losses[0]


def test_save_load_round_trip(tmp_path):
  opt = learned_opt.build({"kind": "per_param_mlp", "hidden_size": 8, "progress_features": 2})
  phi = opt.init_meta_params(jax.random.key(4))
  learned_opt.save(str(tmp_path), opt, phi, {"note": "test"})
  saved = learned_opt.load(str(tmp_path))
  assert saved.optimizer.config == opt.config
  chex.assert_trees_all_equal(saved.meta_params, phi)
  grads = grads_like(PARAMS, jax.random.key(5))
  tx, loaded = learned_opt.as_optax(opt, phi), learned_opt.as_optax(saved)
  chex.assert_trees_all_equal(
    tx.update(grads, tx.init(PARAMS))[0], loaded.update(grads, loaded.init(PARAMS))[0]
  )


def test_meta_gradient_is_finite_through_an_unroll():
  """d meta-loss / d phi through 20 steps of 4 quadratics: finite; at phi's init (read-out zero)
  non-zero for the read-out and the step size, and once the read-out has moved, for every leaf."""
  task = quadratic(dim=6)
  opt = per_param_mlp.per_param_mlp_optimizer(hidden_size=8)
  phi = opt.init_meta_params(jax.random.key(0))
  inner = unroll.init_inner_batch(task, opt, phi, task.data, jax.random.key(1), 4)
  loss_fn = lambda p: unroll.meta_loss(p, inner, task.data, task=task, optimizer=opt, num_steps=20)
  meta_grad = jax.jit(jax.grad(lambda p: loss_fn(p)[0]))
  grads = meta_grad(phi)
  assert float(grads["log_lr"]) < 0  # a larger step lowers the loss of an Adam at 1e-3
  assert float(jnp.max(jnp.abs(grads["out"]["w"]))) > 0
  out_w = 0.01 * jax.random.normal(jax.random.key(2), (8, 2))
  moved = {**phi, "out": {"w": out_w, "b": jnp.zeros(2)}}
  for path, g in jax.tree_util.tree_leaves_with_path(meta_grad(moved)):
    assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)
    assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)


def test_vmapped_update_under_jit_is_float32_and_stable():
  opt = per_param_mlp.per_param_mlp_optimizer(hidden_size=8)
  phi = opt.init_meta_params(jax.random.key(0))
  params = {"w": jnp.zeros((5, 3, 2))}
  grads = grads_like(params, jax.random.key(1))
  state = jax.vmap(lambda p: opt.init_state(phi, p))(params)
  updates, state = jax.jit(jax.vmap(lambda g, s: opt.update(phi, g, s)))(grads, state)
  assert updates["w"].dtype == jnp.float32 and state["w"].momentum.shape == (5, 3, 2, 3)
  np.testing.assert_array_equal(np.asarray(state["w"].step), 1)


def test_width_reference_scales_wide_kernels_like_mup():
  """With ``width_reference=n`` a kernel of fan-in f > n steps n / f times Adam's step; biases,
  vectors and narrow kernels step as Adam does."""
  opt = per_param_mlp.per_param_mlp_optimizer(learning_rate=1e-2, width_reference=64)
  plain = per_param_mlp.per_param_mlp_optimizer(learning_rate=1e-2)
  phi = opt.init_meta_params(jax.random.key(0))
  params = {"wide": jnp.ones((3, 3, 32, 4)), "narrow": jnp.ones((16, 4)), "b": jnp.ones(4)}
  grads = grads_like(params, jax.random.key(1))
  (ours,) = run_steps(opt, phi, [grads], params)
  (adam,) = run_steps(plain, phi, [grads], params)
  chex.assert_trees_all_close(ours["wide"], adam["wide"] * 64 / (3 * 3 * 32), rtol=1e-6)
  chex.assert_trees_all_equal(ours["narrow"], adam["narrow"])
  chex.assert_trees_all_equal(ours["b"], adam["b"])
  with pytest.raises(ValueError, match="width_reference"):
    per_param_mlp.per_param_mlp_optimizer(width_reference=-1)
