"""Saving and loading trained optimizers: msgpack weights plus a JSON record, no pickle.

A saved optimizer is a directory holding ``optimizer.json`` (format version, the config that
rebuilds the optimizer, the name and SHA-256 of the weights file, free-form metadata) and the
weights file ``meta_params-<sha256 prefix>.msgpack`` (phi, ``learned_opt.tree_files``). Saving
is atomic as a whole: the new weights go to a new file, then the record is replaced (the one
step that switches from the old optimizer to the new), then the old weights are removed. A kill
at any moment leaves a directory that loads, as the old optimizer or the new one. Format 1 (the
weights always in ``meta_params.msgpack``) still loads.
"""

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from learned_opt import registry, tree_files
from learned_opt.base import LearnedOptimizer, MetaParams, SavedOptimizer

FORMAT_VERSION = 2  # 2: the record names its weights file (by hash); 1: meta_params.msgpack
RECORD_FILE = "optimizer.json"
WEIGHTS_FILE = "meta_params.msgpack"  # format 1's weights file
_WEIGHTS_NAME = re.compile(r"meta_params(-[0-9a-f]{16})?\.msgpack")


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


def _read_record(directory: str) -> dict:
  path = os.path.join(directory, RECORD_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"No saved optimizer at {directory!r}: {RECORD_FILE} is missing. Point at a directory "
      "written by learned_opt.save or `python -m train.meta_train --output_dir=...`."
    )
  try:
    with open(path, "rb") as f:
      record = json.loads(f.read())
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


def load(directory: str, optimizer: LearnedOptimizer | None = None) -> SavedOptimizer:
  """Loads a saved optimizer; checks integrity, architecture and shapes before returning.

  Args:
    directory: a directory written by ``save``.
    optimizer: if given, the saved config must equal ``optimizer.config``.

  Returns:
    ``SavedOptimizer(optimizer, meta_params)``.

  Example:
    >>> tx = learned_opt.as_optax(learned_opt.load("runs/quadratic"))
  """
  record = _read_record(directory)
  config = record["config"]
  if optimizer is not None and dict(optimizer.config) != config:
    raise ValueError(
      f"{directory} holds an optimizer with config {config}, which differs from the expected "
      f"{dict(optimizer.config)}."
    )
  if optimizer is None:
    try:
      optimizer = registry.build(config)
    except RecursionError as e:
      raise ValueError(f"{directory}/{RECORD_FILE}: field 'config' is nested too deeply.") from e
    except ValueError as e:
      raise ValueError(f"{directory}/{RECORD_FILE}: field 'config' is not valid: {e}") from e
  weights_path = os.path.join(directory, record.get("weights_file", WEIGHTS_FILE))
  if not os.path.isfile(weights_path):
    raise FileNotFoundError(f"{weights_path} is missing; the saved optimizer is incomplete.")
  with open(weights_path, "rb") as f:
    weights = f.read()
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
  """The free-form metadata saved with an optimizer (training command, results, ...)."""
  return dict(_read_record(directory).get("metadata", {}))
