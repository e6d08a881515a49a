"""The meta-objective: stop_gradient on optimizee gradients, second-order terms, batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt
from learned_opt.base import LearnedOptimizer
from tasks import quadratic
from tasks.base import TaskFamily
from train import inner as inner_lib
from train import unroll


def learned_sgd() -> LearnedOptimizer:
  """A one-parameter 'learned' optimizer, g = -lr * grad, whose meta-gradient we can write down."""
  return LearnedOptimizer(
    init_meta_params=lambda key: {"lr": jnp.float32(0.1)},
    init_state=lambda phi, params: (),
    update=lambda phi, grads, state: (jax.tree.map(lambda g: -phi["lr"] * g, grads), ()),
    config={"kind": "test_sgd"},
  )


def square_task(theta0: float) -> TaskFamily:
  """f(theta) = theta^2 from a fixed theta_0."""
  return TaskFamily(
    name="square",
    sample=lambda data, key: {},
    init=lambda data, task_params, key: jnp.float32(theta0),
    loss=lambda data, task_params, theta, key: theta**2,
    config={"name": "square"},
  )


@pytest.mark.parametrize("second_order", [False, True])
def test_meta_gradient_matches_hand_derivation(second_order):
  theta0, lr = 1.5, 0.1
  task, opt = square_task(theta0), learned_sgd()
  phi = opt.init_meta_params(None)
  inner = unroll.init_inner_batch(task, opt, phi, (), jax.random.key(0), 1)
  grad = jax.grad(
    lambda p: unroll.meta_loss(
      p, inner, (), task=task, optimizer=opt, num_steps=2, second_order=second_order
    )[0]
  )(phi)["lr"]
  # theta_1 = theta_0 (1 - 2 lr); theta_2 = theta_1 - lr * grad_1 with grad_1 = 2 theta_1.
  theta1 = theta0 * (1 - 2 * lr)
  theta2 = theta1 * (1 - 2 * lr)
  dtheta1 = -2 * theta0
  # d grad_1 / d lr = 2 dtheta1 is dropped under the paper's assumption (section 2).
  dgrad1 = 2 * dtheta1 if second_order else 0.0
  dtheta2 = dtheta1 - 2 * theta1 - lr * dgrad1
  expected = 2 * theta1 * dtheta1 + 2 * theta2 * dtheta2
  np.testing.assert_allclose(grad, expected, rtol=1e-5)


def test_log_sum_objective_weighs_each_step_by_its_inverse_loss():
  theta0, lr = 1.5, 0.1
  task, opt = square_task(theta0), learned_sgd()
  phi = opt.init_meta_params(None)
  inner = unroll.init_inner_batch(task, opt, phi, (), jax.random.key(0), 1)
  value, grad = jax.value_and_grad(
    lambda p: unroll.meta_loss(
      p, inner, (), task=task, optimizer=opt, num_steps=2, objective="log_sum"
    )[0]
  )(phi)
  theta1 = theta0 * (1 - 2 * lr)
  theta2 = theta1 * (1 - 2 * lr)
  dtheta1 = -2 * theta0
  dtheta2 = dtheta1 - 2 * theta1
  # d/d lr [log theta1^2 + log theta2^2] = 2 dtheta1 / theta1 + 2 dtheta2 / theta2.
  np.testing.assert_allclose(value, np.log(theta1**2) + np.log(theta2**2), rtol=1e-5)
  np.testing.assert_allclose(grad["lr"], 2 * dtheta1 / theta1 + 2 * dtheta2 / theta2, rtol=1e-5)
  # A loss of exactly zero is clamped at the floor instead of giving -inf.
  zero_task = square_task(0.0)
  inner = unroll.init_inner_batch(zero_task, opt, phi, (), jax.random.key(0), 1)
  value = unroll.meta_loss(
    phi, inner, (), task=zero_task, optimizer=opt, num_steps=2, objective="log_sum"
  )[0]
  np.testing.assert_allclose(value, 2 * np.log(unroll.LOG_FLOOR), rtol=1e-6)
  with pytest.raises(ValueError, match="Unknown meta-objective 'max'"):
    unroll.meta_loss(phi, inner, (), task=zero_task, optimizer=opt, num_steps=2, objective="max")


def test_ramp_objective_weighs_step_t_by_t_over_horizon_across_truncations():
  theta0, lr, horizon = 1.5, 0.1, 4
  task, opt = square_task(theta0), learned_sgd()
  phi = opt.init_meta_params(None)
  inner = unroll.init_inner_batch(task, opt, phi, (), jax.random.key(0), 1)
  ramp = lambda p, state: unroll.meta_loss(
    p, state, (), task=task, optimizer=opt, num_steps=2, objective="ramp", horizon=horizon
  )
  # theta_t = theta_0 (1 - 2 lr)^t; truncation 1 holds steps 1, 2 and truncation 2 steps 3, 4.
  theta = lambda t: theta0 * (1 - 2 * lr) ** t
  value, (_, inner) = ramp(phi, inner)
  np.testing.assert_allclose(value, (1 * theta(1) ** 2 + 2 * theta(2) ** 2) / horizon, rtol=1e-5)
  value, grad = jax.value_and_grad(lambda p: ramp(p, inner)[0])(phi)
  np.testing.assert_allclose(value, (3 * theta(3) ** 2 + 4 * theta(4) ** 2) / horizon, rtol=1e-5)
  # The second truncation starts from a fixed theta_2, and d grad / d lr = 0 (stop_gradient).
  dtheta3 = -2 * theta(2)
  dtheta4 = dtheta3 - 2 * theta(3)
  expected = (3 * 2 * theta(3) * dtheta3 + 4 * 2 * theta(4) * dtheta4) / horizon
  np.testing.assert_allclose(grad["lr"], expected, rtol=1e-5)
  with pytest.raises(ValueError, match="ramp objective needs a positive horizon"):
    unroll.meta_loss(phi, inner, (), task=task, optimizer=opt, num_steps=2, objective="ramp")


def test_second_order_changes_lstm_meta_gradient():
  task, opt = quadratic(dim=3), learned_opt.lstm_optimizer(hidden_size=4, num_layers=1)
  phi = opt.init_meta_params(jax.random.key(0))
  inner = unroll.init_inner_batch(task, opt, phi, (), jax.random.key(1), 2)

  def meta_grad(second_order):
    loss = lambda p: unroll.meta_loss(
      p, inner, (), task=task, optimizer=opt, num_steps=2, second_order=second_order
    )[0]
    return jax.jit(jax.grad(loss))(phi)

  grads = [meta_grad(False), meta_grad(True)]
  diff = max(
    float(jnp.max(jnp.abs(a - b))) for a, b in zip(*map(jax.tree.leaves, grads), strict=True)
  )
  assert diff > 1e-6


def test_batch_equals_one_by_one():
  task, opt = quadratic(dim=5), learned_opt.lstm_optimizer(hidden_size=6)
  phi = opt.init_meta_params(jax.random.key(0))
  inner = unroll.init_inner_batch(task, opt, phi, (), jax.random.key(2), 4)
  loss, (losses, after) = unroll.meta_loss(phi, inner, (), task=task, optimizer=opt, num_steps=3)
  assert losses.shape == (4, 3)
  run_one = jax.jit(lambda one: unroll.unroll(task, opt, phi, (), one, 3))
  for i in range(4):
    single, state = run_one(jax.tree.map(lambda x, i=i: x[i], inner))
    np.testing.assert_allclose(losses[i], single, rtol=1e-5)
    np.testing.assert_allclose(after.params["theta"][i], state.params["theta"], rtol=1e-5)
  np.testing.assert_allclose(loss, jnp.mean(jnp.sum(losses, axis=1)), rtol=1e-6)
  assert int(after.step[0]) == 3


def test_losses_are_f_of_theta_1_to_T():
  task, opt = square_task(2.0), learned_sgd()
  phi = opt.init_meta_params(None)
  inner = unroll.init_inner_batch(task, opt, phi, (), jax.random.key(0), 1)
  _, (losses, _) = unroll.meta_loss(phi, inner, (), task=task, optimizer=opt, num_steps=3)
  thetas = 2.0 * 0.8 ** np.arange(1, 4)  # theta_t = theta_0 (1 - 2 lr)^t
  np.testing.assert_allclose(losses[0], thetas**2, rtol=1e-5)


def small_mlp_task() -> TaskFamily:
  """A 2-layer tanh MLP regressing a fixed random target from minibatches of 8 of 32 points."""
  x = jax.random.normal(jax.random.key(5), (32, 4))
  y = jnp.sin(x @ jnp.arange(1.0, 5.0))

  def init(data, task_params, key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (4, 6)) / 2, "w2": jax.random.normal(k2, (6,)) / 3}

  def loss(data, task_params, params, key):
    index = jax.random.randint(key, (8,), 0, 32)
    hidden = jnp.tanh(data[0][index] @ params["w1"])
    return jnp.mean(jnp.square(hidden @ params["w2"] - data[1][index])) + task_params["offset"]

  return TaskFamily(
    name="small_mlp",
    sample=lambda data, key: {"offset": jax.random.uniform(key)},
    init=init,
    loss=loss,
    config={"name": "small_mlp"},
    data=(x, y),
  )


@pytest.mark.parametrize("objective", ["sum", "log_sum"])
def test_meta_gradient_reuses_the_optimizee_gradient_exactly(objective, monkeypatch):
  """The meta-gradient that takes d f(theta_t) / d theta_t from the step's own gradient
  (``inner.loss_of_params``) equals plain autodiff through the optimizee's loss."""
  task, opt = small_mlp_task(), learned_opt.lstm_optimizer(hidden_size=5, preprocess="log_sign")
  phi = opt.init_meta_params(jax.random.key(0))
  inner = unroll.init_inner_batch(task, opt, phi, task.data, jax.random.key(1), 3)

  def meta_grad():
    loss = lambda p: unroll.meta_loss(
      p, inner, task.data, task=task, optimizer=opt, num_steps=4, objective=objective
    )[0]
    return jax.jit(jax.value_and_grad(loss))(phi)

  def plain_gradient(task, data, state, second_order=False):
    loss, grads = jax.value_and_grad(task.loss, argnums=2)(
      data, state.task_params, state.params, inner_lib.minibatch_key(state)
    )
    return loss, jax.lax.stop_gradient(grads)

  reused = meta_grad()
  monkeypatch.setattr(inner_lib, "gradient", plain_gradient)
  plain = meta_grad()
  np.testing.assert_allclose(reused[0], plain[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(reused[1]), jax.tree.leaves(plain[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(reused[1])) > 1e-4
