"""The CIFAR-10 conv-net task family: against numpy, both convolutions, its parameter groups, and
two learned optimizers (conv and fully connected) meta-trained on it end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cifar10_files import write_binary

import learned_opt
import tasks
from learned_opt import parameter_groups
from tasks import cifar10 as cifar10_task

SMALL = {"channels": (2, 3, 2), "hidden_size": 4}


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
  """Binary batches of 4 examples each: 20 training and 6 test examples."""
  directory = tmp_path_factory.mktemp("cifar10")
  return str(directory), write_binary(str(directory), train_per_batch=4, test=6)


@pytest.fixture(scope="module")
def small_params():
  """theta_0 of the SMALL net for 10 classes, biases made non-zero; one compile for all tests."""
  sizes = cifar10_task.layer_sizes(SMALL["channels"], SMALL["hidden_size"], 10)
  params = jax.jit(lambda key: cifar10_task.init_convnet(key, sizes))(jax.random.key(1))
  return jax.tree.map(lambda a: a + 0.1, params)


def _small_task(cifar10_dir, **kwargs):
  return cifar10_task.cifar10_conv(**{**SMALL, "cifar10_dir": cifar10_dir[0], **kwargs})


def _numpy_loss(params, images, labels, normalize=False):
  """The documented model in float64: conv (sum of shifted matmuls), batch norm, pool, ReLU."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = images.astype(np.float64) / 255.0
  if normalize:
    x = (x - np.asarray(cifar10_task.CHANNEL_MEAN)) / np.asarray(cifar10_task.CHANNEL_STD)

  def norm(h, axes):
    mean = h.mean(axes, keepdims=True)
    return (h - mean) / np.sqrt(((h - mean) ** 2).mean(axes, keepdims=True) + 1e-5)

  for i in range(len(params) - 2):
    kernel, (b, h, w, _) = p[f"conv_{i}"]["kernel"], x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(
      padded[:, di : di + h, dj : dj + w] @ kernel[di, dj] for di in range(3) for dj in range(3)
    )
    out = np.maximum(norm(out, (0, 1, 2)) + p[f"conv_{i}"]["bias"], 0)
    x = out.reshape(b, h // 2, 2, w // 2, 2, -1).max((2, 4))
  x = x.reshape(len(x), -1)
  x = np.maximum(norm(x @ p["fc_0"]["kernel"], (0,)) + p["fc_0"]["bias"], 0)
  z = x @ p["fc_1"]["kernel"] + p["fc_1"]["bias"]
  log_z = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
  return np.mean(log_z - z[np.arange(len(z)), labels])


def test_loss_matches_numpy(cifar10_dir, small_params):
  """On the test split, per-channel normalized, with the shifted-slices convolution
  (``test_both_conv_impls_give_the_same_loss_and_gradient`` checks ``conv_impl="xla"``)."""
  task = _small_task(cifar10_dir, batch_size=6, normalize=True, split="test")
  params, key = small_params, jax.random.key(2)
  images, labels = cifar10_dir[1]["test"]
  # The documented minibatch: 6 indices uniform over the split, drawn with the loss's key.
  index = np.asarray(jax.random.randint(key, (6,), 0, len(labels)))
  expected = _numpy_loss(params, images[index], labels[index], normalize=True)
  loss = jax.jit(task.loss)(task.data, task.sample(task.data, key), params, key)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)


def test_shift_convolution_is_the_xla_convolution():
  """A non-square odd kernel on a non-square image (the model's 3 x 3 is in the loss tests)."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 6, 2))
  kernel = jax.random.normal(jax.random.key(1), (5, 3, 2, 3))
  both = jax.jit(lambda x, k: (cifar10_task.conv_shift(x, k), cifar10_task.conv_xla(x, k)))
  np.testing.assert_allclose(*both(x, kernel), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_both_conv_impls_give_the_same_loss_and_gradient(cifar10_dir, small_params):
  shift = _small_task(cifar10_dir, batch_size=8, conv_impl="shift")
  xla = _small_task(cifar10_dir, batch_size=8, conv_impl="xla")
  key = jax.random.key(3)
  grads = jax.jit(
    lambda data, params: [
      jax.value_and_grad(task.loss, argnums=2)(data, {}, params, key) for task in (shift, xla)
    ]
  )
  (loss_s, grad_s), (loss_x, grad_x) = grads(shift.data, small_params)
  np.testing.assert_allclose(loss_s, loss_x, rtol=1e-5)
  for g_s, g_x in zip(jax.tree.leaves(grad_s), jax.tree.leaves(grad_x), strict=True):
    np.testing.assert_allclose(g_s, g_x, rtol=1e-3, atol=1e-6)
  assert min(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_s)) > 1e-4  # none all zero


def test_default_parameters_count_and_groups(cifar10_dir):
  task = cifar10_task.cifar10_conv(cifar10_dir=cifar10_dir[0])
  params = jax.eval_shape(task.init, task.data, {}, jax.random.key(0))
  shapes = jax.tree.map(lambda x: x.shape, params)
  assert shapes == {
    "conv_0": {"kernel": (3, 3, 3, 16), "bias": (16,)},
    "conv_1": {"kernel": (3, 3, 16, 16), "bias": (16,)},
    "conv_2": {"kernel": (3, 3, 16, 16), "bias": (16,)},
    "fc_0": {"kernel": (256, 32), "bias": (32,)},
    "fc_1": {"kernel": (32, 10), "bias": (10,)},
  }
  assert sum(x.size for x in jax.tree.leaves(params)) == 13642
  labels = {
    jax.tree_util.keystr(path): parameter_groups.conv_fc(path, leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  assert all((label == "conv") == ("conv" in path) for path, label in labels.items())
  assert list(labels.values()).count("conv") == 6


def test_class_subset_sizes_the_output_layer(cifar10_dir):
  task = _small_task(cifar10_dir, classes=[7, 2, 5], batch_size=4)
  _, labels = cifar10_dir[1]["train"]
  relabel = {7: 0, 2: 1, 5: 2}  # position in the given order
  expected = [relabel[int(x)] for x in labels if int(x) in relabel]
  assert np.asarray(task.data.labels).tolist() == expected and len(expected) > 1
  params = jax.eval_shape(task.init, task.data, {}, jax.random.key(0))
  assert params["fc_1"]["kernel"].shape == (4, 3)
  assert jax.eval_shape(task.loss, task.data, {}, params, jax.random.key(1)).shape == ()


@pytest.mark.slow
def test_vmappable_keys_decide_minibatch_and_init_and_initial_loss(cifar10_dir):
  """Five problems in one jitted call: theta_0 from init keys a, a, a, b, c, minibatches from
  keys k1, k1, k2, k3, k3; at theta_0 the loss is near log(10) (kernels N(0, 1 / fan_in))."""
  task = _small_task(cifar10_dir, batch_size=20)

  def losses(data, init_keys, loss_keys):
    problems = jax.vmap(task.sample, (None, 0))(data, init_keys)
    params = jax.vmap(task.init, (None, 0, 0))(data, problems, init_keys)
    return params, jax.vmap(task.loss, (None, 0, 0, 0))(data, problems, params, loss_keys)

  a, b, c, k1, k2, k3 = jax.random.split(jax.random.key(0), 6)
  params, values = jax.jit(losses)(
    task.data, jnp.stack([a, a, a, b, c]), jnp.stack([k1, k1, k2, k3, k3])
  )
  assert params["conv_0"]["kernel"].shape == (5, 3, 3, 3, 2)
  v = np.asarray(values).tolist()
  assert v[0] == v[1] != v[2]  # the same theta_0: the key alone picks the minibatch
  assert v[3] != v[4]  # the same minibatch: the init key picks theta_0
  assert abs(np.mean(v) - np.log(10)) < 0.5


@pytest.mark.slow
def test_gradient_descent_lowers_the_loss(cifar10_dir, small_params):
  task, params = _small_task(cifar10_dir, batch_size=20), small_params

  def descend(data, params):
    def body(params, t):
      loss, g = jax.value_and_grad(task.loss, argnums=2)(data, {}, params, jax.random.key(t))
      return jax.tree.map(lambda p, d: p - 0.3 * d, params, g), loss

    return jax.lax.scan(body, params, jnp.arange(40))[1]

  losses = jax.jit(descend)(task.data, params)
  assert float(losses[-5:].mean()) < 0.6 * float(losses[:5].mean())


def test_registered_and_rebuilt_from_its_config(cifar10_dir):
  task = tasks.get("cifar10_conv", **SMALL, classes=["cat", "dog"], cifar10_dir=cifar10_dir[0])
  config = dict(task.config)
  rebuilt = tasks.get(config.pop("name"), **config)
  assert rebuilt.config == task.config and rebuilt.config["classes"] == ["cat", "dog"]
  assert rebuilt.data.images is task.data.images  # one device copy per source and subset


@pytest.mark.parametrize(
  "kwargs,message",
  [
    ({"conv_impl": "cudnn"}, "Unknown conv_impl"),
    ({"channels": ()}, "channels"),
    ({"batch_size": 1}, "batch_size"),
    ({"classes": [4]}, "classes="),
  ],
)
def test_bad_settings_raise(cifar10_dir, kwargs, message):
  with pytest.raises(ValueError, match=message):
    _small_task(cifar10_dir, **kwargs)


def test_data_is_a_jit_argument_never_a_compiled_constant(cifar10_dir, tmp_path):
  big_dir = str(tmp_path / "big")
  write_binary(big_dir, train_per_batch=40, test=1)
  texts = {}
  for name, directory in (("small", cifar10_dir[0]), ("big", big_dir)):
    task = cifar10_task.cifar10_conv(**SMALL, batch_size=4, cifar10_dir=directory)
    params = jax.eval_shape(task.init, task.data, {}, jax.random.key(0))
    texts[name] = jax.jit(task.loss).lower(task.data, {}, params, jax.random.key(1)).as_text()
  # As constants, 180 more images would add at least 180 * 3072 characters to the program.
  assert abs(len(texts["big"]) - len(texts["small"])) < 1000


@pytest.mark.slow
def test_two_lstms_conv_and_fc_meta_train_end_to_end(cifar10_dir, tmp_path):
  """Section 3.3: one LSTM for conv parameters, another for fully connected ones, each with its
  own phi, built from the config the trainer uses and meta-trained for two steps."""
  from train import meta_step
  from train.config import MetaTrainConfig

  lstm = {"kind": "lstm", "hidden_size": 4}
  # One conv layer has both groups and compiles the meta-step ~3 s faster than three.
  config = MetaTrainConfig(
    output_dir=str(tmp_path),
    task="cifar10_conv",
    task_kwargs={"channels": [2], "hidden_size": 4, "batch_size": 8, "cifar10_dir": cifar10_dir[0]},
    optimizer="partition",
    optimizer_kwargs={"rule": "conv_fc", "optimizers": {"conv": lstm, "fc": lstm}},
    unroll=2,
    horizon=4,
    num_problems=1,
    valid_problems=1,
  )
  task = tasks.get(config.task, **config.task_kwargs)
  optimizer = learned_opt.build(config.optimizer_config())
  state = meta_step.init_state(config, task, optimizer)
  before = jax.tree.map(np.asarray, state.meta_params)
  assert sorted(before) == ["conv", "fc"]
  step = jax.jit(meta_step.make_train_step(config, task, optimizer))
  for _ in range(2):
    state, metrics = step(state, task.data)
    assert bool(metrics.finite) and np.isfinite(float(metrics.meta_loss))
  for label in ("conv", "fc"):
    old, new = jax.tree.leaves(before[label]), jax.tree.leaves(state.meta_params[label])
    assert all(np.isfinite(np.asarray(n)).all() for n in new), label
    assert any(not np.array_equal(o, n) for o, n in zip(old, new, strict=True)), label
  # Each group's LSTM keeps state for exactly its own leaves: the conv kernel and bias, or 2 fc
  # kernels and 2 fc biases. Per-coordinate state keeps its parameter's shape (DESIGN.md), so
  # every state array starts with the shape of one of the group's leaves (with problems axis).
  shapes = {"conv": [], "fc": []}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.inner.params):
    shapes[parameter_groups.conv_fc(path, leaf)].append(leaf.shape)
  assert [len(shapes["conv"]), len(shapes["fc"])] == [2, 4]
  for label, group_state in state.inner.opt_state.inner.items():
    heads = {x.shape[: len(shape)] for x in jax.tree.leaves(group_state) for shape in shapes[label]}
    assert set(shapes[label]) <= heads, label
    other = shapes["fc" if label == "conv" else "conv"]
    assert not any(x.shape[: len(s)] == s for x in jax.tree.leaves(group_state) for s in other)
