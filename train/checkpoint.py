"""Atomic, verifiable checkpoints of a whole meta-training state (msgpack, no pickle).

A checkpoint is a directory ``step_XXXXXXXX`` holding ``state.msgpack`` (every array of the
training state, ``learned_opt.tree_files.encode``) and ``meta.json`` (format version, step,
SHA-256 of the state file, host-side bookkeeping such as the validation history, and a SHA-256
of all of these). It is built in a temporary directory and renamed into place, so a kill at any
moment leaves either the whole checkpoint or none of it. A checkpoint written in an older format
is read through an ``upgrade`` function that its caller (the trainer, which knows its state's
history) supplies.
"""

import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any, NamedTuple

from learned_opt import tree_files

FORMAT_VERSION = 3  # 3: meta.json checksummed; 2: learned-optimizer state wrapped by as_optax,
# skip counters in the state. 1: the first.
# (raw state dict, host dict, format version) -> the same in the current format.
Upgrade = Callable[[dict, dict, int], tuple[dict, dict]]
_PREFIX = "step_"
PREEMPTED = "preempted"  # host field of a checkpoint written on a signal, off the schedule
_STATE, _META = "state.msgpack", "meta.json"


class NewerFormatError(ValueError):
  """A checkpoint written by a newer version of this library: not skipped, never removed."""


def path_of(directory: str, step: int) -> str:
  return os.path.join(directory, f"{_PREFIX}{step:08d}")


def _meta_digest(meta: dict) -> str:
  fields = {k: v for k, v in meta.items() if k != "meta_sha256"}
  return tree_files.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())


def save(directory: str, step: int, state: Any, host: dict, keep: int) -> str:
  """Writes checkpoint ``step`` under ``directory`` and prunes all but the newest ``keep``."""
  os.makedirs(directory, exist_ok=True)
  data, digest = tree_files.encode(state)
  meta = {"format_version": FORMAT_VERSION, "step": step, "state_sha256": digest, "host": host}
  meta["meta_sha256"] = _meta_digest(meta)
  final = path_of(directory, step)
  tree_files.atomic_write_directory(final, {_STATE: data, _META: json.dumps(meta).encode()})
  prune(directory, keep)
  return final


def all_steps(directory: str) -> list[int]:
  """Steps of the checkpoint directories under ``directory``, oldest first."""
  if not os.path.isdir(directory):
    return []
  steps = []
  for name in os.listdir(directory):
    if name.startswith(_PREFIX) and name[len(_PREFIX) :].isdigit():
      if os.path.isdir(os.path.join(directory, name)):
        steps.append(int(name[len(_PREFIX) :]))
  return sorted(steps)


def marked_steps(directory: str, key: str) -> list[int]:
  """Steps of the checkpoints whose host record sets ``key``, oldest first (unreadable ones are
  left out)."""
  steps = []
  for step in all_steps(directory):
    try:
      if _read_meta(path_of(directory, step))["host"].get(key):
        steps.append(step)
    except ValueError:
      continue
  return steps


def _read_meta(path: str) -> dict:
  """``meta.json`` of checkpoint ``path``, checked for structure and (format 3 on) checksum."""
  meta_path = os.path.join(path, _META)
  try:  # read_regular: a FIFO named meta.json would block open() forever
    meta = json.loads(tree_files.read_regular(meta_path))
  except OSError as e:
    raise ValueError(f"Checkpoint {path} is unreadable: {e}") from e
  except (ValueError, RecursionError) as e:
    raise ValueError(f"Checkpoint {path} is unreadable: {e!r}") from e
  if not isinstance(meta, dict):
    raise ValueError(f"{meta_path} is not a checkpoint record (not a JSON object).")
  version = meta.get("format_version")
  if not isinstance(version, int) or isinstance(version, bool):
    raise ValueError(f"{meta_path}: 'format_version' must be an int, got {version!r}.")
  if version > FORMAT_VERSION:
    raise NewerFormatError(
      f"{meta_path} has format version {version}, newer than this library's "
      f"{FORMAT_VERSION}; upgrade learned-opt to resume from it."
    )
  if version >= 3 and meta.get("meta_sha256") != _meta_digest(meta):
    raise ValueError(f"{meta_path} was altered or is corrupt: its SHA-256 does not match.")
  suffix = os.path.basename(os.path.normpath(path))[len(_PREFIX) :]
  if not (suffix.isdigit() and meta.get("step") == int(suffix)):
    name = os.path.basename(os.path.normpath(path))
    raise ValueError(f"{meta_path} is for step {meta.get('step')!r}, not that of {name}.")
  if not isinstance(meta.get("host"), dict) or not isinstance(meta.get("state_sha256"), str):
    raise ValueError(f"{meta_path} is not a checkpoint record (no host object or state SHA-256).")
  return meta


def _read_raw(path: str) -> tuple[dict, dict, str]:
  """``(raw state dict, meta record, state file path)`` of checkpoint ``path``, digest checked."""
  meta = _read_meta(path)
  state_path = os.path.join(path, _STATE)
  try:
    data = tree_files.read_regular(state_path)
  except OSError as e:
    raise ValueError(f"Checkpoint {path} is unreadable: {e}") from e
  return tree_files.read(data, meta["state_sha256"], state_path, record=_META), meta, state_path


def restore(path: str, template: Any, upgrade: Upgrade | None = None) -> tuple[Any, dict]:
  """Reads one checkpoint directory into the structure of ``template``.

  Args:
    path: a ``step_XXXXXXXX`` directory.
    template: a state of the structure and shapes to restore (a fresh one, or its
      ``jax.eval_shape``).
    upgrade: converts an older format's raw state dict and host dict to the current format.

  Raises:
    ValueError: naming the file and the problem, if the checkpoint is corrupt, truncated, altered,
      from a newer format, or shaped for another config. Nothing is returned half-loaded.
  """
  raw, meta, state_path = _read_raw(path)
  version, host = meta["format_version"], meta["host"]
  if version < FORMAT_VERSION:
    if upgrade is None:
      raise ValueError(f"{path} is in format {version}; no upgrade to {FORMAT_VERSION} was given.")
    try:
      raw, host = upgrade(raw, host, version)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{state_path} cannot be upgraded from format {version}: {e!r}") from e
  return tree_files.restore(raw, template, state_path, fits="this run's config"), host


def restore_field(path: str, field: str, template: Any, fits: str) -> tuple[Any, dict]:
  """One top-level field of a checkpoint's state (e.g. ``meta_params``) and its host record.

  Only ``template``'s part of the state need be known, so phi reads without the rest of the
  state's shapes (the task's). The whole state file is read to check its SHA-256. A field that
  no format upgrade changes reads from every format.

  Raises:
    ValueError: as ``restore``, or if the state has no ``field``.
  """
  raw, meta, state_path = _read_raw(path)
  if not isinstance(raw, dict) or field not in raw:
    raise ValueError(f"{state_path} holds no {field!r}; it is not a meta-training checkpoint.")
  return tree_files.restore(raw[field], template, state_path, fits=fits), meta["host"]


def read_meta(path: str) -> dict:
  """The checked record (``meta.json``) of checkpoint ``path``, without reading its state:
  ``format_version``, ``step``, ``state_sha256``, ``host``."""
  return _read_meta(path)


class Latest(NamedTuple):
  """What ``latest`` found: the newest usable checkpoint, and the unusable ones with reasons."""

  step: int | None  # None: no usable checkpoint
  state: Any
  host: dict | None
  unusable: tuple  # ((step, reason), ...) newest first


def latest(
  directory: str,
  template: Any,
  upgrade: Upgrade | None = None,
  check_host: Callable[[dict], Any] | None = None,
) -> Latest:
  """The newest checkpoint that reads cleanly (and whose host passes ``check_host``).

  Raises:
    NewerFormatError: if a checkpoint newer than the usable one is from a newer library version;
      resuming from an older checkpoint would silently drop its progress.
  """
  unusable = []
  for step in reversed(all_steps(directory)):
    try:
      state, host = restore(path_of(directory, step), template, upgrade)
      if check_host is not None:
        check_host(host)
      return Latest(step, state, host, tuple(unusable))
    except NewerFormatError:
      raise
    except ValueError as e:
      logging.warning("Skipping unusable checkpoint: %s", e)
      unusable.append((step, str(e)))
  return Latest(None, None, None, tuple(unusable))


def restore_latest(
  directory: str, template: Any, upgrade: Upgrade | None = None
) -> tuple[Any, dict] | None:
  """Restores the newest checkpoint that reads cleanly, skipping (and logging) broken ones."""
  found = latest(directory, template, upgrade)
  return None if found.step is None else (found.state, found.host)


def _host_if_complete(path: str) -> dict | None:
  """A checkpoint's host record if it has both files and a well-formed record (a cheap check),
  else None; ``{}`` for another library version's checkpoint, which is kept."""
  try:
    meta = _read_meta(path)
  except NewerFormatError:
    return {}
  except ValueError:
    return None
  return meta["host"] if os.path.isfile(os.path.join(path, _STATE)) else None


def remove(directory: str, step: int) -> None:
  shutil.rmtree(path_of(directory, step), ignore_errors=True)


def prune(directory: str, keep: int) -> None:
  """Keeps the newest ``keep`` complete checkpoints; removes older and incomplete ones.

  An incomplete checkpoint (a kill during an earlier prune, or junk) counts toward nothing. One
  written on a signal (host ``PREEMPTED``, off the ``--checkpoint_every`` schedule) is kept only
  while it is the newest complete one: once the resumed run writes another it goes, so the run
  ends with an uninterrupted run's checkpoints.
  """
  kept = 0
  for step in reversed(all_steps(directory)):
    host = _host_if_complete(path_of(directory, step))
    if kept < keep and host is not None and not (kept and host.get(PREEMPTED)):
      kept += 1
    else:
      remove(directory, step)
