"""SIGTERM and SIGINT stop a run after a meta-step with a checkpoint; a full disk ends in one line.

Real signals: the command line runs in child processes, one or two (``tests/test_multihost.py``'s
``launch``), and the test signals them once process 0 has run its first meta-step. The stopped
run exits with ``preemption.EXIT_STATUS`` and resumes to the uninterrupted run's final state
byte for byte. Before this, one process died of SIGTERM with nothing saved, and two processes
trained on to the end (JAX's handler took SIGTERM).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import test_multihost as multihost
import test_resume as resume

from train import checkpoint, preemption, trainer

# Real signals to training jobs, one and two processes (slow tier).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
  '--task_kwargs={"dim": 4}',
  '--optimizer_kwargs={"hidden_size": 6}',
  "--unroll=5",
  "--horizon=10",
  "--num_problems=4",
  "--num_epochs=2",
  "--steps_per_epoch=1500",  # ~1000 meta-steps/s: seconds left to signal it mid-run
  "--valid_problems=8",
  "--checkpoint_every=500",
  "--log_every=500",
  "--meta_lr=0.01",
]
TOTAL = 3000
MESSAGE = re.compile(
  r"Preempted \((SIG\w+)[^)]*\) at meta-step (\d+): checkpoint saved in (\S+); run the same "
  r"command to resume\."
)
# Two processes, reading the host only every 50 meta-steps: meta-steps dispatched back to back
# deadlocked now and then before the trainer ran them one at a time on several CPU processes.
TWO = {"num_epochs": 2, "steps_per_epoch": 150, "checkpoint_every": 50, "log_every": 50}
TWO_TOTAL = 300


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    "JAX_COMPILATION_CACHE_DIR": str(cache),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
  }


def job(output_dir, *prefix):
  return [sys.executable, *prefix, "-m", "train.meta_train", f"--output_dir={output_dir}", *FLAGS]


def file_bytes(output_dir, step):
  path = checkpoint.path_of(os.path.join(output_dir, "checkpoints"), step)
  with open(os.path.join(path, "state.msgpack"), "rb") as f:
    return f.read()


def metrics(output_dir):
  """``metrics.jsonl`` without the timings."""
  with open(os.path.join(output_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in records]


def assert_resumed_like(output_dir, reference, total):
  assert file_bytes(output_dir, total) == file_bytes(reference, total)
  assert metrics(output_dir) == metrics(reference)  # each step once
  ckpts = lambda d: checkpoint.all_steps(os.path.join(d, "checkpoints"))
  assert ckpts(output_dir) == ckpts(reference)  # the off-schedule checkpoint is gone


def signal_after_first_step(procs, targets, signum, deadline):
  """Reads process 0's lines until its first meta-step ran, then sends ``signum`` to ``targets``."""
  for line in procs[0].stdout:
    if "compiled and ran meta-step" in line:
      break
    assert time.time() < deadline, "no meta-step reported in time"
  for i in targets:
    procs[i].send_signal(signum)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  out = str(tmp_path_factory.mktemp("reference") / "run")
  subprocess.run(job(out), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
  return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_one_process_saves_on_a_signal_and_resumes_bit_exact(tmp_path, env, reference, signum):
  out = str(tmp_path / "run")
  proc = subprocess.Popen(
    job(out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  signal_after_first_step([proc], [0], signum, time.time() + 240)
  log, err = proc.communicate(timeout=240)
  assert proc.returncode == preemption.EXIT_STATUS, err[-3000:]
  assert "Traceback" not in err
  found = MESSAGE.search(err.strip().splitlines()[-1])
  assert found, err[-3000:]
  step = int(found[2])
  assert found[1] == signum.name and found[3] == os.path.join(out, "checkpoints")
  assert 0 < step < TOTAL
  assert checkpoint.all_steps(found[3])[-1] == step  # written at the step it stopped after

  result = subprocess.run(job(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from meta-step {step}" in result.stdout
  assert_resumed_like(out, reference, TOTAL)


def test_a_full_disk_ends_in_one_line_and_resumes(tmp_path, env, reference):
  """The 4th synced write (a checkpoint's) fails with ENOSPC; the rerun finishes the run."""
  out = str(tmp_path / "run")
  full = (
    "import errno; from learned_opt import tree_files; real = tree_files._write_synced; n = [0]\n"
    "def write(path, data):\n"
    "  n[0] += 1\n"
    "  if n[0] == 4: raise OSError(errno.ENOSPC, 'No space left on device')\n"
    "  real(path, data)\n"
    "tree_files._write_synced = write\n"
    "import sys; from train import meta_train; sys.argv[0] = 'meta_train'; meta_train.run()\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", full, f"--output_dir={out}", *FLAGS],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
    f"Disk full (No space left on device) writing to {out}: free space and run the same command "
    "to resume."
  )
  result = subprocess.run(job(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_resumed_like(out, reference, TOTAL)


# Two processes ---------------------------------------------------------------------------------

# Who gets the signal: both (a scheduler), only process 0 (the writer), only process 1.
SCENARIOS = {
  "both": ([0, 1], signal.SIGTERM),
  "p0": ([0], signal.SIGINT),
  "p1": ([1], signal.SIGTERM),
}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
  """The uninterrupted 2-process run beside the signalled ones; then those resumed."""
  root = tmp_path_factory.mktemp("two")
  cache = {
    "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
  }
  deadline = time.time() + multihost.TIMEOUT
  start = lambda name: multihost.launch(
    "train.meta_train", multihost.train_flags(root / name, **TWO), 2, processes=2, env=cache
  )
  reference = start("reference")
  multihost.finish(reference, deadline)  # compiles once for all
  stopped = {name: start(name) for name in SCENARIOS}
  for name, (targets, signum) in SCENARIOS.items():
    signal_after_first_step(stopped[name], targets, signum, deadline)
  logs = {name: multihost.finish(procs, deadline, ok=False) for name, procs in stopped.items()}
  codes = {name: [p.returncode for p in procs] for name, procs in stopped.items()}
  resumed = {name: start(name) for name in SCENARIOS}
  resumed_logs = {name: multihost.finish(procs, deadline) for name, procs in resumed.items()}
  return root, logs, codes, resumed_logs


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_two_processes_stop_at_one_step_and_resume_bit_exact(two_process_runs, name):
  root, logs, codes, resumed_logs = two_process_runs
  assert codes[name] == [preemption.EXIT_STATUS] * 2, logs[name]
  lines = [MESSAGE.search(log) for log in logs[name]]
  assert all(lines), logs[name]
  steps = {int(found[2]) for found in lines}
  assert len(steps) == 1, lines  # both processes stopped after the same meta-step
  step = steps.pop()
  assert 0 < step < TWO_TOTAL
  assert {found[1] for found in lines} == {SCENARIOS[name][1].name}
  assert checkpoint.all_steps(str(root / name / "checkpoints"))[-1] >= step
  assert f"Resumed from meta-step {step}" in resumed_logs[name][0]
  assert_resumed_like(str(root / name), str(root / "reference"), TWO_TOTAL)


# In-process: the handlers and the agreement --------------------------------------------------


def small_config(output_dir):
  """test_resume's small run, checkpointed at step 4 only, so step 1's is off the schedule."""
  return resume.small_config(output_dir, checkpoint_every=4, keep_checkpoints=1)


def test_train_stops_after_the_signalled_step_and_restores_the_handlers(tmp_path):
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  config = small_config(tmp_path / "run")
  kill = lambda line: "meta-step 1 " in line and os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(trainer.Preempted, match=r"Preempted \(SIGTERM\) at meta-step 1: "):
    trainer.train(config, log=kill)
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
  ckpt_dir = os.path.join(config.output_dir, "checkpoints")
  assert checkpoint.marked_steps(ckpt_dir, trainer.PREEMPTED_KEY) == [1]
  trainer.train(config, log=lambda s: None)  # resumes; the off-schedule checkpoint is dropped
  reference = small_config(tmp_path / "reference")
  trainer.train(reference, log=lambda s: None)
  assert_resumed_like(config.output_dir, reference.output_dir, 6)


def test_a_second_signal_gets_the_default_action():
  # The handler found on entry comes back: Python's default_int_handler, or SIG_IGN when the
  # test process was started in the background by a non-interactive shell.
  before = signal.getsignal(signal.SIGINT)
  with preemption.watch():
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.received() == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == signal.SIG_DFL
  assert preemption.received() == 0
  assert signal.getsignal(signal.SIGINT) is before


def test_processes_agree_on_the_step_and_space_their_checks():
  """Two processes, simulated: process 0's spacing rules; process 1's signal stops both."""
  clock = iter([0.0, 10.0, 10.5]).__next__  # compiling, then 50 steps in 0.5 s
  table = lambda signal_1, proposal_0: lambda row: [[0, proposal_0], [signal_1, int(row[1])]]
  check = preemption.StopCheck(0, 2, gather=table(0, 1), clock=clock)
  assert check(0) is None and check.next == 1
  assert check(1) is None and check.next == 2  # a compiling step: check again at once
  check.gather = table(signal.SIGTERM, 100)
  assert check(51) == "SIGTERM to process 1" and check.next == 151
  assert preemption.steps_between_checks(50, 0.5) == 100
  assert preemption.steps_between_checks(1, 60.0) == 1
  assert preemption.first_signal([0, 15, 2], this_process=1) == "SIGTERM"
