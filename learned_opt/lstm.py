"""Coordinatewise LSTM optimizer (section 2.1) and LSTM+GAC (section 2.2).

One small multi-layer LSTM, weights phi shared, is applied to every coordinate of every parameter
leaf; each coordinate keeps its own hidden and cell state. With ``global_cells > 0`` the last
``global_cells`` units of every layer are global averaging cells: their outgoing activations are
replaced, at every step, by their mean over all coordinates of all leaves, which lets the
coordinates share information (e.g. to implement gradient clipping).

How a step is computed (the math is the paper's; benchmarks/lstm_update.py measures it):

* The coordinates of all leaves are concatenated into rows ``(R, features)`` once per step and
  each layer is one matmul over all of them, not a vmap of a one-coordinate cell per leaf. (On
  its own no faster on XLA:CPU; the next three build on it.)
* The four gates share one ``tanh`` pass over ``(R, 4 hidden)``, ``sigmoid(z) = (1 + tanh(z/2))
  / 2``, instead of three strided sigmoid slices and a tanh slice: ~1.3x on a 16k or 1M update.
* Under ``jax.vmap`` (problems in an unroll, learning rates in a sweep) the element-wise cell
  math folds the mapped axis into the rows, one GAC average per problem, instead of running on
  ``(problems, coordinates, hidden)``: XLA:CPU's loops over that 3-d shape, with 10 coordinates
  per quadratic, are ~3x slower than over ``(problems * coordinates, hidden)``; ~2x on the
  quadratic meta-step with 128 problems.
* On CPU a step without GAC is one fused kernel per leaf, every layer forward and backward on
  the state in its own layout, the optimizer's read-out included
  (``kernels.fused_gates.stack_readout``); with GAC the gates alone are
  (``kernels.fused_gates.gates``).
* A step over more than ``BLOCK_ROWS`` coordinates runs layer by layer in blocks of rows, so the
  ``(R, 4 hidden)`` pre-activations are not a fresh, page-faulted buffer of R x 320 bytes: ~1.4x
  on a 1M-coordinate update.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching

from learned_opt import preprocess as preprocess_lib
from learned_opt.base import LearnedOptimizer, check_float_params
from learned_opt.kernels import fused_gates

# Rows per block above which a layer runs block by block: its (rows, 4 hidden) pre-activations
# then take 5 MiB (at 20 units). 4k to 32k measured alike on a 1M-coordinate update.
BLOCK_ROWS = 16384


class CoordinateState(NamedTuple):
  """LSTM state of every coordinate of one parameter leaf."""

  hidden: jax.Array  # leaf.shape + (layers, hidden_size), float32
  cell: jax.Array  # leaf.shape + (layers, hidden_size), float32


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


def _gates(z: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """LSTM gates from pre-activations z (..., 4 hidden) in order i, f, g, o; c (..., hidden).

  Returns the new ``(h, c)``. On CPU by the fused kernels of ``kernels.fused_gates``; in XLA,
  ``sigmoid(z) = s tanh(s z) + 1 - s`` with ``s = 1/2`` and ``tanh(z)`` the same with ``s = 1``,
  so one tanh pass over all four gates serves them all.
  """
  kernels = fused_gates.available(jnp.result_type(z, c))
  if kernels is not None:
    return fused_gates.gates(kernels, z, c)
  # A numpy constant: jnp.repeat would leave XLA a per-element gather from a (4,) array.
  s = np.repeat(np.array([0.5, 0.5, 1.0, 0.5], z.dtype), c.shape[-1])
  i, f, g, o = jnp.split(s * jnp.tanh(s * z) + (1 - s), 4, axis=-1)
  c = f * c + i * g
  return o * jnp.tanh(c), c


def lstm_cell(layer: dict, x: jax.Array, h: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One LSTM cell on rows of coordinates: x (..., in), h and c (..., hidden) -> new (h, c)."""
  return _gates(jnp.concatenate([x, h], axis=-1) @ layer["w"] + layer["b"], c)


def _segment_average(h: jax.Array, num_cells: int, segments: int) -> jax.Array:
  """GAC on rows: the last ``num_cells`` columns of h (R, hidden) become their segment's mean.

  The R rows are ``segments`` equal, contiguous groups, one per problem (see ``_folding_vmap``).
  """
  if num_cells == 0 or h.shape[0] == 0:
    return h
  rows, hidden = h.shape
  shared = h[:, hidden - num_cells :].reshape(segments, rows // segments, num_cells)
  mean = jnp.broadcast_to(jnp.mean(shared, axis=1, keepdims=True), shared.shape)
  return jnp.concatenate([h[:, : hidden - num_cells], mean.reshape(rows, num_cells)], axis=1)


def _fold(axis_size: int, batched, arrays) -> list[jax.Array]:
  """``(axis_size, R, ...)`` arrays (broadcast first where unbatched) to ``(axis_size R, ...)``."""
  return [
    a.reshape((-1,) + a.shape[2:]) for a in fused_gates.mapped_first(axis_size, batched, arrays)
  ]


def _unfold(axis_size: int, arrays) -> tuple[jax.Array, ...]:
  """Inverse of ``_fold``: ``(axis_size R, ...)`` to ``(axis_size, R, ...)``."""
  return tuple(a.reshape((axis_size, a.shape[0] // axis_size) + a.shape[1:]) for a in arrays)


def _folding_vmap(fn, segments: int = 1):
  """``fn(*rows, segments=...)`` whose ``vmap`` folds the mapped axis into the rows.

  ``fn`` maps arrays whose leading axis is R rows (``segments`` contiguous problems of R /
  ``segments`` coordinates each) to a tuple of such arrays, and takes no parameters: every
  cotangent is rows-shaped, so vmap-of-grad and grad-of-vmap both stay exact. Its backward pass
  recomputes ``fn`` from the saved inputs (what ``dots_saveable`` remat would save). Being a
  ``custom_vjp``, it has no forward-mode derivative (``jax.jvp``, ``jax.jacfwd``).
  """

  @jax.custom_vjp
  @custom_batching.custom_vmap
  def op(*rows):
    return fn(*rows, segments=segments)

  @op.def_vmap
  def op_vmap(axis_size, in_batched, *rows):
    outs = _folding_vmap(fn, segments * axis_size)(*_fold(axis_size, in_batched, rows))
    return _unfold(axis_size, outs), tuple(True for _ in outs)

  def forward(*rows):
    return op(*rows), rows

  def backward(rows, cotangents):
    return _folding_vmap_vjp(fn, segments)(rows, cotangents)

  op.defvjp(forward, backward)
  return op


def _folding_vmap_vjp(fn, segments: int):
  """The pullback of ``_folding_vmap(fn, segments)``, folding under vmap the same way."""

  @custom_batching.custom_vmap
  def vjp(rows, cotangents):
    return jax.vjp(lambda *r: fn(*r, segments=segments), *rows)[1](cotangents)

  @vjp.def_vmap
  def vjp_vmap(axis_size, in_batched, rows, cotangents):
    rows_batched, cotangents_batched = in_batched
    outs = _folding_vmap_vjp(fn, segments * axis_size)(
      _fold(axis_size, rows_batched, rows),
      tuple(_fold(axis_size, cotangents_batched, cotangents)),
    )
    return _unfold(axis_size, outs), tuple(True for _ in outs)

  return vjp


def _gac_gates(z, c, *, global_cells, segments):
  """``_gates`` then GAC: z (R, 4 hidden), c (R, hidden) -> (h, c)."""
  h, c = _gates(z, c)
  return _segment_average(h, global_cells, segments), c


def _blockwise(fn, *rows):
  """``fn`` over blocks of ``BLOCK_ROWS`` rows (a ``lax.map``), then the remaining rows."""
  total = rows[0].shape[0]
  count = total // BLOCK_ROWS
  split = count * BLOCK_ROWS
  blocks = tuple(r[:split].reshape((count, BLOCK_ROWS) + r.shape[1:]) for r in rows)
  outs = [o.reshape((split,) + o.shape[2:]) for o in jax.lax.map(lambda b: fn(*b), blocks)]
  if split == total:
    return tuple(outs)
  rest = fn(*(r[split:] for r in rows))
  return tuple(jnp.concatenate([o, r]) for o, r in zip(outs, rest, strict=True))


def _layer_rows(layer, x, h, c, global_cells):
  """One layer (+GAC) on rows: x (R, in), h and c (R, hidden) -> new (h, c)."""
  if x.shape[0] > BLOCK_ROWS:
    h, c = _blockwise(functools.partial(lstm_cell, layer), x, h, c)
    return _segment_average(h, global_cells, 1), c  # outside the fold: one problem's rows
  z = jnp.concatenate([x, h], axis=-1) @ layer["w"] + layer["b"]
  return _folding_vmap(functools.partial(_gac_gates, global_cells=global_cells))(z, c)


def _stacked_rows(layers, x, hidden, cell, global_cells):
  """The stacked LSTM on rows: x (R, in), hidden and cell (R, layers, hidden).

  Returns:
    ``(top, hidden, cell)``: the last layer's output (R, hidden) and the new states.
  """
  hs, cs = [], []
  for index, layer in enumerate(layers):
    x, c = _layer_rows(layer, x, hidden[:, index], cell[:, index], global_cells)
    hs.append(x)
    cs.append(c)
  return x, jnp.stack(hs, axis=1), jnp.stack(cs, axis=1)


def _rows(leaves: list[jax.Array], trailing: int) -> jax.Array:
  """Concatenates ``leaf.shape + t`` arrays, ``t`` their last ``trailing`` axes, into (R,) + t."""
  return jnp.concatenate([a.reshape((-1,) + a.shape[a.ndim - trailing :]) for a in leaves])


def _split_rows(rows: jax.Array, shapes: list[tuple[int, ...]]) -> list[jax.Array]:
  """Inverse of ``_rows``: (R,) + t back to ``shape + t`` for each leaf shape."""
  out, start = [], 0
  for shape in shapes:
    size = math.prod(shape)
    out.append(rows[start : start + size].reshape(shape + rows.shape[1:]))
    start += size
  return out


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


def _lstm_rows(layers, x, states, global_cells):
  """``_stacked_rows`` on the concatenated leaves: ``(top (R, hidden), hidden, cell)``."""
  return _stacked_rows(
    layers,
    x,
    _rows([s.hidden for s in states], 2),
    _rows([s.cell for s in states], 2),
    global_cells,
  )


def _split_states(hidden, cell, shapes) -> list[CoordinateState]:
  """(R, layers, hidden) states back to one ``CoordinateState`` per leaf shape."""
  return [
    CoordinateState(h, c)
    for h, c in zip(_split_rows(hidden, shapes), _split_rows(cell, shapes), strict=True)
  ]


def _stack_kernels(global_cells, *trees) -> tuple[str, ...] | None:
  """The stack kernels if this trace should run a step with them (no GAC, float32), else None."""
  if global_cells:
    return None
  return fused_gates.available(jnp.result_type(*jax.tree.leaves(trees)))


def _layer_weights(layers) -> list[jax.Array]:
  """The stack kernels' weight arguments: ``w_0, b_0, w_1, b_1, ...``."""
  return [a for layer in layers for a in (layer["w"], layer["b"])]


def _fused_stack(kernels, layers, xs, states):
  """``stacked_lstm`` without GAC by the stack kernel: each leaf's whole step in one call, on
  its state as stored (no rows concatenated). Returns ``(tops, states)`` per leaf."""
  weights = _layer_weights(layers)
  tops, new_states = [], []
  for x, s in zip(xs, states, strict=True):
    hidden, cell = fused_gates.stack(kernels, x, s.hidden, s.cell, *weights)
    tops.append(hidden[..., -1, :])
    new_states.append(CoordinateState(hidden, cell))
  return tops, new_states


def _fused_update(kernels, meta_params, xs, states):
  """The step and the read-out by the stack kernel, per leaf: ``(outputs, states)``, each
  output shaped like its leaf (the one read-out output)."""
  layers, out = meta_params["layers"], meta_params["out"]
  weights = _layer_weights(layers) + [out["w"], out["b"]]
  outputs, new_states = [], []
  for x, s in zip(xs, states, strict=True):
    hidden, cell, u = fused_gates.stack_readout(kernels, x, s.hidden, s.cell, *weights)
    outputs.append(u)
    new_states.append(CoordinateState(hidden, cell))
  return outputs, new_states


def stacked_lstm(
  layers: list[dict], xs: list[jax.Array], states: list[CoordinateState], global_cells: int
) -> tuple[list[jax.Array], list[CoordinateState]]:
  """One step of the stacked LSTM (+GAC) on every coordinate of every leaf.

  Args:
    layers: ``phi["layers"]`` from ``init_lstm_params``.
    xs: one input per leaf, shaped ``leaf.shape + (features,)``.
    states: one ``CoordinateState`` per leaf.
    global_cells: trailing units of every layer averaged over all coordinates of all leaves.

  Returns:
    ``(tops, states)``: the last layer's outputs shaped ``leaf.shape + (hidden,)`` per leaf and
    the new states.
  """
  if not xs:
    return [], []
  kernels = _stack_kernels(global_cells, layers, xs, states)
  if kernels is not None:
    return _fused_stack(kernels, layers, xs, states)
  top, hidden, cell = _lstm_rows(layers, _rows(xs, 1), states, global_cells)
  shapes = [x.shape[:-1] for x in xs]
  return _split_rows(top, shapes), _split_states(hidden, cell, shapes)


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
    kernels = _stack_kernels(global_cells, meta_params, states)
    if kernels is not None:  # one kernel per leaf, the read-out in it
      xs = [preprocess_fn(jnp.asarray(g, jnp.float32)) for g in leaves]
      outputs, new_states = _fused_update(kernels, meta_params, xs, states)
      updates = [
        (output_scale * u).astype(jnp.result_type(g)) for u, g in zip(outputs, leaves, strict=True)
      ]
      return treedef.unflatten(updates), treedef.unflatten(new_states)
    # Preprocessing is element-wise, so it runs once on all coordinates: (R,) -> (R, features).
    x = preprocess_fn(_rows([jnp.asarray(g, jnp.float32) for g in leaves], 0))
    top, hidden, cell = _lstm_rows(meta_params["layers"], x, states, global_cells)
    (outputs,) = linear_readout(meta_params["out"], [top])
    shapes = [jnp.shape(g) for g in leaves]
    updates = [
      (output_scale * o).astype(jnp.result_type(g))
      for o, g in zip(_split_rows(outputs[:, 0], shapes), leaves, strict=True)
    ]
    return treedef.unflatten(updates), treedef.unflatten(_split_states(hidden, cell, shapes))

  return LearnedOptimizer(init_meta_params, init_state, update, config)
