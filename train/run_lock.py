"""One writer per run directory: an exclusive lock held for the whole run.

A second trainer on the same ``--output_dir`` would delete the first one's temporary files at
its start and both would write the same checkpoints; the lock turns that into a clear refusal
naming the holder, before the second one touches a file.
"""

import datetime
import errno
import fcntl
import json
import logging
import os
import socket

from train.run import LOCK_FILE, RunDirError

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # the file system has no flock


class RunLock:
  """The writer's exclusive hold on a run directory, for as long as the run lasts.

  ``fcntl.flock`` on ``OUTPUT_DIR/.lock``: the kernel releases it when the holder's file is
  closed, by ``release`` or by the process dying however it dies, so the lock file a killed run
  leaves behind is taken over by the next run without a refusal. The holder writes its pid, host
  and start time into the file for the refusal message only. A clean ``release`` removes the file,
  so a finished run leaves the same files whether or not it was ever killed and resumed.

  ``flock`` holds between processes of one host. Over NFS it may not be honoured across hosts (it
  depends on the client and server), so there two hosts may still write one directory at once:
  give each run its own ``--output_dir``.
  """

  def __init__(self, output_dir: str):
    self.output_dir = output_dir
    self.path = os.path.join(output_dir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> "RunLock":
    """Takes the lock; raises ``RunDirError`` naming the holder if another run has it."""
    for _ in range(100):  # retried only when a holder removed the file as we opened it
      fd = self._open()
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirError(
          f"{self.output_dir} is in use by another training run ({holder}; lock {self.path}). "
          "Two runs writing one directory destroy each other's files: wait for it to finish or "
          "stop it, or choose another --output_dir."
        ) from None
      except OSError as e:
        if e.errno not in _NO_LOCKS:
          os.close(fd)
          message = f"{self.path} cannot be locked ({e}); choose another --output_dir."
          raise RunDirError(message) from e
        # A file system without locks: runs there went unguarded before, and still may.
        logging.warning(
          "%s cannot be locked (%s): nothing stops a second run from writing %s at the same "
          "time; start one run per --output_dir.",
          self.path,
          e,
          self.output_dir,
        )
      if _same_file(fd, self.path):
        self._fd = fd
        _write_holder(fd)
        return self
      os.close(fd)  # locked a file its holder had just removed; lock the one there now
    raise RunDirError(f"{self.path} keeps changing; is another run starting there? Try again.")

  def _open(self) -> int:
    try:
      return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise RunDirError(
        f"{self.path} cannot be opened ({e}); remove whatever is there (a run's lock file is a "
        "plain file) or choose another --output_dir."
      ) from e

  def release(self) -> None:
    """Removes the lock file and lets go; a no-op if not held."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      if _same_file(fd, self.path):  # removed while held: by someone else, who owns the name now
        os.unlink(self.path)  # before closing: a run waiting on this file retries (_same_file)
    finally:
      os.close(fd)

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _same_file(fd: int, path: str) -> bool:
  """Whether ``path`` still names the file open as ``fd`` (not removed or replaced since)."""
  try:
    named = os.stat(path)
  except FileNotFoundError:
    return False
  held = os.fstat(fd)
  return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _write_holder(fd: int) -> None:
  started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  record = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


def _holder(fd: int) -> str:
  """The lock holder in words, from what it wrote into the lock file."""
  try:
    record = json.loads(os.pread(fd, 4096, 0))
    return f"pid {record['pid']} on host {record['host']}, started {record['started']}"
  except (OSError, ValueError, TypeError, KeyError):
    return "holder unknown: it has not written its pid yet"
