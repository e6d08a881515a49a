r"""Meta-steps per second against the number of devices of the mesh (run by hand, not a test).

  python -m benchmarks.scaling [--devices=1,2,4,8] [--processes=1] [--num_problems=128]
      [--repeats=10] [--json=runs/scaling.json]

For each device count, in subprocesses of its own: the trainer's meta-step on 10-d quadratics
(the paper's 2x20 LSTM, unroll 20) with ``--num_problems`` problems split over a mesh of that
many devices (``train.meta_step.jit_train_step``, as ``train.trainer`` runs it), the state
donated and threaded from call to call; the median wall time of ``--repeats`` calls after
compile, and the problems each device holds. ``--processes=2`` runs each count as two processes
joined by ``jax.distributed`` on 127.0.0.1 (each with half the devices).

On a CPU the devices are faked (``--xla_force_host_platform_device_count``) and share the same
cores, so this is a correctness run of the sharded program and its overhead, not a measure of
speed-up; on accelerators each device is real and the problems per device set the work per step.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts of the mesh, one run each.")
flags.DEFINE_integer("processes", 1, "Processes per run (2: joined by jax.distributed locally).")
flags.DEFINE_integer("num_problems", 128, "Problems per meta-step (split over the devices).")
flags.DEFINE_integer("repeats", 10, "Timed meta-steps after the first.")
flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
flags.DEFINE_string("one", None, "Internal: 'DEVICES,PROCESSES,PROCESS_ID,COORDINATOR'.")
FLAGS = flags.FLAGS


def measure(num_problems: int, repeats: int, count: int) -> dict:
  """Times the meta-step on ``count`` devices (one process) or every device of every process."""
  import jax  # noqa: PLC0415 (after jax.distributed started)

  from train import distributed, meta_step, trainer  # noqa: PLC0415
  from train.config import MetaTrainConfig  # noqa: PLC0415

  config = MetaTrainConfig(output_dir="unused", num_problems=num_problems)
  task, optimizer = trainer.build(config)
  mesh = distributed.global_mesh(jax.devices()[:count] if jax.process_count() == 1 else None)
  distributed.check_divides(num_problems, mesh, "num_problems")
  if mesh.devices.size == 1 and jax.process_count() == 1:  # the trainer's one-device path
    mesh, data = None, task.data
    state = meta_step.init_state(config, task, optimizer)
  else:
    data = distributed.put(task.data, distributed.replicated(mesh))
    state = meta_step.init_sharded_state(config, task, optimizer, data, mesh)
  step = meta_step.jit_train_step(config, task, optimizer, mesh, state)
  tic = time.perf_counter()
  state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - tic
  times = []
  for _ in range(repeats):
    tic = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - tic)
  seconds = statistics.median(times)
  devices = mesh.devices.size if mesh is not None else 1
  return {
    "devices": devices,
    "processes": jax.process_count(),
    "platform": jax.devices()[0].platform,
    "problems_per_device": num_problems // devices,
    "seconds_per_meta_step": seconds,
    "meta_steps_per_s": 1 / seconds,
    "first_call_s": first,
    "finite": bool(metrics.finite),
  }


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_count(devices: int, processes: int) -> dict:
  """One device count, in ``processes`` fresh subprocesses; process 0's result."""
  if devices % processes:
    raise app.UsageError(f"--devices={devices} does not split over --processes={processes}.")
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // processes}",
  }
  if os.environ.get("JAX_PLATFORMS", "cpu") != "cpu":
    env.pop("XLA_FLAGS")  # real devices: nothing to fake
  address = f"127.0.0.1:{free_port()}"
  children = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "benchmarks.scaling",
        f"--one={devices},{processes},{i},{address}",
        f"--num_problems={FLAGS.num_problems}",
        f"--repeats={FLAGS.repeats}",
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(processes)
  ]
  outputs = [child.communicate(timeout=1200) for child in children]
  if any(child.returncode for child in children):
    raise RuntimeError(f"{devices} devices failed:\n" + outputs[0][1][-3000:])
  return json.loads(outputs[0][0].strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.one:
    count, processes, process_id, address = FLAGS.one.split(",")
    if int(processes) > 1:
      import jax  # noqa: PLC0415

      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(address, int(processes), int(process_id))
    print(json.dumps(measure(FLAGS.num_problems, FLAGS.repeats, int(count))))
    return
  results = []
  print(
    f"{'devices':>8}{'processes':>10}{'problems/device':>16}{'meta-steps/s':>14}{'ms/step':>10}"
  )
  for count in map(int, FLAGS.devices):
    r = run_count(count, FLAGS.processes)
    results.append(r)
    print(
      f"{r['devices']:>8}{r['processes']:>10}{r['problems_per_device']:>16}"
      f"{r['meta_steps_per_s']:>14.2f}{1e3 * r['seconds_per_meta_step']:>10.1f}",
      flush=True,
    )
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
      json.dump({"num_problems": FLAGS.num_problems, "results": results}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
