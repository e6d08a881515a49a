"""Builds a learned optimizer from its JSON config: the one validator of optimizer settings.

A config is a JSON-able mapping ``{"kind": ..., **settings}``; the settings of a kind are the
arguments of its factory, with the factory's defaults. ``LearnedOptimizer.config`` is such a
config, so ``build(optimizer.config)`` rebuilds the optimizer (how saved optimizers load). A
factory's ``backend`` argument is not a setting (it changes how, not what, the update computes):
``build(config, backend=...)`` and ``with_backend`` pass it.
"""

import functools
import inspect
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any

from learned_opt import backend as backend_lib
from learned_opt.base import LearnedOptimizer
from learned_opt.lstm import lstm_optimizer
from learned_opt.ntm import ntm_bfgs_optimizer, ntm_lbfgs_optimizer
from learned_opt.parameter_groups import partition
from learned_opt.per_param_mlp import per_param_mlp_optimizer


class _Required:
  """The default shown by ``settings`` for a setting without one."""

  def __repr__(self) -> str:
    return "<required>"


REQUIRED = _Required()
# Upper bounds of size settings, checked before a factory runs: a crafted record (or a typo) with
# num_layers=1000000 must fail at once, not after minutes and gigabytes of building.
SIZE_LIMITS = {
  "hidden_size": 4096,
  "num_layers": 32,
  "global_cells": 4096,
  "read_heads": 64,
  "write_heads": 64,
  "memory_window": 1024,
}
_TYPE_NAMES = {bool: "a bool", int: "an int", float: "a number", str: "a string"}


def _partition(optimizers: Mapping[str, Mapping[str, Any]], rule: str = "conv_fc", *, backend=None):
  """``partition`` from nested configs: ``{label: {"kind": ..., ...}}``, one per group, each
  group on ``backend``."""
  groups = {}
  for label, config in optimizers.items():
    try:
      groups[label] = build(config, backend=backend)
    except ValueError as e:
      raise ValueError(f"partition group {label!r}: {e}") from e
  return partition(groups, rule)._replace(backend=backend_lib.resolve(backend))


_FACTORIES: dict[str, Callable[..., LearnedOptimizer]] = {
  "lstm": lstm_optimizer,
  # The paper's LSTM+GAC (section 2.2): 5 of 20 units are global averaging cells. Its config
  # says kind "lstm" with global_cells 5, which rebuilds the same optimizer.
  "lstm_gac": functools.partial(lstm_optimizer, global_cells=5),
  "ntm_bfgs": ntm_bfgs_optimizer,
  "ntm_lbfgs": ntm_lbfgs_optimizer,
  "partition": _partition,
  "per_param_mlp": per_param_mlp_optimizer,
}


def register(kind: str, factory: Callable[..., LearnedOptimizer]) -> None:
  """Makes ``build({"kind": kind, ...})`` call ``factory(...)``; its arguments are the settings."""
  _FACTORIES[kind] = factory


def kinds() -> tuple[str, ...]:
  """The kinds ``build`` knows, e.g. ``("lstm", "lstm_gac", "ntm_bfgs", ...)``."""
  return tuple(sorted(_FACTORIES))


def _factory(kind: Any) -> Callable[..., LearnedOptimizer]:
  if not isinstance(kind, str) or kind not in _FACTORIES:
    raise ValueError(
      f"Unknown learned optimizer kind {kind!r}; choose one of {', '.join(kinds())}."
    )
  return _FACTORIES[kind]


def _parameters(kind: str) -> dict[str, inspect.Parameter]:
  """The factory's settings: its named arguments (not ``*args``, ``**kwargs`` or ``backend``)."""
  parameters = inspect.signature(_factory(kind), eval_str=True).parameters.values()
  return {
    p.name: p
    for p in parameters
    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "backend"
  }


def has_kernel_path(kind: str) -> bool:
  """Whether ``kind``'s factory takes a ``backend`` (its step can run on the CPU kernels)."""
  return kind in _FACTORIES and "backend" in inspect.signature(_FACTORIES[kind]).parameters


def settings(kind: str) -> dict[str, Any]:
  """The settings of ``kind``, name -> default (``REQUIRED`` where there is none).

  Example:
    >>> settings("lstm_gac")["global_cells"]
    5
  """
  return {
    name: REQUIRED if p.default is inspect.Parameter.empty else p.default
    for name, p in _parameters(kind).items()
  }


def _describe(kind: str) -> str:
  return ", ".join(f"{name}={default!r}" for name, default in settings(kind).items())


def _fits(annotation: Any, value: Any) -> bool:
  """Whether a JSON value fits a setting's annotation (``bool`` is not a number here)."""
  if annotation in (inspect.Parameter.empty, Any):
    return True
  if annotation is bool or isinstance(value, bool):
    return annotation is bool and isinstance(value, bool)
  if annotation is float:
    return isinstance(value, int | float)
  origin = typing.get_origin(annotation) or annotation
  return not isinstance(origin, type) or isinstance(value, origin)


def _finite(value) -> bool:
  try:
    return math.isfinite(value)
  except OverflowError:  # an int too large for a float
    return False


def _checked(kind: str, values: Mapping[str, Any]) -> dict[str, Any]:
  """``values`` with float settings as floats; a ``ValueError`` for an unknown, missing or
  wrongly typed setting of ``kind``."""
  parameters = _parameters(kind)
  for name, value in values.items():
    if name not in parameters:
      raise ValueError(
        f"Unknown setting {name!r} for learned optimizer kind {kind!r}; its settings (with "
        f"defaults) are: {_describe(kind)}."
      )
    annotation = parameters[name].annotation
    if not _fits(annotation, value):
      expected = typing.get_origin(annotation) or annotation
      expected = _TYPE_NAMES.get(expected, f"a {getattr(expected, '__name__', expected)}")
      default = settings(kind)[name]
      example = "" if default is REQUIRED else f"; e.g. {name}={default!r}"
      raise ValueError(
        f"Setting {name!r} of kind {kind!r} must be {expected}, got {value!r} "
        f"({type(value).__name__}){example}."
      )
    if annotation is float and not _finite(value):
      raise ValueError(f"Setting {name!r} of kind {kind!r} must be a finite number, got {value!r}.")
    if name in SIZE_LIMITS and value > SIZE_LIMITS[name]:
      raise ValueError(
        f"Setting {name!r} of kind {kind!r} must be at most {SIZE_LIMITS[name]}, got {value!r}."
      )
  missing = [name for name, default in settings(kind).items() if default is REQUIRED]
  missing = [name for name in missing if name not in values]
  if missing:
    raise ValueError(
      f"Learned optimizer kind {kind!r} needs the setting(s) {', '.join(missing)}; its settings "
      f"(with defaults) are: {_describe(kind)}."
    )
  # JSON writes 1.0 as 1; a float setting is recorded as a float either way.
  return {
    name: float(value) if parameters[name].annotation is float else value
    for name, value in values.items()
  }


def build(config: Mapping[str, Any], *, backend: str | None = None) -> LearnedOptimizer:
  """Builds (or rebuilds, from ``optimizer.config``) a learned optimizer from its JSON config.

  Args:
    config: ``{"kind": one of kinds(), **settings}``; settings not given take the factory's
      defaults (``settings(kind)``).
    backend: how its update executes (``learned_opt.backend``); None: ``$LEARNED_OPT_BACKEND``,
      else ``"auto"``. A kind without a CPU-kernel path takes ``"auto"`` and ``"xla"`` only.

  Returns:
    The ``LearnedOptimizer``; its ``config`` spells out every setting.

  Raises:
    ValueError: naming the problem and the fix: not a mapping, unknown kind, unknown or missing
      setting, a value of the wrong JSON type, or a value the factory rejects.

  Example:
    >>> opt = build({"kind": "lstm", "hidden_size": 20})
    >>> build(opt.config).config == opt.config
    True
  """
  if not isinstance(config, Mapping):
    raise ValueError(
      f"An optimizer config must be a mapping like {{'kind': 'lstm', 'hidden_size': 20}}, got "
      f"{type(config).__name__} {config!r}."
    )
  values = dict(config)
  if "kind" not in values:
    raise ValueError(
      f"Optimizer config {dict(config)!r} has no 'kind'; add one of {', '.join(kinds())}."
    )
  kind = values.pop("kind")
  factory = _factory(kind)
  values = _checked(kind, values)
  explicit, backend = backend is not None, backend_lib.resolve(backend)
  if has_kernel_path(kind):
    values["backend"] = backend
  elif backend == "cpu_kernels" and explicit:
    raise ValueError(
      f"Learned optimizer kind {kind!r} has no CPU-kernel path; pass backend='auto' or 'xla'."
    )
  elif backend == "cpu_kernels":  # $LEARNED_OPT_BACKEND's default: for the kinds that have one
    backend = "auto"
  try:
    optimizer = factory(**values)
  except TypeError as e:
    raise ValueError(f"Config does not fit learned optimizer {kind!r}: {e}") from e
  return optimizer._replace(backend=backend)


def with_backend(optimizer: LearnedOptimizer, backend: str) -> LearnedOptimizer:
  """``optimizer`` rebuilt (``build(optimizer.config, backend=backend)``) to run on ``backend``.

  The same optimizer where it already does, or where it has no CPU-kernel path and ``backend``
  is ``"auto"`` or ``"xla"`` (its update is XLA's either way).

  Raises:
    ValueError: an unknown ``backend``, or ``"cpu_kernels"`` for an optimizer without a kernel
      path or whose config ``build`` does not know.

  Example:
    >>> opt = with_backend(learned_opt.lstm_optimizer(), "xla")
  """
  backend = backend_lib.checked(backend)
  if optimizer.backend == backend:
    return optimizer
  kind = optimizer.config.get("kind")
  if kind in _FACTORIES:
    return build(optimizer.config, backend=backend)
  if backend == "cpu_kernels":
    raise ValueError(
      f"backend='cpu_kernels' needs an optimizer that build() knows; kind {kind!r} is not "
      "registered (learned_opt.register). Pass backend='auto' or 'xla'."
    )
  return optimizer._replace(backend=backend)
