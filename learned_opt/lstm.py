"""Coordinatewise LSTM optimizer (section 2.1) and LSTM+GAC (section 2.2).

One small multi-layer LSTM, weights phi shared, is applied to every coordinate of every parameter
leaf; each coordinate keeps its own hidden and cell state. With ``global_cells > 0`` the last
``global_cells`` units of every layer are global averaging cells: their outgoing activations are
replaced, at every step, by their mean over all coordinates of all leaves, which lets the
coordinates share information (e.g. to implement gradient clipping).

This module is the paper's cell and the optimizer's factory; how a step executes (rows, blocks,
vmap folding, XLA or the CPU kernels) is ``learned_opt.lstm_rows``, chosen by the optimizer's
``backend`` (``learned_opt.backend``).
"""

import jax
import jax.numpy as jnp

from learned_opt import backend as backend_lib
from learned_opt import lstm_rows
from learned_opt import preprocess as preprocess_lib
from learned_opt.base import CoordinateState, LearnedOptimizer, check_float_params

__all__ = [
  "CoordinateState",
  "global_average",
  "init_coordinate_state",
  "init_lstm_params",
  "linear_readout",
  "lstm_cell",
  "lstm_optimizer",
  "stacked_lstm",
]

stacked_lstm = lstm_rows.stacked_lstm


def init_lstm_params(
  key: jax.Array, input_size: int, hidden_sizes: tuple[int, ...], num_outputs: int = 1
) -> dict:
  """Weights of a stacked LSTM plus a linear read-out to ``num_outputs`` outputs.

  Returns:
    ``{"layers": [{"w": (in + hidden, 4 hidden), "b": (4 hidden,)}, ...],
    "out": {"w": (hidden, num_outputs), "b": (num_outputs,)}}``.
  """
  keys = jax.random.split(key, len(hidden_sizes) + 1)
  layers = []
  fan_in = input_size
  for layer_key, hidden in zip(keys[:-1], hidden_sizes, strict=True):
    scale = 1.0 / jnp.sqrt(fan_in + hidden)
    w = scale * jax.random.normal(layer_key, (fan_in + hidden, 4 * hidden), jnp.float32)
    # Forget-gate bias of 1 keeps early memories, the usual LSTM initialization.
    b = jnp.zeros((4, hidden), jnp.float32).at[1].set(1.0).reshape(-1)
    layers.append({"w": w, "b": b})
    fan_in = hidden
  out_w = 0.1 / jnp.sqrt(fan_in) * jax.random.normal(keys[-1], (fan_in, num_outputs), jnp.float32)
  return {"layers": layers, "out": {"w": out_w, "b": jnp.zeros((num_outputs,), jnp.float32)}}


def lstm_cell(layer: dict, x: jax.Array, h: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One LSTM cell: x (..., in), h and c (..., hidden) -> new (h, c).

  ``z = [x, h] W + b`` split into gates i, f, g, o; ``c' = sigmoid(f) c + sigmoid(i) tanh(g)``,
  ``h' = sigmoid(o) tanh(c')``.
  """
  return lstm_rows.cell(layer, x, h, c)


def global_average(values: list[jax.Array], num_cells: int) -> list[jax.Array]:
  """Replaces the last ``num_cells`` features by their mean over every coordinate of every leaf.

  Args:
    values: one array per leaf, shaped ``leaf.shape + (features,)``.
    num_cells: how many trailing features are global averaging cells.
  """
  if num_cells == 0 or not values:
    return values
  count = sum(v[..., 0].size for v in values)
  if count == 0:
    return values
  total = sum(jnp.sum(v[..., -num_cells:].reshape(-1, num_cells), axis=0) for v in values)
  mean = total / count
  return [
    v.at[..., -num_cells:].set(jnp.broadcast_to(mean, v[..., -num_cells:].shape)) for v in values
  ]


def init_coordinate_state(params, num_layers: int, hidden_size: int):
  """Zero LSTM state for every coordinate: a tree of ``CoordinateState`` shaped like ``params``."""
  zeros = lambda p: jnp.zeros(jnp.shape(p) + (num_layers, hidden_size), jnp.float32)
  return jax.tree.map(lambda p: CoordinateState(zeros(p), zeros(p)), params)


def linear_readout(out: dict, tops: list[jax.Array]) -> list[jax.Array]:
  """``phi["out"]`` applied to every coordinate: ``leaf.shape + (num_outputs,)`` per leaf."""
  return [h @ out["w"] + out["b"] for h in tops]


def lstm_optimizer(
  hidden_size: int = 20,
  num_layers: int = 2,
  preprocess: str = "none",
  preprocess_p: float = 10.0,
  input_scale: float = 1.0,
  output_scale: float = 1.0,
  global_cells: int = 0,
  *,
  backend: str | None = None,
) -> LearnedOptimizer:
  """The paper's coordinatewise LSTM optimizer (2 layers of 20 units by default).

  Args:
    hidden_size: units per LSTM layer.
    num_layers: stacked LSTM layers.
    preprocess: ``"none"``, ``"scale"`` (multiply by ``input_scale``) or ``"log_sign"``
      (Appendix A, with ``preprocess_p``).
    preprocess_p: ``p`` of the Appendix A formula; the paper uses 10.
    input_scale: constant input factor for ``preprocess="scale"``.
    output_scale: constant factor on the proposed update (0.1 in the paper's MNIST runs).
    global_cells: global averaging cells per layer (LSTM+GAC; the paper uses 5 of 20).
    backend: how the update executes: ``"auto"``, ``"xla"`` or ``"cpu_kernels"``
      (``learned_opt.backend``); None: ``$LEARNED_OPT_BACKEND``, else ``"auto"``. Not part of
      ``config``: it changes no math.

  Returns:
    A ``LearnedOptimizer``; its update maps gradients to additive updates of the same tree.

  Example:
    >>> opt = lstm_optimizer()
    >>> phi = opt.init_meta_params(jax.random.key(0))
    >>> state = opt.init_state(phi, params)
    >>> updates, state = opt.update(phi, grads, state)
  """
  if hidden_size <= 0 or num_layers <= 0:
    raise ValueError(
      f"hidden_size and num_layers must be positive, got {hidden_size} and {num_layers}."
    )
  if not 0 <= global_cells <= hidden_size:
    raise ValueError(
      f"global_cells must lie in [0, hidden_size={hidden_size}], got {global_cells}; "
      "the paper's LSTM+GAC uses 5 of 20."
    )
  preprocess_fn, num_features = preprocess_lib.make(preprocess, p=preprocess_p, factor=input_scale)
  backend = backend_lib.resolve(backend)
  config = {
    "kind": "lstm",
    "hidden_size": hidden_size,
    "num_layers": num_layers,
    "preprocess": preprocess,
    "preprocess_p": preprocess_p,
    "input_scale": input_scale,
    "output_scale": output_scale,
    "global_cells": global_cells,
  }

  def init_meta_params(key):
    return init_lstm_params(key, num_features, (hidden_size,) * num_layers)

  def init_state(meta_params, params):
    del meta_params
    check_float_params(params)
    return init_coordinate_state(params, num_layers, hidden_size)

  def update(meta_params, grads, state):
    leaves, treedef = jax.tree.flatten(grads)
    if not leaves:
      return treedef.unflatten([]), treedef.unflatten([])
    states = treedef.flatten_up_to(state)
    kernels = backend_lib.kernel_targets(backend, meta_params, states)
    if kernels is not None and not global_cells:  # one kernel per leaf, the read-out in it
      xs = [preprocess_fn(jnp.asarray(g, jnp.float32)) for g in leaves]
      outputs, new_states = lstm_rows.kernel_stack(
        kernels, meta_params["layers"], xs, states, meta_params["out"]
      )
      updates = [
        (output_scale * u).astype(jnp.result_type(g)) for u, g in zip(outputs, leaves, strict=True)
      ]
      return treedef.unflatten(updates), treedef.unflatten(new_states)
    # Preprocessing is element-wise, so it runs once on all coordinates: (R,) -> (R, features).
    x = preprocess_fn(lstm_rows.to_rows([jnp.asarray(g, jnp.float32) for g in leaves], 0))
    layers = meta_params["layers"]
    top, hidden, cell = lstm_rows.lstm_rows(layers, x, states, global_cells, kernels)
    (outputs,) = linear_readout(meta_params["out"], [top])
    shapes = [jnp.shape(g) for g in leaves]
    updates = [
      (output_scale * o).astype(jnp.result_type(g))
      for o, g in zip(lstm_rows.split_rows(outputs[:, 0], shapes), leaves, strict=True)
    ]
    new_states = lstm_rows.split_states(hidden, cell, shapes)
    return treedef.unflatten(updates), treedef.unflatten(new_states)

  return LearnedOptimizer(init_meta_params, init_state, update, config, backend)
