"""Many devices and processes: a mesh gives the one-device results, and a killed run resumes.

The command lines run in child processes (``tests/multihost_worker.py``) with faked CPU devices:
one process with 8 devices, and two processes with 2 devices each, joined by ``jax.distributed``
on 127.0.0.1 with gloo collectives. Each child has a hard timeout, so a hang fails the test.

Why "to float tolerance": the problem set is the same on any mesh (checked bit for bit), but the
meta-gradient's mean over problems is summed in another order when it is all-reduced from
per-device partial sums, and the LSTM's matmul over (problems x coordinates) rows rounds
differently for another row count; phi then differs in the last bits (~1e-7 relative).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

import learned_opt
from eval import compare, sharding
from tasks import registry as task_registry
from train import checkpoint, distributed, meta_step, trainer
from train.config import MetaTrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
TIMEOUT = 300  # seconds for all children; seconds each on an idle machine, a hang fails
SETTINGS = {
  "task_kwargs": {"dim": 4},
  "optimizer_kwargs": {"hidden_size": 6},
  "unroll": 2,
  "horizon": 4,
  "num_problems": 8,
  "valid_problems": 8,
  "num_epochs": 2,
  "steps_per_epoch": 2,
  "checkpoint_every": 1,
  "log_every": 1,
  "meta_lr": 0.01,
}
STEPS = 4
EVAL_FLAGS = ["--baselines=sgd,adam", "--num_problems=6", "--num_steps=8", "--seed=3"]


def train_flags(output_dir) -> list[str]:
  flags = [f"--output_dir={output_dir}"]
  for name, value in SETTINGS.items():
    flags.append(f"--{name}={json.dumps(value) if isinstance(value, dict) else value}")
  return flags


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(module, flags, devices, processes=1, env=None) -> list[subprocess.Popen]:
  """Starts ``processes`` children running ``module``'s command line, ``devices`` CPUs each."""
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    **(env or {}),
  }
  cluster = []
  if processes > 1:
    cluster = [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={processes}"]
  return [
    subprocess.Popen(
      [sys.executable, WORKER, module, *flags, *cluster]
      + ([f"--process_id={i}"] if processes > 1 else []),
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]


def finish(procs, deadline) -> list[str]:
  """Waits for every child (killing all at the deadline); their outputs. Fails on an error."""
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=max(deadline - time.time(), 1))[0])
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    pytest.fail("a child process hung:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
  for proc, out in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, out[-5000:]
  return outputs


def config(output_dir, **overrides) -> MetaTrainConfig:
  return MetaTrainConfig(output_dir=str(output_dir), **{**SETTINGS, **overrides})


def final_state(output_dir):
  cfg = config(output_dir)
  task, optimizer = trainer.build(cfg)
  template = jax.eval_shape(lambda: meta_step.init_state(cfg, task, optimizer))
  path = checkpoint.path_of(os.path.join(output_dir, "checkpoints"), STEPS)
  return checkpoint.restore(path, template)[0]


def state_bytes(output_dir) -> bytes:
  path = checkpoint.path_of(os.path.join(output_dir, "checkpoints"), STEPS)
  with open(os.path.join(path, "state.msgpack"), "rb") as f:
    return f.read()


def assert_trees_equal(got, want):
  keys_as_data = lambda tree: jax.tree.map(distributed.to_host, tree)
  for x, y in zip(
    jax.tree.leaves(keys_as_data(got)), jax.tree.leaves(keys_as_data(want)), strict=True
  ):
    np.testing.assert_array_equal(x, y)


def assert_same_run(got, want):
  """Same problems bit for bit; phi and Adam's state to float tolerance."""
  assert_trees_equal(
    (got.inner.task_params, got.inner.data_key), (want.inner.task_params, want.inner.data_key)
  )
  for x, y in zip(
    jax.tree.leaves((got.meta_params, got.meta_opt_state)),
    jax.tree.leaves((want.meta_params, want.meta_opt_state)),
    strict=True,
  ):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every child run, two chains at a time: the 8-device run; the two-process run then its
  evaluation; a two-process run killed after checkpoint 3 then resumed."""
  root = tmp_path_factory.mktemp("multihost")
  out = {name: root / name for name in ("eight", "two", "killed", "eval")}
  deadline = time.time() + TIMEOUT
  two = launch("train.meta_train", train_flags(out["two"]), devices=2, processes=2)
  killed = launch(
    "train.meta_train",
    train_flags(out["killed"]),
    devices=2,
    processes=2,
    env={"DIE_AFTER_CHECKPOINT": "3"},
  )
  finish(two, deadline)
  evaluation = launch(
    "eval.evaluate",
    [f"--checkpoint={out['two']}", f"--output_dir={out['eval']}", *EVAL_FLAGS],
    devices=2,
    processes=2,
  )
  try:
    killed[0].wait(timeout=max(deadline - time.time(), 1))
  finally:
    for proc in killed:
      proc.kill()
      proc.communicate()
  assert killed[0].returncode == -signal.SIGKILL
  resumed = launch("train.meta_train", train_flags(out["killed"]), devices=2, processes=2)
  resumed_log = finish(resumed, deadline)[0]
  eight = launch("train.meta_train", train_flags(out["eight"]), devices=8)
  eval_log = finish(evaluation, deadline)[0]
  finish(eight, deadline)
  return out, resumed_log, eval_log


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The same run in this process, on one device."""
  cfg = config(tmp_path_factory.mktemp("one") / "run")
  state, _ = trainer.train(cfg, log=lambda s: None)
  return state


def test_eight_devices_and_two_processes_give_the_one_device_run(runs, one_device):
  out, _, _ = runs
  assert_same_run(final_state(out["eight"]), one_device)
  assert_same_run(final_state(out["two"]), one_device)
  with open(out["two"] / "config.json") as f:  # only process 0 wrote
    assert json.load(f)["num_problems"] == SETTINGS["num_problems"]


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(runs):
  out, resumed_log, _ = runs
  assert "Resumed from meta-step 3" in resumed_log
  assert state_bytes(out["killed"]) == state_bytes(out["two"])
  _, phi = learned_opt.load(str(out["killed"]))
  _, want = learned_opt.load(str(out["two"]))
  for x, y in zip(jax.tree.leaves(phi), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(x, y)


def test_a_two_process_sweep_gives_the_one_device_table(runs):
  out, _, eval_log = runs
  with open(out["eval"] / "results.json") as f:
    got = json.load(f)
  task = task_registry.get("quadratic", dim=4)
  one = sharding.problems_mesh(jax.devices()[:1])
  want = compare.compare(
    task,
    {"lstm": learned_opt.load(str(out["two"]))},
    ["sgd", "adam"],
    num_problems=6,
    num_steps=8,
    seed=3,
    log=lambda s: None,
    mesh=one,
  )
  assert compare.format_table(got) == compare.format_table(want)
  assert compare.format_table(want) in eval_log
  for g, w in zip(got["optimizers"], want["optimizers"], strict=True):
    assert (g["name"], g["learning_rate"]) == (w["name"], w["learning_rate"])
    # Baselines: problems never meet, bit-identical; the LSTM: its matmul rounds per row count.
    np.testing.assert_allclose(g["finals"], w["finals"], rtol=0 if g["learning_rate"] else 1e-5)


def test_a_problem_count_that_does_not_divide_names_the_flag(tmp_path):
  mesh = types.SimpleNamespace(devices=np.empty(8, object))  # the size is all that is checked
  with pytest.raises(distributed.MeshError, match=r"--num_problems=12 does not divide over the 8"):
    trainer.train(config(tmp_path, num_problems=12), mesh=mesh)
  with pytest.raises(distributed.MeshError, match=r"--valid_problems=4 .*--valid_problems=8"):
    trainer.train(config(tmp_path, valid_problems=4), mesh=mesh)
  assert not os.listdir(tmp_path)  # refused before anything was written


def test_each_device_draws_only_its_own_problems():
  """The sharded initial state is computed without communication: no device draws, then sends,
  another's problems; and it equals the one-device draw."""
  cfg = config("unused")
  task, optimizer = trainer.build(cfg)
  mesh = distributed.global_mesh()
  data = distributed.put(task.data, distributed.replicated(mesh))
  build = jax.jit(
    lambda d: meta_step.init_state(cfg, task, optimizer, d),
    out_shardings=meta_step.state_shardings(
      jax.eval_shape(lambda: meta_step.init_state(cfg, task, optimizer)), mesh
    ),
  )
  hlo = build.lower(data).compile().as_text()
  assert not any(op in hlo for op in ("all-gather", "all-reduce", "collective-permute"))
  sharded = meta_step.init_sharded_state(cfg, task, optimizer, data, mesh)
  plain = meta_step.init_state(cfg, task, optimizer)
  assert_trees_equal(sharded.inner, plain.inner)


def test_sweep_with_padding_equals_one_device():
  """11 problems on this process's devices (8 faked under conftest): 2 each on 6, one padded."""
  mesh = sharding.problems_mesh()
  if mesh.devices.size == 8:
    assert [sharding.fit_mesh(n, mesh).devices.size for n in (3, 8, 11, 13, 17)] == [3, 8, 6, 7, 6]
  task = task_registry.get("quadratic", dim=3)
  params, keys = compare.inner_lib.sample_problems(task, jax.random.key(1), 11)
  lrs = [0.01, 0.1]
  one = sharding.problems_mesh(jax.devices()[:1])
  make = compare.baselines_lib.BASELINES["adam"]
  np.testing.assert_array_equal(
    compare.sweep(task, make, lrs, params, keys, 5),
    compare.sweep(task, make, lrs, params, keys, 5, mesh=one),
  )
