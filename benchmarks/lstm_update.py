r"""Speed of the coordinatewise LSTM's update and of a meta-step through it (run by hand).

  python -m benchmarks.lstm_update [--workloads=update16k,update1m,update16k_tree,update1m_tree,
      update16k_fused,update1m_fused,update16k_tree_fused,update1m_tree_fused,meta128,meta1024]
      [--policies=none,dots_saveable] [--reference=/tmp/lstm_orig.py] [--gates=xla,cpu_kernels]
      [--rounds=3] [--repeats=10] [--json=runs/lstm_update.json]

Workloads, each run in a subprocess of its own (so its peak resident memory is its own):

* ``update16k``, ``update1m``: one jitted ``learned_opt.as_optax(lstm_optimizer(), phi)`` update
  of 16,384 / 1,048,576 float32 parameters in one ``(N // 64, 64)`` leaf, the returned state
  donated and threaded from call to call, beside ``optax.adam`` on the same tree;
  ``update16k_tree``, ``update1m_tree``: the same parameters spread over four leaves;
  ``..._fused``: the same with ``as_optax(..., backend="cpu_kernels")``, the CPU kernels
  (learned_opt/kernels), built before the run; its FLOPs are the hand count (XLA's cost
  analysis does not see inside a custom call);
* ``meta128``, ``meta1024``: a quadratic meta-step assembled here as in
  shared/probes/lstm_layout.py: 10-d quadratics ``||W theta - y||^2``, 128 / 1024 problems,
  unroll 20, ``stop_gradient`` on the optimizee gradient, ``value_and_grad`` w.r.t. phi, Adam on
  phi, on ``lstm_optimizer().update`` vmapped over problems; once per ``--policies`` entry, the
  scan step wrapped in ``jax.checkpoint`` with that policy (``none``: not wrapped).

``--reference=PATH`` also runs every workload on the ``lstm_optimizer`` of the module at PATH
(e.g. a copy of the committed ``learned_opt/lstm.py``), interleaved with the library's, round
by round, since other jobs share the CPU; ``--gates=xla,cpu_kernels`` likewise runs every
workload with each default backend (``$LEARNED_OPT_BACKEND`` of its subprocess). Reported
per run: wall time per call after compile
(median of ``--repeats``), lowering + compile time, FLOPs by XLA's cost analysis and the achieved
FLOP/s as a fraction of a 2048^3 float32 matmul timed in the same subprocess just before, CPU
time per call (user + system, ``getrusage``: what the call costs when other jobs share the
cores), and peak resident memory. Cost analysis counts a ``lax.scan`` or ``lax.map`` body once,
so FLOPs come from a program without loops: the meta-step with an unroll of 1, times 20; the
update on 16,384 coordinates (one block, see ``lstm_rows.BLOCK_ROWS``), times N / 16,384.
"""

import importlib.util
import json
import os
import resource
import statistics
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
from learned_opt.kernels import stack

flags.DEFINE_list(
  "workloads",
  [
    "update16k",
    "update1m",
    "update16k_tree",
    "update1m_tree",
    "update16k_fused",
    "update1m_fused",
    "meta128",
    "meta1024",
  ],
  "Workloads to run.",
)
flags.DEFINE_list("policies", ["none", "dots_saveable"], "jax.checkpoint policies for meta-steps.")
flags.DEFINE_string("reference", None, "A module file whose lstm_optimizer to run as well.")
flags.DEFINE_list(
  "gates",
  ["auto"],
  "Default backends ($LEARNED_OPT_BACKEND of each run): auto, xla, cpu_kernels; "
  "--gates=xla,cpu_kernels interleaves the two round by round.",
)
flags.DEFINE_integer("rounds", 3, "Rounds; each runs every workload once per implementation.")
flags.DEFINE_integer("repeats", 10, "Timed calls per run, after the compiled first call.")
flags.DEFINE_string("json", None, "Also write every run and the summary to this JSON file.")
flags.DEFINE_string("one", None, "Internal: run this single workload here, print one JSON line.")
flags.DEFINE_string("impl", "library", "Internal: 'library' or 'reference'.")
flags.DEFINE_string("policy", "none", "Internal: the checkpoint policy of a meta-step run.")
FLAGS = flags.FLAGS

DIM, UNROLL = 10, 20
FLOPS_ROWS = 16384  # coordinates of the loop-free update whose FLOPs are scaled to N.
POLICIES = {
  "none": None,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def lstm_optimizer(impl: str):
  """``lstm_optimizer`` of the library, or of the module at ``--reference``."""
  if impl == "library":
    return learned_opt.lstm_optimizer
  spec = importlib.util.spec_from_file_location("lstm_reference", FLAGS.reference)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.lstm_optimizer


def forward_flops_per_coordinate(hidden=20, layers=2, features=1, outputs=1) -> int:
  """Hand count of the LSTM's matmul FLOPs per coordinate and step (2 per multiply-add)."""
  fan_ins = [features] + [hidden] * (layers - 1)
  return sum(2 * (f + hidden) * 4 * hidden for f in fan_ins) + 2 * hidden * outputs


def compiled_flops(fn, *args) -> float:
  """XLA's count for ``fn`` with the gates in XLA (it counts nothing inside a custom call), from
  a fresh trace (jit caches traces per function, and the timed one must not reuse this)."""
  saved = backend_lib.kernel_targets
  backend_lib.kernel_targets = lambda *a, **k: None  # XLA's own ops, which cost analysis sees into
  try:
    return peak.flops(jax.jit(lambda *a: fn(*a)).lower(*args).compile().cost_analysis())
  finally:
    backend_lib.kernel_targets = saved


def time_threaded(fn, state, rest, repeats, donate):
  """Compiles ``fn(*state, *rest) -> (*new_state, *outputs)``; times calls threading the state.

  Returns ``(median seconds per call, lowering + compile seconds, mean CPU seconds per call)``.
  """
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*state, *rest).compile()
  compile_s = time.perf_counter() - start
  out = compiled(*state, *rest)
  jax.block_until_ready(out)
  times = []
  cpu_start = cpu_seconds()
  for _ in range(repeats):
    state = out[: len(state)]
    start = time.perf_counter()
    out = compiled(*state, *rest)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return statistics.median(times), compile_s, (cpu_seconds() - cpu_start) / repeats


def cpu_seconds() -> float:
  """User + system CPU seconds of this process, all threads."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def parameter_tree(size: int, tree: bool) -> dict:
  """``size`` float32 parameters: one (size // 64, 64) leaf, or four leaves of mixed rank."""
  if not tree:
    return {"w": jnp.ones((size // 64, 64), jnp.float32)}
  return {
    "a": jnp.ones((size // 128, 64), jnp.float32),
    "b": jnp.ones((size // 256, 64), jnp.float32),
    "c": jnp.ones((size // 4 - 64,), jnp.float32),
    "d": jnp.ones((64,), jnp.float32),
  }


def update_workload(impl: str, size: int, tree: bool, repeats: int, kernel: str = "") -> dict:
  params = parameter_tree(size, tree)
  keys = dict(zip(params, jax.random.split(jax.random.key(1), len(params)), strict=True))
  grads = {k: 0.01 * jax.random.normal(keys[k], p.shape) for k, p in params.items()}
  opt = lstm_optimizer(impl)()
  phi = opt.init_meta_params(jax.random.key(0))
  if kernel == "cpu_kernels":
    stack.targets()  # built (or found in the cache) before the timing
  result = {}
  chosen = {"backend": kernel} if kernel and impl == "library" else {}
  lstm = learned_opt.as_optax(opt, phi, **chosen)
  for name, tx in (("lstm", lstm), ("adam", optax.adam(1e-3))):
    step = lambda state, g, tx=tx: tx.update(g, state)[::-1]  # (state, updates)
    seconds, compile_s, cpu_s = time_threaded(step, (tx.init(params),), (grads,), repeats, (0,))
    if name == "lstm" and kernel == "cpu_kernels":  # cost analysis cannot see inside a kernel
      flops = forward_flops_per_coordinate() * size
    else:
      small = {"w": jnp.ones((FLOPS_ROWS,), jnp.float32)}
      flops = compiled_flops(step, tx.init(small), small) * size / FLOPS_ROWS
    result[name] = {"seconds": seconds, "compile_s": compile_s, "cpu_s": cpu_s, "flops": flops}
  result["lstm"]["hand_flops"] = forward_flops_per_coordinate() * size
  result["lstm_over_adam"] = result["lstm"]["seconds"] / result["adam"]["seconds"]
  return result


def quadratic_meta_step(opt, unroll: int, policy):
  """One meta-step on a batch of quadratics, threading (phi, meta-state, theta, state)."""
  meta_opt = optax.adam(1e-3)

  def loss(problem, theta):
    residual = problem["w"] @ theta - problem["y"]
    return jnp.sum(residual**2)

  def run(phi, problem, theta, state):
    def step(carry, _):
      theta, state = carry
      grad = jax.lax.stop_gradient(jax.grad(loss, argnums=1)(problem, theta))
      updates, state = opt.update(phi, grad, state)
      theta = theta + updates
      return (theta, state), loss(problem, theta)

    if policy is not None:
      step = jax.checkpoint(step, policy=policy)
    (theta, state), losses = jax.lax.scan(step, (theta, state), length=unroll)
    return jnp.sum(losses), (theta, state)

  def meta_loss(phi, problems, theta, state):
    totals, carry = jax.vmap(run, in_axes=(None, 0, 0, 0))(phi, problems, theta, state)
    return jnp.mean(totals), carry

  def meta_step(phi, meta_state, theta, state, problems):
    (value, (theta, state)), grad = jax.value_and_grad(meta_loss, has_aux=True)(
      phi, problems, theta, state
    )
    updates, meta_state = meta_opt.update(grad, meta_state, phi)
    return optax.apply_updates(phi, updates), meta_state, theta, state, value

  return meta_step, meta_opt


def meta_workload(impl: str, num_problems: int, policy: str, repeats: int) -> dict:
  opt = lstm_optimizer(impl)()
  phi = opt.init_meta_params(jax.random.key(0))
  w_key, y_key, theta_key = jax.random.split(jax.random.key(1), 3)
  problems = {
    "w": jax.random.normal(w_key, (num_problems, DIM, DIM)),
    "y": jax.random.normal(y_key, (num_problems, DIM)),
  }
  theta = jax.random.normal(theta_key, (num_problems, DIM))
  meta_step, meta_opt = quadratic_meta_step(opt, UNROLL, POLICIES[policy])
  state = (phi, meta_opt.init(phi), theta, jax.vmap(lambda t: opt.init_state(phi, t))(theta))
  seconds, compile_s, cpu_s = time_threaded(meta_step, state, (problems,), repeats, (0, 1, 2, 3))
  one_step, _ = quadratic_meta_step(opt, 1, POLICIES[policy])
  flops = compiled_flops(one_step, *state, problems) * UNROLL
  # Forward, plus twice that backward (weights and inputs), per coordinate and optimizee step.
  hand = 3 * forward_flops_per_coordinate() * DIM * num_problems * UNROLL
  steps = num_problems * UNROLL
  return {
    "seconds": seconds,
    "compile_s": compile_s,
    "cpu_s": cpu_s,
    "flops": flops,
    "hand_flops": hand,
    "optimizee_steps_per_s": steps / seconds,
  }


def run_one(name: str) -> dict:
  matmul = peak.matmul_peak()
  if name.startswith("update"):
    fused = name.endswith("_fused")
    base = name.removesuffix("_fused")
    size = {"16k": 16384, "1m": 1048576}[base.removeprefix("update").removesuffix("_tree")]
    kernel = "cpu_kernels" if fused else ""
    result = update_workload(FLAGS.impl, size, base.endswith("_tree"), FLAGS.repeats, kernel)
    parts = [result["lstm"], result["adam"]]
  else:
    result = meta_workload(FLAGS.impl, int(name.removeprefix("meta")), FLAGS.policy, FLAGS.repeats)
    parts = [result]
  for part in parts:
    part["flop_per_s"] = part["flops"] / part["seconds"]
    part["fraction_of_matmul_peak"] = part["flop_per_s"] / matmul
  # ru_maxrss is in KiB on Linux.
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {"matmul_flop_per_s": matmul, "peak_rss_mib": peak_rss, **result}


def runs_to_do() -> list[dict]:
  impls = ["library"] + (["reference"] if FLAGS.reference else [])
  todo = []
  for workload in FLAGS.workloads:
    policies = FLAGS.policies if workload.startswith("meta") else ["none"]
    todo += [
      {"workload": workload, "impl": i, "policy": p, "gates": g}
      for p in policies
      for i in impls
      for g in FLAGS.gates
    ]
  return todo


def summary_line(key: tuple, results: list[dict]) -> str:
  workload, impl, policy, gates = key
  pick = lambda r: r["lstm"] if "lstm" in r else r
  ms = [pick(r)["seconds"] * 1e3 for r in results]
  head = f"{workload:19s} {impl:9s} {policy:16s} {gates:5s} {statistics.median(ms):9.2f} ms"
  spread = f"(rounds {min(ms):.2f}..{max(ms):.2f})"
  fraction = statistics.median(pick(r)["fraction_of_matmul_peak"] for r in results)
  first = results[0]
  cpu_ms = statistics.median(pick(r)["cpu_s"] * 1e3 for r in results)
  tail = (
    f"CPU {cpu_ms:.2f} ms a call, compile {pick(first)['compile_s']:.1f}s, "
    f"{fraction:6.1%} of matmul peak, "
    f"peak RSS {max(r['peak_rss_mib'] for r in results):.0f} MiB"
  )
  if "lstm" in first:
    adam = statistics.median(r["adam"]["seconds"] * 1e3 for r in results)
    extra = f"adam {adam:.3f} ms"
  else:
    extra = f"{statistics.median(r['optimizee_steps_per_s'] for r in results):,.0f} opt-steps/s"
  return f"{head} {spread} {extra}; {tail}"


def main(argv):
  del argv
  if FLAGS.one:
    print(json.dumps(run_one(FLAGS.one)))
    return
  if FLAGS.reference and not os.path.isfile(FLAGS.reference):
    raise ValueError(f"--reference={FLAGS.reference} is not a file; copy an lstm.py there.")
  for gates in FLAGS.gates:
    if gates not in backend_lib.BACKENDS:
      raise ValueError(f"--gates takes {backend_lib.BACKENDS}, got {gates!r}.")
  runs = []
  for round_index in range(FLAGS.rounds):
    for run in runs_to_do():
      command = [sys.executable, "-m", "benchmarks.lstm_update", f"--one={run['workload']}"]
      command += [f"--impl={run['impl']}", f"--policy={run['policy']}"]
      command += [f"--repeats={FLAGS.repeats}"]
      if FLAGS.reference:
        command.append(f"--reference={FLAGS.reference}")
      env = {**os.environ, backend_lib.ENV_VAR: run["gates"]}
      out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
      runs.append({**run, "round": round_index, **json.loads(out.strip().splitlines()[-1])})
      print(f"round {round_index}: {summary_line(tuple(run.values()), [runs[-1]])}", flush=True)
  print(f"\nmedians over {FLAGS.rounds} rounds (jax {jax.__version__}, {jax.devices()[0]}):")
  summary = {}
  for run in runs_to_do():
    key = tuple(run.values())
    results = [r for r in runs if (r["workload"], r["impl"], r["policy"], r["gates"]) == key]
    summary["/".join(key)] = summary_line(key, results)
    print(summary["/".join(key)])
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
      json.dump({"runs": runs, "summary": summary}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
