"""The task-family interface: pure, vmappable optimizees (DESIGN.md, "Contracts")."""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import chex
import jax


class TaskFamily(NamedTuple):
  """A distribution over optimization problems, as three pure functions.

  Attributes:
    name: the family's registry name.
    sample: ``key -> task_params``, one problem instance (e.g. a quadratic's ``W, y``).
    init: ``(task_params, key) -> theta``, the initial optimizee parameters.
    loss: ``(task_params, theta, key) -> scalar``; ``key`` draws the minibatch, if any.
    config: JSON-serializable settings that rebuild the family with ``tasks.get``.
  """

  name: str
  sample: Callable[[jax.Array], chex.ArrayTree]
  init: Callable[[chex.ArrayTree, jax.Array], chex.ArrayTree]
  loss: Callable[[chex.ArrayTree, chex.ArrayTree, jax.Array], jax.Array]
  config: Mapping[str, Any]
