"""Progress of a long loop in plain lines: how far, how fast, and when it should end.

A sweep that runs in chunks (learning rates ``lr_batch`` at a time, problems ``problem_batch``
at a time) reports each finished chunk, e.g.::

  adam: chunk 3/8 (lr 0.000256 to 0.00205), 41 s/chunk, ETA 3:25

The first chunk's line always shows, so a long job says early that it moves; its rate includes
the compilation, so its ETA errs long. Later lines come at most every ``EVERY_S`` seconds, with a
rate that leaves the first chunk out; the last chunk has none (the caller's line for the whole
job follows).
"""

import time
from collections.abc import Callable

EVERY_S = 10.0  # seconds between lines after the first


def duration(seconds: float) -> str:
  """``42.0 -> "42s"``, ``205.0 -> "3:25"``, ``3725.0 -> "1:02:05"``."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
  """Counts the chunks of one job and logs ``LABEL: chunk i/n (detail), rate, ETA``.

  Args:
    label: what runs (an optimizer's name).
    total: chunks in the job; with one, nothing is logged.
    log: where lines go (``print``, a logger).
    every: seconds between lines after the first; default ``EVERY_S``.
    clock: seconds, monotonic (tests pass their own).
    unit: what one step is called in the line (``"chunk"``, ``"task"``).
  """

  def __init__(
    self,
    label: str,
    total: int,
    log: Callable[[str], None],
    every: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    unit: str = "chunk",
  ):
    self.label, self.total, self.log, self.clock, self.unit = label, total, log, clock, unit
    self.every = EVERY_S if every is None else every
    self.done = 0
    self.start = clock()
    self.first: float | None = None  # when the first chunk (which compiles) ended
    self.last_line: float | None = None

  def step(self, detail: str = "") -> None:
    """One chunk has finished; ``detail`` says which (rates, problems)."""
    now = self.clock()
    self.done += 1
    if self.done == 1:
      self.first = now
    if self.done >= self.total:
      return  # the caller reports the whole job
    if self.last_line is not None and now - self.last_line < self.every:
      return
    self.last_line = now
    if self.done == 1:
      per = now - self.start
    else:
      per = (now - self.first) / (self.done - 1)
    what = f" ({detail})" if detail else ""
    eta = duration(per * (self.total - self.done))
    unit = self.unit
    self.log(f"{self.label}: {unit} {self.done}/{self.total}{what}, {per:.3g} s/{unit}, ETA {eta}")
