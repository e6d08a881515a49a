"""A per-parameter MLP optimizer with normalized inputs and outputs, built to generalize.

The update rule of the recent generalizing learned optimizers (small_fc_lopt of Metz et al.,
"Practical tradeoffs between memory, compute, and performance in learned optimizers", 2022;
VeLO's per-parameter MLP, Metz et al. 2022; Celo, Moudgil et al. 2025), designed from their
descriptions: one small MLP, weights phi shared, applied to every coordinate of every leaf.

Inputs, per coordinate, all free of the gradient's and the parameter's absolute scale:

* the gradient and its momenta at decays 0.9, 0.99 and 0.999, each divided by the Adam
  denominator ``sqrt(v_hat) + eps`` (``v`` the EMA of ``g^2`` at 0.999, bias-corrected);
* the gradient divided by its leaf's root mean square (a per-tensor view of the same signal);
* the parameter divided by its leaf's root mean square;
* ``log`` of the coordinate's Adam denominator relative to its leaf's mean, clipped to +-5;
* training progress: ``tanh(t / tau)`` for ``tau`` in ``PROGRESS_TIMESCALES``, which saturate
  after a few hundred steps so that long runs see the inputs that short meta-training runs saw.

Outputs, per coordinate: a direction residual ``d`` and a log-magnitude ``a``, and

    update = -exp(phi.log_lr) * exp(B tanh(a / B)) * (m_hat_0.9 / (sqrt(v_hat) + eps) + d),

``B = magnitude_bound``. The read-out starts at zero, so an untrained phi is exactly Adam (lr
``learning_rate``, betas 0.9 and 0.999): sane and stable on any task before meta-training (a
read-out drawn even at std 0.01 left a persistent drift ``d`` that, over 1000 steps of a 269k-
parameter MLP, ended at 2.8x Adam's loss), and meta-training learns a correction to Adam rather
than an update from scratch. Scaling every gradient by ``c > 0`` leaves every input, hence
the update, unchanged (up to ``eps``); the per-tensor statistics couple the coordinates of a
leaf, so the optimizer is not coordinatewise in the contract suite's sense.

``update`` is not handed the parameters (``LearnedOptimizer``'s interface), so the state
tracks them: ``init_state`` stores theta_0 and each update adds its own step. In an
``optax.chain`` whose later transformations change the step, the tracked copy drifts from the
true parameters; the input is normalized per leaf, so only its shape within the leaf matters.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from learned_opt import backend as backend_lib
from learned_opt.base import LearnedOptimizer, check_float_params
from learned_opt.kernels import mlp as mlp_kernels

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)  # the first is Adam's beta_1: the base direction's
SECOND_MOMENT_DECAY = 0.999  # Adam's beta_2
EPSILON = 1e-8  # Adam's epsilon, on the denominator
# Floor of a leaf's mean square: a leaf that is all zeros (a bias at theta_0) gives inputs 0.
MEAN_SQUARE_FLOOR = 1e-16
LOG_RATIO_CLIP = 5.0
PROGRESS_TIMESCALES = (10.0, 30.0, 100.0, 300.0)
NUM_SCALE_FREE_FEATURES = 7  # g, three momenta, g per leaf, theta per leaf, log-denominator ratio


class LeafState(NamedTuple):
  """The optimizer's state for every coordinate of one parameter leaf."""

  momentum: jax.Array  # leaf.shape + (3,), float32: EMAs of g at MOMENTUM_DECAYS
  second_moment: jax.Array  # leaf.shape, float32: EMA of g^2 at SECOND_MOMENT_DECAY
  params: jax.Array  # leaf.shape, float32: theta tracked as theta_0 + sum of updates
  step: jax.Array  # leaf.shape, int32: updates taken (equal across coordinates)


def num_features(progress_features: int) -> int:
  """Inputs per coordinate: the scale-free features plus ``progress_features``."""
  return NUM_SCALE_FREE_FEATURES + progress_features


def init_mlp_params(key: jax.Array, sizes: tuple[int, ...], learning_rate: float) -> dict:
  """Weights of the per-coordinate MLP and the learned step size.

  Args:
    sizes: ``(features, hidden, ..., hidden)``; the read-out to 2 outputs comes after.

  Returns:
    ``{"layers": [{"w": (in, hidden), "b": (hidden,)}, ...], "out": {"w": (hidden, 2),
    "b": (2,)}, "log_lr": ()}``; hidden layers He-initialized, the read-out zero.
  """
  keys = jax.random.split(key, len(sizes))
  layers = [
    {
      "w": jax.random.normal(k, (n_in, n_out), jnp.float32) * jnp.sqrt(2.0 / n_in),
      "b": jnp.zeros((n_out,), jnp.float32),
    }
    for k, n_in, n_out in zip(keys[:-1], sizes[:-1], sizes[1:], strict=True)
  ]
  out_w = jnp.zeros((sizes[-1], 2), jnp.float32)  # meta-gradients reach it through the hidden h
  return {
    "layers": layers,
    "out": {"w": out_w, "b": jnp.zeros((2,), jnp.float32)},
    "log_lr": jnp.log(jnp.asarray(learning_rate, jnp.float32)),
  }


def _per_leaf_rms(x: jax.Array) -> jax.Array:
  """Root mean square over all coordinates of a leaf (under vmap: of one problem's leaf)."""
  return jnp.sqrt(jnp.mean(jnp.square(x)) + MEAN_SQUARE_FLOOR)


def features(
  grad: jax.Array, state: LeafState, progress_features: int
) -> tuple[jax.Array, jax.Array]:
  """The inputs of one leaf's coordinates after this step's moment updates.

  Args:
    grad: the leaf's gradient as float32, shaped ``leaf.shape``.
    state: the leaf's state *after* this step's moment updates (``step`` counts this step).

  Returns:
    ``(inputs, adam)``: ``inputs`` shaped ``leaf.shape + (features,)``; ``adam`` shaped
    ``leaf.shape``, Adam's bias-corrected direction ``m_hat / (sqrt(v_hat) + eps)``.
  """
  # Every coordinate of a leaf has taken the same steps: the step-dependent factors are computed
  # once per leaf, not once per coordinate (the leaf's largest count; 0 for an empty leaf).
  t = jnp.max(state.step, initial=0).astype(jnp.float32)
  decays = jnp.asarray(MOMENTUM_DECAYS, jnp.float32)
  m_hat = state.momentum / (1 - decays**t)
  v_hat = state.second_moment / (1 - SECOND_MOMENT_DECAY**t)
  denominator = jnp.sqrt(v_hat) + EPSILON
  normalized = m_hat / denominator[..., None]
  log_ratio = jnp.log(denominator / jnp.mean(denominator))
  columns = [
    (grad / denominator)[..., None],
    normalized,
    (grad / _per_leaf_rms(grad))[..., None],
    (state.params / _per_leaf_rms(state.params))[..., None],
    jnp.clip(log_ratio, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)[..., None],
  ]
  if progress_features:
    taus = jnp.asarray(PROGRESS_TIMESCALES[:progress_features], jnp.float32)
    columns.append(jnp.broadcast_to(jnp.tanh(t / taus), grad.shape + taus.shape))
  return jnp.concatenate(columns, axis=-1), normalized[..., 0]


def mlp_outputs(meta_params: dict, inputs: jax.Array, kernels=None) -> jax.Array:
  """The MLP on every coordinate: ``inputs`` (..., features) -> (..., 2), ReLU hidden layers;
  by the CPU kernels (``learned_opt.kernels.mlp``) with ``kernels``, their targets."""
  if kernels is not None:
    weights = [a for layer in meta_params["layers"] for a in (layer["w"], layer["b"])]
    return mlp_kernels.mlp(
      kernels, inputs, *weights, meta_params["out"]["w"], meta_params["out"]["b"]
    )
  x = inputs
  for layer in meta_params["layers"]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ meta_params["out"]["w"] + meta_params["out"]["b"]


def width_scale(shape: tuple[int, ...], reference: int) -> float:
  """``min(1, reference / fan_in)`` for a leaf of 2+ dims (fan-in: all dims but the last); 1
  for vectors, scalars or ``reference == 0``."""
  if not reference or len(shape) < 2:
    return 1.0
  return min(1.0, reference / math.prod(shape[:-1]))


def init_leaf_state(param) -> LeafState:
  """Zero moments, theta_0 and step 0 for every coordinate of one leaf."""
  shape = jnp.shape(param)
  return LeafState(
    momentum=jnp.zeros(shape + (len(MOMENTUM_DECAYS),), jnp.float32),
    second_moment=jnp.zeros(shape, jnp.float32),
    # A copy, never the caller's buffer: a state and its params are donated together.
    params=jnp.array(param, jnp.float32),
    step=jnp.zeros(shape, jnp.int32),
  )


def per_param_mlp_optimizer(
  hidden_size: int = 32,
  num_layers: int = 2,
  learning_rate: float = 1e-3,
  progress_features: int = 4,
  magnitude_bound: float = 3.0,
  width_reference: int = 0,
  *,
  backend: str | None = None,
) -> LearnedOptimizer:
  """A per-parameter MLP on normalized inputs with a normalized, Adam-anchored output.

  Args:
    hidden_size: units per hidden layer (32 and 2 layers: 1507 meta-parameters).
    num_layers: hidden ReLU layers; 0 makes the read-out linear in the inputs.
    learning_rate: the initial learned base step size ``exp(phi["log_lr"])``, Adam's at phi's
      init (1e-3, the step users run Adam with untuned).
    progress_features: how many ``tanh(t / tau)`` inputs, ``tau`` the first of
      ``PROGRESS_TIMESCALES`` (0 to 4; 0: no notion of time).
    magnitude_bound: the per-coordinate step multiplier ``exp(B tanh(a / B))`` lies in
      ``[e^-B, e^B]``, which bounds how far meta-training can move a step from Adam's.
    width_reference: 0: off. ``n > 0``: the step of a leaf of 2 or more dimensions whose fan-in
      ``f = prod(shape[:-1])`` (flax's ``(in, out)`` and ``(h, w, in, out)`` layouts) exceeds
      ``n`` is scaled by ``n / f``: muP's 1 / fan-in rule for Adam-like steps (as muLO, Therien
      et al. 2024, parameterizes learned optimizers), so a step size meta-trained on narrow
      layers carries to wide ones. Biases and vectors are not scaled.

  Returns:
    A ``LearnedOptimizer`` (kind ``"per_param_mlp"``); its update maps gradients to additive
    updates.

  Example:
    >>> opt = per_param_mlp_optimizer()
    >>> phi = opt.init_meta_params(jax.random.key(0))  # Adam at 1e-3, exactly
    >>> tx = learned_opt.as_optax(opt, phi)
  """
  if hidden_size <= 0 or num_layers < 0:
    raise ValueError(
      f"hidden_size must be positive and num_layers non-negative, got {hidden_size} and "
      f"{num_layers}; e.g. hidden_size=32, num_layers=2."
    )
  if not 0 <= progress_features <= len(PROGRESS_TIMESCALES):
    raise ValueError(
      f"progress_features must lie in [0, {len(PROGRESS_TIMESCALES)}], got {progress_features}."
    )
  if not learning_rate > 0 or not magnitude_bound > 0:
    raise ValueError(
      f"learning_rate and magnitude_bound must be positive, got {learning_rate} and "
      f"{magnitude_bound}; e.g. learning_rate=1e-3, magnitude_bound=3.0."
    )
  if width_reference < 0:
    raise ValueError(f"width_reference must be 0 (off) or positive, got {width_reference}.")
  backend = backend_lib.resolve(backend)
  config = {
    "kind": "per_param_mlp",
    "hidden_size": hidden_size,
    "num_layers": num_layers,
    "learning_rate": learning_rate,
    "progress_features": progress_features,
    "magnitude_bound": magnitude_bound,
    "width_reference": width_reference,
  }
  sizes = (num_features(progress_features),) + (hidden_size,) * num_layers
  decays = jnp.asarray(MOMENTUM_DECAYS, jnp.float32)

  def init_meta_params(key):
    return init_mlp_params(key, sizes, learning_rate)

  def init_state(meta_params, params):
    del meta_params
    check_float_params(params)
    return jax.tree.map(init_leaf_state, params)

  def leaf_update(meta_params, grad, state: LeafState, kernels):
    g = jnp.asarray(grad, jnp.float32)
    state = state._replace(
      momentum=decays * state.momentum + (1 - decays) * g[..., None],
      second_moment=SECOND_MOMENT_DECAY * state.second_moment
      + (1 - SECOND_MOMENT_DECAY) * jnp.square(g),
      step=state.step + 1,
    )
    inputs, adam = features(g, state, progress_features)
    direction, log_magnitude = jnp.moveaxis(mlp_outputs(meta_params, inputs, kernels), -1, 0)
    bound = magnitude_bound
    scale = jnp.exp(meta_params["log_lr"] + bound * jnp.tanh(log_magnitude / bound))
    step = -width_scale(g.shape, width_reference) * scale * (adam + direction)
    return step.astype(jnp.result_type(grad)), state._replace(params=state.params + step)

  def update(meta_params, grads, state):
    leaves, treedef = jax.tree.flatten(grads)
    states = treedef.flatten_up_to(state)
    # Differentiated (meta-training), a leaf's update is recomputed from its gradient and state
    # in the backward pass rather than saving the MLP's activations: ~3 hidden vectors a
    # coordinate a step, whose writes and reads cost more than the recomputation (BUILD.md,
    # ppm_bucket).
    update_leaf = jax.checkpoint(leaf_update, static_argnums=(3,))
    kernels = backend_lib.kernel_targets(backend, meta_params, states, family=mlp_kernels.targets)
    pairs = [update_leaf(meta_params, g, s, kernels) for g, s in zip(leaves, states, strict=True)]
    return (
      treedef.unflatten([u for u, _ in pairs]),
      treedef.unflatten([s for _, s in pairs]),
    )

  return LearnedOptimizer(init_meta_params, init_state, update, config, backend)
