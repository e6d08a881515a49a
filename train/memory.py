"""How much memory a meta-step needs, estimated by tracing before anything compiles.

Backpropagating through an unroll keeps, for every problem and every one of its ``unroll``
steps, the values the backward pass reads (the residuals): the LSTM's gates on every coordinate,
the optimizee's activations. They dominate a meta-step's memory and grow linearly in
``--num_problems`` and ``--unroll``. ``estimate`` traces the meta-loss's VJP with abstract
inputs (``jax.make_jaxpr``: no compile, no allocation) and sums the residuals it returns; ``check``
refuses a run whose estimate exceeds the memory available, naming what to shrink: the problems
(the largest count that fits and divides over the mesh), the unroll, or the optimizer itself when
its weights and Adam state alone do not fit. On the host, "available" honours the container's
(cgroup's) memory limit, not only the machine's free memory. A mixture's meta-step is its
largest bucket's, beside every bucket's data and problems in flight (all stay on the device).
"""

import json
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import jax

from learned_opt.base import LearnedOptimizer
from tasks.base import TaskFamily
from train import cgroup, meta_step, presets
from train import unroll as unroll_lib
from train.config import MetaTrainConfig

# Fitted to XLA's buffer assignment of the compiled meta-step (temporaries + arguments + outputs)
# for quadratics (128, 1024 problems) and the MNIST MLP (2, 8 problems; a tiny one at unroll 10):
# XLA keeps ~1.1x the traced residuals, and while the backward pass runs one step it holds a few
# steps' worth more (that step's cotangents and recomputed values). Checked by
# tests/test_memory_estimate.py.
RESIDUAL_FACTOR = 1.1
STEP_WORKSPACE = 2.5  # in residuals of one unroll step
GIB = 2**30
# Compiling a meta-step grew the process by 0.21-0.40 GiB (quadratics, MNIST MLP) before it ran.
COMPILE_HEADROOM = GIB // 2


class MemoryEstimate(NamedTuple):
  """Bytes of one meta-step, by what holds them."""

  residual_bytes: int  # kept for the backward pass: all problems, all unroll steps
  meta_bytes: int  # phi, Adam's two moments and the best phi
  problem_bytes: int  # the problems in flight
  data_bytes: int  # the task's data set on the device
  total_bytes: int  # residuals * (RESIDUAL_FACTOR + STEP_WORKSPACE / unroll) + 2 * state + data

  @property
  def fixed_bytes(self) -> int:
    """The part that does not grow with the number of problems."""
    return 2 * self.meta_bytes + self.data_bytes


def _nbytes(aval) -> int:
  return math.prod(aval.shape) * aval.dtype.itemsize  # PRNG key dtypes have an itemsize too


def _tree_bytes(tree) -> int:
  return sum(_nbytes(x) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def residual_bytes(
  config: MetaTrainConfig, task: TaskFamily, optimizer: LearnedOptimizer, num_problems: int
) -> tuple[int, int, int]:
  """``(residuals, phi, problems)`` in bytes for a meta-step of ``num_problems`` problems.

  Residuals are the outputs of the traced ``jax.vjp`` of the meta-loss that are not its inputs
  (inputs the backward pass reads, such as the data set, are not copied).
  """
  key = jax.random.key(0)
  phi = jax.eval_shape(optimizer.init_meta_params, key)
  inner = jax.eval_shape(
    lambda p, d, k: unroll_lib.init_inner_batch(task, optimizer, p, d, k, num_problems),
    phi,
    task.data,
    key,
  )
  loss_fn = meta_step.meta_loss_fn(config, task, optimizer)

  def backward_pass(phi, inner, data):
    _, vjp = jax.vjp(lambda p: loss_fn(p, inner, data)[0], phi)
    return vjp

  traced = jax.make_jaxpr(backward_pass)(phi, inner, task.data).jaxpr
  inputs = {id(v) for v in traced.invars}
  residuals = sum(
    _nbytes(v.aval) for v in traced.outvars if id(v) not in inputs and hasattr(v.aval, "shape")
  )
  return residuals, _tree_bytes(phi), _tree_bytes(inner)


def estimate(config: MetaTrainConfig, task, optimizer: LearnedOptimizer) -> MemoryEstimate:
  """The meta-step's peak memory for ``config.num_problems`` problems, by tracing only.

  ``task``: a ``TaskFamily``, or a mixture (``tasks.mixture.Mixture``): the largest bucket's
  step, with the data and problems of every bucket held.
  """
  if meta_step.is_mixture(task):
    each = [estimate(config, bucket, optimizer) for bucket in task.buckets]
    largest = max(each, key=lambda m: m.total_bytes - 2 * m.problem_bytes - m.data_bytes)
    problems = sum(m.problem_bytes for m in each)
    data = sum(m.data_bytes for m in each)
    total = largest.total_bytes + 2 * (problems - largest.problem_bytes) + data - largest.data_bytes
    return MemoryEstimate(largest.residual_bytes, largest.meta_bytes, problems, data, total)
  residuals, phi, problems = residual_bytes(config, task, optimizer, config.num_problems)
  meta = 4 * phi  # phi, Adam's two moments, the best phi
  data = _tree_bytes(task.data)
  # The state is donated, but old and new buffers coexist while a step runs.
  kept = residuals * (RESIDUAL_FACTOR + STEP_WORKSPACE / config.unroll)
  total = int(kept) + 2 * (meta + problems) + data
  return MemoryEstimate(residuals, meta, problems, data, total)


def in_words(num_bytes: int) -> str:
  """``"1.7 GiB"``, or ``"36 MiB"`` under one GiB."""
  if num_bytes >= GIB:
    return f"{num_bytes / GIB:.1f} GiB"
  return f"{num_bytes / 2**20:.0f} MiB"


def available_bytes(device: jax.Device | None = None, cgroup_root: str = cgroup.ROOT) -> int | None:
  """Memory a run can still use: the accelerator's free memory, or on the host the lesser of its
  available RAM and what its cgroup's limit leaves (``train.cgroup.available``): in a container the
  kernel kills a process at the container's limit, however much the machine has free."""
  device = device or jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return None
  known = [b for b in (_host_available(), cgroup.available(cgroup_root)) if b is not None]
  return min(known) if known else None


def _host_available() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    pages = getattr(os, "sysconf_names", {}).get("SC_AVPHYS_PAGES")
    return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE") if pages else None


def per_device_bytes(memory: MemoryEstimate, devices: int = 1) -> int:
  """Peak bytes on each of ``devices`` when the problems are split among them (the rest copied)."""
  return -(-(memory.total_bytes - memory.fixed_bytes) // devices) + memory.fixed_bytes


def largest_fitting(
  memory: MemoryEstimate, num_problems: int, available: int, devices: int = 1
) -> int:
  """The most problems whose estimate fits ``available``, residuals and state linear in them."""
  per_problem = (memory.total_bytes - memory.fixed_bytes) / num_problems / devices
  return max(0, int((available - memory.fixed_bytes) // max(per_problem, 1)))


def most_problems(
  memory: MemoryEstimate, num_problems: int, available: int, devices: int = 1, multiple: int = 1
) -> int:
  """The largest problem count, a multiple of ``multiple`` (the mesh's devices), that ``check``
  accepts with ``available`` bytes on each device; 0 if none does. The one count both the memory
  and the divisibility refusals suggest."""
  fits = largest_fitting(memory, num_problems, available - COMPILE_HEADROOM, devices)
  return fits // multiple * multiple


def problems_fit(
  memory: MemoryEstimate,
  num_problems: int,
  available: int | None = None,
  shared: bool = False,
) -> Callable[[int, int], bool]:
  """``fits(count, devices)``: whether ``count`` problems split over ``devices`` pass ``check``.

  For ``distributed.check_divides``, so that it suggests no count or device number the memory
  check would refuse. ``shared``: the devices share one memory (CPU devices share the host's).
  Unknown available memory: everything fits, as ``check`` then checks nothing.
  """
  available = available_bytes() if available is None else available
  if available is None:
    return lambda count, devices: True

  def fits(count: int, devices: int) -> bool:
    devices = 1 if shared else devices
    return count <= largest_fitting(memory, num_problems, available - COMPILE_HEADROOM, devices)

  return fits


def _advice(config, memory: MemoryEstimate, available: int, devices: int, multiple: int) -> str:
  """What to shrink so the run fits: the part that alone does not fit, or the problem count."""
  if memory.fixed_bytes + COMPILE_HEADROOM >= available:  # whatever --num_problems and --unroll
    if 2 * memory.meta_bytes >= memory.data_bytes:
      kwargs = json.dumps(config.optimizer_kwargs)
      return (
        f"the optimizer alone takes {in_words(2 * memory.meta_bytes)} (its weights, Adam's two "
        "moments and the best weights, twice while a step runs), whatever --num_problems and "
        "--unroll: use a smaller optimizer, e.g. a lower hidden_size or num_layers in "
        f"--optimizer_kwargs (now --optimizer={config.optimizer} --optimizer_kwargs='{kwargs}')"
      )
    return (
      f"the task's data set alone takes {in_words(memory.data_bytes)} on the device, whatever "
      "--num_problems and --unroll: use a smaller data set (--task_kwargs) or task"
    )
  fits = most_problems(memory, config.num_problems, available, devices, multiple)
  if fits >= 1:
    preset = presets.PRESETS.get(config.task, {}).get("num_problems")
    hint = f" (the {config.task} preset uses {preset})" if preset else ""
    mesh = f", a multiple of the mesh's {multiple} devices" if multiple > 1 else ""
    return f"lower --num_problems to {fits} or less{mesh}{hint}"
  return (
    f"lower --unroll (now {config.unroll}), or use a smaller optimizer (--optimizer_kwargs) or task"
  )


def check(
  config: MetaTrainConfig,
  task: TaskFamily,  # or a mixture (``estimate``)
  optimizer: LearnedOptimizer,
  available: int | None = None,
  devices: int = 1,
  multiple: int = 1,
) -> MemoryEstimate:
  """The estimate; raises ValueError naming what to shrink when it does not fit.

  Args:
    available: bytes the run may use on each device; default ``available_bytes()`` (unknown:
      no check).
    devices: accelerators the problems are split among (CPU devices share the host's memory:
      pass 1 there).
    multiple: the mesh's device count; a suggested ``--num_problems`` is a multiple of it.
  """
  memory = estimate(config, task, optimizer)
  available = available_bytes() if available is None else available
  needed = per_device_bytes(memory, devices)
  if available is not None and needed + COMPILE_HEADROOM > available:
    advice = _advice(config, memory, available, devices, multiple)
    where = f" on each of {devices} devices" if devices > 1 else ""
    raise ValueError(
      f"A meta-step of --num_problems={config.num_problems} (--unroll={config.unroll}) needs "
      f"about {needed / GIB:.1f} GiB{where} ({memory.residual_bytes / GIB:.1f} GiB kept for "
      f"backpropagation through the unroll) and {COMPILE_HEADROOM / GIB:.1f} GiB to compile, but "
      f"{available / GIB:.1f} GiB is available; "
      f"{advice}."
    )
  return memory
