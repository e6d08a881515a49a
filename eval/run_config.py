"""What a saved meta-training run trained on, read from its ``config.json``."""

import json
import os


def task_settings(paths, task=None, task_kwargs=None):
  """Task name and kwargs as given, else from the first checkpoint's run config."""
  name, kwargs = task, json.loads(task_kwargs) if task_kwargs else None
  for path in paths:
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
      with open(config_path) as f:
        run = json.load(f)
      name = name or run.get("task")
      kwargs = run.get("task_kwargs", {}) if kwargs is None else kwargs
      break
  if not name:
    raise ValueError(
      "--task is required when no checkpoint records its task (e.g. --task=quadratic)."
    )
  return name, kwargs or {}


def parse_checkpoint_specs(specs) -> dict:
  """``["NAME=DIR", "DIR"]`` -> ``{NAME: DIR, basename(DIR): DIR}``, in the order given."""
  named = {}
  for spec in specs:
    name, _, path = spec.rpartition("=")
    named[name or os.path.basename(os.path.normpath(path))] = path
  return named
