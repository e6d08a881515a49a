"""Gradient preprocessing for coordinatewise optimizers (section 2.1, Appendix A).

Each function maps gradients shaped ``s`` to optimizer inputs shaped ``s + (features,)``.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

Preprocessor = Callable[[jax.Array], jax.Array]

PREPROCESSORS = ("none", "scale", "log_sign")


def identity(grad: jax.Array) -> jax.Array:
  """No preprocessing: one feature, the gradient itself. Shape ``s -> s + (1,)``."""
  return grad[..., None]


def scale(grad: jax.Array, factor: float) -> jax.Array:
  """Rescales by a constant shared across steps and functions. Shape ``s -> s + (1,)``."""
  return (factor * grad)[..., None]


def log_sign(grad: jax.Array, p: float = 10.0) -> jax.Array:
  """Appendix A: ``(log|g| / p, sgn g)`` if ``|g| >= e^-p`` else ``(-1, e^p g)``.

  Finite for every input: ``g = 0`` takes the second branch, giving ``(-1, 0)``, and
  ``g = +-inf`` gives ``(inf, +-1)`` clipped to ``(log(float max) / p, +-1)``.

  Args:
    grad: gradients, any shape ``s``.
    p: how small a gradient is disregarded; the paper uses 10.

  Returns:
    Array shaped ``s + (2,)``.
  """
  grad = jnp.asarray(grad)
  magnitude = jnp.abs(grad)
  big = magnitude >= jnp.exp(-p)
  # Replace small magnitudes before the log so that neither branch, nor its gradient, is NaN.
  finfo = jnp.finfo(grad.dtype)
  safe = jnp.clip(jnp.where(big, magnitude, 1.0), 0.0, finfo.max)
  first = jnp.where(big, jnp.log(safe) / p, -1.0)
  second = jnp.where(big, jnp.sign(grad), jnp.exp(p) * jnp.where(big, 0.0, grad))
  return jnp.stack([first, second], axis=-1)


def make(name: str, *, p: float = 10.0, factor: float = 1.0) -> tuple[Preprocessor, int]:
  """Returns ``(preprocess_fn, num_features)`` for a preprocessing name."""
  if name == "none":
    return identity, 1
  if name == "scale":
    return (lambda g: scale(g, factor)), 1
  if name == "log_sign":
    if p <= 0:
      raise ValueError(f"log_sign preprocessing needs p > 0, got p={p}; the paper uses p=10.")
    return (lambda g: log_sign(g, p)), 2
  raise ValueError(f"Unknown preprocessing {name!r}; choose one of {PREPROCESSORS}.")
