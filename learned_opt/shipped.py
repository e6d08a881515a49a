"""Trained optimizers that ship inside the package, loadable by name.

Each subdirectory of ``learned_opt/pretrained/`` is one optimizer as written by
``learned_opt.save`` (``optimizer.json`` and the weights file it names); its name is the
subdirectory's name. How each was trained is recorded in its metadata and in ``docs/``.

The package exports ``pretrained`` and ``names`` (as ``learned_opt.pretrained`` and
``learned_opt.pretrained_names``); this module is ``learned_opt.shipped`` so that no function
shadows it. ``learned_opt/pretrained/`` is the data folder, not a module: do not import it.
"""

import importlib.resources
import os

from learned_opt import serialization

_PACKAGE = "learned_opt"
_FOLDER = "pretrained"
PREFIX = "pretrained:"  # a spec naming a shipped optimizer, e.g. "pretrained:mnist_mlp"


def _root() -> str:
  root = importlib.resources.files(_PACKAGE).joinpath(_FOLDER)
  if not isinstance(root, os.PathLike):
    raise RuntimeError(
      f"{_PACKAGE}/{_FOLDER} is not on the file system ({root!r}); install learned-opt as a "
      "regular (unzipped) package to use its pretrained optimizers."
    )
  return os.fspath(root)


def names() -> tuple[str, ...]:
  """Names of the shipped optimizers, e.g. ``("mnist_mlp",)``."""
  root = _root()
  if not os.path.isdir(root):
    return ()
  return tuple(
    sorted(
      entry
      for entry in os.listdir(root)
      if os.path.isfile(os.path.join(root, entry, serialization.RECORD_FILE))
    )
  )


def directory(name: str) -> str:
  """The directory holding the shipped optimizer ``name``."""
  available = names()
  if name not in available:
    raise ValueError(
      f"No pretrained optimizer named {name!r}; available: {', '.join(available) or 'none'}. "
      "Train one with `python -m train.meta_train` and load it with learned_opt.load(dir)."
    )
  return os.path.join(_root(), name)


def resolve(spec: str) -> str:
  """The directory of a saved-optimizer spec: ``pretrained:NAME`` or a directory as given."""
  if spec.startswith(PREFIX):
    return directory(spec[len(PREFIX) :])
  return spec


def pretrained(name: str) -> serialization.SavedOptimizer:
  """Loads a shipped optimizer by name.

  Example:
    >>> tx = learned_opt.as_optax(learned_opt.pretrained("mnist_mlp"))
  """
  return serialization.load(directory(name))


def metadata(name: str) -> dict:
  """How the shipped optimizer ``name`` was trained and what it achieved."""
  return serialization.load_metadata(directory(name))
