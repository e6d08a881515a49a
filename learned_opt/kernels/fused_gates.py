"""The LSTM's gates, or a whole stacked LSTM step, and their derivatives as fused CPU kernels.

``learned_opt.lstm`` computes every layer as a matmul ``z = [x, h] @ W + b`` and then the gates
``(z (..., 4 hidden), c (..., hidden)) -> (h', c')``, which XLA:CPU runs as many element-wise
passes; differentiated (meta-training, every step of every unroll) they cost 1.0-1.7x the
layer's matmul forward and backward (``benchmarks/gates.py``, BUILD.md, issue 11). On a CPU
backend:

* ``stack`` (``lstm_stack.cc``): a whole step of a stacked coordinatewise LSTM (no global
  averaging cells) on one parameter leaf, every layer, forward and backward, in one pass over
  tiles of 16 rows: each layer's ``[input, h]`` and ``z`` live in L1 and are recomputed by the
  backward pass, which returns the cotangents of the input, the state and every layer's
  weights. Under ``jax.vmap`` with shared weights the mapped problems are more rows of one call
  and the weight cotangents come out summed over them. ``stack_readout`` adds the optimizer's
  linear read-out of the top layer to the same kernels.
* ``gates`` (``lstm_gates.cc``): the gates alone, for LSTM+GAC (whose averaging sits between
  the gates and the next layer, so XLA computes its matmuls), forward and backward
  (recomputing the gates from z and c).

Both work under ``jax.jit``, ``jax.vmap`` and ``jax.grad`` alike. They agree with XLA's to
~1e-6 (a polynomial exp), so results match the XLA path to float tolerance, not bit for bit;
the kernels are deterministic (weight cotangents are summed per fixed chunk of rows, then in
chunk order), so a run and its resume still agree bit for bit.

``$LEARNED_OPT_GATES`` chooses, when a computation is traced: ``auto`` (default: the kernels on
a CPU backend with a single device, XLA elsewhere or where they cannot be built or loaded, with
one warning saying why), ``xla`` (never build or use them) or ``fused`` (insists: the kernels on
any number of CPU devices, ``KernelUnavailable`` where they cannot be built or loaded or on a
non-CPU backend). ``auto`` leaves the gates to XLA when the process
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
_HERE = os.path.dirname(os.path.abspath(__file__))
# Each source with the FFI handlers it exports; available() returns the targets in this order.
SOURCES = (
  (os.path.join(_HERE, "lstm_gates.cc"), ("LearnedOptGatesForward", "LearnedOptGatesBackward")),
  (
    os.path.join(_HERE, "lstm_stack.cc"),
    (
      "LearnedOptStackForward",
      "LearnedOptStackBackward",
      "LearnedOptStackReadoutForward",
      "LearnedOptStackReadoutBackward",
    ),
  ),
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
  """The kernels' FFI targets (``SOURCES``' order) if this trace should use them, else None.

  Raises:
    KernelUnavailable: ``fused`` and the kernels cannot be built or loaded.
  """
  chosen = mode()
  if chosen == "xla" or jnp.dtype(dtype) != jnp.float32:
    return None
  if chosen == "auto" and jax.device_count() > 1:
    return None
  if jax.default_backend() != "cpu":
    if chosen == "fused":
      raise KernelUnavailable(
        f"{ENV_VAR}=fused insists on the fused gates, CPU kernels, and the backend is "
        f"{jax.default_backend()!r}; set {ENV_VAR}=auto (XLA off CPU) or {ENV_VAR}=xla."
      )
    return None
  try:
    return tuple(name for source, handlers in SOURCES for name in build.targets(source, handlers))
  except KernelUnavailable as e:
    if chosen == "fused":
      raise KernelUnavailable(
        f"{ENV_VAR}=fused insists on the fused LSTM gate kernels, which are unavailable: {e}. "
        f"Fix that, or set {ENV_VAR}=auto (XLA, with a warning, where they are unavailable) or "
        f"{ENV_VAR}=xla."
      ) from e
    build.warn_once(
      f"The fused LSTM gate kernels are unavailable: {e}. XLA computes the gates instead (an "
      f"MNIST meta-step takes about 1.3x the CPU time); set {ENV_VAR}=xla to silence this."
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


def mapped_first(axis_size: int, in_batched, arrays) -> list[jax.Array]:
  """For a ``custom_vmap`` rule: every array with the mapped axis in front, broadcast to
  ``axis_size`` where it was not mapped (``in_batched`` False)."""
  return [
    a if mapped else jnp.broadcast_to(a, (axis_size,) + a.shape)
    for a, mapped in zip(arrays, in_batched, strict=True)
  ]


@functools.cache  # one custom_vmap function per set of targets, not one per trace
def _stack_forward(names, readout: bool = False):
  """``(x, h, c, *weights) -> (h', c'[, u])`` by the forward kernel; under vmap (weights
  unmapped) the mapped axis is more rows of one call, mapped weights run one element at a time.
  With ``readout`` the last two weights are ``w_out, b_out`` and ``u = h'_top @ w_out + b_out``."""

  @custom_batching.custom_vmap
  def forward(x, h, c, *weights):
    state = jax.ShapeDtypeStruct(h.shape, jnp.float32)
    if not readout:
      return tuple(jax.ffi.ffi_call(names[2], (state, state))(x, h, c, *weights))
    u = jax.ShapeDtypeStruct(h.shape[:-2], jnp.float32)
    return tuple(jax.ffi.ffi_call(names[4], (state, state, u))(x, h, c, *weights))

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
def _stack_backward(names, readout: bool = False):
  """``(x, h, c, *weights, dh', dc'[, du]) -> (dx, dh, dc, *dweights)``; under vmap with the
  weights unmapped their cotangents come out summed over the mapped axis."""
  cotangent_count = 3 if readout else 2

  @custom_batching.custom_vmap
  def backward(x, h, c, *rest):
    like = lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32)
    out = tuple(like(a) for a in (x, h, c, *rest[:-cotangent_count]))
    return tuple(jax.ffi.ffi_call(names[5 if readout else 3], out)(x, h, c, *rest))

  @backward.def_vmap
  def _(axis_size, in_batched, x, h, c, *rest):
    weights, cotangents = rest[:-cotangent_count], rest[-cotangent_count:]
    x, h, c, *cotangents = mapped_first(
      axis_size, in_batched[:3] + in_batched[-cotangent_count:], (x, h, c, *cotangents)
    )
    if any(in_batched[3:-cotangent_count]):
      weights = mapped_first(axis_size, in_batched[3:-cotangent_count], weights)
      out = jax.lax.map(lambda a: backward(*a), (x, h, c, *weights, *cotangents))
      return out, (True,) * len(out)
    out = backward(x, h, c, *weights, *cotangents)
    return out, (True, True, True) + (False,) * len(weights)

  return backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def stack(names: tuple[str, ...], x: jax.Array, h: jax.Array, c: jax.Array, *weights):
  """One step of a stacked coordinatewise LSTM (no GAC) by the stack kernels: ``(h', c')``.

  Every layer of every row in one pass, forward and backward, on the state in its own layout:
  no per-layer slicing, concatenation or stacking in XLA, and no per-layer values saved.

  Args:
    names: the FFI targets, ``available(...)``.
    x: the preprocessed gradients (..., features), float32.
    h, c: the state (..., layers, hidden), float32.
    *weights: ``w_0, b_0, w_1, b_1, ...``, ``w_l`` (in_l + hidden, 4 hidden) with ``in_0 =
      features`` and ``in_l = hidden`` above, ``b_l`` (4 hidden,).
  """
  return _stack_forward(names)(x, h, c, *weights)


def _stack_vjp_forward(names, x, h, c, *weights):
  return stack(names, x, h, c, *weights), (x, h, c, *weights)


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
  return _stack_forward(names, True)(x, h, c, *weights)


def _stack_readout_vjp_forward(names, x, h, c, *weights):
  return stack_readout(names, x, h, c, *weights), (x, h, c, *weights)


def _stack_readout_vjp_backward(names, saved, cotangents):
  return _stack_backward(names, True)(*saved, *cotangents)


stack_readout.defvjp(_stack_readout_vjp_forward, _stack_readout_vjp_backward)
