r"""Meta-trains a learned optimizer (Andrychowicz et al., 2016, section 3).

Example:
  python -m train.meta_train --task=quadratic --output_dir=runs/quadratic
  MNIST_DIR=data/mnist python -m train.meta_train --task=mnist_mlp --output_dir=runs/mnist
  python -m train.meta_train --task=mnist_mlp --num_problems=4 --output_dir=runs/mnist4

Every field of ``train.config.MetaTrainConfig`` is a flag. Each task has a preset, the paper's
settings sized for 2 CPU cores (``train.presets``; --preset picks another, a JSON file or none):
it replaces the defaults shown below, and flags given on the command line replace both. Before
compiling, the meta-step's memory is estimated and a run that cannot fit is refused. Running it
again with the same --output_dir resumes from the newest checkpoint there.
"""

import dataclasses
import errno
import json
import os
import sys

import jax
from absl import app, flags

from learned_opt import serialization
from train import (
  allocator,
  command_line,
  distributed,
  memory,
  preemption,
  presets,
  run_dir,
  saved_config,
  trainer,
)
from train import config as config_lib

_FIELDS = {field.name: field for field in dataclasses.fields(config_lib.MetaTrainConfig)}
_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}


def _define(field: dataclasses.Field) -> None:
  """One flag per config field, so flags and config cannot drift apart."""
  help_text = field.metadata["help"] + presets.help_note(field.name)
  if field.name == "task_kwargs":
    help_text += " " + config_lib.describe_tasks()
  if field.type is dict:  # JSON objects: task_kwargs, optimizer_kwargs
    flags.DEFINE_string(field.name, json.dumps(field.default_factory()), help_text)
  elif field.type is bool:
    flags.DEFINE_bool(field.name, field.default, help_text)
  else:
    _DEFINE[field.type](field.name, field.default, help_text)


for _field in _FIELDS.values():
  _define(_field)

distributed.define_flags()  # multi-process start-up (--coordinator_address, ...), --num_devices
flags.DEFINE_string(
  "preset",
  None,
  "Settings that replace the defaults below (flags given still win): a preset name, a JSON file "
  f"of settings (e.g. a run's config.json) or {presets.NONE}. Default: the preset named after "
  "--task. " + " ".join(f"{name}: {presets.describe(name)}." for name in presets.names()),
)
FLAGS = flags.FLAGS


def _json_object(name: str) -> dict:
  try:
    value = json.loads(FLAGS[name].value)
  except json.JSONDecodeError as e:
    raise ValueError(f"--{name} is not valid JSON ({e}); e.g. --{name}='{{\"dim\": 10}}'.") from e
  if not isinstance(value, dict):
    raise ValueError(f"--{name} must be a JSON object, e.g. --{name}='{{\"dim\": 10}}'.")
  return value


def config_from_flags() -> config_lib.MetaTrainConfig:
  """The preset's settings under the flags given; validated, or a ValueError naming a flag."""
  given = {
    name: _json_object(name) if field.type is dict else FLAGS[name].value
    for name, field in _FIELDS.items()
    if FLAGS[name].present
  }
  settings = presets.select(FLAGS.preset, given.get("task", FLAGS.task))
  return config_lib.MetaTrainConfig(**presets.resolve(settings, given))


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(error: OSError, output_dir: str) -> str:
  return (
    f"Disk full ({error.strerror}) writing to {output_dir}: free space and run the same command "
    "to resume."
  )


def main(argv):
  """The job; a signal, Ctrl-C or a full disk ends it with one line (stderr), not a traceback.

  Exit status: ``preemption.EXIT_STATUS`` (75) after a signal (checkpoint saved),
  ``preemption.INTERRUPTED_STATUS`` (130) for Ctrl-C before the handlers are installed, 1 for a
  full disk. Files stay consistent in every case
  (atomic writes); the same command resumes.
  """
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    try:
      distributed.initialize_from_flags()  # before any JAX computation
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    with preemption.watch():  # after initialize: it replaces JAX's SIGTERM handler
      _meta_train()
  except trainer.Preempted as e:
    _exit(str(e), preemption.EXIT_STATUS)
  except KeyboardInterrupt:
    message = "Interrupted (SIGINT) while starting; run the same command to start or resume."
    _exit(message, preemption.INTERRUPTED_STATUS)
  except OSError as e:
    if e.errno not in DISK_FULL:
      raise
    _exit(disk_full_message(e, FLAGS.output_dir), 1)


def _exit(line: str, status: int) -> None:
  sys.stdout.flush()
  print(line, file=sys.stderr, flush=True)
  sys.exit(status)


def _meta_train():
  try:
    mesh = distributed.mesh_from_flags()  # --num_devices of every process's devices; default all
    config = config_from_flags()
    with config_lib.removed_if_start_fails(config.output_dir):  # no empty folder left behind
      run_dir.check_output_tree(config)
      task, optimizer = trainer.build(config)  # Task settings (e.g. no data) fail here, early.
      accelerators = mesh.devices.size if jax.devices()[0].platform != "cpu" else 1
      available = memory.available_bytes()  # one reading for both refusals below
      size = mesh.devices.size  # a --num_problems suggested must divide over it
      estimate = memory.check(config, task, optimizer, available, accelerators, multiple=size)
      counts = {"num_problems": config.num_problems, "valid_problems": config.valid_problems}
      fits = memory.problems_fit(estimate, config.num_problems, available, accelerators == 1)
      for flag, count in counts.items():  # suggesting no --num_problems the memory check refuses
        limit = fits if flag == "num_problems" else None
        distributed.check_divides(count, mesh, flag, counts, limit)
  except distributed.MeshError as e:
    raise app.UsageError(str(e) + saved_config.resume_hint(config)) from e
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  preset = FLAGS.preset or (config.task if config.task in presets.PRESETS else presets.NONE)
  # Everything the job reports goes to stdout, progress included; process 0 reports.
  if distributed.is_writer():
    print(
      f"Config (preset {preset}, flags given override it; saved as config.json):\n"
      f"{config.to_json()}\nMeta-step: {config.num_problems} problems x {config.unroll} steps, "
      f"about {memory.in_words(estimate.total_bytes)}.",
      flush=True,
    )
  try:
    with distributed.use_mesh(mesh):
      _, progress = trainer.train(config, log=lambda s: print(s, flush=True))
  except (run_dir.RunDirError, distributed.MeshError) as e:  # before compiling
    raise app.UsageError(str(e) + saved_config.resume_hint(config)) from e
  except trainer.NonFiniteError as e:
    sys.exit(f"Stopped: {e}")
  if not distributed.is_writer():
    return  # process 0 reports
  record = os.path.join(config.output_dir, serialization.RECORD_FILE)
  best = run_dir.best_epoch(progress)
  if best is None or not os.path.exists(record):
    diverged = progress.diverged_history[-1] if progress.diverged_history else None
    sys.exit(
      f"No optimizer saved in {config.output_dir}: no epoch had a validation problem that did "
      f"not diverge (last epoch: {diverged} of {config.valid_problems} diverged). Lower "
      "--meta_lr or the optimizer's output_scale, or check the task."
    )
  diverged = progress.diverged_history[best]
  note = (
    f" ({diverged} of {config.valid_problems} validation problems diverged)" if diverged else ""
  )
  print(
    f"Best validation final loss {progress.best_valid:.4g}{note} at epoch {best + 1}; optimizer "
    f"saved in {config.output_dir}"
  )


def run():
  """The console script's entry point (``learned-opt-train``)."""
  allocator.rerun_with_chosen_malloc()  # $LEARNED_OPT_MALLOC=tcmalloc: faster, more memory
  jax.config.parse_flags_with_absl()
  command_line.run(main)


if __name__ == "__main__":
  run()
