"""The Gram matrix ``F^T F / n`` of features (..., n, c) by a CPU kernel (``gram.cc``).

Neural art's style loss (``tasks.neural_art.gram``) takes it at every style layer, every step;
the kernel computes the upper triangle by register-tiled matmuls and mirrors it. Not
differentiable on its own: ``tasks.neural_art`` calls it for the value inside a ``custom_jvp``
whose derivative is XLA's. Leading dimensions (and ``jax.vmap``) are groups, each its own Gram.
Agrees with XLA's ``F^T F / n`` to float rounding (sums in another order), and does not depend on
the thread count.
"""

import os

import jax
import jax.numpy as jnp

from learned_opt.kernels import loading

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gram.cc")
HANDLERS = ("LearnedOptGram",)


def targets() -> tuple[str, ...]:
  """The registered FFI target (``HANDLERS``), built on first use.

  Raises:
    KernelUnavailable: as ``loading.targets``.
  """
  return loading.targets(SOURCE, HANDLERS)


def gram(names: tuple[str, ...], features: jax.Array) -> jax.Array:
  """``F^T F / n`` by the kernel.

  Args:
    names: the FFI target, ``targets()``.
    features: (..., n, c), float32.

  Returns:
    (..., c, c).
  """
  c = features.shape[-1]
  out = jax.ShapeDtypeStruct(features.shape[:-2] + (c, c), jnp.float32)
  return jax.ffi.ffi_call(names[0], out, vmap_method="broadcast_all")(features)
