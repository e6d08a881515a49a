"""Atomic, verifiable checkpoints of a whole meta-training state (msgpack, no pickle).

A checkpoint is a directory ``step_XXXXXXXX`` holding ``state.msgpack`` (every array of the
training state, written with ``flax.serialization``) and ``meta.json`` (format version, step,
SHA-256 of the state file, host-side bookkeeping such as the validation history). It is built
in a temporary directory and renamed into place, so a kill at any moment leaves either the whole
checkpoint or none of it. A checkpoint written in an older format is read through an ``upgrade``
function that its caller (the trainer, which knows its state's history) supplies.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import serialization

from learned_opt.serialization import current_umask

FORMAT_VERSION = 2  # 2: learned-optimizer state wrapped by as_optax; skip counters in the state
# (raw state dict, host dict, format version) -> the same in the current format.
Upgrade = Callable[[dict, dict, int], tuple[dict, dict]]
_PREFIX = "step_"


def _to_host(tree):
  """Arrays to numpy; typed PRNG keys to their raw uint32 data."""

  def convert(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)

  return jax.tree.map(convert, tree)


def _from_host(tree, template):
  def convert(leaf, spec):
    if jax.dtypes.issubdtype(spec.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(np.asarray(leaf, np.uint32))
    return jax.numpy.asarray(leaf, spec.dtype)

  return jax.tree.map(convert, tree, template)


def save(directory: str, step: int, state: Any, host: dict, keep: int) -> str:
  """Writes checkpoint ``step`` under ``directory`` and prunes all but the newest ``keep``."""
  os.makedirs(directory, exist_ok=True)
  data = serialization.msgpack_serialize(serialization.to_state_dict(_to_host(state)))
  meta = {
    "format_version": FORMAT_VERSION,
    "step": step,
    "state_sha256": hashlib.sha256(data).hexdigest(),
    "host": host,
  }
  final = os.path.join(directory, f"{_PREFIX}{step:08d}")
  tmp = tempfile.mkdtemp(dir=directory, prefix=".tmp-")
  try:
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; use the usual mode.
    for name, payload in (("state.msgpack", data), ("meta.json", json.dumps(meta).encode())):
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
      shutil.rmtree(final)
    os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  for old in all_steps(directory)[:-keep]:
    shutil.rmtree(os.path.join(directory, f"{_PREFIX}{old:08d}"), ignore_errors=True)
  return final


def all_steps(directory: str) -> list[int]:
  """Steps of the complete checkpoints under ``directory``, oldest first."""
  if not os.path.isdir(directory):
    return []
  steps = []
  for name in os.listdir(directory):
    if name.startswith(_PREFIX) and name[len(_PREFIX) :].isdigit():
      steps.append(int(name[len(_PREFIX) :]))
  return sorted(steps)


def restore(path: str, template: Any, upgrade: Upgrade | None = None) -> tuple[Any, dict]:
  """Reads one checkpoint directory into the structure of ``template``.

  Args:
    path: a ``step_XXXXXXXX`` directory.
    template: a state of the structure and shapes to restore (e.g. a fresh one).
    upgrade: converts an older format's raw state dict and host dict to the current format.

  Raises:
    ValueError: naming the file and the problem, if the checkpoint is corrupt, truncated, from a
      newer format, or shaped for another config. Nothing is returned half-loaded.
  """
  meta_path = os.path.join(path, "meta.json")
  state_path = os.path.join(path, "state.msgpack")
  try:
    with open(meta_path, "rb") as f:
      meta = json.loads(f.read())
    with open(state_path, "rb") as f:
      data = f.read()
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"Checkpoint {path} is unreadable: {e}") from e
  if meta.get("format_version", 0) > FORMAT_VERSION:
    raise ValueError(
      f"{meta_path} has format version {meta['format_version']}, newer than this library's "
      f"{FORMAT_VERSION}; upgrade learned-opt to resume from it."
    )
  if hashlib.sha256(data).hexdigest() != meta.get("state_sha256"):
    raise ValueError(f"{state_path} is corrupt or truncated: its SHA-256 does not match meta.json.")
  version, host = meta.get("format_version", 0), meta.get("host")
  try:
    raw = serialization.msgpack_restore(data)
    if version < FORMAT_VERSION:
      if upgrade is None:
        raise ValueError(f"it is in format {version} and no upgrade to {FORMAT_VERSION} was given")
      raw, host = upgrade(raw, host, version)
    host_template = _to_host(template)
    state = serialization.from_state_dict(host_template, raw)
  except Exception as e:  # flax and msgpack raise many types for mismatched input.
    raise ValueError(f"{state_path} does not fit this run's config: {e}") from e
  for (key_path, leaf), spec in zip(
    jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(host_template), strict=True
  ):
    if np.shape(leaf) != spec.shape:
      raise ValueError(
        f"{state_path} does not fit this run's config: {jax.tree_util.keystr(key_path)} is "
        f"shaped {np.shape(leaf)}, expected {spec.shape}."
      )
  return _from_host(state, template), host


def restore_latest(
  directory: str, template: Any, upgrade: Upgrade | None = None
) -> tuple[Any, dict] | None:
  """Restores the newest checkpoint that reads cleanly, skipping (and logging) broken ones."""
  for step in reversed(all_steps(directory)):
    path = os.path.join(directory, f"{_PREFIX}{step:08d}")
    try:
      return restore(path, template, upgrade)
    except ValueError as e:
      logging.warning("Skipping unusable checkpoint: %s", e)
  return None
