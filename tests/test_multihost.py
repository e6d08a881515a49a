"""Many devices and processes: a mesh gives the one-device results, and a killed run resumes.

The command lines run in child processes (``tests/multihost_worker.py``) with faked CPU devices:
one process with 8 devices, and two processes with 2 devices each, joined by ``jax.distributed``
on 127.0.0.1 with gloo collectives. Each child has a hard timeout, so a hang fails the test.

Why "to float tolerance": the problem set is the same on any mesh (checked bit for bit), but the
meta-gradient's mean over problems is summed in another order when it is all-reduced from
per-device partial sums, and the LSTM's matmul over (problems x coordinates) rows rounds
differently for another row count; phi then differs in the last bits (~1e-7 relative). The
children compile with LLVM at -O0 to halve their compile time, which rounds differently from
this process's -O2 (no fused multiply-adds), so bit-for-bit checks compare children with
children, or this process with itself.
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
from eval import baselines, compare, report, sharding
from tasks import registry as task_registry
from train import checkpoint, distributed, inner, meta_step, trainer
from train.config import MetaTrainConfig

# Multi-host: child processes joined by jax.distributed, 8-device runs (slow tier).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
TIMEOUT = 480  # seconds for all children (under a minute on an idle machine); a hang fails
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
BASELINES = ["adam"]
EVAL_FLAGS = [f"--baselines={','.join(BASELINES)}", "--num_problems=6", "--num_steps=8", "--seed=3"]


def train_flags(output_dir, **overrides) -> list[str]:
  flags = [f"--output_dir={output_dir}"]
  for name, value in {**SETTINGS, **overrides}.items():
    flags.append(f"--{name}={json.dumps(value) if isinstance(value, dict) else value}")
  return flags


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(module, flags, devices: int, processes=1, env=None, cwds=None) -> list[subprocess.Popen]:
  """Starts ``processes`` children running ``module``'s command line, ``devices`` CPUs each.

  ``cwds``: each process's working directory (default: the repository), e.g. so that a relative
  ``--output_dir`` shows which process wrote what.
  """
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    # LLVM at -O0 halves the children's compile time (the test budget); all children alike.
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
    "--xla_backend_optimization_level=0",
    **(env or {}),
  }
  cluster = []
  if processes > 1:
    cluster = [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={processes}"]
  return [
    subprocess.Popen(
      [sys.executable, WORKER, module, *flags, *cluster]
      + ([f"--process_id={i}"] if processes > 1 else []),
      cwd=cwds[i] if cwds else ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]


def finish(procs, deadline, ok=True) -> list[str]:
  """Waits for every child (killing all at the deadline); their outputs. Fails on an error
  (with ``ok=False``: fails unless every child exits with an error)."""
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=max(deadline - time.time(), 1))[0])
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    pytest.fail("a child process hung:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
  for proc, out in zip(procs, outputs, strict=True):
    assert (proc.returncode == 0) == ok, out[-5000:]
  return outputs


def config(output_dir, **overrides) -> MetaTrainConfig:
  return MetaTrainConfig(output_dir=str(output_dir), **{**SETTINGS, **overrides})


def final_state(output_dir, **overrides):
  cfg = config(output_dir, **overrides)
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


def assert_close(got, want, rtol):
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every child run, and this process's one-device references computed while they run.

  Order: the two-process run beside the 8-device one; then a two-process run killed after
  checkpoint 3 beside the two-process evaluation; then the killed run resumed. The children
  share a compilation cache, so the killed and resumed runs reuse the first one's programs.
  """
  root = tmp_path_factory.mktemp("multihost")
  out = {name: root / name for name in ("eight", "two", "killed", "eval", "one")}
  cache = {
    "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
  }
  deadline = time.time() + TIMEOUT
  two = launch("train.meta_train", train_flags(out["two"]), 2, processes=2, env=cache)
  eight = launch("train.meta_train", train_flags(out["eight"]), 8, env=cache)
  one_device, _ = trainer.train(config(out["one"]), log=lambda s: None)
  finish(two, deadline)
  killed = launch(
    "train.meta_train",
    train_flags(out["killed"]),
    2,
    processes=2,
    env={**cache, "DIE_AFTER_CHECKPOINT": "3"},
  )
  evaluation = launch(
    "eval.evaluate",
    [f"--checkpoint={out['two']}", f"--output_dir={out['eval']}", *EVAL_FLAGS],
    2,
    processes=2,
    env=cache,
  )
  one_device_sweep = compare.compare(
    task_registry.get("quadratic", dim=4),
    {"lstm": learned_opt.load(str(out["two"]))},
    BASELINES,
    num_problems=6,
    num_steps=8,
    seed=3,
    log=lambda s: None,
    mesh=sharding.problems_mesh(jax.devices()[:1]),
  )
  try:  # process 0 dies after checkpoint 3; process 1 then waits on it, so it is killed too
    log = killed[0].communicate(timeout=max(deadline - time.time(), 1))[0]
  except subprocess.TimeoutExpired:
    log = "(timed out)"
  for proc in killed:
    proc.kill()
    proc.communicate()
  assert killed[0].returncode == -signal.SIGKILL, f"process 0 did not die as set up:\n{log[-3000:]}"
  resumed = launch("train.meta_train", train_flags(out["killed"]), 2, processes=2, env=cache)
  eval_log = finish(evaluation, deadline)[0]
  resumed_log = finish(resumed, deadline)[0]
  finish(eight, deadline)
  return types.SimpleNamespace(
    out=out,
    resumed_log=resumed_log,
    eval_log=eval_log,
    one_device=one_device,
    one_device_sweep=one_device_sweep,
  )


def test_eight_devices_and_two_processes_give_the_one_device_run(runs):
  eight, two = final_state(runs.out["eight"]), final_state(runs.out["two"])
  # The same problems, bit for bit, on 1 process x 8 devices and 2 processes x 2 devices.
  assert_trees_equal(
    (eight.inner.task_params, eight.inner.data_key), (two.inner.task_params, two.inner.data_key)
  )
  for state in (eight, two):  # this process compiles at -O2: problems agree to rounding
    assert_trees_equal(state.inner.data_key, runs.one_device.inner.data_key)
    assert_close(state.inner.task_params, runs.one_device.inner.task_params, rtol=1e-6)
    assert_close(
      (state.meta_params, state.meta_opt_state),
      (runs.one_device.meta_params, runs.one_device.meta_opt_state),
      rtol=1e-5,
    )
  with open(runs.out["two"] / "config.json") as f:  # only process 0 wrote
    assert json.load(f)["num_problems"] == SETTINGS["num_problems"]


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(runs):
  out = runs.out
  assert "Resumed from meta-step 3" in runs.resumed_log
  assert state_bytes(out["killed"]) == state_bytes(out["two"])
  _, phi = learned_opt.load(str(out["killed"]))
  _, want = learned_opt.load(str(out["two"]))
  for x, y in zip(jax.tree.leaves(phi), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(x, y)


def test_a_two_process_sweep_gives_the_one_device_table(runs):
  with open(runs.out["eval"] / "results.json") as f:
    got = json.load(f)
  want = runs.one_device_sweep
  assert report.format_table(got) == report.format_table(want)
  assert runs.eval_log.count(report.format_table(want)) == 1  # printed by process 0 alone
  for g, w in zip(got["optimizers"], want["optimizers"], strict=True):
    assert (g["name"], g["learning_rate"]) == (w["name"], w["learning_rate"])
    # Bit-identical within one process (test_sweep_with_padding_equals_one_device); here the
    # children compile at -O0, which rounds differently (no fused multiply-adds).
    np.testing.assert_allclose(g["finals"], w["finals"], rtol=1e-5)


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
  compiled = build.lower(data).compile()
  assert not any(op in compiled.as_text() for op in ("all-gather", "all-reduce", "all-to-all"))
  sharded = compiled(data)
  plain = meta_step.init_state(cfg, task, optimizer)
  assert_trees_equal(sharded.inner, plain.inner)


def test_sweep_with_padding_equals_one_device():
  """11 problems on this process's devices (8 faked under conftest): 2 each on 6, one padded."""
  mesh = sharding.problems_mesh()
  if mesh.devices.size == 8:
    assert [sharding.fit_mesh(n, mesh).devices.size for n in (3, 8, 11, 13, 17)] == [3, 8, 6, 7, 6]
  task = task_registry.get("quadratic", dim=3)
  params, keys = inner.sample_problems(task, jax.random.key(1), 11)
  lrs = [0.01, 0.1]
  one = sharding.problems_mesh(jax.devices()[:1])
  make = baselines.BASELINES["adam"]
  np.testing.assert_array_equal(
    compare.sweep(task, make, lrs, params, keys, 5),
    compare.sweep(task, make, lrs, params, keys, 5, mesh=one),
  )


@pytest.mark.parametrize("tasks, detected", [("2", "SlurmCluster"), ("1", None)])
def test_auto_start_follows_jax_cluster_detection(monkeypatch, tasks, detected):
  """SLURM with 2 tasks is a cluster to join; with 1 task a plain process stays one."""
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": tasks}
  for name, value in {**slurm, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
    monkeypatch.setenv(name, value)
  assert distributed.detected_cluster() == detected


def test_start_up_flags_that_contradict_are_refused(monkeypatch):
  monkeypatch.setattr(distributed, "detected_cluster", lambda: None)
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  with pytest.raises(ValueError, match="--distributed=off contradicts"):
    distributed.initialize(num_processes=2, mode="off")
  with pytest.raises(
    ValueError, match=r"--process_id=2 must lie in 0 \.\. --num_processes - 1 = 1"
  ):
    distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
  assert distributed.initialize(mode="auto") is False  # nothing given, nothing detected


# --num_devices and the experiment runners ------------------------------------------------------

FEW = {"num_problems": 2, "valid_problems": 2}  # the mnist preset's meta-step: 2 problems
QUADRATIC_VARIANTS = [  # the cheapest runner, on tiny sizes
  "--checkpoint=lstm=pretrained:quadratic",
  "--baselines=adam",
  "--num_problems=4",
  "--num_steps=5",
  "--seed=3",
]


@pytest.fixture(scope="module")
def few_devices_runs(tmp_path_factory):
  """Children run together: meta-training on 2 of 8 devices (--num_devices=2); a --num_devices
  that does not fit 2 processes; quadratic_variants on 1 device, 2 devices and 2 processes (each
  process in its own working directory, with a relative --output_dir). Meanwhile this process
  meta-trains the same configuration on one device."""
  root = tmp_path_factory.mktemp("few_devices")
  cwds = [root / "process0", root / "process1"]
  for cwd in cwds:
    cwd.mkdir()
  deadline = time.time() + TIMEOUT
  qv = lambda out, devices, **kw: launch(
    "experiments.quadratic_variants", [*QUADRATIC_VARIANTS, f"--output_dir={out}"], devices, **kw
  )
  children = {
    "two_of_eight": launch(
      "train.meta_train", [*train_flags(root / "two_of_eight", **FEW), "--num_devices=2"], 8
    ),
    "misfit": launch(
      "train.meta_train", [*train_flags(root / "misfit"), "--num_devices=3"], 1, processes=2
    ),
    "qv_one": qv(root / "qv_one", 1),
    "qv_two": qv(root / "qv_two", 2),
    "qv_processes": qv("qv", 1, processes=2, cwds=cwds),
  }
  one_device, _ = trainer.train(config(root / "one", **FEW), log=lambda s: None)
  logs = {name: finish(procs, deadline, ok=name != "misfit") for name, procs in children.items()}
  return types.SimpleNamespace(root=root, cwds=cwds, logs=logs, one_device=one_device)


def test_num_devices_runs_two_problems_on_two_of_eight_devices(few_devices_runs):
  """Without --num_devices, 2 problems on 8 devices are refused (see the next test); with
  --num_devices=2 the run gives the one-device phi to the tolerance used above."""
  state = final_state(few_devices_runs.root / "two_of_eight", **FEW)
  want = few_devices_runs.one_device
  assert_trees_equal(state.inner.data_key, want.inner.data_key)
  # Tolerance 1e-5 of each leaf's scale: with 2 problems the mean meta-gradient cancels more
  # than with 8, and Adam normalizes each coordinate, so a near-zero element of phi carries an
  # absolute error of the leaf's scale (measured: 1.4e-6 on leaves of size ~1).
  got, want = (state.meta_params, state.meta_opt_state), (want.meta_params, want.meta_opt_state)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(y))))


def test_a_count_that_does_not_divide_suggests_num_devices_that_fit():
  mesh = distributed.global_mesh()  # 8 faked devices (conftest)
  assert mesh.devices.size == 8
  counts = {"num_problems": 2, "valid_problems": 4}
  with pytest.raises(distributed.MeshError, match=r"--num_devices=2 or --num_devices=1\.$"):
    distributed.check_divides(2, mesh, "num_problems", counts)
  with pytest.raises(distributed.MeshError, match=r"fewer devices: --num_devices=1\.$"):
    distributed.check_divides(2, mesh, "num_problems", {"valid_problems": 3})


def test_num_devices_takes_an_equal_share_of_each_process():
  devices = [types.SimpleNamespace(process_index=p, id=8 * p + i) for p in (0, 1) for i in range(4)]
  assert distributed.select_devices(None, devices) == devices
  assert [d.id for d in distributed.select_devices(4, devices)] == [0, 1, 8, 9]
  assert [d.id for d in distributed.select_devices(2, devices)] == [0, 8]
  assert distributed.fitting_device_counts(devices) == [2, 4, 6, 8]
  for bad in (0, -2, 3, 10):
    with pytest.raises(
      ValueError,
      match=rf"--num_devices={bad} does not fit the 8 visible devices "
      r"of 2 process.*Use one of --num_devices=2, 4, 6, 8\.",
    ):
      distributed.select_devices(bad, devices)
  one_process = jax.devices()  # 8 faked devices
  assert distributed.select_devices(3, one_process) == one_process[:3]
  with pytest.raises(ValueError, match=r"--num_devices=9 .*--num_devices=1, 2, 3, 4, 5, 6, 7, 8"):
    distributed.select_devices(9, one_process)


def test_a_num_devices_that_does_not_fit_the_processes_is_a_usage_error(few_devices_runs):
  for log in few_devices_runs.logs["misfit"]:  # both processes, before anything is compiled
    assert "--num_devices=3 does not fit the 2 visible devices of 2 process(es)" in log
    assert "Use one of --num_devices=2." in log
  assert not (few_devices_runs.root / "misfit").exists()


def test_a_runner_writes_the_same_table_on_one_or_two_devices_or_processes(few_devices_runs):
  root, (first, second) = few_devices_runs.root, few_devices_runs.cwds
  summary = (root / "qv_one" / "summary.md").read_text()
  assert "| adam |" in summary and "| lstm |" in summary
  assert (root / "qv_two" / "summary.md").read_text() == summary
  assert (first / "qv" / "summary.md").read_text() == summary
  assert not (second / "qv").exists()  # process 1 wrote nothing
  zero, one = few_devices_runs.logs["qv_processes"]
  assert "Wrote qv/results.json" in zero and "Wrote" not in one and "adam" not in one
