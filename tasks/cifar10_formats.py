"""CIFAR-10's three on-disk formats, read into numpy: image folders, binary batches, TFDS.

Each reader returns one split as ``(images (n, 32, 32, 3) uint8, labels (n,) uint8)`` and raises
``Cifar10Error`` naming the file at fault. Choosing among them, caching and the device copy are
``tasks.cifar10_data``'s job.

1. Image folders (the common "image folder" convention): ``<split>/<class>/<image>`` in a
   directory or in a .zip, with the ten class folders named as ``CLASSES``; any format PIL reads
   (PNG, JPEG, ...), 32 x 32, converted to RGB.
2. The official binary batches (https://www.cs.toronto.edu/~kriz/cifar.html): records of 1 label
   byte and 3072 pixel bytes, channel-major (3, 32, 32).
3. A prepared TFDS ``cifar10``, read with ``tfds.data_source`` (array_record; no TensorFlow).
"""

import io
import os
import zipfile
from collections.abc import Callable

import numpy as np

CLASSES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)  # in label order (also alphabetical, so sorted folder names give the same labels)
NUM_CLASSES = len(CLASSES)
IMAGE_SHAPE = (32, 32, 3)
SPLITS = ("train", "test")
BINARY_SUBDIR = "cifar-10-batches-bin"
BINARY_FILES = {
  "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
  "test": ("test_batch.bin",),
}
RECORD_BYTES = 1 + 3 * 32 * 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


class Cifar10Error(ValueError):
  """A missing or malformed CIFAR-10 source; the message names the path and the fix."""


def check_split(images: np.ndarray, labels: np.ndarray, where: str) -> None:
  """Checks shapes, agreement of counts and the label range; ``where`` names the source."""
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise Cifar10Error(f"{where}: images are shaped {images.shape}, expected (n, 32, 32, 3).")
  if labels.shape != (images.shape[0],):
    raise Cifar10Error(f"{where}: {images.shape[0]} images but labels shaped {labels.shape}.")
  if images.shape[0] == 0:
    raise Cifar10Error(f"{where}: the split is empty.")
  if labels.max() >= NUM_CLASSES:
    raise Cifar10Error(f"{where}: label {int(labels.max())} is out of range [0, {NUM_CLASSES}).")


# ---- 1. Image folders -------------------------------------------------------------------------


def decode_image(raw: bytes, name: str) -> np.ndarray:
  """One encoded image as (32, 32, 3) uint8 RGB; ``name`` says where it came from in errors."""
  from PIL import Image, UnidentifiedImageError  # Deferred: only image folders need PIL.

  try:
    with Image.open(io.BytesIO(raw)) as image:
      image.load()
      pixels = np.asarray(image.convert("RGB"), np.uint8)
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    raise Cifar10Error(f"Cannot decode image {name}: {e}. The file is corrupt; replace it.") from e
  if pixels.shape != IMAGE_SHAPE:
    raise Cifar10Error(
      f"Image {name} is {pixels.shape[1]} x {pixels.shape[0]} pixels; CIFAR-10 images are "
      "32 x 32. Resize the data set or point at the CIFAR-10 files."
    )
  return pixels


def _members(relative_paths, where: str) -> list[tuple[int, str]]:
  """``(label, path)`` of every image under ``<class>/``, sorted by label then path.

  Raises:
    Cifar10Error: an unknown class folder, a class without images, or images outside a folder.
  """
  members, seen = [], set()
  for path in relative_paths:
    parts = path.split("/")
    if not path.lower().endswith(IMAGE_SUFFIXES) or any(p.startswith(".") for p in parts):
      continue
    if len(parts) != 2 or parts[0] not in CLASSES:
      raise Cifar10Error(
        f"{where} holds {path!r}, which is not <class>/<image> with a class among {CLASSES}."
      )
    members.append((CLASSES.index(parts[0]), path))
    seen.add(parts[0])
  missing = [c for c in CLASSES if c not in seen]
  if missing:
    raise Cifar10Error(f"{where} has no images of class(es) {missing}; expected all of {CLASSES}.")
  return sorted(members)


def _decode_all(members, read: Callable[[str], bytes], where: str):
  images = np.empty((len(members), *IMAGE_SHAPE), np.uint8)
  for i, (_, path) in enumerate(members):
    images[i] = decode_image(read(path), f"{where}/{path}")
  return images, np.asarray([label for label, _ in members], np.uint8)


def read_image_dir(directory: str) -> tuple[np.ndarray, np.ndarray]:
  """One split from ``directory/<class>/<image>``: (images (n, 32, 32, 3), labels (n,)) uint8."""
  paths = []
  for parent, _, files in os.walk(directory):
    rel = os.path.relpath(parent, directory).replace(os.sep, "/")
    paths += [name if rel == "." else f"{rel}/{name}" for name in files]

  def read(path):
    with open(os.path.join(directory, path), "rb") as f:
      return f.read()

  return _decode_all(_members(paths, directory), read, directory)


def read_image_zip(path: str, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
  """One split from the members ``<prefix><class>/<image>`` of the zip file ``path``."""
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise Cifar10Error(f"Cannot open {path} as a zip file ({e}); replace it.") from e
  with archive:
    names = [n[len(prefix) :] for n in archive.namelist() if n.startswith(prefix)]
    names = [n for n in names if not n.endswith("/")]
    where = f"{path}:{prefix}".rstrip("/:")

    def read(name):
      try:
        return archive.read(prefix + name)
      except (zipfile.BadZipFile, OSError) as e:  # A bad CRC or a damaged member.
        raise Cifar10Error(f"Cannot read {path}:{prefix}{name} ({e}); replace the zip.") from e

    return _decode_all(_members(names, where), read, where)


def zip_prefix(path: str, split: str) -> str | None:
  """The folder of ``split``'s class folders inside a zip: ``"<split>/"``, ``""`` or None.

  ``""`` (class folders at the top) only when the zip is named after the split, ``<split>.zip``.
  """
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
  except (zipfile.BadZipFile, OSError) as e:
    raise Cifar10Error(f"Cannot open {path} as a zip file ({e}); replace it.") from e
  if any(n.startswith(f"{split}/") for n in names):
    return f"{split}/"
  if os.path.basename(path) == f"{split}.zip" and any(n.split("/")[0] in CLASSES for n in names):
    return ""
  return None


# ---- 2. Binary batches ------------------------------------------------------------------------


def read_binary_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """One binary batch: (images (n, 32, 32, 3), labels (n,)) uint8, pixels made channel-last.

  Raises:
    Cifar10Error: a size that is not a whole number of 3073-byte records (a truncated file).
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise Cifar10Error(f"Cannot read CIFAR-10 batch {path}: {e}.") from e
  if not data or len(data) % RECORD_BYTES:
    raise Cifar10Error(
      f"CIFAR-10 batch {path} has {len(data)} bytes, not a whole number of {RECORD_BYTES}-byte "
      "records (1 label byte + 3072 pixel bytes): the file is truncated or damaged. Replace it "
      "with the published file."
    )
  records = np.frombuffer(data, np.uint8).reshape(-1, RECORD_BYTES)
  images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  labels = records[:, 0].copy()
  check_split(images, labels, f"CIFAR-10 batch {path}")
  return np.ascontiguousarray(images), labels


def binary_dir(directory: str) -> str | None:
  """The directory holding the binary batches: ``directory`` or its ``cifar-10-batches-bin``."""
  names = BINARY_FILES["train"][:1] + BINARY_FILES["test"]
  for candidate in (directory, os.path.join(directory, BINARY_SUBDIR)):
    if any(os.path.isfile(os.path.join(candidate, n)) for n in names):
      return candidate
  return None


def read_binary_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """``split`` from the batches in ``directory``: all five training batches, or the test one."""
  parts = []
  for name in BINARY_FILES[split]:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise Cifar10Error(
        f"CIFAR-10 batch {name} is missing from {directory!r}, which holds other batches; "
        f"the binary layout needs {BINARY_FILES['train'] + BINARY_FILES['test']}."
      )
    parts.append(read_binary_batch(path))
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---- 3. TFDS ----------------------------------------------------------------------------------


def tfds_dataset_dir(data_dir: str | None = None) -> str | None:
  """The directory of a prepared TFDS ``cifar10`` in ``data_dir``, or None (never downloads)."""
  import tensorflow_datasets as tfds  # Deferred: only this path needs it.

  builder = tfds.builder("cifar10", data_dir=data_dir)
  return str(builder.data_dir) if builder.is_prepared() else None


def read_tfds_split(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One split of a prepared TFDS ``cifar10`` through ``tfds.data_source`` (array_record)."""
  import tensorflow_datasets as tfds

  try:
    source = tfds.data_source("cifar10", split=split, data_dir=data_dir, download=False)
    records = [source[i] for i in range(len(source))]
  except Exception as e:
    raise Cifar10Error(
      f"The TFDS cifar10 in {data_dir or 'the default TFDS data directory'} cannot be read with "
      f"tfds.data_source ({e}); it must be prepared in the array_record format."
    ) from e
  if not records:
    raise Cifar10Error(
      f"The TFDS cifar10 split {split!r} in {data_dir} is empty; prepare it again."
    )
  images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
  labels = np.asarray([r["label"] for r in records], np.int64)
  check_split(images, labels, f"TFDS cifar10 split {split!r} in {data_dir or 'default data dir'}")
  return images, labels.astype(np.uint8)
