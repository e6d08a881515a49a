"""A conv layer's tail in the CIFAR-10 net by the CPU kernels (``bn_pool.cc``), differentiable.

``bn_pool_relu(targets(), z, bias)`` computes ``relu(max_pool(batch_norm(z) + bias))`` as
``tasks.cifar10.convnet_logits`` does (batch statistics over (n, h, w) per channel, epsilon
``tasks.cifar10.BATCH_NORM_EPSILON``; 2 x 2 max pooling, ties sharing the cotangent as XLA's
reduce_max does) in two passes over ``z`` forward and two backward, recomputing the normalized
values and window maxima instead of saving masks. Under ``jax.vmap`` the mapped axis is a group
with its own statistics and bias. Results agree with XLA's to float rounding.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from learned_opt.kernels import loading

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bn_pool.cc")
HANDLERS = ("LearnedOptBnPoolForward", "LearnedOptBnPoolBackward")


def targets() -> tuple[str, ...]:
  """The registered FFI targets (``HANDLERS``' order), built on first use.

  Raises:
    KernelUnavailable: as ``loading.targets``.
  """
  return loading.targets(SOURCE, HANDLERS)


def _forward(names, z, bias, epsilon):
  pooled = z.shape[:-3] + (z.shape[-3] // 2, z.shape[-2] // 2, z.shape[-1])
  stats = jax.ShapeDtypeStruct(bias.shape, jnp.float32)
  out = (jax.ShapeDtypeStruct(pooled, jnp.float32), stats, stats)
  call = jax.ffi.ffi_call(names[0], out, vmap_method="broadcast_all")
  return call(z, bias, epsilon=np.float32(epsilon))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def bn_pool_relu(names: tuple[str, ...], z: jax.Array, bias: jax.Array, epsilon: float):
  """``relu(max_pool(batch_norm(z) + bias))`` by the kernels.

  Args:
    names: the FFI targets, ``targets()``.
    z: (batch, height, width, channels), float32, even height and width.
    bias: (channels,), float32.
    epsilon: added to the variance.

  Returns:
    (batch, height / 2, width / 2, channels).
  """
  return _forward(names, z, bias, epsilon)[0]


def _vjp_forward(names, z, bias, epsilon):
  out, mean, rstd = _forward(names, z, bias, epsilon)
  return out, (z, bias, mean, rstd)


def _vjp_backward(names, epsilon, saved, d_out):
  del epsilon  # in the saved statistics
  z, bias, mean, rstd = saved
  out = (jax.ShapeDtypeStruct(z.shape, jnp.float32), jax.ShapeDtypeStruct(bias.shape, jnp.float32))
  call = jax.ffi.ffi_call(names[1], out, vmap_method="broadcast_all")
  return tuple(call(z, bias, mean, rstd, d_out))


bn_pool_relu.defvjp(_vjp_forward, _vjp_backward)
