r"""Ships the optimizer of a meta-training checkpoint: phi at meta-step N as a saved optimizer.

Example:
  python -m train.export --run_dir=runs/mnist --output=runs/mnist_step600 --step=600
  python -m train.export --run_dir=runs/mnist --output=runs/mnist_latest   # newest checkpoint

The run's best validated optimizer is already saved in its ``--output_dir``; this command is for
any other checkpoint (``OUTPUT_DIR/checkpoints/step_*``). It writes ``--output`` with
``learned_opt.save``, so ``learned_opt.load(OUTPUT)``, ``as_optax`` and ``--checkpoint=OUTPUT``
of ``eval.evaluate`` / ``eval.rank`` take it, and records how it was trained in its metadata as
the trainer does for its best optimizer (the run's config, task, meta-step and epoch, the
validation result when the checkpoint ends a validated epoch) plus ``exported_from``: the run
directory, the step, the checkpoint's path and the SHA-256 of its ``state.msgpack``.
``--metadata='{...}'`` adds fields of your own (notes, held-out results). Without ``--step`` the
newest checkpoint that reads cleanly is used; a corrupt newer one is skipped with a warning, as
resuming does, and the run directory is left as it is. The run's task is built to know the
checkpoint's shapes, so an MNIST or CIFAR-10 run needs its data set (``$MNIST_DIR``,
``$CIFAR10_DIR``) as resuming it would.

An export killed at any moment leaves ``--output`` as it was (no optimizer, or the one
``--overwrite`` was replacing, which loads) or holding the new optimizer; rerunning the same
command then writes exactly what an uninterrupted export does (the temporaries and weights the
killed one left are removed; ``tests/test_fault_injection.py`` checks every kill point).
"""

import json
import math
import os
from typing import Any

import jax
import numpy as np
from absl import app, flags

import learned_opt
from learned_opt import tree_files
from train import checkpoint, command_line, meta_step, run_dir, saved_config, trainer
from train import config as config_lib

STATE_FILE = "state.msgpack"  # a checkpoint's state file (train.checkpoint)


class ExportError(ValueError):
  """The checkpoint cannot be exported as asked; the message names the problem and the fix."""


def _run_config(run: str) -> config_lib.MetaTrainConfig:
  """The config of the run in ``run``, read from its ``config.json``."""
  if not os.path.isdir(run):
    raise ExportError(f"--run_dir={run!r}: no such directory; name a meta-training --output_dir.")
  path = os.path.join(run, run_dir.CONFIG_FILE)
  if not os.path.isfile(path):
    raise ExportError(
      f"--run_dir={run!r} has no {run_dir.CONFIG_FILE}, which is needed to read its checkpoints; "
      "name a meta-training --output_dir."
    )
  try:
    return config_lib.MetaTrainConfig(**saved_config.upgrade(saved_config.read_saved(path)))
  except (ValueError, TypeError) as e:
    raise ExportError(f"{path} is unreadable or invalid ({e}).") from e


def _check_output(run: str, output: str, overwrite: bool) -> None:
  """Refuses an output that is the run itself, a file, or (without ``overwrite``) not empty."""
  if not output:
    raise ExportError("--output is required: the directory to save the optimizer in.")
  if os.path.realpath(output) == os.path.realpath(run):
    raise ExportError(
      f"--output={output!r} is the run directory, whose optimizer is the run's best validated one "
      "(training rewrites it); name another directory."
    )
  if os.path.lexists(output) and not os.path.isdir(output):
    raise ExportError(f"--output={output!r} exists and is not a directory; name a directory.")
  if os.path.isdir(output) and set(os.listdir(output)) - set(_leftovers(output)) and not overwrite:
    raise ExportError(
      f"--output={output!r} already exists and is not empty; choose a new directory or pass "
      "--overwrite (a saved optimizer there is then replaced atomically)."
    )


def _leftovers(output: str) -> list[str]:
  """What an export killed before its record was written leaves in ``output`` (temporaries and
  weights no record names): a rerun of the same command removes them and carries on."""
  temporaries = [n for n in os.listdir(output) if n.startswith(tree_files.TMP_PREFIX)]
  return temporaries + learned_opt.serialization.stray_weights(output)


def _clear_leftovers(output: str) -> None:
  """Removes ``_leftovers``, so a rerun after a kill writes exactly what one export does."""
  if not os.path.isdir(output):
    return
  tree_files.remove_temporaries(output)
  for name in learned_opt.serialization.stray_weights(output):
    os.remove(os.path.join(output, name))


def _restore(config, ckpt_dir: str, step: int | None, log) -> tuple[int, Any, run_dir.Progress]:
  """``(step, state, progress)`` of checkpoint ``step``, or of the newest usable one."""
  available = checkpoint.all_steps(ckpt_dir)
  if not available:
    raise ExportError(
      f"No checkpoints in {ckpt_dir} (no step_* directories); name a meta-training run that "
      "has saved one (every --checkpoint_every meta-steps and every epoch)."
    )
  task, optimizer = trainer.build(config)
  template = jax.eval_shape(lambda: meta_step.init_state(config, task, optimizer))
  check_host = lambda host: run_dir.progress_from_host(host, config)
  if step is None:
    try:
      found = checkpoint.latest(ckpt_dir, template, meta_step.upgrade_checkpoint, check_host)
    except checkpoint.NewerFormatError as e:
      raise ExportError(str(e)) from e
    for skipped, reason in found.unusable:
      log(f"Skipping unusable checkpoint {checkpoint.path_of(ckpt_dir, skipped)}: {reason}")
    if found.step is None:
      raise ExportError(
        f"{ckpt_dir} holds checkpoints but none is usable: "
        + "; ".join(reason for _, reason in found.unusable)
      )
    return found.step, found.state, check_host(found.host)
  if step not in available:
    raise ExportError(
      f"--step={step}: no checkpoint of that meta-step in {ckpt_dir}; available steps: "
      f"{', '.join(map(str, available))}."
    )
  try:
    state, host = checkpoint.restore(
      checkpoint.path_of(ckpt_dir, step), template, meta_step.upgrade_checkpoint
    )
    return step, state, check_host(host)
  except ValueError as e:
    others = [s for s in available if s != step]
    hint = f" Other steps: {', '.join(map(str, others))}." if others else ""
    raise ExportError(f"Checkpoint of meta-step {step} is unusable: {e}.{hint}") from e


def _check_finite(meta_params, path: str) -> None:
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(meta_params):
    if not np.all(np.isfinite(np.asarray(leaf))):
      raise ExportError(
        f"{path} holds non-finite phi (leaf {jax.tree_util.keystr(key_path)}); refusing to "
        "export it. Export an earlier step."
      )


_RECORD_FIELDS = (
  "epoch",
  "step",
  "valid_final_loss",
  "valid_diverged",
  "best_valid_so_far",
  "task",
  "run_config",
  "exported_from",
)


def _check_extra(extra) -> None:
  if not isinstance(extra, dict):
    raise ExportError(
      f'--metadata must be a JSON object, e.g. \'{{"notes": "..."}}\'; got {extra!r}.'
    )
  taken = sorted(set(extra) & set(_RECORD_FIELDS))
  if taken:
    raise ExportError(
      f"--metadata may not replace the training record's fields {', '.join(taken)}; name your "
      "fields otherwise."
    )
  try:
    json.dumps(extra, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ExportError(f"--metadata is not plain JSON ({e}).") from e


def training_record(config, step: int, progress: run_dir.Progress) -> dict:
  """The metadata the trainer saves with its best optimizer, for phi at meta-step ``step``.

  The validation result is recorded only when ``step`` ends an epoch that was validated (phi is
  then the one that epoch validated); otherwise ``valid_final_loss`` is None.
  ``best_valid_so_far`` is the run's best validation result up to ``step`` (None before any).
  """
  epoch = step // config.steps_per_epoch
  validated = step % config.steps_per_epoch == 0 and len(progress.valid_history) == epoch > 0
  return {
    "epoch": epoch,
    "step": step,
    "valid_final_loss": progress.valid_history[-1] if validated else None,
    "valid_diverged": progress.diverged_history[-1] if validated else None,
    "best_valid_so_far": progress.best_valid if math.isfinite(progress.best_valid) else None,
    "task": config.task,
    "run_config": json.loads(config.to_json()),
  }


def export(
  run: str,
  output: str,
  step: int | None = None,
  overwrite: bool = False,
  extra: dict | None = None,
  log=print,
) -> dict:
  """Saves phi of checkpoint ``step`` of the run in ``run`` to ``output`` (``learned_opt.save``).

  Args:
    run: a meta-training run's ``--output_dir``.
    output: the directory to create; an existing non-empty one only with ``overwrite`` (one
      holding only what a killed export left counts as empty).
    step: the meta-step of the checkpoint; None: the newest usable one.
    extra: more metadata fields (JSON values); they may not replace the training record's.

  Returns:
    The metadata saved with the optimizer.

  Raises:
    ExportError: naming the problem (no checkpoints, no checkpoint at ``step`` with the
      available steps, an output in the way, non-finite phi, an unreadable run). Nothing is
      written then.
  """
  config = _run_config(run)
  _check_output(run, output, overwrite)
  _check_extra(extra or {})
  ckpt_dir = os.path.join(run, run_dir.CHECKPOINT_DIR)
  step, state, progress = _restore(config, ckpt_dir, step, log)
  path = checkpoint.path_of(ckpt_dir, step)
  _check_finite(state.meta_params, path)
  # restore checked it against meta.json
  digest = tree_files.sha256(tree_files.read_regular(os.path.join(path, STATE_FILE)))
  metadata = training_record(config, step, progress)
  metadata["exported_from"] = {
    "run_dir": os.path.abspath(run),
    "step": step,
    "checkpoint": os.path.abspath(path),
    "state_sha256": digest,
  }
  metadata.update(extra or {})
  optimizer = learned_opt.build(config.optimizer_config())
  _clear_leftovers(output)  # of an earlier export of this output that was killed
  learned_opt.save(output, optimizer, state.meta_params, metadata=metadata)
  return metadata


FLAGS = flags.FLAGS


def define_flags():
  """Flags of the command; defined only when run as one, so importing this module is free."""
  flags.DEFINE_string("run_dir", None, "The meta-training run (its --output_dir) to export from.")
  flags.DEFINE_string("output", None, "Directory to save the optimizer in (learned_opt.save).")
  flags.DEFINE_integer("step", None, "Meta-step of the checkpoint; default: the newest usable.")
  flags.DEFINE_bool("overwrite", False, "Replace a saved optimizer already at --output.")
  flags.DEFINE_string(
    "metadata", None, "JSON object of more metadata fields (notes, held-out results, ...)."
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.run_dir:
    raise app.UsageError("--run_dir is required: a meta-training run's --output_dir.")
  try:
    try:
      extra = json.loads(FLAGS.metadata) if FLAGS.metadata else None
    except json.JSONDecodeError as e:
      raise ExportError(f"--metadata is not valid JSON ({e}).") from e
    metadata = export(FLAGS.run_dir, FLAGS.output, FLAGS.step, FLAGS.overwrite, extra)
  except (ValueError, TypeError, OSError) as e:  # ExportError, a task without its data, ...
    raise app.UsageError(str(e)) from e
  valid = metadata["valid_final_loss"]
  note = f", validation final loss {valid:.4g}" if valid is not None else ", not validated"
  print(
    f"Exported meta-step {metadata['step']} of {FLAGS.run_dir}{note}, to {FLAGS.output}; "
    f"load it with learned_opt.load({FLAGS.output!r}) or --checkpoint={FLAGS.output}."
  )


def run():
  """The command line, ``python -m train.export``."""
  define_flags()
  jax.config.parse_flags_with_absl()
  command_line.run(main)


if __name__ == "__main__":
  run()
