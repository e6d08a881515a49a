"""Content and style images for neural art (section 3.4), offline, in disjoint splits.

The paper used 1800 training, 20 validation and 100 test content images from ImageNet. Offline
sources here (``contents`` argument of ``content_pool``):

* ``"cifar10"``: CIFAR-10 images (``tasks.cifar10_data``; ``../shared/data/cifar10`` or
  ``$CIFAR10_DIR``), upsampled from 32 x 32. Training contents come from CIFAR-10's training
  split, validation and test contents from its test split, so they are disjoint by
  construction; each is a fixed seeded draw (``SPLIT_SIZES``).
* ``"skimage"``: the colour photos shipped inside scikit-image (``pip install scikit-image``),
  all in the test split (there are only ``len(SKIMAGE_PHOTOS)``); for showing styled photos.
* a directory of the user's own images (any format Pillow reads): sorted by name, shuffled with
  a fixed seed, then the first ``num_test`` are test, the next ``num_valid`` validation and the
  rest training.

Every image is centre-cropped to a square and resized to the task's resolution with Pillow
(bicubic). Style images are a scikit-image photo name (``SKIMAGE_STYLES``) or an image file.
"""

import functools
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

SPLITS = ("train", "valid", "test")
# The paper's split sizes (section 3.4).
SPLIT_SIZES = {"train": 1800, "valid": 20, "test": 100}
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SKIMAGE_STYLES = ("immunohistochemistry", "hubble_deep_field", "retina", *SKIMAGE_PHOTOS)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
SEED = 2016


class ImagesError(FileNotFoundError):
  """Content or style images are missing or unreadable; the message says what to do."""


def square(image: np.ndarray, size: int) -> np.ndarray:
  """Centre-crops an image (h, w[, channels]) to a square and resizes it: (size, size, 3) uint8."""
  pil = Image.fromarray(np.asarray(image)).convert("RGB")
  side = min(pil.size)
  left, top = (pil.size[0] - side) // 2, (pil.size[1] - side) // 2
  pil = pil.crop((left, top, left + side, top + side))
  return np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC), np.uint8)


def _skimage_data():
  try:
    import skimage.data
  except ImportError as e:
    raise ImagesError(
      "scikit-image photos need scikit-image: `pip install scikit-image` (or "
      "`pip install -e .[art]`), or name a directory or file of your own images."
    ) from e
  return skimage.data


def skimage_photo(name: str) -> np.ndarray:
  """A colour photo shipped inside scikit-image, e.g. ``"astronaut"``: (h, w, 3) uint8."""
  if name not in SKIMAGE_STYLES:
    raise ValueError(f"Unknown scikit-image photo {name!r}; choose one of {SKIMAGE_STYLES}.")
  return np.asarray(getattr(_skimage_data(), name)())


def read_image(path: str) -> np.ndarray:
  """An image file as (h, w, 3) uint8 RGB."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"), np.uint8)
  except OSError as e:
    raise ImagesError(f"Cannot read image {path!r} ({e}); name a PNG, JPEG or other image.") from e


def style_image(style: str, size: int) -> np.ndarray:
  """The style image (size, size, 3) uint8: a scikit-image photo name or an image file path."""
  if style in SKIMAGE_STYLES:
    return square(skimage_photo(style), size)
  path = os.path.abspath(os.path.expanduser(style))
  if not os.path.isfile(path):
    raise ImagesError(
      f"Style {style!r} is neither a scikit-image photo ({', '.join(SKIMAGE_STYLES)}; needs "
      "`pip install scikit-image`) nor an image file."
    )
  return square(read_image(path), size)


def image_files(directory: str) -> list[str]:
  """Image files directly in ``directory``, sorted by name (hidden files skipped)."""
  if not os.path.isdir(directory):
    raise ImagesError(f"Content image directory {directory!r} does not exist.")
  files = sorted(
    os.path.join(directory, name)
    for name in os.listdir(directory)
    if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)
  )
  if not files:
    raise ImagesError(
      f"Content image directory {directory!r} holds no images ({', '.join(IMAGE_SUFFIXES)})."
    )
  return files


def split_indices(num: int, split: str, num_valid: int, num_test: int) -> np.ndarray:
  """Indices of ``split`` among ``num`` items: a seeded shuffle, test first, then valid, train."""
  order = np.random.default_rng(SEED).permutation(num)
  bounds = {"test": (0, num_test), "valid": (num_test, num_test + num_valid)}
  start, stop = bounds.get(split, (num_test + num_valid, num))
  if stop > num or start >= stop:
    raise ImagesError(
      f"{num} images cannot give a {split} split after {num_test} test and {num_valid} "
      "validation images; add images or lower num_test / num_valid."
    )
  return order[start:stop]


def _cifar10_split(split: str, count: int, cifar10_dir: str | None, cache_dir: str | None):
  from tasks import cifar10_data

  try:
    source = cifar10_data.find_source(cifar10_dir)
  except cifar10_data.Cifar10Error as e:
    raise ImagesError(f"CIFAR-10 content images: {e}") from e
  images, _ = cifar10_data.read_split(source, "train" if split == "train" else "test", cache_dir)
  order = np.random.default_rng(SEED).permutation(images.shape[0])
  # Validation and test come from CIFAR-10's test split: valid first, test after, disjoint.
  start = SPLIT_SIZES["valid"] if split == "test" else 0
  return images[order[start : start + count]]


@functools.lru_cache(maxsize=8)
def content_pool(
  contents: str,
  split: str,
  size: int,
  num: int | None = None,
  cifar10_dir: str | None = None,
  cache_dir: str | None = None,
) -> np.ndarray:
  """The content images of a split as (n, size, size, 3) uint8, fixed for given arguments.

  Args:
    contents: ``"cifar10"``, ``"skimage"`` or a directory of images.
    split: ``"train"``, ``"valid"`` or ``"test"``.
    size: side in pixels (64 for training, 128 for the paper's double-resolution test).
    num: images to keep (the first ``num`` of the split); None: ``SPLIT_SIZES[split]`` for
      CIFAR-10, all of the split otherwise. For a directory, ``num`` of the valid and test
      splits sets their sizes (default 20 and 100, or fewer for a small directory).

  Raises:
    ImagesError: no such source, no images, or too few for the split.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown content split {split!r}; choose one of {SPLITS}.")
  if contents == "cifar10":
    count = num or SPLIT_SIZES[split]
    if count > (50000 if split == "train" else 10000 - SPLIT_SIZES["valid"]):
      raise ImagesError(f"CIFAR-10 has too few images for {count} {split} contents.")
    images = [square(image, size) for image in _cifar10_split(split, count, cifar10_dir, cache_dir)]
  elif contents == "skimage":
    if split != "test":
      raise ImagesError(
        f"The {len(SKIMAGE_PHOTOS)} scikit-image photos are test contents only; train on "
        "contents='cifar10' or a directory of your own images."
      )
    images = [square(skimage_photo(name), size) for name in SKIMAGE_PHOTOS[:num]]
  else:
    files = image_files(os.path.abspath(os.path.expanduser(contents)))
    num_valid = min(SPLIT_SIZES["valid"], max(1, len(files) // 10))
    num_test = min(SPLIT_SIZES["test"], max(1, len(files) // 5))
    if split == "valid" and num:
      num_valid = num
    if split == "test" and num:
      num_test = num
    chosen = split_indices(len(files), split, num_valid, num_test)
    if split == "train" and num:
      chosen = chosen[:num]
    images = [square(read_image(files[i]), size) for i in chosen]
  return np.stack(images).astype(np.uint8)


def check_disjoint(pools: Sequence[np.ndarray]) -> bool:
  """Whether no image appears (pixel for pixel) in two of ``pools``."""
  seen = set()
  for pool in pools:
    keys = {image.tobytes() for image in pool}
    if keys & seen:
      return False
    seen |= keys
  return True
