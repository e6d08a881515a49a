"""Truncated unrolls of a learned optimizer on a task: the meta-objective of eq. (3).

``meta_loss`` runs ``T`` optimizee steps with ``lax.scan`` and returns ``sum_t w_t f(theta_t)``
with ``w_t = 1`` (``objective="sum"``, the paper's), differentiable in phi; ``objective="log_sum"``
returns ``sum_t log f(theta_t)`` instead, whose gradient weighs step t by ``1 / f(theta_t)`` so that
a relative gain late in a run counts as much as the same relative gain early on;
``objective="ramp"`` sets ``w_t = t / horizon`` (t counted from the problem's start), which moves
the weight toward the end of a run, where the evaluation reads the loss. The optimizee
gradient is wrapped in ``stop_gradient`` (the paper's assumption d grad / d phi = 0, the dashed
edges of Figure 2) unless ``second_order=True``.
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from learned_opt.base import LearnedOptimizer, MetaParams
from tasks.base import TaskFamily

OBJECTIVES = ("sum", "log_sum", "ramp")
LOG_FLOOR = 1e-8  # log_sum clamps f at this floor, so a loss of exactly 0 stays finite.


class InnerState(NamedTuple):
  """One optimizee problem in flight; batched, every field gains a leading problems axis."""

  task_params: chex.ArrayTree  # the problem instance
  params: chex.ArrayTree  # theta_t
  opt_state: chex.ArrayTree  # the learned optimizer's state
  step: jax.Array  # int32 (), optimizee steps taken since the problem was sampled
  data_key: jax.Array  # PRNG key; minibatch t is drawn with fold_in(data_key, t)


def init_inner(
  task: TaskFamily, optimizer: LearnedOptimizer, meta_params: MetaParams, key: jax.Array
) -> InnerState:
  """Samples a problem and its theta_0 from ``key`` and starts the optimizer on it."""
  sample_key, init_key, data_key = jax.random.split(key, 3)
  task_params = task.sample(sample_key)
  params = task.init(task_params, init_key)
  opt_state = optimizer.init_state(meta_params, params)
  return InnerState(task_params, params, opt_state, jnp.zeros((), jnp.int32), data_key)


def init_inner_batch(task, optimizer, meta_params, key: jax.Array, num_problems: int):
  """``init_inner`` for ``num_problems`` problems; fields gain a leading (problems,) axis."""
  keys = jax.random.split(key, num_problems)
  return jax.vmap(lambda k: init_inner(task, optimizer, meta_params, k))(keys)


def unroll(
  task: TaskFamily,
  optimizer: LearnedOptimizer,
  meta_params: MetaParams,
  inner: InnerState,
  num_steps: int,
  second_order: bool = False,
) -> tuple[jax.Array, InnerState]:
  """Runs ``num_steps`` optimizee steps on one problem.

  Returns:
    ``(losses, inner)``: ``losses`` shaped (num_steps,) holds f(theta_1) ... f(theta_T), each
    a differentiable function of phi; ``inner`` is the state after the last step.
  """

  def step(state: InnerState, _):
    batch_key = jax.random.fold_in(state.data_key, state.step)
    loss, grads = jax.value_and_grad(task.loss, argnums=1)(
      state.task_params, state.params, batch_key
    )
    if not second_order:
      grads = jax.lax.stop_gradient(grads)  # d grad / d phi = 0 (section 2).
    updates, opt_state = optimizer.update(meta_params, grads, state.opt_state)
    params = optax.apply_updates(state.params, updates)
    return state._replace(params=params, opt_state=opt_state, step=state.step + 1), loss

  inner, losses = jax.lax.scan(step, inner, length=num_steps)
  final_key = jax.random.fold_in(inner.data_key, inner.step)
  final = task.loss(inner.task_params, inner.params, final_key)
  # losses[0] is f(theta_0), fixed before this truncation; the objective is f(theta_1..T).
  return jnp.concatenate([losses[1:], final[None]]), inner


def meta_loss(
  meta_params: MetaParams,
  inner: InnerState,
  *,
  task: TaskFamily,
  optimizer: LearnedOptimizer,
  num_steps: int,
  second_order: bool = False,
  objective: str = "sum",
  horizon: int | None = None,
) -> tuple[jax.Array, tuple[jax.Array, InnerState]]:
  """Eq. (3), averaged over a batch of problems.

  Args:
    meta_params: phi.
    inner: a batch of problems in flight, leading axis (problems,).
    objective: ``"sum"`` of f(theta_t) (w_t = 1, the paper's); ``"log_sum"`` of log f(theta_t),
      for tasks whose loss is positive (cross-entropy), f clamped at ``LOG_FLOOR``; or
      ``"ramp"``, the sum of (t / horizon) f(theta_t) with t the step since the problem's start.
    horizon: steps per problem; required by ``"ramp"``.

  Returns:
    ``(loss, (losses, inner))``: the scalar mean over problems of the objective; the
    per-step losses shaped (problems, num_steps); the batch after the truncation, with its
    gradient path to phi cut so the next truncation starts afresh (truncated BPTT).
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"Unknown meta-objective {objective!r}; choose one of {OBJECTIVES}.")
  if objective == "ramp" and not (horizon and horizon > 0):
    raise ValueError(
      f"The ramp objective needs a positive horizon, got {horizon!r}; pass the steps per problem "
      "(--horizon), by which it divides t."
    )
  start = inner.step  # (problems,) steps taken before this truncation
  run = lambda state: unroll(task, optimizer, meta_params, state, num_steps, second_order)
  losses, inner = jax.vmap(run)(inner)
  if objective == "log_sum":
    per_step = jnp.log(jnp.maximum(losses, LOG_FLOOR))
  elif objective == "ramp":  # losses[:, i] is f(theta_{start + i + 1}).
    t = start[:, None] + jnp.arange(1, num_steps + 1)[None, :]
    per_step = (t / horizon) * losses
  else:
    per_step = losses
  return jnp.mean(jnp.sum(per_step, axis=1)), (losses, jax.lax.stop_gradient(inner))
