"""A mixture of task families in shape buckets, for meta-training general optimizers.

Problems of different shapes cannot share one ``vmap``, so the mixture is a fixed, finite list
of *shape buckets*, each an ordinary ``TaskFamily`` whose problems all have the same shapes: a
quadratic, logistic regression, MLPs of 1 to 3 hidden layers of 8 to 256 units and small conv
nets, on MNIST and CIFAR-10 at 8 x 8, 16 x 16 and full size, grey or colour, with minibatches of
32 to 256. Inside a bucket, problems differ in theta_0, minibatches, the hidden activation
(sigmoid, tanh, relu or gelu, drawn per problem) and the task augmentation of ``tasks.augment``
(each parameter tensor rescaled by its own random factor).

A driver compiles one meta-step per bucket and picks the bucket of meta-step ``n`` with
``bucket_index(mixture, seed, n)``, a function of ``(seed, n)`` alone, so a resumed run draws
the same buckets. Compile time is bounded by ``len(mixture.buckets)`` compilations of the step
(each bucket's step compiles the first time the bucket is drawn, never again), whatever the run's
length; the default preset has 12 buckets, ``default_small_data`` 15 (three small data sets).

Example:
  >>> mix = mixture(mnist_dir="../shared/data/mnist", cifar10_dir="../shared/data/cifar10")
  >>> task = mix.buckets[bucket_index(mix, seed=0, step=7)]  # an ordinary TaskFamily
"""

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from tasks import augment, image_data, image_nets
from tasks.base import TaskFamily
from tasks.quadratic import quadratic

ALL_ACTIVATIONS = tuple(image_nets.ACTIVATIONS)
_SHORT = {"mnist": "mnist", "cifar10": "cifar"}  # in bucket names


class BucketSpec(NamedTuple):
  """One shape bucket: a family, its data variant and its sizes.

  Attributes:
    kind: ``"quadratic"``, ``"mlp"`` (``widths=()``: logistic regression) or ``"conv"``.
    dataset: ``"mnist"`` or ``"cifar10"``; None for the quadratic.
    size: image side in pixels after resizing.
    grey: greyscale the images (MNIST is grey either way).
    widths: hidden layer sizes (mlp), channels (conv) or ``(dim,)`` (quadratic).
    batch_size: examples per minibatch.
    examples: keep only the first ``examples`` training images (0: all): a small data set an
      optimizer can drive to near-zero training loss within a run (memorization).
  """

  kind: str
  dataset: str | None = None
  size: int = 0
  grey: bool = True
  widths: tuple[int, ...] = ()
  batch_size: int = 0
  examples: int = 0

  @property
  def name(self) -> str:
    """E.g. ``"quadratic_10"``, ``"logreg_mnist8g_b64"``, ``"mlp_cifar16c_16x16x16_b32"``."""
    if self.kind == "quadratic":
      return f"quadratic_{self.widths[0]}"
    kind = "logreg" if self.kind == "mlp" and not self.widths else self.kind
    data = f"{_SHORT[self.dataset]}{self.size}{'g' if self.grey else 'c'}"
    widths = "x".join(str(w) for w in self.widths)
    subset = f"n{self.examples}" if self.examples else ""
    return "_".join(p for p in (kind, data, widths, f"b{self.batch_size}", subset) if p)


def _mlp(dataset, size, grey, widths, batch_size, examples=0):
  return BucketSpec("mlp", dataset, size, grey, tuple(widths), batch_size, examples)


def _conv(dataset, size, grey, channels, batch_size):
  return BucketSpec("conv", dataset, size, grey, tuple(channels), batch_size)


DEFAULT = (
  BucketSpec("quadratic", widths=(10,)),
  _mlp("mnist", 8, True, (), 64),
  _mlp("cifar10", 8, False, (), 128),
  _mlp("mnist", 8, True, (32,), 128),
  _mlp("mnist", 8, True, (256,), 256),
  _mlp("mnist", 16, True, (64, 64), 64),
  _mlp("mnist", 28, True, (16,), 32),
  _mlp("cifar10", 8, True, (128,), 128),
  _mlp("cifar10", 16, False, (16, 16, 16), 32),
  _mlp("cifar10", 32, False, (8,), 64),
  _conv("mnist", 8, True, (8,), 64),
  _conv("cifar10", 16, False, (8, 16), 32),
)
# Small data sets (a few hundred to 2k images) that a long run drives to near-zero training loss:
# the regime of many users' models, which the default's full data sets never reach.
SMALL_DATA = (
  _mlp("mnist", 8, True, (64,), 32, examples=512),
  _mlp("mnist", 16, True, (32, 32), 64, examples=2048),
  _mlp("cifar10", 8, False, (64,), 32, examples=1024),
)
PRESETS: dict[str, tuple[BucketSpec, ...]] = {
  "default": DEFAULT,
  "default_small_data": DEFAULT + SMALL_DATA,
  # Two tiny buckets: tests and quick sanity runs.
  "tiny": (BucketSpec("quadratic", widths=(4,)), _mlp("mnist", 8, True, (8,), 32)),
}


class Mixture(NamedTuple):
  """The buckets of a mixture and how often each is drawn.

  Attributes:
    buckets: one ``TaskFamily`` per bucket, in the preset's order; each carries its own data.
    weights: probability of each bucket per meta-step, summing to 1.
    config: JSON settings that rebuild the mixture with ``mixture(**config)`` (less ``name``).
  """

  buckets: tuple[TaskFamily, ...]
  weights: tuple[float, ...]
  config: Mapping

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(b.name for b in self.buckets)


def specs(preset: str = "default") -> tuple[BucketSpec, ...]:
  if preset not in PRESETS:
    raise ValueError(f"Unknown mixture preset {preset!r}; choose one of {tuple(PRESETS)}.")
  return PRESETS[preset]


def build_bucket(
  spec: BucketSpec, data: image_data.ImageSplit | None, augment_log10_range: float
) -> TaskFamily:
  """The bucket's family on ``data`` (None for the quadratic), augmented.

  The family's ``name`` is the bucket's (``spec.name``).
  """
  if spec.kind == "quadratic":
    task = quadratic(dim=spec.widths[0])
  elif spec.kind == "mlp":
    task = image_nets.image_mlp(data, spec.widths, ALL_ACTIVATIONS, spec.batch_size, spec.name)
  elif spec.kind == "conv":
    task = image_nets.image_conv(data, spec.widths, ALL_ACTIVATIONS, spec.batch_size, spec.name)
  else:
    raise ValueError(f"Unknown bucket kind {spec.kind!r}; choose quadratic, mlp or conv.")
  task = task._replace(name=spec.name)
  return augment.rescaled(task, augment_log10_range)


def _bucket_data(spec: BucketSpec, split: str, dirs: Mapping, sources: Mapping | None):
  if spec.dataset is None:
    return None
  if sources is not None:
    if spec.dataset not in sources:
      raise ValueError(f"sources has no {spec.dataset!r} arrays for bucket {spec.name}.")
    images, labels = sources[spec.dataset]
    split_data = image_data.prepare(images, labels, spec.size, spec.grey)
  else:
    split_data = image_data.load(spec.dataset, split, spec.size, spec.grey, dirs[spec.dataset])
  return image_data.first(split_data, spec.examples) if spec.examples else split_data


def mixture(
  preset: str = "default",
  augment_log10_range: float = 1.0,
  split: str = "train",
  mnist_dir: str | None = None,
  cifar10_dir: str | None = None,
  sources: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Mixture:
  """The buckets of ``preset``, their data loaded (and resized) once, drawn uniformly.

  Args:
    preset: a key of ``PRESETS``: ``"default"`` (12 buckets), ``"default_small_data"`` (15)
      or ``"tiny"`` (2).
    augment_log10_range: per-tensor reparameterization scales ``10^U(-r, r)``; 0: none.
    split: ``"train"`` or ``"test"`` images.
    mnist_dir, cifar10_dir: the loaders' directories (default ``$MNIST_DIR``,
      ``$CIFAR10_DIR``); see ``tasks.mnist_data`` and ``tasks.cifar10_data``.
    sources: instead of the loaders, ``{"mnist": (images (n, 28, 28), labels), "cifar10":
      (images (n, 32, 32, 3), labels)}`` as uint8 numpy arrays (tests; not recorded in config).

  Returns:
    A ``Mixture``.
  """
  dirs = {"mnist": mnist_dir, "cifar10": cifar10_dir}
  buckets = tuple(
    build_bucket(spec, _bucket_data(spec, split, dirs, sources), augment_log10_range)
    for spec in specs(preset)
  )
  config = {
    "name": "mixture",
    "preset": preset,
    "augment_log10_range": augment_log10_range,
    "split": split,
    "mnist_dir": mnist_dir,
    "cifar10_dir": cifar10_dir,
  }
  return Mixture(buckets, (1.0 / len(buckets),) * len(buckets), config)


def bucket_index(mix: Mixture, seed: int, step: int) -> int:
  """The bucket of meta-step ``step``: a draw from ``mix.weights`` that depends on
  ``(seed, step)`` alone (numpy's PCG64, the same on every host and after a resume).
  """
  rng = np.random.default_rng((int(seed), int(step)))
  weights = np.asarray(mix.weights, np.float64)
  return int(rng.choice(len(weights), p=weights / weights.sum()))


def mixture_bucket(
  bucket: str = "quadratic_10",
  preset: str = "default",
  augment_log10_range: float = 1.0,
  split: str = "train",
  mnist_dir: str | None = None,
  cifar10_dir: str | None = None,
) -> TaskFamily:
  """One bucket of a mixture as a task family by itself (``tasks.get("mixture", bucket=...)``).

  Only the bucket's own data set is loaded. Its ``config`` rebuilds it through the registry.

  Example:
    >>> task = tasks.get("mixture", bucket="mlp_mnist8g_32_b128", mnist_dir="../shared/data/mnist")
  """
  by_name = {spec.name: spec for spec in specs(preset)}
  if bucket not in by_name:
    raise ValueError(
      f"Mixture preset {preset!r} has no bucket {bucket!r}; its buckets: {', '.join(by_name)}."
    )
  spec = by_name[bucket]
  dirs = {"mnist": mnist_dir, "cifar10": cifar10_dir}
  task = build_bucket(spec, _bucket_data(spec, split, dirs, None), augment_log10_range)
  config = {
    "name": "mixture",
    "bucket": bucket,
    "preset": preset,
    "augment_log10_range": augment_log10_range,
    "split": split,
    "mnist_dir": mnist_dir,
    "cifar10_dir": cifar10_dir,
  }
  return task._replace(config=config)
