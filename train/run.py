"""A meta-training run's directory, read and written through one object: ``Run(path)``.

The layout (``Run`` alone knows it)::

  OUTPUT_DIR/
    config.json               the run's MetaTrainConfig (train.saved_config reads older ones)
    metrics.jsonl             one JSON record a line: progress, skipped steps, epochs' validation
    checkpoints/step_N/       the whole training state at meta-step N (train.checkpoint)
    optimizer.json, meta_params-*.msgpack   the best validated optimizer (learned_opt.save)
    .lock                     held by the one writer while it runs (train.run_lock)

Every write is atomic (a kill at any moment leaves old or new files, never a half), so a killed
run resumes to the files of an uninterrupted one (``train.run_dir``; ``tests/fs_faults.py``).

phi is read without the task: ``meta_params`` builds only the optimizer (from the saved config)
and restores the ``meta_params`` field of a checkpoint's state, so a run on MNIST or CIFAR-10
needs no data set to rank or export its checkpoints. It reads run directories of every
checkpoint format this library wrote.

Example:
  >>> run = Run("runs/mnist")
  >>> run.steps()                      # [200, 400, 600]
  >>> snap = run.meta_params("latest")  # or a step, or "best"
  >>> tx = learned_opt.as_optax(snap.saved)
"""

import logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

import learned_opt
from learned_opt import tree_files
from train import checkpoint, saved_config
from train.config import MetaTrainConfig, check_output_dir
from train.metrics_log import MetricsLog

CONFIG_FILE = saved_config.CONFIG_FILE
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
BEST_RECORD = learned_opt.serialization.RECORD_FILE  # the best optimizer's record
WALL_FILE = "wall_seconds.txt"  # a run's wall time, where its launcher records it
LOCK_FILE = ".lock"  # present while a writer holds the run (or after one was killed)
FILES = (CONFIG_FILE, CHECKPOINT_DIR, METRICS_FILE, BEST_RECORD, LOCK_FILE)  # what marks a run
_BEST_ATTEMPTS = 20  # reads of a live run's best optimizer before giving up (see ``best``)


class RunDirError(ValueError):
  """The run directory cannot be used as asked (a refused resume, a broken file tree)."""


class Snapshot(NamedTuple):
  """phi at one point of a run, read without building the run's task."""

  saved: learned_opt.SavedOptimizer  # the optimizer (from config.json) and phi
  step: int | None  # meta-steps of training behind phi; None where unrecorded
  source: str  # the checkpoint directory, or the run directory for the best optimizer
  host: dict  # the checkpoint's host record (``train.run_dir.Progress``); {} for the best


class Run:
  """The one reader and writer of a meta-training run's directory.

  Args:
    path: the run's ``--output_dir``; it need not exist until something is written.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.metrics = MetricsLog(os.path.join(self.path, METRICS_FILE))

  def __repr__(self) -> str:
    return f"Run({self.path!r})"

  # Layout.

  @property
  def config_path(self) -> str:
    return os.path.join(self.path, CONFIG_FILE)

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.path, CHECKPOINT_DIR)

  def checkpoint_path(self, step: int) -> str:
    return checkpoint.path_of(self.checkpoint_dir, step)

  # config.json.

  def has_config(self) -> bool:
    return os.path.isfile(self.config_path)

  def saved_config(self) -> dict[str, Any]:
    """``config.json`` in today's fields (``saved_config.upgrade``), not validated.

    Raises:
      RunDirError: naming the file and the fix if it is missing or unreadable.
    """
    try:
      return saved_config.upgrade(saved_config.read_saved(self.config_path))
    except FileNotFoundError as e:
      raise RunDirError(
        f"{self.path} has no {CONFIG_FILE}; name a meta-training run's --output_dir."
      ) from e
    except (OSError, ValueError) as e:
      raise RunDirError(
        f"{self.config_path} is unreadable ({e}); restore it or choose a new --output_dir."
      ) from e

  def config(self) -> MetaTrainConfig:
    """The run's validated config; ``RunDirError`` if ``config.json`` is missing or invalid."""
    saved = self.saved_config()
    try:
      return MetaTrainConfig(**saved)
    except (TypeError, ValueError) as e:
      raise RunDirError(
        f"{self.config_path} is not a valid run config ({e}); a newer learned-opt may have "
        "written it: upgrade, or restore the file."
      ) from e

  def write_config(self, config: MetaTrainConfig) -> None:
    tree_files.atomic_write(self.config_path, config.to_json().encode())

  def optimizer(self, backend: str | None = None) -> learned_opt.LearnedOptimizer:
    """The optimizer the run trains, built from ``config.json`` alone (never the task).

    ``backend``: where a reader runs it (None: ``learned_opt.backend``'s default, ``auto``), not
    the run's recorded ``backend``, which says where it trained: the math is the same.
    """
    return learned_opt.build(self.config().optimizer_config(), backend=backend)

  # Checkpoints (train.checkpoint's format).

  def steps(self) -> list[int]:
    """Meta-steps of the checkpoints present, oldest first (readable or not)."""
    return checkpoint.all_steps(self.checkpoint_dir)

  def save_checkpoint(self, step: int, state: Any, host: dict, keep: int) -> str:
    """Writes checkpoint ``step`` atomically and prunes to the newest ``keep``; its path."""
    return checkpoint.save(self.checkpoint_dir, step, state, host, keep)

  def restore(self, step: int, template: Any, upgrade=None) -> tuple[Any, dict]:
    """``(state, host)`` of checkpoint ``step`` in ``template``'s structure (``ValueError``)."""
    return checkpoint.restore(self.checkpoint_path(step), template, upgrade)

  def latest(self, template: Any, upgrade=None, check_host=None) -> checkpoint.Latest:
    """The newest checkpoint that reads cleanly into ``template`` (and passes ``check_host``)."""
    return checkpoint.latest(self.checkpoint_dir, template, upgrade, check_host)

  def state_sha256(self, step: int) -> str:
    """The SHA-256 of checkpoint ``step``'s state file, as its checked record holds it."""
    return checkpoint.read_meta(self.checkpoint_path(step))["state_sha256"]

  def remove_checkpoint(self, step: int) -> None:
    checkpoint.remove(self.checkpoint_dir, step)

  def prune(self, keep: int) -> None:
    checkpoint.prune(self.checkpoint_dir, keep)

  # phi, without the task.

  def meta_params(
    self,
    which: int | str = "latest",
    check_host: Callable[[dict], Any] | None = None,
    log: Callable[[str], None] = logging.warning,
  ) -> Snapshot:
    """phi of checkpoint ``which`` (a meta-step), of the newest readable one (``"latest"``), or
    of the best validated optimizer (``"best"``), built from ``config.json`` alone.

    Args:
      which: a meta-step, ``"latest"`` or ``"best"``.
      check_host: raises ``ValueError`` for a checkpoint host record the caller cannot use.
      log: told of each newer checkpoint ``"latest"`` skips as unusable.

    Raises:
      RunDirError: naming the problem and the fix (no such checkpoint, with the steps there; no
        usable one; no config.json; no saved best optimizer).
      ValueError: naming the file, if checkpoint ``which`` (a step) does not read: corrupt,
        altered, from a newer library, or phi shaped for another optimizer config.
    """
    if which == "best":
      saved, step = self.best()
      return Snapshot(saved, step, self.path, {})
    steps = self.steps()
    if not steps:
      raise RunDirError(
        f"No checkpoints in {self.checkpoint_dir} (no step_* directories); name a meta-training "
        "run that has saved one (every --checkpoint_every meta-steps and every epoch)."
      )
    if not self.has_config():
      raise RunDirError(
        f"{self.path} has checkpoints but no {CONFIG_FILE}, which is needed to read them; "
        "restore it, or use the run's saved best optimizer alone."
      )
    optimizer = self.optimizer()
    template = jax.eval_shape(optimizer.init_meta_params, jax.random.key(0))
    if which != "latest":
      if which not in steps:
        raise RunDirError(
          f"No checkpoint of meta-step {which} in {self.checkpoint_dir}; available steps: "
          f"{', '.join(map(str, steps))}."
        )
      return self._snapshot(optimizer, which, template, check_host)
    unusable = []
    for step in reversed(steps):
      try:
        return self._snapshot(optimizer, step, template, check_host)
      except checkpoint.NewerFormatError as e:
        raise RunDirError(str(e)) from e
      except ValueError as e:
        log(f"Skipping unusable checkpoint {self.checkpoint_path(step)}: {e}")
        unusable.append(str(e))
    raise RunDirError(
      f"{self.checkpoint_dir} holds checkpoints but none is usable: " + "; ".join(unusable)
    )

  def _snapshot(self, optimizer, step, template, check_host) -> Snapshot:
    path = self.checkpoint_path(step)
    fits = f"optimizer config {dict(optimizer.config)} of {CONFIG_FILE}"
    phi, host = checkpoint.restore_field(path, "meta_params", template, fits)
    if check_host is not None:
      check_host(host)
    return Snapshot(learned_opt.SavedOptimizer(optimizer, phi), step, path, host)

  # The best validated optimizer (learned_opt's saved-optimizer format).

  def has_best(self) -> bool:
    return os.path.isfile(os.path.join(self.path, BEST_RECORD))

  def save_best(self, optimizer, meta_params, metadata: dict) -> None:
    learned_opt.save(self.path, optimizer, meta_params, metadata=metadata)

  def best(self) -> tuple[learned_opt.SavedOptimizer, int | None]:
    """The best optimizer saved and the meta-step its metadata names, of one save.

    A live run may save between reading the weights and the metadata; the metadata read before
    and after the load agree only if no save came in between (each names a later step).

    Raises:
      RunDirError: if none is saved, or saves kept coming while reading it.
    """
    if not self.has_best():
      raise RunDirError(
        f"No best optimizer saved in {self.path} (no {BEST_RECORD}): no epoch has been "
        "validated yet; read a checkpoint instead (a meta-step or 'latest')."
      )
    for _ in range(_BEST_ATTEMPTS):
      before = learned_opt.load_metadata(self.path)
      saved = learned_opt.load(self.path)
      if learned_opt.load_metadata(self.path) == before:
        return saved, before.get("step")
    raise RunDirError(f"{self.path} was saved to {_BEST_ATTEMPTS} times while reading it; retry.")

  def best_metadata(self) -> dict:
    """What the trainer recorded with its best optimizer ({} if none is saved)."""
    return learned_opt.load_metadata(self.path) if self.has_best() else {}

  # metrics.jsonl: ``self.metrics`` (``train.metrics_log.MetricsLog``).

  def validations(self) -> list[tuple[int, float]]:
    """``(meta-step, mean final validation loss)`` after each epoch so far (NaN where it
    diverged), from ``metrics.jsonl``."""
    return _validations(self.metrics.records())

  def budget(self) -> dict:
    """What the run spent and where its best phi came from: meta-steps run, the saved phi's step
    and validation result, every epoch's validation, wall time (if recorded) and the config's
    sizes. Missing files give None (a run with no config or best optimizer yet)."""
    records = self.metrics.records()
    config = self.saved_config() if self.has_config() else {}
    best = self.best_metadata()
    wall_path = os.path.join(self.path, WALL_FILE)
    wall = float(tree_files.read_regular(wall_path)) if os.path.isfile(wall_path) else None
    sizes = ("meta_lr", "meta_grad_clip", "num_problems", "unroll", "horizon")
    sizes += ("steps_per_epoch", "valid_problems")
    return {
      "meta_steps": max([r.get("step", 0) for r in records] or [0]),
      "saved_step": best.get("step"),
      "valid_final_loss": best.get("valid_final_loss"),
      "valid_history": [loss for _, loss in _validations(records)],
      "wall_seconds": wall,
      **{name: config.get(name) for name in sizes},
      "machine": best.get("machine"),
    }

  # The writer's start.

  def lock(self):
    """The writer's exclusive lock on the directory (``train.run_lock.RunLock``), a context."""
    from train import run_lock  # Deferred: run_lock raises this module's RunDirError.

    return run_lock.RunLock(self.path)

  def check_tree(self) -> None:
    """Creates the directory; ``RunDirError`` if a file the run writes is in the way."""
    check_output_dir(self.path)
    expected = {
      CHECKPOINT_DIR: os.path.isdir,
      METRICS_FILE: os.path.isfile,
      CONFIG_FILE: os.path.isfile,
      BEST_RECORD: os.path.isfile,
    }
    for name, is_kind in expected.items():
      path = os.path.join(self.path, name)
      if os.path.lexists(path) and not is_kind(path):
        kind = "a directory" if is_kind is os.path.isdir else "a file"
        raise RunDirError(f"{path} must be {kind}; move it away or choose a new --output_dir.")

  def check_resumable(self, config: MetaTrainConfig) -> None:
    """Refuses to resume the run under ``config`` if that would change its results, naming the
    settings that differ."""
    if not self.steps():
      return
    if not os.path.exists(self.config_path):
      raise RunDirError(
        f"{self.checkpoint_dir} holds checkpoints but {self.config_path} is missing, so whether "
        "they fit these flags cannot be checked. Restore config.json, or choose a new --output_dir."
      )
    try:
      changed = saved_config.differences(saved_config.read_saved(self.config_path), config)
    except (ValueError, TypeError, KeyError) as e:
      raise RunDirError(
        f"{self.config_path} is unreadable ({e}); restore it or choose a new --output_dir."
      ) from e
    if changed:
      raise RunDirError(
        f"{config.output_dir} holds a run with a different config ({self.config_path}): "
        + "; ".join(changed)
        + ". Resume it with the same flags or choose a new --output_dir."
      )

  def remove_temporaries(self) -> None:
    """Removes what a kill during an atomic write left (the writer's, at its start)."""
    for directory in (self.path, self.checkpoint_dir):
      tree_files.remove_temporaries(directory)


def _validations(records: list[dict]) -> list[tuple[int, float]]:
  """The epochs' validation records of ``metrics.jsonl`` as ``(meta-step, loss)``."""
  return [(r["step"], r["valid_final_loss"]) for r in records if "valid_final_loss" in r]
