"""The conv layers' CPU kernels against XLA: the direct convolution (learned_opt/kernels/conv.py)
and the CIFAR-10 net's batch norm, pooling and ReLU (bn_pool.py); and the tasks' choice of them
(``tasks.cifar10.conv_function``, ``tail_function``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_opt import backend as backend_lib
from learned_opt.kernels import bn_pool, conv
from learned_opt.kernels import build as kernel_build
from tasks import cifar10

# Building a kernel takes seconds: every test that builds one is in the slow tier (as the LSTM
# kernels' tests, tests/test_fused_gates.py), and .ci/kernels checks them three ways besides.
_NO_COMPILER = "no C++ compiler (c++, g++ or $CXX) to build the kernel"


def needs_compiler(test):
  """Slow tier, skipped without a compiler."""
  return pytest.mark.slow(
    pytest.mark.skipif(kernel_build.compiler() is None, reason=_NO_COMPILER)(test)
  )


@pytest.fixture(scope="module")
def names():
  return conv.targets()


@pytest.fixture(scope="module")
def tail_names():
  return bn_pool.targets()


def _case(shape, kernel_shape, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], shape)
  kernel = jax.random.normal(keys[1], kernel_shape) / np.sqrt(np.prod(kernel_shape[:-1]))
  dy = jax.random.normal(keys[2], shape[:-1] + kernel_shape[-1:])
  return x, kernel, dy


def _value_and_vjp(fn, x, kernel, dy):
  y, pullback = jax.vjp(fn, x, kernel)
  return [np.asarray(a) for a in (y, *pullback(dy))]


def _assert_close(got, want, what):
  for name, a, b in zip(("y", "dx", "dkernel"), got, want, strict=True):
    assert a.shape == b.shape, (what, name)
    scale = float(np.max(np.abs(b), initial=0.0))
    tolerance = 1e-5 * max(scale, 1.0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=tolerance, err_msg=f"{what} {name}")


@needs_compiler
@pytest.mark.parametrize(
  "shape, kernel_shape",
  [
    ((3, 8, 8, 3), (3, 3, 3, 16)),  # the CIFAR-10 net's first layer: 16 outputs, one vector
    ((10, 5, 12, 16), (3, 3, 16, 16)),  # 10 images: two 8-image chunks of the kernel gradient
    ((2, 7, 11, 5), (5, 3, 5, 19)),  # odd widths (8, 1, 1 pixel tiles), outputs past one vector
    ((1, 4, 4, 33), (1, 1, 33, 3)),  # a 1 x 1 kernel, 3 outputs from 33: inputs in the lanes
    ((2, 3, 6, 64), (3, 3, 64, 3)),  # neural art's image gradient: 3 outputs from 64
  ],
)
def test_forward_and_vjp_agree_with_xla(names, shape, kernel_shape):
  x, kernel, dy = _case(shape, kernel_shape)
  got = _value_and_vjp(jax.jit(lambda a, b: conv.conv2d(names, a, b)), x, kernel, dy)
  _assert_close(got, _value_and_vjp(cifar10.conv_xla, x, kernel, dy), (shape, kernel_shape))


@needs_compiler
def test_vmap_gives_each_problem_its_own_kernel_or_shares_one(names):
  """Mapped kernels (each problem's own, as meta-training's optimizees) and a shared one."""
  x, kernel, dy = _case((3, 4, 6, 6, 2), (3, 3, 3, 2, 8))
  mapped = lambda fn: jax.vmap(fn)
  got = _value_and_vjp(mapped(lambda a, b: conv.conv2d(names, a, b)), x, kernel, dy)
  _assert_close(got, _value_and_vjp(mapped(cifar10.conv_xla), x, kernel, dy), "mapped")
  shared = lambda fn: jax.vmap(fn, (0, None))
  got = _value_and_vjp(shared(lambda a, b: conv.conv2d(names, a, b)), x, kernel[0], dy)
  _assert_close(got, _value_and_vjp(shared(cifar10.conv_xla), x, kernel[0], dy), "shared")


@needs_compiler
def test_an_even_kernel_is_refused_by_name(names):
  x, kernel, _ = _case((1, 4, 4, 2), (2, 3, 2, 4))
  with pytest.raises(Exception, match="odd"):
    jax.block_until_ready(conv.conv2d(names, x, kernel))


@needs_compiler
def test_the_cifar10_net_has_the_same_loss_and_gradient_on_the_kernels():
  """The whole net (convolutions, batch norm, pooling) by ``"cpu_kernel"`` and ``"shift"``."""
  sizes = cifar10.layer_sizes((4, 8), 16, 10)
  params = cifar10.init_convnet(jax.random.key(0), sizes)
  x = jax.random.normal(jax.random.key(1), (6, 32, 32, 3))
  labels = jnp.arange(6) % 10

  kernels = ("cpu_kernel", "cpu_kernel")

  def loss(params, conv_impl, tail_impl):
    conv_fn, tail = cifar10.conv_function(conv_impl), cifar10.tail_function(tail_impl)
    logits = cifar10.convnet_logits(params, x, conv_fn, tail)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  both = jax.jit(
    lambda p: [jax.value_and_grad(loss)(p, *layer) for layer in (kernels, ("shift",) * 2)]
  )
  (loss_k, grad_k), (loss_s, grad_s) = both(params)
  np.testing.assert_allclose(loss_k, loss_s, rtol=1e-5)
  for g_k, g_s in zip(jax.tree.leaves(grad_k), jax.tree.leaves(grad_s), strict=True):
    np.testing.assert_allclose(g_k, g_s, rtol=1e-3, atol=1e-5)
  assert min(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_k)) > 1e-4  # none all zero


@needs_compiler
@pytest.mark.parametrize("shape", [(4, 8, 8, 16), (3, 6, 4, 5), (2, 4, 10, 19)])
def test_batch_norm_pool_relu_agrees_with_xla(tail_names, shape):
  """Values and both cotangents, with tied maxima (a constant corner) and channels that fill
  no, one or a partial vector; the statistics are of an offset input (mean 3, sd 2)."""
  keys = jax.random.split(jax.random.key(len(shape)), 3)
  z = (3.0 + 2.0 * jax.random.normal(keys[0], shape)).at[0, :2, :2, :].set(1.5)
  bias = jax.random.normal(keys[1], shape[-1:])
  dy = jax.random.normal(keys[2], (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
  kernel = jax.jit(lambda z, b: bn_pool.bn_pool_relu(tail_names, z, b, cifar10.BATCH_NORM_EPSILON))
  _assert_close(
    _value_and_vjp(kernel, z, bias, dy), _value_and_vjp(cifar10.conv_tail, z, bias, dy), shape
  )


@needs_compiler
def test_batch_norm_pool_relu_keeps_each_problems_statistics_under_vmap(tail_names):
  keys = jax.random.split(jax.random.key(7), 3)
  z = jax.random.normal(keys[0], (3, 4, 6, 6, 16)) * jnp.arange(1.0, 4.0)[:, None, None, None, None]
  bias = jax.random.normal(keys[1], (3, 16))
  dy = jax.random.normal(keys[2], (3, 4, 3, 3, 16))
  kernel = jax.vmap(lambda z, b: bn_pool.bn_pool_relu(tail_names, z, b, 1e-5))
  _assert_close(
    _value_and_vjp(kernel, z, bias, dy),
    _value_and_vjp(jax.vmap(cifar10.conv_tail), z, bias, dy),
    "vmap",
  )


@needs_compiler
def test_batch_norm_pool_relu_refuses_an_odd_size_by_name(tail_names):
  with pytest.raises(Exception, match="even"):
    jax.block_until_ready(
      bn_pool.bn_pool_relu(tail_names, jnp.ones((2, 5, 4, 3)), jnp.ones(3), 1e-5)
    )


def _uses_kernel(conv_fn) -> bool:
  x, kernel, _ = _case((1, 4, 4, 2), (3, 3, 2, 4))
  # A fresh function: jit caches a function's trace, whatever the backend's context was.
  return "custom_call" in jax.jit(lambda *a: conv_fn(*a)).lower(x, kernel).as_text()


def _tail_uses_kernel(tail) -> bool:
  z, bias = jnp.ones((2, 4, 4, 3)), jnp.zeros(3)
  return "custom_call" in jax.jit(lambda *a: tail(*a)).lower(z, bias).as_text()


def test_auto_runs_the_shifted_slices_where_the_kernels_do_not(monkeypatch):
  """This process fakes 8 CPU devices (conftest), where ``"auto"`` never runs a kernel (XLA's
  partitioner would gather a custom call's operands); nor does it on the XLA backend."""
  assert jax.device_count() > 1
  assert not _uses_kernel(cifar10.conv_function("auto"))
  assert not _tail_uses_kernel(cifar10.tail_function("auto"))
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.setenv("LEARNED_OPT_BACKEND", "xla")
  assert not _uses_kernel(cifar10.conv_function("auto"))
  assert not _tail_uses_kernel(cifar10.tail_function("auto"))


@needs_compiler
def test_auto_runs_the_kernel_on_a_one_device_cpu(monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.delenv("LEARNED_OPT_BACKEND", raising=False)
  assert _uses_kernel(cifar10.conv_function("auto"))
  assert _uses_kernel(cifar10.conv_function("cpu_kernel"))
  assert _tail_uses_kernel(cifar10.tail_function("auto"))
  assert _tail_uses_kernel(cifar10.tail_function("cpu_kernel"))


def test_an_unknown_conv_impl_names_the_choices():
  for choose in (cifar10.conv_function, cifar10.tail_function):
    with pytest.raises(ValueError, match="cpu_kernel"):
      choose("cudnn")


@needs_compiler
def test_a_twice_differentiated_loss_runs_xla_where_auto_would_run_a_kernel(monkeypatch):
  """A second-order meta-gradient differentiates the optimizee's gradient: inside
  ``twice_differentiable`` "auto" runs XLA's ops (a kernel's backward has no derivative), and
  "cpu_kernel" says so."""
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.delenv("LEARNED_OPT_BACKEND", raising=False)
  x, kernel, _ = _case((2, 4, 4, 2), (3, 3, 2, 4))
  conv_auto = cifar10.conv_function("auto")
  with backend_lib.twice_differentiable():
    assert not _uses_kernel(conv_auto)
    gradient = jax.grad(lambda k: jnp.sum(jnp.sin(conv_auto(x, k))))
    hessian_row = jax.grad(lambda k: jnp.sum(gradient(k) ** 2))(kernel)
    with pytest.raises(backend_lib.KernelUnavailable, match="differentiated twice"):
      cifar10.conv_function("cpu_kernel")(x, kernel)
  reference = jax.grad(
    lambda k: jnp.sum(jax.grad(lambda k: jnp.sum(jnp.sin(cifar10.conv_xla(x, k))))(k) ** 2)
  )
  np.testing.assert_allclose(hessian_row, reference(kernel), rtol=1e-4, atol=1e-5)
  assert _uses_kernel(conv_auto)  # outside it, the kernel again
