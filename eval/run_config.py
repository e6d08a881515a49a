"""Which saved optimizers a command names, and what task they were trained on.

A checkpoint spec is ``DIR``, ``NAME=DIR``, ``pretrained:NAME`` or ``NAME=pretrained:NAME``:
a directory written by ``learned_opt.save`` (a meta-training run's ``--output_dir``) or an
optimizer shipped with the package. The task an optimizer trained on is read from its run's
``config.json`` or, failing that, from the metadata saved with it.
"""

import json
import os

import learned_opt
from tasks import registry as task_registry
from train import config as config_lib
from train import saved_config

# The directory of ``DIR`` or ``pretrained:NAME``; raises ValueError for an unknown name.
resolve = learned_opt.shipped.resolve


def parse_checkpoint_specs(specs) -> list[tuple[str | None, str]]:
  """``["NAME=DIR", "DIR", "pretrained:NAME"]`` -> ``[(NAME or None, directory), ...]``."""
  parsed = []
  for spec in specs:
    name, _, path = spec.rpartition("=")
    parsed.append((name or None, resolve(path)))
  return parsed


def kind_name(saved) -> str:
  """A trained optimizer's default label: its kind (``lstm``, ``ntm_bfgs``, ...)."""
  return saved.optimizer.config.get("kind", "learned")


def load_all(specs: list[tuple[str | None, str]]) -> dict:
  """``{name: SavedOptimizer}`` in the order given; unnamed ones are named by their kind.

  Raises:
    ValueError: "No saved optimizer at ..." for a path without one, or a corrupt one.
  """
  loaded = {}
  for name, path in specs:
    try:
      saved = learned_opt.load(path)
    except FileNotFoundError as e:
      raise ValueError(str(e)) from e
    name = name or kind_name(saved)
    unique, n = name, 2
    while unique in loaded:
      unique, n = f"{name}_{n}", n + 1
    loaded[unique] = saved
  return loaded


def trained_task(path: str) -> tuple[str | None, dict | None]:
  """``(task name, task kwargs)`` a saved optimizer trained on, ``(None, None)`` if unrecorded."""
  if not os.path.isfile(os.path.join(path, learned_opt.serialization.RECORD_FILE)):
    raise ValueError(
      f"No saved optimizer at {path!r}: it holds no {learned_opt.serialization.RECORD_FILE}. "
      "Name a directory written by learned_opt.save or train.meta_train, or pretrained:NAME "
      f"({', '.join(learned_opt.pretrained_names())})."
    )
  config_path = os.path.join(path, "config.json")
  if os.path.isfile(config_path):
    run = saved_config.read_saved(config_path)
    return run.get("task"), run.get("task_kwargs", {})
  metadata = learned_opt.load_metadata(path)
  run = metadata.get("run_config", {})
  kwargs = metadata.get("task_kwargs", run.get("task_kwargs"))
  return metadata.get("task", run.get("task")), kwargs


def task_settings(paths, task=None, task_kwargs=None):
  """Task name and kwargs as given, else those the first optimizer recorded."""
  try:
    name, kwargs = task, json.loads(task_kwargs) if task_kwargs else None
  except json.JSONDecodeError as e:
    raise ValueError(f"--task_kwargs is not valid JSON ({e}); e.g. '{{\"dim\": 10}}'.") from e
  for path in paths:
    recorded_name, recorded_kwargs = trained_task(path)
    if recorded_name:
      name = name or recorded_name
      kwargs = recorded_kwargs if kwargs is None else kwargs
      break
  if not name:
    raise ValueError(
      "--task is required: no checkpoint records the task it trained on (e.g. --task=quadratic)."
    )
  if not isinstance(kwargs or {}, dict):
    raise ValueError(f"--task_kwargs must be a JSON object, got {task_kwargs!r}.")
  if name not in task_registry.names():
    raise ValueError(
      f"--task={name!r} is unknown; choose one of {', '.join(task_registry.names())}."
    )
  config_lib.check_task_kwargs(name, kwargs or {})
  return name, kwargs or {}


def check_output_dir(path: str | None, flag: str = "--output_dir") -> None:
  """Raises ValueError before any compute if ``path`` cannot become an output directory."""
  if not path:
    raise ValueError(f"{flag} is required (e.g. {flag}=runs/eval).")
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ValueError(f"{flag}={path!r}: {probe} is a file, not a directory; name a directory.")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f"{flag}={path!r}: {probe} is not writable; name a writable directory.")
