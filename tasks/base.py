"""The task-family interface: pure, vmappable optimizees (DESIGN.md, "Contracts")."""

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import chex
import jax

Data = chex.ArrayTree  # a family's data set (images, labels, network weights); () when none


class TaskFamily(NamedTuple):
  """A distribution over optimization problems: pure functions of ``data`` plus that data.

  Every function takes the family's data set as its first argument, and drivers pass
  ``task.data`` into ``jax.jit`` as an ordinary (unbatched) argument: a data set is never
  compiled into a program as a constant, and one compiled step serves any data of the same shape.

  Attributes:
    name: the family's registry name.
    sample: ``(data, key) -> task_params``, one problem instance (e.g. a quadratic's ``W, y``).
    init: ``(data, task_params, key) -> theta``, the initial optimizee parameters.
    loss: ``(data, task_params, theta, key) -> scalar``; ``key`` draws the minibatch, if any.
    config: JSON-serializable settings that rebuild the family with ``tasks.get``.
    data: the data set as a pytree of device arrays; ``()`` for families without data.

  Example:
    >>> task = tasks.get("quadratic")
    >>> loss = jax.jit(task.loss)(task.data, task_params, theta, key)
  """

  name: str
  sample: Callable[[Data, jax.Array], chex.ArrayTree]
  init: Callable[[Data, chex.ArrayTree, jax.Array], chex.ArrayTree]
  loss: Callable[[Data, chex.ArrayTree, chex.ArrayTree, jax.Array], jax.Array]
  config: Mapping[str, Any]
  data: Data = ()


def num_params(task: TaskFamily) -> int:
  """Parameters of one problem of ``task``, from shapes alone (nothing is computed)."""
  key = jax.random.key(0)
  problem = jax.eval_shape(task.sample, task.data, key)
  theta = jax.eval_shape(task.init, task.data, problem, key)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(theta))
