"""The direct convolution kernel (learned_opt/kernels/conv.py) against XLA's convolution, and the
tasks' choice of convolution (``tasks.cifar10.conv_function``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_opt.kernels import build as kernel_build
from learned_opt.kernels import conv
from tasks import cifar10

needs_compiler = pytest.mark.skipif(
  kernel_build.compiler() is None, reason="no C++ compiler (c++, g++ or $CXX) to build the kernel"
)


@pytest.fixture(scope="module")
def names():
  return conv.targets()


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
    ((1, 4, 4, 33), (1, 1, 33, 3)),  # a 1 x 1 kernel, 3 outputs: a partial vector
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
def test_the_cifar10_net_has_the_same_loss_and_gradient_on_the_kernel():
  """The whole net (convolutions, batch norm, pooling) by ``"cpu_kernel"`` and ``"shift"``."""
  sizes = cifar10.layer_sizes((4, 8), 16, 10)
  params = cifar10.init_convnet(jax.random.key(0), sizes)
  x = jax.random.normal(jax.random.key(1), (6, 32, 32, 3))
  labels = jnp.arange(6) % 10

  def loss(params, conv_fn):
    logits = cifar10.convnet_logits(params, x, conv_fn)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  both = jax.jit(
    lambda p: [jax.value_and_grad(loss)(p, cifar10.CONV_IMPLS[n]) for n in ("cpu_kernel", "shift")]
  )
  (loss_k, grad_k), (loss_s, grad_s) = both(params)
  np.testing.assert_allclose(loss_k, loss_s, rtol=1e-5)
  for g_k, g_s in zip(jax.tree.leaves(grad_k), jax.tree.leaves(grad_s), strict=True):
    np.testing.assert_allclose(g_k, g_s, rtol=1e-3, atol=1e-5)
  assert min(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_k)) > 1e-4  # none all zero


def _uses_kernel(conv_fn) -> bool:
  x, kernel, _ = _case((1, 4, 4, 2), (3, 3, 2, 4))
  return "custom_call" in jax.jit(conv_fn).lower(x, kernel).as_text()


def test_auto_runs_the_shifted_slices_where_the_kernels_do_not(monkeypatch):
  """This process fakes 8 CPU devices (conftest), where ``"auto"`` never runs a kernel (XLA's
  partitioner would gather a custom call's operands); nor does it on the XLA backend."""
  assert jax.device_count() > 1
  assert not _uses_kernel(cifar10.conv_function("auto"))
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.setenv("LEARNED_OPT_BACKEND", "xla")
  assert not _uses_kernel(cifar10.conv_function("auto"))


@needs_compiler
def test_auto_runs_the_kernel_on_a_one_device_cpu(monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.delenv("LEARNED_OPT_BACKEND", raising=False)
  assert _uses_kernel(cifar10.conv_function("auto"))
  assert _uses_kernel(cifar10.conv_function("cpu_kernel"))


def test_an_unknown_conv_impl_names_the_choices():
  with pytest.raises(ValueError, match="cpu_kernel"):
    cifar10.conv_function("cudnn")
