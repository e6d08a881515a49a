r"""Performance against the machine's limit (run by hand, not a test).

  python -m benchmarks.perf [--workloads=quad128,quad1024,mnist2,mnist8,update16k,update1m]
      [--gates=xla,auto] [--mallocs=system,tcmalloc] [--json=runs/perf.json]

For each workload, in a subprocess of its own (so the peak resident memory is that workload's): wall
and CPU time per call after compile (medians, the donated state threaded from call to call as the
trainer does), the mean wall time of meta-steps dispatched back to back as the trainer dispatches
them ("pipelined"; the trainer's steps/s is its inverse), lowering + compile time, achieved FLOP/s
from XLA's cost analysis and that as a fraction of a large float32 matmul timed in the same run (the
machine's practical peak), and peak resident memory. XLA's cost analysis counts a ``lax.scan`` body
once, whatever its trip count, so the FLOPs are read from a second lowering with every scan fully
unrolled (the timed program is the ordinary one). Workloads:

* ``quad128``, ``quad1024``: the trainer's meta-step on 10-d quadratics, 128 / 1024 problems,
  unroll 20 (``train.meta_step.make_train_step``, the paper's 2x20 LSTM);
* ``mnist2``, ``mnist8``: the same on the MNIST base net (15,910 parameters), 2 / 8 problems,
  log_sign preprocessing, output scale 0.1 (needs ``$MNIST_DIR``);
* ``update16k``, ``update1m``: one jitted ``as_optax`` update of the LSTM on 16,384 /
  1,048,576 float32 parameters, beside ``optax.adam``;
* ``ppm_update1m``: the same for the per-parameter MLP (``per_param_mlp``, 32 x 2 hidden);
* ``ppm_bucket``: the per-parameter MLP's meta-step on the largest MLP bucket of the task
  mixture (``mlp_mnist8g_256_b256``, 4 problems, unroll 20; needs ``$MNIST_DIR``);
* ``cifar2``, ``cifar8``: the ``cifar10_conv`` preset's meta-step (two LSTMs, unroll 20), 2 / 8
  problems (needs ``$CIFAR10_DIR``);
* ``art64``: the ``neural_art`` preset's meta-step (64 x 64, 4 problems, unroll 32; needs
  ``$CIFAR10_DIR`` and the VGG16 weights, see ``tasks/vgg16.py``);
* ``mixture``: the ``mixture`` preset's meta-step on every bucket of its mixture, one after
  another (the trainer draws one bucket a step): seconds and FLOPs summed over the buckets, so the
  fraction of peak is the whole mixture's.
"""

import contextlib
import itertools
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import learned_opt
from benchmarks import peak
from learned_opt import backend as backend_lib
from train import allocator, meta_step, presets, trainer
from train.config import MetaTrainConfig

flags.DEFINE_list(
  "workloads",
  ["quad128", "quad1024", "mnist2", "mnist8", "update16k", "update1m"],
  "Workloads to run, each in its own subprocess.",
)
flags.DEFINE_string("json", None, "Also write every result to this JSON file.")
flags.DEFINE_string("one", None, "Run this single workload in this process (used internally).")
flags.DEFINE_integer("repeats", 10, "Timed calls per workload after the first.")
flags.DEFINE_list(
  "gates",
  ["auto"],
  "Backends to run each workload with ($LEARNED_OPT_BACKEND in its subprocess): auto (the CPU "
  "kernels where they build), xla, cpu_kernels; e.g. --gates=xla,auto for before/after.",
)
flags.DEFINE_list(
  "mallocs",
  ["system"],
  "malloc libraries to run each workload with ($LEARNED_OPT_MALLOC in its subprocess, see "
  "train/allocator.py): system, tcmalloc, or a library's path; e.g. --mallocs=system,tcmalloc "
  "to compare.",
)
FLAGS = flags.FLAGS

MNIST_OPTIMIZER = {"preprocess": "log_sign", "output_scale": 0.1}


@contextlib.contextmanager
def fully_unrolled_scans():
  """Lowers every ``lax.scan`` fully unrolled, so cost analysis counts each iteration."""
  original = jax.lax.scan

  def scan(*args, **kwargs):
    kwargs["unroll"] = True
    return original(*args, **kwargs)

  jax.lax.scan = scan
  try:
    yield
  finally:
    jax.lax.scan = original


def flops_of(fn, *args) -> float:
  """FLOPs of one call of ``fn(*args)`` by XLA's cost analysis, scans unrolled, gates in XLA
  (cost analysis counts none in a custom call), so every --gates mode is credited the same work.
  """
  saved = backend_lib.kernel_targets
  backend_lib.kernel_targets = lambda *a, **k: None  # XLA's own ops, which cost analysis sees into
  try:
    with fully_unrolled_scans():
      # A fresh function: jit caches traces per function, and the timed one must not reuse this.
      return peak.flops(jax.jit(lambda *a: fn(*a)).lower(*args).cost_analysis())
  finally:
    backend_lib.kernel_targets = saved


def time_threaded(compiled, state, extra, repeats):
  """Seconds per call of ``state, out = compiled(state, *extra)``, state threaded.

  Returns:
    ``(wall, cpu, pipelined)``: median wall and CPU seconds (this process, all threads) of calls
    each waited for; and the mean wall seconds of ``repeats`` calls dispatched back to back and
    waited for once, as the trainer runs them (the host reads nothing between steps). CPU time is
    the steadier figure on a shared machine.
  """
  state, out = compiled(state, *extra)
  jax.block_until_ready(out)
  walls, cpus = [], []
  for _ in range(repeats):
    tic, cpu = time.perf_counter(), time.process_time()
    state, out = compiled(state, *extra)
    jax.block_until_ready(out)
    walls.append(time.perf_counter() - tic)
    cpus.append(time.process_time() - cpu)
  tic = time.perf_counter()
  for _ in range(repeats):
    state, out = compiled(state, *extra)
  jax.block_until_ready((state, out))
  pipelined = (time.perf_counter() - tic) / repeats
  return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2], pipelined


def time_step(step, state, data, repeats: int, workspace=None) -> dict:
  """One meta-step function measured: FLOPs (scans unrolled), compile seconds, and
  ``time_threaded``'s wall, CPU and pipelined seconds. ``state`` is donated: do not reuse it.
  With a ``workspace``, ``step`` is ``(state, data, workspace) -> (state, metrics, workspace)``
  and the workspace is donated and threaded too, as ``train.meta_step.jit_train_step`` runs it."""
  args, donate = ((state, data), 0) if workspace is None else ((state, data, workspace), (0, 2))
  flops = flops_of(step, *args)
  tic = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=donate).lower(*args).compile()
  compile_s = time.perf_counter() - tic
  if workspace is None:
    threaded, carry = compiled, state
  else:

    def threaded(carry, data):
      state, metrics, workspace = compiled(carry[0], data, carry[1])
      return (state, workspace), metrics

    carry = (state, workspace)
  seconds, cpu_seconds, pipelined = time_threaded(threaded, carry, (data,), repeats)
  return {
    "seconds": seconds,
    "cpu_seconds": cpu_seconds,
    "pipelined_seconds": pipelined,
    "compile_s": compile_s,
    "flops": flops,
  }


def meta_step_workload(config: MetaTrainConfig, repeats: int) -> dict:
  task, optimizer = trainer.build(config)
  state = meta_step.init_state(config, task, optimizer)
  if hasattr(meta_step, "new_workspace"):  # the trainer's step: one workspace for every call
    step = meta_step.make_train_step(config, task, optimizer, workspace=True)
    workspace = meta_step.new_workspace(config, optimizer, state)
    result = time_step(step, state, task.data, repeats, workspace)
  else:  # a tree from before 2026-12-06 (benchmarks.compare runs this file in it)
    step = meta_step.make_train_step(config, task, optimizer)
    result = time_step(step, state, task.data, repeats)
  inner_steps = config.num_problems * config.unroll
  return {
    **result,
    "optimizee_steps_per_s": inner_steps / result["seconds"],
    "seconds_per_problem": result["seconds"] / config.num_problems,
  }


def preset_config(name: str, **overrides) -> MetaTrainConfig:
  """A shipped preset's config (``train/configs/NAME.json``) with ``overrides``."""
  return MetaTrainConfig(**{**presets.select(name, name), "output_dir": "/tmp/unused", **overrides})


def mixture_workload(config: MetaTrainConfig, repeats: int) -> dict:
  """``time_step`` of each bucket's step (one compile each), summed over the mixture's buckets."""
  mixture, optimizer = trainer.build(config)
  totals, per_bucket = {}, {}
  for b, bucket in enumerate(mixture.buckets):
    state = meta_step.init_state(config, mixture, optimizer)  # the last one was donated
    step = meta_step.make_train_step(config, mixture, optimizer, bucket=b)
    result = time_step(step, state, bucket.data, repeats)
    totals = {k: totals.get(k, 0.0) + v for k, v in result.items()}
    per_bucket[mixture.names[b]] = result["seconds"]
  inner_steps = len(mixture.buckets) * config.num_problems * config.unroll
  return {**totals, "optimizee_steps_per_s": inner_steps / totals["seconds"], "buckets": per_bucket}


def update_workload(size: int, repeats: int, kind: str = "lstm") -> dict:
  params = {"w": jnp.ones((size // 64, 64), jnp.float32)}
  grads = jax.tree.map(lambda p: 0.01 * p, params)
  opt = learned_opt.build({"kind": kind})
  phi = opt.init_meta_params(jax.random.key(0))
  # The optimizer runs on $LEARNED_OPT_BACKEND (--gates). FLOPs are always counted on XLA's:
  # cost analysis sees nothing in a kernel.
  results = {}
  for name, tx, counted in (
    (
      "learned",
      learned_opt.as_optax(opt, phi),
      learned_opt.as_optax(opt, phi, backend="xla"),
    ),
    ("adam", optax.adam(1e-3), optax.adam(1e-3)),
  ):
    update = lambda s, g, tx=tx: tx.update(g, s)[::-1]  # (state, updates): state threaded
    state = tx.init(params)
    # Above lstm_rows.BLOCK_ROWS coordinates the LSTM's update loops over blocks with lax.map, whose
    # body cost analysis counts once: count one block's worth of parameters and scale (every
    # kind's cost is linear in the coordinates).
    rows = min(size, learned_opt.lstm_rows.BLOCK_ROWS)
    small = {"w": jnp.ones((rows // 64, 64), jnp.float32)}
    count = lambda s, g, tx=counted: tx.update(g, s)[::-1]
    flops = flops_of(count, counted.init(small), small) * size / rows
    tic = time.perf_counter()
    compiled = jax.jit(update, donate_argnums=0).lower(state, grads).compile()
    compile_s = time.perf_counter() - tic
    seconds, cpu_seconds, _ = time_threaded(compiled, state, (grads,), repeats)
    results[name] = {
      "seconds": seconds,
      "cpu_seconds": cpu_seconds,
      "compile_s": compile_s,
      "flops": flops,
    }
  learned = results.pop("learned")
  return {**learned, "adam_seconds": results["adam"]["seconds"], "params": size}


def run_one(name: str, repeats: int) -> dict:
  backend = backend_lib.default()  # --gates, through the subprocess's $LEARNED_OPT_BACKEND
  quadratic = dict(output_dir="/tmp/unused", unroll=20, horizon=100, backend=backend)
  mnist = dict(quadratic, task="mnist_mlp", optimizer_kwargs=MNIST_OPTIMIZER)
  bucket = dict(quadratic, task="mixture", task_kwargs={"bucket": "mlp_mnist8g_256_b256"})
  bucket.update(optimizer="per_param_mlp", meta_objective="log_sum", meta_grad_clip=1.0)
  workloads = {
    "quad128": lambda: meta_step_workload(MetaTrainConfig(**quadratic, num_problems=128), repeats),
    "quad1024": lambda: meta_step_workload(
      MetaTrainConfig(**quadratic, num_problems=1024), repeats
    ),
    "mnist2": lambda: meta_step_workload(MetaTrainConfig(**mnist, num_problems=2), repeats),
    "mnist8": lambda: meta_step_workload(MetaTrainConfig(**mnist, num_problems=8), repeats),
    "update16k": lambda: update_workload(16_384, repeats),
    "update1m": lambda: update_workload(1_048_576, repeats),
    "ppm_update1m": lambda: update_workload(1_048_576, repeats, "per_param_mlp"),
    "ppm_bucket": lambda: meta_step_workload(MetaTrainConfig(**bucket, num_problems=4), repeats),
    "cifar2": lambda: meta_step_workload(preset_config("cifar10_conv", backend=backend), repeats),
    "cifar8": lambda: meta_step_workload(
      preset_config("cifar10_conv", backend=backend, num_problems=8), repeats
    ),
    "art64": lambda: meta_step_workload(preset_config("neural_art", backend=backend), repeats),
    "mixture": lambda: mixture_workload(preset_config("mixture", backend=backend), repeats),
  }
  if name not in workloads:
    raise app.UsageError(f"Unknown workload {name!r}; choose from {', '.join(workloads)}.")
  matmul, bandwidth = peak.matmul_peak(), peak.copy_bandwidth()
  result = workloads[name]()
  achieved = result["flops"] / result["seconds"]
  return {
    "workload": name,
    "gates": backend_lib.default(),
    "malloc": allocator.active(),
    **result,
    "achieved_flops_per_s": achieved,
    "matmul_peak_flops_per_s": matmul,
    "fraction_of_peak": achieved / matmul,
    "copy_bandwidth_gb_per_s": bandwidth / 1e9,
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
  }


def _malloc_name(r: dict) -> str:
  """``system`` or the preloaded library's short name (``tcmalloc_minimal``)."""
  name = os.path.basename(r.get("malloc", "system"))
  return name.removeprefix("lib").split(".so")[0]


def format_row(r: dict) -> str:
  extra = ""
  if "optimizee_steps_per_s" in r:
    extra = (
      f"{r['optimizee_steps_per_s']:>12,.0f} opt-steps/s"
      f"  pipelined {1e3 * r['pipelined_seconds']:.1f} ms"
    )
  elif "adam_seconds" in r:
    extra = f"  adam {1e3 * r['adam_seconds']:.3f} ms"
  return (
    f"{r['workload']:<13}{r['gates']:<6}{_malloc_name(r):<18}{1e3 * r['seconds']:>10.1f} ms"
    f"{1e3 * r['cpu_seconds']:>10.1f} ms CPU"
    f"{r['compile_s']:>8.1f} s compile"
    f"{r['achieved_flops_per_s'] / 1e9:>8.1f} GFLOP/s{100 * r['fraction_of_peak']:>6.1f}% of "
    f"{r['matmul_peak_flops_per_s'] / 1e9:.0f}{r['peak_rss_gb']:>7.2f} GB"
    f"{r.get('copy_bandwidth_gb_per_s', 0):>6.1f} GB/s{extra}"
  )


def main(argv):
  del argv
  if FLAGS.one:
    print(json.dumps(run_one(FLAGS.one, FLAGS.repeats)))
    return
  print(f"devices: {jax.devices()}, jax {jax.__version__}")
  for gates in FLAGS.gates:
    if gates not in backend_lib.BACKENDS:
      raise app.UsageError(f"--gates takes {backend_lib.BACKENDS}, got {gates!r}.")
  results = []
  for name in FLAGS.workloads:
    for gates, malloc in itertools.product(FLAGS.gates, FLAGS.mallocs):
      command = [
        sys.executable,
        "-m",
        "benchmarks.perf",
        f"--one={name}",
        f"--repeats={FLAGS.repeats}",
      ]
      env = {**os.environ, backend_lib.ENV_VAR: gates, allocator.ENV: malloc}
      try:
        env = allocator.preload_env(env) or env
      except ValueError as e:
        raise app.UsageError(str(e)) from e
      out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
      if out.returncode:
        print(f"{name} ({gates}, malloc {malloc}): failed\n{out.stderr[-2000:]}")
        continue
      results.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(format_row(results[-1]), flush=True)
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    record = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__}
    with open(FLAGS.json, "w") as f:
      json.dump({**record, "results": results}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
