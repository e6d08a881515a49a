"""A truncation's meta-gradient by the LSTM's sequence kernels, without JAX's autodiff.

With d grad / d phi = 0 (section 2) and additive updates theta_{t+1} = theta_t + u_t, the
meta-gradient of ``sum_t w_t f(theta_t)`` (t = 1..T) is the optimizer's own backward pass through
the truncation, driven by the adjoints ``a_s = sum_{t > s} w_t grad f(theta_t)`` on its outputs
u_s; the gradients feeding the LSTM are constants. So a truncation runs forward once, the
coordinatewise LSTM stepping inside a workspace that holds every step's state (the kernel writes
slot t + 1 from slot t in place: no carry copied, nothing stacked by a scan), keeping only the
gradients; then one kernel runs every step of each tile of rows backward in time, its state
cotangents in the tile's own buffers, and returns phi's cotangents. Same math as
``jax.value_and_grad(unroll.meta_loss)`` (agreeing to float rounding), with the saved values and
their copies that XLA's scan would make gone.

It serves the paper's LSTM optimizer without global averaging cells on the CPU kernels, first
order; ``kernel_targets`` says when, and ``train.meta_step`` falls back to autodiff otherwise.
"""

import jax
import jax.numpy as jnp

from learned_opt import backend as backend_lib
from learned_opt import lstm_rows
from learned_opt import preprocess as preprocess_lib
from learned_opt.base import CoordinateState, LearnedOptimizer, MetaParams
from learned_opt.kernels import stack as kernels_lib
from learned_opt.optax_face import LearnedOptaxState
from tasks.base import Data, TaskFamily
from train import inner as inner_lib
from train import unroll as unroll_lib
from train.inner import InnerState


def kernel_targets(
  optimizer: LearnedOptimizer, meta_params: MetaParams, inner: InnerState, second_order: bool
) -> tuple[str, ...] | None:
  """The stack kernels' targets where ``value_and_grad`` serves this meta-step, else None.

  It does for the LSTM optimizer without global averaging cells whose backend runs the CPU
  kernels (``learned_opt.backend.kernel_targets``), on float32 parameters, first order.
  """
  config = optimizer.config
  leaves = jax.tree.leaves(inner.params)
  if second_order or config.get("kind") != "lstm" or config.get("global_cells") or not leaves:
    return None
  if any(leaf.dtype != jnp.float32 for leaf in leaves):
    return None
  return backend_lib.kernel_targets(optimizer.backend, meta_params, leaves)


def value_and_grad(
  names: tuple[str, ...],
  meta_params: MetaParams,
  inner: InnerState,
  data: Data,
  *,
  task: TaskFamily,
  optimizer: LearnedOptimizer,
  num_steps: int,
  objective: str = "sum",
  horizon: int | None = None,
  workspace: tuple[jax.Array, jax.Array] | None = None,
):
  """``jax.value_and_grad(unroll.meta_loss, has_aux=True)``'s result, by the sequence kernels.

  Args:
    names: ``kernel_targets``' targets.
    meta_params, inner, data, task, optimizer, num_steps, objective, horizon: as
      ``unroll.meta_loss``'s (``inner`` a batch of problems, leading axis (problems,)).
    workspace: ``new_workspace``'s buffers to step in (their contents are overwritten), or None
      for fresh ones. Donated to a jitted caller and returned, they cost no allocation, zero
      fill or page faults a step (``train.meta_step.jit_train_step``).

  Returns:
    ``(((loss, (losses, inner)), grads), workspace)``: the objective, the per-step losses
    (problems, num_steps), the batch after the truncation, phi's gradient, and the buffers.
  """
  config = optimizer.config
  preprocess, _ = preprocess_lib.make(
    config["preprocess"], p=config["preprocess_p"], factor=config["input_scale"]
  )
  scale, layers = config["output_scale"], config["num_layers"]
  leaves, treedef = jax.tree.flatten(inner.params)
  states = treedef.flatten_up_to(inner.opt_state.inner)
  sizes = [leaf.size for leaf in leaves]  # problems x coordinates, per leaf
  if workspace is None:
    workspace = new_workspace(optimizer, inner, num_steps)
  # Rows: every leaf's coordinates, problem by problem within a leaf (lstm_rows.to_rows).
  wh = workspace[0].at[0].set(lstm_rows.to_rows([s.hidden for s in states], 2))
  wc = workspace[1].at[0].set(lstm_rows.to_rows([s.cell for s in states], 2))
  weights = lstm_rows.layer_weights(meta_params["layers"])
  weights += [meta_params["out"]["w"], meta_params["out"]["b"]]

  def split(values: jax.Array) -> list[jax.Array]:
    return lstm_rows.split_rows(values, [leaf.shape for leaf in leaves])

  def step(carry, _):
    state, wh, wc, t = carry
    loss, grads = jax.vmap(lambda s: inner_lib.gradient(task, data, s))(state)
    g = lstm_rows.to_rows(treedef.flatten_up_to(grads), 0)
    # as_optax's nan_policy="propagate": a non-finite entry gives a NaN update.
    x = preprocess(jnp.where(jnp.isfinite(g), g, jnp.nan))
    wh, wc, u = kernels_lib.readout_step_in_workspace(names, x, wh, wc, t, *weights)
    params = treedef.flatten_up_to(state.params)
    params = [p + (scale * d).astype(p.dtype) for p, d in zip(params, split(u), strict=True)]
    state = state._replace(params=treedef.unflatten(params), step=state.step + 1)
    return (state, wh, wc, t + 1), (loss, g, x)

  start = jnp.zeros((), jnp.int32)
  (state, wh, wc, _), (losses, gs, xs) = jax.lax.scan(
    step, (inner, wh, wc, start), None, length=num_steps
  )
  # Step t saw f(theta_t) and its gradient, t = 0..T-1; f(theta_T) and its gradient come last.
  last_loss, last_grads = jax.vmap(
    lambda s: jax.value_and_grad(task.loss, argnums=2)(
      data, s.task_params, s.params, inner_lib.minibatch_key(s)
    )
  )(state)
  losses = jnp.concatenate([losses[1:], last_loss[None]]).T  # (problems, T): f(theta_1..T)
  loss, weights_of_losses = jax.value_and_grad(unroll_lib.objective_value)(
    losses, inner.step, objective, horizon
  )
  # a_s = sum_{t > s} w_t grad f(theta_t): the cotangent of u_s (s = 0..T-1).
  last_g = lstm_rows.to_rows(treedef.flatten_up_to(last_grads), 0)
  grads_after = jnp.concatenate([gs[1:], last_g[None]])
  problems = inner.step.shape[0]
  w_rows = jnp.concatenate(
    [jnp.repeat(weights_of_losses.T, size // problems, axis=1) for size in sizes], axis=1
  )
  adjoints = jnp.flip(jnp.cumsum(jnp.flip(w_rows * grads_after, 0), 0), 0)
  cotangents = kernels_lib.readout_sequence_backward(names, xs, wh, wc, *weights, scale * adjoints)
  grads = {
    "layers": [{"w": cotangents[2 * i], "b": cotangents[2 * i + 1]} for i in range(layers)],
    "out": {"w": cotangents[-2], "b": cotangents[-1]},
  }
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, meta_params)
  after = zip(split(wh[num_steps]), split(wc[num_steps]), strict=True)
  opt_state = LearnedOptaxState(treedef.unflatten([CoordinateState(h, c) for h, c in after]))
  state = jax.lax.stop_gradient(state._replace(opt_state=opt_state))
  return ((loss, (losses, state)), grads), (wh, wc)


def new_workspace(optimizer: LearnedOptimizer, inner: InnerState, num_steps: int):
  """Zeroed buffers ``(wh, wc)``, each (num_steps + 1, rows, layers, hidden) float32, rows the
  coordinates of every problem of ``inner``: slot t holds the LSTM state before step t."""
  rows = sum(leaf.size for leaf in jax.tree.leaves(inner.params))
  config = optimizer.config
  shape = (num_steps + 1, rows, config["num_layers"], config["hidden_size"])
  return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)
