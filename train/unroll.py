"""Truncated unrolls of a learned optimizer on a task: the meta-objective of eq. (3).

``meta_loss`` runs ``T`` optimizee steps (``train.inner``, ``lax.scan``) and returns
``sum_t w_t f(theta_t)`` with ``w_t = 1`` (``objective="sum"``, the paper's), differentiable in
phi; ``objective="log_sum"`` returns ``sum_t log f(theta_t)`` instead, whose gradient weighs step t
by ``1 / f(theta_t)`` so that a relative gain late in a run counts as much as the same relative
gain early on; ``objective="ramp"`` sets ``w_t = t / horizon`` (t counted from the problem's
start), which moves the weight toward the end of a run, where the evaluation reads the loss. The
optimizee gradient is wrapped in ``stop_gradient`` (the paper's assumption d grad / d phi = 0, the
dashed edges of Figure 2) unless ``second_order=True``.
"""

import jax
import jax.numpy as jnp

import learned_opt
from learned_opt.base import LearnedOptimizer, MetaParams
from tasks.base import Data, TaskFamily
from train import inner as inner_lib
from train.inner import InnerState

OBJECTIVES = ("sum", "log_sum", "ramp")
LOG_FLOOR = 1e-8  # log_sum clamps f at this floor, so a loss of exactly 0 stays finite.


def init_inner(
  task: TaskFamily,
  optimizer: LearnedOptimizer,
  meta_params: MetaParams,
  data: Data,
  key: jax.Array,
) -> InnerState:
  """Samples a problem and its theta_0 from ``key`` and starts the optimizer on it."""
  sample_key, init_key, data_key = jax.random.split(key, 3)
  tx = learned_opt.as_optax(optimizer, meta_params)
  return inner_lib.start(task, tx, data, task.sample(data, sample_key), init_key, data_key)


def init_inner_batch(task, optimizer, meta_params, data, key: jax.Array, num_problems: int):
  """``init_inner`` for ``num_problems`` problems; fields gain a leading (problems,) axis."""
  keys = jax.random.split(key, num_problems)
  return jax.vmap(lambda k: init_inner(task, optimizer, meta_params, data, k))(keys)


def unroll(
  task: TaskFamily,
  optimizer: LearnedOptimizer,
  meta_params: MetaParams,
  data: Data,
  inner: InnerState,
  num_steps: int,
  second_order: bool = False,
) -> tuple[jax.Array, InnerState]:
  """Runs ``num_steps`` optimizee steps on one problem.

  Returns:
    ``(losses, inner)``: ``losses`` shaped (num_steps,) holds f(theta_1) ... f(theta_T), each
    a differentiable function of phi; ``inner`` is the state after the last step.
  """
  # Differentiated w.r.t. phi under vmap: the optimizer's own update, on its own backend.
  tx = learned_opt.as_optax(optimizer, meta_params)
  losses, inner = inner_lib.run(task, tx, data, inner, num_steps, second_order)
  # losses[0] is f(theta_0), fixed before this truncation; the objective is f(theta_1..T).
  return losses[1:], inner


def meta_loss(
  meta_params: MetaParams,
  inner: InnerState,
  data: Data,
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
    data: the task's data set, shared by every problem (not batched).
    objective: ``"sum"`` of f(theta_t) (w_t = 1, the paper's); ``"log_sum"`` of log f(theta_t),
      for tasks whose loss is positive (cross-entropy), f clamped at ``LOG_FLOOR``; or
      ``"ramp"``, the sum of (t / horizon) f(theta_t) with t the step since the problem's start.
    horizon: steps per problem; required by ``"ramp"``.

  Returns:
    ``(loss, (losses, inner))``: the scalar mean over problems of the objective; the
    per-step losses shaped (problems, num_steps); the batch after the truncation, with its
    gradient path to phi cut so the next truncation starts afresh (truncated BPTT).
  """
  check_objective(objective, horizon)
  start = inner.step  # (problems,) steps taken before this truncation
  run = lambda state: unroll(task, optimizer, meta_params, data, state, num_steps, second_order)
  losses, inner = jax.vmap(run)(inner)
  loss = objective_value(losses, start, objective, horizon)
  return loss, (losses, jax.lax.stop_gradient(inner))


def objective_value(losses: jax.Array, start: jax.Array, objective: str, horizon) -> jax.Array:
  """``meta_loss``'s scalar from the per-step losses (problems, steps), f(theta_1..T), of
  problems that had taken ``start`` (problems,) steps before the truncation."""
  check_objective(objective, horizon)
  if objective == "log_sum":
    per_step = jnp.log(jnp.maximum(losses, LOG_FLOOR))
  elif objective == "ramp":  # losses[:, i] is f(theta_{start + i + 1}).
    t = start[:, None] + jnp.arange(1, losses.shape[1] + 1)[None, :]
    per_step = (t / horizon) * losses
  else:
    per_step = losses
  return jnp.mean(jnp.sum(per_step, axis=1))


def check_objective(objective: str, horizon) -> None:
  """Raises a ValueError naming the fix for an unknown objective or a ramp without a horizon."""
  if objective not in OBJECTIVES:
    raise ValueError(f"Unknown meta-objective {objective!r}; choose one of {OBJECTIVES}.")
  if objective == "ramp" and not (horizon and horizon > 0):
    raise ValueError(
      f"The ramp objective needs a positive horizon, got {horizon!r}; pass the steps per problem "
      "(--horizon), by which it divides t."
    )
