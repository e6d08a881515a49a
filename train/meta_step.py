"""The device side of meta-training: the train state, one meta-step and validation, all pure.

A meta-step (section 2, Figure 2) unrolls ``unroll`` optimizee steps on a batch of problems,
differentiates the summed losses with respect to phi and takes an Adam step on phi. Everything a
step decides stays on the device: problems are resampled at the horizon and after a non-finite
step, and skipped steps are counted in the state, so the host reads values back only when it
logs, validates or checkpoints (no host round-trip per step blocks asynchronous dispatch).

On a mesh (``mesh`` arguments; ``train.distributed``) the problems of a step are split over the
devices and phi, Adam's state and the counters are replicated: XLA partitions the step from these
shardings, so the meta-gradient, a mean over problems, is all-reduced by XLA. Problem ``i`` is
drawn from the ``i``-th key of ``jax.random.split(problem_key, num_problems)``, a function of
``i`` alone (JAX's partitionable threefry), so each device draws only its own problems and the
problem set is the same on any number of devices and processes.

A mixture of task families (``tasks.mixture.Mixture``, shape buckets) trains one phi over all its
buckets: the state holds one batch of problems in flight per bucket (``inner`` is a tuple, in the
mixture's order), and the step of bucket ``b`` (``make_train_step(..., bucket=b)``, one compile
per bucket) runs on bucket ``b``'s problems and data alone and resamples them when *they* reach
the horizon. A single family keeps ``inner`` a single batch, so its checkpoints are unchanged.
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import learned_opt
from learned_opt import backend as backend_lib
from learned_opt.base import LearnedOptimizer, MetaParams
from tasks import mixture as mixture_lib
from tasks.base import Data, TaskFamily
from train import distributed, truncation
from train import inner as inner_lib
from train import unroll as unroll_lib
from train.config import MetaTrainConfig


class SkipCounters(NamedTuple):
  """Meta-steps skipped because their loss or meta-gradient was not finite."""

  total: jax.Array  # int32 (), skipped so far
  consecutive: jax.Array  # int32 (), skipped in a row up to the last step
  last_step: jax.Array  # int32 (), the last skipped meta-step; -1 if none
  last_grad_max: jax.Array  # float32 (), that step's largest |meta-gradient entry|
  halted: jax.Array  # bool (), consecutive reached max_consecutive_skips: steps change nothing


class TrainState(NamedTuple):
  """Everything a resumed run needs, as arrays (host bookkeeping lives in checkpoint meta)."""

  step: jax.Array  # int32 (), meta-steps done
  meta_params: MetaParams  # phi
  meta_opt_state: optax.OptState  # Adam's state for phi
  # The batch of problems in flight, leading axis (problems,); a mixture's: one per bucket.
  inner: inner_lib.InnerState | tuple[inner_lib.InnerState, ...]
  best_meta_params: MetaParams  # phi with the best validation loss so far
  skips: SkipCounters


class StepMetrics(NamedTuple):
  meta_loss: jax.Array  # () mean over problems of sum_t w_t f(theta_t) (or of log f, log_sum)
  final_loss: jax.Array  # () mean over problems of f(theta_T) at the truncation's end
  grad_norm: jax.Array  # () global norm of the meta-gradient
  grad_max: jax.Array  # () largest |entry| of the meta-gradient
  finite: jax.Array  # bool (), whether the step was applied


def buckets(task: TaskFamily | mixture_lib.Mixture) -> tuple[TaskFamily, ...]:
  """The shape buckets of a mixture, or ``(task,)`` for a single family."""
  return tuple(task.buckets) if is_mixture(task) else (task,)


def is_mixture(task) -> bool:
  return isinstance(task, mixture_lib.Mixture)


def task_data(task: TaskFamily | mixture_lib.Mixture) -> Data:
  """What the trainer passes as ``data``: the family's, or a tuple of each bucket's."""
  return tuple(b.data for b in task.buckets) if is_mixture(task) else task.data


def problem_key(config: MetaTrainConfig, step, attempt=0, bucket=None) -> jax.Array:
  """Key of the problem batch sampled at meta-step ``step`` (``attempt`` > 0 after a skip).

  ``bucket``: a mixture's first problems of that bucket (drawn at step 0 for every bucket).
  """
  base = jax.random.fold_in(jax.random.key(config.seed), 1)
  key = jax.random.fold_in(jax.random.fold_in(base, step), attempt)
  return key if bucket is None else jax.random.fold_in(key, bucket)


def valid_key(config: MetaTrainConfig) -> jax.Array:
  """Key of the fixed validation problems (``--valid_seed``'s, else ``--seed``'s).

  Disjoint from every training stream of any seed, and from the test streams.
  """
  seed = config.seed if config.valid_seed == -1 else config.valid_seed
  return jax.random.fold_in(jax.random.key(seed), 2)


def valid_bucket_key(config: MetaTrainConfig, bucket: int | None) -> jax.Array:
  """``valid_key``, or for a mixture's bucket ``bucket`` its own fixed problems' key."""
  key = valid_key(config)
  return key if bucket is None else jax.random.fold_in(key, bucket)


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


def no_skips() -> SkipCounters:
  """Counters of a run that skipped nothing; each field its own buffer, as the state is donated."""
  count = lambda value: jnp.full((), value, jnp.int32)
  return SkipCounters(
    count(0), count(0), count(-1), jnp.zeros((), jnp.float32), jnp.zeros((), bool)
  )


def fresh_problems(config, task, optimizer, meta_params, data, step, attempt=0, bucket=None):
  """The batch of ``num_problems`` problems drawn at meta-step ``step`` (see ``problem_key``)."""
  key = problem_key(config, step, attempt, bucket)
  return unroll_lib.init_inner_batch(task, optimizer, meta_params, data, key, config.num_problems)


def saved_start(config: MetaTrainConfig, optimizer: LearnedOptimizer) -> MetaParams | None:
  """phi of the saved optimizer ``config.init_from`` names; None without one (``init_state``
  then draws the seed's init where it builds the state).

  Raises:
    ValueError: naming the source and the fix, if it holds no saved optimizer or one whose
      config is not ``optimizer``'s.
  """
  if not config.init_from:
    return None
  try:
    saved = learned_opt.load(learned_opt.shipped.resolve(config.init_from))
  except (OSError, ValueError) as e:
    raise ValueError(
      f"--init_from={config.init_from!r} names no usable saved optimizer: {e} Name a directory "
      "written by learned_opt.save or train.meta_train, or pretrained:NAME "
      f"({', '.join(learned_opt.pretrained_names())})."
    ) from e
  if dict(saved.optimizer.config) != dict(optimizer.config):
    raise ValueError(
      f"--init_from={config.init_from!r} holds an optimizer with config "
      f"{dict(saved.optimizer.config)}, but this run trains {dict(optimizer.config)}; pass the "
      "--optimizer and --optimizer_kwargs (or the --preset) it was trained with."
    )
  return saved.meta_params


def init_state(
  config: MetaTrainConfig,
  task: TaskFamily,
  optimizer: LearnedOptimizer,
  data: Data = None,
  meta_params: MetaParams | None = None,
) -> TrainState:
  """The state before the first meta-step; ``data`` defaults to ``task_data(task)``,
  ``meta_params`` to the seed's random init (a fresh run passes ``saved_start``'s; templates of a
  run's state need only shapes, so they never read ``--init_from``).

  ``task`` may be a mixture: then ``inner`` holds each bucket's first problems, in its order.
  """
  data = task_data(task) if data is None else data
  if meta_params is None:
    meta_params = optimizer.init_meta_params(jax.random.fold_in(jax.random.key(config.seed), 0))
  if is_mixture(task):
    inner = tuple(
      fresh_problems(config, b, optimizer, meta_params, d, 0, bucket=i)
      for i, (b, d) in enumerate(zip(task.buckets, data, strict=True))
    )
  else:
    inner = fresh_problems(config, task, optimizer, meta_params, data, 0)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    meta_params=meta_params,
    meta_opt_state=meta_optimizer(config).init(meta_params),
    inner=inner,
    best_meta_params=jax.tree.map(jnp.copy, meta_params),  # its own buffers: state is donated
    skips=no_skips(),
  )


def _all_finite(tree) -> jax.Array:
  """bool (): every floating-point entry of ``tree`` is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def state_shardings(state: TrainState, mesh) -> TrainState:
  """Shardings of a state (or its ``jax.eval_shape``) on ``mesh``: problems split, rest whole."""
  whole, split = distributed.replicated(mesh), distributed.problems_sharding(mesh)
  return jax.tree.map(lambda _: whole, state)._replace(
    inner=jax.tree.map(lambda _: split, state.inner)
  )


def init_sharded_state(config, task, optimizer, data, mesh) -> TrainState:
  """``init_state`` placed on ``mesh``, each device drawing only its own problems.

  Args:
    data: ``task_data(task)`` replicated on the mesh (``distributed.put``).
  """
  build = lambda d, phi: init_state(config, task, optimizer, d, phi)
  phi = saved_start(config, optimizer)
  shardings = state_shardings(jax.eval_shape(build, data, phi), mesh)
  return jax.jit(build, out_shardings=shardings)(data, phi)


def meta_loss_fn(config: MetaTrainConfig, task: TaskFamily, optimizer: LearnedOptimizer):
  """``unroll.meta_loss`` with the config's unroll, objective and horizon.

  Returns:
    ``(phi, inner, data) -> (loss, (losses, inner))``, as ``unroll.meta_loss``.
  """
  return functools.partial(
    unroll_lib.meta_loss,
    task=task,
    optimizer=optimizer,
    num_steps=config.unroll,
    second_order=config.second_order,
    objective=config.meta_objective,
    horizon=config.horizon,
  )


def make_train_step(
  config, task, optimizer, mesh=None, bucket=None, workspace: bool = False
) -> Callable:
  """``(state, data) -> (state, metrics)``: one truncated-BPTT meta-step; skips non-finite ones.

  Jit it with ``donate_argnums=0`` and pass ``task.data`` as ``data`` (or use ``jit_train_step``).
  With a ``mesh``, problems drawn inside the step are constrained to the problems sharding.

  For a mixture, ``bucket`` names the bucket the step trains on: it reads and replaces
  ``state.inner[bucket]`` alone, ``data`` is that bucket's, and its problems are resampled once
  they reach the horizon (a bucket is not drawn every step, so the global step cannot tell).

  With ``workspace``, ``(state, data, workspace) -> (state, metrics, workspace)``: the buffers
  of ``new_workspace`` (donate them too) hold the truncation's states (``train.truncation``)
  instead of fresh ones each step; ``()`` where the step does not use one.
  """
  if is_mixture(task):
    if bucket is None:
      raise ValueError("A mixture's train step trains one bucket; pass bucket=INDEX.")
    step = make_train_step(config, task.buckets[bucket], optimizer, mesh, bucket, True)
    return _bucket_step(step, bucket, workspace)
  meta_opt = meta_optimizer(config)
  truncations = config.horizon // config.unroll
  loss_fn = meta_loss_fn(config, task, optimizer)
  truncation_args = dict(
    task=task,
    optimizer=optimizer,
    num_steps=config.unroll,
    objective=config.meta_objective,
    horizon=config.horizon,
  )
  fresh = functools.partial(fresh_problems, config, task, optimizer)
  if mesh is not None:
    split = distributed.problems_sharding(mesh)
    place = lambda inner: jax.lax.with_sharding_constraint(inner, split)
    fresh = lambda *args, draw=fresh: place(draw(*args))

  def step(state: TrainState, data, buffers) -> tuple[TrainState, StepMetrics, tuple]:
    if bucket is None:
      due = (state.step > 0) & (state.step % truncations == 0)  # the horizon is reached
    else:  # every problem of a batch was drawn together, so they share one step count
      due = jnp.max(state.inner.step) >= config.horizon
    inner = jax.lax.cond(
      due, lambda: fresh(state.meta_params, data, state.step), lambda: state.inner
    )
    names = truncation.kernel_targets(optimizer, state.meta_params, inner, config.second_order)
    if names is not None:  # the LSTM on the CPU kernels: the truncation's own backward pass
      ((loss, (losses, inner)), grads), filled = truncation.value_and_grad(
        names, state.meta_params, inner, data, workspace=buffers or None, **truncation_args
      )
      buffers = filled if buffers else ()  # without a workspace, fresh buffers stay inside
    else:  # autodiff of a loss vmapped over problems: kernels sum phi's cotangents once
      with backend_lib.gradient_of_vmapped():
        (loss, (losses, inner)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.meta_params, inner, data
        )
    grad_max = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grads)]))
    updates, meta_opt_state = meta_opt.update(grads, state.meta_opt_state, state.meta_params)
    meta_params = optax.apply_updates(state.meta_params, updates)
    # Whatever the loss said, a step is applied only if it leaves phi and Adam's state finite
    # (a NaN clip threshold or an infinite learning rate poisons them from finite gradients).
    finite = (
      jnp.isfinite(loss) & jnp.isfinite(grad_max) & _all_finite((meta_params, meta_opt_state))
    )
    # A non-finite step leaves phi and Adam's moments untouched (never NaN in phi) ...
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    skips = state.skips
    consecutive = jnp.where(finite, 0, skips.consecutive + 1)
    # ... and replaces the problems in flight, which diverged, by fresh ones.
    inner = jax.lax.cond(
      finite, lambda: inner, lambda: fresh(state.meta_params, data, state.step, consecutive)
    )
    skips = SkipCounters(
      total=skips.total + jnp.where(finite, 0, 1),
      consecutive=consecutive,
      last_step=jnp.where(finite, skips.last_step, state.step),
      last_grad_max=jnp.where(finite, skips.last_grad_max, grad_max),
      halted=consecutive >= config.max_consecutive_skips,
    )
    new_state = TrainState(
      step=state.step + 1,
      meta_params=keep(meta_params, state.meta_params),
      meta_opt_state=keep(meta_opt_state, state.meta_opt_state),
      inner=inner,
      best_meta_params=state.best_meta_params,
      skips=skips,
    )
    metrics = StepMetrics(loss, jnp.mean(losses[:, -1]), optax.tree.norm(grads), grad_max, finite)
    return new_state, metrics, buffers

  def train_step(state: TrainState, data, buffers=()) -> tuple:
    # Once halted, a step changes nothing, so the state the host stops with is the halting one.
    nan = jnp.full((), jnp.nan, jnp.float32)
    stopped = StepMetrics(nan, nan, nan, nan, jnp.zeros((), bool))
    if not buffers:
      halted = lambda: (state, stopped)
      out = jax.lax.cond(state.skips.halted, halted, lambda: step(state, data, buffers)[:2])
      return (*out, buffers)
    # With a workspace the step runs and a halted one is discarded: a conditional around it
    # would copy the workspace in and out (hundreds of MB a step).
    new_state, metrics, buffers = step(state, data, buffers)
    new_state, metrics = jax.lax.cond(
      state.skips.halted, lambda: (state, stopped), lambda: (new_state, metrics)
    )
    return new_state, metrics, buffers

  return train_step if workspace else lambda state, data: train_step(state, data)[:2]


def _bucket_step(step: Callable, bucket: int, workspace: bool) -> Callable:
  """``step`` (with a workspace) of one bucket on a mixture's state: it sees
  ``state.inner[bucket]`` alone; ``workspace`` as ``make_train_step``'s."""

  def mixture_step(state: TrainState, data, buffers=()) -> tuple:
    new_state, metrics, buffers = step(state._replace(inner=state.inner[bucket]), data, buffers)
    inner = (*state.inner[:bucket], new_state.inner, *state.inner[bucket + 1 :])
    new_state = new_state._replace(inner=inner)
    return (new_state, metrics, buffers) if workspace else (new_state, metrics)

  return mixture_step if workspace else lambda state, data: mixture_step(state, data)


def new_workspace(config, optimizer, state: TrainState, bucket=None) -> tuple:
  """Buffers for ``make_train_step(..., workspace=True)``: ``train.truncation``'s for the
  problems of ``state`` (of ``bucket``'s, in a mixture), or ``()`` where the step uses none."""
  inner = state.inner if bucket is None else state.inner[bucket]
  names = truncation.kernel_targets(optimizer, state.meta_params, inner, config.second_order)
  return () if names is None else truncation.new_workspace(optimizer, inner, config.unroll)


def jit_train_step(config, task, optimizer, mesh=None, state=None, bucket=None) -> Callable:
  """``make_train_step`` jitted as the trainer runs it: the state donated, and on a ``mesh``
  its shardings (``state_shardings`` of ``state``, a state or its ``jax.eval_shape``) kept.

  Outside a mixture the step keeps its truncation workspace between calls (``WorkspaceStep``);
  a mixture's buckets take turns, and a workspace kept for each would add up, so theirs are
  fresh each step."""
  keep = bucket is None
  step = make_train_step(config, task, optimizer, mesh, bucket, workspace=keep)
  donate = (0, 2) if keep else 0
  if mesh is None:
    jitted = jax.jit(step, donate_argnums=donate)
  else:
    whole = distributed.replicated(mesh)
    metrics = StepMetrics(*[whole] * len(StepMetrics._fields))
    shardings = (state_shardings(state, mesh), metrics, whole)[: 3 if keep else 2]
    jitted = jax.jit(step, donate_argnums=donate, out_shardings=shardings)
  if not keep:
    return jitted
  return WorkspaceStep(jitted, lambda state: new_workspace(config, optimizer, state))


class WorkspaceStep:
  """``(state, data) -> (state, metrics)`` by a jitted workspace step (``make_train_step(...,
  workspace=True)``), its workspace kept between calls and donated to each: one allocation for
  the run, not one per meta-step. Made on the first call; dropped if a call fails."""

  def __init__(self, jitted: Callable, make: Callable[[TrainState], tuple]):
    self.jitted, self.make, self.workspace = jitted, make, None

  def __call__(self, state: TrainState, data) -> tuple[TrainState, StepMetrics]:
    workspace = self.make(state) if self.workspace is None else self.workspace
    self.workspace = None  # donated below: never reused if the call fails
    state, metrics, self.workspace = self.jitted(state, data, workspace)
    return state, metrics


def sample_valid_problems(
  config: MetaTrainConfig, task: TaskFamily, mesh=None, data=None, bucket=None
):
  """The fixed validation problems and their run keys, shaped (valid_problems, ...).

  With a ``mesh`` (and ``data`` replicated on it), each device draws only its own problems.
  ``bucket``: ``task`` is that bucket of a mixture, whose problems have their own key.
  """
  key = valid_bucket_key(config, bucket)
  if mesh is None:
    return inner_lib.sample_problems(task, key, config.valid_problems)
  draw = lambda d: inner_lib.sample_problems(task._replace(data=d), key, config.valid_problems)
  return jax.jit(draw, out_shardings=distributed.problems_sharding(mesh))(data)


def make_validate(config, task, optimizer) -> Callable:
  """``(phi, data, task_params, keys) -> losses`` shaped (problems, horizon + 1).

  Runs phi through its optax face on the problems of ``sample_valid_problems``.
  """

  def validate(meta_params, data: Data, task_params, keys):
    tx = learned_opt.as_optax(optimizer, meta_params)
    return inner_lib.rollout_batch(task, tx, data, task_params, keys, config.horizon)

  return validate


def upgrade_checkpoint(raw: dict, host: dict, version: int) -> tuple[dict, dict]:
  """An older checkpoint (raw state dict and host dict) in today's format.

  Format 1 kept the learned optimizer's own state unwrapped and the skip counters on the host;
  format 2 differs from 3 only in its unchecksummed ``meta.json``, whose host fields the trainer
  checks.
  """
  if version == 2:
    return raw, host
  if version != 1:
    raise ValueError(f"checkpoint format {version} cannot be upgraded; start a new run.")
  raw = dict(raw)
  inner = dict(raw["inner"])
  inner["opt_state"] = {"inner": inner["opt_state"]}  # as_optax's LearnedOptaxState(inner=...)
  raw["inner"] = inner
  raw["skips"] = {
    "total": host.get("skipped", 0),
    "consecutive": host.get("consecutive", 0),
    "last_step": -1,
    "last_grad_max": 0.0,
    "halted": False,
  }
  progress = {k: host[k] for k in ("best_valid", "valid_history", "early_stopped") if k in host}
  progress.setdefault("best_valid", math.inf)
  return raw, progress
