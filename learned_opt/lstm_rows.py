"""How a coordinatewise LSTM step executes: every coordinate of every leaf as rows of one matrix.

The math is the paper's (``learned_opt.lstm``); this module is the execution strategy, on XLA or
on the CPU kernels (``learned_opt.kernels.stack``) as the optimizer's backend chose
(``learned_opt.backend.kernel_targets``, passed in as ``kernels``: the targets, or None for XLA).
``benchmarks/lstm_update.py`` and ``benchmarks/perf.py`` measure each choice below.

* XLA: the coordinates of all leaves are concatenated into rows ``(R, features)`` once per step
  and each layer is one matmul over all of them, not a vmap of a one-coordinate cell per leaf.
  The four gates share one ``tanh`` pass over ``(R, 4 hidden)`` (``xla_gates``).
* Under ``jax.vmap`` (problems in an unroll, learning rates in a sweep) the element-wise cell
  math folds the mapped axis into the rows, one GAC average per problem (``folding_vmap``),
  instead of running on ``(problems, coordinates, hidden)``, which XLA:CPU loops over slowly.
* A layer over more than ``BLOCK_ROWS`` coordinates runs in blocks of rows (a ``lax.map``), so
  its ``(R, 4 hidden)`` pre-activations are not one fresh, page-faulted buffer.
* CPU kernels: a step without GAC is one kernel call per leaf on its state as stored, every
  layer forward and backward (``stack``), the optimizer's read-out included where it asks
  (``stack_readout``); with GAC the gates alone are kernels (``gates``), the matmuls XLA's.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching

from learned_opt.base import CoordinateState
from learned_opt.kernels import stack as kernels_lib

# Rows per block above which a layer runs block by block: its (rows, 4 hidden) pre-activations
# then take 5 MiB (at 20 units). 4k to 32k measured alike on a 1M-coordinate update.
BLOCK_ROWS = 16384


def xla_gates(z: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """LSTM gates in XLA: z (..., 4 hidden) in order i, f, g, o; c (..., hidden) -> new (h, c).

  ``sigmoid(z) = s tanh(s z) + 1 - s`` with ``s = 1/2`` and ``tanh(z)`` the same with ``s = 1``,
  so one tanh pass over all four gates serves them all.
  """
  # A numpy constant: jnp.repeat would leave XLA a per-element gather from a (4,) array.
  s = np.repeat(np.array([0.5, 0.5, 1.0, 0.5], z.dtype), c.shape[-1])
  i, f, g, o = jnp.split(s * jnp.tanh(s * z) + (1 - s), 4, axis=-1)
  c = f * c + i * g
  return o * jnp.tanh(c), c


def gates(z: jax.Array, c: jax.Array, kernels=None) -> tuple[jax.Array, jax.Array]:
  """``xla_gates``, or the same by the gate kernel where ``kernels`` are given."""
  return xla_gates(z, c) if kernels is None else kernels_lib.gates(kernels, z, c)


def cell(layer: dict, x, h, c, kernels=None) -> tuple[jax.Array, jax.Array]:
  """One LSTM cell on rows: x (..., in), h and c (..., hidden) -> new (h, c)."""
  return gates(jnp.concatenate([x, h], axis=-1) @ layer["w"] + layer["b"], c, kernels)


def segment_average(h: jax.Array, num_cells: int, segments: int) -> jax.Array:
  """GAC on rows: the last ``num_cells`` columns of h (R, hidden) become their segment's mean.

  The R rows are ``segments`` equal, contiguous groups, one per problem (see ``folding_vmap``).
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
    a.reshape((-1,) + a.shape[2:]) for a in kernels_lib.mapped_first(axis_size, batched, arrays)
  ]


def _unfold(axis_size: int, arrays) -> tuple[jax.Array, ...]:
  """Inverse of ``_fold``: ``(axis_size R, ...)`` to ``(axis_size, R, ...)``."""
  return tuple(a.reshape((axis_size, a.shape[0] // axis_size) + a.shape[1:]) for a in arrays)


def folding_vmap(fn, segments: int = 1):
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
    outs = folding_vmap(fn, segments * axis_size)(*_fold(axis_size, in_batched, rows))
    return _unfold(axis_size, outs), tuple(True for _ in outs)

  def forward(*rows):
    return op(*rows), rows

  def backward(rows, cotangents):
    return _folding_vmap_vjp(fn, segments)(rows, cotangents)

  op.defvjp(forward, backward)
  return op


def _folding_vmap_vjp(fn, segments: int):
  """The pullback of ``folding_vmap(fn, segments)``, folding under vmap the same way."""

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


def _gac_gates(z, c, *, global_cells, kernels, segments):
  """``gates`` then GAC: z (R, 4 hidden), c (R, hidden) -> (h, c)."""
  h, c = gates(z, c, kernels)
  return segment_average(h, global_cells, segments), c


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


def _layer_rows(layer, x, h, c, global_cells, kernels):
  """One layer (+GAC) on rows: x (R, in), h and c (R, hidden) -> new (h, c)."""
  if x.shape[0] > BLOCK_ROWS:
    h, c = _blockwise(functools.partial(cell, layer, kernels=kernels), x, h, c)
    return segment_average(h, global_cells, 1), c  # outside the fold: one problem's rows
  z = jnp.concatenate([x, h], axis=-1) @ layer["w"] + layer["b"]
  fn = functools.partial(_gac_gates, global_cells=global_cells, kernels=kernels)
  return folding_vmap(fn)(z, c)


def stacked_rows(layers, x, hidden, cell_state, global_cells, kernels=None):
  """The stacked LSTM on rows: x (R, in), hidden and cell_state (R, layers, hidden).

  Returns:
    ``(top, hidden, cell)``: the last layer's output (R, hidden) and the new states.
  """
  hs, cs = [], []
  for index, layer in enumerate(layers):
    x, c = _layer_rows(layer, x, hidden[:, index], cell_state[:, index], global_cells, kernels)
    hs.append(x)
    cs.append(c)
  return x, jnp.stack(hs, axis=1), jnp.stack(cs, axis=1)


def to_rows(leaves: list[jax.Array], trailing: int) -> jax.Array:
  """Concatenates ``leaf.shape + t`` arrays, ``t`` their last ``trailing`` axes, into (R,) + t."""
  return jnp.concatenate([a.reshape((-1,) + a.shape[a.ndim - trailing :]) for a in leaves])


def split_rows(rows: jax.Array, shapes: list[tuple[int, ...]]) -> list[jax.Array]:
  """Inverse of ``to_rows``: (R,) + t back to ``shape + t`` for each leaf shape."""
  out, start = [], 0
  for shape in shapes:
    size = math.prod(shape)
    out.append(rows[start : start + size].reshape(shape + rows.shape[1:]))
    start += size
  return out


def lstm_rows(layers, x, states: list[CoordinateState], global_cells, kernels=None):
  """``stacked_rows`` on the concatenated leaves' states: ``(top (R, hidden), hidden, cell)``."""
  hidden, cell_state = (to_rows([getattr(s, f) for s in states], 2) for f in ("hidden", "cell"))
  return stacked_rows(layers, x, hidden, cell_state, global_cells, kernels)


def split_states(hidden, cell_state, shapes) -> list[CoordinateState]:
  """(R, layers, hidden) states back to one ``CoordinateState`` per leaf shape."""
  return [
    CoordinateState(h, c)
    for h, c in zip(split_rows(hidden, shapes), split_rows(cell_state, shapes), strict=True)
  ]


def layer_weights(layers) -> list[jax.Array]:
  """The stack kernels' weight arguments: ``w_0, b_0, w_1, b_1, ...``."""
  return [a for layer in layers for a in (layer["w"], layer["b"])]


def kernel_stack(kernels, layers, xs, states, out=None):
  """The stacked LSTM without GAC by the stack kernels, one call per leaf on its state as stored.

  Args:
    kernels: the targets, ``learned_opt.backend.kernel_targets``.
    layers: ``phi["layers"]``.
    xs: one input per leaf, ``leaf.shape + (features,)``.
    states: one ``CoordinateState`` per leaf.
    out: ``phi["out"]`` to add the read-out (one output) to the kernels, or None.

  Returns:
    ``(tops, states)``: per leaf the top layer's h (``leaf.shape + (hidden,)``), or with ``out``
    the read-out (``leaf.shape``), and the new states.
  """
  weights = layer_weights(layers)
  if out is not None:
    weights += [out["w"], out["b"]]
  tops, new_states = [], []
  for x, s in zip(xs, states, strict=True):
    if out is None:
      hidden, cell_state = kernels_lib.stack(kernels, x, s.hidden, s.cell, *weights)
      tops.append(hidden[..., -1, :])
    else:
      hidden, cell_state, u = kernels_lib.stack_readout(kernels, x, s.hidden, s.cell, *weights)
      tops.append(u)
    new_states.append(CoordinateState(hidden, cell_state))
  return tops, new_states


def stacked_lstm(
  layers: list[dict],
  xs: list[jax.Array],
  states: list[CoordinateState],
  global_cells: int,
  kernels=None,
) -> tuple[list[jax.Array], list[CoordinateState]]:
  """One step of the stacked LSTM (+GAC) on every coordinate of every leaf.

  Args:
    layers: ``phi["layers"]`` from ``lstm.init_lstm_params``.
    xs: one input per leaf, shaped ``leaf.shape + (features,)``.
    states: one ``CoordinateState`` per leaf.
    global_cells: trailing units of every layer averaged over all coordinates of all leaves.
    kernels: the CPU kernels' targets (``learned_opt.backend.kernel_targets``), or None: XLA.

  Returns:
    ``(tops, states)``: the last layer's outputs shaped ``leaf.shape + (hidden,)`` per leaf and
    the new states.
  """
  if not xs:
    return [], []
  if kernels is not None and not global_cells:
    return kernel_stack(kernels, layers, xs, states)
  top, hidden, cell_state = lstm_rows(layers, to_rows(xs, 1), states, global_cells, kernels)
  shapes = [x.shape[:-1] for x in xs]
  return split_rows(top, shapes), split_states(hidden, cell_state, shapes)
