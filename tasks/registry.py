"""Task families by name, so jobs and saved results can name the task they ran."""

from collections.abc import Callable

from tasks.base import TaskFamily
from tasks.cifar10 import cifar10_conv
from tasks.mixture import mixture_bucket
from tasks.mnist import mnist_mlp
from tasks.neural_art import neural_art
from tasks.quadratic import quadratic

_FAMILIES: dict[str, Callable[..., TaskFamily]] = {
  "cifar10_conv": cifar10_conv,
  "mnist_mlp": mnist_mlp,
  "mixture": mixture_bucket,
  "neural_art": neural_art,
  "quadratic": quadratic,
}


def register(name: str, factory: Callable[..., TaskFamily]) -> None:
  """Makes ``get(name, **kwargs)`` call ``factory(**kwargs)``."""
  _FAMILIES[name] = factory


def names() -> tuple[str, ...]:
  return tuple(sorted(_FAMILIES))


def get(name: str, **kwargs) -> TaskFamily:
  """Builds a task family by name, e.g. ``get("quadratic", dim=10)``."""
  if name not in _FAMILIES:
    raise ValueError(f"Unknown task {name!r}; known tasks: {', '.join(names())}.")
  return _FAMILIES[name](**kwargs)
