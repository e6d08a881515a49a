"""Meta-training by truncated BPTT (section 2, section 3): the job's loop as a plain function.

Order of a run: resume from the newest good checkpoint in ``output_dir`` or start fresh; each
meta-step (``train.meta_step``, one jitted call) unrolls ``unroll`` optimizee steps on a batch of
problems and takes an Adam step on phi; after each epoch phi is validated on fixed held-out
problems and the best phi is saved (early stopping, section 3). The host reads device values only
when it logs, validates or checkpoints.

The run directory, the resume guard and resuming are ``train.run_dir``'s.
"""

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import learned_opt
from learned_opt import tree_files
from learned_opt.base import LearnedOptimizer
from tasks import registry as task_registry
from tasks.base import TaskFamily
from train import checkpoint, meta_step, run_dir
from train.config import MetaTrainConfig
from train.meta_step import TrainState


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


def end_epoch(
  config, optimizer, state, progress, curves, log
) -> tuple[TrainState, run_dir.Progress]:
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
  best = run_dir.best_epoch(progress)
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
  progress = run_dir.Progress(
    progress.best_valid,
    (*progress.valid_history, valid),
    False,
    (*progress.diverged_history, diverged),
  )
  best = run_dir.best_epoch(progress)
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
) -> tuple[TrainState, run_dir.Progress]:
  """Runs (or resumes) meta-training; returns the final state and the run's progress.

  Args:
    config: the run's settings.
    task: overrides the task named in ``config`` (tests use this to inject faults).
    log: where progress lines go.
  """
  run_dir.check_output_tree(config)
  built_task, optimizer = build(config)
  task = task or built_task
  ckpt_dir = os.path.join(config.output_dir, run_dir.CHECKPOINT_DIR)
  metrics_path = os.path.join(config.output_dir, run_dir.METRICS_FILE)
  config_path = os.path.join(config.output_dir, run_dir.CONFIG_FILE)
  run_dir.check_resumable(config, config_path, ckpt_dir)
  for directory in (config.output_dir, ckpt_dir):  # left by a kill during an atomic write
    tree_files.remove_temporaries(directory)
  tree_files.atomic_write(config_path, config.to_json().encode())

  state, progress = run_dir.resume_or_start(config, task, optimizer, ckpt_dir, log)
  if progress.early_stopped:
    log("This run already stopped early; nothing to do.")
    return state, progress

  train_step = jax.jit(meta_step.make_train_step(config, task, optimizer), donate_argnums=0)
  validate = jax.jit(meta_step.make_validate(config, task, optimizer))
  valid_problems = meta_step.sample_valid_problems(config, task)
  reporter = _Reporter(config, metrics_path, log, state)

  def save_checkpoint(state, progress):
    host = run_dir.host_record(progress, run_dir.metrics_lines(metrics_path))
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
