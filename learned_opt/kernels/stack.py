"""The CPU kernels' one face: the LSTM's gates, or a whole stacked LSTM step, as JAX functions.

One C++ family (``lstm_stack.cc`` and ``lstm_gates.cc``, sharing ``gates.h``), compiled on first
use and loaded (``learned_opt.kernels.build``, ``loading``); ``learned_opt.backend`` chooses
when they run.

* ``stack``: a whole step of a stacked coordinatewise LSTM (no global averaging cells) on one
  parameter leaf, every layer, forward and backward, in one pass over tiles of rows: each
  layer's ``[input, h]`` and ``z = [input, h] @ W + b`` live in L1 and are recomputed by the
  backward pass, which returns the cotangents of the input, the state and every layer's weights.
  ``stack_readout`` adds the optimizer's linear read-out of the top layer (an epilogue of the
  same kernels); the optimizer's preprocessing (element-wise, before) and output scale (after)
  stay in XLA. Not differentiated (an ``as_optax`` update), the new state overwrites the old in
  place: with a donated state no copy and no fresh buffer.
* ``readout_step_in_workspace`` and ``readout_sequence_backward``: a whole truncation of
  ``stack_readout`` steps without JAX's autodiff (``train.truncation``): each step reads its state
  from slot t of a workspace holding every step's state and writes slot t + 1 in place, so no
  carry is copied and nothing is stacked; the backward kernel then runs every step of a tile of
  rows backward in time, the state's cotangents in the tile's own buffers, and returns only the
  weights' cotangents.
* ``gates``: the gates alone, for LSTM+GAC (whose averaging sits between the gates and the next
  layer, so XLA computes its matmuls), forward and backward (recomputing the gates from z, c).

Under ``jax.vmap`` with shared weights the mapped problems are more rows of one call, whose weight
cotangents are summed per problem (a vmapped gradient is each problem's own); mapped weights run
one element at a time. They agree with XLA's math to ~1e-6 (a polynomial exp), not bit for bit,
and are deterministic: weight cotangents are summed per fixed chunk of rows, then in chunk
order, whatever thread took a chunk.
They are ``custom_vjp`` s: no forward-mode derivative (``jax.jvp``).
"""

import functools
import os

import jax
import jax.numpy as jnp
from jax import custom_batching

from learned_opt.kernels import loading

_HERE = os.path.dirname(os.path.abspath(__file__))
# Each source with the FFI handlers it exports; targets() returns them in this order.
SOURCES = (
  (os.path.join(_HERE, "lstm_gates.cc"), ("LearnedOptGatesForward", "LearnedOptGatesBackward")),
  (
    os.path.join(_HERE, "lstm_stack.cc"),
    (
      "LearnedOptStackForward",
      "LearnedOptStackBackward",
      "LearnedOptStackReadoutForward",
      "LearnedOptStackReadoutBackward",
      "LearnedOptStackReadoutStepForward",
      "LearnedOptStackReadoutSequenceBackward",
    ),
  ),
)


def targets() -> tuple[str, ...]:
  """The kernels' registered FFI targets (``SOURCES``' order), built on first use.

  Raises:
    KernelUnavailable: no compiler, a failed build, an untrusted cache or a library that does
      not load (``loading.targets``).
  """
  return tuple(name for source, handlers in SOURCES for name in loading.targets(source, handlers))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gates(names: tuple[str, ...], z: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The LSTM gates by the kernels: ``(z, c) -> (h', c')``, as ``lstm_rows.xla_gates``.

  Args:
    names: the FFI targets, ``targets()``.
    z: pre-activations (..., 4 hidden), gates in order i, f, g, o; float32.
    c: the old cell (..., hidden), float32.
  """
  state = jax.ShapeDtypeStruct(c.shape, jnp.float32)
  return jax.ffi.ffi_call(names[0], (state, state), vmap_method="broadcast_all")(z, c)


def _gates_forward(names, z, c):
  return gates(names, z, c), (z, c)


def _gates_backward(names, saved, cotangents):
  """The backward kernel recomputes the gates from the saved z and c: ``(dz, dc)``."""
  z, c = saved
  dh, dc = cotangents
  out = (jax.ShapeDtypeStruct(z.shape, jnp.float32), jax.ShapeDtypeStruct(c.shape, jnp.float32))
  return tuple(jax.ffi.ffi_call(names[1], out, vmap_method="broadcast_all")(z, c, dh, dc))


gates.defvjp(_gates_forward, _gates_backward)


# The last of a kernel family's targets inside ``backend.gradient_of_vmapped``: its vmap rules
# then return shared weights' cotangents summed over the mapped axis (unbatched), not one per
# problem.
SUM_OVER_VMAP = "sum_over_vmap"


def mapped_first(axis_size: int, in_batched, arrays) -> list[jax.Array]:
  """For a ``custom_vmap`` rule: every array with the mapped axis in front, broadcast to
  ``axis_size`` where it was not mapped (``in_batched`` False)."""
  return [
    a if mapped else jnp.broadcast_to(a, (axis_size,) + a.shape)
    for a, mapped in zip(arrays, in_batched, strict=True)
  ]


def backward_vmap_rule(
  axis_size, in_batched, args, rows, cotangents, backward, per_problem, names, groups
):
  """The ``custom_vmap`` rule of a kernel's backward pass ``backward`` on ``args`` = ``rows`` row
  arrays, the weights, then ``cotangents`` cotangents, returning the rows' cotangents, then the
  weights'. Mapped weights: one call per problem (``lax.map``). Shared weights: one call on every
  problem's rows, whose weight cotangents are, with ``names`` marked ``SUM_OVER_VMAP`` (and no
  per-problem level outside, ``groups`` 0), summed over the rows and unbatched, else each
  problem's own (``per_problem``: ``backward`` with one more level of groups)."""
  n = len(args)
  row_args = args[:rows] + args[n - cotangents :]
  row_args = mapped_first(axis_size, in_batched[:rows] + in_batched[n - cotangents :], row_args)
  inputs, cots = row_args[:rows], row_args[rows:]
  weights, weights_mapped = args[rows : n - cotangents], in_batched[rows : n - cotangents]
  if any(weights_mapped):
    weights = mapped_first(axis_size, weights_mapped, weights)
    out = jax.lax.map(lambda a: backward(*a), (*inputs, *weights, *cots))
  elif names[-1] == SUM_OVER_VMAP and groups == 0:
    out = backward(*inputs, *weights, *cots)
    return out, (True,) * rows + (False,) * (len(out) - rows)
  else:
    out = per_problem(*inputs, *weights, *cots)
  return out, (True,) * len(out)


@functools.cache  # one custom_vmap function per set of targets, not one per trace
def _stack_forward(names, readout: bool = False, in_place: bool = False):
  """``(x, h, c, *weights) -> (h', c'[, u])`` by the forward kernel; under vmap (weights
  unmapped) the mapped axis is more rows of one call, mapped weights run one element at a time.
  With ``readout`` the last two weights are ``w_out, b_out`` and ``u = h'_top @ w_out + b_out``.
  With ``in_place`` h' and c' alias h and c (the kernel reads a row's state of a layer before it
  writes it): XLA copies h and c first only where they are used after the call, so it is for
  the undifferentiated step, whose old state is dead, not for the VJP's forward, which saves it."""

  @custom_batching.custom_vmap
  def forward(x, h, c, *weights):
    state = jax.ShapeDtypeStruct(h.shape, jnp.float32)
    aliases = {1: 0, 2: 1} if in_place else {}
    if not readout:
      call = jax.ffi.ffi_call(names[2], (state, state), input_output_aliases=aliases)
      return tuple(call(x, h, c, *weights))
    u = jax.ShapeDtypeStruct(h.shape[:-2], jnp.float32)
    call = jax.ffi.ffi_call(names[4], (state, state, u), input_output_aliases=aliases)
    return tuple(call(x, h, c, *weights))

  @forward.def_vmap
  def _(axis_size, in_batched, x, h, c, *weights):
    x, h, c = mapped_first(axis_size, in_batched[:3], (x, h, c))
    mapped = (True,) * (3 if readout else 2)
    if any(in_batched[3:]):
      weights = mapped_first(axis_size, in_batched[3:], weights)
      return jax.lax.map(lambda a: forward(*a), (x, h, c, *weights)), mapped
    return forward(x, h, c, *weights), mapped

  return forward


@functools.cache
def _stack_backward(names, readout: bool = False, groups: int = 0):
  """``(x, h, c, *weights, dh', dc'[, du]) -> (dx, dh, dc, *dweights)``, each weight's cotangent
  shaped ``h.shape[:groups] + w.shape``: under vmap with the weights unmapped, one per mapped
  problem (the kernel sums each problem's rows apart; ``jax.grad`` of a vmapped loss then adds
  them up, a vmapped ``jax.grad`` keeps them), or, with ``names`` marked ``SUM_OVER_VMAP``,
  their sum over every row, unbatched."""
  cotangent_count = 3 if readout else 2

  @custom_batching.custom_vmap
  def backward(x, h, c, *rest):
    like = lambda a, lead=(): jax.ShapeDtypeStruct(lead + a.shape, jnp.float32)
    out = tuple(like(a) for a in (x, h, c))
    out += tuple(like(w, h.shape[:groups]) for w in rest[:-cotangent_count])
    return tuple(jax.ffi.ffi_call(names[5 if readout else 3], out)(x, h, c, *rest))

  @backward.def_vmap
  def _(axis_size, in_batched, *args):
    per_problem = _stack_backward(names, readout, groups + 1)
    return backward_vmap_rule(
      axis_size, in_batched, args, 3, cotangent_count, backward, per_problem, names, groups
    )

  return backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def stack(names: tuple[str, ...], x: jax.Array, h: jax.Array, c: jax.Array, *weights):
  """One step of a stacked coordinatewise LSTM (no GAC) by the stack kernels: ``(h', c')``.

  Every layer of every row in one pass, forward and backward, on the state in its own layout:
  no per-layer slicing, concatenation or stacking in XLA, and no per-layer values saved.

  Args:
    names: the FFI targets, ``targets()``.
    x: the preprocessed gradients (..., features), float32.
    h, c: the state (..., layers, hidden), float32.
    *weights: ``w_0, b_0, w_1, b_1, ...``, ``w_l`` (in_l + hidden, 4 hidden) with ``in_0 =
      features`` and ``in_l = hidden`` above, ``b_l`` (4 hidden,).
  """
  return _stack_forward(names, False, True)(x, h, c, *weights)


def _stack_vjp_forward(names, x, h, c, *weights):
  return _stack_forward(names)(x, h, c, *weights), (x, h, c, *weights)


def _stack_vjp_backward(names, saved, cotangents):
  return _stack_backward(names)(*saved, *cotangents)


stack.defvjp(_stack_vjp_forward, _stack_vjp_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def stack_readout(names: tuple[str, ...], x: jax.Array, h: jax.Array, c: jax.Array, *weights):
  """``stack`` and a linear read-out of the top layer in the same kernels: ``(h', c', u)``.

  ``u = h'[..., -1, :] @ w_out + b_out`` (shaped ``h.shape[:-2]``), with ``w_out`` (hidden, 1)
  and ``b_out`` (1,) the last two of ``weights``. The backward kernel recomputes the top h, so
  XLA neither keeps a copy of it for the read-out's derivative nor adds the read-out's cotangent
  into dh'.
  """
  return _stack_forward(names, True, True)(x, h, c, *weights)


def _stack_readout_vjp_forward(names, x, h, c, *weights):
  return _stack_forward(names, True)(x, h, c, *weights), (x, h, c, *weights)


def _stack_readout_vjp_backward(names, saved, cotangents):
  return _stack_backward(names, True)(*saved, *cotangents)


stack_readout.defvjp(_stack_readout_vjp_forward, _stack_readout_vjp_backward)


def readout_step_in_workspace(names, x, wh, wc, t, *weights):
  """One ``stack_readout`` step inside a truncation's workspace: ``(wh, wc, u)``.

  Args:
    names: the FFI targets, ``targets()``.
    x: the preprocessed gradients (rows, features), float32.
    wh, wc: the workspace (steps + 1, rows, layers, hidden): the state before step t in slot t.
      Returned with slot t + 1 written, in place (donate them, or let XLA reuse the buffer of a
      scan's carry).
    t: the step, an int32 scalar.
    *weights: ``w_0, b_0, ..., w_out, b_out``, as ``stack_readout``'s.

  Returns:
    ``(wh, wc, u)``, u (rows,) the read-out of the new top h. Not differentiable: the
    truncation's weight cotangents come from ``readout_sequence_backward``.
  """
  workspace = jax.ShapeDtypeStruct(wh.shape, jnp.float32)
  u = jax.ShapeDtypeStruct(wh.shape[1:-2], jnp.float32)
  call = jax.ffi.ffi_call(names[6], (workspace, workspace, u), input_output_aliases={1: 0, 2: 1})
  return tuple(call(x, wh, wc, jnp.asarray(t, jnp.int32), *weights))


def readout_sequence_backward(names, xs, wh, wc, *weights_and_du):
  """The weights' cotangents of a truncation of ``stack_readout`` steps.

  Args:
    names: the FFI targets, ``targets()``.
    xs: every step's input (steps, rows, features).
    wh, wc: the workspace its steps filled (steps + 1, rows, layers, hidden).
    *weights_and_du: ``w_0, b_0, ..., w_out, b_out``, then ``du`` (steps, rows), the read-outs'
      cotangents. The state after the last step gets none (a truncation's end).

  Returns:
    One cotangent per weight, shaped like it: summed over every row and step (in fixed chunks
    of rows, so the same on any number of threads).
  """
  weights = weights_and_du[:-1]
  out = tuple(jax.ShapeDtypeStruct(w.shape, jnp.float32) for w in weights)
  return tuple(jax.ffi.ffi_call(names[7], out)(xs, wh, wc, *weights_and_du))
