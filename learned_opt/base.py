"""The learned-optimizer interface (eq. 1): theta_{t+1} = theta_t + g_t(grad f(theta_t), phi)."""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

MetaParams = chex.ArrayTree  # phi: the optimizer's own weights.
Params = chex.ArrayTree  # theta: the optimizee's parameters.
State = chex.ArrayTree  # per-coordinate (and, for some variants, shared) optimizer state.


class LearnedOptimizer(NamedTuple):
  """A learned update rule as a triple of pure functions plus the settings that rebuild it.

  Attributes:
    init_meta_params: ``key -> phi``.
    init_state: ``(phi, params) -> state``; per-coordinate state shaped ``leaf.shape + (...,)``.
    update: ``(phi, grads, state) -> (updates, state)``; updates are additive, like optax's.
    config: JSON-serializable settings; ``learned_opt.build(config)`` rebuilds the optimizer.
    backend: how ``update`` executes (``learned_opt.backend``): ``"auto"``, ``"xla"`` or
      ``"cpu_kernels"``; not part of ``config``, since it changes no math (results agree to
      ~1e-6). ``learned_opt.with_backend(optimizer, backend)`` rebuilds it for another.
  """

  init_meta_params: Callable[[jax.Array], MetaParams]
  init_state: Callable[[MetaParams, Params], State]
  update: Callable[[MetaParams, Params, State], tuple[Params, State]]
  config: Mapping[str, Any]
  backend: str = "auto"


class CoordinateState(NamedTuple):
  """LSTM state of every coordinate of one parameter leaf (the LSTM optimizers, NTM controllers)."""

  hidden: jax.Array  # leaf.shape + (layers, hidden_size), float32
  cell: jax.Array  # leaf.shape + (layers, hidden_size), float32


class SavedOptimizer(NamedTuple):
  """A learned optimizer with its weights phi, as ``learned_opt.load`` and ``pretrained`` return.

  Example:
    >>> tx = learned_opt.as_optax(learned_opt.load("runs/quadratic"))
  """

  optimizer: LearnedOptimizer
  meta_params: MetaParams


def check_float_params(params: Params) -> None:
  """Raises a ``TypeError`` naming every leaf that is not a floating-point array."""
  bad = [
    f"{jax.tree_util.keystr(path)} ({jnp.result_type(leaf)})"
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
  ]
  if bad:
    raise TypeError(
      "Learned optimizers update floating-point parameters only; these leaves are not: "
      + ", ".join(bad)
      + ". Cast them to float, or leave them out with optax.masked / optax.partition."
    )
