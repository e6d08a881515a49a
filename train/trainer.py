"""Meta-training by truncated BPTT (section 2, section 3): the job's loop as a plain function.

Order of a run: resume from the newest good checkpoint in ``output_dir`` or start fresh; each
meta-step (``train.meta_step``, one jitted call) unrolls ``unroll`` optimizee steps on a batch of
problems and takes an Adam step on phi; after each epoch phi is validated on fixed held-out
problems and the best phi is saved (early stopping, section 3). The host reads device values only
when it logs, validates or checkpoints.
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


class Progress(NamedTuple):
  """The host's bookkeeping of a run, saved beside the state in every checkpoint."""

  best_valid: float = math.inf  # the best mean final validation loss so far
  valid_history: tuple = ()  # the mean final validation loss after each epoch
  early_stopped: bool = False  # patience ran out; the run is over


class NonFiniteError(RuntimeError):
  """Raised when too many meta-steps in a row produced NaN or Inf."""


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


def check_resumable(config: MetaTrainConfig, config_path: str, ckpt_dir: str) -> None:
  """Refuses to resume a run under settings that would change its results, naming them."""
  if not (os.path.exists(config_path) and checkpoint.all_steps(ckpt_dir)):
    return
  with open(config_path) as f:
    saved = json.load(f)
  changed = config_lib.differences(saved, config)
  if changed:
    raise ValueError(
      f"{config.output_dir} holds a run with a different config ({config_path}): "
      + "; ".join(changed)
      + ". Resume it with the same flags or choose a new --output_dir."
    )


def resume_or_start(config, task, optimizer, ckpt_dir, log) -> tuple[TrainState, Progress]:
  """The newest good checkpoint's state and progress, or a fresh state."""
  state = meta_step.init_state(config, task, optimizer)
  restored = checkpoint.restore_latest(ckpt_dir, state, meta_step.upgrade_checkpoint)
  if restored is None:
    return state, Progress()
  state, host = restored
  log(f"Resumed from meta-step {int(state.step)} in {ckpt_dir}.")
  return state, Progress(host["best_valid"], tuple(host["valid_history"]), host["early_stopped"])


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
        f"task's loss. The last good phi is in {self.config.output_dir}."
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

  Args:
    curves: validation losses shaped (valid_problems, horizon + 1); a diverged problem counts
      as an infinite final loss.
  """
  done = int(state.step)
  epoch = done // config.steps_per_epoch
  finals = np.where(np.isfinite(curves[:, -1]), curves[:, -1], np.inf)
  valid = float(np.mean(finals))
  improved = valid < progress.best_valid
  if improved:
    state = state._replace(best_meta_params=jax.tree.map(jnp.copy, state.meta_params))
    metadata = {
      "epoch": epoch,
      "step": done,
      "valid_final_loss": valid,
      "task": config.task,
      "run_config": json.loads(config.to_json()),
      "machine": machine(),
    }
    learned_opt.save(config.output_dir, optimizer, state.meta_params, metadata=metadata)
  history = (*progress.valid_history, valid)
  best = min(valid, progress.best_valid)
  log(
    f"epoch {epoch}/{config.num_epochs}  validation final loss {valid:.4g}  best {best:.4g}"
    + ("  (saved)" if improved else "")
  )
  stalled = len(history) - 1 - int(np.argmin(history))
  early_stopped = bool(config.patience) and stalled >= config.patience
  if early_stopped:
    log(f"Early stopping: no better validation loss in {config.patience} epochs.")
  return state, Progress(best, history, early_stopped)


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
  check_output_dir(config.output_dir)
  built_task, optimizer = build(config)
  task = task or built_task
  ckpt_dir = os.path.join(config.output_dir, CHECKPOINT_DIR)
  metrics_path = os.path.join(config.output_dir, "metrics.jsonl")
  config_path = os.path.join(config.output_dir, "config.json")
  check_resumable(config, config_path, ckpt_dir)
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
    host = {**progress._asdict(), "valid_history": list(progress.valid_history)}
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
        },
      )
      save_checkpoint(state, progress)  # once, with the early-stopping decision in it
      if progress.early_stopped:
        break
    elif done % config.checkpoint_every == 0:
      reporter.skips(state)
      save_checkpoint(state, progress)
  return state, progress
