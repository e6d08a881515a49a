"""The MNIST MLP task family against a hand computation in numpy, and its task contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mnist_files import write_mnist

import learned_opt
import tasks
from tasks import mnist as mnist_task


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("mnist")
  return str(directory), write_mnist(str(directory))


def _numpy_loss(params, images, labels, index, activation):
  x = images[index].reshape(len(index), -1).astype(np.float64) / 255.0
  layers = [params[f"layer_{i}"] for i in range(len(params))]
  for i, layer in enumerate(layers):
    x = x @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"], np.float64)
    if i < len(layers) - 1:
      x = 1 / (1 + np.exp(-x)) if activation == "sigmoid" else np.maximum(x, 0)
  log_z = np.log(np.sum(np.exp(x - x.max(1, keepdims=True)), 1)) + x.max(1)
  return np.mean(log_z - x[np.arange(len(index)), labels[index]])


@pytest.mark.parametrize(
  "hidden_sizes,activation,split",
  [((3,), "sigmoid", "train"), ((4, 2), "sigmoid", "test"), ((3,), "relu", "train")],
)
def test_loss_matches_numpy(mnist_dir, hidden_sizes, activation, split):
  directory, data = mnist_dir
  task = mnist_task.mnist_mlp(
    hidden_sizes, activation, batch_size=6, split=split, init_std=0.5, mnist_dir=directory
  )
  params = task.init(task.data, task.sample(task.data, jax.random.key(0)), jax.random.key(1))
  key = jax.random.key(2)
  images, labels = data[split]
  # The documented minibatch: 6 indices uniform over the split, drawn with the loss's key.
  index = np.asarray(jax.random.randint(key, (6,), 0, len(labels)))
  expected = _numpy_loss(params, images, labels, index, activation)
  np.testing.assert_allclose(float(task.loss(task.data, {}, params, key)), expected, rtol=1e-5)


def test_parameters_shapes_and_gaussian_init(mnist_dir):
  task = mnist_task.mnist_mlp((20,), mnist_dir=mnist_dir[0])
  params = task.init(task.data, {}, jax.random.key(0))
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes == {
    "layer_0": {"w": (784, 20), "b": (20,)},
    "layer_1": {"w": (20, 10), "b": (10,)},
  }
  w = np.asarray(params["layer_0"]["w"])
  assert abs(w.std() - 0.1) < 0.005 and abs(w.mean()) < 0.005


def test_vmappable_and_keys_decide_minibatch_and_init(mnist_dir):
  task = mnist_task.mnist_mlp((5,), batch_size=4, mnist_dir=mnist_dir[0])
  problems = jax.vmap(task.sample, (None, 0))(task.data, jax.random.split(jax.random.key(0), 3))
  init = jax.vmap(task.init, (None, 0, 0))
  params = init(task.data, problems, jax.random.split(jax.random.key(1), 3))
  assert params["layer_0"]["w"].shape == (3, 784, 5)
  keys = jax.random.split(jax.random.key(2), 3)
  losses = jax.jit(jax.vmap(task.loss, (None, 0, 0, 0)))(task.data, problems, params, keys)
  assert losses.shape == (3,) and len(set(np.asarray(losses).tolist())) == 3
  one = jax.tree.map(lambda a: a[0], params)
  same = [float(task.loss(task.data, {}, one, jax.random.key(7))) for _ in range(2)]
  other = float(task.loss(task.data, {}, one, jax.random.key(8)))
  assert same[0] == same[1] != other


def test_gradient_descent_lowers_the_loss(mnist_dir):
  task = mnist_task.mnist_mlp((8,), batch_size=12, init_std=0.1, mnist_dir=mnist_dir[0])
  params = task.init(task.data, {}, jax.random.key(0))
  grad = jax.jit(jax.value_and_grad(task.loss, argnums=2))
  first, _ = grad(task.data, {}, params, jax.random.key(1))
  for t in range(30):
    _, g = grad(task.data, {}, params, jax.random.key(t))
    params = jax.tree.map(lambda p, d: p - 0.5 * d, params, g)
  last, _ = grad(task.data, {}, params, jax.random.key(1))
  assert float(last) < 0.8 * float(first)


def test_registered_and_rebuilt_from_its_config(mnist_dir):
  task = tasks.get("mnist_mlp", hidden_sizes=[20, 20], mnist_dir=mnist_dir[0])
  config = dict(task.config)
  rebuilt = tasks.get(config.pop("name"), **config)
  assert rebuilt.config == task.config and rebuilt.config["hidden_sizes"] == [20, 20]
  params = task.init(task.data, {}, jax.random.key(0))
  assert float(task.loss(task.data, {}, params, jax.random.key(1))) == float(
    rebuilt.loss(rebuilt.data, {}, params, jax.random.key(1))
  )


@pytest.mark.parametrize(
  "kwargs,message",
  [
    ({"activation": "tanh"}, "Unknown activation"),
    ({"hidden_sizes": ()}, "hidden_sizes"),
    ({"batch_size": 0}, "batch_size"),
  ],
)
def test_bad_settings_raise(mnist_dir, kwargs, message):
  with pytest.raises(ValueError, match=message):
    mnist_task.mnist_mlp(mnist_dir=mnist_dir[0], **kwargs)


def test_data_is_a_jit_argument_never_a_compiled_constant(mnist_dir, tmp_path):
  """The meta-training step compiles to the same program for 16 or 256 examples of data."""
  from train import meta_step
  from train.config import MetaTrainConfig

  big_dir = str(tmp_path / "big")
  write_mnist(big_dir, sizes=(("train", 256), ("test", 4)))
  texts = {}
  for name, directory in (("small", mnist_dir[0]), ("big", big_dir)):
    config = MetaTrainConfig(
      output_dir=str(tmp_path / name),
      task="mnist_mlp",
      task_kwargs={"hidden_sizes": [3], "batch_size": 5, "mnist_dir": directory},
      optimizer_kwargs={"hidden_size": 4},
      unroll=2,
      horizon=4,
      num_problems=2,
    )
    task = tasks.get("mnist_mlp", **config.task_kwargs)
    optimizer = learned_opt.build(config.optimizer_config())
    state = meta_step.init_state(config, task, optimizer)
    step = jax.jit(meta_step.make_train_step(config, task, optimizer))
    texts[name] = step.lower(state, task.data).as_text()
  # As constants, 240 more images would add at least 240 * 784 characters to the program.
  assert abs(len(texts["big"]) - len(texts["small"])) < 1000
