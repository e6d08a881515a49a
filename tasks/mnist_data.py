"""MNIST, offline: a prepared TFDS data set or the four published IDX files, kept on the device.

Nothing here downloads. ``load`` reads, in this order:

1. the IDX files in ``mnist_dir`` (argument) or ``$MNIST_DIR``, when one is named;
2. a prepared TFDS ``mnist`` in the TFDS data directory (``data_dir`` or ``$TFDS_DATA_DIR``,
   default ``~/tensorflow_datasets``), read with ``tfds.data_source`` (no TensorFlow needed).

The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``). Images stay uint8 on the device
(47 MB for the training split); the loss gathers a minibatch by index and scales it to [0, 1].
"""

import functools
import gzip
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ENV_VAR = "MNIST_DIR"
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
SPLITS = ("train", "test")
_FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8}  # MNIST uses only unsigned bytes.
_FIX = (
  "Put the four MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
  "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz) there, or name another "
  f"directory with mnist_dir=... or ${ENV_VAR}."
)


class Split(NamedTuple):
  """One split of MNIST as device arrays."""

  images: jax.Array  # (examples, 28, 28) uint8
  labels: jax.Array  # (examples,) int32 in [0, 10)


class MnistError(ValueError):
  """A missing or malformed MNIST file; the message names the file and the fix."""


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (gzipped when ``path`` ends in ``.gz``) and checks its header.

  The header is two zero bytes, a type byte (0x08: uint8), the number of dimensions, then each
  dimension as a big-endian uint32 (http://yann.lecun.com/exdb/mnist/).

  Raises:
    MnistError: bad magic number, unsupported type, or a size that disagrees with the header.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:  # gzip raises these for truncated or non-gzip files.
    raise MnistError(f"Cannot read {path}: {e}. The file is damaged; replace it.") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise MnistError(
      f"{path} is not an IDX file (magic number {data[:4].hex() or 'missing'}, expected "
      "0000080N). Replace it with the published MNIST file."
    )
  type_code, ndim = data[2], data[3]
  if type_code not in _IDX_DTYPES:
    raise MnistError(f"{path} holds IDX type 0x{type_code:02x}; MNIST files hold uint8 (0x08).")
  header = 4 + 4 * ndim
  if len(data) < header:
    raise MnistError(f"{path} is truncated inside its header; replace it.")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  expected = header + int(np.prod(shape, dtype=np.int64))
  if len(data) != expected:
    raise MnistError(
      f"{path} has {len(data)} bytes but its header {shape} implies {expected}; the file is "
      "truncated or damaged. Replace it with the published MNIST file."
    )
  return np.frombuffer(data, _IDX_DTYPES[type_code], offset=header).reshape(shape)


def _find(directory: str, stem: str) -> str:
  for name in (stem, stem + ".gz"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  raise MnistError(f"MNIST file {stem}[.gz] is missing from {directory!r}. {_FIX}")


def check_split(images: np.ndarray, labels: np.ndarray, where: str) -> None:
  """Checks shapes, agreement of counts and the label range; ``where`` names the source."""
  if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
    raise MnistError(f"{where}: images are shaped {images.shape}, expected (n, 28, 28).")
  if labels.shape != (images.shape[0],):
    raise MnistError(
      f"{where}: {images.shape[0]} images but labels shaped {labels.shape}; the image and "
      "label files belong to different splits or one is damaged."
    )
  if images.shape[0] == 0:
    raise MnistError(f"{where}: the split is empty.")
  if labels.max() >= NUM_CLASSES:
    raise MnistError(f"{where}: label {int(labels.max())} is out of range [0, {NUM_CLASSES}).")


def read_idx_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """``(images (n, 28, 28) uint8, labels (n,) uint8)`` of one split from IDX files."""
  if not os.path.isdir(directory):
    raise MnistError(f"MNIST directory {directory!r} does not exist. {_FIX}")
  image_file, label_file = (_find(directory, stem) for stem in _FILES[split])
  images, labels = read_idx(image_file), read_idx(label_file)
  check_split(images, labels, f"{image_file} / {label_file}")
  return images, labels


def tfds_prepared(data_dir: str | None = None) -> bool:
  """Whether a prepared TFDS ``mnist`` exists in ``data_dir`` (never downloads)."""
  import tensorflow_datasets as tfds  # Deferred: only this path needs it.

  return tfds.builder("mnist", data_dir=data_dir).is_prepared()


def read_tfds_split(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One split of a prepared TFDS ``mnist`` through ``tfds.data_source`` (array_record)."""
  import tensorflow_datasets as tfds

  try:
    source = tfds.data_source("mnist", split=split, data_dir=data_dir, download=False)
    records = [source[i] for i in range(len(source))]
  except Exception as e:
    raise MnistError(
      f"The TFDS mnist in {data_dir or 'the default TFDS data directory'} cannot be read with "
      f"tfds.data_source ({e}); it must be prepared in the array_record format. Or use the IDX "
      f"files: {_FIX}"
    ) from e
  images = np.stack([np.asarray(r["image"], np.uint8).reshape(IMAGE_SHAPE) for r in records])
  labels = np.asarray([r["label"] for r in records], np.int64)
  check_split(images, labels, f"TFDS mnist split {split!r} in {data_dir or 'default data dir'}")
  return images, labels.astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _load_cached(split: str, source: str, location: str | None) -> Split:
  if source == "idx":
    images, labels = read_idx_split(location, split)
  else:
    images, labels = read_tfds_split(split, location)
  # One device copy per (split, source, directory): every task built on it shares the buffers.
  return Split(jnp.asarray(images, jnp.uint8), jnp.asarray(labels, jnp.int32))


def load(split: str = "train", mnist_dir: str | None = None, data_dir: str | None = None) -> Split:
  """One split of MNIST as device arrays, read once per process and cached.

  Args:
    split: ``"train"`` (60000 examples) or ``"test"`` (10000).
    mnist_dir: directory of the IDX files; default ``$MNIST_DIR``.
    data_dir: TFDS data directory, used when no IDX directory is named.

  Returns:
    ``Split(images (n, 28, 28) uint8, labels (n,) int32)``.

  Example:
    >>> train = load("train", mnist_dir="../shared/data/mnist")
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown MNIST split {split!r}; choose one of {SPLITS}.")
  mnist_dir = mnist_dir or os.environ.get(ENV_VAR) or None
  if mnist_dir:
    return _load_cached(split, "idx", os.path.abspath(mnist_dir))
  if tfds_prepared(data_dir):
    return _load_cached(split, "tfds", data_dir)
  raise MnistError(
    "No MNIST found: no IDX directory was named (mnist_dir=... or $MNIST_DIR) and the TFDS "
    f"data directory ({data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'}) "
    "holds no prepared mnist. Nothing is downloaded at run time. " + _FIX
  )
