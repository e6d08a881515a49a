"""Random quadratics f(theta) = ||W theta - y||^2 (section 3.1)."""

import jax
import jax.numpy as jnp

from tasks.base import TaskFamily


def quadratic(dim: int = 10) -> TaskFamily:
  """The paper's family: ``W`` (dim x dim), ``y`` (dim,) and ``theta_0`` (dim,) IID N(0, 1).

  The family has no data set (``data`` is ``()``): each problem is its own ``W, y``.

  Example:
    >>> task = quadratic()
    >>> problem = task.sample(task.data, jax.random.key(0))
    >>> theta = task.init(task.data, problem, jax.random.key(1))
    >>> loss = task.loss(task.data, problem, theta, jax.random.key(2))
  """
  if dim <= 0:
    raise ValueError(f"Quadratic dimension must be positive, got dim={dim}; the paper uses 10.")

  def sample(data, key):
    del data
    w_key, y_key = jax.random.split(key)
    return {
      "w": jax.random.normal(w_key, (dim, dim), jnp.float32),  # (dim, dim)
      "y": jax.random.normal(y_key, (dim,), jnp.float32),  # (dim,)
    }

  def init(data, task_params, key):
    del data, task_params
    return {"theta": jax.random.normal(key, (dim,), jnp.float32)}

  def loss(data, task_params, params, key):
    del data, key  # Deterministic: the loss has no minibatch.
    residual = task_params["w"] @ params["theta"] - task_params["y"]
    return jnp.sum(residual**2)

  return TaskFamily("quadratic", sample, init, loss, {"name": "quadratic", "dim": dim})
