"""MLPs, logistic regression and small conv nets on ``image_data.ImageSplit`` of any resolution.

Both families take their data as an argument (the ``ImageSplit`` a driver passes into ``jit``)
and gather a minibatch by index inside the loss. The hidden activation can vary between
problems of one family: ``sample`` draws an index into ``activations`` and the loss selects it
with ``lax.switch`` (every branch is computed under ``vmap``; shapes do not change), so one
compiled step covers them all.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from tasks import image_data
from tasks.base import TaskFamily
from tasks.conv_layers import conv_function, max_pool

ACTIVATIONS = {
  "sigmoid": jax.nn.sigmoid,
  "tanh": jnp.tanh,
  "relu": jax.nn.relu,
  "gelu": jax.nn.gelu,
}


def _check_activations(activations: Sequence[str]) -> tuple[str, ...]:
  activations = tuple(activations)
  unknown = [a for a in activations if a not in ACTIVATIONS]
  if not activations or unknown:
    raise ValueError(
      f"activations must name one or more of {tuple(ACTIVATIONS)}, got {list(activations)}."
    )
  return activations


def _sample_activation(activations: tuple[str, ...]):
  def sample(data, key):
    del data
    return {"activation": jax.random.randint(key, (), 0, len(activations))}

  return sample


def _activate(activations: tuple[str, ...], index: jax.Array, x: jax.Array) -> jax.Array:
  if len(activations) == 1:
    return ACTIVATIONS[activations[0]](x)
  return jax.lax.switch(index, [ACTIVATIONS[a] for a in activations], x)


def normal_init(key: jax.Array, shapes: dict) -> dict:
  """Kernels IID N(0, 1 / fan_in) from one draw of ``key``, biases 0 (``cifar10.init_convnet``).

  Returns:
    ``{name: {"kernel": shape, "bias": (shape[-1],)}}``.
  """
  counts = [math.prod(shape) for shape in shapes.values()]
  normal = jax.random.normal(key, (sum(counts),), jnp.float32)
  params, start = {}, 0
  for count, (name, shape) in zip(counts, shapes.items(), strict=True):
    kernel = normal[start : start + count].reshape(shape) / math.sqrt(math.prod(shape[:-1]))
    params[name] = {"kernel": kernel, "bias": jnp.zeros(shape[-1:], jnp.float32)}
    start += count
  return params


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def classifier(config: dict, shapes: dict, logits, data) -> TaskFamily:
  """Cross-entropy of ``logits(params, images, activation) -> (batch, 10)`` on a random
  minibatch of ``config["batch_size"]`` standardized images; theta drawn by ``normal_init``."""
  batch_size, activations = config["batch_size"], tuple(config["activations"])

  def init(data, task_params, key):
    del data, task_params
    return normal_init(key, shapes)

  def loss(data, task_params, params, key):
    index = jax.random.randint(key, (batch_size,), 0, data.labels.shape[0])
    x = image_data.standardized(data, index)
    return cross_entropy(logits(params, x, task_params["activation"]), data.labels[index])

  return TaskFamily(config["name"], _sample_activation(activations), init, loss, config, data)


def image_mlp(
  data: image_data.ImageSplit,
  hidden_sizes: Sequence[int] = (32,),
  activations: Sequence[str] = ("relu",),
  batch_size: int = 128,
  name: str = "image_mlp",
) -> TaskFamily:
  """Cross-entropy of an MLP on flattened, standardized images; ``hidden_sizes=()`` is
  multinomial logistic regression.

  Args:
    data: the images (``image_data.prepare`` or ``image_data.load``), any size and channels.
    hidden_sizes: units of each hidden layer.
    activations: hidden activations a problem draws from, uniformly.
    batch_size: examples per minibatch, drawn uniformly with replacement by the loss's key.
    name: the family's name (a mixture names each bucket).

  Returns:
    A ``TaskFamily``; theta is ``{"layer_i": {"kernel": (in, out), "bias": (out,)}}``.
  """
  hidden_sizes = tuple(int(h) for h in hidden_sizes)
  activations = _check_activations(activations)
  if any(h <= 0 for h in hidden_sizes) or batch_size <= 0:
    raise ValueError(f"hidden_sizes and batch_size must be positive: {hidden_sizes}, {batch_size}.")
  inputs = math.prod(data.images.shape[1:])
  sizes = (inputs, *hidden_sizes, image_data.NUM_CLASSES)
  shapes = {
    f"layer_{i}": (a, b) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
  }
  config = {
    "name": name,
    "hidden_sizes": list(hidden_sizes),
    "activations": list(activations),
    "batch_size": batch_size,
  }

  def logits(params, images, activation):
    x = images.reshape(batch_size, -1)
    for i in range(len(shapes)):
      layer = params[f"layer_{i}"]
      x = x @ layer["kernel"] + layer["bias"]
      if i < len(shapes) - 1:
        x = _activate(activations, activation, x)
    return x

  return classifier(config, shapes, logits, data)


def image_conv(
  data: image_data.ImageSplit,
  channels: Sequence[int] = (8,),
  activations: Sequence[str] = ("relu",),
  batch_size: int = 64,
  name: str = "image_conv",
) -> TaskFamily:
  """Cross-entropy of a small conv net: per entry of ``channels`` a 3 x 3 'SAME' convolution,
  2 x 2 max pooling and the activation, then a linear read-out of the flattened features.

  The convolution is ``conv_layers.conv_function("auto")``: the direct CPU kernel where the CPU
  kernels run, else shifted slices and one matmul on CPU (both fast inside an unroll's
  ``lax.scan``), the library's on GPU and TPU. The image size must be divisible by
  ``2 ** len(channels)``.

  Returns:
    A ``TaskFamily``; theta is ``{"conv_i": {"kernel": (3, 3, in, out), "bias": (out,)},
    "out": {"kernel": (features, 10), "bias": (10,)}}``.
  """
  channels = tuple(int(c) for c in channels)
  activations = _check_activations(activations)
  size, _, c_in = data.images.shape[1:]
  if not channels or min(channels) <= 0 or size % 2 ** len(channels) or batch_size <= 0:
    raise ValueError(
      f"channels must be positive widths, one pooling halving per entry of an image of size "
      f"{size}, and batch_size positive; got {channels}, {batch_size}."
    )
  shapes = {}
  for i, c_out in enumerate(channels):
    shapes[f"conv_{i}"] = (3, 3, c_in, c_out)
    c_in = c_out
  shapes["out"] = ((size // 2 ** len(channels)) ** 2 * c_in, image_data.NUM_CLASSES)
  config = {
    "name": name,
    "channels": list(channels),
    "activations": list(activations),
    "batch_size": batch_size,
  }

  conv = conv_function("auto")

  def logits(params, images, activation):
    x = images
    for i in range(len(channels)):
      layer = params[f"conv_{i}"]
      x = max_pool(conv(x, layer["kernel"]) + layer["bias"])
      x = _activate(activations, activation, x)
    return x.reshape(batch_size, -1) @ params["out"]["kernel"] + params["out"]["bias"]

  return classifier(config, shapes, logits, data)
