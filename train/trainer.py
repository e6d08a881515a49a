"""Meta-training by truncated BPTT (section 2, section 3): the job's loop as a plain function.

Order of a run: resume from the newest good checkpoint in ``output_dir`` or start fresh; each
meta-step unrolls ``unroll`` optimizee steps on a batch of problems and takes an Adam step on phi;
problems are resampled after ``horizon`` steps; after each epoch phi is validated on fixed
held-out problems and the best phi is saved (early stopping, section 3).
"""

import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import learned_opt
from eval import rollout as rollout_lib
from learned_opt.base import LearnedOptimizer
from tasks import registry as task_registry
from tasks.base import TaskFamily
from train import checkpoint
from train import config as config_lib
from train import unroll as unroll_lib
from train.config import MetaTrainConfig, check_output_dir

CHECKPOINT_DIR = "checkpoints"


class TrainState(NamedTuple):
  """Everything a resumed run needs, as arrays (host bookkeeping lives in checkpoint meta)."""

  step: jax.Array  # int32 (), meta-steps done
  meta_params: learned_opt.base.MetaParams  # phi
  meta_opt_state: optax.OptState  # Adam's state for phi
  inner: unroll_lib.InnerState  # the batch of problems in flight, leading axis (problems,)
  best_meta_params: learned_opt.base.MetaParams  # phi with the best validation loss so far


class StepMetrics(NamedTuple):
  meta_loss: jax.Array  # () mean over problems of sum_t w_t f(theta_t) (or of log f, log_sum)
  final_loss: jax.Array  # () mean over problems of f(theta_T) at the truncation's end
  grad_norm: jax.Array  # () global norm of the meta-gradient
  grad_max: jax.Array  # () largest |entry| of the meta-gradient
  finite: jax.Array  # bool (), whether the step was applied


class NonFiniteError(RuntimeError):
  """Raised when too many meta-steps in a row produced NaN or Inf."""


def problem_key(config: MetaTrainConfig, step: int, attempt: int = 0) -> jax.Array:
  """Key of the problem batch sampled at meta-step ``step`` (``attempt`` > 0 after a skip)."""
  base = jax.random.fold_in(jax.random.key(config.seed), 1)
  return jax.random.fold_in(jax.random.fold_in(base, step), attempt)


def valid_key(config: MetaTrainConfig) -> jax.Array:
  """Key of the fixed validation problems; disjoint from every training and test stream."""
  return jax.random.fold_in(jax.random.key(config.seed), 2)


def build(config: MetaTrainConfig) -> tuple[TaskFamily, LearnedOptimizer]:
  return task_registry.get(config.task, **config.task_kwargs), learned_opt.build(
    config.optimizer_config()
  )


def meta_learning_rate(config: MetaTrainConfig) -> float | optax.Schedule:
  """``meta_lr``, or a cosine decay from it to ``meta_lr * meta_lr_final_ratio`` over the run."""
  if config.meta_lr_schedule == "cosine":
    return optax.cosine_decay_schedule(
      config.meta_lr, config.total_steps, alpha=config.meta_lr_final_ratio
    )
  return config.meta_lr


def meta_optimizer(config: MetaTrainConfig) -> optax.GradientTransformation:
  """Adam on phi (section 3), after an optional global-norm clip."""
  parts = [optax.clip_by_global_norm(config.meta_grad_clip)] if config.meta_grad_clip else []
  return optax.chain(*parts, optax.adam(meta_learning_rate(config)))


def make_train_step(config, task, optimizer) -> Callable:
  """``(state) -> (state, metrics)``: one truncated-BPTT meta-step; skips non-finite ones."""
  meta_opt = meta_optimizer(config)
  loss_fn = lambda phi, inner: unroll_lib.meta_loss(
    phi,
    inner,
    task=task,
    optimizer=optimizer,
    num_steps=config.unroll,
    second_order=config.second_order,
    objective=config.meta_objective,
    horizon=config.horizon,
  )

  def train_step(state: TrainState) -> tuple[TrainState, StepMetrics]:
    (loss, (losses, inner)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.meta_params, state.inner
    )
    grad_leaves = jax.tree.leaves(grads)
    grad_max = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in grad_leaves]))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_max)
    updates, meta_opt_state = meta_opt.update(grads, state.meta_opt_state, state.meta_params)
    new_params = optax.apply_updates(state.meta_params, updates)
    # A non-finite step leaves phi and Adam's moments untouched (never NaN in phi).
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    state = state._replace(
      step=state.step + 1,
      meta_params=keep(new_params, state.meta_params),
      meta_opt_state=keep(meta_opt_state, state.meta_opt_state),
      inner=inner,
    )
    grad_norm = jnp.sqrt(sum(jnp.sum(g**2) for g in grad_leaves))
    metrics = StepMetrics(loss, jnp.mean(losses[:, -1]), grad_norm, grad_max, finite)
    return state, metrics

  return train_step


def make_validate(config, task, optimizer) -> Callable:
  """``phi -> losses`` shaped (valid_problems, horizon + 1) on the fixed validation problems."""
  task_params, keys = rollout_lib.sample_problems(task, valid_key(config), config.valid_problems)

  def validate(meta_params):
    tx = learned_opt.as_optax(optimizer, meta_params)
    return rollout_lib.rollout_batch(task, tx, task_params, keys, config.horizon)

  return validate


def init_state(config, task, optimizer) -> TrainState:
  meta_params = optimizer.init_meta_params(jax.random.fold_in(jax.random.key(config.seed), 0))
  inner = unroll_lib.init_inner_batch(
    task, optimizer, meta_params, problem_key(config, 0), config.num_problems
  )
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    meta_params=meta_params,
    meta_opt_state=meta_optimizer(config).init(meta_params),
    inner=inner,
    best_meta_params=jax.tree.map(jnp.copy, meta_params),  # its own buffers: state is donated
  )


def _append_jsonl(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def train(
  config: MetaTrainConfig,
  task: TaskFamily | None = None,
  log: Callable[[str], None] = logging.info,
) -> tuple[TrainState, dict]:
  """Runs (or resumes) meta-training; returns the final state and the host bookkeeping.

  Args:
    config: the run's settings.
    task: overrides the task named in ``config`` (tests use this to inject faults).
    log: where progress lines go.

  Returns:
    ``(state, host)`` where ``host`` has ``best_valid``, ``valid_history``, ``skipped``.
  """
  check_output_dir(config.output_dir)
  built_task, optimizer = build(config)
  task = task or built_task
  ckpt_dir = os.path.join(config.output_dir, CHECKPOINT_DIR)
  metrics_path = os.path.join(config.output_dir, "metrics.jsonl")

  config_path = os.path.join(config.output_dir, "config.json")
  if os.path.exists(config_path) and checkpoint.all_steps(ckpt_dir):
    with open(config_path) as f:
      saved = json.load(f)
    # Fields added after the run started take their defaults, which the run used implicitly.
    if config_lib.with_defaults(saved) != json.loads(config.to_json()):
      raise ValueError(
        f"{config.output_dir} holds a run with a different config ({config_path}); resume it "
        "with the same flags or choose a new --output_dir."
      )
  learned_opt.serialization.atomic_write(config_path, config.to_json().encode())

  state = init_state(config, task, optimizer)
  host = {
    "best_valid": math.inf,
    "valid_history": [],
    "skipped": 0,
    "consecutive": 0,
    "early_stopped": False,
  }
  restored = checkpoint.restore_latest(ckpt_dir, state)
  if restored is not None:
    state, host = restored
    log(f"Resumed from meta-step {int(state.step)} in {ckpt_dir}.")
  if host["early_stopped"]:
    log("This run already stopped early; nothing to do.")
    return state, host

  train_step = jax.jit(make_train_step(config, task, optimizer), donate_argnums=0)
  validate = jax.jit(make_validate(config, task, optimizer))
  init_inner = jax.jit(
    lambda phi, key: unroll_lib.init_inner_batch(task, optimizer, phi, key, config.num_problems)
  )
  truncations = config.horizon // config.unroll

  def save_checkpoint(state):
    checkpoint.save(ckpt_dir, int(state.step), state, host, config.keep_checkpoints)

  start = int(state.step)
  tic, tic_step = time.time(), start
  for step in range(start, config.total_steps):
    if step % truncations == 0 and step > 0:
      state = state._replace(inner=init_inner(state.meta_params, problem_key(config, step)))
    state, metrics = train_step(state)
    if bool(metrics.finite):
      host["consecutive"] = 0
    else:
      host["skipped"] += 1
      host["consecutive"] += 1
      message = (
        f"Non-finite meta-step {step} on task {config.task}: meta-loss {float(metrics.meta_loss)}, "
        f"largest meta-gradient entry {float(metrics.grad_max)}; phi left unchanged."
      )
      log(message)
      _append_jsonl(metrics_path, {"step": step, "skipped": True, "message": message})
      # The problems in flight diverged: draw fresh ones rather than continue from NaN.
      state = state._replace(
        inner=init_inner(state.meta_params, problem_key(config, step, host["consecutive"]))
      )
      if host["consecutive"] >= config.max_consecutive_skips:
        raise NonFiniteError(
          f"{host['consecutive']} consecutive non-finite meta-steps, the last at step {step} on "
          f"task {config.task} (largest meta-gradient entry {float(metrics.grad_max)}). Lower "
          "--meta_lr, set --meta_grad_clip, or check the task's loss. The last good phi is in "
          f"{ckpt_dir}."
        )
    done = step + 1
    if done % config.log_every == 0 or done == config.total_steps:
      rate = (done - tic_step) / max(time.time() - tic, 1e-9)
      eta = (config.total_steps - done) / max(rate, 1e-9)
      log(
        f"step {done}/{config.total_steps}  meta-loss {float(metrics.meta_loss):.4g}  "
        f"final f {float(metrics.final_loss):.4g}  |grad| {float(metrics.grad_norm):.3g}  "
        f"{rate:.1f} steps/s  ETA {eta:.0f}s"
      )
      _append_jsonl(
        metrics_path,
        {
          "step": done,
          "meta_loss": float(metrics.meta_loss),
          "final_loss": float(metrics.final_loss),
          "grad_norm": float(metrics.grad_norm),
          "steps_per_sec": rate,
        },
      )
      tic, tic_step = time.time(), done
    if done % config.steps_per_epoch == 0:
      epoch = done // config.steps_per_epoch
      curves = np.asarray(validate(state.meta_params))
      finals = np.where(np.isfinite(curves[:, -1]), curves[:, -1], np.inf)
      valid = float(np.mean(finals))
      improved = valid < host["best_valid"]
      if improved:
        host["best_valid"] = valid
        state = state._replace(best_meta_params=jax.tree.map(jnp.copy, state.meta_params))
        learned_opt.save(
          config.output_dir,
          optimizer,
          state.meta_params,
          metadata={
            "epoch": epoch,
            "step": done,
            "valid_final_loss": valid,
            "task": config.task,
            "run_config": json.loads(config.to_json()),
          },
        )
      host["valid_history"].append(valid)
      log(
        f"epoch {epoch}/{config.num_epochs}  validation final loss {valid:.4g}  "
        f"best {host['best_valid']:.4g}" + ("  (saved)" if improved else "")
      )
      _append_jsonl(metrics_path, {"epoch": epoch, "step": done, "valid_final_loss": valid})
      save_checkpoint(state)
      history = host["valid_history"]
      if config.patience and len(history) - 1 - int(np.argmin(history)) >= config.patience:
        log(f"Early stopping: no better validation loss in {config.patience} epochs.")
        host["early_stopped"] = True
        save_checkpoint(state)
        break
    elif done % config.checkpoint_every == 0:
      save_checkpoint(state)
  return state, host
