"""A learned optimizer in a plain flax + optax training loop, against Adam.

Trains a small MLP on scikit-learn's bundled 8x8 digits (1,797 images, no download) twice from
the same initialization and the same minibatches: once with a shipped learned optimizer dropped
in through ``learned_opt.as_optax``, once with ``optax.adam``. Prints both training-loss curves
and writes them to a PNG.

  pip install -e ".[examples]"
  python examples/optax_digits.py --steps=200 --output=digits.png

The only line that is about learned optimizers is ``learned_opt.as_optax(...)``; the rest is the
training loop a user already has.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from absl import app, flags
from sklearn.datasets import load_digits

import learned_opt

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_OPTIMIZER = flags.DEFINE_string(
  "optimizer",
  "pretrained:mnist_mlp",
  "The learned optimizer: pretrained:NAME or a saved optimizer's directory.",
)
_ADAM_LRS = flags.DEFINE_list(
  "adam_lrs",
  ["1e-3", "1e-2", "3e-2"],
  "Adam's learning rates to compare with (1e-3: what users run untuned).",
)
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps for each optimizer.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Images per minibatch.")
_HIDDEN = flags.DEFINE_integer("hidden", 32, "Hidden units of the MLP.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialization and the minibatches.")
_OUTPUT = flags.DEFINE_string("output", "digits.png", "Where the loss curves go (PNG).")


class MLP(nn.Module):
  """One hidden layer of sigmoid units, as in the paper's MNIST experiment (section 3.2)."""

  hidden: int

  @nn.compact
  def __call__(self, x):  # x: (batch, 64) -> logits (batch, 10)
    x = nn.sigmoid(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


def train(tx: optax.GradientTransformation, model, params, images, labels, batches) -> np.ndarray:
  """Training losses, shaped (steps,), of ``tx`` on the minibatch indices ``batches``."""

  def loss_fn(params, x, y):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state, index):
    loss, grads = jax.value_and_grad(loss_fn)(params, images[index], labels[index])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for index in batches:
    params, opt_state, loss = step(params, opt_state, index)
    losses.append(loss)
  return np.asarray(jax.device_get(losses))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  digits = load_digits()
  images = jnp.asarray(digits.data / 16.0, jnp.float32)  # (1797, 64), pixels in [0, 1]
  labels = jnp.asarray(digits.target, jnp.int32)  # (1797,)

  model = MLP(_HIDDEN.value)
  init_key, batch_key = jax.random.split(jax.random.key(_SEED.value))
  params = model.init(init_key, images[:1])
  batches = jax.random.randint(
    batch_key, (_STEPS.value, _BATCH_SIZE.value), 0, images.shape[0]
  )  # the same minibatches for both optimizers

  spec = _OPTIMIZER.value
  if spec.startswith("pretrained:"):
    saved = learned_opt.pretrained(spec.removeprefix("pretrained:"))
  else:
    saved = learned_opt.load(spec)
  optimizers = {
    _OPTIMIZER.value: learned_opt.as_optax(saved),  # the one line
    **{f"adam {float(lr):g}": optax.adam(float(lr)) for lr in _ADAM_LRS.value},
  }
  curves = {
    name: train(tx, model, params, images, labels, batches) for name, tx in optimizers.items()
  }

  print(f"training loss after {_STEPS.value} steps ({_HIDDEN.value} hidden units, digits 8x8):")
  for name, curve in curves.items():
    print(f"  {name:28s} {curve[-1]:.4f}  (mean over the run {curve.mean():.4f})")

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, curve in curves.items():
    ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
  ax.set(xlabel="step", ylabel="training loss", yscale="log", title="MLP on 8x8 digits")
  ax.legend()
  fig.tight_layout()
  fig.savefig(_OUTPUT.value, dpi=120)
  print(f"curves: {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
