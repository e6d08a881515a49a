"""Saving and loading trained optimizers: msgpack weights plus a JSON record, no pickle.

A saved optimizer is a directory holding ``optimizer.json`` (format version, the config that
rebuilds the optimizer, the SHA-256 of the weights file, free-form metadata) and
``meta_params.msgpack`` (phi, written with ``flax.serialization``). Both are written atomically,
weights first, so a reader never sees a record pointing at half-written weights.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import serialization

from learned_opt import registry
from learned_opt.base import LearnedOptimizer, MetaParams, SavedOptimizer

FORMAT_VERSION = 1
RECORD_FILE = "optimizer.json"
WEIGHTS_FILE = "meta_params.msgpack"


def current_umask() -> int:
  """The process umask, read by setting and restoring it."""
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file and an atomic rename."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual mode.
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


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
  weights = serialization.msgpack_serialize(
    serialization.to_state_dict(jax.tree.map(np.asarray, meta_params))
  )
  record = {
    "format_version": FORMAT_VERSION,
    "config": dict(optimizer.config),
    "weights_sha256": hashlib.sha256(weights).hexdigest(),
    "metadata": dict(metadata or {}),
  }
  atomic_write(os.path.join(directory, WEIGHTS_FILE), weights)
  atomic_write(
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
  if hashlib.sha256(weights).hexdigest() != record.get("weights_sha256"):
    raise ValueError(
      f"{weights_path} is corrupt or truncated: its SHA-256 does not match {RECORD_FILE}."
    )
  template = jax.eval_shape(optimizer.init_meta_params, jax.random.key(0))
  try:
    state = serialization.msgpack_restore(weights)
    meta_params = serialization.from_state_dict(template, state)
  except Exception as e:  # msgpack and flax raise many types for malformed input.
    raise ValueError(f"{weights_path} does not hold weights for config {config}: {e}") from e
  mismatched = [
    f"{jax.tree_util.keystr(path)}: saved {np.shape(leaf)}, expected {spec.shape}"
    for (path, leaf), spec in zip(
      jax.tree_util.tree_leaves_with_path(meta_params), jax.tree.leaves(template), strict=True
    )
    if np.shape(leaf) != spec.shape or np.asarray(leaf).dtype != spec.dtype
  ]
  if mismatched:
    raise ValueError(f"{weights_path} does not match config {config}: " + "; ".join(mismatched))
  meta_params = jax.tree.map(jax.numpy.asarray, meta_params)
  return SavedOptimizer(optimizer, meta_params)


def load_metadata(directory: str) -> dict:
  """The free-form metadata saved with an optimizer (training command, results, ...)."""
  return dict(_read_record(directory).get("metadata", {}))
