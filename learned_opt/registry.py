"""Builds a learned optimizer from its JSON config, so saved optimizers can be rebuilt."""

from collections.abc import Callable, Mapping
from typing import Any

from learned_opt.base import LearnedOptimizer
from learned_opt.lstm import lstm_optimizer
from learned_opt.ntm import ntm_bfgs_optimizer, ntm_lbfgs_optimizer
from learned_opt.parameter_groups import partition


def _partition(optimizers: Mapping[str, Mapping[str, Any]], rule: str = "conv_fc"):
  """``partition`` from nested configs: ``{label: {"kind": ..., ...}}``, one per group."""
  return partition({label: build(config) for label, config in optimizers.items()}, rule)


_FACTORIES: dict[str, Callable[..., LearnedOptimizer]] = {
  "lstm": lstm_optimizer,
  "ntm_bfgs": ntm_bfgs_optimizer,
  "ntm_lbfgs": ntm_lbfgs_optimizer,
  "partition": _partition,
}


def register(kind: str, factory: Callable[..., LearnedOptimizer]) -> None:
  """Makes ``build({"kind": kind, ...})`` call ``factory(...)``."""
  _FACTORIES[kind] = factory


def kinds() -> tuple[str, ...]:
  return tuple(sorted(_FACTORIES))


def build(config: Mapping[str, Any]) -> LearnedOptimizer:
  """Rebuilds an optimizer from ``optimizer.config``.

  Example:
    >>> opt = build({"kind": "lstm", "hidden_size": 20})
  """
  config = dict(config)
  kind = config.pop("kind", None)
  if kind not in _FACTORIES:
    raise ValueError(f"Unknown learned optimizer kind {kind!r}; known kinds: {kinds()}.")
  try:
    return _FACTORIES[kind](**config)
  except TypeError as e:
    raise ValueError(f"Config does not fit learned optimizer {kind!r}: {e}") from e
