"""NTM-BFGS and NTM-L-BFGS optimizers (section 2.2, Appendix B).

An LSTM+GAC controller, applied to every coordinate with shared weights phi, drives read and
write heads on a memory ``M`` shared by all ``N`` coordinates of all parameter leaves. At step t,
from the gradient and the previous read results ``i_{t-1}``, every coordinate emits its entries
of

* per write head ``w``: a left and a right write vector ``a_w, b_w`` (each over all N
  coordinates); the memory accumulates their outer product, ``M <- M + sum_w a_w b_w^T``;
* per read head ``h``: a read vector ``r_h``; its read result is ``i_h = M r_h``.

The update is the first read head's result, ``g_t = output_scale * M_{t+1} r_1``: BFGS's step
``g = -H grad`` is exactly such a read (Appendix B, ``read(M_t, theta_t) = -M_t grad``), and its
rank-two update of ``H`` is three rank-one writes. The memory starts at ``M_0 = I``, BFGS's usual
``H_0``; with the writes at zero the optimizer is an LSTM+GAC whose output is ``r_1``, so it
starts from the plain architecture and learns to use the memory. Writes come before the read in
a step because a BFGS write needs the newest gradient (``y = grad_t - grad_{t-1}``).

* ``ntm_bfgs`` keeps ``M`` dense, ``(N, N)`` over the parameters flattened leaf by leaf in
  ravel order: for small problems such as the paper's 10-d quadratics only.
* ``ntm_lbfgs`` keeps, like L-BFGS, only the writes of the last ``memory_window`` steps, per
  coordinate, and reads ``M r = r + sum_k a_k (b_k . r)`` without forming ``M``: memory and
  time linear in N. With a window holding every step it reads exactly what ``ntm_bfgs`` does.
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from learned_opt import backend as backend_lib
from learned_opt import lstm, lstm_rows
from learned_opt import preprocess as preprocess_lib
from learned_opt.base import CoordinateState, LearnedOptimizer, check_float_params

MAX_DENSE_PARAMS = 4096  # a dense memory of 4096^2 float32 is 64 MiB per problem.


class ControllerState(NamedTuple):
  """The controller's state for every coordinate of one parameter leaf."""

  lstm: CoordinateState  # hidden, cell: leaf.shape + (layers, hidden_size)
  read: jax.Array  # leaf.shape + (read_heads,), read results i_{t-1} fed back as inputs


class WindowMemory(NamedTuple):
  """The writes of the last steps, oldest first (zeros before the window fills)."""

  left: chex.ArrayTree  # per leaf leaf.shape + (memory_window, write_heads), a_k
  right: chex.ArrayTree  # per leaf leaf.shape + (memory_window, write_heads), b_k


class NTMState(NamedTuple):
  """State of an NTM optimizer."""

  controller: chex.ArrayTree  # a ControllerState per parameter leaf
  memory: chex.ArrayTree  # ntm_bfgs: M_t shaped (N, N); ntm_lbfgs: a WindowMemory


def _flatten(leaves: list[jax.Array]) -> jax.Array:
  """Concatenates ``leaf.shape + (k,)`` arrays in ravel order into ``(N, k)``."""
  return jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in leaves], axis=0)


def _unflatten(flat: jax.Array, like: list[jax.Array]) -> list[jax.Array]:
  """Inverse of ``_flatten``: ``(N, k)`` back to ``leaf.shape + (k,)`` per leaf."""
  sizes = [x[..., 0].size for x in like]
  splits = jnp.split(flat, [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)], axis=0)
  return [s.reshape(x.shape[:-1] + s.shape[-1:]) for s, x in zip(splits, like, strict=True)]


def dense_write_read(memory, left, right, reads, scale=1.0):
  """``M + scale sum_w a_w b_w^T``, then ``M r_h`` per read head.

  Args:
    memory: ``(N, N)``.
    left, right: per leaf ``leaf.shape + (write_heads,)``.
    reads: per leaf ``leaf.shape + (read_heads,)``.
    scale: factor on every write (``1 / N`` with ``normalize_writes``).

  Returns:
    ``(results, memory)``: results per leaf ``leaf.shape + (read_heads,)``; the new memory.
  """
  memory = memory + scale * (_flatten(left) @ _flatten(right).T)
  return _unflatten(memory @ _flatten(reads), reads), memory


def window_write_read(memory, left, right, reads, scale=1.0):
  """Slides this step's writes into the window, then ``r_h + scale sum_k a_k (b_k . r_h)``.

  Args:
    memory: a ``WindowMemory``, its trees shaped like the parameters.
    left, right: per leaf ``leaf.shape + (write_heads,)``.
    reads: per leaf ``leaf.shape + (read_heads,)``.
    scale: factor on every write, as in ``dense_write_read``.

  Returns:
    ``(results, memory)`` like ``dense_write_read``; the window keeps its size.
  """
  slide = lambda old, new: jnp.concatenate([old[..., 1:, :], new[..., None, :]], axis=-2)
  treedef = jax.tree.structure(memory.left)
  lefts = [slide(m, a) for m, a in zip(jax.tree.leaves(memory.left), left, strict=True)]
  rights = [slide(m, b) for m, b in zip(jax.tree.leaves(memory.right), right, strict=True)]
  # b_k . r_h sums over every coordinate of every leaf: (window, write_heads, read_heads).
  dots = scale * sum(
    jnp.einsum("...kw,...h->kwh", b, r) for b, r in zip(rights, reads, strict=True)
  )
  results = [r + jnp.einsum("...kw,kwh->...h", a, dots) for a, r in zip(lefts, reads, strict=True)]
  return results, WindowMemory(treedef.unflatten(lefts), treedef.unflatten(rights))


def _ntm_optimizer(
  kind: str,
  hidden_size: int,
  num_layers: int,
  preprocess: str,
  preprocess_p: float,
  input_scale: float,
  output_scale: float,
  global_cells: int,
  read_heads: int,
  write_heads: int,
  normalize_writes: bool,
  extra_config: dict,
  init_memory,
  write_read,
  backend: str | None = None,
) -> LearnedOptimizer:
  """The shared controller; ``init_memory`` and ``write_read`` choose the memory; ``backend``
  how the controller's LSTM executes (``learned_opt.backend``)."""
  if hidden_size <= 0 or num_layers <= 0:
    raise ValueError(
      f"hidden_size and num_layers must be positive, got {hidden_size} and {num_layers}."
    )
  if not 0 <= global_cells <= hidden_size:
    raise ValueError(
      f"global_cells must lie in [0, hidden_size={hidden_size}], got {global_cells}; "
      "the paper's NTM-BFGS uses 5 of 20."
    )
  if read_heads < 1 or write_heads < 1:
    raise ValueError(
      f"read_heads and write_heads must be >= 1, got {read_heads} and {write_heads}; "
      "the paper uses 1 read head and 3 write heads."
    )
  preprocess_fn, num_features = preprocess_lib.make(preprocess, p=preprocess_p, factor=input_scale)
  backend = backend_lib.resolve(backend)
  config = {
    "kind": kind,
    "hidden_size": hidden_size,
    "num_layers": num_layers,
    "preprocess": preprocess,
    "preprocess_p": preprocess_p,
    "input_scale": input_scale,
    "output_scale": output_scale,
    "global_cells": global_cells,
    "read_heads": read_heads,
    "write_heads": write_heads,
    "normalize_writes": normalize_writes,
    **extra_config,
  }

  def init_meta_params(key):
    # Outputs per coordinate: read vectors (read_heads), then left and right write vectors.
    return lstm.init_lstm_params(
      key,
      num_features + read_heads,
      (hidden_size,) * num_layers,
      num_outputs=read_heads + 2 * write_heads,
    )

  def init_state(meta_params, params):
    del meta_params
    check_float_params(params)
    controller = jax.tree.map(
      lambda p, s: ControllerState(s, jnp.zeros(jnp.shape(p) + (read_heads,), jnp.float32)),
      params,
      lstm.init_coordinate_state(params, num_layers, hidden_size),
    )
    return NTMState(controller, init_memory(params))

  def update(meta_params, grads, state):
    leaves, treedef = jax.tree.flatten(grads)
    if not leaves:  # no coordinates: nothing to read, write or update
      return grads, state
    controller = treedef.flatten_up_to(state.controller)
    xs = [
      jnp.concatenate([preprocess_fn(jnp.asarray(g, jnp.float32)), c.read], axis=-1)
      for g, c in zip(leaves, controller, strict=True)
    ]
    lstm_states = [c.lstm for c in controller]
    kernels = backend_lib.kernel_targets(backend, meta_params["layers"], xs, lstm_states)
    tops, lstm_states = lstm_rows.stacked_lstm(
      meta_params["layers"], xs, lstm_states, global_cells, kernels
    )
    heads = lstm.linear_readout(meta_params["out"], tops)
    reads = [o[..., :read_heads] for o in heads]
    left = [o[..., read_heads : read_heads + write_heads] for o in heads]
    right = [o[..., read_heads + write_heads :] for o in heads]
    # With normalize_writes a write is a_w b_w^T / N, so b . r is a mean over the coordinates.
    scale = 1.0 / sum(r[..., 0].size for r in reads) if normalize_writes else 1.0
    results, memory = write_read(state.memory, left, right, reads, scale)
    updates = [
      (output_scale * i[..., 0]).astype(jnp.result_type(g))
      for i, g in zip(results, leaves, strict=True)
    ]
    controller = [ControllerState(s, i) for s, i in zip(lstm_states, results, strict=True)]
    return treedef.unflatten(updates), NTMState(treedef.unflatten(controller), memory)

  return LearnedOptimizer(init_meta_params, init_state, update, config, backend)


def ntm_bfgs_optimizer(
  hidden_size: int = 20,
  num_layers: int = 2,
  preprocess: str = "none",
  preprocess_p: float = 10.0,
  input_scale: float = 1.0,
  output_scale: float = 1.0,
  global_cells: int = 5,
  read_heads: int = 1,
  write_heads: int = 3,
  normalize_writes: bool = False,
  max_params: int = MAX_DENSE_PARAMS,
  *,
  backend: str | None = None,
) -> LearnedOptimizer:
  """NTM-BFGS (Appendix B): LSTM+GAC controller with a dense ``(N, N)`` memory, ``M_0 = I``.

  For small problems only (the paper's 10-d quadratics): ``init_state`` raises above
  ``max_params`` parameters; use ``ntm_lbfgs_optimizer`` there.

  Args:
    hidden_size, num_layers, preprocess, preprocess_p, input_scale, output_scale: as for
      ``lstm_optimizer``; ``output_scale`` multiplies the read result used as the update.
    global_cells: global averaging cells per controller layer (the paper: 5 of 20).
    read_heads: read heads; the first one's result is the update (the paper: 1).
    write_heads: rank-one writes per step (the paper: 3, enough to simulate BFGS).
    normalize_writes: divide every write ``a b^T`` by the number of coordinates N, so a read's
      memory term ``a (b . r) / N`` averages over the coordinates instead of summing, and keeps
      its size as N grows (a reparametrization: ``b' = b / N`` writes the same memory). Off in
      the paper's quadratics; without it, on the 15,910-parameter MNIST net the summed term
      swamped the gradient and meta-training collapsed to a gradient-blind update
      (``docs/ntm_bfgs.md``).
    max_params: largest N accepted for the dense memory.
    backend: how the controller's LSTM executes (``learned_opt.backend``; as for
      ``lstm_optimizer``).

  Example:
    >>> opt = ntm_bfgs_optimizer()
    >>> phi = opt.init_meta_params(jax.random.key(0))
    >>> state = opt.init_state(phi, params)
    >>> updates, state = opt.update(phi, grads, state)
  """

  def init_memory(params):
    n = sum(jnp.size(p) for p in jax.tree.leaves(params))
    if n > max_params:
      raise ValueError(
        f"ntm_bfgs keeps a dense {n} x {n} memory over all parameters, more than max_params="
        f"{max_params} allows; use ntm_lbfgs (learned_opt.ntm_lbfgs_optimizer, or "
        "--optimizer=ntm_lbfgs), whose memory is linear in the parameters."
      )
    return jnp.eye(n, dtype=jnp.float32)

  return _ntm_optimizer(
    "ntm_bfgs",
    hidden_size,
    num_layers,
    preprocess,
    preprocess_p,
    input_scale,
    output_scale,
    global_cells,
    read_heads,
    write_heads,
    normalize_writes,
    {"max_params": max_params},
    init_memory,
    dense_write_read,
    backend,
  )


def ntm_lbfgs_optimizer(
  hidden_size: int = 20,
  num_layers: int = 2,
  preprocess: str = "none",
  preprocess_p: float = 10.0,
  input_scale: float = 1.0,
  output_scale: float = 1.0,
  global_cells: int = 5,
  read_heads: int = 1,
  write_heads: int = 3,
  normalize_writes: bool = False,
  memory_window: int = 10,
  *,
  backend: str | None = None,
) -> LearnedOptimizer:
  """NTM-L-BFGS (Appendix B): NTM-BFGS keeping only the writes of the last steps.

  ``M = I + sum_k a_k b_k^T`` over the last ``memory_window`` steps' writes (``memory_window *
  write_heads`` vector pairs), stored per coordinate as ``leaf.shape + (memory_window,
  write_heads)``: memory linear in the number of parameters. The default window of 10 steps is
  L-BFGS's usual history length (e.g. scipy's ``maxcor=10``).

  Args:
    memory_window: steps of writes kept; the other arguments are as for ``ntm_bfgs_optimizer``.

  Example:
    >>> opt = ntm_lbfgs_optimizer(memory_window=5)
    >>> tx = learned_opt.as_optax(opt, opt.init_meta_params(jax.random.key(0)))
  """
  if memory_window < 1:
    raise ValueError(f"memory_window must be >= 1, got {memory_window} (e.g. 10).")

  def init_memory(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p) + (memory_window, write_heads), jnp.float32)
    return WindowMemory(jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  return _ntm_optimizer(
    "ntm_lbfgs",
    hidden_size,
    num_layers,
    preprocess,
    preprocess_p,
    input_scale,
    output_scale,
    global_cells,
    read_heads,
    write_heads,
    normalize_writes,
    {"memory_window": memory_window},
    init_memory,
    window_write_read,
    backend,
  )
