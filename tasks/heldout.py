"""Held-out tasks for a general learned optimizer: problems it never met in meta-training.

The meta-training mixture (``tasks.mixture``) has MLPs, logistic regression and small conv nets
on MNIST and CIFAR-10 at 8 to 32 px and 10-d random quadratics; its largest task has ~25k
parameters and its truncations are 10 to 20 steps. None of the tasks here is in it. They change
the data (scikit-learn's bundled digits, wine and breast-cancer sets, the Zen of Python as text,
a random teacher network), the architecture (a 4-layer MLP, a residual MLP with layer norm, an
autoencoder, a character RNN), the loss (regression, reconstruction, next-character prediction,
a quadratic with condition number 1000) and the scale: ``mnist_autoencoder`` (~210k parameters)
and ``mnist_mlp_2x256`` (~269k, >10x the largest meta-training task) are larger, every task runs
>= 1000 steps (50 to 100 truncations) and ``ill_conditioned_quadratic_100`` runs 2000.

``suite()`` lists the tasks; a task's ``build`` loads its data and builds its ``TaskFamily``
only when called. ``tiny_suite()`` has two data-free 30-step tasks for end-to-end tests.

Example:
  >>> family = get("digits_resmlp").build()
  >>> problem = family.sample(family.data, jax.random.key(0))
  >>> theta = family.init(family.data, problem, jax.random.key(1))
"""

import codecs
import contextlib
import functools
import io
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasks import image_data, image_nets
from tasks.base import TaskFamily
from tasks.image_nets import cross_entropy, normal_init

ACTIVATIONS = image_nets.ACTIVATIONS


class HeldOutTask(NamedTuple):
  """One task of the suite.

  Attributes:
    name: the task's name, also its family's ``name``.
    build: ``() -> TaskFamily``, loading the task's data (may be slow).
    num_steps: optimizee steps an evaluation runs.
    description: one line for a results table: model, data, what is held out.
  """

  name: str
  build: Callable[[], TaskFamily]
  num_steps: int
  description: str


class Table(NamedTuple):
  """A tabular classification data set on the device."""

  features: jax.Array  # (examples, features) float32, each column standardized
  labels: jax.Array  # (examples,) int32 in [0, classes)


@functools.cache
def digits() -> image_data.ImageSplit:
  """scikit-learn's bundled 8 x 8 digits (1797 images, 0..16 scaled to 0..255), grey."""
  from sklearn import datasets

  loaded = datasets.load_digits()
  images = np.round(loaded.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8)
  return image_data.prepare(images, loaded.target, 8, True)


@functools.cache
def table(name: str) -> Table:
  """A scikit-learn bundled table, ``"wine"`` (178 x 13) or ``"breast_cancer"`` (569 x 30)."""
  from sklearn import datasets

  loaded = getattr(datasets, f"load_{name}")()
  x = loaded.data.astype(np.float64)
  x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-8)
  return Table(jnp.asarray(x, jnp.float32), jnp.asarray(loaded.target, jnp.int32))


def zen_of_python() -> str:
  """The Zen of Python (856 characters), from the stdlib module ``this``, unprinted."""
  with contextlib.redirect_stdout(io.StringIO()):
    import this
  return codecs.decode(this.s, "rot13")


def _no_params(data, key):
  del data, key
  return {}


def _normal(shapes: dict):
  """An ``init`` drawing ``shapes`` by ``image_nets.normal_init``: N(0, 1 / fan_in), bias 0."""

  def init(data, task_params, key):
    del data, task_params
    return normal_init(key, shapes)

  return init


def _affine(layer: dict, x: jax.Array) -> jax.Array:
  return x @ layer["kernel"] + layer["bias"]


def _mlp_shapes(sizes: Sequence[int]) -> dict:
  """``{"layer_i": (sizes[i], sizes[i + 1])}``."""
  return {f"layer_{i}": (a, b) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))}


def _mlp(params: dict, x: jax.Array, activation: str) -> jax.Array:
  """The MLP ``params`` (``_mlp_shapes``) on x (batch, in): hidden ``activation``, linear out."""
  for i in range(len(params)):
    x = _affine(params[f"layer_{i}"], ACTIVATIONS[activation](x) if i else x)
  return x


def _minibatch(key: jax.Array, batch_size: int, num: int) -> jax.Array:
  """(batch_size,) indices uniform over ``num`` examples, with replacement."""
  return jax.random.randint(key, (batch_size,), 0, num)


def table_mlp(
  data: Table,
  hidden_sizes: Sequence[int] = (),
  activation: str = "tanh",
  batch_size: int | None = None,
  l2: float = 0.0,
  name: str = "table_mlp",
) -> TaskFamily:
  """Cross-entropy of an MLP on a table, plus ``l2 / 2`` times the squared norm of the kernels;
  ``hidden_sizes=()`` is multinomial logistic regression and ``batch_size=None`` the full batch
  (a deterministic loss). On separable data (wine) the unregularized loss has no minimum: it
  falls to 0 as the weights grow, and a large enough step reaches 0.0 in float32.

  Returns:
    A ``TaskFamily``; theta is ``{"layer_i": {"kernel": (in, out), "bias": (out,)}}``.
  """
  num, features = data.features.shape
  classes = int(np.max(np.asarray(data.labels))) + 1
  shapes = _mlp_shapes((features, *hidden_sizes, classes))
  config = {"name": name, "hidden_sizes": list(hidden_sizes), "activation": activation,
            "batch_size": batch_size, "l2": l2, "num_features": features,
            "num_classes": classes}  # fmt: skip

  def loss(data, task_params, params, key):
    del task_params
    index = slice(None) if batch_size is None else _minibatch(key, batch_size, num)
    logits = _mlp(params, data.features[index], activation)
    penalty = sum(jnp.sum(jnp.square(layer["kernel"])) for layer in params.values())
    return cross_entropy(logits, data.labels[index]) + 0.5 * l2 * penalty

  return TaskFamily(name, _no_params, _normal(shapes), loss, config, data)


def residual_mlp(
  data: image_data.ImageSplit,
  width: int = 64,
  blocks: int = 3,
  block_scale: float = 0.5,
  batch_size: int = 64,
  name: str = "residual_mlp",
) -> TaskFamily:
  """Cross-entropy of dense ``width`` -> ``blocks`` x (h + W2 relu(W1 h)) -> layer norm (no
  learned scale) -> dense 10, on flattened standardized images; W2 starts at ``block_scale``
  times the N(0, 1 / fan_in) draw, so the residual stream grows slowly with depth.

  Returns:
    A ``TaskFamily``; theta is ``{"in", "block_i_0", "block_i_1", "out"}``, each
    ``{"kernel": (in, out), "bias": (out,)}``.
  """
  inputs = math.prod(data.images.shape[1:])
  shapes = {"in": (inputs, width)}
  for i in range(blocks):
    shapes.update({f"block_{i}_0": (width, width), f"block_{i}_1": (width, width)})
  shapes["out"] = (width, image_data.NUM_CLASSES)
  config = {"name": name, "width": width, "blocks": blocks, "block_scale": block_scale,
            "activations": ["relu"], "batch_size": batch_size}  # fmt: skip

  def logits(params, images, activation):
    del activation
    h = _affine(params["in"], images.reshape(batch_size, -1))
    for i in range(blocks):
      h = h + _affine(params[f"block_{i}_1"], jax.nn.relu(_affine(params[f"block_{i}_0"], h)))
    h = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-5)
    return _affine(params["out"], h)

  family = image_nets.classifier(config, shapes, logits, data)

  def init(data, task_params, key):
    params = family.init(data, task_params, key)
    for i in range(blocks):
      second = params[f"block_{i}_1"]
      second["kernel"] = second["kernel"] * block_scale
    return params

  return family._replace(init=init)


def image_autoencoder(
  data: image_data.ImageSplit,
  widths: Sequence[int] = (128, 32, 128),
  activation: str = "tanh",
  batch_size: int = 64,
  name: str = "image_autoencoder",
) -> TaskFamily:
  """Mean squared error of an MLP reconstructing flattened standardized images: pixels ->
  ``widths`` (``activation``) -> pixels (linear).

  Returns:
    A ``TaskFamily``; theta is ``{"layer_i": {"kernel": (in, out), "bias": (out,)}}``.
  """
  pixels = math.prod(data.images.shape[1:])
  shapes = _mlp_shapes((pixels, *widths, pixels))
  config = {"name": name, "widths": list(widths), "activation": activation,
            "batch_size": batch_size}  # fmt: skip

  def loss(data, task_params, params, key):
    del task_params
    index = _minibatch(key, batch_size, data.labels.shape[0])
    x = image_data.standardized(data, index).reshape(batch_size, pixels)
    return jnp.mean(jnp.square(_mlp(params, x, activation) - x))

  return TaskFamily(name, _no_params, _normal(shapes), loss, config, data)


def teacher_student(
  in_dim: int = 16,
  teacher_hidden: int = 32,
  student_hidden: Sequence[int] = (64, 64),
  batch_size: int = 64,
  noise: float = 0.1,
  name: str = "teacher_student",
) -> TaskFamily:
  """Regression onto a random teacher: ``sample`` draws a tanh MLP in_dim -> teacher_hidden
  -> 1 (N(0, 1 / fan_in) weights, bias 0); each loss draws x ~ N(0, I) (batch, in_dim) and
  targets teacher(x) + ``noise`` N(0, 1); the student is a relu MLP; loss 0.5 * mean squared
  error. No data set (``data`` is ``()``).

  Returns:
    A ``TaskFamily``; theta is ``{"layer_i": {"kernel": (in, out), "bias": (out,)}}``.
  """
  teacher = _mlp_shapes((in_dim, teacher_hidden, 1))
  student = _mlp_shapes((in_dim, *student_hidden, 1))
  config = {"name": name, "in_dim": in_dim, "teacher_hidden": teacher_hidden, "noise": noise,
            "student_hidden": list(student_hidden), "batch_size": batch_size}  # fmt: skip

  def sample(data, key):
    del data
    return normal_init(key, teacher)

  def loss(data, task_params, params, key):
    del data
    x_key, noise_key = jax.random.split(key)
    x = jax.random.normal(x_key, (batch_size, in_dim), jnp.float32)
    y = _mlp(task_params, x, "tanh") + noise * jax.random.normal(noise_key, (batch_size, 1))
    return 0.5 * jnp.mean(jnp.square(_mlp(params, x, "relu") - y))

  return TaskFamily(name, sample, _normal(student), loss, config)


def char_rnn(
  text: str,
  embed: int = 16,
  hidden: int = 64,
  seq_len: int = 32,
  batch_size: int = 32,
  name: str = "char_rnn",
) -> TaskFamily:
  """Mean next-character cross-entropy of a vanilla tanh RNN, h' = tanh([e(x), h] W + b),
  logits = h' V + c, from h = 0 over ``batch_size`` random windows of ``seq_len`` characters
  (``lax.scan`` over time). The vocabulary is the sorted set of ``text``'s characters; the data
  is ``text`` as (length,) int32 indices.

  Returns:
    A ``TaskFamily``; theta is ``{"embed": (vocab, embed) N(0, 1), "cell": {"kernel":
    (embed + hidden, hidden), "bias"}, "out": {"kernel": (hidden, vocab), "bias"}}``.
  """
  vocab = sorted(set(text))
  tokens = jnp.asarray([vocab.index(c) for c in text], jnp.int32)
  shapes = {"cell": (embed + hidden, hidden), "out": (hidden, len(vocab))}
  config = {"name": name, "model": "tanh_rnn", "vocab_size": len(vocab), "embed": embed,
            "hidden": hidden, "seq_len": seq_len, "batch_size": batch_size}  # fmt: skip

  def init(data, task_params, key):
    del data, task_params
    embed_key, key = jax.random.split(key)
    embedding = jax.random.normal(embed_key, (len(vocab), embed), jnp.float32)
    return {"embed": embedding, **normal_init(key, shapes)}

  def loss(data, task_params, params, key):
    del task_params
    starts = jax.random.randint(key, (batch_size, 1), 0, data.shape[0] - seq_len)
    window = data[starts + jnp.arange(seq_len + 1)]  # (batch, seq_len + 1)
    inputs = params["embed"][window[:, :-1].T]  # (seq_len, batch, embed)

    def step(h, x):
      h = jnp.tanh(_affine(params["cell"], jnp.concatenate([x, h], axis=-1)))
      return h, h

    _, states = jax.lax.scan(step, jnp.zeros((batch_size, hidden), jnp.float32), inputs)
    return cross_entropy(_affine(params["out"], states), window[:, 1:].T)

  return TaskFamily(name, _no_params, init, loss, config, tokens)


def ill_conditioned_quadratic(
  dim: int = 100, condition: float = 1000.0, name: str = "ill_conditioned_quadratic"
) -> TaskFamily:
  """f(theta) = 0.5 sum_i w_i (Q (theta - theta*))_i^2, the curvatures w log-spaced over
  [1 / ``condition``, 1] (a gradient step near 1 suits the stiffest direction); ``sample`` draws
  a Haar rotation Q (dim, dim) and theta* ~ N(0, I), ``init`` theta_0 ~ N(0, I), so
  E f(theta_0) = sum(w) (14.5 at dim 100, condition 1000). Deterministic; no data set.
  """
  if dim < 2 or condition < 1:
    raise ValueError(f"Need dim >= 2 and condition >= 1, got dim={dim}, condition={condition}.")
  weights = np.logspace(-math.log10(condition), 0.0, dim)
  config = {"name": name, "dim": dim, "condition": condition, "max_curvature": 1.0}

  def sample(data, key):
    del data
    q_key, optimum_key = jax.random.split(key)
    q, r = jnp.linalg.qr(jax.random.normal(q_key, (dim, dim), jnp.float32))
    optimum = jax.random.normal(optimum_key, (dim,), jnp.float32)
    return {"rotation": q * jnp.sign(jnp.diagonal(r)), "optimum": optimum}

  def init(data, task_params, key):
    del data, task_params
    return {"theta": jax.random.normal(key, (dim,), jnp.float32)}

  def loss(data, task_params, params, key):
    del data, key
    z = task_params["rotation"] @ (params["theta"] - task_params["optimum"])
    return 0.5 * jnp.sum(jnp.asarray(weights, jnp.float32) * jnp.square(z))

  return TaskFamily(name, sample, init, loss, config)


def _on(load: Callable, data_name: str, builder: Callable, **kwargs) -> TaskFamily:
  """``builder(load(), **kwargs)`` with ``data_name`` and the example count in its config."""
  family = builder(load(), **kwargs)
  examples = int(jax.tree.leaves(family.data)[0].shape[0])
  return family._replace(config={**family.config, "data": data_name, "num_examples": examples})


def _task(name: str, num_steps: int, description: str, builder: Callable, *args, **kwargs):
  """A ``HeldOutTask`` whose ``build`` is ``builder(*args, name=name, **kwargs)``."""
  build = functools.partial(builder, *args, name=name, **kwargs)
  return HeldOutTask(name, build, num_steps, description)


def suite(mnist_dir: str | None = None) -> tuple[HeldOutTask, ...]:
  """The held-out suite, 12 tasks. The two MNIST tasks read ``mnist_dir`` (default $MNIST_DIR);
  the others need only scikit-learn's bundled data or none."""
  on_digits = functools.partial(_on, digits, "sklearn_digits_8x8")
  mnist = lambda: image_data.load("mnist", "train", 28, True, mnist_dir)
  on_mnist = functools.partial(_on, mnist, "mnist_train_28")
  on_wine = functools.partial(_on, functools.partial(table, "wine"), "sklearn_wine")
  on_cancer = functools.partial(
    _on, functools.partial(table, "breast_cancer"), "sklearn_breast_cancer"
  )
  mlp, conv = image_nets.image_mlp, image_nets.image_conv
  return (
    _task("digits_mlp_sigmoid_32", 1000, "sklearn digits 8x8, MLP 32 sigmoid, batch 64: new data",
          on_digits, mlp, hidden_sizes=(32,), activations=("sigmoid",), batch_size=64),
    _task("digits_mlp_4x64", 1000, "sklearn digits, MLP 4x64 relu, batch 64: deeper than any seen",
          on_digits, mlp, hidden_sizes=(64,) * 4, activations=("relu",), batch_size=64),
    _task("digits_conv_16x32", 1000, "sklearn digits, conv 16-32 relu, batch 64: wider conv",
          on_digits, conv, channels=(16, 32), activations=("relu",), batch_size=64),
    _task("digits_resmlp", 1000, "sklearn digits, residual MLP 3x64 + layer norm: new architecture",
          on_digits, residual_mlp, width=64, blocks=3, batch_size=64),
    _task("digits_mlp_gelu_2x128_b16", 1000, "sklearn digits, MLP 2x128 gelu, batch 16: noisy",
          on_digits, mlp, hidden_sizes=(128, 128), activations=("gelu",), batch_size=16),
    _task("wine_logreg", 1000, "sklearn wine 178x13, 3-class logistic regression, L2 1e-2, full "
          "batch: convex", on_wine, table_mlp, l2=1e-2),
    _task("breast_cancer_mlp_32", 1000, "sklearn breast cancer 569x30, MLP 32 tanh, batch 32",
          on_cancer, table_mlp, hidden_sizes=(32,), activation="tanh", batch_size=32),
    _task("teacher_student", 1000, "regression on a random tanh teacher 16-32-1, relu student "
          "16-64-64-1, fresh batch of 64: new loss", teacher_student),
    _task("mnist_autoencoder", 1000, "MNIST 784-128-32-128-784 tanh autoencoder, MSE, batch 64, "
          "~210k params: larger, new loss", on_mnist, image_autoencoder, batch_size=64),
    _task("mnist_mlp_2x256", 1000, "MNIST 28x28 MLP 256-256 relu, batch 128, ~269k params: 10x "
          "larger", on_mnist, mlp, hidden_sizes=(256, 256), activations=("relu",), batch_size=128),
    _task("zen_char_rnn", 1000, "Zen of Python, char tanh RNN (embed 16, hidden 64), 32 windows "
          "of 32 chars: text, recurrence", _on, zen_of_python, "zen_of_python", char_rnn),
    _task("ill_conditioned_quadratic_100", 2000, "100-d quadratic, condition 1000, rotated, "
          "deterministic: 10x dim, ill-conditioned, 2000 steps", ill_conditioned_quadratic),
  )  # fmt: skip


def tiny_suite() -> tuple[HeldOutTask, ...]:
  """Two data-free 30-step tasks, each compiled and run in about a second (tests)."""
  return (
    _task("tiny_teacher_student", 30, "teacher 4-8-1, student 4-8-1 (tests)", teacher_student,
          in_dim=4, teacher_hidden=8, student_hidden=(8,), batch_size=16),
    _task("tiny_quadratic", 30, "8-d quadratic, condition 1000 (tests)", ill_conditioned_quadratic,
          dim=8),
  )  # fmt: skip


def get(name: str, mnist_dir: str | None = None) -> HeldOutTask:
  """The task ``name`` of ``suite(mnist_dir)`` or ``tiny_suite()``."""
  tasks = {task.name: task for task in (*suite(mnist_dir), *tiny_suite())}
  if name not in tasks:
    raise ValueError(f"Unknown held-out task {name!r}; known tasks: {', '.join(tasks)}.")
  return tasks[name]
