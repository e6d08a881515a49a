"""One run per output directory: the writer's lock (``train.run_lock.RunLock``) refuses a second
run with a message naming the holder, is taken over from a killed run, and goes when a run ends."""

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys

import pytest

from train import meta_step, run_dir, run_lock, trainer
from train.config import MetaTrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A child process that takes the lock, says so, and holds it until its stdin closes.
HOLDER = (
  "import sys; from train import run_lock; lock = run_lock.RunLock(sys.argv[1]).acquire(); "
  "print('locked', flush=True); sys.stdin.read()"
)


def tiny_config(output_dir, **overrides):
  settings = dict(
    output_dir=str(output_dir),
    task_kwargs={"dim": 2},
    optimizer_kwargs={"hidden_size": 2, "num_layers": 1},
    unroll=2,
    horizon=2,
    num_problems=2,
    num_epochs=1,
    steps_per_epoch=1,
    valid_problems=2,
  )
  return MetaTrainConfig(**{**settings, **overrides})


def hold_lock(output_dir) -> subprocess.Popen:
  """Another process holding the lock on ``output_dir`` (ended by closing its stdin)."""
  env = {**os.environ, "PYTHONPATH": ROOT}
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLDER, str(output_dir)],
    cwd=ROOT,
    env=env,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  assert holder.stdout.readline().strip() == "locked"
  return holder


@pytest.mark.slow
def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(tmp_path):
  os.makedirs(tmp_path / "run")
  holder = hold_lock(tmp_path / "run")
  try:
    temporary = tmp_path / "run" / ".tmp-abc"  # the first run's write in progress
    temporary.write_bytes(b"half")
    with pytest.raises(run_dir.RunDirError) as error:
      trainer.train(tiny_config(tmp_path / "run"), log=lambda s: None)
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)
  message = str(error.value)
  assert f"{tmp_path / 'run'} is in use by another training run" in message
  assert f"pid {holder.pid} on host {socket.gethostname()}" in message
  assert "wait for it to finish or stop it, or choose another --output_dir" in message
  assert temporary.exists() and not (tmp_path / "run" / "config.json").exists()
  with run_lock.RunLock(str(tmp_path / "run")):  # the holder ended: free again
    pass


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
  holder = hold_lock(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=60)
  holder.stdin.close()
  lock_file = tmp_path / run_lock.LOCK_FILE
  assert f'"pid": {holder.pid}' in lock_file.read_text()  # left behind, but not held
  with run_lock.RunLock(str(tmp_path)):
    assert f'"pid": {os.getpid()}' in lock_file.read_text()
  assert not lock_file.exists()


@pytest.mark.slow
def test_the_command_line_refuses_a_locked_directory_without_a_traceback(tmp_path):
  with run_lock.RunLock(str(tmp_path)):  # this process is the other run
    result = subprocess.run(
      [sys.executable, "-m", "train.meta_train", f"--output_dir={tmp_path}", "--num_problems=8"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
    )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert f"is in use by another training run (pid {os.getpid()} on host" in result.stderr


@pytest.mark.slow
def test_the_lock_is_released_when_train_returns(tmp_path):
  config = tiny_config(tmp_path)
  trainer.train(config, log=lambda s: None)
  assert not (tmp_path / run_lock.LOCK_FILE).exists()
  assert (tmp_path / "checkpoints").is_dir()
  with run_lock.RunLock(str(tmp_path)):
    pass


def test_the_lock_is_released_when_train_raises(tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise RuntimeError("no compiling in this test")

  monkeypatch.setattr(meta_step, "jit_train_step", fail)
  with pytest.raises(RuntimeError, match="no compiling"):
    trainer.train(tiny_config(tmp_path), log=lambda s: None)
  assert (tmp_path / "config.json").exists()  # it did open the run
  assert not (tmp_path / run_lock.LOCK_FILE).exists()
  with run_lock.RunLock(str(tmp_path)):
    pass


def test_a_lock_file_removed_and_retaken_while_held_is_not_removed_by_the_first_holder(tmp_path):
  first = run_lock.RunLock(str(tmp_path)).acquire()
  os.remove(tmp_path / run_lock.LOCK_FILE)  # say, by hand; a new run then takes a new file
  second = run_lock.RunLock(str(tmp_path)).acquire()
  first.release()
  assert (tmp_path / run_lock.LOCK_FILE).exists()  # the second run's
  with pytest.raises(run_dir.RunDirError, match="in use by another training run"):
    run_lock.RunLock(str(tmp_path)).acquire()
  second.release()
  assert not (tmp_path / run_lock.LOCK_FILE).exists()


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_locks)
  with run_lock.RunLock(str(tmp_path)):
    assert (tmp_path / run_lock.LOCK_FILE).exists()
  assert "cannot be locked" in caplog.text and "one run per --output_dir" in caplog.text
  assert not (tmp_path / run_lock.LOCK_FILE).exists()
