"""The LSTM layer's gates, or the whole layer, and their derivatives as fused CPU kernels.

``learned_opt.lstm`` computes every layer as a matmul ``z = [x, h] @ W + b`` and then the gates
``(z (..., 4 hidden), c (..., hidden)) -> (h', c')``, which XLA:CPU runs as many element-wise
passes; differentiated (meta-training, every step of every unroll) they cost 1.0-1.7x the
layer's matmul forward and backward (``benchmarks/gates.py``, BUILD.md, issue 11). On a CPU
backend (``lstm_gates.cc``):

* ``layer``: a whole coordinatewise layer (no global averaging cells) in one pass over tiles of
  16 rows, forward and backward: the tile's ``z`` is computed in L1 and used there, never
  written to memory, and the backward pass recomputes it and returns the cotangents of the
  layer's input, cell, weights and bias. Under ``jax.vmap`` with shared weights the mapped
  problems are more rows of one call and the weight cotangents come out summed over them.
  About 2x on the MNIST meta-step over XLA's layer, 1.25x on the quadratic one (BUILD.md).
* ``gates``: the gates alone, for LSTM+GAC (whose averaging sits between the gates and the
  next layer), forward and backward (recomputing the gates from z and c).

Both work under ``jax.jit``, ``jax.vmap`` and ``jax.grad`` alike. They agree with XLA's to
~1e-6 (a polynomial exp), so results match the XLA path to float tolerance, not bit for bit;
the kernels are deterministic (weight cotangents are summed per fixed chunk of rows, then in
chunk order), so a run and its resume still agree bit for bit.

``$LEARNED_OPT_GATES`` chooses, when a computation is traced: ``auto`` (default: the kernels on
a CPU backend with a single device, XLA elsewhere or where they cannot be built, with one warning
saying why), ``xla`` (never build or use them) or ``fused`` (the kernels on any number of CPU
devices, and a warning on a non-CPU backend). ``auto`` leaves the gates to XLA when the process
has several devices: XLA's partitioner knows nothing of a custom call and runs it on every
device over all rows, gathered, which made a quadratic meta-step split over two CPU devices
about 1.5x slower (BUILD.md). Set it before the process traces anything: ``jax.jit`` caches a
function's trace, so changing it later does not change an already traced function. Being a
``custom_vjp``, the kernel path has no forward-mode derivative (``jax.jvp``); set
``LEARNED_OPT_GATES=xla`` for that.
"""

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
from jax import custom_batching

from learned_opt.kernels import build
from learned_opt.kernels.build import KernelUnavailable

ENV_VAR = "LEARNED_OPT_GATES"
MODES = ("auto", "xla", "fused")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lstm_gates.cc")
HANDLERS = (
  "LearnedOptGatesForward",
  "LearnedOptGatesBackward",
  "LearnedOptLayerForward",
  "LearnedOptLayerBackward",
)


def mode() -> str:
  """``$LEARNED_OPT_GATES``, default ``auto``; a clear error for any other value."""
  value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
  if value not in MODES:
    raise ValueError(
      f"${ENV_VAR}={os.environ[ENV_VAR]!r} is not one of {MODES}; unset it (auto: fused CPU "
      f"kernels where they build) or set {ENV_VAR}=xla."
    )
  return value


@contextlib.contextmanager
def using(chosen: str):
  """``$LEARNED_OPT_GATES=chosen`` inside the block (for what is traced there), restored after."""
  if chosen not in MODES:
    raise ValueError(f"{ENV_VAR} takes {MODES}, got {chosen!r}.")
  saved = os.environ.get(ENV_VAR)
  os.environ[ENV_VAR] = chosen
  try:
    yield
  finally:
    if saved is None:
      os.environ.pop(ENV_VAR)
    else:
      os.environ[ENV_VAR] = saved


def available(dtype) -> tuple[str, ...] | None:
  """The kernels' FFI targets (``HANDLERS``' order) if this trace should use them, else None."""
  chosen = mode()
  if chosen == "xla" or jnp.dtype(dtype) != jnp.float32:
    return None
  if chosen == "auto" and jax.device_count() > 1:
    return None
  if jax.default_backend() != "cpu":
    if chosen == "fused":
      build.warn_once(
        f"{ENV_VAR}=fused: the fused gates are CPU kernels and the backend is "
        f"{jax.default_backend()!r}; XLA computes the gates instead."
      )
    return None
  try:
    return build.targets(SOURCE, HANDLERS)
  except KernelUnavailable as e:
    build.warn_once(
      f"The fused LSTM gate kernels are unavailable: {e}. XLA computes the gates instead (an "
      "MNIST meta-step takes about 1.3x the CPU time); install g++ or set $CXX, or set "
      f"{ENV_VAR}=xla to silence this."
    )
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gates(names: tuple[str, ...], z: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``lstm._gates(z, c)`` by the kernels ``names = available(...)``: the new ``(h, c)``.

  Args:
    names: the FFI targets, ``available(...)``.
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


def _rows_first(axis_size, in_batched, arrays):
  """Arrays with the mapped axis in front, broadcast where they were not mapped."""
  return [
    a if mapped else jnp.broadcast_to(a, (axis_size,) + a.shape)
    for a, mapped in zip(arrays, in_batched, strict=True)
  ]


def _layer_forward(names):
  """``(a, c, w, b) -> (h', c')`` by the forward kernel; under vmap (w, b unmapped) the mapped
  axis is more rows of one call, a mapped w or b runs one element at a time."""

  @custom_batching.custom_vmap
  def forward(a, c, w, b):
    state = jax.ShapeDtypeStruct(c.shape, jnp.float32)
    return tuple(jax.ffi.ffi_call(names[2], (state, state))(a, c, w, b))

  @forward.def_vmap
  def _(axis_size, in_batched, a, c, w, b):
    a, c = _rows_first(axis_size, in_batched[:2], (a, c))
    if any(in_batched[2:]):
      w, b = _rows_first(axis_size, in_batched[2:], (w, b))
      return jax.lax.map(lambda x: forward(*x), (a, c, w, b)), (True, True)
    return forward(a, c, w, b), (True, True)

  return forward


def _layer_backward(names):
  """``(a, c, w, b, dh', dc') -> (da, dc, dw, db)`` by the backward kernel; under vmap with w
  and b unmapped, dw and db come out summed over the mapped axis (unmapped), as w's and b's
  cotangents must."""

  @custom_batching.custom_vmap
  def backward(a, c, w, b, dh, dc):
    like = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)
    out = (like(a), like(c), like(w), like(b))
    return tuple(jax.ffi.ffi_call(names[3], out)(a, c, w, b, dh, dc))

  @backward.def_vmap
  def _(axis_size, in_batched, a, c, w, b, dh, dc):
    a, c, dh, dc = _rows_first(axis_size, in_batched[:2] + in_batched[4:], (a, c, dh, dc))
    if any(in_batched[2:4]):
      w, b = _rows_first(axis_size, in_batched[2:4], (w, b))
      return jax.lax.map(lambda x: backward(*x), (a, c, w, b, dh, dc)), (True,) * 4
    return backward(a, c, w, b, dh, dc), (True, True, False, False)

  return backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def layer(names: tuple[str, ...], a: jax.Array, c: jax.Array, w: jax.Array, b: jax.Array):
  """One LSTM layer ``_gates(a @ w + b, c)`` by the layer kernels: the new ``(h, c)``.

  The pre-activations ``a @ w + b`` live in an L1 tile inside the kernel and are recomputed by
  the backward kernel, so neither pass writes them to memory, and the backward pass returns the
  weight cotangents summed over every row (and, under ``jax.vmap``, every mapped problem).

  Args:
    names: the FFI targets, ``available(...)``.
    a: the layer's ``[input, old hidden state]`` (..., fan_in), float32.
    c: the old cell (..., hidden), float32.
    w, b: the layer's weights (fan_in, 4 hidden) and bias (4 hidden,), gates i, f, g, o.
  """
  return _layer_forward(names)(a, c, w, b)


def _layer_vjp_forward(names, a, c, w, b):
  return layer(names, a, c, w, b), (a, c, w, b)


def _layer_vjp_backward(names, saved, cotangents):
  dh, dc = cotangents
  return _layer_backward(names)(*saved, dh, dc)


layer.defvjp(_layer_vjp_forward, _layer_vjp_backward)
