"""Stopping meta-training cleanly on SIGTERM or SIGINT: a checkpoint, then a distinct exit.

A scheduler preempts a job with SIGTERM and, after a grace period, SIGKILL; Ctrl-C sends SIGINT.
Within ``watch`` the first of these only notes the signal; the trainer asks a ``StopCheck`` after
each meta-step whether to stop, writes a checkpoint at that step and raises ``Preempted``, which
the command line turns into ``EXIT_STATUS`` and a one-line message. A second signal gets the
default action: the job ends at once, its files as consistent as after SIGKILL.

Several processes must stop after the same meta-step: each takes part in every meta-step's
collectives, and process 0 writes the checkpoint of all. ``StopCheck`` gathers every process's
noted signal at the same meta-steps on all of them, about ``CHECK_SECONDS`` apart, so the gather
(a few milliseconds between CPU processes, more than a small meta-step) costs under 1%. Process
0 picks the spacing from its step time; a stop comes within about a second and a meta-step.

JAX's handler: ``jax.distributed.initialize`` starts a preemption sync manager whose C++ SIGTERM
handler only sets a flag for ``multihost_utils.reached_preemption_sync_point``; a loop that never
asks trains on to the end. ``signal.signal`` replaces it (``sigaction``), so ``watch`` must start
after ``initialize``. JAX's protocol is not used: it sees SIGTERM only, swallows a second one,
exists only with several processes and can be turned off (``jax_enable_preemption_service``).
"""

import contextlib
import signal
import threading
import time

import numpy as np

EXIT_STATUS = 75  # EX_TEMPFAIL of sysexits.h, "temporary failure, try again": the job stopped on
# a signal after saving, and the same command resumes it. Not 143 (128 + SIGTERM): a shell reports
# that for a process killed by SIGTERM without saving anything, so a wrapper could not tell them
# apart.
INTERRUPTED_STATUS = 130  # 128 + SIGINT: Ctrl-C before the handlers were installed.
SIGNALS = (signal.SIGTERM, signal.SIGINT)
CHECK_SECONDS = 1.0  # several processes: agree whether to stop about this often

_active = None  # the innermost ``watch``'s _Notes


class Preempted(Exception):
  """A run stopped on a signal after meta-step ``step``, whose checkpoint is written (if any)."""

  def __init__(self, step: int, signal_name: str, checkpoint_dir: str):
    self.step, self.signal_name, self.checkpoint_dir = step, signal_name, checkpoint_dir
    super().__init__(message(step, signal_name, checkpoint_dir))


def message(step: int, signal_name: str, checkpoint_dir: str) -> str:
  """The one line a stopped job ends with; step 0 has no checkpoint (a fresh run)."""
  if not step:
    return (
      f"Stopped ({signal_name}) before meta-step 1: nothing to save; run the same command to start."
    )
  return (
    f"Preempted ({signal_name}) at meta-step {step}: checkpoint saved in {checkpoint_dir}; run "
    "the same command to resume."
  )


class _Notes:
  """The first signal received; a handler that notes it and restores the default action."""

  def __init__(self):
    self.signum = 0

  def handle(self, signum, frame):
    del frame
    self.signum = self.signum or signum
    for each in SIGNALS:  # a second signal ends the job at once
      signal.signal(each, signal.SIG_DFL)


@contextlib.contextmanager
def watch():
  """Within the block, SIGTERM and SIGINT are noted (``received``) instead of ending the job.

  A nested block shares the outer one's notes (the command line watches from start-up, the
  trainer from its start). Off the main thread, where Python cannot install handlers, nothing is
  watched. On leaving, the handlers from before are back; one installed outside Python (JAX's)
  cannot be put back, and the default action takes its place.
  """
  global _active
  if _active is not None or threading.current_thread() is not threading.main_thread():
    yield
    return
  notes = _Notes()
  previous = {each: signal.signal(each, notes.handle) for each in SIGNALS}
  _active = notes
  try:
    yield
  finally:
    _active = None
    for each, handler in previous.items():
      signal.signal(each, signal.SIG_DFL if handler is None else handler)


def received() -> int:
  """The number of the first signal noted by the active ``watch``; 0 for none."""
  return _active.signum if _active is not None else 0


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


def steps_between_checks(steps: int, seconds: float, target: float = CHECK_SECONDS) -> int:
  """About how many meta-steps take ``target`` seconds, if ``steps`` took ``seconds``."""
  if steps <= 0 or seconds <= 0:
    return 1
  return int(min(max(1, target * steps / seconds), 1_000_000))


def first_signal(signals, this_process: int) -> str | None:
  """The lowest-numbered process's signal (named, with its process if another's); None if none."""
  for process, signum in enumerate(int(s) for s in signals):
    if signum:
      return signal_name(signum) + ("" if process == this_process else f" to process {process}")
  return None


class StopCheck:
  """Whether to stop after a meta-step; decided alike on every process.

  Call it once before the first meta-step and after each. One process reads its own notes
  every time. Several gather every process's notes at steps process 0 spaces about
  ``CHECK_SECONDS`` apart, by its own step time; the first gather after the first meta-step,
  whose time is mostly compiling.

  Args:
    gather: with several processes, ``row -> rows``: each process's int32 row, in process
      order, on every process (``distributed.gather_rows``; all processes call it together).
  """

  def __init__(self, process_index: int, processes: int, gather=None, clock=time.monotonic):
    self.process_index, self.processes = process_index, processes
    self.gather, self.clock = gather, clock
    self.next, self.last, self.tic = None, None, None

  def __call__(self, step: int) -> str | None:
    """The signal to stop for after meta-step ``step`` (all processes alike); None: go on."""
    if self.processes == 1:
      return signal_name(received()) if received() else None
    if self.next is not None and step < self.next:
      return None
    now = self.clock()
    steps = 0 if self.last is None else step - self.last
    proposal = steps_between_checks(steps, 0.0 if self.tic is None else now - self.tic)
    table = np.asarray(self.gather(np.asarray([received(), proposal], np.int32)))
    self.next = step + int(table[0, 1])  # process 0's spacing, the same everywhere
    self.last, self.tic = step, now
    return first_signal(table[:, 0], self.process_index)
