"""Atomic, verifiable checkpoints of a whole meta-training state (msgpack, no pickle).

A checkpoint is a directory ``step_XXXXXXXX`` holding ``state.msgpack`` (every array of the
training state, ``learned_opt.tree_files.encode``) and ``meta.json`` (format version, step,
SHA-256 of the state file, host-side bookkeeping such as the validation history). It is built
in a temporary directory and renamed into place, so a kill at any moment leaves either the whole
checkpoint or none of it. A checkpoint written in an older format is read through an ``upgrade``
function that its caller (the trainer, which knows its state's history) supplies.
"""

import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

from learned_opt import tree_files

FORMAT_VERSION = 2  # 2: learned-optimizer state wrapped by as_optax; skip counters in the state
# (raw state dict, host dict, format version) -> the same in the current format.
Upgrade = Callable[[dict, dict, int], tuple[dict, dict]]
_PREFIX = "step_"
_STATE, _META = "state.msgpack", "meta.json"


def save(directory: str, step: int, state: Any, host: dict, keep: int) -> str:
  """Writes checkpoint ``step`` under ``directory`` and prunes all but the newest ``keep``."""
  os.makedirs(directory, exist_ok=True)
  data, digest = tree_files.encode(state)
  meta = {"format_version": FORMAT_VERSION, "step": step, "state_sha256": digest, "host": host}
  final = os.path.join(directory, f"{_PREFIX}{step:08d}")
  tree_files.atomic_write_directory(final, {_STATE: data, _META: json.dumps(meta).encode()})
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
  meta_path, state_path = os.path.join(path, _META), os.path.join(path, _STATE)
  try:
    with open(meta_path, "rb") as f:
      meta = json.loads(f.read())
    with open(state_path, "rb") as f:
      data = f.read()
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"Checkpoint {path} is unreadable: {e}") from e
  version, host = meta.get("format_version", 0), meta.get("host")
  if version > FORMAT_VERSION:
    raise ValueError(
      f"{meta_path} has format version {version}, newer than this library's "
      f"{FORMAT_VERSION}; upgrade learned-opt to resume from it."
    )
  raw = tree_files.read(data, meta.get("state_sha256"), state_path, record=_META)
  if version < FORMAT_VERSION:
    if upgrade is None:
      raise ValueError(f"{path} is in format {version}; no upgrade to {FORMAT_VERSION} was given.")
    try:
      raw, host = upgrade(raw, host, version)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{state_path} cannot be upgraded from format {version}: {e!r}") from e
  return tree_files.restore(raw, template, state_path, fits="this run's config"), host


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
