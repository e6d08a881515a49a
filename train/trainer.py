"""Meta-training by truncated BPTT (section 2, section 3): the job's loop as a plain function.

Order of a run: resume from the newest good checkpoint in ``output_dir`` or start fresh; each
meta-step (``train.meta_step``, one jitted call) unrolls ``unroll`` optimizee steps on a batch of
problems and takes an Adam step on phi; after each epoch phi is validated on fixed held-out
problems and the best phi is saved (early stopping, section 3). The host reads device values only
when it logs, validates or checkpoints.

``--task=mixture`` without a ``bucket`` setting trains one phi over every bucket of the mixture
(``tasks.mixture``): meta-step ``n`` trains on bucket ``bucket_index(mixture, seed, n)`` (the same
on every host and after a resume), each bucket's step compiles the first time it is drawn, the
state keeps each bucket's problems in flight, and validation scores each bucket by final over
initial loss (scale-free) and the epoch by their mean.

Every file of the run directory is read and written through ``train.run.Run``; resuming is
``train.run_dir``'s.
"""

import contextlib
import functools
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
from jax.sharding import Mesh

import learned_opt
from learned_opt import tree_files
from learned_opt.base import LearnedOptimizer
from tasks import mixture as mixture_lib
from tasks import registry as task_registry
from tasks.base import TaskFamily
from train import checkpoint, distributed, meta_step, preemption, run_dir
from train.config import MetaTrainConfig
from train.meta_step import TrainState
from train.metrics_log import MetricsLog
from train.preemption import Preempted
from train.progress import duration
from train.run import Run

PREEMPTED_KEY = checkpoint.PREEMPTED  # host record field of a checkpoint written on a signal


class NonFiniteError(RuntimeError):
  """Raised when too many meta-steps in a row produced NaN or Inf."""


def build(config: MetaTrainConfig) -> tuple[TaskFamily | mixture_lib.Mixture, LearnedOptimizer]:
  """The run's task (a family, or a mixture of them) and its learned optimizer."""
  return build_task(config, config.task_kwargs), build_optimizer(config)


def build_optimizer(config: MetaTrainConfig) -> LearnedOptimizer:
  return learned_opt.build(config.optimizer_config(), backend=config.backend)


def build_task(config: MetaTrainConfig, task_kwargs: dict) -> TaskFamily | mixture_lib.Mixture:
  """``config.task`` with ``task_kwargs``; ``mixture`` without a ``bucket``: all its buckets."""
  if config.task == "mixture" and "bucket" not in task_kwargs:
    return mixture_lib.mixture(**task_kwargs)
  return task_registry.get(config.task, **task_kwargs)


def validation_task(config: MetaTrainConfig, task: TaskFamily) -> TaskFamily:
  """The family validation draws its problems and data from.

  ``task`` itself, or with ``config.valid_task_kwargs`` the same family built with those settings
  on top of the run's (e.g. ``{"split": "valid"}``: neural art's held-out content images).
  """
  if not config.valid_task_kwargs:
    return task
  return build_task(config, {**config.task_kwargs, **config.valid_task_kwargs})


def machine() -> dict:
  """What the run ran on, recorded with the optimizer it saves."""
  return {
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "devices": [str(d) for d in jax.devices()],
    "processes": jax.process_count(),
    "jax": jax.__version__,
  }


class _Reporter:
  """Turns device values into log lines and ``metrics.jsonl`` records, when it is time to."""

  def __init__(self, config, metrics: MetricsLog, log, state, writer=True, bucket_at=None):
    """``bucket_at(step)``: a mixture's bucket name of a meta-step, for skip messages."""
    self.config, self.metrics, self.log, self.writer = config, metrics, log, writer
    self.bucket_at = bucket_at or (lambda step: None)
    self.reported_skips = int(state.skips.total)
    self.tic, self.tic_step = time.time(), int(state.step)

  def append(self, record: dict) -> None:
    if self.writer:
      self.metrics.append(record)

  def skips(self, state: TrainState) -> None:
    """Reports newly skipped meta-steps; raises once too many came in a row."""
    skips = jax.device_get(state.skips)
    bucket = self.bucket_at(int(skips.last_step)) if int(skips.total) else None
    task = self.config.task + (f" (bucket {bucket})" if bucket else "")
    if int(skips.total) > self.reported_skips:
      message = (
        f"Non-finite meta-step {int(skips.last_step)} on task {task} (largest meta-gradient "
        f"entry {float(skips.last_grad_max)}); phi left unchanged and its problems resampled; "
        f"{int(skips.total)} skipped in all."
      )
      self.log(message)
      self.append(
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

  def restart_clock(self, done: int) -> None:
    """Times the next rate from here: a rate excludes compiling and validation."""
    self.tic, self.tic_step = time.time(), done

  def progress(self, done: int, metrics: meta_step.StepMetrics, bucket: str | None = None) -> None:
    """Logs the last meta-step's metrics; ``bucket``: the mixture bucket it trained on."""
    metrics = jax.device_get(metrics)
    total = self.config.total_steps
    rate = (done - self.tic_step) / max(time.time() - self.tic, 1e-9)
    if done > self.tic_step:
      speed = f"{rate:.1f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step"
      timing = f"{speed}  ETA {duration((total - done) / max(rate, 1e-9))}"
    else:
      rate, timing = None, "timing from the next report"
    where = f"  bucket {bucket}" if bucket else ""
    self.log(
      f"step {done}/{total}{where}  meta-loss {float(metrics.meta_loss):.4g}  "
      f"final f {float(metrics.final_loss):.4g}  |grad| {float(metrics.grad_norm):.3g}  {timing}"
    )
    record = {
      "step": done,
      "meta_loss": float(metrics.meta_loss),
      "final_loss": float(metrics.final_loss),
      "grad_norm": float(metrics.grad_norm),
      "steps_per_sec": rate,
    }
    if bucket:
      record["bucket"] = bucket
    self.append(record)
    self.restart_clock(done)


def bucket_scores(curves: dict[str, np.ndarray]) -> dict[str, float]:
  """Each mixture bucket's validation score: the mean over its non-diverged problems of final
  over initial loss (scale-free, so a quadratic's ~20 and a cross-entropy's ~2.3 weigh alike).

  Args:
    curves: ``{bucket name: losses shaped (valid_problems, horizon + 1)}``.
  """
  scores = {}
  for name, losses in curves.items():
    losses = np.asarray(losses, np.float64)
    ratios = losses[:, -1] / losses[:, 0]
    ok = np.isfinite(ratios)
    scores[name] = float(np.mean(ratios[ok])) if ok.any() else math.inf
  return scores


def validation_result(curves) -> tuple[int, float, dict[str, float] | None]:
  """``(diverged problems, score, per-bucket scores or None)`` of an epoch's ``curves``.

  A single family's score is the mean final loss of its non-diverged problems; a mixture's
  (``curves`` a dict per bucket) the mean over buckets of ``bucket_scores``.
  """
  if isinstance(curves, dict):
    finals = np.concatenate([np.asarray(c[:, -1], np.float64) for c in curves.values()])
    scores = bucket_scores(curves)
    return int(np.sum(~np.isfinite(finals))), float(np.mean(list(scores.values()))), scores
  finals = np.asarray(curves[:, -1], np.float64)
  ok = np.isfinite(finals)
  return int(np.sum(~ok)), float(np.mean(finals[ok])) if ok.any() else math.inf, None


def end_epoch(
  config, optimizer, state, progress, curves, log, writer=True
) -> tuple[TrainState, run_dir.Progress]:
  """Records an epoch's validation, saves phi if it is the best so far, decides early stopping.

  The epoch's result is (problems whose final loss is not finite, mean final loss of the
  others); it is better than the best so far if it has fewer diverged problems, or as many and a
  lower mean (``best_epoch``). An epoch where every problem diverged is never saved. For a
  mixture the mean is ``validation_result``'s: of final / initial loss, per bucket, then over
  buckets.

  Every process decides the same from the same ``curves``; only the ``writer`` saves.

  Args:
    curves: validation losses shaped (valid_problems, horizon + 1); for a mixture, a dict of
      them by bucket name.
  """
  done = int(state.step)
  epoch = done // config.steps_per_epoch
  diverged, valid, scores = validation_result(curves)
  problems = config.valid_problems * (len(curves) if scores is not None else 1)
  best = run_dir.best_epoch(progress)
  best_key = (
    (math.inf, math.inf)
    if best is None
    else (progress.diverged_history[best], progress.valid_history[best])
  )
  improved = math.isfinite(valid) and (diverged, valid) < best_key
  if improved:
    state = state._replace(best_meta_params=jax.tree.map(jnp.copy, state.meta_params))
    metadata = {
      "epoch": epoch,
      "step": done,
      "valid_final_loss": valid,
      "valid_diverged": diverged,
      **({"valid_buckets": scores} if scores is not None else {}),
      "task": config.task,
      "backend": optimizer.backend,  # how its steps ran (learned_opt.backend); not read back
      "run_config": json.loads(config.to_json()),
      "machine": machine(),
    }
    if writer:
      Run(config.output_dir).save_best(optimizer, state.meta_params, metadata)
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
  note = f" ({diverged} of {problems} problems diverged)" if diverged else ""
  what = "final loss" if scores is None else "final/initial loss (mean over buckets)"
  log(
    f"epoch {epoch}/{config.num_epochs}  validation {what} {valid:.4g}{note}  best "
    f"{progress.best_valid:.4g}" + ("  (saved)" if improved else "")
  )
  if scores is not None:
    log("  " + "  ".join(f"{name} {score:.4g}" for name, score in scores.items()))
  stalled = len(progress.valid_history) - 1 - (-1 if best is None else best)
  early_stopped = bool(config.patience) and stalled >= config.patience
  if early_stopped:
    log(f"Early stopping: no better validation loss in {config.patience} epochs.")
  return state, progress._replace(early_stopped=early_stopped)


def _open_run(config, task, optimizer, log, start, held) -> tuple[TrainState, run_dir.Progress]:
  """The file-system side of a start: checks, the lock, leftovers removed, config.json, what to
  resume. A second run on the directory is refused here, before it removes anything.

  Args:
    held: an ``ExitStack`` that holds the run directory's lock until ``train`` ends.
  """
  run = Run(config.output_dir)
  run.check_tree()  # creates the directory
  held.enter_context(run.lock())
  run.check_resumable(config)
  run.remove_temporaries()  # left by a kill during an atomic write
  run.write_config(config)
  return run_dir.resume_or_start(config, task, optimizer, log=log, start=start)


def _open_run_on_mesh(config, task, optimizer, log, mesh, data, held):
  """``_open_run`` by process 0 alone, its outcome (or error) sent to every process.

  Only process 0 touches the output directory, so the processes need no shared file system. A
  fresh state is drawn on the mesh by every process (each its own problems); a restored one is
  sent from process 0 as checkpoint bytes and placed on the mesh.
  """
  template = jax.eval_shape(lambda: meta_step.init_state(config, task, optimizer))
  reply = state_bytes = None
  if distributed.is_writer():
    try:
      state, progress = _open_run(config, task, optimizer, log, lambda: None, held)
      if state is not None:
        state_bytes, digest = tree_files.encode(state)
      reply = {"progress": run_dir.host_record(progress, 0), "resumed": state is not None}
      reply["digest"] = digest if state is not None else None
    except Exception as e:
      reply = {"error": type(e).__name__, "message": str(e)}
      distributed.broadcast_bytes(json.dumps(reply).encode())
      raise
  reply = json.loads(distributed.broadcast_bytes(json.dumps(reply).encode() if reply else None))
  if "error" in reply:
    kind = run_dir.RunDirError if reply["error"] == "RunDirError" else RuntimeError
    raise kind(f"Process 0 could not open the run: {reply['message']}")
  progress = run_dir.progress_from_host(reply["progress"], config)
  if not reply["resumed"]:
    return meta_step.init_sharded_state(config, task, optimizer, data, mesh), progress
  state_bytes = distributed.broadcast_bytes(state_bytes)
  raw = tree_files.read(state_bytes, reply["digest"], "the resumed state", record="process 0's")
  state = tree_files.restore(raw, template, "the resumed state", fits="this run's config")
  return distributed.put(state, meta_step.state_shardings(template, mesh)), progress


def train(
  config: MetaTrainConfig,
  task: TaskFamily | None = None,
  log: Callable[[str], None] = logging.info,
  mesh: Mesh | None = None,
) -> tuple[TrainState, run_dir.Progress]:
  """Runs (or resumes) meta-training; returns the final state and the run's progress.

  Args:
    config: the run's settings.
    task: overrides the task named in ``config`` (tests use this to inject faults).
    log: where progress lines go (process 0's only).
    mesh: devices to split each meta-step's problems over (``distributed.global_mesh()``); None:
      that of an enclosing ``distributed.use_mesh`` block (the command line's: every device),
      else the default device, as with a one-device mesh. Several processes need a mesh over
      all their devices (the global one if none is given). Only process 0 logs and writes.

  Raises:
    distributed.MeshError: if --num_problems or --valid_problems does not divide over the mesh.
    Preempted: after SIGTERM or SIGINT (``train.preemption``), once the checkpoint of the meta-step
      all processes stopped after is written. The signal handlers are restored on return.
  """
  with preemption.watch(), contextlib.ExitStack() as held:  # held: the run lock, until the end
    return _train(config, task, log, mesh, held)


def _train(config, task, log, mesh, held) -> tuple[TrainState, run_dir.Progress]:
  """``train``'s body, the run directory's lock held by ``held``."""
  mesh = mesh if mesh is not None else distributed.current_mesh()
  if mesh is None and jax.process_count() > 1:
    mesh = distributed.global_mesh()
  if mesh is not None and mesh.devices.size == 1 and jax.process_count() == 1:
    mesh = None  # one device: the plain path, without shardings
  if mesh is not None:
    distributed.check_divides(config.num_problems, mesh, "num_problems")
    distributed.check_divides(config.valid_problems, mesh, "valid_problems")
  writer = distributed.is_writer()
  log = log if writer else (lambda s: None)
  optimizer = build_optimizer(config)
  task = task or build_task(config, config.task_kwargs)
  run = Run(config.output_dir)

  # A single family is the one-bucket case: bucket None, its state and data unwrapped.
  mixture = task if meta_step.is_mixture(task) else None
  valid_task = validation_task(config, task)
  data, valid_data = meta_step.task_data(task), meta_step.task_data(valid_task)
  if mesh is None:
    state, progress = _open_run(config, task, optimizer, log, None, held)
  else:
    whole = distributed.replicated(mesh)
    data = distributed.put(data, whole)
    valid_data = data if valid_task is task else distributed.put(valid_data, whole)
    state, progress = _open_run_on_mesh(config, task, optimizer, log, mesh, data, held)
  if progress.early_stopped:
    log("This run already stopped early; nothing to do.")
    return state, progress

  names = (None,) if mixture is None else mixture.names
  indices = (None,) if mixture is None else tuple(range(len(names)))
  valid_datas = (valid_data,) if mixture is None else valid_data
  valid_buckets = meta_step.buckets(valid_task)
  valid_problems = [
    meta_step.sample_valid_problems(config, t, mesh, d, b)
    for t, d, b in zip(valid_buckets, valid_datas, indices, strict=True)
  ]
  validators = [jax.jit(meta_step.make_validate(config, t, optimizer)) for t in valid_buckets]

  def validate(meta_params):
    """The epoch's validation curves: an array, or for a mixture a dict by bucket name."""
    curves = [
      distributed.to_host(v(meta_params, d, *p))
      for v, d, p in zip(validators, valid_datas, valid_problems, strict=True)
    ]
    return curves[0] if mixture is None else dict(zip(names, curves, strict=True))

  steps = {}  # bucket -> its jitted meta-step, compiled when the bucket is first drawn

  def bucket_of(step: int) -> int | None:
    return None if mixture is None else mixture_lib.bucket_index(mixture, config.seed, step)

  def train_step(state, bucket):
    if bucket not in steps:
      steps[bucket] = meta_step.jit_train_step(config, task, optimizer, mesh, state, bucket)
    return steps[bucket](state, data if bucket is None else data[bucket])

  bucket_at = lambda step: names[bucket_of(step) or 0]
  reporter = _Reporter(config, run.metrics, log, state, writer, bucket_at)

  def save_checkpoint(state, progress, preempted=False):
    host_state = state if mesh is None else distributed.to_host(state)  # all processes
    if writer:
      host = run_dir.host_record(progress, run.metrics.lines())
      if preempted:
        host[PREEMPTED_KEY] = True
      run.save_checkpoint(int(state.step), host_state, host, config.keep_checkpoints)

  first = int(state.step)
  gather = functools.partial(distributed.gather_rows, mesh=mesh)  # several processes: a mesh
  stop = preemption.StopCheck(jax.process_index(), jax.process_count(), gather)
  signal_name = stop(first)  # a signal during start-up: stop before compiling
  if signal_name and first < config.total_steps:
    raise Preempted(first, signal_name, run.checkpoint_dir)
  noticed = False
  # Several CPU processes: one meta-step in flight at a time. Two dispatched back to back
  # deadlocked now and then at their collectives (gloo, 2 devices a process on 2 cores: 3 of 5
  # runs hung before this, 0 of 10 after), as XLA:CPU's threads wait in one step's rendezvous.
  one_at_a_time = jax.process_count() > 1 and jax.devices()[0].platform == "cpu"
  for step in range(first, config.total_steps):
    bucket = bucket_of(step)
    compiles = bucket not in steps
    tic = time.time()
    state, metrics = train_step(state, bucket)
    if one_at_a_time:
      jax.block_until_ready(state.step)
    done = step + 1
    if compiles:  # a first call compiles: time the rate and ETA from its end
      jax.block_until_ready(state.step)
      where = "" if bucket is None else f" (bucket {names[bucket]})"
      log(f"compiled and ran meta-step {done}{where} in {time.time() - tic:.1f}s")
      reporter.restart_clock(done)
    epoch_end = done % config.steps_per_epoch == 0
    if done % config.log_every == 0 or done == config.total_steps:
      reporter.skips(state)
      reporter.progress(done, metrics, names[bucket or 0])
    if epoch_end:
      reporter.skips(state)
      curves = validate(state.meta_params)
      state, progress = end_epoch(config, optimizer, state, progress, curves, log, writer)
      if writer:
        record = {
          "epoch": done // config.steps_per_epoch,
          "step": done,
          "valid_final_loss": progress.valid_history[-1],
          "valid_diverged": progress.diverged_history[-1],
        }
        scores = validation_result(curves)[2]
        if scores is not None:
          record["valid_buckets"] = scores
        run.metrics.append(record)
      save_checkpoint(state, progress)  # once, with the early-stopping decision in it
      if progress.early_stopped:
        break
      reporter.restart_clock(done)  # validation is not meta-training time
    elif done % config.checkpoint_every == 0:
      reporter.skips(state)
      save_checkpoint(state, progress)
    if preemption.received() and not noticed:
      noticed = True
      log(
        f"{preemption.signal_name(preemption.received())}: stopping after a meta-step and its "
        "checkpoint (a second signal ends the job at once)."
      )
    signal_name = stop(done)
    if signal_name and done < config.total_steps:
      saved = epoch_end or done % config.checkpoint_every == 0
      if not saved:
        save_checkpoint(state, progress, preempted=True)
      raise Preempted(done, signal_name, run.checkpoint_dir)
  return state, progress
