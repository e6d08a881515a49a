"""MNIST and CIFAR-10 at other resolutions and in grey or colour, for the task mixture.

The images come from the existing offline loaders (``tasks.mnist_data``, ``tasks.cifar10_data``)
and are resized and greyscaled once, on load, on the host; the result stays uint8 on the device
with its per-channel mean and standard deviation, so a loss standardizes a gathered minibatch
without a pass over the data set. Tests pass small arrays in the loaders' layout to ``prepare``.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasks import cifar10_data, mnist_data

DATASETS = ("mnist", "cifar10")
NUM_CLASSES = 10
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B in grey
_CHUNK = 8192  # images resized per call, which bounds the float32 copy in memory


class ImageSplit(NamedTuple):
  """Images of one size and colour mode as device arrays, with their channel statistics."""

  images: jax.Array  # (examples, size, size, channels) uint8
  labels: jax.Array  # (examples,) int32 in [0, 10)
  mean: jax.Array  # (channels,) float32, of the pixels on the [0, 1] scale
  std: jax.Array  # (channels,) float32


def resize(images: np.ndarray, size: int, grey: bool) -> np.ndarray:
  """uint8 images (n, h, w) or (n, h, w, c) to (n, size, size, 1 if grey else c), uint8.

  Resizing is bilinear with antialiasing (an area average when shrinking); grey is BT.601 luma of
  colour images, and grey images stay grey (``grey=False`` on MNIST keeps its one channel).
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  out = []
  for start in range(0, images.shape[0], _CHUNK):
    x = jnp.asarray(images[start : start + _CHUNK], jnp.float32)
    if grey and x.shape[-1] == 3:
      x = x @ jnp.asarray(LUMA, jnp.float32)[:, None]
    if x.shape[1:3] != (size, size):
      shape = (x.shape[0], size, size, x.shape[-1])
      x = jax.image.resize(x, shape, method="linear", antialias=True)
    out.append(np.asarray(jnp.clip(jnp.round(x), 0, 255)).astype(np.uint8))
  return np.concatenate(out) if out else np.zeros((0, size, size, 1), np.uint8)


def prepare(images: np.ndarray, labels: np.ndarray, size: int, grey: bool) -> ImageSplit:
  """An ``ImageSplit`` from a loader's uint8 images and labels, resized and greyscaled.

  Example:
    >>> split = prepare(np.zeros((4, 28, 28), np.uint8), np.arange(4), size=8, grey=True)
    >>> split.images.shape
    (4, 8, 8, 1)
  """
  if size <= 0:
    raise ValueError(f"Image size must be positive, got {size}; e.g. 8, 16 or 28.")
  small = resize(images, size, grey)
  pixels = small.reshape(-1, small.shape[-1]).astype(np.float64) / 255.0
  mean = pixels.mean(axis=0) if pixels.size else np.zeros(small.shape[-1])
  std = pixels.std(axis=0) if pixels.size else np.ones(small.shape[-1])
  return ImageSplit(
    jnp.asarray(small, jnp.uint8),
    jnp.asarray(np.asarray(labels), jnp.int32),
    jnp.asarray(mean, jnp.float32),
    jnp.asarray(np.maximum(std, 1e-3), jnp.float32),
  )


def raw(dataset: str, split: str, data_dir: str | None = None, **kwargs):
  """``(images, labels)`` of ``dataset`` from its offline loader, as numpy arrays.

  Args:
    dataset: ``"mnist"`` (images (n, 28, 28)) or ``"cifar10"`` (images (n, 32, 32, 3)).
    data_dir: the loader's directory (``mnist_dir`` or ``cifar10_dir``); default its env var.
    **kwargs: the loader's other arguments (``data_dir`` for TFDS, ``cache_dir`` for CIFAR-10).
  """
  if dataset == "mnist":
    loaded = mnist_data.load(split, data_dir, **kwargs)
  elif dataset == "cifar10":
    loaded = cifar10_data.load(split, data_dir, **kwargs)
  else:
    raise ValueError(f"Unknown image data set {dataset!r}; choose one of {DATASETS}.")
  return np.asarray(loaded.images), np.asarray(loaded.labels)


@functools.lru_cache(maxsize=16)
def load(dataset: str, split: str, size: int, grey: bool, data_dir: str | None = None):
  """``prepare(*raw(dataset, split, data_dir), size, grey)``, once per process per argument set.

  Example:
    >>> mnist8 = load("mnist", "train", 8, True, "../shared/data/mnist")
  """
  return prepare(*raw(dataset, split, data_dir), size, grey)


def first(data: ImageSplit, count: int) -> ImageSplit:
  """The first ``count`` examples of ``data``, with their own channel statistics."""
  pixels = data.images[:count].astype(jnp.float32).reshape(-1, data.images.shape[-1]) / 255.0
  return ImageSplit(
    data.images[:count],
    data.labels[:count],
    jnp.mean(pixels, axis=0),
    jnp.maximum(jnp.std(pixels, axis=0), 1e-3),
  )


def standardized(data: ImageSplit, index: jax.Array) -> jax.Array:
  """The examples at ``index`` (batch,) as float32 (batch, size, size, channels), standardized."""
  x = data.images[index].astype(jnp.float32) / 255.0
  return (x - data.mean) / data.std
