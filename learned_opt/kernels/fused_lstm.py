"""The coordinatewise LSTM's forward step as one fused CPU kernel (``lstm_step.cc``).

``as_optax(..., kernel="auto")`` runs a plain coordinatewise LSTM (``kind "lstm"``, no global
averaging cells, any preprocessing, size and depth) through this kernel on a CPU backend: one
``jax.ffi.ffi_call`` per parameter leaf, each coordinate's preprocessing, layers, read-out and
output scale in one pass while its state is in L1, on both cores. XLA runs the same math as
separate matmul and element-wise passes over all coordinates, at about 1.5x the CPU time on a
1M-parameter update (BUILD.md, issue 11). The meta-training path (``LearnedOptimizer.update``
under vmap and grad, and ``as_optax``'s default ``kernel="xla"``) never uses it.

The kernel is compiled on first use and cached (``learned_opt.kernels.build``). Without a
compiler, after a failed build or on another backend the update falls back to XLA's, with one
warning saying why.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from learned_opt.kernels import build
from learned_opt.kernels.build import KernelUnavailable
from learned_opt.lstm import CoordinateState

KERNELS = ("auto", "xla", "fused")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lstm_step.cc")
HANDLER = "LearnedOptLstmStep"  # the FFI handler lstm_step.cc exports
PREPROCESS_CODES = {"none": 0, "scale": 1, "log_sign": 2}


def unsupported_reason(config) -> str | None:
  """Why the fused kernel cannot run the optimizer with this config, or None if it can."""
  if config.get("kind") != "lstm":
    return f"it runs the coordinatewise LSTM only, and this optimizer is {config.get('kind')!r}"
  if config.get("global_cells", 0):
    return (
      f"it has no global averaging cells, and this LSTM+GAC has {config['global_cells']} "
      "(their mean over all coordinates couples the leaves)"
    )
  if config.get("preprocess", "none") not in PREPROCESS_CODES:
    return f"it knows preprocessing {tuple(PREPROCESS_CODES)}, not {config.get('preprocess')!r}"
  return None


def target() -> str:
  """The registered FFI target of the kernel, built on first use (``build.targets``).

  Raises:
    KernelUnavailable: no compiler, a failed build, or a library that does not load.
  """
  return build.targets(SOURCE, (HANDLER,))[0]


def _leaf_step(name, layers, out, grad, state, attributes):
  """The kernel on one leaf: ``(update shaped like grad, CoordinateState)``."""
  shape = jnp.shape(grad)
  rows = math.prod(shape)
  if rows == 0:
    return jnp.zeros(shape, jnp.result_type(grad)), state
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  h, c = f32(state.hidden), f32(state.cell)
  weights = [f32(a) for layer in layers for a in (layer["w"], layer["b"])]
  # The state is passed in its own shape and updated in place (input_output_aliases): any
  # reshape between a donated state and the call made XLA copy it in and out of the call.
  call = jax.ffi.ffi_call(
    name,
    (
      jax.ShapeDtypeStruct(shape, jnp.float32),
      jax.ShapeDtypeStruct(h.shape, jnp.float32),
      jax.ShapeDtypeStruct(c.shape, jnp.float32),
    ),
    vmap_method="sequential",
    input_output_aliases={1: 1, 2: 2},
  )
  update, h, c = call(f32(grad), h, c, f32(out["w"]), f32(out["b"]), *weights, **attributes)
  return update.astype(jnp.result_type(grad)), CoordinateState(h, c)


def kernel_attributes(config, threads: int = 0, spawn: bool = False) -> dict:
  """The kernel's attributes for an optimizer config, constants in float32 as XLA uses them."""
  p = np.float32(config.get("preprocess_p", 10.0))
  return {
    "preprocess": np.int32(PREPROCESS_CODES[config.get("preprocess", "none")]),
    "factor": np.float32(config.get("input_scale", 1.0)),
    # preprocess.log_sign's exp(-p) and exp(p), rounded to float32 as XLA folds them.
    "threshold": np.float32(math.exp(-p)),
    "p": p,
    "exp_p": np.float32(math.exp(p)) if p < 88 else np.float32(np.inf),
    "output_scale": np.float32(config.get("output_scale", 1.0)),
    "threads": np.int64(threads),
    "spawn": np.int32(spawn),
  }


def fused_update(config, name: str, meta_params, grads, state, threads: int = 0, spawn=False):
  """``lstm_optimizer(**config).update(meta_params, grads, state)`` by the kernel ``name``.

  Args:
    config: the optimizer's config; ``unsupported_reason(config)`` must be None.
    name: the FFI target, ``target()``.
    meta_params, grads, state: as for ``LearnedOptimizer.update``.
    threads: 0 = XLA's CPU thread pool size, n = n threads in all.
    spawn: run the other threads as fresh ``std::thread`` s, not XLA pool tasks (to compare).
  """
  leaves, treedef = jax.tree.flatten(grads)
  if not leaves:
    return treedef.unflatten([]), treedef.unflatten([])
  states = treedef.flatten_up_to(state)
  attributes = kernel_attributes(config, threads, spawn)
  steps = [
    _leaf_step(name, meta_params["layers"], meta_params["out"], g, s, attributes)
    for g, s in zip(leaves, states, strict=True)
  ]
  return treedef.unflatten([u for u, _ in steps]), treedef.unflatten([s for _, s in steps])


def _not_differentiable(fused):
  """``fused`` that raises a clear error when differentiated (the kernel has no derivative)."""
  update = jax.custom_jvp(fused)

  @update.defjvp
  def jvp(primals, tangents):
    del primals, tangents
    raise ValueError(
      "as_optax(..., kernel='auto' or 'fused') runs the fused LSTM kernel, which has no "
      "derivative; differentiate through as_optax(..., kernel='xla') (the default), as "
      "meta-training does."
    )

  return update


def make_update(optimizer, kernel: str = "auto"):
  """``optimizer.update``, or the same map by the fused kernel where ``kernel`` asks for it.

  Args:
    optimizer: a ``LearnedOptimizer``.
    kernel: ``"xla"`` (``optimizer.update`` itself, nothing built), ``"fused"`` (the kernel;
      falls back to XLA with a warning where it cannot be built, or off CPU) or ``"auto"``
      (the kernel for an optimizer it covers on a CPU backend, silently XLA otherwise; a
      warning if it cannot be built). The kernel's update is not differentiable (a clear
      error under ``jax.grad``); under ``jax.vmap`` it runs one mapped element at a time.

  Raises:
    ValueError: an unknown ``kernel``, or ``"fused"`` for an optimizer the kernel does not cover.
  """
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
  if kernel == "xla":
    return optimizer.update
  reason = unsupported_reason(optimizer.config)
  if reason is not None:
    if kernel == "fused":
      raise ValueError(
        f"kernel='fused' cannot run this optimizer: {reason}. Pass kernel='auto' (the fused "
        "kernel where it applies) or kernel='xla'."
      )
    return optimizer.update
  config = dict(optimizer.config)

  def update(meta_params, grads, state):
    if jax.default_backend() != "cpu":
      if kernel == "fused":
        build.warn_once(
          f"kernel='fused' is a CPU kernel and the backend is {jax.default_backend()!r}; "
          "running the XLA update instead. Pass kernel='auto' to choose silently."
        )
      return optimizer.update(meta_params, grads, state)
    try:
      name = target()
    except KernelUnavailable as e:
      build.warn_once(
        f"The fused LSTM kernel is unavailable: {e}. Running the XLA update instead (about "
        "1.5x the CPU time on large models); install g++ or set $CXX, or pass kernel='xla' "
        "to silence this."
      )
      return optimizer.update(meta_params, grads, state)
    fused = functools.partial(fused_update, config, name)
    return _not_differentiable(fused)(meta_params, grads, state)

  return update
