"""The held-out task suite (``tasks.heldout``): every task builds, starts at a finite loss of
order 1, is vmappable over problems and learns under Adam. MNIST is a small synthetic stand-in
in its layout unless $MNIST_DIR is set (then the real files are checked too)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tasks import heldout, image_data
from tasks.base import num_params

ALL = (*heldout.suite(), *heldout.tiny_suite())
MNIST_TASKS = ("mnist_autoencoder", "mnist_mlp_2x256")
ADAM_STEPS = 20
_QUICK_COMPILE = {"xla_backend_optimization_level": 0}


def synthetic_mnist(num: int = 64) -> image_data.ImageSplit:
  """``num`` 28 x 28 uint8 images in MNIST's layout: a blocky template per class plus noise."""
  rng = np.random.default_rng(0)
  labels = np.arange(num) % 10
  templates = rng.uniform(0, 255, (10, 4, 4))
  images = np.kron(templates[labels], np.ones((1, 7, 7))) + rng.normal(0, 30, (num, 28, 28))
  return image_data.prepare(np.clip(images, 0, 255).astype(np.uint8), labels, 28, True)


@pytest.fixture
def fake_mnist(monkeypatch):
  """``image_data.load`` answering every MNIST request with ``synthetic_mnist()``."""
  split = synthetic_mnist()
  monkeypatch.setattr(image_data, "load", lambda *args, **kwargs: split)
  return split


def test_names_steps_and_descriptions():
  names = [task.name for task in ALL]
  assert len(names) == len(set(names)) and len(heldout.suite()) >= 11
  assert all(task.num_steps >= 1000 for task in heldout.suite())
  assert all(task.num_steps == 30 for task in heldout.tiny_suite())
  assert all(task.description and "\n" not in task.description for task in ALL)


def test_families_are_named_and_configured_distinctly(fake_mnist):
  configs = set()
  for task in ALL:
    family = task.build()
    assert family.name == family.config["name"] == task.name
    if leaves := jax.tree.leaves(family.data):
      assert family.config["num_examples"] == leaves[0].shape[0]
    configs.add(json.dumps(family.config, sort_keys=True))
  assert len(configs) == len(ALL)


def test_get_names_the_known_tasks_for_an_unknown_one():
  assert heldout.get("tiny_quadratic").name == "tiny_quadratic"
  with pytest.raises(ValueError, match="digits_resmlp.*tiny_quadratic"):
    heldout.get("no_such_task")


@pytest.mark.parametrize("name", [task.name for task in ALL])
def test_vmapped_problems_start_near_one_and_adam_lowers_the_loss(name, request):
  if name in MNIST_TASKS:
    request.getfixturevalue("fake_mnist")
  family = heldout.get(name).build()
  adam = optax.adam(1e-2)

  def one_problem(data, key):
    sample_key, init_key, eval_key, train_key = jax.random.split(key, 4)
    problem = family.sample(data, sample_key)
    theta = family.init(data, problem, init_key)

    def step(carry, key):
      theta, state = carry
      grads = jax.grad(family.loss, argnums=2)(data, problem, theta, key)
      updates, state = adam.update(grads, state, theta)
      return (optax.apply_updates(theta, updates), state), None

    keys = jax.random.split(train_key, ADAM_STEPS)
    (trained, _), _ = jax.lax.scan(step, (theta, adam.init(theta)), keys)
    losses = [family.loss(data, problem, t, eval_key) for t in (theta, trained)]
    return jnp.stack(losses)

  keys = jax.random.split(jax.random.key(0), 3)
  # Unoptimized XLA compiles these tiny programs in about half the time (fast tests).
  run = jax.jit(jax.vmap(one_problem, (None, 0))).lower(family.data, keys)
  losses = np.asarray(run.compile(_QUICK_COMPILE)(family.data, keys))
  first, last = losses[:, 0], losses[:, 1]
  assert np.all(np.isfinite(losses)) and np.all((first > 1e-2) & (first < 100)), losses
  assert len(set(first.tolist())) == 3, first
  assert np.all(last < first), losses


def test_mnist_mlp_is_ten_times_the_largest_meta_training_task(fake_mnist):
  assert num_params(heldout.get("mnist_mlp_2x256").build()) >= 10 * 25_000
  assert num_params(heldout.get("mnist_autoencoder").build()) == 209_968


@pytest.mark.skipif(not os.environ.get("MNIST_DIR"), reason="no $MNIST_DIR")
def test_real_mnist_tasks_start_at_a_finite_loss_of_order_one():
  for name in MNIST_TASKS:
    family = heldout.get(name).build()
    assert family.config["num_examples"] == 60_000
    problem = family.sample(family.data, jax.random.key(0))
    theta = family.init(family.data, problem, jax.random.key(1))
    loss = float(jax.jit(family.loss)(family.data, problem, theta, jax.random.key(2)))
    assert 1e-2 < loss < 100, (name, loss)


def test_losses_read_their_data_from_the_argument():
  family = heldout.get("wine_logreg").build()
  theta = family.init(family.data, {}, jax.random.key(0))
  loss = lambda data: float(jax.jit(family.loss)(data, {}, theta, jax.random.key(1)))
  assert loss(family.data) != loss(family.data._replace(features=-family.data.features))


def test_quadratic_has_the_stated_conditioning_and_optimum():
  family = heldout.get("tiny_quadratic").build()
  problem = jax.jit(family.sample)((), jax.random.key(0))
  theta = {"theta": problem["optimum"]}
  hessian = jax.jit(jax.hessian(family.loss, argnums=2))((), problem, theta, None)["theta"]["theta"]
  eigenvalues = np.linalg.eigvalsh(np.asarray(hessian, np.float64))
  np.testing.assert_allclose(eigenvalues.max() / eigenvalues.min(), 1000, rtol=1e-3)
  assert float(family.loss((), problem, theta, None)) == 0.0
  rotation = np.asarray(problem["rotation"], np.float64)
  np.testing.assert_allclose(rotation @ rotation.T, np.eye(8), atol=1e-5)
