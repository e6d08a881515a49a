"""The optax face of a learned optimizer: a ``GradientTransformationExtraArgs``."""

import os
import warnings
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from learned_opt import backend as backend_lib
from learned_opt import registry
from learned_opt.base import LearnedOptimizer, MetaParams, SavedOptimizer

NAN_POLICIES = ("propagate", "zero")


class LearnedOptaxState(NamedTuple):
  """The learned optimizer's own state, wrapped for optax."""

  inner: chex.ArrayTree


def _unpack(optimizer, meta_params) -> tuple[LearnedOptimizer, MetaParams]:
  """``(optimizer, phi)`` from ``as_optax``'s arguments, or a ``TypeError`` saying what to pass."""
  if isinstance(optimizer, SavedOptimizer):
    if meta_params is not None:
      raise TypeError(
        "as_optax got a loaded optimizer, which holds its own meta_params, and meta_params too; "
        "pass as_optax(saved) alone."
      )
    return optimizer.optimizer, optimizer.meta_params
  if isinstance(optimizer, LearnedOptimizer):
    if meta_params is None:
      raise TypeError(
        "as_optax got a LearnedOptimizer without its weights phi; pass "
        "as_optax(optimizer, meta_params) (e.g. meta_params=optimizer.init_meta_params(key)) "
        "or a loaded optimizer: as_optax(learned_opt.load(path)) or "
        "as_optax(learned_opt.pretrained(name))."
      )
    return optimizer, meta_params
  hint = (
    f" To use the optimizer saved at {optimizer!r}, pass as_optax(learned_opt.load(path))."
    if isinstance(optimizer, str | os.PathLike)
    else ""
  )
  raise TypeError(
    f"as_optax takes a loaded optimizer (learned_opt.load(path) or learned_opt.pretrained(name)) "
    f"or (optimizer, meta_params), got {type(optimizer).__name__}.{hint}"
  )


def _check_fits(optimizer, meta_params, grads, inner) -> None:
  """Raises a ``ValueError`` naming the leaf if ``grads`` is not shaped like the params of
  ``init`` (checked on shapes only, at trace time under jit)."""
  expected = jax.eval_shape(optimizer.init_state, meta_params, grads)
  grad_paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(grads)]

  def leaf_of(state_path) -> str:
    for path in grad_paths:  # the gradient leaf whose path lies inside the state leaf's path
      n = len(path)
      if any(state_path[i : i + n] == path for i in range(len(state_path) - n + 1)) and n:
        return f"gradient leaf {jax.tree_util.keystr(path)}"
    return f"state leaf {jax.tree_util.keystr(state_path)}"

  hint = "pass gradients with the tree and shapes of the params given to init(params)."
  got = jax.tree_util.tree_leaves_with_path(inner)
  want = jax.tree_util.tree_leaves_with_path(expected)
  if jax.tree.structure(inner) != jax.tree.structure(expected):
    got_paths, want_paths = {p for p, _ in got}, {p for p, _ in want}
    extra = sorted(want_paths - got_paths, key=str)
    missing = sorted(got_paths - want_paths, key=str)
    if extra:
      where = f"{leaf_of(extra[0])} is not in the state"
    elif missing:
      where = f"no gradient for state leaf {jax.tree_util.keystr(missing[0])}"
    else:
      where = "the same leaves in another tree"
    raise ValueError(
      f"as_optax: the gradients' tree differs from the one the state was made for ({where}); "
      + hint
    )
  for (path, g), (_, w) in zip(got, want, strict=True):
    if jnp.shape(g) != w.shape:
      raise ValueError(
        f"as_optax: {leaf_of(path)} has a shape that does not fit the state made by init "
        f"(state {jax.tree_util.keystr(path)}: {jnp.shape(g)}, these gradients need {w.shape}); "
        + hint
      )


def as_optax(
  optimizer: SavedOptimizer | LearnedOptimizer,
  meta_params: MetaParams | None = None,
  *,
  nan_policy: str = "propagate",
  backend: str | None = None,
  kernel: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps a learned optimizer with fixed weights phi as an optax transformation.

  ``update`` returns additive updates (eq. 1's ``g_t``), so ``optax.apply_updates`` and
  ``optax.chain`` work unchanged; extra arguments such as ``value=`` are accepted and ignored.

  Args:
    optimizer: a loaded optimizer (``learned_opt.load(path)``, ``learned_opt.pretrained(name)``), or
      a ``LearnedOptimizer`` whose weights come as ``meta_params``.
    meta_params: phi, only with a bare ``LearnedOptimizer``, e.g.
      ``optimizer.init_meta_params(key)``.
    nan_policy: ``"propagate"`` (the default, like optax's own optimizers: a NaN or infinite
      gradient entry gives a NaN update, so the failure is visible; an infinite entry is made
      NaN first, since the LSTM's bounded read-out would otherwise turn it into a small finite
      step, in the wrong direction for -inf) or ``"zero"`` (non-finite gradient entries are
      replaced by 0 before the optimizer sees them, so one bad coordinate does not spread
      through global averaging cells or shared memory).
    backend: how the update executes (``learned_opt.backend``): ``"auto"`` (the CPU kernels,
      compiled on first use, on a CPU backend with one device; XLA elsewhere), ``"xla"``
      (nothing compiled; any device) or ``"cpu_kernels"`` (insists: ``KernelUnavailable`` from
      the traced update where they cannot be had). None (the default): the optimizer's own
      (``optimizer.backend``, chosen when it was built or loaded). Results agree to ~1e-6.
    kernel: deprecated spelling of ``backend`` (``"fused"`` is ``"cpu_kernels"``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is a ``LearnedOptaxState``.

  Raises:
    TypeError: for anything but the two forms above (e.g. a path, or an optimizer without phi).
    ValueError: an unknown ``nan_policy`` or ``backend``, or ``"cpu_kernels"`` for an optimizer
      without a kernel path.

  Example:
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  learned_opt.as_optax(learned_opt.pretrained("mnist_mlp")))
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params)
  """
  optimizer, meta_params = _unpack(optimizer, meta_params)
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}.")
  if kernel is not None:
    if backend is not None:
      raise TypeError("as_optax got backend and its deprecated spelling kernel; pass backend.")
    warnings.warn(
      "as_optax(kernel=...) is deprecated; pass backend='auto', 'xla' or 'cpu_kernels'.",
      DeprecationWarning,
      stacklevel=2,
    )
    backend = backend_lib.checked(kernel, "kernel")
  if backend is not None:
    optimizer = registry.with_backend(optimizer, backend)
  learned_update = optimizer.update

  def init_fn(params):
    return LearnedOptaxState(optimizer.init_state(meta_params, params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if not isinstance(state, LearnedOptaxState):
      raise TypeError(
        f"as_optax got state of type {type(state).__name__}; pass the state returned by this "
        "transformation's init(params)."
      )
    _check_fits(optimizer, meta_params, updates, state.inner)
    replacement = 0 if nan_policy == "zero" else jnp.nan
    updates = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, replacement), updates)
    steps, inner = learned_update(meta_params, updates, state.inner)
    return steps, LearnedOptaxState(inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
