"""The CPU kernels (learned_opt/kernels/stack.py): the gates and the stacked step against XLA's."""

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt
from learned_opt import backend as backend_lib
from learned_opt import lstm_rows
from learned_opt.kernels import stack
from train import meta_step, trainer
from train.config import MetaTrainConfig

pytestmark = pytest.mark.skipif(
  shutil.which("c++") is None and shutil.which("g++") is None,
  reason="no C++ compiler (c++ or g++) to build the fused kernels with",
)

# Measured largest differences to XLA's gates: ~5e-7 on h and c, ~2e-6 on the cotangents of
# inputs of magnitude up to ~10 (both sides approximate exp and tanh in float32).
RTOL, ATOL = 1e-5, 5e-6


@pytest.fixture(scope="module")
def names():
  """The kernels' FFI targets, built (or found in the cache) once for the module."""
  return stack.targets()


def _xla_gates(monkeypatch, z, c):
  del monkeypatch
  return lstm_rows.xla_gates(z, c)


def _inputs(key, shape, hidden, scale=3.0):
  k = jax.random.split(key, 4)
  z = scale * jax.random.normal(k[0], shape + (4 * hidden,))
  c = scale * jax.random.normal(k[1], shape + (hidden,))
  dh, dc = (jax.random.normal(kk, shape + (hidden,)) for kk in k[2:])
  return z, c, dh, dc


@pytest.mark.parametrize(
  "shape, hidden",
  # One row; rows not a multiple of the 16-row tile; hidden not a multiple of any vector width;
  # leading axes; 2100 rows (three 1024-row chunks, so both threads work, the last partial).
  [((1,), 20), ((37,), 20), ((3, 5), 7), ((2100,), 20), ((0,), 20)],
)
@pytest.mark.slow
def test_forward_and_backward_agree_with_xla(monkeypatch, names, shape, hidden):
  assert names is not None
  z, c, dh, dc = _inputs(jax.random.key(hidden), shape, hidden)
  got, pullback = jax.vjp(jax.jit(lambda z, c: stack.gates(names, z, c)), z, c)
  expected, expected_pullback = jax.vjp(lambda z, c: _xla_gates(monkeypatch, z, c), z, c)
  for a, b in zip(got + pullback((dh, dc)), expected + expected_pullback((dh, dc)), strict=True):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)


def test_saturated_gates_and_nan(names):
  """Far out on the sigmoid and tanh the values are exact 0/1/+-1; a NaN stays NaN."""
  z = jnp.array([[-200.0, 200.0, 200.0, 200.0], [200.0, -200.0, -200.0, 200.0]])
  c = jnp.array([[5.0], [jnp.nan]])
  h, c_new = stack.gates(names, z, c)
  # i = 0, f = 1, g = 1, o = 1: c' = f c + i g = 5 exactly, h' = tanh(5).
  np.testing.assert_array_equal(np.asarray(c_new[0]), [5.0])
  np.testing.assert_allclose(np.asarray(h[0]), [np.tanh(5.0)], rtol=1e-6)
  assert np.isnan(np.asarray(c_new[1, 0])) and np.isnan(np.asarray(h[1, 0]))


@pytest.mark.slow
def test_vmap_grad_and_grad_vmap_agree_with_xla(monkeypatch, names):
  z, c, _, _ = _inputs(jax.random.key(3), (4, 50), 20)

  def loss(gates, z, c):
    h, c_new = gates(z, c)
    return jnp.sum(jnp.sin(h) * c_new)

  fused = lambda z, c: stack.gates(names, z, c)
  xla = lambda z, c: _xla_gates(monkeypatch, z, c)
  for gates in (fused, xla):
    per_problem = jax.vmap(jax.grad(lambda z, c, g=gates: loss(g, z, c), argnums=(0, 1)))(z, c)
    summed = jax.grad(lambda z, c, g=gates: jnp.sum(jax.vmap(lambda a, b: loss(g, a, b))(z, c)))(
      z, c
    )
    np.testing.assert_allclose(np.asarray(per_problem[0]), np.asarray(summed), rtol=RTOL, atol=ATOL)
    if gates is fused:
      got = per_problem
  for a, b in zip(got, per_problem, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)


def _assert_sums_close(actual, expected):
  """Elementwise to RTOL, and to 1e-5 of the largest entry: the weight cotangents are sums over
  hundreds of rows, in another order than XLA's."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  scale = np.nanmax(np.abs(expected), initial=0.0)
  np.testing.assert_allclose(
    actual, expected, rtol=RTOL, atol=max(ATOL, 1e-5 * scale), equal_nan=True
  )


def _xla_stack(monkeypatch, x, h, c, *weights):
  """The stacked LSTM step by XLA (lstm_rows.stacked_rows on the rows): the new (h, c)."""
  del monkeypatch
  layers = [{"w": w, "b": b} for w, b in zip(weights[::2], weights[1::2], strict=True)]
  rows = lambda a, trailing: a.reshape((-1,) + a.shape[a.ndim - trailing :])
  _, hidden, cell = lstm_rows.stacked_rows(layers, rows(x, 1), rows(h, 2), rows(c, 2), 0)
  return hidden.reshape(h.shape), cell.reshape(c.shape)


def _stack_inputs(key, shape, features, hidden, layers):
  """x, h, c, then w_0, b_0, ...; and cotangents for the new (h, c)."""
  k = jax.random.split(key, 5 + 2 * layers)
  x = 2.0 * jax.random.normal(k[0], shape + (features,))
  h = jax.random.normal(k[1], shape + (layers, hidden))
  c = 2.0 * jax.random.normal(k[2], shape + (layers, hidden))
  weights = []
  for i in range(layers):
    fan_in = (features if i == 0 else hidden) + hidden
    weights.append(jax.random.normal(k[5 + 2 * i], (fan_in, 4 * hidden)) / np.sqrt(fan_in))
    weights.append(jax.random.normal(k[6 + 2 * i], (4 * hidden,)))
  dh, dc = (jax.random.normal(kk, shape + (layers, hidden)) for kk in k[3:5])
  return (x, h, c, *weights), (dh, dc)


def _xla_stack_readout(monkeypatch, x, h, c, *weights):
  """``_xla_stack`` and the read-out of its top layer: the new (h, c) and u."""
  hidden, cell = _xla_stack(monkeypatch, x, h, c, *weights[:-2])
  return hidden, cell, (hidden[..., -1, :] @ weights[-2] + weights[-1])[..., 0]


def _case(monkeypatch, names, readout, key, shape, features, hidden, layers):
  """The kernel, XLA's reference, inputs and cotangents: the stack alone, or with the read-out
  (``w_out`` (hidden, 1) and ``b_out`` (1,) after the weights, u's cotangent last)."""
  inputs, cotangents = _stack_inputs(key, shape, features, hidden, layers)
  if not readout:
    kernel = lambda *a: stack.stack(names, *a)
    return kernel, lambda *a: _xla_stack(monkeypatch, *a), inputs, cotangents
  k = jax.random.split(jax.random.fold_in(key, 1), 3)
  w_out = jax.random.normal(k[0], (hidden, 1)) / np.sqrt(hidden)
  b_out = jax.random.normal(k[1], (1,))
  kernel = lambda *a: stack.stack_readout(names, *a)
  reference = lambda *a: _xla_stack_readout(monkeypatch, *a)
  return kernel, reference, (*inputs, w_out, b_out), (*cotangents, jax.random.normal(k[2], shape))


@pytest.mark.parametrize("readout", [False, True])
@pytest.mark.parametrize(
  "shape, features, hidden, layers",
  # The paper's optimizer (log-sign features); one row; a partial 16-row tile; hidden not a
  # multiple of 4 or of a vector, three layers, leading axes; 1031 rows (nine 128-row chunks
  # whose weight cotangents are summed, the last partial); no rows.
  [((37,), 2, 20, 2), ((1,), 1, 20, 2), ((3, 5), 2, 7, 3), ((1031,), 1, 20, 2), ((0,), 2, 20, 2)],
)
@pytest.mark.slow
def test_stack_forward_and_backward_agree_with_xla(
  monkeypatch, names, readout, shape, features, hidden, layers
):
  """The stack alone, and with the optimizer's read-out in it (``stack_readout``)."""
  kernel, reference, inputs, cotangents = _case(
    monkeypatch, names, readout, jax.random.key(hidden), shape, features, hidden, layers
  )
  fused = jax.jit(kernel)
  got, pullback = jax.vjp(fused, *inputs)
  expected, expected_pullback = jax.vjp(reference, *inputs)
  got_all = got + pullback(cotangents)
  for a, b in zip(got_all, expected + expected_pullback(cotangents), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    _assert_sums_close(a, b)
  again = jax.vjp(fused, *inputs)
  for a, b in zip(got_all, again[0] + again[1](cotangents), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # deterministic


@pytest.mark.parametrize("readout", [False, True])
@pytest.mark.parametrize("weights_mapped", [False, True])
@pytest.mark.parametrize("marked", [False, True])
@pytest.mark.slow
def test_stack_under_vmap_sums_the_weight_cotangents(
  monkeypatch, names, readout, weights_mapped, marked
):
  """Shared weights: one call over every problem's rows, dW summed over all of them; weights
  mapped too (one optimizer per problem): one call per problem. Both as XLA computes them,
  with and without the read-out, and with the targets marked (``backend.gradient_of_vmapped``),
  where the kernel returns the shared weights' cotangents summed, not one per problem."""
  if marked:
    names = names + (stack.SUM_OVER_VMAP,)
  kernel, reference, (x, h, c, *weights), _ = _case(
    monkeypatch, names, readout, jax.random.key(5), (3, 50), 2, 20, 2
  )
  if weights_mapped:
    weights = [jnp.stack([a, -a, 0.5 * a]) for a in weights]
  axes = (0, 0, 0) + (0 if weights_mapped else None,) * len(weights)

  def loss(step, weights, x, h, c):
    h_new, c_new, *u = jax.vmap(step, axes)(x, h, c, *weights)
    return jnp.sum(jnp.sin(h_new) * c_new) + sum(jnp.sum(jnp.cos(v)) for v in u)

  grad = jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2, 3))
  got = jax.jit(grad)(weights, x, h, c)
  expected = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2, 3))(weights, x, h, c)
  if not weights_mapped:  # marked: no per-problem cotangent of the first layer's w
    assert ("f32[3,22,80]" in str(jax.make_jaxpr(grad)(weights, x, h, c))) is not marked
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    assert a.shape == b.shape
    _assert_sums_close(a, b)


@pytest.mark.parametrize("readout", [False, True])
# Problems of 50 rows, and of 10 (a quadratic's): fewer than a chunk's 128, so several share a
# thread's run of tiles, a 16-row tile spanning up to three problems, each into its own slot.
@pytest.mark.parametrize("shape", [(3, 50), (13, 10)])
@pytest.mark.slow
def test_a_vmapped_gradient_gives_each_problem_its_own_weight_cotangents(
  monkeypatch, names, readout, shape
):
  """``jax.vmap(jax.grad(...))`` with shared weights: per-problem gradients, as XLA's (the
  kernel sums each problem's rows apart, not all of them)."""
  kernel, reference, (x, h, c, *weights), _ = _case(
    monkeypatch, names, readout, jax.random.key(6), shape, 2, 20, 2
  )

  def loss(step, weights, x, h, c):
    h_new, c_new, *u = step(x, h, c, *weights)
    return jnp.sum(jnp.sin(h_new) * c_new) + sum(jnp.sum(jnp.cos(v)) for v in u)

  def per_problem(step):
    return jax.vmap(jax.grad(functools.partial(loss, step)), (None, 0, 0, 0))(weights, x, h, c)

  got, expected = jax.jit(lambda: per_problem(kernel))(), per_problem(reference)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    assert a.shape == b.shape == shape[:1] + a.shape[1:]
    _assert_sums_close(a, b)


def test_stack_nan_stays_in_its_row(monkeypatch, names):
  inputs, cotangents = _stack_inputs(jax.random.key(7), (37,), 2, 20, 2)
  inputs = (inputs[0].at[5, 1].set(jnp.nan),) + inputs[1:]
  got, pullback = jax.vjp(lambda *a: stack.stack(names, *a), *inputs)
  expected, expected_pullback = jax.vjp(lambda *a: _xla_stack(monkeypatch, *a), *inputs)
  h = np.asarray(got[0])
  assert np.isnan(h[5]).all() and np.isfinite(np.delete(h, 5, axis=0)).all()
  for a, b in zip(
    got + pullback(cotangents), expected + expected_pullback(cotangents), strict=True
  ):
    _assert_sums_close(a, b)


def _update_jaxpr(global_cells=0, backend="auto"):
  """The jaxpr of one LSTM update, traced afresh (traces are cached per function)."""
  opt = learned_opt.lstm_optimizer(global_cells=global_cells, backend=backend)
  phi = opt.init_meta_params(jax.random.key(0))
  params = {"w": jnp.ones((6, 3))}
  return str(jax.make_jaxpr(lambda g: opt.update(phi, g, opt.init_state(phi, params)))(params))


@pytest.mark.parametrize("global_cells", [0, 5])  # LSTM+GAC's gates are the same kernel
def test_the_backend_chooses(monkeypatch, names, global_cells):
  assert "ffi_call" in _update_jaxpr(global_cells, "cpu_kernels")
  monkeypatch.setattr(jax, "device_count", lambda *args: 1)
  assert "ffi_call" in _update_jaxpr(global_cells, "auto")  # one device: the kernels
  assert "ffi_call" not in _update_jaxpr(global_cells, "xla")


def test_auto_leaves_the_gates_to_xla_with_several_devices(monkeypatch, names):
  """XLA's partitioner would replicate the custom call on every device; cpu_kernels insists."""
  monkeypatch.setattr(jax, "device_count", lambda *args: 2)
  assert "ffi_call" not in _update_jaxpr(0, "auto")
  assert "ffi_call" in _update_jaxpr(0, "cpu_kernels")


def test_gradient_of_vmapped_marks_the_targets_it_hands_out(names):
  """Inside it (a trace that differentiates a vmapped function, as train.meta_step's), the
  targets carry the marker, last, that makes the vmap rules sum shared weights' cotangents."""
  arrays = jnp.ones(3)
  assert backend_lib.kernel_targets("cpu_kernels", arrays) == names
  with backend_lib.gradient_of_vmapped():
    assert backend_lib.kernel_targets("cpu_kernels", arrays) == names + (stack.SUM_OVER_VMAP,)
    assert backend_lib.kernel_targets("xla", arrays) is None
  assert backend_lib.kernel_targets("cpu_kernels", arrays) == names


@pytest.mark.slow
def test_the_meta_step_sums_phis_cotangents_in_the_kernel(names):
  """train.meta_step's autodiff meta-gradient (here of NTM-BFGS without global averaging cells,
  whose controller LSTM runs on the stack kernels; the truncation's kernels do not serve it) is
  a gradient of a loss vmapped over problems: the backward kernel returns phi's cotangents summed
  over the 32 problems, not one per problem for XLA to add up (which made the 128-quadratic
  meta-step 1.6x slower)."""
  assert names is not None
  config = MetaTrainConfig(
    output_dir="/tmp/unused",
    num_problems=32,
    unroll=5,
    horizon=10,
    optimizer="ntm_bfgs",
    optimizer_kwargs={"global_cells": 0},  # the stack kernels, not the gates alone
  )
  task, optimizer = trainer.build(config)
  optimizer = learned_opt.with_backend(optimizer, "cpu_kernels")
  state = meta_step.init_state(config, task, optimizer)
  step = meta_step.make_train_step(config, task, optimizer)
  jaxpr = str(jax.make_jaxpr(step)(state, task.data))
  weights = [w for w in jax.tree.leaves(state.meta_params["layers"]) if w.ndim == 2]
  assert names[3] in jaxpr and names[7] not in jaxpr and weights
  for w in weights:
    assert f"f32[32,{','.join(map(str, w.shape))}]" not in jaxpr, w.shape


@pytest.mark.slow
def test_a_meta_step_agrees_with_xla(monkeypatch, names):
  """The quadratic meta-gradient (32 problems, unroll 5) through either gates, to tolerance."""
  assert names is not None
  config = MetaTrainConfig(output_dir="/tmp/unused", num_problems=32, unroll=5, horizon=10)
  task, optimizer = trainer.build(config)
  results = {}
  for mode in ("xla", "cpu_kernels"):
    optimizer = learned_opt.with_backend(optimizer, mode)
    state = meta_step.init_state(config, task, optimizer)
    step = jax.jit(meta_step.make_train_step(config, task, optimizer))
    results[mode] = step(state, task.data)
  xla_state, auto_state = results["xla"][0], results["cpu_kernels"][0]
  for a, b in zip(
    jax.tree.leaves(auto_state.meta_params), jax.tree.leaves(xla_state.meta_params), strict=True
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert not all(
    np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(
      jax.tree.leaves(auto_state.meta_params), jax.tree.leaves(xla_state.meta_params), strict=True
    )
  ), "the two modes ran the same code"


@pytest.mark.slow
def test_an_update_on_a_tree_agrees_with_xla_values_and_meta_gradient(monkeypatch, names):
  """The optimizer's update on leaves of every shape (scalar, vector, matrix, empty), vmapped
  over 3 problems, and the gradient of a loss of it w.r.t. phi: one kernel call per leaf, the
  read-out in it."""
  assert names is not None
  opt = learned_opt.lstm_optimizer(preprocess="log_sign", output_scale=0.1)
  phi = opt.init_meta_params(jax.random.key(0))
  keys = jax.random.split(jax.random.key(1), 3)
  grads = {
    "s": jax.random.normal(keys[0], (3,)),
    "v": jax.random.normal(keys[1], (3, 7)),
    "m": jax.random.normal(keys[2], (3, 4, 5)),
    "e": jnp.zeros((3, 0)),
  }
  states = jax.vmap(lambda g: opt.update(phi, g, opt.init_state(phi, g))[1])(grads)

  def loss(opt, phi):
    updates, new = jax.vmap(opt.update, (None, 0, 0))(phi, grads, states)
    total = sum(jnp.sum(jnp.sin(3 * u)) for u in jax.tree.leaves(updates))
    return total + sum(0.1 * jnp.sum(a**2) for a in jax.tree.leaves(new))

  results = {}
  for mode in ("xla", "cpu_kernels"):
    fn = functools.partial(loss, learned_opt.with_backend(opt, mode))
    assert (names[4] in str(jax.make_jaxpr(jax.grad(fn))(phi))) == (mode == "cpu_kernels")
    results[mode] = jax.jit(jax.value_and_grad(fn))(phi)
  np.testing.assert_allclose(results["cpu_kernels"][0], results["xla"][0], rtol=1e-5)
  for a, b in zip(
    jax.tree.leaves(results["cpu_kernels"][1]), jax.tree.leaves(results["xla"][1]), strict=True
  ):
    _assert_sums_close(a, b)
