"""Resuming a run: the progress each checkpoint records, and where a started job picks up.

A job killed at any moment and run again with the same flags ends with the files of an
uninterrupted run (``tests/test_fault_injection.py`` checks every file-system mutation of a run):
temporaries and half-pruned checkpoints are removed, ``metrics.jsonl`` is rewound to what the
restored checkpoint had seen, and the replayed steps are bit-identical. Every file is read and
written through ``train.run.Run``; this module decides what to do with them.
"""

import math
from typing import NamedTuple

import jax

from train import checkpoint, meta_step
from train.config import MetaTrainConfig
from train.meta_step import TrainState
from train.run import CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, Run, RunDirError

__all__ = [  # the layout's names and the error, as before ``train.run`` held them
  "CHECKPOINT_DIR",
  "CONFIG_FILE",
  "METRICS_FILE",
  "Progress",
  "RunDirError",
  "best_epoch",
  "check_output_tree",
  "host_record",
  "progress_from_host",
  "resume_or_start",
]


class Progress(NamedTuple):
  """The host's bookkeeping of a run, saved beside the state in every checkpoint.

  An epoch's validation result is the pair (problems that diverged, mean final loss of the
  others); epochs compare by fewer diverged problems first, then by the lower mean. So one
  diverging problem neither hides every epoch behind an infinite mean nor goes unreported.
  """

  best_valid: float = math.inf  # the mean final validation loss of the best epoch so far
  valid_history: tuple = ()  # after each epoch: mean final loss over non-diverged problems
  early_stopped: bool = False  # patience ran out; the run is over
  diverged_history: tuple = ()  # after each epoch: validation problems that diverged


def best_epoch(progress: Progress) -> int | None:
  """Index of the best epoch so far (fewest diverged, then lowest mean); None if none saved."""
  keys = list(zip(progress.diverged_history, progress.valid_history, strict=True))
  if not keys:
    return None
  best = min(range(len(keys)), key=lambda i: keys[i])
  return best if math.isfinite(keys[best][1]) else None


def check_output_tree(config: MetaTrainConfig) -> None:
  """Raises ``RunDirError`` if a file the run writes is in the way (``Run.check_tree``)."""
  Run(config.output_dir).check_tree()


def progress_from_host(host: dict, config: MetaTrainConfig) -> Progress:
  """A checkpoint's host fields as ``Progress``; ``ValueError`` if they are not well formed."""
  number = lambda x: isinstance(x, int | float) and not isinstance(x, bool)
  count = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0
  history = host.get("valid_history")
  if not (isinstance(history, list) and all(number(v) for v in history)):
    raise ValueError(f"checkpoint host field 'valid_history' is malformed: {history!r}")
  # Older checkpoints kept no counts; an infinite mean there meant some problem diverged.
  default = [0 if math.isfinite(v) else config.valid_problems for v in history]
  diverged = host.get("diverged_history", default)
  if not (isinstance(diverged, list) and len(diverged) == len(history)):
    raise ValueError(f"checkpoint host field 'diverged_history' is malformed: {diverged!r}")
  if not all(count(d) for d in diverged):
    raise ValueError(f"checkpoint host field 'diverged_history' is malformed: {diverged!r}")
  if not isinstance(host.get("early_stopped", False), bool):
    raise ValueError(f"checkpoint host field 'early_stopped' is malformed: {host!r}")
  if not count(host.get("metrics_lines", 0)):
    raise ValueError(f"checkpoint host field 'metrics_lines' is malformed: {host!r}")
  progress = Progress(math.inf, tuple(history), host.get("early_stopped", False), tuple(diverged))
  best = best_epoch(progress)
  return progress._replace(best_valid=math.inf if best is None else history[best])


def host_record(progress: Progress, metrics_lines: int) -> dict:
  """The host fields a checkpoint saves: ``progress`` and how many metrics lines it had seen."""
  return {
    "best_valid": progress.best_valid,
    "valid_history": list(progress.valid_history),
    "early_stopped": progress.early_stopped,
    "diverged_history": list(progress.diverged_history),
    "metrics_lines": metrics_lines,
  }


def resume_or_start(
  config, task, optimizer, ckpt_dir=None, log=print, start=None
) -> tuple[TrainState, Progress]:
  """The newest good checkpoint's state and progress, or a fresh state (``start()``, by default
  ``meta_step.init_state``; a caller that draws its own returns None from it).

  Checkpoints newer than the restored one are unusable; they are removed (after a warning) so
  they neither shadow nor count toward ``keep_checkpoints``. If checkpoints exist and none is
  usable, ``RunDirError`` names them: the run does not silently start over.

  Args:
    ckpt_dir: unused; the run's checkpoints are ``Run(config.output_dir)``'s (kept for callers).
  """
  del ckpt_dir
  run = Run(config.output_dir)
  template = jax.eval_shape(lambda: meta_step.init_state(config, task, optimizer))
  try:
    found = run.latest(
      template,
      meta_step.upgrade_checkpoint,
      check_host=lambda host: progress_from_host(host, config),
    )
  except checkpoint.NewerFormatError as e:
    raise RunDirError(str(e)) from e
  for step, reason in found.unusable:
    log(f"Skipping unusable checkpoint {run.checkpoint_path(step)}: {reason}")
  if found.step is None and found.unusable:
    raise RunDirError(
      f"{run.checkpoint_dir} holds checkpoints but none is usable: "
      + "; ".join(reason for _, reason in found.unusable)
      + ". Move them away to start over, or choose a new --output_dir."
    )
  for step, _ in found.unusable:
    run.remove_checkpoint(step)
  run.prune(config.keep_checkpoints)  # an earlier prune may have been killed
  run.metrics.rewind(found.host, found.step or 0)
  if found.step is None:
    phi = lambda: meta_step.saved_start(config, optimizer)
    start = start or (lambda: meta_step.init_state(config, task, optimizer, meta_params=phi()))
    return start(), Progress()
  log(f"Resumed from meta-step {int(found.state.step)} in {run.checkpoint_dir}.")
  return found.state, progress_from_host(found.host, config)
