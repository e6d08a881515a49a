"""Cross-entropy of a small MLP on MNIST minibatches of 128 (section 3.2).

The base network has one hidden layer of 20 sigmoid units. Problems differ only in theta_0 and in
the minibatches, so ``sample`` returns no parameters; the data set is a device array shared by
every problem and gathered by index inside the jitted step.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from tasks import mnist_data
from tasks.base import TaskFamily

ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu}
INPUT_SIZE = 28 * 28


def init_mlp(key: jax.Array, sizes: Sequence[int], std: float) -> dict:
  """IID N(0, std^2) weights and biases, as the paper's optimizees (section 3).

  Returns:
    ``{"layer_0": {"w": (sizes[0], sizes[1]), "b": (sizes[1],)}, ...}``.
  """
  keys = jax.random.split(key, 2 * (len(sizes) - 1))
  return {
    f"layer_{i}": {
      "w": std * jax.random.normal(keys[2 * i], (n_in, n_out), jnp.float32),
      "b": std * jax.random.normal(keys[2 * i + 1], (n_out,), jnp.float32),
    }
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
  }


def mlp_logits(params: dict, x: jax.Array, activation) -> jax.Array:
  """Logits shaped (batch, 10) of inputs ``x`` shaped (batch, 784)."""
  num_layers = len(params)
  for i in range(num_layers):
    layer = params[f"layer_{i}"]
    x = x @ layer["w"] + layer["b"]
    if i < num_layers - 1:
      x = activation(x)
  return x


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy in nats of logits (batch, classes) and int labels (batch,)."""
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def mnist_mlp(
  hidden_sizes: Sequence[int] = (20,),
  activation: str = "sigmoid",
  batch_size: int = 128,
  split: str = "train",
  init_std: float = 0.1,
  mnist_dir: str | None = None,
  tfds_data_dir: str | None = None,
) -> TaskFamily:
  """MNIST classification by an MLP, the optimizee of section 3.2.

  The family's ``data`` is one split of MNIST as device arrays (``mnist_data.Split``: uint8
  images, int32 labels); the loss gathers a minibatch by index from the ``data`` it is given, so
  drivers pass the 47 MB as a jit argument and never compile them into a program.

  Args:
    hidden_sizes: units of each hidden layer; ``(20,)`` is the paper's base network, ``(40,)``
      and ``(20, 20)`` its Figure 5 variants.
    activation: ``"sigmoid"`` (base) or ``"relu"``.
    batch_size: examples per minibatch, drawn uniformly with replacement by the loss's key.
    split: ``"train"`` or ``"test"``: which examples the loss draws from.
    init_std: std of the IID Gaussian theta_0. 0.1 keeps a hidden unit's pre-activation O(1) for
      [0, 1] pixels (about 100 lit pixels per digit), so sigmoids start off their flat tails.
    mnist_dir: directory of the IDX files (default ``$MNIST_DIR``); see ``tasks.mnist_data``.
    tfds_data_dir: TFDS data directory used when no IDX directory is named.

  Example:
    >>> task = mnist_mlp(mnist_dir="../shared/data/mnist")
    >>> theta = task.init(task.data, {}, jax.random.key(1))
    >>> loss = jax.jit(task.loss)(task.data, {}, theta, jax.random.key(2))  # ~log(10) at theta_0
  """
  hidden_sizes = tuple(int(h) for h in hidden_sizes)
  if not hidden_sizes or min(hidden_sizes) <= 0:
    raise ValueError(f"hidden_sizes must be non-empty and positive, got {hidden_sizes}.")
  if activation not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {activation!r}; choose one of {tuple(ACTIVATIONS)}.")
  if batch_size <= 0 or init_std <= 0:
    raise ValueError(f"batch_size and init_std must be positive, got {batch_size}, {init_std}.")
  sizes = (INPUT_SIZE, *hidden_sizes, mnist_data.NUM_CLASSES)
  act = ACTIVATIONS[activation]
  config = {
    "name": "mnist_mlp",
    "hidden_sizes": list(hidden_sizes),
    "activation": activation,
    "batch_size": batch_size,
    "split": split,
    "init_std": init_std,
    "mnist_dir": mnist_dir,
    "tfds_data_dir": tfds_data_dir,
  }

  def sample(data, key):
    del data, key  # Only theta_0 and the minibatches vary between problems.
    return {}

  def init(data, task_params, key):
    del data, task_params
    return init_mlp(key, sizes, init_std)

  def loss(data: mnist_data.Split, task_params, params, key):
    del task_params
    index = jax.random.randint(key, (batch_size,), 0, data.labels.shape[0])
    pixels = data.images[index].reshape(batch_size, INPUT_SIZE).astype(jnp.float32) / 255.0
    return cross_entropy(mlp_logits(params, pixels, act), data.labels[index])

  data = mnist_data.load(split, mnist_dir, tfds_data_dir)
  return TaskFamily("mnist_mlp", sample, init, loss, config, data)
