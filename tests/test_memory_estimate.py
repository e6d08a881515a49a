"""The meta-step's memory estimate: traced without compiling, checked against XLA's own count."""

import os
import subprocess
import sys

import jax
import pytest
from mnist_files import write_mnist

from train import config as config_lib
from train import memory, meta_step, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(tmp_path, **settings):
  config = config_lib.MetaTrainConfig(output_dir=str(tmp_path), **settings)
  return (config, *trainer.build(config))


def _compiled_bytes(config, task, optimizer) -> int:
  """What XLA assigns the jitted meta-step: temporaries, arguments and outputs (not aliased)."""
  state = jax.eval_shape(lambda: meta_step.init_state(config, task, optimizer))
  step = jax.jit(meta_step.make_train_step(config, task, optimizer), donate_argnums=0)
  stats = step.lower(state, task.data).compile().memory_analysis()
  return (
    stats.temp_size_in_bytes
    + stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
  )


def test_residuals_grow_linearly_in_problems_and_unroll(tmp_path):
  config, task, optimizer = _setup(tmp_path, num_problems=4)
  four, phi, problems_four = memory.residual_bytes(config, task, optimizer, 4)
  eight, phi_again, problems_eight = memory.residual_bytes(config, task, optimizer, 8)
  assert eight == 2 * four > 0 and problems_eight == 2 * problems_four > 0
  assert (
    phi
    == phi_again
    == 4 * sum(x.size for x in jax.tree.leaves(optimizer.init_meta_params(jax.random.key(0))))
  )
  short = config_lib.MetaTrainConfig(output_dir=str(tmp_path), unroll=10)
  half, _, _ = memory.residual_bytes(short, task, optimizer, 4)
  assert 0.45 < half / four < 0.55


def test_estimate_bounds_what_xla_assigns_the_compiled_step(tmp_path):
  """On a small MNIST MLP (the real ones, and quadratics, were checked by hand: BUILD.md)."""
  write_mnist(str(tmp_path / "mnist"), sizes=(("train", 64), ("test", 8)))
  kwargs = {"mnist_dir": str(tmp_path / "mnist"), "batch_size": 32}
  config, task, optimizer = _setup(
    tmp_path, task="mnist_mlp", task_kwargs=kwargs, num_problems=2, unroll=10, horizon=20
  )
  estimate = memory.estimate(config, task, optimizer)
  compiled = _compiled_bytes(config, task, optimizer)
  # An upper bound, and not a loose one.
  assert compiled <= estimate.total_bytes <= 1.2 * compiled, (estimate, compiled)


def test_an_oversized_run_is_refused_with_the_estimate_and_the_flag_to_lower(tmp_path):
  config, task, optimizer = _setup(tmp_path, num_problems=64)
  needed = memory.estimate(config, task, optimizer).total_bytes
  headroom = memory.COMPILE_HEADROOM
  with pytest.raises(ValueError) as error:
    memory.check(config, task, optimizer, available=needed // 4 + headroom)
  message = str(error.value)
  assert "--num_problems=64 (--unroll=20) needs about" in message
  fits = int(message.split("lower --num_problems to ")[1].split()[0])
  smaller = config_lib.MetaTrainConfig(output_dir=str(tmp_path), num_problems=fits)
  assert 1 <= fits < 64
  assert memory.estimate(smaller, task, optimizer).total_bytes <= needed // 4
  assert memory.check(config, task, optimizer, available=needed + headroom) == memory.estimate(
    config, task, optimizer
  )


def test_splitting_problems_among_devices_divides_all_but_the_data(tmp_path):
  estimate = memory.MemoryEstimate(1000, 10, 40, 50, 1350)  # fixed: 2 * 10 + 50
  assert memory.per_device_bytes(estimate, 4) == 70 + 320
  assert memory.largest_fitting(estimate, 10, 70 + 256, devices=4) == 8


def test_available_memory_is_known_on_this_machine():
  available = memory.available_bytes()
  assert available is None or available > 2**20


def test_the_command_line_refuses_an_oversized_run_before_compiling(tmp_path):
  out = tmp_path / "new" / "run"
  result = subprocess.run(
    [sys.executable, "-m", "train.meta_train", f"--output_dir={out}", "--num_problems=100000000"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "A meta-step of --num_problems=100000000 (--unroll=20) needs about" in result.stderr
  assert "lower --num_problems to" in result.stderr
  assert not (tmp_path / "new").exists()  # the folders it would have made are gone
