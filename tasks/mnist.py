"""Cross-entropy of a small MLP on MNIST minibatches of 128 (section 3.2).

The base network has one hidden layer of 20 sigmoid units. Problems differ only in theta_0 and in
the minibatches, so ``sample`` returns no parameters; the data set is a device array shared by
every problem and gathered by index inside the jitted step.
"""

from collections.abc import Callable, Sequence

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

  The loss closes over the data set's device arrays, which jax 0.10 embeds in every program that
  traces it (correct, but compiles are slower; see ``mnist_mlp_on_data`` for the fast way).

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
    >>> theta = task.init(task.sample(jax.random.key(0)), jax.random.key(1))
    >>> loss = task.loss({}, theta, jax.random.key(2))  # about log(10) at theta_0
  """
  data, family_of = mnist_mlp_on_data(
    hidden_sizes, activation, batch_size, split, init_std, mnist_dir, tfds_data_dir
  )
  return family_of(data)


def mnist_mlp_on_data(
  hidden_sizes: Sequence[int] = (20,),
  activation: str = "sigmoid",
  batch_size: int = 128,
  split: str = "train",
  init_std: float = 0.1,
  mnist_dir: str | None = None,
  tfds_data_dir: str | None = None,
) -> tuple[mnist_data.Split, Callable[[mnist_data.Split], TaskFamily]]:
  """``mnist_mlp`` with its data set lifted out: ``(data, family_of)``, ``family_of(data)``.

  Call ``family_of`` inside a jitted function that takes ``data`` as an argument: the loss then
  closes over tracers, so the 47 MB stay a device buffer passed to the program instead of a
  constant compiled into it (3-4x faster compiles, benchmarks/mnist_data_bench.py).

  Example:
    >>> data, family_of = mnist_mlp_on_data()
    >>> losses = jax.jit(lambda d, p, k: family_of(d).loss({}, p, k))(data, theta, key)
  """
  hidden_sizes = tuple(int(h) for h in hidden_sizes)
  if not hidden_sizes or min(hidden_sizes) <= 0:
    raise ValueError(f"hidden_sizes must be non-empty and positive, got {hidden_sizes}.")
  if activation not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {activation!r}; choose one of {tuple(ACTIVATIONS)}.")
  if batch_size <= 0 or init_std <= 0:
    raise ValueError(f"batch_size and init_std must be positive, got {batch_size}, {init_std}.")
  data = mnist_data.load(split, mnist_dir, tfds_data_dir)
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

  def family_of(data: mnist_data.Split) -> TaskFamily:
    num_examples = data.labels.shape[0]

    def sample(key):
      del key  # Only theta_0 and the minibatches vary between problems.
      return {}

    def init(task_params, key):
      del task_params
      return init_mlp(key, sizes, init_std)

    def loss(task_params, params, key):
      del task_params
      index = jax.random.randint(key, (batch_size,), 0, num_examples)
      # The barrier keeps XLA from moving the uint8 -> float32 convert above the gather when
      # the images are a compiled-in constant: it would then convert all 60000 images at every
      # step (4x slower steps, benchmarks/mnist_data_bench.py).
      pixels = jax.lax.optimization_barrier(data.images[index])
      x = pixels.reshape(batch_size, INPUT_SIZE).astype(jnp.float32) / 255.0
      return cross_entropy(mlp_logits(params, x, act), data.labels[index])

    return TaskFamily("mnist_mlp", sample, init, loss, config)

  return data, family_of
