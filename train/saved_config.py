"""A run's saved ``config.json``: reading it, upgrading older runs' fields, comparing on resume."""

import dataclasses
import json
import os
from typing import Any

from train.config import MetaTrainConfig

CONFIG_FILE = "config.json"  # where a run keeps its config (train.run.Run.config_path)

# Settings that change where and how often a run reports, not what it computes: a run may resume
# with different values of these.
NOT_AFFECTING_RESULTS = ("output_dir", "log_every", "checkpoint_every", "keep_checkpoints")
# Optimizer settings that were flat fields of the config before ``optimizer_kwargs`` existed.
LEGACY_OPTIMIZER_FIELDS = (
  "hidden_size",
  "num_layers",
  "preprocess",
  "preprocess_p",
  "input_scale",
  "output_scale",
  "global_cells",
  "read_heads",
  "write_heads",
  "memory_window",
)


def _legacy_optimizer_config(saved: dict[str, Any]) -> dict[str, Any]:
  """The optimizer config a run saved before ``optimizer_kwargs`` existed trained."""
  value = lambda name, default: saved.get(name, default)
  kind = value("optimizer", "lstm")
  config = {
    "kind": "lstm",
    "hidden_size": value("hidden_size", 20),
    "num_layers": value("num_layers", 2),
    "preprocess": value("preprocess", "none"),
    "preprocess_p": value("preprocess_p", 10.0),
    "input_scale": value("input_scale", 1.0),
    "output_scale": value("output_scale", 1.0),
    "global_cells": value("global_cells", 5) if kind != "lstm" else 0,
  }
  if kind in ("ntm_bfgs", "ntm_lbfgs"):
    config.update(kind=kind, read_heads=value("read_heads", 1), write_heads=value("write_heads", 3))
  if kind == "ntm_lbfgs":
    config["memory_window"] = value("memory_window", 10)
  return config


def read_saved(path: str) -> dict[str, Any]:
  """A run's saved ``config.json`` as written (see ``upgrade``).

  Raises:
    FileNotFoundError: if it is missing.
    ValueError: if it is not a regular file (a FIFO would block the reader), not JSON, nested
      too deeply for the parser, or not an object.
  """
  from learned_opt import tree_files  # Deferred, as in ``differences``.

  data = tree_files.read_regular(path)
  try:
    saved = json.loads(data)
  except RecursionError as e:  # a crafted or corrupt file; not a config
    raise ValueError(f"{path} is nested too deeply to be a run's config") from e
  if not isinstance(saved, dict):
    raise ValueError("not a JSON object")
  return saved


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved ``config.json`` in today's fields.

  Fields added since it was written take their defaults, which the run used implicitly; flat
  optimizer fields of older runs become ``optimizer`` and ``optimizer_kwargs``.
  """
  saved = dict(saved)
  if any(name in saved for name in LEGACY_OPTIMIZER_FIELDS):
    legacy = _legacy_optimizer_config(saved)
    for name in LEGACY_OPTIMIZER_FIELDS:
      saved.pop(name, None)
    saved["optimizer"] = legacy.pop("kind")
    saved["optimizer_kwargs"] = legacy
  defaults = {
    field.name: field.default_factory() if callable(field.default_factory) else field.default
    for field in dataclasses.fields(MetaTrainConfig)
  }
  return {**defaults, **saved}


def differences(saved: dict[str, Any], config: MetaTrainConfig) -> list[str]:
  """Flags whose values differ between a saved run and ``config``, in a way that changes results.

  Optimizer settings are compared as the full config ``learned_opt.build`` gives, so spelling a
  default out (or an older run's flat fields) is no difference. ``--num_epochs`` may grow (the
  first epochs do not depend on how many follow) unless the meta learning rate follows a cosine
  schedule, which is stretched over the whole run.
  """
  import learned_opt  # Deferred: only resuming needs the optimizers.

  old = upgrade(saved)
  new = dataclasses.asdict(config)
  changed = []
  for name in new:
    if name in NOT_AFFECTING_RESULTS or name in ("optimizer", "optimizer_kwargs"):
      continue
    if name == "num_epochs" and old.get(name) != new[name]:
      if new["meta_lr_schedule"] == "cosine":
        changed.append(
          f"--num_epochs (saved {old.get(name)!r}, now {new[name]!r}; with "
          "--meta_lr_schedule=cosine the learning rate of every step depends on the run's length)"
        )
      elif not isinstance(old.get(name), int) or new[name] < old[name]:
        changed.append(
          f"--num_epochs (saved {old.get(name)!r}, now {new[name]!r}; it can only grow)"
        )
      continue
    if old.get(name) != new[name]:
      changed.append(f"--{name} (saved {old.get(name)!r}, now {new[name]!r})")
  old_optimizer = {"kind": old["optimizer"], **old["optimizer_kwargs"]}
  if dict(learned_opt.build(old_optimizer).config) != dict(
    learned_opt.build(config.optimizer_config()).config
  ):
    changed.append(
      f"--optimizer/--optimizer_kwargs (saved {old_optimizer}, now {config.optimizer_config()})"
    )
  return changed


def resume_hint(config: MetaTrainConfig) -> str:
  """How to resume the run in ``config.output_dir`` with its own settings, if they differ.

  Runs started before presets existed took the plain defaults where a flag was not given; the
  same command now takes the task's preset there.
  """
  path = os.path.join(config.output_dir, CONFIG_FILE)
  try:
    changed = differences(read_saved(path), config)
  except (OSError, ValueError, TypeError, KeyError):
    return ""
  if not changed:
    return ""
  return (
    f" To resume it with the settings it was started with, add --preset={path} (flags given "
    "still override it); --preset=none turns the task's preset off."
  )
