"""Meta-training by truncated BPTT (section 2, section 3): the job's loop as a plain function.

Order of a run: resume from the newest good checkpoint in ``output_dir`` or start fresh; each
meta-step (``train.meta_step``, one jitted call) unrolls ``unroll`` optimizee steps on a batch of
problems and takes an Adam step on phi; after each epoch phi is validated on fixed held-out
problems and the best phi is saved (early stopping, section 3). The host reads device values only
when it logs, validates or checkpoints.

Resuming: a job killed at any moment and run again with the same flags ends with the files of an
uninterrupted run (``tests/test_fault_injection.py`` checks every file-system mutation of a run):
temporaries and half-pruned checkpoints are removed, ``metrics.jsonl`` is rewound to what the
restored checkpoint had seen, and the replayed steps are bit-identical.
"""

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import learned_opt
from learned_opt import tree_files
from learned_opt.base import LearnedOptimizer
from tasks import registry as task_registry
from tasks.base import TaskFamily
from train import checkpoint, meta_step
from train import config as config_lib
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


class NonFiniteError(RuntimeError):
  """Raised when too many meta-steps in a row produced NaN or Inf."""


class RunDirError(ValueError):
  """The output directory cannot be used as asked (a refused resume, a broken file tree)."""


def best_epoch(progress: Progress) -> int | None:
  """Index of the best epoch so far (fewest diverged, then lowest mean); None if none saved."""
  keys = list(zip(progress.diverged_history, progress.valid_history, strict=True))
  if not keys:
    return None
  best = min(range(len(keys)), key=lambda i: keys[i])
  return best if math.isfinite(keys[best][1]) else None


def build(config: MetaTrainConfig) -> tuple[TaskFamily, LearnedOptimizer]:
  return task_registry.get(config.task, **config.task_kwargs), learned_opt.build(
    config.optimizer_config()
  )


def _append_jsonl(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def machine() -> dict:
  """What the run ran on, recorded with the optimizer it saves."""
  return {
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "devices": [str(d) for d in jax.devices()],
    "jax": jax.__version__,
  }


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
    with open(config_path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
    changed = config_lib.differences(saved, config)
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


def _progress_from_host(host: dict, config: MetaTrainConfig) -> Progress:
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


def _host(progress: Progress, metrics_lines: int) -> dict:
  return {
    "best_valid": progress.best_valid,
    "valid_history": list(progress.valid_history),
    "early_stopped": progress.early_stopped,
    "diverged_history": list(progress.diverged_history),
    "metrics_lines": metrics_lines,
  }


def _metrics_lines(path: str) -> int:
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    return f.read().count(b"\n")


def _rewind_metrics(path: str, host: dict | None, step: int) -> None:
  """Drops the records a resumed run will write again (and a torn last line).

  Keeps the lines that existed when the restored checkpoint was written (its ``metrics_lines``;
  older checkpoints: records up to its step), so a replayed step is recorded once.
  """
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    lines = f.read().splitlines(keepends=True)
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


def resume_or_start(config, task, optimizer, ckpt_dir, log) -> tuple[TrainState, Progress]:
  """The newest good checkpoint's state and progress, or a fresh state.

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
      check_host=lambda host: _progress_from_host(host, config),
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
  _rewind_metrics(os.path.join(config.output_dir, METRICS_FILE), found.host, found.step or 0)
  if found.step is None:
    return meta_step.init_state(config, task, optimizer), Progress()
  log(f"Resumed from meta-step {int(found.state.step)} in {ckpt_dir}.")
  return found.state, _progress_from_host(found.host, config)


class _Reporter:
  """Turns device values into log lines and ``metrics.jsonl`` records, when it is time to."""

  def __init__(self, config, metrics_path, log, state):
    self.config, self.metrics_path, self.log = config, metrics_path, log
    self.reported_skips = int(state.skips.total)
    self.tic, self.tic_step = time.time(), int(state.step)

  def skips(self, state: TrainState) -> None:
    """Reports newly skipped meta-steps; raises once too many came in a row."""
    skips = jax.device_get(state.skips)
    task = self.config.task
    if int(skips.total) > self.reported_skips:
      message = (
        f"Non-finite meta-step {int(skips.last_step)} on task {task} (largest meta-gradient "
        f"entry {float(skips.last_grad_max)}); phi left unchanged and its problems resampled; "
        f"{int(skips.total)} skipped in all."
      )
      self.log(message)
      _append_jsonl(
        self.metrics_path,
        {
          "step": int(skips.last_step),
          "skipped": True,
          "skipped_total": int(skips.total),
          "message": message,
        },
      )
      self.reported_skips = int(skips.total)
    if bool(skips.halted):
      raise NonFiniteError(
        f"{int(skips.consecutive)} consecutive non-finite meta-steps, the last at step "
        f"{int(skips.last_step)} on task {task} (largest meta-gradient entry "
        f"{float(skips.last_grad_max)}). Lower --meta_lr, set --meta_grad_clip, or check the "
        f"task's loss. Every checkpoint in {self.config.output_dir} holds finite phi; the best "
        "validated optimizer, if one was saved, is there too."
      )

  def progress(self, done: int, metrics: meta_step.StepMetrics) -> None:
    metrics = jax.device_get(metrics)
    total = self.config.total_steps
    rate = (done - self.tic_step) / max(time.time() - self.tic, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    self.log(
      f"step {done}/{total}  meta-loss {float(metrics.meta_loss):.4g}  "
      f"final f {float(metrics.final_loss):.4g}  |grad| {float(metrics.grad_norm):.3g}  "
      f"{rate:.1f} steps/s  ETA {eta:.0f}s"
    )
    record = {
      "step": done,
      "meta_loss": float(metrics.meta_loss),
      "final_loss": float(metrics.final_loss),
      "grad_norm": float(metrics.grad_norm),
      "steps_per_sec": rate,
    }
    _append_jsonl(self.metrics_path, record)
    self.tic, self.tic_step = time.time(), done


def end_epoch(config, optimizer, state, progress, curves, log) -> tuple[TrainState, Progress]:
  """Records an epoch's validation, saves phi if it is the best so far, decides early stopping.

  The epoch's result is (problems whose final loss is not finite, mean final loss of the
  others); it is better than the best so far if it has fewer diverged problems, or as many and a
  lower mean (``best_epoch``). An epoch where every problem diverged is never saved.

  Args:
    curves: validation losses shaped (valid_problems, horizon + 1).
  """
  done = int(state.step)
  epoch = done // config.steps_per_epoch
  finals = np.asarray(curves[:, -1], np.float64)
  ok = np.isfinite(finals)
  diverged = int(np.sum(~ok))
  valid = float(np.mean(finals[ok])) if ok.any() else math.inf
  best = best_epoch(progress)
  best_key = (
    (math.inf, math.inf)
    if best is None
    else (progress.diverged_history[best], progress.valid_history[best])
  )
  improved = ok.any() and (diverged, valid) < best_key
  if improved:
    state = state._replace(best_meta_params=jax.tree.map(jnp.copy, state.meta_params))
    metadata = {
      "epoch": epoch,
      "step": done,
      "valid_final_loss": valid,
      "valid_diverged": diverged,
      "task": config.task,
      "run_config": json.loads(config.to_json()),
      "machine": machine(),
    }
    learned_opt.save(config.output_dir, optimizer, state.meta_params, metadata=metadata)
  progress = Progress(
    progress.best_valid,
    (*progress.valid_history, valid),
    False,
    (*progress.diverged_history, diverged),
  )
  best = best_epoch(progress)
  progress = progress._replace(
    best_valid=math.inf if best is None else progress.valid_history[best]
  )
  note = f" ({diverged} of {len(finals)} problems diverged)" if diverged else ""
  log(
    f"epoch {epoch}/{config.num_epochs}  validation final loss {valid:.4g}{note}  best "
    f"{progress.best_valid:.4g}" + ("  (saved)" if improved else "")
  )
  stalled = len(progress.valid_history) - 1 - (-1 if best is None else best)
  early_stopped = bool(config.patience) and stalled >= config.patience
  if early_stopped:
    log(f"Early stopping: no better validation loss in {config.patience} epochs.")
  return state, progress._replace(early_stopped=early_stopped)


def train(
  config: MetaTrainConfig,
  task: TaskFamily | None = None,
  log: Callable[[str], None] = logging.info,
) -> tuple[TrainState, Progress]:
  """Runs (or resumes) meta-training; returns the final state and the run's progress.

  Args:
    config: the run's settings.
    task: overrides the task named in ``config`` (tests use this to inject faults).
    log: where progress lines go.
  """
  check_output_tree(config)
  built_task, optimizer = build(config)
  task = task or built_task
  ckpt_dir = os.path.join(config.output_dir, CHECKPOINT_DIR)
  metrics_path = os.path.join(config.output_dir, METRICS_FILE)
  config_path = os.path.join(config.output_dir, CONFIG_FILE)
  check_resumable(config, config_path, ckpt_dir)
  for directory in (config.output_dir, ckpt_dir):  # left by a kill during an atomic write
    tree_files.remove_temporaries(directory)
  tree_files.atomic_write(config_path, config.to_json().encode())

  state, progress = resume_or_start(config, task, optimizer, ckpt_dir, log)
  if progress.early_stopped:
    log("This run already stopped early; nothing to do.")
    return state, progress

  train_step = jax.jit(meta_step.make_train_step(config, task, optimizer), donate_argnums=0)
  validate = jax.jit(meta_step.make_validate(config, task, optimizer))
  valid_problems = meta_step.sample_valid_problems(config, task)
  reporter = _Reporter(config, metrics_path, log, state)

  def save_checkpoint(state, progress):
    host = _host(progress, _metrics_lines(metrics_path))
    checkpoint.save(ckpt_dir, int(state.step), state, host, config.keep_checkpoints)

  for step in range(int(state.step), config.total_steps):
    state, metrics = train_step(state, task.data)
    done = step + 1
    epoch_end = done % config.steps_per_epoch == 0
    if done % config.log_every == 0 or done == config.total_steps:
      reporter.skips(state)
      reporter.progress(done, metrics)
    if epoch_end:
      reporter.skips(state)
      curves = np.asarray(validate(state.meta_params, task.data, *valid_problems))
      state, progress = end_epoch(config, optimizer, state, progress, curves, log)
      _append_jsonl(
        metrics_path,
        {
          "epoch": done // config.steps_per_epoch,
          "step": done,
          "valid_final_loss": progress.valid_history[-1],
          "valid_diverged": progress.diverged_history[-1],
        },
      )
      save_checkpoint(state, progress)  # once, with the early-stopping decision in it
      if progress.early_stopped:
        break
    elif done % config.checkpoint_every == 0:
      reporter.skips(state)
      save_checkpoint(state, progress)
  return state, progress
