"""Tiny MNIST data sets in the real IDX format, written by the tests themselves."""

import gzip
import os

import numpy as np

STEMS = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
  """The IDX encoding of a uint8 array: magic 0x0000080N, big-endian dims, then the data."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + array.tobytes()


def write_idx(path: str, array: np.ndarray, gz: bool = False) -> str:
  path = path + ".gz" if gz else path
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(idx_bytes(array))
  return path


def tiny_split(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``(images (num, 28, 28) uint8, labels (num,) uint8)`` of random pixels and labels."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (num, 28, 28), np.uint8), (np.arange(num) % 10).astype(np.uint8)


def write_mnist(directory: str, sizes=(("train", 12), ("test", 5)), gz: bool = False) -> dict:
  """Writes the four MNIST files into ``directory``; returns ``{split: (images, labels)}``."""
  os.makedirs(directory, exist_ok=True)
  data = {}
  for seed, (split, num) in enumerate(sizes):
    images, labels = tiny_split(num, seed)
    image_stem, label_stem = STEMS[split]
    write_idx(os.path.join(directory, image_stem), images, gz)
    write_idx(os.path.join(directory, label_stem), labels, gz)
    data[split] = (images, labels)
  return data
