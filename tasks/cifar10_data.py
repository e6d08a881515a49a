"""CIFAR-10, offline: image folders, the binary batches or a prepared TFDS set, kept on the device.

Nothing here downloads. ``load`` reads, in this order:

1. the path named by ``cifar10_dir`` (argument) or ``$CIFAR10_DIR``, in one of two layouts
   (``tasks.cifar10_formats`` reads them): image folders (``train/<class>/<image>`` and
   ``test/...`` in a directory, in ``train.zip`` and ``test.zip`` beside each other as in
   ``../shared/data/cifar10``, or in one .zip named directly), or the official binary batches
   (``data_batch_1.bin`` ... ``data_batch_5.bin``, ``test_batch.bin``, optionally inside
   ``cifar-10-batches-bin/``);
2. a prepared TFDS ``cifar10`` in the TFDS data directory (``data_dir`` or ``$TFDS_DATA_DIR``).

Decoding 50000 images takes seconds, so decoded image folders and TFDS splits are cached as .npz
files in ``cache_dir`` (default ``$LEARNED_OPT_CACHE`` or ``~/.cache/learned_opt``), keyed by the
source's path, sizes and modification times; the source itself is never written to. Images stay
uint8 on the device (150 MB for the training split); the loss gathers a minibatch by index.
"""

import functools
import hashlib
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasks import cifar10_formats as formats
from tasks.cifar10_formats import CLASSES, NUM_CLASSES, SPLITS, Cifar10Error

ENV_VAR = "CIFAR10_DIR"
CACHE_ENV_VAR = "LEARNED_OPT_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "learned_opt")
LAYOUTS = (
  "CIFAR-10 is read from one of three layouts: (1) image folders, <dir>/train/<class>/<image> "
  "and <dir>/test/<class>/<image> (PNG, JPEG, ...), the same inside <dir>/train.zip and "
  "<dir>/test.zip, or one .zip holding train/<class>/... and test/<class>/..., with class "
  f"folders {', '.join(CLASSES)}; (2) the official binary batches data_batch_1.bin ... "
  "data_batch_5.bin and test_batch.bin in <dir> or <dir>/cifar-10-batches-bin/; (3) a prepared "
  "TFDS cifar10 in the TFDS data directory (tfds_data_dir=... or $TFDS_DATA_DIR), used when no "
  f"directory is named. Name the directory with cifar10_dir=... or ${ENV_VAR}."
)


class Split(NamedTuple):
  """One split of CIFAR-10 (or of a class subset of it) as device arrays."""

  images: jax.Array  # (examples, 32, 32, 3) uint8
  labels: jax.Array  # (examples,) int32 in [0, classes)


class Source(NamedTuple):
  """Where a split comes from: ``kind`` is "images", "binary" or "tfds"."""

  kind: str
  location: str | None  # image-folder root (directory or .zip), batches directory, TFDS data dir


def find_source(cifar10_dir: str | None = None, data_dir: str | None = None) -> Source:
  """The source ``load`` reads: the named path (argument, else ``$CIFAR10_DIR``), else TFDS.

  Raises:
    Cifar10Error: the named path is missing or in no known layout, or nothing is named and no
      TFDS cifar10 is prepared; the message lists the accepted layouts.
  """
  path = cifar10_dir or os.environ.get(ENV_VAR) or None
  if path:
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path) and path.endswith(".zip"):
      return Source("images", path)
    if not os.path.isdir(path):
      raise Cifar10Error(f"CIFAR-10 path {path!r} is not a directory or a .zip file. {LAYOUTS}")
    batches = formats.binary_dir(path)
    if batches:
      return Source("binary", batches)
    if any(os.path.exists(os.path.join(path, s + e)) for s in SPLITS for e in ("", ".zip")):
      return Source("images", path)
    raise Cifar10Error(f"CIFAR-10 directory {path!r} holds none of the layouts. {LAYOUTS}")
  if formats.tfds_dataset_dir(data_dir):
    return Source("tfds", data_dir)
  raise Cifar10Error(
    "No CIFAR-10 found: no directory was named (cifar10_dir=... or $CIFAR10_DIR) and the TFDS "
    f"data directory ({data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'}) "
    f"holds no prepared cifar10. Nothing is downloaded at run time. {LAYOUTS}"
  )


def image_split_path(root: str, split: str) -> tuple[str, str | None]:
  """``(path, zip prefix)`` of a split's class folders; the prefix is None for a directory.

  ``root`` is a .zip (holding ``<split>/<class>/...``) or a directory holding ``<split>/`` or
  ``<split>.zip``.
  """
  if os.path.isdir(os.path.join(root, split)):
    return os.path.join(root, split), None
  archive = root if os.path.isfile(root) else os.path.join(root, f"{split}.zip")
  prefix = formats.zip_prefix(archive, split) if os.path.isfile(archive) else None
  if prefix is None:
    raise Cifar10Error(
      f"{root!r} has no {split} images: neither {split}/<class>/<image> nor {split}.zip. {LAYOUTS}"
    )
  return archive, prefix


def fingerprint(path: str) -> str:
  """Path, size and modification time of a file, or of every file below a directory."""
  stat = lambda p: f"{p}:{os.path.getsize(p)}:{os.stat(p).st_mtime_ns}"
  if os.path.isfile(path):
    return stat(path)
  files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
  return "\n".join(stat(p) for p in files)


def cache_dir_or_default(cache_dir: str | None = None) -> str:
  """``cache_dir``, else ``$LEARNED_OPT_CACHE``, else ``~/.cache/learned_opt``; absolute."""
  chosen = cache_dir or os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
  return os.path.abspath(os.path.expanduser(chosen))


def cache_file(cache_dir: str, split: str, key: str) -> str:
  """The .npz of one decoded split; ``key`` identifies the source and its file versions."""
  digest = hashlib.sha256(key.encode()).hexdigest()[:24]
  return os.path.join(cache_dir, "cifar10", f"{split}-{digest}.npz")


def _read_cache(path: str):
  try:
    with np.load(path) as saved:  # allow_pickle stays False: arrays only.
      images, labels = saved["images"], saved["labels"]
    formats.check_split(images, labels, path)
    return images, labels
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None  # Missing, partly written by a killed process, or stale: decode again.


def _write_cache(path: str, images: np.ndarray, labels: np.ndarray) -> None:
  temporary = f"{path}.{os.getpid()}.tmp"
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(temporary, "wb") as f:
      np.savez(f, images=images, labels=labels)
    os.replace(temporary, path)  # Atomic: a reader sees the old file or the whole new one.
  except OSError as e:
    if os.path.exists(temporary):
      os.remove(temporary)
    warnings.warn(
      f"Cannot write the CIFAR-10 cache {path} ({e}); the images will be decoded again next "
      f"time. Name a writable cache directory with cache_dir=... or ${CACHE_ENV_VAR}.",
      stacklevel=3,
    )


def _decoder(source: Source, split: str) -> tuple[str, str, Callable[[], tuple]]:
  """``(path read, cache key prefix, decode thunk)`` of an image-folder or TFDS split."""
  if source.kind == "images":
    path, prefix = image_split_path(source.location, split)
    if prefix is None:
      return path, f"images\n{path}", functools.partial(formats.read_image_dir, path)
    return path, f"zip\n{path}:{prefix}", functools.partial(formats.read_image_zip, path, prefix)
  path = formats.tfds_dataset_dir(source.location)
  return (
    path,
    f"tfds\n{path}:{split}",
    functools.partial(formats.read_tfds_split, split, source.location),
  )


def read_split(source: Source, split: str, cache_dir: str | None = None):
  """One split as numpy ``(images (n, 32, 32, 3) uint8, labels (n,) uint8)``.

  Binary batches are read directly (a copy of bytes); decoded image folders and TFDS splits go
  through the .npz cache in ``cache_dir_or_default(cache_dir)``.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown CIFAR-10 split {split!r}; choose one of {SPLITS}.")
  if source.kind == "binary":
    return formats.read_binary_split(source.location, split)
  path, key, decode = _decoder(source, split)
  directory = cache_dir_or_default(cache_dir)
  # Cache files inside a source directory would change its fingerprint (and dirty the source).
  if os.path.isdir(path) and os.path.commonpath([directory, path]) == path:
    raise ValueError(
      f"The CIFAR-10 cache directory {directory!r} lies inside the data source {path!r}; "
      f"name another with cache_dir=... or ${CACHE_ENV_VAR}."
    )
  cached = cache_file(directory, split, f"{key}\n{fingerprint(path)}")
  arrays = _read_cache(cached)
  if arrays is None:
    arrays = decode()
    _write_cache(cached, *arrays)
  return arrays


def class_indices(classes: Sequence[int | str] | None) -> tuple[int, ...] | None:
  """Normalizes a class subset (labels or names) to labels; None (or all ten, in order) -> None.

  Raises:
    ValueError: unknown classes, repeats, or fewer than two classes.
  """
  if classes is None:
    return None
  labels = tuple(CLASSES.index(c) if c in CLASSES else c for c in classes)
  if any(not isinstance(c, int) or not 0 <= c < NUM_CLASSES for c in labels):
    raise ValueError(f"classes={list(classes)}: each must be a label in [0, 10) or in {CLASSES}.")
  if len(set(labels)) != len(labels) or len(labels) < 2:
    raise ValueError(f"classes={list(classes)} must name at least two distinct classes.")
  return None if labels == tuple(range(NUM_CLASSES)) else labels


def select_classes(images: np.ndarray, labels: np.ndarray, classes: Sequence[int]):
  """The examples of ``classes``, relabelled by position: ``classes[i]`` becomes label ``i``."""
  lookup = np.full(NUM_CLASSES, -1, np.int64)
  lookup[list(classes)] = np.arange(len(classes))
  new_labels = lookup[labels]
  keep = new_labels >= 0
  return images[keep], new_labels[keep].astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _load_cached(split: str, source: Source, cache_dir: str, classes) -> Split:
  images, labels = read_split(source, split, cache_dir)
  if classes is not None:
    images, labels = select_classes(images, labels, classes)
  # One device copy per (split, source, classes): every task built on it shares the buffers.
  return Split(jnp.asarray(images, jnp.uint8), jnp.asarray(labels, jnp.int32))


def load(
  split: str = "train",
  cifar10_dir: str | None = None,
  data_dir: str | None = None,
  cache_dir: str | None = None,
  classes: Sequence[int | str] | None = None,
) -> Split:
  """One split of CIFAR-10 as device arrays, read once per process and cached.

  Args:
    split: ``"train"`` (50000 examples) or ``"test"`` (10000).
    cifar10_dir: image-folder directory or .zip, or binary-batches directory; default
      ``$CIFAR10_DIR``.
    data_dir: TFDS data directory, used when no CIFAR-10 path is named.
    cache_dir: where decoded images are cached; default ``$LEARNED_OPT_CACHE`` or
      ``~/.cache/learned_opt``.
    classes: keep only these classes (labels or names), relabelled 0..k-1 in the given order.

  Returns:
    ``Split(images (n, 32, 32, 3) uint8, labels (n,) int32)``.

  Example:
    >>> train = load("train", cifar10_dir="../shared/data/cifar10", classes=[0, 1, 2, 3, 4])
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown CIFAR-10 split {split!r}; choose one of {SPLITS}.")
  source = find_source(cifar10_dir, data_dir)
  return _load_cached(split, source, cache_dir_or_default(cache_dir), class_indices(classes))
