"""Per-task settings of meta-training: the paper's recipe for each task family, sized for 2 CPUs.

A preset is a partial ``MetaTrainConfig`` in a JSON file, ``train/configs/NAME.json`` (shipped
with the package; its ``description`` says where the recipe comes from, the rest are config
fields). The fields it names replace the config's defaults, and flags given on the command line
replace both. ``train.meta_train`` picks the preset named after ``--task`` unless ``--preset``
names another one, a JSON file of config fields (a run's ``config.json`` works; its fields go on
top of its task's preset), or ``none`` (the config's own defaults). A new preset is a new file.

Example:
  >>> settings = presets.resolve(presets.select(None, "mnist_mlp"), {"num_epochs": 2})
  >>> settings["num_problems"], settings["num_epochs"]
  (2, 2)
"""

import copy
import dataclasses
import importlib.resources
import json
import os
from typing import Any

from train import config as config_lib
from train import saved_config

NONE = "none"
DESCRIPTION = "description"  # the one key of a preset file that is not a config field
DIRECTORY = "configs"  # train/configs/NAME.json, shipped as package data


def _shipped() -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
  """``({name: settings}, {name: description})`` of the preset files in ``train/configs``."""
  settings, descriptions = {}, {}
  for entry in sorted(importlib.resources.files(__package__).joinpath(DIRECTORY).iterdir()):
    if entry.name.endswith(".json"):
      name = entry.name.removesuffix(".json")
      settings[name] = json.loads(entry.read_text())
      descriptions[name] = settings[name].pop(DESCRIPTION, "")
  return settings, descriptions


# Read once, never changed: ``select`` hands out copies.
PRESETS, DESCRIPTIONS = _shipped()

_FIELDS = tuple(field.name for field in dataclasses.fields(config_lib.MetaTrainConfig))


def names() -> tuple[str, ...]:
  return tuple(sorted(PRESETS))


def _check_fields(settings: dict, source: str) -> None:
  unknown = sorted(set(settings) - set(_FIELDS))
  if unknown:
    raise ValueError(
      f"--preset={source}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a "
      f"setting of meta-training; the settings are: {', '.join(_FIELDS)}."
    )


def load_file(path: str) -> dict[str, Any]:
  """The config fields in a JSON file (e.g. a run's ``config.json``); raises ValueError."""
  try:
    with open(path) as f:
      settings = json.load(f)
  except OSError as e:
    raise ValueError(f"--preset={path}: cannot read it ({e.strerror}).") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"--preset={path} is not valid JSON ({e}).") from e
  except RecursionError as e:
    raise ValueError(
      f"--preset={path} is nested too deeply to be a JSON object of settings."
    ) from e
  if not isinstance(settings, dict):
    raise ValueError(f'--preset={path} must hold a JSON object of settings, e.g. {{"unroll": 20}}.')
  settings.pop(DESCRIPTION, None)  # a preset file's note, not a setting
  # A run's config.json names its own directory: a preset never chooses where a run writes.
  settings.pop("output_dir", None)
  if any(name in settings for name in saved_config.LEGACY_OPTIMIZER_FIELDS):
    settings = saved_config.upgrade(settings)  # a config.json of an older run, in today's fields
  _check_fields(settings, path)
  return settings


def select(preset: str | None, task: str) -> dict[str, Any]:
  """The settings of ``--preset`` (a preset name, a JSON file or ``none``), else of ``task``.

  Args:
    preset: the ``--preset`` flag, or None when it was not given.
    task: the task the run trains on (``--task``, given or default); names the preset when
      ``preset`` is None. A task without a preset gets no settings (the config's defaults).
  """
  if preset is None:
    return copy.deepcopy(PRESETS.get(task, {}))  # copies: a config may not change a preset
  if preset == NONE:
    return {}
  if preset in PRESETS:
    return copy.deepcopy(PRESETS[preset])
  if preset.endswith(".json") or os.path.isfile(preset):
    settings = load_file(preset)  # on top of the preset of the task it names
    return {**copy.deepcopy(PRESETS.get(settings.get("task", task), {})), **settings}
  raise ValueError(
    f"--preset={preset!r} is neither a preset ({', '.join(names())}, or {NONE} for the plain "
    "defaults) nor a JSON file of settings; e.g. --preset=mnist_mlp."
  )


def resolve(settings: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
  """Preset ``settings`` with the flags ``given`` on the command line taking precedence."""
  _check_fields(given, "flags")
  return {**settings, **given}


def help_note(field: str) -> str:
  """What the presets set ``field`` to where it is not the default, for its ``--help`` line."""
  default = config_lib.MetaTrainConfig.__dataclass_fields__[field]
  default = default.default_factory() if callable(default.default_factory) else default.default
  changed = [name for name in names() if PRESETS[name].get(field, default) != default]
  if not changed or field == "task":
    return ""
  if isinstance(default, dict):
    return f" Set by the preset{'s' * (len(changed) > 1)} {', '.join(changed)} (see --preset)."
  values = ", ".join(f"{name} {_flag_value(PRESETS[name][field])}" for name in changed)
  return f" Presets: {values}."


def describe(name: str) -> str:
  """A preset's settings as flags, e.g. ``--num_problems=2 --meta_lr=0.003 ...``."""
  return " ".join(f"--{key}={_flag_value(value)}" for key, value in PRESETS[name].items())


def _flag_value(value) -> str:
  if isinstance(value, dict):
    return "'" + json.dumps(value, separators=(",", ":")) + "'"
  return str(value)
