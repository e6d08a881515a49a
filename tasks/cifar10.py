"""Cross-entropy of a small conv net on CIFAR-10 minibatches of 128 (section 3.3, Figure 7).

The paper's model: three convolutional layers with max pooling, then a fully connected layer of 32
hidden units, all non-linearities ReLU with batch normalization, then a softmax output layer.
Batch normalization uses the minibatch's own statistics (training mode), so the loss needs no
running averages; its offset is the layer's bias and it has no scale (see ``convnet_logits``).
Problems differ only in theta_0 and the minibatches, so ``sample`` returns no parameters.

How a conv layer runs (``conv_impl``: a CPU kernel, shifted slices or the library's
convolution, all the same function) is ``tasks.conv_layers``', whose names this module also
exports.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from tasks import cifar10_data
from tasks.base import TaskFamily
from tasks.conv_layers import (  # noqa: F401 (exported: the layers' functions live there)
  BATCH_NORM_EPSILON,
  CONV_CHOICES,
  CONV_IMPLS,
  batch_norm,
  conv_function,
  conv_shift,
  conv_tail,
  conv_xla,
  max_pool,
  tail_function,
)

IMAGE_SIZE = 32
KERNEL_SIZE = 3
# Per-channel mean and std of the official training images, on the [0, 1] scale.
CHANNEL_MEAN = (0.4914, 0.4822, 0.4465)
CHANNEL_STD = (0.2470, 0.2435, 0.2616)


def layer_sizes(channels: Sequence[int], hidden_size: int, num_classes: int) -> dict:
  """``{layer name: kernel shape}``; names with "conv" make ``conv_fc`` label them "conv"."""
  sizes, c_in = {}, 3
  for i, c_out in enumerate(channels):
    sizes[f"conv_{i}"] = (KERNEL_SIZE, KERNEL_SIZE, c_in, c_out)
    c_in = c_out
  side = IMAGE_SIZE // 2 ** len(channels)
  sizes["fc_0"] = (side * side * c_in, hidden_size)
  sizes["fc_1"] = (hidden_size, num_classes)
  return sizes


def init_convnet(key: jax.Array, sizes: dict) -> dict:
  """Kernels IID N(0, 1 / fan_in), biases 0.

  With batch normalization after every hidden layer the kernels' scale does not change the
  function; 1 / fan_in gives the output layer logits of variance about 0.5, so the initial loss
  is near log(classes). All kernels come from one draw of ``key``: one random-bits computation
  instead of one per layer compiles ~10x faster on XLA CPU, and theta_0 is drawn inside every
  meta-step that resamples problems.

  Returns:
    ``{"conv_0": {"kernel": (3, 3, 3, c0), "bias": (c0,)}, ..., "fc_1": {...}}``.
  """
  counts = [math.prod(shape) for shape in sizes.values()]
  normal = jax.random.normal(key, (sum(counts),), jnp.float32)
  params, start = {}, 0
  for count, (name, shape) in zip(counts, sizes.items(), strict=True):
    fan_in = math.prod(shape[:-1])
    kernel = normal[start : start + count].reshape(shape) / math.sqrt(fan_in)
    params[name] = {"kernel": kernel, "bias": jnp.zeros(shape[-1:], jnp.float32)}
    start += count
  return params


def convnet_logits(params: dict, x: jax.Array, conv=conv_shift, tail=conv_tail) -> jax.Array:
  """Logits (batch, classes) of images ``x`` (batch, 32, 32, 3).

  Each hidden layer is ``relu(batch_norm(x * kernel) + bias)``: the bias is batch norm's offset
  (a bias before the normalization would have zero gradient), and batch norm's scale is left out
  because the next layer's kernel absorbs a positive per-channel scale (ReLU and max pooling
  commute with it, and the next layer is normalized or linear). Conv layers are followed by 2 x 2
  max pooling, applied before the ReLU, which gives the same values at a quarter of the cost.
  ``conv`` and ``tail`` (``conv_tail``'s function) say how a conv layer runs.
  """
  num_conv = len(params) - 2
  for i in range(num_conv):
    layer = params[f"conv_{i}"]
    x = tail(conv(x, layer["kernel"]), layer["bias"])
  x = x.reshape(x.shape[0], -1)
  hidden = params["fc_0"]
  x = jax.nn.relu(batch_norm(x @ hidden["kernel"], axes=(0,)) + hidden["bias"])
  return x @ params["fc_1"]["kernel"] + params["fc_1"]["bias"]


def pixels(images: jax.Array, normalize: bool) -> jax.Array:
  """uint8 images (batch, 32, 32, 3) as float32 in [0, 1], or per-channel standardized."""
  x = images.astype(jnp.float32) / 255.0
  if normalize:
    x = (x - jnp.asarray(CHANNEL_MEAN)) / jnp.asarray(CHANNEL_STD)
  return x


def cifar10_conv(
  channels: Sequence[int] = (16, 16, 16),
  hidden_size: int = 32,
  batch_size: int = 128,
  split: str = "train",
  classes: Sequence[int | str] | None = None,
  normalize: bool = False,
  conv_impl: str = "auto",
  cifar10_dir: str | None = None,
  tfds_data_dir: str | None = None,
  cache_dir: str | None = None,
) -> TaskFamily:
  """CIFAR-10 classification by a small conv net with batch norm, the optimizee of section 3.3.

  The family's ``data`` is one split (or class subset) as device arrays
  (``cifar10_data.Split``); the loss gathers a minibatch by index from the ``data`` it is given.

  Args:
    channels: output channels of the three (or any number of) 3 x 3 conv layers, each followed
      by 2 x 2 max pooling; (16, 16, 16) gives 13642 parameters for 10 classes.
    hidden_size: units of the fully connected hidden layer (the paper's 32).
    batch_size: examples per minibatch, drawn uniformly with replacement by the loss's key.
    split: ``"train"`` or ``"test"``: which examples the loss draws from.
    classes: keep only these classes (labels or names), relabelled 0..k-1 in the given order;
      the output layer has k units. None: all ten.
    normalize: standardize each channel by the training set's mean and std; else [0, 1] pixels.
    conv_impl: how the convolutions run, one of ``CONV_CHOICES`` (``conv_function``): ``"auto"``
      (the CPU kernel, im2col by shifted slices, or the library's, by platform), ``"cpu_kernel"``,
      ``"shift"`` or ``"xla"``; all compute the same function.
    cifar10_dir: CIFAR-10 directory or .zip (default ``$CIFAR10_DIR``); see ``cifar10_data``.
    tfds_data_dir: TFDS data directory used when no CIFAR-10 path is named.
    cache_dir: cache of decoded images (default ``$LEARNED_OPT_CACHE``, ``~/.cache/learned_opt``).

  Example:
    >>> task = cifar10_conv(cifar10_dir="../shared/data/cifar10")
    >>> theta = task.init(task.data, {}, jax.random.key(1))
    >>> loss = jax.jit(task.loss)(task.data, {}, theta, jax.random.key(2))  # ~log(10) at theta_0
  """
  channels = tuple(int(c) for c in channels)
  if not channels or min(channels) <= 0 or len(channels) > 5:
    raise ValueError(f"channels must be 1 to 5 positive widths, got {channels}, e.g. (16, 16, 16).")
  conv, tail = conv_function(conv_impl), tail_function(conv_impl)
  if hidden_size <= 0 or batch_size <= 1:
    raise ValueError(
      f"hidden_size must be positive and batch_size at least 2 (batch norm needs a batch), got "
      f"{hidden_size}, {batch_size}."
    )
  labels = cifar10_data.class_indices(classes)
  num_classes = cifar10_data.NUM_CLASSES if labels is None else len(labels)
  sizes = layer_sizes(channels, hidden_size, num_classes)
  config = {
    "name": "cifar10_conv",
    "channels": list(channels),
    "hidden_size": hidden_size,
    "batch_size": batch_size,
    "split": split,
    "classes": None if classes is None else list(classes),
    "normalize": normalize,
    "conv_impl": conv_impl,
    "cifar10_dir": cifar10_dir,
    "tfds_data_dir": tfds_data_dir,
    "cache_dir": cache_dir,
  }

  def sample(data, key):
    del data, key  # Only theta_0 and the minibatches vary between problems.
    return {}

  def init(data, task_params, key):
    del data, task_params
    return init_convnet(key, sizes)

  def loss(data: cifar10_data.Split, task_params, params, key):
    del task_params
    index = jax.random.randint(key, (batch_size,), 0, data.labels.shape[0])
    logits = convnet_logits(params, pixels(data.images[index], normalize), conv, tail)
    return optax.softmax_cross_entropy_with_integer_labels(logits, data.labels[index]).mean()

  data = cifar10_data.load(split, cifar10_dir, tfds_data_dir, cache_dir, classes)
  return TaskFamily("cifar10_conv", sample, init, loss, config, data)
