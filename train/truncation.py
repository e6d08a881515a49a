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
order, alone or one per parameter group (``learned_opt.partition``, the CIFAR-10 conv net's two
LSTMs: each group its own workspace and kernels); ``kernel_targets`` says when, and
``train.meta_step`` falls back to autodiff otherwise.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from learned_opt import backend as backend_lib
from learned_opt import lstm_rows, parameter_groups
from learned_opt import preprocess as preprocess_lib
from learned_opt.base import CoordinateState, LearnedOptimizer, MetaParams
from learned_opt.kernels import stack as kernels_lib
from learned_opt.optax_face import LearnedOptaxState
from tasks.base import Data, TaskFamily
from train import inner as inner_lib
from train import unroll as unroll_lib
from train.inner import InnerState


class Group(NamedTuple):
  """One LSTM of the optimizer and the parameter leaves it updates."""

  label: str | None  # its group's in a ``partition``; None: the optimizer is this LSTM
  config: Mapping[str, Any]  # its ``lstm_optimizer`` settings
  meta_params: MetaParams | None  # its phi
  leaves: list[int]  # indices into the flattened parameters, in order
  states: list[CoordinateState]  # theirs, batched over problems


def _is_plain_lstm(config: Mapping[str, Any]) -> bool:
  return config.get("kind") == "lstm" and not config.get("global_cells")


def groups(optimizer: LearnedOptimizer, meta_params: MetaParams | None, inner: InnerState):
  """The optimizer's LSTMs without global averaging cells as ``Group`` s (groups without leaves
  left out), or None where it is anything else. ``meta_params`` None: groups without phi."""
  config = optimizer.config
  count = len(jax.tree.leaves(inner.params))
  if _is_plain_lstm(config):
    states = jax.tree.structure(inner.params).flatten_up_to(inner.opt_state.inner)
    return [Group(None, config, meta_params, list(range(count)), states)]
  if config.get("kind") != "partition":
    return None
  labels = tuple(sorted(config["optimizers"]))
  if not all(_is_plain_lstm(config["optimizers"][label]) for label in labels):
    return None
  one_problem = jax.tree.map(lambda a: a[0], inner.params)  # the rule reads unbatched leaves
  rule = parameter_groups.RULES[config["rule"]]
  indices = parameter_groups.group_indices(rule, one_problem, labels)
  phi = meta_params or dict.fromkeys(labels)
  states = inner.opt_state.inner
  return [
    Group(label, config["optimizers"][label], phi[label], indices[label], states[label])
    for label in labels
    if indices[label]
  ]


def kernel_targets(
  optimizer: LearnedOptimizer, meta_params: MetaParams, inner: InnerState, second_order: bool
) -> tuple[str, ...] | None:
  """The stack kernels' targets where ``value_and_grad`` serves this meta-step, else None.

  It does for LSTM optimizers without global averaging cells (``groups``) whose backend runs the
  CPU kernels (``learned_opt.backend.kernel_targets``), on float32 parameters, first order.
  """
  leaves = jax.tree.leaves(inner.params)
  if second_order or not leaves or any(leaf.dtype != jnp.float32 for leaf in leaves):
    return None
  if not groups(optimizer, meta_params, inner):
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
  workspace: tuple | None = None,
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
  lstms = groups(optimizer, meta_params, inner)
  if workspace is None:
    workspace = new_workspace(optimizer, inner, num_steps)
  leaves, treedef = jax.tree.flatten(inner.params)
  preprocess = [_preprocessor(g.config) for g in lstms]
  weights = [_kernel_weights(g.meta_params) for g in lstms]
  # Rows: a group's leaves' coordinates, problem by problem within a leaf (lstm_rows.to_rows).
  rows_of = lambda values, g: lstm_rows.to_rows([values[i] for i in g.leaves], 0)
  workspace = tuple(
    (
      wh.at[0].set(lstm_rows.to_rows([s.hidden for s in g.states], 2)),
      wc.at[0].set(lstm_rows.to_rows([s.cell for s in g.states], 2)),
    )
    for g, (wh, wc) in zip(lstms, workspace, strict=True)
  )

  def step(carry, _):
    state, workspace, t = carry
    loss, grads = jax.vmap(lambda s: inner_lib.gradient(task, data, s))(state)
    grads, params = treedef.flatten_up_to(grads), treedef.flatten_up_to(state.params)
    filled, inputs, grad_rows = [], [], []
    for g, prep, w, (wh, wc) in zip(lstms, preprocess, weights, workspace, strict=True):
      rows = rows_of(grads, g)
      # as_optax's nan_policy="propagate": a non-finite entry gives a NaN update.
      x = prep(jnp.where(jnp.isfinite(rows), rows, jnp.nan))
      wh, wc, u = kernels_lib.readout_step_in_workspace(names, x, wh, wc, t, *w)
      shapes = [leaves[i].shape for i in g.leaves]
      for i, d in zip(g.leaves, lstm_rows.split_rows(u, shapes), strict=True):
        params[i] = params[i] + (g.config["output_scale"] * d).astype(params[i].dtype)
      filled.append((wh, wc))
      inputs.append(x)
      grad_rows.append(rows)
    state = state._replace(params=treedef.unflatten(params), step=state.step + 1)
    return (state, tuple(filled), t + 1), (loss, grad_rows, inputs)

  start = jnp.zeros((), jnp.int32)
  (state, workspace, _), (losses, grad_rows, inputs) = jax.lax.scan(
    step, (inner, workspace, start), None, length=num_steps
  )
  # Step t saw f(theta_t) and its gradient, t = 0..T-1; f(theta_T) and its gradient come last.
  last_loss, last_grads = jax.vmap(lambda s: inner_lib.gradient(task, data, s))(state)
  last_grads = treedef.flatten_up_to(last_grads)
  losses = jnp.concatenate([losses[1:], last_loss[None]]).T  # (problems, T): f(theta_1..T)
  loss, weights_of_losses = jax.value_and_grad(unroll_lib.objective_value)(
    losses, inner.step, objective, horizon
  )
  problems = inner.step.shape[0]
  phi_grads, new_states = [], []
  for g, w, (wh, wc), gs, xs in zip(lstms, weights, workspace, grad_rows, inputs, strict=True):
    # a_s = sum_{t > s} w_t grad f(theta_t): the cotangent of u_s (s = 0..T-1).
    grads_after = jnp.concatenate([gs[1:], rows_of(last_grads, g)[None]])
    w_rows = jnp.concatenate(
      [jnp.repeat(weights_of_losses.T, leaves[i].size // problems, axis=1) for i in g.leaves],
      axis=1,
    )
    adjoints = jnp.flip(jnp.cumsum(jnp.flip(w_rows * grads_after, 0), 0), 0)
    du = g.config["output_scale"] * adjoints
    phi_grads.append(_meta_grads(kernels_lib.readout_sequence_backward(names, xs, wh, wc, *w, du)))
    shapes = [leaves[i].shape for i in g.leaves]
    after = zip(
      lstm_rows.split_rows(wh[num_steps], shapes),
      lstm_rows.split_rows(wc[num_steps], shapes),
      strict=True,
    )
    new_states += [CoordinateState(h, c) for h, c in after]
  grads = _assemble(meta_params, lstms, phi_grads)
  state_tree = jax.tree.structure(
    inner.opt_state.inner, is_leaf=lambda x: isinstance(x, CoordinateState)
  )
  opt_state = LearnedOptaxState(state_tree.unflatten(new_states))
  state = jax.lax.stop_gradient(state._replace(opt_state=opt_state))
  return ((loss, (losses, state)), grads), workspace


def _preprocessor(config: Mapping[str, Any]):
  fn, _ = preprocess_lib.make(
    config["preprocess"], p=config["preprocess_p"], factor=config["input_scale"]
  )
  return fn


def _kernel_weights(phi: MetaParams) -> list[jax.Array]:
  """The read-out stack kernels' weights: every layer's w and b, then the read-out's."""
  return lstm_rows.layer_weights(phi["layers"]) + [phi["out"]["w"], phi["out"]["b"]]


def _meta_grads(cotangents) -> MetaParams:
  """The sequence kernel's weight cotangents as an LSTM's phi."""
  layers = (len(cotangents) - 2) // 2
  return {
    "layers": [{"w": cotangents[2 * i], "b": cotangents[2 * i + 1]} for i in range(layers)],
    "out": {"w": cotangents[-2], "b": cotangents[-1]},
  }


def _assemble(meta_params, lstms: list[Group], phi_grads) -> MetaParams:
  """phi's gradient: the one LSTM's, or per group label (zero for a group without leaves)."""
  if lstms[0].label is None:
    (grads,) = phi_grads
  else:
    grads = jax.tree.map(jnp.zeros_like, meta_params)
    grads.update({g.label: d for g, d in zip(lstms, phi_grads, strict=True)})
  return jax.tree.map(lambda d, p: d.astype(p.dtype), grads, meta_params)


def new_workspace(optimizer: LearnedOptimizer, inner: InnerState, num_steps: int) -> tuple:
  """Zeroed buffers ``((wh, wc), ...)``, one pair per LSTM group (``groups``), each (num_steps
  + 1, rows, layers, hidden) float32, rows the coordinates of the group's leaves in every
  problem of ``inner``: slot t holds the LSTM state before step t."""
  leaves = jax.tree.leaves(inner.params)
  buffers = []
  for g in groups(optimizer, None, inner):
    rows = sum(leaves[i].size for i in g.leaves)
    shape = (num_steps + 1, rows, g.config["num_layers"], g.config["hidden_size"])
    buffers.append((jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)))
  return tuple(buffers)
