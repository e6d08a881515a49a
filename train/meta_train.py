r"""Meta-trains a learned optimizer (Andrychowicz et al., 2016, section 3).

Example:
  python -m train.meta_train --task=quadratic --output_dir=runs/quadratic
  MNIST_DIR=data/mnist python -m train.meta_train --task=mnist_mlp --output_dir=runs/mnist
  python -m train.meta_train --task=mnist_mlp --num_problems=4 --output_dir=runs/mnist4

Every field of ``train.config.MetaTrainConfig`` is a flag. Each task has a preset, the paper's
settings sized for 2 CPU cores (the files ``train/configs/TASK.json``; --preset picks another,
a JSON file of your own or none): it replaces the defaults shown below, and flags given on the
command line replace both. Before compiling, the meta-step's memory is estimated and a run that
cannot fit is refused. Running it again with the same --output_dir resumes from the newest
checkpoint there; a non-empty --output_dir that holds no run is refused.
"""

import errno
import sys

import jax
from absl import app, flags

from train import (
  allocator,
  command_line,
  config_flags,
  distributed,
  memory,
  meta_step,
  preemption,
  presets,
  run_dir,
  run_lock,
  saved_config,
  trainer,
)
from train import config as config_lib
from train import run as run_lib

# The files that show a directory is a run (resumed, not refused as someone else's).
RUN_FILES = (
  run_lib.CONFIG_FILE,
  run_lib.CHECKPOINT_DIR,
  run_lib.METRICS_FILE,
  run_lib.BEST_RECORD,
  run_lock.LOCK_FILE,
)
OUTPUT = command_line.OutputDir("output_dir", RUN_FILES, "meta-training run")


def _help_note(field: str) -> str:
  note = presets.help_note(field)
  return note + (" " + config_lib.describe_tasks() if field == "task_kwargs" else "")


def _define_preset_flag(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "preset",
    None,
    "Settings that replace the config's defaults (flags given still win): a preset name, a JSON "
    f"file of settings (e.g. a run's config.json) or {presets.NONE}. Default: the preset named "
    "after --task. " + " ".join(f"{name}: {presets.describe(name)}." for name in presets.names()),
    flag_values=flag_values,
  )


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> config_lib.MetaTrainConfig:
  """The preset's settings under the flags given; validated, or a ValueError naming a flag."""
  given = config_flags.given(config_lib.MetaTrainConfig, flag_values)
  settings = presets.select(flag_values.preset, given.get("task", flag_values.task))
  return config_lib.MetaTrainConfig(**presets.resolve(settings, given))


def _help_sections() -> list[str]:
  described = "\n".join(f"{name}: {presets.DESCRIPTIONS[name]}" for name in presets.names())
  return [
    command_line.tasks_section() + " Their settings: --task_kwargs.",
    f"Presets (--preset; the files train/configs/NAME.json):\n{described}",
    command_line.shipped_section("init_from"),
  ]


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(error: OSError, output_dir: str) -> str:
  return (
    f"Disk full ({error.strerror}) writing to {output_dir}: free space and run the same command "
    "to resume."
  )


def main(config: config_lib.MetaTrainConfig) -> None:
  """The job; a signal, Ctrl-C or a full disk ends it with one line (stderr), not a traceback.

  Exit status: ``preemption.EXIT_STATUS`` (75) after a signal (checkpoint saved),
  ``preemption.INTERRUPTED_STATUS`` (130) for Ctrl-C before the handlers are installed, 1 for a
  full disk. Files stay consistent in every case
  (atomic writes); the same command resumes.
  """
  try:
    with preemption.watch():  # after jax.distributed starts: it replaces JAX's SIGTERM handler
      _meta_train(config)
  except trainer.Preempted as e:
    _exit(str(e), preemption.EXIT_STATUS)
  except KeyboardInterrupt:
    message = "Interrupted (SIGINT) while starting; run the same command to start or resume."
    _exit(message, preemption.INTERRUPTED_STATUS)
  except OSError as e:
    if e.errno not in DISK_FULL:
      raise
    _exit(disk_full_message(e, config.output_dir), 1)


def _exit(line: str, status: int) -> None:
  sys.stdout.flush()
  print(line, file=sys.stderr, flush=True)
  sys.exit(status)


def _check_init_from(config, optimizer) -> None:
  """A fresh run's --init_from must name a saved optimizer of this run's config (a resumed run
  no longer reads it)."""
  if config.init_from and not run_lib.Run(config.output_dir).steps():
    meta_step.saved_start(config, optimizer)


def _meta_train(config: config_lib.MetaTrainConfig) -> None:
  # --num_devices of every process's devices (default all), or all local ones outside ``run``
  mesh = distributed.current_mesh()
  mesh = distributed.global_mesh() if mesh is None else mesh
  try:
    with config_lib.removed_if_start_fails(config.output_dir):  # no empty folder left behind
      run_lib.Run(config.output_dir).check_tree()
      task, optimizer = trainer.build(config)  # Task settings (e.g. no data) fail here, early.
      _check_init_from(config, optimizer)
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
  except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: no data set, no VGG16 weights
    raise app.UsageError(str(e)) from e
  given = flags.FLAGS.preset if "preset" in flags.FLAGS else None
  preset = given or (config.task if config.task in presets.PRESETS else presets.NONE)
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
  except (run_lib.RunDirError, distributed.MeshError) as e:  # before compiling
    raise app.UsageError(str(e) + saved_config.resume_hint(config)) from e
  except trainer.NonFiniteError as e:
    sys.exit(f"Stopped: {e}")
  if not distributed.is_writer():
    return  # process 0 reports
  best = run_dir.best_epoch(progress)
  if best is None or not run_lib.Run(config.output_dir).has_best():
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


COMMAND = command_line.Command(
  main,
  config_lib.MetaTrainConfig,
  doc=__doc__,
  config_from_flags=config_from_flags,
  help_note=_help_note,
  help_sections=_help_sections,
  more_flags=_define_preset_flag,
  distributed=True,
  output=OUTPUT,
)


def run():
  """The command line: ``python -m train.meta_train``, the console script ``learned-opt-train``."""
  allocator.rerun_with_chosen_malloc()  # $LEARNED_OPT_MALLOC=tcmalloc: faster, more memory
  COMMAND.run()


if __name__ == "__main__":
  run()
