"""The one on-disk cache of evaluation curves, keyed by a hash of everything that determines them.

An entry is one optimizer's curves on one set of test problems: ``<dir>/<name>-<problems>-<key>
.npz`` holding the curves (each shaped (problems, num_steps + 1)) and a JSON record (learning
rate, tuning scores, seconds). ``problems`` fingerprints the test problems alone (task and its
data, problem draw, steps, observables, engine version); ``key`` adds the optimizer (a baseline's
name, grid and tuning; a learned optimizer's config, backend and phi). A changed seed, task
setting, data file, grid, backend or engine version so changes the file name: a stale entry is
never read. Process 0 alone writes; every process reads process 0's copy
(``train.distributed.read_on_writer``).
"""

import hashlib
import io
import json
import os
import re
import zipfile
from typing import Any, NamedTuple

import jax
import numpy as np

from learned_opt import tree_files
from train import distributed

VERSION = 1  # of the engine's numerics: bump when the same spec would give other curves
LOCAL = ("cifar10_dir", "mnist_dir", "cache_dir", "tfds_data_dir")  # where data is, not what


class Entry(NamedTuple):
  record: dict[str, Any]  # learning_rate, tuning_scores, seconds, ...
  curves: dict[str, np.ndarray]  # name -> (problems, num_steps + 1)


def fingerprint(value) -> str:
  """A short hash of a JSON-serializable ``value`` (keys sorted)."""
  text = json.dumps(value, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_fingerprint(data) -> str:
  """A short hash of a pytree of arrays: every leaf's dtype, shape and bytes."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(data):
    leaf = np.asarray(leaf)
    digest.update(f"{leaf.dtype}{leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def task_fingerprint(config, data) -> dict:
  """What of a task determines curves: its settings (less data locations) and its data."""
  settings = {k: v for k, v in dict(config).items() if k not in LOCAL}
  return {"config": settings, "data": data_fingerprint(data)}


def _safe(name: str) -> str:
  return re.sub(r"[^\w.]", "_", name)  # an optimizer's label as a file name's part


def _path(directory: str, name: str, problems: str, key: str) -> str:
  return os.path.join(directory, f"{_safe(name)}-{problems}-{key}.npz")


def _decode(data: bytes) -> Entry | None:
  """The entry in ``data``; None (a miss: computed again) for a file that does not decode."""
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
      record = json.loads(str(f["record"]))
      return Entry(record, {k: f[f"curves/{k}"] for k in record["curve_names"]})
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    print(f"eval.cache: ignoring an entry that does not decode ({type(e).__name__}: {e})")
    return None


def load(directory: str, name: str, problems: str, key: str) -> Entry | None:
  """The entry saved under exactly these fingerprints, else None."""
  data = distributed.read_on_writer(_path(directory, name, problems, key))
  return None if data is None else _decode(data)


def save(directory: str, name: str, problems: str, key: str, entry: Entry) -> None:
  """Writes ``entry`` atomically (process 0 alone; the others return)."""
  if not distributed.is_writer():
    return
  os.makedirs(directory, exist_ok=True)
  record = {**entry.record, "curve_names": sorted(entry.curves)}
  arrays = {f"curves/{k}": v for k, v in entry.curves.items()}
  buffer = io.BytesIO()
  np.savez(buffer, record=np.asarray(json.dumps(record)), **arrays)
  # A unique temporary file, synced, then renamed: two writers of one cache never mix.
  tree_files.atomic_write(_path(directory, name, problems, key), buffer.getvalue())


def gather(directories, name: str, problems: str) -> list[Entry]:
  """Every entry of ``name`` on the same test problems in ``directories``, whatever its key.

  The listing is process 0's, so every process reads the same entries.
  """
  found = []
  for directory in directories:
    listing = b""
    if distributed.is_writer() and os.path.isdir(directory):
      prefix = f"{_safe(name)}-{problems}-"
      files = [f for f in sorted(os.listdir(directory)) if f.startswith(prefix)]
      listing = "\n".join(f for f in files if f.endswith(".npz")).encode()
    listing = distributed.broadcast_bytes(listing) if jax.process_count() > 1 else listing
    for file in filter(None, listing.decode().split("\n")):
      data = distributed.read_on_writer(os.path.join(directory, file))
      entry = None if data is None else _decode(data)
      if entry is not None:
        found.append(entry)
  return found
