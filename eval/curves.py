"""Loss curves of one optimizer on many problems: ``train.inner``'s loop, vmapped and sharded.

One jitted computation runs an optax transformation built from an argument (a learning rate,
or phi) on every problem: vmapped over problems and, for a grid, over the arguments (``lax.map``
in batches of ``arg_batch`` to bound memory). Problems run in chunks of ``problem_batch``, each
chunk split over a mesh (``eval.sharding``); problems never interact, so neither the chunks nor
the mesh change the curves. Extra per-step readings (``Observable``, e.g. the loss on held-out
images) are taken on the same trajectory as the loss.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from eval import sharding
from tasks.base import Data, TaskFamily
from train import distributed
from train import inner as inner_lib

LOSS = "loss"  # the curve every run has: f(theta_t) on step t's minibatch


class Observable(NamedTuple):
  """A reading of the optimizee at every theta_t, t = 0..T, beside its loss.

  Attributes:
    name: its curve's name in the results.
    fn: ``(data, state: train.inner.InnerState, run_key) -> array``, a scalar or any shape
      (curves then gain its axes after the steps axis); jittable.
    data: the data ``fn`` reads (passed into ``jax.jit`` as an argument, never a constant).
    config: JSON settings that determine ``fn`` (part of the cache's key).
  """

  name: str
  fn: Callable[[Data, inner_lib.InnerState, jax.Array], jax.Array]
  data: Data = ()
  config: Mapping[str, Any] = {}


def problem_key(seed: int) -> jax.Array:
  """Key of the test problems; training (1) and validation (2) use other fold-ins."""
  return jax.random.fold_in(jax.random.key(seed), 3)


def rollout(task, tx, data, extra, task_params, key, num_steps: int, observables=()) -> dict:
  """One problem optimized from theta_0 for ``num_steps`` steps (``train.inner``).

  Returns:
    ``{"loss": (num_steps + 1,), observable name: (num_steps + 1,), ...}``: the loss is
    ``train.inner.rollout``'s, and observables are its ``observe`` hook, on the same theta_t.
  """
  if not observables:
    return {LOSS: inner_lib.rollout(task, tx, data, task_params, key, num_steps)}
  observe = lambda s: {o.name: o.fn(d, s, key) for o, d in zip(observables, extra, strict=True)}
  losses, seen = inner_lib.rollout(task, tx, data, task_params, key, num_steps, observe)
  return {LOSS: losses, **seen}


def compiled(
  task: TaskFamily,
  make_tx: Callable,
  num_steps: int,
  observables: Sequence[Observable] = (),
  grid: bool = False,
  arg_batch: int | None = None,
) -> Callable:
  """``jit((data, extra, arg, task_params, keys) -> curves)`` of ``make_tx(arg)``.

  Curves: ``{name: (problems, num_steps + 1)}``, or with ``grid`` (``arg`` has a leading axis,
  e.g. learning rates) ``{name: (args, problems, num_steps + 1)}``. Reuse it across calls of
  ``curves`` to compile once per chunk shape and mesh.
  """

  def one_arg(data, extra, arg, task_params, keys):
    run = lambda p, k: rollout(task, make_tx(arg), data, extra, p, k, num_steps, observables)
    return jax.vmap(run)(task_params, keys)

  def fn(data, extra, arg, task_params, keys):
    if not grid:
      return one_arg(data, extra, arg, task_params, keys)
    run = lambda a: one_arg(data, extra, a, task_params, keys)
    if arg_batch is None:
      return jax.vmap(run)(arg)
    return jax.lax.map(run, arg, batch_size=arg_batch)

  return jax.jit(fn)


def curves(
  task: TaskFamily,
  fn: Callable,
  arg,
  task_params,
  keys: jax.Array,
  observables: Sequence[Observable] = (),
  problem_batch: int | None = None,
  mesh: Mesh | None = None,
  grid: bool = False,
  on_chunk: Callable[[int, int, int], None] | None = None,
) -> dict[str, np.ndarray]:
  """Runs ``fn`` (from ``compiled``, with the same ``grid``) on every problem, in order.

  Problems run ``problem_batch`` at a time (None: all), each chunk split over ``mesh``
  (default: every device of every process) and padded to its devices; ``arg`` and the data are
  replicated. Every process calls this together and gets every curve. ``on_chunk(start, stop,
  count)`` is called as each chunk's curves reach the host (progress, ``train.progress``).
  """
  mesh = mesh or sharding.problems_mesh()
  count = int(np.shape(keys)[0])
  chunk = min(problem_batch or count, count)
  extra = tuple(o.data for o in observables)
  placed, parts = {}, []  # data and arg on each mesh a chunk runs on
  for start in range(0, count, chunk):
    part = jax.tree.map(lambda x, s=start: x[s : s + chunk], (task_params, keys))
    part, part_count, part_mesh = sharding.place_problems(part, mesh)
    if part_mesh not in placed:
      whole = distributed.replicated(part_mesh)
      placed[part_mesh] = distributed.put((task.data, extra, arg), whole)
    out = distributed.to_host(fn(*placed[part_mesh], *part))
    parts.append({k: v[:, :part_count] if grid else v[:part_count] for k, v in out.items()})
    if on_chunk is not None:
      on_chunk(start, start + part_count, count)
  return {k: np.concatenate([p[k] for p in parts], axis=int(grid)) for k in parts[0]}


def held_out_loss(other: TaskFamily, name: str = "test") -> Observable:
  """theta_t's loss on a minibatch of ``other`` (e.g. the other split's images).

  The minibatch at step t is drawn with ``fold_in(fold_in(run_key, 1), t)``, a key the
  training minibatches do not use.
  """

  def fn(data, state, key):
    key = jax.random.fold_in(jax.random.fold_in(key, 1), state.step)
    return other.loss(data, state.task_params, state.params, key)

  return Observable(name, fn, other.data, {"held_out_loss": dict(other.config)})
