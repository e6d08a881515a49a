"""Saving and loading trained optimizers: msgpack weights plus a JSON record, no pickle.

A saved optimizer is a directory holding ``optimizer.json`` (format version, the config that
rebuilds the optimizer, the name and SHA-256 of the weights file, free-form metadata) and the
weights file ``meta_params-<sha256 prefix>.msgpack`` (phi, ``learned_opt.tree_files``). Saving
is atomic as a whole: the new weights go to a new file, then the record is replaced (the one
step that switches from the old optimizer to the new), then the old weights are removed. A kill
at any moment leaves a directory that loads, as the old optimizer or the new one. Format 1 (the
weights always in ``meta_params.msgpack``) still loads.

A reader of a directory that is being saved to (a live run's best optimizer) may read a record
whose weights the next save removes before it opens them; ``load`` then rereads the record and
loads the generation it names (``_LOAD_ATTEMPTS`` at most), so it returns the old optimizer or
the new one, never a half. Keeping old weights longer would only narrow that window and leave
two weights files behind, which a kill-and-resume could not reproduce byte for byte.
"""

import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from learned_opt import backend as backend_lib
from learned_opt import registry, tree_files
from learned_opt.base import LearnedOptimizer, MetaParams, SavedOptimizer

FORMAT_VERSION = 2  # 2: the record names its weights file (by hash); 1: meta_params.msgpack
RECORD_FILE = "optimizer.json"
WEIGHTS_FILE = "meta_params.msgpack"  # format 1's weights file
_WEIGHTS_NAME = re.compile(r"meta_params(-[0-9a-f]{16})?\.msgpack")
# A save replaces the record every few milliseconds at most; this many generations in a row
# vanishing under a reader means the directory is being rewritten without pause.
_LOAD_ATTEMPTS = 20
_RETRY_SECONDS = 0.01


def weights_file(digest: str) -> str:
  """The name of the weights file whose SHA-256 is ``digest``."""
  return f"meta_params-{digest[:16]}.msgpack"


def _check_finite(meta_params: MetaParams) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(meta_params):
    if not np.all(np.isfinite(np.asarray(leaf))):
      raise ValueError(
        f"Refusing to save non-finite meta-parameters (leaf {jax.tree_util.keystr(path)})."
      )


def save(
  directory: str,
  optimizer: LearnedOptimizer,
  meta_params: MetaParams,
  metadata: Mapping[str, Any] | None = None,
) -> None:
  """Saves a trained optimizer to ``directory`` (created if missing).

  Raises:
    ValueError: if ``meta_params`` holds NaN or Inf; nothing is written then.
  """
  _check_finite(meta_params)
  os.makedirs(directory, exist_ok=True)
  weights, digest = tree_files.encode(meta_params)
  name = weights_file(digest)
  record = {
    "format_version": FORMAT_VERSION,
    "config": dict(optimizer.config),
    "weights_file": name,
    "weights_sha256": digest,
    "metadata": dict(metadata or {}),
  }
  tree_files.atomic_write(os.path.join(directory, name), weights)
  # Replacing the record switches to the new optimizer in one step; the old one is whole until.
  tree_files.atomic_write(
    os.path.join(directory, RECORD_FILE), json.dumps(record, indent=2, sort_keys=True).encode()
  )
  for old in sorted(os.listdir(directory)):
    if old != name and _WEIGHTS_NAME.fullmatch(old):
      os.remove(os.path.join(directory, old))


def stray_weights(directory: str) -> list[str]:
  """Weights files in ``directory`` that its record does not name: what a killed ``save`` leaves
  (all of them when there is no record yet; none when the record is unreadable, to be safe).

  Removing them never changes what ``load`` returns; do it only where one process owns the
  directory, as a concurrent save's new weights are stray until its record is replaced.
  """
  if not os.path.isdir(directory):
    return []
  try:
    named = _read_record(directory).get("weights_file", WEIGHTS_FILE)
  except FileNotFoundError:
    named = None
  except (OSError, ValueError):
    return []
  return [n for n in sorted(os.listdir(directory)) if _WEIGHTS_NAME.fullmatch(n) and n != named]


def _read_record(directory: str) -> dict:
  """The checked ``optimizer.json`` of ``directory``; FileNotFoundError or ValueError if bad."""
  path = os.path.join(directory, RECORD_FILE)
  try:
    data = tree_files.read_regular(path)
  except (FileNotFoundError, NotADirectoryError) as e:
    raise FileNotFoundError(
      f"No saved optimizer at {directory!r}: {RECORD_FILE} is missing. Point at a directory "
      "written by learned_opt.save or `python -m train.meta_train --output_dir=...`."
    ) from e
  try:
    record = json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
    raise ValueError(f"{path} is corrupt (not valid JSON: {e!r}).") from e
  if not isinstance(record, dict) or "format_version" not in record or "config" not in record:
    raise ValueError(f"{path} is not an optimizer record (no format_version or config).")
  version = record["format_version"]
  if not isinstance(version, int) or isinstance(version, bool) or version < 1:
    raise ValueError(f"{path}: field 'format_version' must be a positive int, got {version!r}.")
  if version > FORMAT_VERSION:
    raise ValueError(
      f"{path} has format version {version}, newer than this library's "
      f"{FORMAT_VERSION}; upgrade learned-opt to load it."
    )
  expected = {"config": dict, "weights_sha256": str, "weights_file": str, "metadata": dict}
  for field, kind in expected.items():
    if field in record and not isinstance(record[field], kind):
      raise ValueError(
        f"{path}: field {field!r} must be a JSON {'object' if kind is dict else 'string'}, "
        f"got {type(record[field]).__name__}."
      )
  name = record.get("weights_file", WEIGHTS_FILE)
  if not _WEIGHTS_NAME.fullmatch(name):
    raise ValueError(
      f"{path}: field 'weights_file' must name a weights file in the same directory like "
      f"{weights_file('0' * 16)!r}, got {name!r}."
    )
  return record


def load(
  directory: str, optimizer: LearnedOptimizer | None = None, *, backend: str | None = None
) -> SavedOptimizer:
  """Loads a saved optimizer; checks integrity, architecture and shapes before returning.

  Safe while another process saves to ``directory``: if what the record names has gone (or
  changed) by the time it is read and the record was replaced meanwhile, the new record is
  loaded instead (see the module docstring).

  Args:
    directory: a directory written by ``save``.
    optimizer: if given, the saved config must equal ``optimizer.config``.
    backend: how the loaded optimizer's update executes (``learned_opt.backend``); None:
      ``$LEARNED_OPT_BACKEND``, else ``"auto"``. Ignored with ``optimizer`` (it has its own).

  Returns:
    ``SavedOptimizer(optimizer, meta_params)``.

  Example:
    >>> tx = learned_opt.as_optax(learned_opt.load("runs/quadratic"))
  """
  if optimizer is None:
    backend = backend_lib.resolve(backend)  # a bad one is the caller's error, not the file's
  record = _read_record(directory)
  for attempt in range(1, _LOAD_ATTEMPTS + 1):
    try:
      return _load_record(directory, record, optimizer, backend)
    except (OSError, ValueError) as e:
      newer = _read_record(directory)
      if newer == record:
        raise  # nothing was saved meanwhile: the error is the directory's own
      if attempt == _LOAD_ATTEMPTS:
        raise ValueError(
          f"{directory}/{RECORD_FILE} was replaced {attempt} times while loading it (a save in "
          "progress removed each record's weights before they were read); load again when the "
          "saves pause."
        ) from e
      record = newer
      time.sleep(_RETRY_SECONDS)
  raise AssertionError("unreachable")


def _load_record(
  directory: str, record: dict, optimizer: LearnedOptimizer | None, backend: str | None = None
) -> SavedOptimizer:
  """The optimizer ``record`` (read from ``directory``'s ``optimizer.json``) describes."""
  config = record["config"]
  if optimizer is not None and dict(optimizer.config) != config:
    raise ValueError(
      f"{directory} holds an optimizer with config {config}, which differs from the expected "
      f"{dict(optimizer.config)}."
    )
  if optimizer is None:
    try:
      optimizer = registry.build(config, backend=backend)
    except RecursionError as e:
      raise ValueError(f"{directory}/{RECORD_FILE}: field 'config' is nested too deeply.") from e
    except ValueError as e:
      raise ValueError(f"{directory}/{RECORD_FILE}: field 'config' is not valid: {e}") from e
  weights_path = os.path.join(directory, record.get("weights_file", WEIGHTS_FILE))
  try:
    weights = tree_files.read_regular(weights_path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{weights_path} is missing; the saved optimizer is incomplete.") from e
  template = jax.eval_shape(optimizer.init_meta_params, jax.random.key(0))
  raw = tree_files.read(weights, record.get("weights_sha256"), weights_path, record=RECORD_FILE)
  meta_params = tree_files.restore(raw, template, weights_path, fits=f"config {config}")
  for path, leaf in jax.tree_util.tree_leaves_with_path(meta_params):
    if not np.all(np.isfinite(np.asarray(leaf))):
      raise ValueError(
        f"{weights_path} holds non-finite weights (leaf {jax.tree_util.keystr(path)}); "
        "save refuses them, so the file was not written by learned_opt.save."
      )
  return SavedOptimizer(optimizer, meta_params)


def load_metadata(directory: str) -> dict:
  """The free-form metadata saved with an optimizer (training command, results, ...).

  It reads the record alone (one atomic file), so it is consistent under a concurrent save.
  """
  return dict(_read_record(directory).get("metadata", {}))
