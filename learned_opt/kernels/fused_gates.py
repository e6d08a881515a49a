"""The LSTM cell's gates and their derivative as fused CPU kernels (``lstm_gates.cc``).

``learned_opt.lstm`` computes every layer as a matmul, which XLA does well, and then the gates
``(z (..., 4 hidden), c (..., hidden)) -> (h', c')``, which XLA:CPU runs as many element-wise
passes; differentiated (meta-training, every step of every unroll) they cost 1.0-1.7x the
layer's matmul forward and backward (``benchmarks/gates.py``, BUILD.md, issue 11). On a CPU
backend the gates run as one fused pass forward and one backward (which recomputes the gates
from z and c), under ``jax.jit``, ``jax.vmap`` and ``jax.grad`` alike. They agree with XLA's to
~1e-6 (a polynomial exp), so results match the XLA path to float tolerance, not bit for bit; the
kernels are deterministic, so a run and its resume still agree bit for bit.

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

from learned_opt.kernels import build
from learned_opt.kernels.build import KernelUnavailable

ENV_VAR = "LEARNED_OPT_GATES"
MODES = ("auto", "xla", "fused")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lstm_gates.cc")
HANDLERS = ("LearnedOptGatesForward", "LearnedOptGatesBackward")


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


def available(dtype) -> tuple[str, str] | None:
  """The kernels' FFI targets if this trace should use them for ``dtype`` gates, else None."""
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
    forward, backward = build.targets(SOURCE, HANDLERS)
  except KernelUnavailable as e:
    build.warn_once(
      f"The fused LSTM gate kernels are unavailable: {e}. XLA computes the gates instead (an "
      "MNIST meta-step takes about 1.3x the CPU time); install g++ or set $CXX, or set "
      f"{ENV_VAR}=xla to silence this."
    )
    return None
  return forward, backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gates(names: tuple[str, str], z: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``lstm._gates(z, c)`` by the kernels ``names = available(...)``: the new ``(h, c)``.

  Args:
    names: the forward and backward FFI targets.
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
