"""Plain (non-differentiated) optimization runs of any optax transformation over many problems."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from tasks.base import TaskFamily


def rollout(
  task: TaskFamily,
  tx: optax.GradientTransformation,
  task_params,
  key: jax.Array,
  num_steps: int,
) -> jax.Array:
  """Optimizes one problem for ``num_steps`` steps from theta_0 drawn with ``key``.

  Returns:
    Losses shaped (num_steps + 1,): f(theta_0), ..., f(theta_T), minibatch t drawn with
    ``fold_in(data_key, t)`` as in meta-training.
  """
  init_key, data_key = jax.random.split(key)
  params = task.init(task_params, init_key)

  def step(carry, t):
    params, state = carry
    loss, grads = jax.value_and_grad(task.loss, argnums=1)(
      task_params, params, jax.random.fold_in(data_key, t)
    )
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(num_steps))
  final = task.loss(task_params, params, jax.random.fold_in(data_key, num_steps))
  return jnp.concatenate([losses, final[None]])


def sample_problems(task: TaskFamily, key: jax.Array, num_problems: int):
  """Draws ``num_problems`` problems and their run keys: ``(task_params, run_keys)``."""
  sample_key, run_key = jax.random.split(key)
  task_params = jax.vmap(task.sample)(jax.random.split(sample_key, num_problems))
  return task_params, jax.random.split(run_key, num_problems)


def rollout_batch(task, tx, task_params, keys, num_steps: int) -> jax.Array:
  """``rollout`` vmapped over problems: losses shaped (problems, num_steps + 1)."""
  return jax.vmap(lambda p, k: rollout(task, tx, p, k, num_steps))(task_params, keys)


def rollout_lr_grid(
  task: TaskFamily,
  make_tx: Callable[[jax.Array], optax.GradientTransformation],
  learning_rates: jax.Array,
  task_params,
  keys: jax.Array,
  num_steps: int,
  lr_batch_size: int | None = None,
) -> jax.Array:
  """Runs ``make_tx(lr)`` for every learning rate on every problem in one computation.

  Args:
    make_tx: ``lr -> optax transformation``; ``lr`` is a traced scalar.
    learning_rates: shaped (lrs,).
    lr_batch_size: learning rates vmapped at once (``lax.map`` over the rest) to bound memory;
      ``None`` vmaps them all.

  Returns:
    Losses shaped (lrs, problems, num_steps + 1).
  """
  run = lambda lr: rollout_batch(task, make_tx(lr), task_params, keys, num_steps)
  if lr_batch_size is None:
    return jax.vmap(run)(learning_rates)
  return jax.lax.map(run, learning_rates, batch_size=lr_batch_size)
