"""Saving and loading trained optimizers: msgpack weights plus a JSON record, no pickle.

A saved optimizer is a directory holding ``optimizer.json`` (format version, the config that
rebuilds the optimizer, the SHA-256 of the weights file, free-form metadata) and
``meta_params.msgpack`` (phi, written with ``flax.serialization``). Both are written atomically,
weights first, so a reader never sees a record pointing at half-written weights.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from learned_opt import registry, tree_files
from learned_opt.base import LearnedOptimizer, MetaParams, SavedOptimizer

FORMAT_VERSION = 1
RECORD_FILE = "optimizer.json"
WEIGHTS_FILE = "meta_params.msgpack"


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
  record = {
    "format_version": FORMAT_VERSION,
    "config": dict(optimizer.config),
    "weights_sha256": digest,
    "metadata": dict(metadata or {}),
  }
  tree_files.atomic_write(os.path.join(directory, WEIGHTS_FILE), weights)
  tree_files.atomic_write(
    os.path.join(directory, RECORD_FILE), json.dumps(record, indent=2, sort_keys=True).encode()
  )


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
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is corrupt (not valid JSON: {e}).") from e
  if not isinstance(record, dict) or "format_version" not in record or "config" not in record:
    raise ValueError(f"{path} is not an optimizer record (no format_version or config).")
  if record["format_version"] > FORMAT_VERSION:
    raise ValueError(
      f"{path} has format version {record['format_version']}, newer than this library's "
      f"{FORMAT_VERSION}; upgrade learned-opt to load it."
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
  optimizer = optimizer or registry.build(config)
  weights_path = os.path.join(directory, WEIGHTS_FILE)
  if not os.path.isfile(weights_path):
    raise FileNotFoundError(f"{weights_path} is missing; the saved optimizer is incomplete.")
  with open(weights_path, "rb") as f:
    weights = f.read()
  template = jax.eval_shape(optimizer.init_meta_params, jax.random.key(0))
  raw = tree_files.read(weights, record.get("weights_sha256"), weights_path, record=RECORD_FILE)
  meta_params = tree_files.restore(raw, template, weights_path, fits=f"config {config}")
  return SavedOptimizer(optimizer, meta_params)


def load_metadata(directory: str) -> dict:
  """The free-form metadata saved with an optimizer (training command, results, ...)."""
  return dict(_read_record(directory).get("metadata", {}))
