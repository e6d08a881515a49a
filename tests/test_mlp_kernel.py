"""The per-coordinate MLP's CPU kernels (learned_opt/kernels/mlp.py) against XLA's
``per_param_mlp.mlp_outputs``, and the per-parameter MLP optimizer on them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_opt import per_param_mlp
from learned_opt.kernels import build as kernel_build
from learned_opt.kernels import mlp

# Building a kernel takes seconds: the slow tier, as the other kernels' tests.
pytestmark = [
  pytest.mark.slow,
  pytest.mark.skipif(kernel_build.compiler() is None, reason="no C++ compiler for the kernel"),
]

RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def names():
  return mlp.targets()


def _phi(key, features, hidden, layers):
  phi = per_param_mlp.init_mlp_params(key, (features,) + (hidden,) * layers, 1e-3)
  # The read-out starts at zero: draw one, as a trained phi has.
  out = jax.random.normal(jax.random.fold_in(key, 1), phi["out"]["w"].shape)
  return {**phi, "out": {"w": 0.3 * out, "b": jnp.asarray([0.1, -0.2])}}


def _weights(phi):
  layers = [a for layer in phi["layers"] for a in (layer["w"], layer["b"])]
  return [*layers, phi["out"]["w"], phi["out"]["b"]]


def _xla(x, *weights):
  layers = [{"w": w, "b": b} for w, b in zip(weights[:-2:2], weights[1:-2:2], strict=True)]
  return per_param_mlp.mlp_outputs(
    {"layers": layers, "out": {"w": weights[-2], "b": weights[-1]}}, x
  )


def _value_and_vjp(fn, x, weights, dy):
  y, pullback = jax.vjp(fn, x, *weights)
  return [np.asarray(a) for a in (y, *pullback(dy))]


def _assert_close(got, want, what):
  for i, (a, b) in enumerate(zip(got, want, strict=True)):
    assert a.shape == b.shape, (what, i)
    scale = float(np.max(np.abs(b), initial=0.0))
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * max(scale, 1.0), err_msg=f"{what} {i}")


@pytest.mark.parametrize(
  "shape, features, hidden, layers",
  [
    ((1,), 11, 32, 2),  # one row
    ((1031,), 11, 32, 2),  # the optimizer's net: three 512-row chunks, the last partial
    ((3, 37), 5, 20, 1),  # leading dims; a hidden size that is not whole vectors
    ((50,), 3, 7, 3),  # three narrow layers
    ((40,), 11, 32, 0),  # no hidden layer: the read-out alone
    ((0,), 11, 32, 2),  # no rows
  ],
)
def test_forward_and_vjp_agree_with_xla(names, shape, features, hidden, layers):
  key = jax.random.key(features * hidden + layers)
  x = 2.0 * jax.random.normal(key, shape + (features,))
  weights = _weights(_phi(jax.random.fold_in(key, 2), features, hidden, layers))
  dy = jax.random.normal(jax.random.fold_in(key, 3), shape + (2,))
  got = _value_and_vjp(jax.jit(lambda *a: mlp.mlp(names, *a)), x, weights, dy)
  _assert_close(got, _value_and_vjp(_xla, x, weights, dy), shape)


@pytest.mark.parametrize("weights_mapped", [False, True])
def test_vmap_sums_shared_weight_cotangents_or_maps_each_problems(names, weights_mapped):
  key = jax.random.key(0)
  x = jax.random.normal(key, (3, 70, 11))
  phi = _phi(jax.random.fold_in(key, 1), 11, 32, 2)
  weights = _weights(phi)
  if weights_mapped:
    weights = [jnp.stack([w, 0.5 * w, -w]) for w in weights]
  dy = jax.random.normal(jax.random.fold_in(key, 2), (3, 70, 2))
  axes = (0,) + (0 if weights_mapped else None,) * len(weights)
  loss = lambda fn: lambda x, *w: jnp.sum(jax.vmap(fn, axes)(x, *w) * dy)
  grad = lambda fn: jax.grad(loss(fn), argnums=tuple(range(1 + len(weights))))
  kernel = lambda *a: mlp.mlp(names, *a)
  got = [np.asarray(g) for g in jax.jit(grad(kernel))(x, *weights)]
  _assert_close(got, [np.asarray(g) for g in grad(_xla)(x, *weights)], weights_mapped)


# Problems of 37 rows, and of 10 (a quadratic's): fewer than a chunk's 512, so several share a
# thread's run of tiles, a 32-row tile spanning up to four problems, each into its own slot.
@pytest.mark.parametrize("shape", [(3, 37), (13, 10)])
def test_a_vmapped_vjp_gives_each_problem_its_own_weight_cotangents(names, shape):
  key = jax.random.key(shape[1])
  x = jax.random.normal(key, shape + (11,))
  weights = _weights(_phi(jax.random.fold_in(key, 1), 11, 32, 2))
  dy = jax.random.normal(jax.random.fold_in(key, 2), shape + (2,))

  def per_problem(fn):
    return jax.vmap(lambda x, dy: jax.vjp(fn, x, *weights)[1](dy))(x, dy)

  got = jax.jit(per_problem, static_argnums=0)(lambda *a: mlp.mlp(names, *a))
  want = per_problem(_xla)
  assert all(a.shape[0] == shape[0] for a in got)
  _assert_close([np.asarray(a) for a in got], [np.asarray(a) for a in want], shape)


def test_nan_stays_in_its_row(names):
  """A NaN input gives a NaN output in its row only (ReLU keeps it, as XLA's max does)."""
  x = jnp.ones((40, 11)).at[7, 3].set(jnp.nan)
  y = np.asarray(mlp.mlp(names, x, *_weights(_phi(jax.random.key(0), 11, 32, 2))))
  assert np.isnan(y[7]).all() and np.isfinite(np.delete(y, 7, axis=0)).all()


def test_a_mismatched_layer_is_named(names):
  weights = _weights(_phi(jax.random.key(0), 11, 32, 2))
  weights[2] = jnp.ones((31, 32))  # the second layer's w must take the first's 32 outputs
  with pytest.raises(Exception, match="layer 1"):
    jax.block_until_ready(mlp.mlp(names, jnp.ones((4, 11)), *weights))


def test_the_optimizer_on_the_kernels_agrees_with_xla_values_and_meta_gradient():
  """Updates and a meta-gradient through three vmapped steps on a tree of leaves."""
  params = {"w": jnp.linspace(-1.0, 1.0, 300).reshape(20, 15), "b": jnp.zeros((15,))}
  optimizers = {b: per_param_mlp.per_param_mlp_optimizer(backend=b) for b in ("xla", "cpu_kernels")}
  phi = _phi(jax.random.key(3), per_param_mlp.num_features(4), 32, 2)
  phi = {**phi, "log_lr": jnp.log(jnp.asarray(1e-2))}

  def unrolled_loss(opt):
    def loss(phi, scale):
      theta, state = params, opt.init_state(phi, params)
      total = 0.0
      for _ in range(3):
        grads = jax.tree.map(lambda p: scale * jnp.sin(3.0 * p) + p, theta)
        updates, state = opt.update(phi, grads, state)
        theta = jax.tree.map(jnp.add, theta, updates)
        total += sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(theta))
      return total

    return jax.jit(jax.vmap(jax.value_and_grad(loss), (None, 0)))

  scales = jnp.asarray([0.5, 1.0])
  (v_kernel, g_kernel), (v_xla, g_xla) = (
    unrolled_loss(optimizers[b])(phi, scales) for b in ("cpu_kernels", "xla")
  )
  np.testing.assert_allclose(v_kernel, v_xla, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_kernel), jax.tree.leaves(g_xla), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))
