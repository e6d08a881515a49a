"""Task augmentation by reparameterization: theta = s * theta', one random scale s per tensor.

The augmented problem is the same function of the same parameters, written in new coordinates:
``loss'(theta') = loss(s * theta')`` and ``theta'_0 = theta_0 / s``. Its gradient is
``s * grad loss``, and the step that keeps the training trajectory is ``1 / s`` times the original
step, so an optimizer that keys on the absolute scale of a tensor's gradients or values does well
on one scale only; drawing ``log10 s`` uniformly from ``[-log10_range, log10_range]`` makes it
pay for that (Celo, Moudgil et al. 2025; VeLO, Metz et al. 2022).
"""

import jax
import jax.numpy as jnp

from tasks.base import TaskFamily


def theta_shapes(task: TaskFamily):
  """``jax.ShapeDtypeStruct``s of the task's theta (from its data's shapes; nothing is run)."""

  def draw(data, key):
    sample_key, init_key = jax.random.split(key)
    return task.init(data, task.sample(data, sample_key), init_key)

  return jax.eval_shape(draw, task.data, jax.random.key(0))


def scale(task_params, params):
  """``s * theta'``: the original parameters of augmented ones."""
  return jax.tree.map(lambda x, s: x * s, params, task_params["scales"])


def unscale(task_params, params):
  """``theta / s``: augmented parameters of original ones."""
  return jax.tree.map(lambda x, s: x / s, params, task_params["scales"])


def rescaled(task: TaskFamily, log10_range: float = 1.0) -> TaskFamily:
  """``task`` with each parameter tensor rescaled by its own random ``s = 10^U(-r, r)``.

  Args:
    task: any family whose theta is a pytree of float arrays of fixed shapes.
    log10_range: ``r``; 0 returns ``task`` itself.

  Returns:
    A ``TaskFamily`` of the same name and data. Its problems are
    ``{"task": task's problem, "scales": a scalar per theta leaf}``; ``init`` returns
    ``theta_0 / s`` and ``loss(theta')`` is ``task.loss(s * theta')``.

  Example:
    >>> task = rescaled(quadratic(), log10_range=1.0)
    >>> problem = task.sample(task.data, jax.random.key(0))
    >>> theta = task.init(task.data, problem, jax.random.key(1))  # theta_0 / s
  """
  if not log10_range >= 0:
    raise ValueError(f"log10_range must be >= 0, got {log10_range}; e.g. 1.0 (s in [0.1, 10]).")
  if log10_range == 0:
    return task
  leaves, treedef = jax.tree.flatten(theta_shapes(task))

  def sample(data, key):
    task_key, scale_key = jax.random.split(key)
    exponents = jax.random.uniform(
      scale_key, (len(leaves),), jnp.float32, -log10_range, log10_range
    )
    scales = treedef.unflatten([10.0 ** exponents[i] for i in range(len(leaves))])
    return {"task": task.sample(data, task_key), "scales": scales}

  def init(data, task_params, key):
    return unscale(task_params, task.init(data, task_params["task"], key))

  def loss(data, task_params, params, key):
    return task.loss(data, task_params["task"], scale(task_params, params), key)

  config = {**task.config, "augment_log10_range": log10_range}
  return TaskFamily(task.name, sample, init, loss, config, task.data)
