"""The coordinatewise LSTM's forward step as one fused CPU kernel (``lstm_step.cc``).

``as_optax`` (its default ``kernel="auto"``) runs a plain coordinatewise LSTM (``kind
"lstm"``, no global averaging cells, any preprocessing, size and depth) through this kernel on a
CPU backend with one device: one ``jax.ffi.ffi_call`` per parameter leaf, each coordinate's
preprocessing, layers, read-out and output scale in one pass while its state is in L1, on both
cores, the state updated in place. XLA runs the same math as separate matmul and element-wise
passes over all coordinates, at about 3x the CPU time on a 1M-parameter update (BUILD.md,
issue 11). Under ``jax.vmap`` the mapped axis becomes more rows of one call. Differentiated
(meta-training through ``as_optax``), the update is the optimizer's own (``kernel="xla"``'s),
values and derivatives alike, so the
kernel never changes a meta-gradient.

The kernel is compiled on first use and cached (``learned_opt.kernels.build``, which loads only
what this user built). Under ``"auto"``, without a compiler, after a failed build, with a cache
it refuses or on another backend the update falls back to XLA's, with one warning saying why;
``"fused"`` raises ``KernelUnavailable`` instead where the kernel cannot be built or loaded.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from learned_opt.kernels import build, fused_gates
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


def _kernel_call(name, attributes):
  """``(grad, h, c, out_w, out_b, *weights) -> (update, h, c)`` by the kernel, batchable.

  The kernel treats every leading axis of ``grad`` (``h``, ``c``: the same axes, then layers and
  units) as rows, so under ``jax.vmap`` with phi unmapped the batch axis simply becomes more
  rows: one call over every problem, not one per problem. A mapped phi (a different optimizer
  per element) runs one element at a time.
  """
  raw = lambda grad, h, c, *phi: jax.ffi.ffi_call(
    name,
    (
      jax.ShapeDtypeStruct(grad.shape, jnp.float32),
      jax.ShapeDtypeStruct(h.shape, jnp.float32),
      jax.ShapeDtypeStruct(c.shape, jnp.float32),
    ),
    vmap_method="sequential",
    # The new state overwrites the old: with a donated state no copy and no fresh buffer. Any
    # reshape between a donated state and the call made XLA copy it in and out, so none is done.
    input_output_aliases={1: 1, 2: 2},
  )(grad, h, c, *phi, **attributes)
  call = jax.custom_batching.custom_vmap(raw)

  @call.def_vmap
  def _batched(axis_size, in_batched, grad, h, c, *phi):
    grad, h, c = fused_gates.mapped_first(axis_size, in_batched[:3], (grad, h, c))
    if not any(in_batched[3:]):
      return call(grad, h, c, *phi), (True, True, True)
    phi = fused_gates.mapped_first(axis_size, in_batched[3:], phi)
    return jax.lax.map(lambda a: call(*a), (grad, h, c, *phi)), (True, True, True)

  return call


def _leaf_step(name, layers, out, grad, state, attributes):
  """The kernel on one leaf: ``(update shaped like grad, CoordinateState)``."""
  if math.prod(jnp.shape(grad)) == 0:
    return jnp.zeros(jnp.shape(grad), jnp.result_type(grad)), state
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  weights = [f32(a) for layer in layers for a in (layer["w"], layer["b"])]
  update, h, c = _kernel_call(name, attributes)(
    f32(grad), f32(state.hidden), f32(state.cell), f32(out["w"]), f32(out["b"]), *weights
  )
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


def _differentiated_as(fused, reference):
  """``fused``, whose reverse-mode derivative (``jax.grad``, ``jax.vjp``) is ``reference``'s.

  The kernel has no derivative of its own; differentiated, the whole update (values included)
  is ``reference``'s, so meta-training through ``as_optax`` sees exactly that path. Like it
  (its fused step and gates are ``custom_vjp`` s), it has no forward-mode derivative.
  """
  update = jax.custom_vjp(fused)
  update.defvjp(lambda *primals: jax.vjp(reference, *primals), lambda vjp, ct: vjp(ct))
  return update


def make_update(optimizer, kernel: str = "auto"):
  """``optimizer.update``, or the same map by the fused kernel where ``kernel`` asks for it.

  Args:
    optimizer: a ``LearnedOptimizer``.
    kernel: ``"xla"`` (``optimizer.update`` itself, nothing built), ``"fused"`` (insists on
      the kernel: raises where it cannot be built or loaded, or off CPU) or
      ``"auto"`` (the kernel for an optimizer it covers on a CPU backend with a single device,
      silently XLA otherwise; XLA with a warning if it cannot be built or loaded).
      Differentiated (reverse mode), the update is ``optimizer.update``'s; under ``jax.vmap``
      (phi unmapped) the kernel runs once over every mapped element.

  Raises:
    ValueError: an unknown ``kernel``, or ``"fused"`` for an optimizer the kernel does not cover.
    KernelUnavailable: from the update, when traced, under ``"fused"`` where the kernel cannot
      be built or loaded (the message says why and how to fix it).
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
    if kernel == "auto" and jax.device_count() > 1:
      # XLA's partitioner would gather sharded rows and run the call on every device.
      return optimizer.update(meta_params, grads, state)
    if jax.default_backend() != "cpu":
      if kernel == "fused":
        raise KernelUnavailable(
          f"kernel='fused' insists on a CPU kernel and the backend is "
          f"{jax.default_backend()!r}; pass kernel='auto' (the XLA update off CPU) or 'xla'."
        )
      return optimizer.update(meta_params, grads, state)
    try:
      name = target()
    except KernelUnavailable as e:
      if kernel == "fused":
        raise KernelUnavailable(
          f"kernel='fused' insists on the fused LSTM kernel, which is unavailable: {e}. Fix "
          "that, or pass kernel='auto' (the XLA update, with a warning, where the kernel is "
          "unavailable) or kernel='xla'."
        ) from e
      build.warn_once(
        f"The fused LSTM kernel is unavailable: {e}. Running the XLA update instead (about "
        "3x the CPU time on large models); pass kernel='xla' to silence this."
      )
      return optimizer.update(meta_params, grads, state)
    fused = functools.partial(fused_update, config, name)
    return _differentiated_as(fused, optimizer.update)(meta_params, grads, state)

  return update
