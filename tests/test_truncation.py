"""A truncation's meta-gradient by the sequence kernels (train/truncation.py) against autodiff."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cifar10_files import binary_batch_bytes, tiny_split

import learned_opt
from learned_opt.kernels import stack
from tasks.cifar10_formats import BINARY_FILES
from train import meta_step, trainer, truncation
from train.config import MetaTrainConfig

pytestmark = pytest.mark.skipif(
  shutil.which("c++") is None and shutil.which("g++") is None,
  reason="no C++ compiler (c++ or g++) to build the kernels with",
)


@pytest.fixture(scope="module")
def names():
  return stack.targets()


def _weights(key, features, hidden):
  k = jax.random.split(key, 6)
  return [
    0.3 * jax.random.normal(k[0], (features + hidden, 4 * hidden)),
    0.1 * jax.random.normal(k[1], (4 * hidden,)),
    0.3 * jax.random.normal(k[2], (2 * hidden, 4 * hidden)),
    0.1 * jax.random.normal(k[3], (4 * hidden,)),
    0.3 * jax.random.normal(k[4], (hidden, 1)),
    jnp.full((1,), 0.05),
  ]


@pytest.mark.parametrize("rows", [1, 37, 333])  # one row; a partial tile; three chunks
def test_the_sequence_kernels_agree_with_autodiff_of_stack_readout_steps(names, rows):
  """Steps in the workspace give stack_readout's outputs bit for bit; the sequence backward
  gives the gradient of sum_t du_t . u_t through a scan of stack_readout steps."""
  steps, features, hidden = 5, 2, 7
  k = jax.random.split(jax.random.key(rows), 5)
  xs = jax.random.normal(k[0], (steps, rows, features))
  h0 = 0.5 * jax.random.normal(k[1], (rows, 2, hidden))
  c0 = jax.random.normal(k[2], (rows, 2, hidden))
  dus = jax.random.normal(k[3], (steps, rows))
  weights = _weights(k[4], features, hidden)

  def reference(weights):
    def body(carry, inputs):
      h, c, u = stack.stack_readout(names, inputs[0], *carry, *weights)
      return (h, c), (u, jnp.sum(u * inputs[1]))

    (h, c), (us, terms) = jax.lax.scan(body, (h0, c0), (xs, dus))
    return jnp.sum(terms), (us, h, c)

  @jax.jit
  def sequence(weights):
    wh = jnp.zeros((steps + 1, rows, 2, hidden)).at[0].set(h0)
    wc = jnp.zeros((steps + 1, rows, 2, hidden)).at[0].set(c0)

    def body(carry, x):
      wh, wc, u = stack.readout_step_in_workspace(names, x, *carry[:2], carry[2], *weights)
      return (wh, wc, carry[2] + 1), u

    (wh, wc, _), us = jax.lax.scan(body, (wh, wc, jnp.zeros((), jnp.int32)), xs)
    return us, wh, wc, stack.readout_sequence_backward(names, xs, wh, wc, *weights, dus)

  grads, (us, h, c) = jax.jit(jax.grad(reference, has_aux=True))(weights)
  got_us, wh, wc, got = sequence(weights)
  np.testing.assert_array_equal(np.asarray(got_us), np.asarray(us))
  np.testing.assert_array_equal(np.asarray(wh[-1]), np.asarray(h))
  np.testing.assert_array_equal(np.asarray(wc[-1]), np.asarray(c))
  for a, b in zip(got, grads, strict=True):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def test_a_workspace_without_two_slots_is_refused(names):
  x, w = jnp.ones((4, 2)), _weights(jax.random.key(0), 2, 3)
  empty = jnp.zeros((1, 4, 2, 3))
  with pytest.raises(Exception, match="slots >= 2"):
    jax.block_until_ready(stack.readout_step_in_workspace(names, x, empty, empty, 0, *w))
  with pytest.raises(Exception, match=r"steps \+ 1"):
    zero = jnp.zeros((0, 4, 2, 3))
    jax.block_until_ready(
      stack.readout_sequence_backward(names, jnp.ones((0, 4, 2)), zero, zero, *w, jnp.ones((0, 4)))
    )


def _values(a):
  return np.asarray(
    jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a
  )


def _setup(objective="sum", **optimizer_kwargs):
  config = MetaTrainConfig(
    output_dir="/tmp/unused",
    num_problems=3,
    unroll=4,
    horizon=8,
    meta_objective=objective,
    optimizer_kwargs={"preprocess": "log_sign", "output_scale": 0.1, **optimizer_kwargs},
  )
  return _built(config)


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
  """Official binary batches of 50 tiny images, and a test batch."""
  directory = tmp_path_factory.mktemp("cifar10_bin")
  images, labels = tiny_split(per_class=5)
  for name, part in zip(BINARY_FILES["train"], np.array_split(np.arange(50), 5), strict=True):
    (directory / name).write_bytes(binary_batch_bytes(images[part], labels[part]))
  (directory / BINARY_FILES["test"][0]).write_bytes(binary_batch_bytes(images[:4], labels[:4]))
  return str(directory)


def _two_lstms(cifar10_dir, **lstm):
  """A tiny CIFAR-10 conv net with one LSTM for its conv and one for its dense parameters."""
  group = {"kind": "lstm", "hidden_size": 5, "preprocess": "log_sign", "output_scale": 0.1}
  config = MetaTrainConfig(
    output_dir="/tmp/unused",
    task="cifar10_conv",
    task_kwargs={"cifar10_dir": cifar10_dir, "channels": [2], "hidden_size": 3, "batch_size": 4},
    optimizer="partition",
    optimizer_kwargs={"rule": "conv_fc", "optimizers": {"conv": {**group, **lstm}, "fc": group}},
    num_problems=2,
    unroll=3,
    horizon=6,
  )
  return _built(config)


def _built(config):
  task, optimizer = trainer.build(config)
  optimizer = learned_opt.with_backend(optimizer, "cpu_kernels")
  state = meta_step.init_state(config, task, optimizer)
  return config, task, optimizer, state


@pytest.mark.parametrize("objective", ["sum", "log_sum", "ramp"])
def test_value_and_grad_agrees_with_autodiff_of_the_meta_loss(names, objective):
  """Loss, per-step losses, the problems after the truncation and phi's gradient, against
  jax.value_and_grad(unroll.meta_loss) on the same kernels, from a truncation mid-run."""
  _agrees_with_autodiff(names, *_setup(objective))


def test_two_lstms_agree_with_autodiff(names, cifar10_dir):
  """The CIFAR-10 conv net's two LSTMs (learned_opt.partition), each its own workspace."""
  config, task, optimizer, state = _two_lstms(cifar10_dir)
  lstms = truncation.groups(optimizer, state.meta_params, state.inner)
  assert [g.label for g in lstms] == ["conv", "fc"]
  assert all(g.leaves for g in lstms)
  _agrees_with_autodiff(names, config, task, optimizer, state)


def _agrees_with_autodiff(names, config, task, optimizer, state):
  objective = config.meta_objective
  loss_fn = meta_step.meta_loss_fn(config, task, optimizer)
  autodiff = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  # Start one truncation in, so the LSTM state and the step count are not zero.
  (_, (_, inner)), _ = autodiff(state.meta_params, state.inner, task.data)
  kernel_names = truncation.kernel_targets(optimizer, state.meta_params, inner, False)
  assert kernel_names == names
  mine = jax.jit(
    lambda phi, inner: truncation.value_and_grad(
      kernel_names,
      phi,
      inner,
      task.data,
      task=task,
      optimizer=optimizer,
      num_steps=config.unroll,
      objective=objective,
      horizon=config.horizon,
    )
  )
  ((loss, (losses, after)), grads), _ = mine(state.meta_params, inner)
  (ref_loss, (ref_losses, ref_after)), ref_grads = autodiff(state.meta_params, inner, task.data)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(losses), np.asarray(ref_losses), rtol=1e-6)
  assert jax.tree.structure(after) == jax.tree.structure(ref_after)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(ref_after), strict=True):
    np.testing.assert_allclose(_values(a), _values(b), rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_kernel_targets_only_for_the_lstm_on_the_kernels_first_order(names):
  config, task, optimizer, state = _setup()
  phi, inner = state.meta_params, state.inner
  assert truncation.kernel_targets(optimizer, phi, inner, False) == names
  assert truncation.kernel_targets(optimizer, phi, inner, True) is None  # second order
  xla = learned_opt.with_backend(optimizer, "xla")
  assert truncation.kernel_targets(xla, phi, inner, False) is None
  _, _, gac, gac_state = _setup(global_cells=5)
  assert truncation.kernel_targets(gac, gac_state.meta_params, gac_state.inner, False) is None


def test_a_partition_with_a_gac_group_keeps_autodiff(names, cifar10_dir):
  _, _, optimizer, state = _two_lstms(cifar10_dir, global_cells=2)
  assert truncation.kernel_targets(optimizer, state.meta_params, state.inner, False) is None


def test_the_meta_step_runs_the_sequence_kernels(names):
  """train.meta_step takes the truncation's kernels for the LSTM on cpu_kernels, and autodiff
  (no sequence kernel) on XLA."""
  config, task, optimizer, state = _setup()
  step = meta_step.make_train_step(config, task, optimizer)
  assert names[7] in str(jax.make_jaxpr(step)(state, task.data))
  xla = learned_opt.with_backend(optimizer, "xla")
  xla_state = meta_step.init_state(config, task, xla)
  xla_step = meta_step.make_train_step(config, task, xla)
  assert names[7] not in str(jax.make_jaxpr(xla_step)(xla_state, task.data))


def test_the_trainers_step_keeps_its_workspace_and_agrees_with_fresh_buffers(names):
  """jit_train_step donates one workspace to every call (no new buffers a step); three steps
  give the states of make_train_step's, whose buffers are fresh each step, bit for bit."""
  config, task, optimizer, state = _setup()
  kept = meta_step.jit_train_step(config, task, optimizer)
  fresh = jax.jit(meta_step.make_train_step(config, task, optimizer))
  a = b = state
  buffers = []
  for _ in range(3):
    a, metrics = kept(jax.tree.map(jnp.copy, a), task.data)
    b, _ = fresh(b, task.data)
    buffers.append(kept.workspace)
    assert bool(metrics.finite)
  rows = sum(leaf.size for leaf in jax.tree.leaves(state.inner.params))
  ((wh, wc),) = buffers[0]  # one LSTM: one pair
  assert wh.shape == wc.shape == (config.unroll + 1, rows, 2, 20)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(_values(x), _values(y))
  assert wh.is_deleted() and buffers[1][0][1].is_deleted()  # donated to the next call
  xla = learned_opt.with_backend(optimizer, "xla")
  assert meta_step.new_workspace(config, xla, meta_step.init_state(config, task, xla)) == ()
