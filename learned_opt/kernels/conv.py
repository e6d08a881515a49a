"""A 'SAME', stride-1 2-D convolution by the CPU kernels (``conv2d.cc``), differentiable.

``conv2d(targets(), x, kernel)`` computes ``lax.conv_general_dilated(x, kernel, (1, 1), "SAME")``
with NHWC ``x`` and HWIO ``kernel`` (odd kernel sizes, float32) as a direct convolution: no
im2col copy of the input, each output accumulated in registers. Its VJP takes the input's
gradient from the same kernel (the output's cotangent convolved with the flipped, transposed
kernel) and the kernel's gradient from a second one. Under ``jax.vmap`` the mapped axis is a
group of images with its own kernel (an unmapped kernel is broadcast). Results agree with XLA's
convolution to float rounding (sums in another order), and do not depend on the thread count.
"""

import functools
import os

import jax
import jax.numpy as jnp

from learned_opt.kernels import loading

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conv2d.cc")
HANDLERS = ("LearnedOptConvForward", "LearnedOptConvKernelGradient")


def targets() -> tuple[str, ...]:
  """The registered FFI targets (``HANDLERS``' order), built on first use.

  Raises:
    KernelUnavailable: no compiler, a failed build, an untrusted cache or a library that does
      not load (``loading.targets``).
  """
  return loading.targets(SOURCE, HANDLERS)


def _forward(names: tuple[str, ...], x: jax.Array, kernel: jax.Array) -> jax.Array:
  out = jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[-1:], jnp.float32)
  return jax.ffi.ffi_call(names[0], out, vmap_method="broadcast_all")(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def conv2d(names: tuple[str, ...], x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' stride-1 convolution by the kernels.

  Args:
    names: the FFI targets, ``targets()``.
    x: (batch, height, width, in_channels), float32.
    kernel: (kh, kw, in_channels, out_channels), odd kh and kw, float32.

  Returns:
    (batch, height, width, out_channels).
  """
  return _forward(names, x, kernel)


def _conv2d_vjp_forward(names, x, kernel):
  return _forward(names, x, kernel), (x, kernel)


def _conv2d_vjp_backward(names, saved, dy):
  x, kernel = saved
  # The input's gradient: dy convolved with the kernel flipped in space, in and out swapped.
  dx = _forward(names, dy, jnp.swapaxes(jnp.flip(kernel, (-4, -3)), -2, -1))
  dk = jax.ffi.ffi_call(
    names[1], jax.ShapeDtypeStruct(kernel.shape, jnp.float32), vmap_method="broadcast_all"
  )(x, dy)
  return dx, dk


conv2d.defvjp(_conv2d_vjp_forward, _conv2d_vjp_backward)
