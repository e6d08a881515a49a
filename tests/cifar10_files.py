"""Tiny CIFAR-10 data sets in the real formats (image folders, zips, binary batches), written by
the tests themselves."""

import io
import os
import zipfile

import numpy as np
from PIL import Image

from tasks.cifar10_formats import BINARY_FILES, CLASSES


def tiny_split(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``(images (10 * per_class, 32, 32, 3) uint8, labels uint8)``, sorted by label.

  Pixels are smooth gradients plus a class-dependent colour, so JPEG keeps them within a few
  levels and the classes can be told apart.
  """
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
  ramp = np.linspace(0, 96, 32)
  base = ramp[:, None, None] + ramp[None, :, None] + np.zeros((1, 1, 3))
  colour = rng.integers(0, 60, (len(labels), 1, 1, 3)) + 6 * labels[:, None, None, None]
  return np.clip(base[None] + colour, 0, 255).astype(np.uint8), labels


def encode(image: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def _member_names(labels: np.ndarray, fmt: str) -> list[str]:
  suffix = ".jpg" if fmt == "JPEG" else ".png"
  return [f"{CLASSES[label]}/{i:04d}{suffix}" for i, label in enumerate(labels)]


def write_image_dir(root: str, split: str, images, labels, fmt: str = "PNG") -> str:
  """Writes ``root/<split>/<class>/NNNN.png`` (or .jpg); returns the split's directory."""
  for name, image in zip(_member_names(labels, fmt), images, strict=True):
    path = os.path.join(root, split, *name.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(encode(image, fmt))
  return os.path.join(root, split)


def write_image_zip(path: str, splits: dict, fmt: str = "JPEG", prefix: bool = True) -> str:
  """A zip of ``<split>/<class>/NNNN.jpg`` members (without ``<split>/`` if not ``prefix``).

  ``splits`` maps a split name to ``(images, labels)``; directory entries are written too, as
  common zip tools do.
  """
  with zipfile.ZipFile(path, "w") as archive:
    for split, (images, labels) in splits.items():
      top = f"{split}/" if prefix else ""
      if top:
        archive.writestr(top, b"")
      for name, image in zip(_member_names(labels, fmt), images, strict=True):
        archive.writestr(top + name, encode(image, fmt))
  return path


def binary_batch_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
  """The official record format: a label byte, then the image channel-major (3, 32, 32)."""
  planes = np.asarray(images, np.uint8).transpose(0, 3, 1, 2).reshape(len(labels), -1)
  return np.concatenate([np.asarray(labels, np.uint8)[:, None], planes], axis=1).tobytes()


def write_binary(directory: str, train_per_batch: int = 2, test: int = 3) -> dict:
  """Writes the five training batches and the test batch; returns ``{split: (images, labels)}``.

  Each training batch holds ``train_per_batch`` random examples, the test batch ``test``.
  """
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(1)
  written = {"train": [], "test": []}
  for split, names in BINARY_FILES.items():
    for name in names:
      num = train_per_batch if split == "train" else test
      images = rng.integers(0, 256, (num, 32, 32, 3), np.uint8)
      labels = rng.integers(0, 10, num).astype(np.uint8)
      with open(os.path.join(directory, name), "wb") as f:
        f.write(binary_batch_bytes(images, labels))
      written[split].append((images, labels))
  return {
    s: tuple(np.concatenate(parts) for parts in zip(*w, strict=True)) for s, w in written.items()
  }
