"""Pytrees of arrays on disk: msgpack bytes checked by a SHA-256, written atomically, no pickle.

The one file format under saved optimizers (``learned_opt.serialization``) and meta-training
checkpoints (``train.checkpoint``): ``encode`` turns a tree into msgpack bytes and their SHA-256
(which the caller keeps in its JSON record), ``read`` checks the digest and ``restore`` puts the
bytes into the structure, shapes and dtypes of a template; both raise a ``ValueError`` that names
the file.
"""

import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import serialization

TMP_PREFIX = ".tmp-"  # temporary files and directories of an atomic write in progress


def current_umask() -> int:
  """The process umask, read by setting and restoring it."""
  mask = os.umask(0)
  os.umask(mask)
  return mask


class NotRegularFileError(OSError, ValueError):
  """A file a reader expected is a FIFO, device, socket or directory (both an OSError and a
  ValueError, so callers that turn either into "unusable" handle it)."""

  def __str__(self) -> str:
    return f"{self.filename} {self.strerror}"


def _kind(mode: int) -> str:
  kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
  kinds += ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
  return next((name for is_kind, name in kinds if is_kind(mode)), "not a regular file")


def read_regular(path: str) -> bytes:
  """The bytes of the regular file at ``path``.

  Opened non-blocking and checked with ``fstat`` before reading: a FIFO (or device) planted
  under a run's file name raises at once instead of blocking the reader forever, even when it
  replaces the file between a check and the open.

  Raises:
    FileNotFoundError: if ``path`` is missing.
    NotRegularFileError: if it is not a regular file (the message says what it is).
  """
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
  try:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      raise NotRegularFileError(
        errno.EINVAL, f"is {_kind(mode)}, not a regular file; move it away", path
      )
    with os.fdopen(fd, "rb", closefd=False) as f:
      return f.read()
  finally:
    os.close(fd)


def _write_synced(path: str, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def atomic_write(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file and an atomic rename."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX)
  os.close(fd)
  try:
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual mode.
    _write_synced(tmp, data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_directory(path: str, files: Mapping[str, bytes]) -> None:
  """Writes ``files`` (name -> bytes) as the directory ``path``: all of them or none.

  They are written into a temporary sibling directory that is then renamed into place, so a kill
  at any moment leaves either the whole directory or no directory at ``path``.
  """
  parent = os.path.dirname(os.path.abspath(path))
  tmp = tempfile.mkdtemp(dir=parent, prefix=TMP_PREFIX)
  try:
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; use the usual mode.
    for name, data in files.items():
      _write_synced(os.path.join(tmp, name), data)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):  # a stray file of that name would make the rename fail forever
      os.remove(path)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def remove_temporaries(directory: str) -> list[str]:
  """Removes what ``atomic_write`` and ``atomic_write_directory`` leave when killed mid-write.

  Only the names they create (``.tmp-*``) directly under ``directory``; call it where one
  process owns the directory (e.g. a training job's output directory at start).

  Returns:
    The removed names.
  """
  if not os.path.isdir(directory):
    return []
  removed = []
  for name in sorted(os.listdir(directory)):
    if name.startswith(TMP_PREFIX):
      path = os.path.join(directory, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)
      removed.append(name)
  return removed


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _to_numpy(tree):
  """Arrays to numpy; typed PRNG keys to their raw uint32 data."""

  def convert(leaf):
    if hasattr(leaf, "dtype") and _is_key(leaf.dtype):
      leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)

  return jax.tree.map(convert, tree)


def encode(tree) -> tuple[bytes, str]:
  """``(msgpack bytes, their SHA-256 hex digest)`` of a tree of arrays and PRNG keys."""
  data = serialization.msgpack_serialize(serialization.to_state_dict(_to_numpy(tree)))
  return data, sha256(data)


def read(data: bytes, expected_sha256: str | None, path: str, *, record: str) -> dict:
  """The raw state dict in ``data`` (written by ``encode``), after checking its SHA-256.

  Args:
    data: the file's bytes.
    expected_sha256: the digest its record holds.
    path: the file, named in errors.
    record: the record file holding the digest, named in errors (e.g. ``"meta.json"``).
  """
  if sha256(data) != expected_sha256:
    raise ValueError(f"{path} is corrupt or truncated: its SHA-256 does not match {record}.")
  try:
    return serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises many types for malformed input.
    raise ValueError(f"{path} is not a msgpack tree: {e}") from e


def restore(raw: dict, template: Any, path: str, *, fits: str):
  """``raw`` (from ``read``) in ``template``'s structure, shapes and dtypes.

  Args:
    raw: a raw state dict.
    template: a tree of arrays or ``jax.ShapeDtypeStruct`` (PRNG-key leaves come back as keys).
    path: the file, named in errors.
    fits: what the tree must fit, for errors (e.g. ``"this run's config"``).

  Raises:
    ValueError: if ``raw`` has another structure, or a leaf another shape or kind of dtype.
  """
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jax.numpy.shape(x), x.dtype), template)
  stored = jax.tree.map(_stored_spec, specs)
  numpy_template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), stored)
  try:
    tree = serialization.from_state_dict(numpy_template, raw)
  except Exception as e:  # flax raises many types for mismatched input.
    raise ValueError(f"{path} does not fit {fits}: {e}") from e
  mismatched = [
    f"{jax.tree_util.keystr(key_path)}: saved {np.shape(leaf)} {np.asarray(leaf).dtype}, "
    f"expected {spec.shape} {spec.dtype}"
    for (key_path, leaf), spec in zip(
      jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(stored), strict=True
    )
    # same_kind: values an upgrade wrote as Python numbers (int64, float64) fit int32, float32.
    if np.shape(leaf) != spec.shape
    or not np.can_cast(np.asarray(leaf).dtype, spec.dtype, "same_kind")
  ]
  if mismatched:
    raise ValueError(f"{path} does not fit {fits}: " + "; ".join(mismatched))
  return jax.tree.map(_from_numpy, tree, specs)


def _is_key(dtype) -> bool:
  return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _stored_spec(spec: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  """How a leaf is stored: typed PRNG keys as their raw key data (uint32, one more axis)."""
  return jax.eval_shape(jax.random.key_data, spec) if _is_key(spec.dtype) else spec


def _from_numpy(leaf, spec):
  if _is_key(spec.dtype):
    return jax.random.wrap_key_data(np.asarray(leaf, np.uint32))
  return jax.numpy.asarray(leaf, spec.dtype)
