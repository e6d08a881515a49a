"""How the tasks' conv layers run: a 'SAME' stride-1 convolution and the CIFAR-10 net's tail.

On XLA CPU a ``lax.conv_general_dilated`` inside the ``lax.scan`` of an unroll is ~25x slower
than outside it (``../shared/probes/conv_in_scan.py``), so a convolution is one of
``CONV_IMPLS``, all computing the same function: ``"cpu_kernel"``, a direct convolution by a C++
kernel (``learned_opt.kernels.conv``); ``"shift"``, im2col by shifted slices and one matmul in
XLA; ``"xla"``, the library convolution (cuDNN on GPU). ``"auto"`` (``conv_function``) picks the
kernel where the CPU kernels run, the shifted slices elsewhere on CPU, the library on GPU and TPU.
With the kernel, the rest of a CIFAR-10 conv layer (batch norm, pooling, ReLU: ``conv_tail``)
runs as CPU kernels too (``tail_function``). Used by ``tasks.cifar10``, ``tasks.neural_art`` and
``tasks.image_nets``.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from learned_opt import backend as backend_lib
from learned_opt.kernels import bn_pool
from learned_opt.kernels import conv as conv_kernels

BATCH_NORM_EPSILON = 1e-5


def conv_shift(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' stride-1 convolution as im2col by shifted slices, then one matmul.

  Args:
    x: (batch, height, width, in_channels).
    kernel: (kh, kw, in_channels, out_channels), odd kh and kw (HWIO, as ``conv_xla``).

  Returns:
    (batch, height, width, out_channels).
  """
  kh, kw, c_in, c_out = kernel.shape
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  # Column order (i, j, channel) is the row-major order of kernel.reshape(kh * kw * c_in, ...).
  columns = [padded[:, i : i + height, j : j + width, :] for i in range(kh) for j in range(kw)]
  return jnp.concatenate(columns, axis=-1) @ kernel.reshape(kh * kw * c_in, c_out)


def conv_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``conv_shift``'s function by ``lax.conv_general_dilated`` (cuDNN on GPU)."""
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def max_pool(x: jax.Array) -> jax.Array:
  """2 x 2 max pooling, stride 2: (..., h, w, c) -> (..., h // 2, w // 2, c)."""
  *lead, h, w, c = x.shape
  return x.reshape(*lead, h // 2, 2, w // 2, 2, c).max(axis=(-4, -2))


def batch_norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Normalizes each feature by the minibatch's mean and variance over ``axes``; same shape."""
  mean = jnp.mean(x, axis=axes, keepdims=True)
  variance = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(variance + BATCH_NORM_EPSILON)


def conv_tail(z: jax.Array, bias: jax.Array) -> jax.Array:
  """A hidden conv layer after its convolution, ``relu(max_pool(batch_norm(z) + bias))``, in XLA.

  Args:
    z: the convolution's output (batch, h, w, c), h and w even.
    bias: (c,), batch norm's offset.

  Returns:
    (batch, h // 2, w // 2, c).
  """
  return jax.nn.relu(max_pool(batch_norm(z, axes=(0, 1, 2)) + bias))


def on_kernels(backend: str, family, kernel: Callable, cpu_xla: Callable, other_xla: Callable):
  """``fn(*arrays)``: ``kernel(names, *arrays)`` where ``backend`` runs the kernels of
  ``family`` when traced (``learned_opt.backend.kernel_targets``), else XLA's ops: ``cpu_xla`` on
  a CPU, ``other_xla`` on GPU and TPU. ``"cpu_kernels"`` raises where the kernels cannot run."""

  def run(*arrays):
    names = backend_lib.kernel_targets(backend, *arrays, family=family)
    if names is not None:
      return kernel(names, *arrays)
    return (cpu_xla if jax.default_backend() == "cpu" else other_xla)(*arrays)

  return run


def _tail_kernel(names, z, bias):
  return bn_pool.bn_pool_relu(names, z, bias, BATCH_NORM_EPSILON)


def _conv_on(backend: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  return on_kernels(backend, conv_kernels.targets, conv_kernels.conv2d, conv_shift, conv_xla)


def _tail_on(backend: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  return on_kernels(backend, bn_pool.targets, _tail_kernel, conv_tail, conv_tail)


def conv_cpu_kernel(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``conv_shift``'s function by the direct CPU kernel (``learned_opt.kernels.conv``).

  Raises:
    KernelUnavailable: not on a CPU, not float32, or the kernel does not build (saying why).
  """
  return _conv_on("cpu_kernels")(x, kernel)


CONV_IMPLS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
  "cpu_kernel": conv_cpu_kernel,
  "shift": conv_shift,
  "xla": conv_xla,
}
CONV_CHOICES = ("auto", *CONV_IMPLS)


def _checked(conv_impl: str) -> None:
  """Raises a ``ValueError`` naming the choices for a ``conv_impl`` not in ``CONV_CHOICES``."""
  if conv_impl not in CONV_CHOICES:
    raise ValueError(f"Unknown conv_impl {conv_impl!r}; choose one of {CONV_CHOICES}.")


def conv_function(conv_impl: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The convolution ``conv_impl`` names (one of ``CONV_CHOICES``).

  ``"auto"`` follows the learned optimizers' backend (``learned_opt.backend.default()``, read
  now): where that backend runs the CPU kernels (a one-device float32 CPU process where they
  build, for ``"auto"``) the direct kernel, elsewhere on CPU ``conv_shift``, on GPU and TPU
  ``conv_xla``; decided when the loss is traced.

  Raises:
    ValueError: an unknown ``conv_impl``, naming the choices.
  """
  _checked(conv_impl)
  return _conv_on(backend_lib.default()) if conv_impl == "auto" else CONV_IMPLS[conv_impl]


def tail_function(conv_impl: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The conv layers' tail (``conv_tail``'s function) that goes with ``conv_function(conv_impl)``:
  the CPU kernels where that convolution is the CPU kernel, XLA's ops elsewhere."""
  _checked(conv_impl)
  if conv_impl == "auto":
    return _tail_on(backend_lib.default())
  return _tail_on("cpu_kernels") if conv_impl == "cpu_kernel" else conv_tail
