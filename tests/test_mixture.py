"""The task mixture (``tasks.mixture``): its buckets, its bucket choice, its augmentation, and a
meta-training loop over two buckets that learns. Data is small synthetic arrays in the loaders'
layout, never files."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt
import tasks
from tasks import augment, image_data, image_nets, mixture
from train import meta_step, unroll
from train.config import MetaTrainConfig


def synthetic_sources(num: int = 64, seed: int = 0) -> dict:
  """uint8 images and labels shaped as ``mnist_data.load`` and ``cifar10_data.load`` return
  them: a blocky random template per class plus noise, so a small net can learn the labels."""
  rng = np.random.default_rng(seed)

  def images(side, channels):
    templates = rng.uniform(0, 255, (10, 4, 4, channels))
    labels = rng.integers(0, 10, num)
    blocks = np.kron(templates[labels], np.ones((1, side // 4, side // 4, 1)))
    noisy = blocks + rng.normal(0, 40, blocks.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), labels.astype(np.uint8)

  mnist_images, mnist_labels = images(28, 1)
  return {"mnist": (mnist_images[..., 0], mnist_labels), "cifar10": images(32, 3)}


@pytest.fixture(scope="module")
def default_mixture():
  return mixture.mixture("default", sources=synthetic_sources())


@pytest.mark.parametrize(
  "dataset, size, grey, shape",
  [("mnist", 8, True, (5, 8, 8, 1)), ("cifar10", 16, False, (5, 16, 16, 3)),
   ("cifar10", 16, True, (5, 16, 16, 1)), ("mnist", 28, False, (5, 28, 28, 1))],
)  # fmt: skip
def test_prepare_resizes_and_greys(dataset, size, grey, shape):
  images, labels = (x[:5] for x in synthetic_sources()[dataset])
  split = image_data.prepare(images, labels, size, grey)
  assert split.images.shape == shape and split.images.dtype == jnp.uint8
  assert split.mean.shape == split.std.shape == shape[-1:]
  np.testing.assert_array_equal(split.labels, labels)


def test_prepare_keeps_a_constant_image_constant():
  images = np.full((2, 32, 32, 3), 200, np.uint8)
  split = image_data.prepare(images, np.zeros(2), 8, grey=True)
  np.testing.assert_array_equal(split.images, 200)


def test_default_buckets_are_many_fixed_and_distinct():
  names = [spec.name for spec in mixture.specs("default")]
  assert len(names) == len(set(names)) == 12
  kinds = {spec.kind for spec in mixture.specs("default")}
  assert kinds == {"quadratic", "mlp", "conv"}
  widths = [w for spec in mixture.specs("default") if spec.kind == "mlp" for w in spec.widths]
  assert min(widths) <= 8 and max(widths) >= 256
  assert {len(spec.widths) for spec in mixture.specs("default") if spec.kind == "mlp"} == {
    0,
    1,
    2,
    3,
  }
  sizes = {spec.size for spec in mixture.specs("default") if spec.dataset}
  assert {8, 16} <= sizes and (28 in sizes or 32 in sizes)


def test_small_data_buckets_keep_their_first_images_with_their_own_statistics():
  specs = mixture.specs("default_small_data")
  assert specs[:12] == mixture.specs("default")
  small = [s for s in specs if s.examples]
  assert len(small) == 3 and all(s.name.endswith(f"_n{s.examples}") for s in small)
  spec = small[0]._replace(examples=10)
  bucket = mixture.build_bucket(
    spec, mixture._bucket_data(spec, "train", {}, synthetic_sources()), 0.0
  )
  images, labels = synthetic_sources()["mnist"]
  whole = image_data.prepare(images, labels, spec.size, spec.grey)
  np.testing.assert_array_equal(bucket.data.images, whole.images[:10])
  pixels = np.asarray(whole.images[:10], np.float64) / 255.0
  np.testing.assert_allclose(bucket.data.mean, [pixels.mean()], rtol=1e-5)
  np.testing.assert_allclose(bucket.data.std, [pixels.std()], rtol=1e-4)


@pytest.mark.slow  # 12 compiles
def test_every_bucket_samples_inits_and_evaluates(default_mixture):
  """One jitted draw per bucket: a finite loss, theta shaped as the bucket's spec says."""
  for spec, task in zip(mixture.specs("default"), default_mixture.buckets, strict=True):
    assert task.name == spec.name

    def draw(data, key, task=task):
      problem = task.sample(data, jax.random.fold_in(key, 0))
      theta = task.init(data, problem, jax.random.fold_in(key, 1))
      return theta, task.loss(data, problem, theta, jax.random.fold_in(key, 2))

    theta, loss = jax.jit(draw)(task.data, jax.random.key(0))
    assert loss.shape == () and bool(jnp.isfinite(loss)), spec.name
    leaves = jax.tree.leaves(theta)
    assert all(x.dtype == jnp.float32 for x in leaves)
    if spec.kind == "quadratic":
      assert theta["theta"].shape == spec.widths
      continue
    channels = 1 if spec.grey or spec.dataset == "mnist" else 3
    assert task.data.images.shape[1:] == (spec.size, spec.size, channels)
    first = theta["conv_0" if spec.kind == "conv" else "layer_0"]["kernel"]
    if spec.kind == "conv":
      assert first.shape == (3, 3, channels, spec.widths[0])
    else:
      assert first.shape == (spec.size**2 * channels, (spec.widths or (10,))[0])
    assert 0.5 < float(loss) < 20, spec.name  # cross-entropy of 10 classes near log(10)


def test_bucket_choice_is_deterministic_and_covers_the_buckets(default_mixture):
  draws = [mixture.bucket_index(default_mixture, 3, n) for n in range(600)]
  assert draws == [mixture.bucket_index(default_mixture, 3, n) for n in range(600)]
  assert draws != [mixture.bucket_index(default_mixture, 4, n) for n in range(600)]
  counts = np.bincount(draws, minlength=12)
  assert counts.min() > 20  # uniform: 50 expected each


def _plain_and_augmented(spec):
  data = mixture._bucket_data(spec, "train", {}, synthetic_sources())  # noqa: SLF001
  return mixture.build_bucket(spec, data, 0.0), mixture.build_bucket(spec, data, 1.0)


@pytest.mark.parametrize("index", [0, 3, 10])  # the quadratic, an MLP, a conv net
def test_augmentation_preserves_the_function(index):
  """loss'(theta / s) == loss(theta), and theta'_0 = theta_0 / s, per tensor."""
  spec = mixture.specs("default")[index]
  plain, augmented = _plain_and_augmented(spec)
  problem = augmented.sample(augmented.data, jax.random.key(0))
  scales = jax.tree.leaves(problem["scales"])
  assert len(scales) == len(jax.tree.leaves(augment.theta_shapes(plain)))
  assert all(0.1 <= float(s) <= 10.0 for s in scales)
  assert len({float(s) for s in scales}) == len(scales)  # one scale per tensor
  theta = plain.init(plain.data, problem["task"], jax.random.key(1))
  theta_prime = augmented.init(augmented.data, problem, jax.random.key(1))
  chex.assert_trees_all_close(augment.unscale(problem, theta), theta_prime, rtol=1e-6)
  key = jax.random.key(2)
  value_and_grad = lambda task: jax.jit(jax.value_and_grad(task.loss, argnums=2))
  loss, grad = value_and_grad(augmented)(augmented.data, problem, theta_prime, key)
  plain_loss, plain_grad = value_and_grad(plain)(plain.data, problem["task"], theta, key)
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-5)
  # The gradient in the new coordinates is s times the old one, per tensor.
  chex.assert_trees_all_close(grad, augment.scale(problem, plain_grad), rtol=1e-4, atol=1e-6)


def test_activation_varies_between_problems_of_a_bucket():
  spec = mixture.specs("default")[3]
  task, _ = _plain_and_augmented(spec)
  draws = {int(task.sample(task.data, jax.random.key(i))["activation"]) for i in range(40)}
  assert draws == set(range(len(image_nets.ACTIVATIONS)))


def test_registry_builds_one_bucket_and_rebuilds_it_from_its_config():
  task = tasks.get("mixture", bucket="quadratic_10")
  assert task.name == "quadratic_10" and task.config["bucket"] == "quadratic_10"
  config = dict(task.config)
  assert tasks.get(config.pop("name"), **config).config == task.config
  with pytest.raises(ValueError, match="no bucket 'nope'.*quadratic_10"):
    tasks.get("mixture", bucket="nope")


@pytest.mark.slow  # two train-step compiles and 30 meta-steps
def test_a_mixture_meta_training_loop_learns(tmp_path):
  """Meta-training the mlp optimizer over the two tiny buckets, one compiled train step per
  bucket and the bucket of step n drawn by ``bucket_index``, lowers the meta-loss of fixed
  held-out problems of both buckets."""
  mix = mixture.mixture("tiny", sources=synthetic_sources(num=256))
  config = MetaTrainConfig(
    output_dir=str(tmp_path),
    task="mixture",
    task_kwargs={"preset": "tiny", "bucket": "quadratic_4"},
    optimizer="per_param_mlp",
    optimizer_kwargs={"hidden_size": 8},
    unroll=10,
    horizon=10,
    num_problems=8,
    meta_lr=3e-2,
    meta_objective="log_sum",
  )
  optimizer = learned_opt.build(config.optimizer_config())

  def held_out_loss(phi, task):
    inner = unroll.init_inner_batch(task, optimizer, phi, task.data, jax.random.key(99), 16)
    return float(
      unroll.meta_loss(
        phi, inner, task.data, task=task, optimizer=optimizer, num_steps=10, objective="log_sum"
      )[0]
    )

  state = meta_step.init_state(config, mix.buckets[0], optimizer)
  before = [held_out_loss(state.meta_params, task) for task in mix.buckets]
  inners, steps, drawn = {}, {}, []
  for n in range(30):
    b = mixture.bucket_index(mix, config.seed, n)
    task = mix.buckets[b]
    drawn.append(b)
    if b not in steps:  # one compile per bucket
      steps[b] = meta_step.jit_train_step(config, task, optimizer)
      inners[b] = meta_step.fresh_problems(config, task, optimizer, state.meta_params, task.data, n)
    state, metrics = steps[b](state._replace(inner=inners[b]), task.data)
    inners[b] = state.inner
    assert bool(metrics.finite)
  assert set(drawn) == {0, 1}
  after = [held_out_loss(state.meta_params, task) for task in mix.buckets]
  assert all(math.isfinite(a) for a in after)
  assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
