"""A meta-training run's directory: its files, the resume guard, and resuming from it.

``OUTPUT_DIR`` holds ``config.json``, ``metrics.jsonl``, ``checkpoints/step_*`` and the best
optimizer saved so far. Resuming: a job killed at any moment and run again with the same flags
ends with the files of an uninterrupted run (``tests/test_fault_injection.py`` checks every
file-system mutation of a run): temporaries and half-pruned checkpoints are removed,
``metrics.jsonl`` is rewound to what the restored checkpoint had seen, and the replayed steps are
bit-identical.

One process writes a run directory at a time: the trainer's writer holds ``train.run_lock`` on
it for the whole run.
"""

import json
import math
import os
from typing import NamedTuple

import jax

import learned_opt
from learned_opt import tree_files
from train import checkpoint, meta_step, saved_config
from train.config import MetaTrainConfig, check_output_dir
from train.meta_step import TrainState

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


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


class RunDirError(ValueError):
  """The output directory cannot be used as asked (a refused resume, a broken file tree)."""


def best_epoch(progress: Progress) -> int | None:
  """Index of the best epoch so far (fewest diverged, then lowest mean); None if none saved."""
  keys = list(zip(progress.diverged_history, progress.valid_history, strict=True))
  if not keys:
    return None
  best = min(range(len(keys)), key=lambda i: keys[i])
  return best if math.isfinite(keys[best][1]) else None


def check_output_tree(config: MetaTrainConfig) -> None:
  """Raises ``RunDirError`` if a file the run writes is in the way (e.g. a folder of its name)."""
  check_output_dir(config.output_dir)
  expected = {
    CHECKPOINT_DIR: os.path.isdir,
    METRICS_FILE: os.path.isfile,
    CONFIG_FILE: os.path.isfile,
    learned_opt.serialization.RECORD_FILE: os.path.isfile,
  }
  for name, is_kind in expected.items():
    path = os.path.join(config.output_dir, name)
    if os.path.lexists(path) and not is_kind(path):
      kind = "a directory" if is_kind is os.path.isdir else "a file"
      raise RunDirError(f"{path} must be {kind}; move it away or choose a new --output_dir.")


def check_resumable(config: MetaTrainConfig, config_path: str, ckpt_dir: str) -> None:
  """Refuses to resume a run under settings that would change its results, naming them."""
  if not checkpoint.all_steps(ckpt_dir):
    return
  if not os.path.exists(config_path):
    raise RunDirError(
      f"{ckpt_dir} holds checkpoints but {config_path} is missing, so whether they fit these "
      "flags cannot be checked. Restore config.json, or choose a new --output_dir."
    )
  try:
    changed = saved_config.differences(saved_config.read_saved(config_path), config)
  except (ValueError, TypeError, KeyError) as e:
    raise RunDirError(
      f"{config_path} is unreadable ({e}); restore it or choose a new --output_dir."
    ) from e
  if changed:
    raise RunDirError(
      f"{config.output_dir} holds a run with a different config ({config_path}): "
      + "; ".join(changed)
      + ". Resume it with the same flags or choose a new --output_dir."
    )


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
  return {
    "best_valid": progress.best_valid,
    "valid_history": list(progress.valid_history),
    "early_stopped": progress.early_stopped,
    "diverged_history": list(progress.diverged_history),
    "metrics_lines": metrics_lines,
  }


def metrics_lines(path: str) -> int:
  if not os.path.exists(path):
    return 0
  return tree_files.read_regular(path).count(b"\n")  # a FIFO raises rather than blocks


def rewind_metrics(path: str, host: dict | None, step: int) -> None:
  """Drops the records a resumed run will write again (and a torn last line).

  Keeps the lines that existed when the restored checkpoint was written (its ``metrics_lines``;
  older checkpoints: records up to its step), so a replayed step is recorded once.
  """
  if not os.path.exists(path):
    return
  lines = tree_files.read_regular(path).splitlines(keepends=True)
  complete = [line for line in lines if line.endswith(b"\n")]
  if host is None:
    kept = []
  elif "metrics_lines" in host:
    kept = complete[: host["metrics_lines"]]
  else:
    kept = []
    for line in complete:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and record.get("step", 0) <= step:
        kept.append(line)
  if kept != lines:
    tree_files.atomic_write(path, b"".join(kept))


def resume_or_start(
  config, task, optimizer, ckpt_dir, log, start=None
) -> tuple[TrainState, Progress]:
  """The newest good checkpoint's state and progress, or a fresh state (``start()``, by default
  ``meta_step.init_state``; a caller that draws its own returns None from it).

  Checkpoints newer than the restored one are unusable; they are removed (after a warning) so
  they neither shadow nor count toward ``keep_checkpoints``. If checkpoints exist and none is
  usable, ``RunDirError`` names them: the run does not silently start over.
  """
  template = jax.eval_shape(lambda: meta_step.init_state(config, task, optimizer))
  try:
    found = checkpoint.latest(
      ckpt_dir,
      template,
      meta_step.upgrade_checkpoint,
      check_host=lambda host: progress_from_host(host, config),
    )
  except checkpoint.NewerFormatError as e:
    raise RunDirError(str(e)) from e
  for step, reason in found.unusable:
    log(f"Skipping unusable checkpoint {checkpoint.path_of(ckpt_dir, step)}: {reason}")
  if found.step is None and found.unusable:
    raise RunDirError(
      f"{ckpt_dir} holds checkpoints but none is usable: "
      + "; ".join(reason for _, reason in found.unusable)
      + ". Move them away to start over, or choose a new --output_dir."
    )
  for step, _ in found.unusable:
    checkpoint.remove(ckpt_dir, step)
  checkpoint.prune(ckpt_dir, config.keep_checkpoints)  # an earlier prune may have been killed
  rewind_metrics(os.path.join(config.output_dir, METRICS_FILE), found.host, found.step or 0)
  if found.step is None:
    phi = lambda: meta_step.saved_start(config, optimizer)
    start = start or (lambda: meta_step.init_state(config, task, optimizer, meta_params=phi()))
    return start(), Progress()
  log(f"Resumed from meta-step {int(found.state.step)} in {ckpt_dir}.")
  return found.state, progress_from_host(found.host, config)
