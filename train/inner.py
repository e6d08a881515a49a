"""The optimizee's step: the one place where any optimizer, learned or not, touches a task.

One step is "minibatch loss and gradient -> (stop_gradient) -> optimizer update -> apply"
(eq. 1, Figure 2). Meta-training (``train.unroll``), validation, evaluation (``eval.engine``, whose
extra readings of theta_t are ``run``'s ``observe`` hook) and the update visualizations
(``eval.visualize``) all run it; a learned optimizer reaches it only as an optax transformation,
``learned_opt.as_optax(optimizer, phi)``, so phi has one door. Runs of plain
(non-differentiated) optimization over many problems, ``rollout_batch``, live here too.
"""

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from learned_opt import backend as backend_lib
from tasks.base import Data, TaskFamily


class InnerState(NamedTuple):
  """One optimizee problem in flight; batched, every field gains a leading problems axis."""

  task_params: chex.ArrayTree  # the problem instance
  params: chex.ArrayTree  # theta_t
  opt_state: optax.OptState  # the optimizer's state (tx.init(theta_0), then updated)
  step: jax.Array  # int32 (), optimizee steps taken since the problem was sampled
  data_key: jax.Array  # PRNG key; minibatch t is drawn with fold_in(data_key, t)


def start(
  task: TaskFamily,
  tx: optax.GradientTransformation,
  data: Data,
  task_params: chex.ArrayTree,
  init_key: jax.Array,
  data_key: jax.Array,
) -> InnerState:
  """theta_0 drawn with ``init_key`` and the optimizer's initial state, at step 0."""
  params = task.init(data, task_params, init_key)
  return InnerState(task_params, params, tx.init(params), jnp.zeros((), jnp.int32), data_key)


def minibatch_key(state: InnerState) -> jax.Array:
  """The key of the minibatch at the state's step: ``fold_in(data_key, step)``."""
  return jax.random.fold_in(state.data_key, state.step)


@jax.custom_vjp
def loss_of_params(params: chex.ArrayTree, loss: jax.Array, grads: chex.ArrayTree) -> jax.Array:
  """``loss``, whose derivative in ``params`` is the already computed ``grads``.

  ``loss`` and ``grads`` are f(theta) and grad f(theta) on the same minibatch, computed without
  a path to ``params``. Differentiating a meta-objective through f(theta_t) then costs one
  scaling of ``grads`` instead of a second backward pass through the optimizee, and saves no
  activations for it: the only residual of a step is its gradient. Being a ``custom_vjp``, it
  has no forward-mode derivative (``jax.jvp``); ``second_order`` runs do not use it.
  """
  del params, grads
  return loss


def _loss_of_params_fwd(params, loss, grads):
  del params
  return loss, grads


def _loss_of_params_bwd(grads, cotangent):
  scaled = jax.tree.map(lambda g: (cotangent * g).astype(g.dtype), grads)
  return scaled, None, None  # loss and grads are constants (stop_gradient'ed by the caller)


loss_of_params.defvjp(_loss_of_params_fwd, _loss_of_params_bwd)


def gradient(
  task: TaskFamily, data: Data, state: InnerState, second_order: bool = False
) -> tuple[jax.Array, chex.ArrayTree]:
  """``(f(theta_t), grad f(theta_t))`` on the step's minibatch.

  Without ``second_order`` the gradient is a constant of phi (d grad / d phi = 0, section 2)
  and f(theta_t) is differentiable in theta_t with that same gradient (``loss_of_params``), so
  a meta-gradient through the loss never backpropagates through the optimizee twice.
  """
  params = state.params if second_order else jax.lax.stop_gradient(state.params)
  # Differentiated again (second order), the task's loss must not run a CPU kernel.
  with backend_lib.twice_differentiable() if second_order else contextlib.nullcontext():
    loss, grads = jax.value_and_grad(task.loss, argnums=2)(
      data, state.task_params, params, minibatch_key(state)
    )
  if not second_order:
    loss = loss_of_params(state.params, loss, grads)
  return loss, grads


def apply(tx: optax.GradientTransformation, state: InnerState, grads) -> InnerState:
  """theta_{t+1} = theta_t + g_t, with ``g_t`` the optimizer's additive update."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state._replace(params=params, opt_state=opt_state, step=state.step + 1)


def step(
  task: TaskFamily,
  tx: optax.GradientTransformation,
  data: Data,
  state: InnerState,
  second_order: bool = False,
) -> tuple[jax.Array, InnerState]:
  """One optimizee step; returns ``(f(theta_t), state at t + 1)``."""
  loss, grads = gradient(task, data, state, second_order)
  return loss, apply(tx, state, grads)


def run(
  task: TaskFamily,
  tx: optax.GradientTransformation,
  data: Data,
  state: InnerState,
  num_steps: int,
  second_order: bool = False,
  observe: Callable[[InnerState], Any] | None = None,
) -> tuple:
  """``num_steps`` steps with ``lax.scan``.

  Args:
    observe: a hook that reads every state the loop passes through, ``state -> pytree``
      (jittable; e.g. theta_t's loss on held-out data). It sees the same theta_t as the loss.

  Returns:
    ``(losses, state)``: ``losses`` shaped (num_steps + 1,) holds f(theta_t), ...,
    f(theta_{t + num_steps}), the last on the minibatch of step t + num_steps. With
    ``observe``, ``(losses, state, readings)``: ``observe`` of those num_steps + 1 states, each
    leaf gaining a leading (num_steps + 1,) axis.
  """

  def body(state, _):
    loss, grads = gradient(task, data, state, second_order)
    seen = () if observe is None else observe(state)  # theta_t, before the update
    return apply(tx, state, grads), (loss, seen)

  state, (losses, seen) = jax.lax.scan(body, state, length=num_steps)
  final = task.loss(data, state.task_params, state.params, minibatch_key(state))
  losses = jnp.concatenate([losses, final[None]])
  if observe is None:
    return losses, state
  last = observe(state)
  readings = jax.tree.map(lambda v, x: jnp.concatenate([v, x[None]]), seen, last)
  return losses, state, readings


def rollout(
  task: TaskFamily,
  tx: optax.GradientTransformation,
  data: Data,
  task_params: chex.ArrayTree,
  key: jax.Array,
  num_steps: int,
  observe: Callable[[InnerState], Any] | None = None,
):
  """Optimizes one problem for ``num_steps`` steps from theta_0 drawn with ``key``.

  Args:
    observe: as in ``run``: read at every theta_t, t = 0..num_steps.

  Returns:
    Losses shaped (num_steps + 1,): f(theta_0), ..., f(theta_T), minibatch t drawn with
    ``fold_in(data_key, t)`` as in meta-training; with ``observe``, ``(losses, readings)``
    (``run``'s).
  """
  init_key, data_key = jax.random.split(key)
  state = start(task, tx, data, task_params, init_key, data_key)
  out = run(task, tx, data, state, num_steps, observe=observe)
  return out[0] if observe is None else (out[0], out[2])


def rollout_batch(task, tx, data, task_params, keys, num_steps: int) -> jax.Array:
  """``rollout`` vmapped over problems (not over ``data``): losses (problems, num_steps + 1)."""
  return jax.vmap(lambda p, k: rollout(task, tx, data, p, k, num_steps))(task_params, keys)


def sample_problems(task: TaskFamily, key: jax.Array, num_problems: int):
  """Draws ``num_problems`` problems and their run keys: ``(task_params, run_keys)``."""
  sample_key, run_key = jax.random.split(key)
  keys = jax.random.split(sample_key, num_problems)
  task_params = jax.vmap(task.sample, in_axes=(None, 0))(task.data, keys)
  return task_params, jax.random.split(run_key, num_problems)
