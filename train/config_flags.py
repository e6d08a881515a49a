"""A frozen config dataclass as a command's flags: one name per setting, one place it is spelled.

Every field of a command's config is one flag of the same name: its type picks the flag's kind,
its default is the flag's, and its help is the field's ``help`` metadata (``setting``). A dict
field is a JSON object on the command line; a ``tuple[str, ...]`` field is a comma-separated
list (or a repeated flag, with ``setting(..., repeat=True)``); ``X | None`` may be left unset.
The config's own ``__post_init__`` validates the values, raising a ``ValueError`` that names the
flag; ``check_types`` is the part every config shares.

Example:
  >>> @dataclasses.dataclass(frozen=True)
  ... class Config:
  ...   steps: int = setting(100, "Optimization steps.")
  ...   task_kwargs: dict = setting({}, "JSON settings of the task.")
  >>> parse(Config, ["prog", "--steps=5", '--task_kwargs={"dim": 3}'])
  Config(steps=5, task_kwargs={'dim': 3})
"""

import copy
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from typing import Any

from absl import flags

HELP = "help"  # field metadata: the flag's help text
REPEAT = "repeat"  # field metadata: a tuple field is a repeated flag, not a comma list
EXAMPLE = "example"  # field metadata: a JSON field's example value, for its error messages


def setting(
  default: Any,
  help: str,  # noqa: A002 (absl's name)
  *,
  repeat: bool = False,
  example: str = '{"dim": 10}',
) -> Any:
  """A config field that is also a flag, with ``help`` as the flag's help text.

  Args:
    default: the value when the flag is not given; a dict is copied per config, a list becomes
      a tuple.
    help: one or two sentences, shown by ``--help``; say what the value means and its unit.
    repeat: for a ``tuple[str, ...]`` field, one flag per item (``--x=a --x=b``) instead of a
      comma-separated list (``--x=a,b``).
    example: for a dict field, a JSON object that error messages show as an example.
  """
  metadata = {HELP: help, REPEAT: repeat, EXAMPLE: example}
  if isinstance(default, dict):
    return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
  if isinstance(default, list):
    default = tuple(default)
  return dataclasses.field(default=default, metadata=metadata)


def _kind(annotation) -> tuple[type, bool]:
  """``(type, may_be_none)`` of a field's annotation: ``int | None`` -> ``(int, True)``."""
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) != 1:
      raise TypeError(f"A flag field takes one type or one type | None, not {annotation}.")
    return _kind(args[0])[0], True
  if typing.get_origin(annotation) is tuple or annotation is tuple:
    return tuple, False
  if typing.get_origin(annotation) is dict:
    return dict, False
  return annotation, False


def fields(config_class) -> dict[str, tuple[dataclasses.Field, type, bool]]:
  """``{name: (field, type, may_be_none)}`` of a config class, in declaration order."""
  hints = typing.get_type_hints(config_class)
  return {f.name: (f, *_kind(hints[f.name])) for f in dataclasses.fields(config_class)}


def default(field: dataclasses.Field) -> Any:
  """A field's default value (a fresh copy for a dict field)."""
  if field.default_factory is not dataclasses.MISSING:
    return field.default_factory()
  return field.default


def define(
  config_class,
  flag_values: flags.FlagValues = flags.FLAGS,
  help_note: Callable[[str], str] | None = None,
) -> list[str]:
  """Defines one flag per field of ``config_class``; returns their names.

  Args:
    help_note: ``field name -> text`` appended to a field's help (e.g. what the presets set it to).
  """
  names = []
  for name, (field, kind, _) in fields(config_class).items():
    help_text = field.metadata.get(HELP) or name
    help_text += help_note(name) if help_note else ""
    value = default(field)
    if kind is dict:  # None: unset (e.g. "default: the checkpoint's")
      text = None if value is None else json.dumps(value)
      flags.DEFINE_string(name, text, help_text, flag_values=flag_values)
    elif kind is tuple:
      define_list = flags.DEFINE_multi_string if field.metadata.get(REPEAT) else flags.DEFINE_list
      define_list(name, list(value), help_text, flag_values=flag_values)
    elif kind in _DEFINE:
      _DEFINE[kind](name, value, help_text, flag_values=flag_values)
    else:
      raise TypeError(f"{config_class.__name__}.{name}: no flag kind for {kind}.")
    names.append(name)
  return names


_DEFINE = {
  bool: flags.DEFINE_bool,
  int: flags.DEFINE_integer,
  float: flags.DEFINE_float,
  str: flags.DEFINE_string,
}


def json_object(name: str, text: str, example: str = '{"dim": 10}') -> dict:
  """The JSON object a dict flag holds; ``ValueError`` naming ``--name`` and an example."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"--{name} is not valid JSON ({e}); e.g. --{name}='{example}'.") from e
  except RecursionError as e:
    raise ValueError(f"--{name} is nested too deeply to be a JSON object.") from e
  if not isinstance(value, dict):
    raise ValueError(f"--{name} must be a JSON object, e.g. --{name}='{example}'.")
  return value


def given(config_class, flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
  """The settings named on the command line, as config values (JSON parsed, lists as tuples)."""
  settings = {}
  for name, (field, kind, _) in fields(config_class).items():
    if name not in flag_values or not flag_values[name].present:  # not a flag, or not given
      continue
    value = flag_values[name].value
    if kind is dict:
      value = json_object(name, value, field.metadata.get(EXAMPLE, '{"dim": 10}'))
    elif kind is tuple:
      value = tuple(value)
    settings[name] = value
  return settings


def from_flags(
  config_class, flag_values: flags.FlagValues = flags.FLAGS, defaults: dict | None = None
):
  """The config of the flags given, over ``defaults`` (e.g. a preset's), over the fields' own.

  Raises:
    ValueError: naming the flag, from the config's validation or a malformed JSON flag.
  """
  return config_class(**{**(defaults or {}), **given(config_class, flag_values)})


def parse(config_class, argv: list[str], defaults: dict | None = None):
  """``config_class`` from a command line (``argv[0]`` is the program), on flags of its own.

  For tests and scripts: the process's ``flags.FLAGS`` is left alone.
  """
  flag_values = flags.FlagValues()
  define(config_class, flag_values)
  flag_values(argv)
  return from_flags(config_class, flag_values, defaults)


def check_types(config) -> None:
  """Raises a ``ValueError`` naming the flag of every field whose value has the wrong type.

  Numbers must be finite; an int field takes no float or bool; ``X | None`` fields take None.
  """
  for name, (_, kind, may_be_none) in fields(type(config)).items():
    value = getattr(config, name)
    if value is None and may_be_none:
      continue
    if kind is float and not (
      isinstance(value, int | float) and not isinstance(value, bool) and finite(value)
    ):
      raise ValueError(f"--{name} must be a finite number, got {value!r}.")
    if kind is dict and not isinstance(value, dict):
      raise ValueError(f"--{name} must be a JSON object, e.g. --{name}='{{}}'.")
    if kind is tuple and not (
      isinstance(value, tuple | list) and all(isinstance(v, str) for v in value)
    ):
      raise ValueError(f"--{name} must be a list of names, got {value!r}.")
    if kind in (int, bool, str) and (
      not isinstance(value, kind) or (kind is int and isinstance(value, bool))
    ):
      raise ValueError(f"--{name} must be {kind.__name__}, got {value!r}.")


def finite(value) -> bool:
  try:
    return math.isfinite(value)
  except (OverflowError, TypeError):
    return False
