"""The optax face of a learned optimizer: a ``GradientTransformationExtraArgs``."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from learned_opt.base import LearnedOptimizer, MetaParams

NAN_POLICIES = ("propagate", "zero")


class LearnedOptaxState(NamedTuple):
  """The learned optimizer's own state, wrapped for optax."""

  inner: chex.ArrayTree


def as_optax(
  optimizer: LearnedOptimizer, meta_params: MetaParams, *, nan_policy: str = "propagate"
) -> optax.GradientTransformationExtraArgs:
  """Wraps a learned optimizer with fixed weights phi as an optax transformation.

  ``update`` returns additive updates, so ``optax.apply_updates`` and ``optax.chain`` work
  unchanged; extra arguments such as ``value=`` are accepted and ignored.

  Args:
    optimizer: the learned optimizer, e.g. ``learned_opt.lstm_optimizer()``.
    meta_params: its weights phi, e.g. from ``learned_opt.load``.
    nan_policy: ``"propagate"`` (the default, like optax's own optimizers: a NaN gradient gives
      a NaN update, so the failure is visible) or ``"zero"`` (non-finite gradient entries are
      replaced by 0 before the optimizer sees them, so one bad coordinate does not spread
      through global averaging cells or shared memory).

  Example:
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  learned_opt.as_optax(*learned_opt.load("runs/quadratic")))
  """
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}.")

  def init_fn(params):
    return LearnedOptaxState(optimizer.init_state(meta_params, params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if not isinstance(state, LearnedOptaxState):
      raise TypeError(
        f"as_optax got state of type {type(state).__name__}; pass the state returned by this "
        "transformation's init(params)."
      )
    if nan_policy == "zero":
      updates = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0), updates)
    steps, inner = optimizer.update(meta_params, updates, state.inner)
    return steps, LearnedOptaxState(inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
