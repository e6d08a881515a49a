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
resuming does, and the run directory is left as it is. Only phi is read (``train.run.Run``), with
the optimizer built from the run's ``config.json``: the task and its data set are never loaded.

An export killed at any moment leaves ``--output`` as it was (no optimizer, or the one
``--overwrite`` was replacing, which loads) or holding the new optimizer; rerunning the same
command then writes exactly what an uninterrupted export does (the temporaries and weights the
killed one left are removed; ``tests/test_fault_injection.py`` checks every kill point).
"""

import dataclasses
import json
import math
import os

import jax
import numpy as np

import learned_opt
from learned_opt import tree_files
from train import command_line, config_flags, run_dir
from train.config import MetaTrainConfig
from train.run import CONFIG_FILE, Run, RunDirError, Snapshot


class ExportError(ValueError):
  """The checkpoint cannot be exported as asked; the message names the problem and the fix."""


def _open(run: str) -> tuple[Run, MetaTrainConfig]:
  """The run in ``run`` and its config, read from its ``config.json``."""
  if not os.path.isdir(run):
    raise ExportError(f"--run_dir={run!r}: no such directory; name a meta-training --output_dir.")
  opened = Run(run)
  if not opened.has_config():
    raise ExportError(
      f"--run_dir={run!r} has no {CONFIG_FILE}, which is needed to read its checkpoints; "
      "name a meta-training --output_dir."
    )
  try:
    return opened, opened.config()
  except RunDirError as e:
    raise ExportError(str(e)) from e


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


def _restore(run: Run, config, step: int | None, log) -> tuple[Snapshot, run_dir.Progress]:
  """phi and progress of checkpoint ``step``, or of the newest usable one (no task is built)."""
  check_host = lambda host: run_dir.progress_from_host(host, config)
  try:
    found = run.meta_params("latest" if step is None else step, check_host, log)
  except RunDirError as e:
    missing = step is not None and step not in run.steps()
    raise ExportError(f"--step={step}: {e}" if missing else str(e)) from e
  except ValueError as e:  # the checkpoint of ``step`` is there but does not read
    others = [s for s in run.steps() if s != step]
    hint = f" Other steps: {', '.join(map(str, others))}." if others else ""
    raise ExportError(f"Checkpoint of meta-step {step} is unusable: {e}.{hint}") from e
  return found, check_host(found.host)


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
  opened, config = _open(run)
  _check_output(run, output, overwrite)
  _check_extra(extra or {})
  found, progress = _restore(opened, config, step, log)
  _check_finite(found.saved.meta_params, found.source)
  metadata = training_record(config, found.step, progress)
  metadata["exported_from"] = {
    "run_dir": os.path.abspath(run),
    "step": found.step,
    "checkpoint": os.path.abspath(found.source),
    "state_sha256": opened.state_sha256(found.step),  # checked as phi was read
  }
  metadata.update(extra or {})
  _clear_leftovers(output)  # of an earlier export of this output that was killed
  learned_opt.save(output, *found.saved, metadata=metadata)
  return metadata


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """What ``train.export`` exports and where; each field is one flag of the command."""

  run_dir: str = config_flags.setting(
    "", "Required. The meta-training run (its --output_dir) to export from."
  )
  output: str = config_flags.setting(
    "", "Required. Directory to save the optimizer in (learned_opt.save)."
  )
  step: int | None = config_flags.setting(
    None, "Meta-step of the checkpoint; default: the newest usable."
  )
  overwrite: bool = config_flags.setting(False, "Replace a saved optimizer already at --output.")
  metadata: dict = config_flags.setting(
    {},
    "JSON object of more metadata fields (notes, held-out results, ...).",
    example='{"notes": "..."}',
  )

  def __post_init__(self):
    config_flags.check_types(self)
    if not self.run_dir:
      raise ValueError("--run_dir is required: a meta-training run's --output_dir.")
    if not self.output:
      raise ValueError("--output is required: the directory to save the optimizer in.")
    if self.step is not None and self.step < 0:
      raise ValueError(f"--step={self.step} is not a meta-step; give one >= 0, or leave it out.")
    _check_extra(self.metadata)


def main(config: ExportConfig) -> None:
  try:
    metadata = export(
      config.run_dir, config.output, config.step, config.overwrite, config.metadata or None
    )
  except (ValueError, TypeError, OSError) as e:  # ExportError, an unreadable run, ...
    raise command_line.UsageError(str(e)) from e
  valid = metadata["valid_final_loss"]
  note = f", validation final loss {valid:.4g}" if valid is not None else ", not validated"
  print(
    f"Exported meta-step {metadata['step']} of {config.run_dir}{note}, to {config.output}; "
    f"load it with learned_opt.load({config.output!r}) or --checkpoint={config.output}."
  )


COMMAND = command_line.Command(main, ExportConfig, doc=__doc__)


def run():
  """The command line: ``python -m train.export``, the console script ``learned-opt-export``."""
  COMMAND.run()


if __name__ == "__main__":
  run()
