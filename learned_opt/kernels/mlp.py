"""A small ReLU MLP on every row by the CPU kernels (``mlp.cc``), differentiable: the per-parameter
MLP optimizer's network (``learned_opt.per_param_mlp``) on every coordinate of a leaf.

``mlp(targets(), x, w_0, b_0, ..., w_out, b_out)`` computes ``per_param_mlp.mlp_outputs``: ReLU
hidden layers, a linear read-out, x (..., features) -> (..., outputs). Per tile of rows the
activations stay in L1; the backward kernel recomputes them (only x and the weights are saved)
and returns the cotangents of x and of every weight. Under ``jax.vmap`` with shared weights the
mapped problems are more rows of one call, whose weight cotangents are summed per problem;
mapped weights run one element at a time. Results agree with XLA's to float rounding (sums in
another order) and do not depend on the thread count: weight cotangents are summed per fixed
chunk of rows, then in chunk order. A ``custom_vjp``: no forward-mode derivative (``jax.jvp``).
"""

import functools
import os

import jax
import jax.numpy as jnp
from jax import custom_batching

from learned_opt.kernels import loading
from learned_opt.kernels.stack import backward_vmap_rule, mapped_first

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlp.cc")
HANDLERS = ("LearnedOptMlpForward", "LearnedOptMlpBackward")


def targets() -> tuple[str, ...]:
  """The registered FFI targets (``HANDLERS``' order), built on first use.

  Raises:
    KernelUnavailable: as ``loading.targets``.
  """
  return loading.targets(SOURCE, HANDLERS)


@functools.cache  # one custom_vmap function per set of targets, not one per trace
def _forward(names):
  """``(x, *weights) -> y`` by the forward kernel, batched as the module says."""

  @custom_batching.custom_vmap
  def forward(x, *weights):
    y = jax.ShapeDtypeStruct(x.shape[:-1] + weights[-1].shape, jnp.float32)
    return jax.ffi.ffi_call(names[0], y)(x, *weights)

  @forward.def_vmap
  def _(axis_size, in_batched, x, *weights):
    (x,) = mapped_first(axis_size, in_batched[:1], (x,))
    if any(in_batched[1:]):
      weights = mapped_first(axis_size, in_batched[1:], weights)
      return jax.lax.map(lambda a: forward(*a), (x, *weights)), True
    return forward(x, *weights), True

  return forward


@functools.cache
def _backward(names, groups: int = 0):
  """``(x, *weights, dy) -> (dx, *dweights)``, each weight's cotangent shaped
  ``x.shape[:groups] + w.shape``: under vmap with the weights unmapped, one per mapped problem
  (the kernel sums each problem's rows apart; ``jax.grad`` of a vmapped loss then adds them up,
  a vmapped ``jax.grad`` keeps them), or, with ``names`` marked ``stack.SUM_OVER_VMAP``, their sum
  over every row, unbatched."""

  @custom_batching.custom_vmap
  def backward(x, *rest):
    lead = x.shape[:groups]
    out = (jax.ShapeDtypeStruct(x.shape, jnp.float32),)
    out += tuple(jax.ShapeDtypeStruct(lead + w.shape, jnp.float32) for w in rest[:-1])
    return tuple(jax.ffi.ffi_call(names[1], out)(x, *rest))

  @backward.def_vmap
  def _(axis_size, in_batched, *args):
    per_problem = _backward(names, groups + 1)
    return backward_vmap_rule(
      axis_size, in_batched, args, 1, 1, backward, per_problem, names, groups
    )

  return backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mlp(names: tuple[str, ...], x: jax.Array, *weights: jax.Array) -> jax.Array:
  """The MLP on every row by the kernels.

  Args:
    names: the FFI targets, ``targets()``.
    x: (..., features), float32.
    *weights: ``w_0, b_0, ..., w_out, b_out``: ``w_l`` (fan_in, n) with fan_in the features or
      the layer below's n, ``b_l`` (n,); ReLU after every layer but the last (the read-out).

  Returns:
    (..., outputs), ``outputs`` the read-out's n.
  """
  return _forward(names)(x, *weights)


def _mlp_vjp_forward(names, x, *weights):
  return _forward(names)(x, *weights), (x, *weights)


def _mlp_vjp_backward(names, saved, dy):
  return _backward(names)(*saved, dy)


mlp.defvjp(_mlp_vjp_forward, _mlp_vjp_backward)
