"""The paper's hand-designed baselines (section 3) and their learning-rate grid.

Hyperparameters other than the learning rate follow the defaults of Torch7's ``optim`` package,
as the paper does: RMSprop alpha 0.99, eps 1e-8; Adam betas (0.9, 0.999), eps 1e-8; Adadelta rho
0.9, eps 1e-6; Adagrad with no initial accumulator and eps 1e-10; Rprop eta (0.5, 1.2) with step
sizes in [1e-6, 50], the learning rate being its initial step size. NAG is Nesterov's accelerated
gradient with momentum fixed at 0.9, in optax's form: its parameters are the look-ahead point
theta + 0.9 v of Sutskever et al.'s (2013) formulation.

``MORE_BASELINES`` go beyond the paper: AdamW (Loshchilov and Hutter, 2019) with Adam's betas and
eps and decoupled weight decay 0.01 (PyTorch's default), for the held-out suite (``eval.suite``).
``ALL_BASELINES`` holds both; the paper's experiments default to ``BASELINES``.
"""

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import optax

BASELINES: dict[str, Callable[[float], optax.GradientTransformation]] = {
  "sgd": lambda lr: optax.sgd(lr),
  "nag": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
  "rmsprop": lambda lr: optax.rmsprop(lr, decay=0.99, eps=1e-8),
  "adam": lambda lr: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8),
  "adadelta": lambda lr: optax.adadelta(lr, rho=0.9, eps=1e-6),
  "adagrad": lambda lr: optax.adagrad(lr, initial_accumulator_value=0.0, eps=1e-10),
  "rprop": lambda lr: optax.rprop(
    lr, eta_minus=0.5, eta_plus=1.2, min_step_size=1e-6, max_step_size=50.0
  ),
}


MORE_BASELINES: dict[str, Callable[[float], optax.GradientTransformation]] = {
  "adamw": lambda lr: optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01),
}
ALL_BASELINES = {**BASELINES, **MORE_BASELINES}


def paper_learning_rates(num: int = 30) -> np.ndarray:
  """The grid of section 3: 1e-6 * 2^k for k = 0, ..., num - 1 (1e-6 ... 537)."""
  return 1e-6 * 2.0 ** np.arange(num)


def best_learning_rate(final_losses: jnp.ndarray) -> int:
  """Index of the learning rate with the lowest mean final loss; NaN counts as +inf.

  Args:
    final_losses: shaped (lrs, problems).
  """
  clean = jnp.where(jnp.isfinite(final_losses), final_losses, jnp.inf)
  return int(jnp.argmin(jnp.mean(clean, axis=1)))
