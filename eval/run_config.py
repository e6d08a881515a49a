"""Which saved optimizers a command names, and what task they were trained on.

A run (``--run=DIR``, a meta-training ``--output_dir``) names its checkpoints and its best
optimizer (``run_candidates``), read through ``train.Run`` without building the task.

A checkpoint spec is ``DIR``, ``NAME=DIR``, ``pretrained:NAME`` or ``NAME=pretrained:NAME``:
a directory written by ``learned_opt.save`` (a meta-training run's ``--output_dir``) or an
optimizer shipped with the package. The task an optimizer trained on is read from its run's
``config.json`` or, failing that, from the metadata saved with it.
"""

import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import learned_opt
from tasks import registry as task_registry
from train import Run
from train import config as config_lib
from train.run import RunDirError

# The directory of ``DIR`` or ``pretrained:NAME``; raises ValueError for an unknown name.
resolve = learned_opt.shipped.resolve


def parse_checkpoint_specs(specs) -> list[tuple[str | None, str]]:
  """``["NAME=DIR", "DIR", "pretrained:NAME"]`` -> ``[(NAME or None, directory), ...]``."""
  parsed = []
  for spec in specs:
    name, _, path = spec.rpartition("=")
    parsed.append((name or None, resolve(path)))
  return parsed


def kind_name(saved) -> str:
  """A trained optimizer's default label: its kind (``lstm``, ``ntm_bfgs``, ...)."""
  return saved.optimizer.config.get("kind", "learned")


def load_all(specs: list[tuple[str | None, str]]) -> dict:
  """``{name: SavedOptimizer}`` in the order given; unnamed ones are named by their kind.

  Raises:
    ValueError: "No saved optimizer at ..." for a path without one, or a corrupt one.
  """
  loaded = {}
  for name, path in specs:
    try:
      saved = learned_opt.load(path)
    except FileNotFoundError as e:
      raise ValueError(str(e)) from e
    name = name or kind_name(saved)
    unique, n = name, 2
    while unique in loaded:
      unique, n = f"{name}_{n}", n + 1
    loaded[unique] = saved
  return loaded


def trained_task(path: str) -> tuple[str | None, dict | None]:
  """``(task name, task kwargs)`` a saved optimizer trained on, ``(None, None)`` if unrecorded."""
  run = Run(path)
  if not run.has_best():
    raise ValueError(
      f"No saved optimizer at {path!r}: it holds no {learned_opt.serialization.RECORD_FILE}. "
      "Name a directory written by learned_opt.save or train.meta_train, or pretrained:NAME "
      f"({', '.join(learned_opt.pretrained_names())})."
    )
  if run.has_config():  # a meta-training run's directory
    config = run.saved_config()
    return config["task"], config["task_kwargs"]
  metadata = learned_opt.load_metadata(path)
  run = metadata.get("run_config", {})
  kwargs = metadata.get("task_kwargs", run.get("task_kwargs"))
  return metadata.get("task", run.get("task")), kwargs


def one_family(name: str, kwargs: dict) -> tuple[str, dict]:
  """``(name, kwargs)`` if they name one task family; a mixture run is evaluated bucket by bucket.

  Raises:
    ValueError: ``mixture`` without a ``bucket`` (its default would be one quadratic bucket).
  """
  if name == "mixture" and "bucket" not in kwargs:
    from tasks import mixture  # only for the names in the message

    preset = kwargs.get("preset", "default")
    buckets = ", ".join(spec.name for spec in mixture.specs(preset))
    raise ValueError(
      "A mixture is evaluated one bucket at a time: pass --task=mixture "
      f'--task_kwargs=\'{{"preset": "{preset}", "bucket": NAME}}\' (NAME one of {buckets}).'
    )
  return name, kwargs


def given_kwargs(task_kwargs: str | dict | None) -> dict | None:
  """``--task_kwargs`` as a dict: a dict (a config's field) as it is, JSON text parsed; None
  (and empty text) for unset."""
  if task_kwargs is None or isinstance(task_kwargs, dict):
    return task_kwargs
  try:
    return json.loads(task_kwargs) if task_kwargs else None
  except json.JSONDecodeError as e:
    raise ValueError(f"--task_kwargs is not valid JSON ({e}); e.g. '{{\"dim\": 10}}'.") from e


def task_settings(paths, task=None, task_kwargs: str | dict | None = None):
  """Task name and kwargs as given (``task_kwargs`` a dict or JSON text; None: unset), else
  those the first optimizer recorded."""
  name, kwargs = task, given_kwargs(task_kwargs)
  for path in paths:
    recorded_name, recorded_kwargs = trained_task(path)
    if recorded_name:
      name = name or recorded_name
      kwargs = recorded_kwargs if kwargs is None else kwargs
      break
  if not name:
    raise ValueError(
      "--task is required: no checkpoint records the task it trained on (e.g. --task=quadratic)."
    )
  if not isinstance(kwargs or {}, dict):
    raise ValueError(f"--task_kwargs must be a JSON object, got {task_kwargs!r}.")
  if name not in task_registry.names():
    raise ValueError(
      f"--task={name!r} is unknown; choose one of {', '.join(task_registry.names())}."
    )
  config_lib.check_task_kwargs(name, kwargs or {})
  return one_family(name, kwargs or {})


class Candidate(NamedTuple):
  """One saved optimizer a command names (to rank, evaluate or compare)."""

  name: str  # unique among the candidates
  source: str  # the checkpoint or saved-optimizer directory it came from
  meta_step: int | None  # meta-steps of training behind its phi, where recorded
  saved: learned_opt.SavedOptimizer


def run_candidates(run: str, with_checkpoints: bool = True, log=print) -> list[Candidate]:
  """A run's checkpoints (phi at each meta-step) and its saved best optimizer, read through
  ``train.Run`` (only the optimizer is built; the task and its data never are).

  A checkpoint that does not read (corrupt, from another config) is skipped with a log line.

  Raises:
    ValueError: naming ``run`` when it is no directory, holds neither checkpoints nor a saved
      optimizer, or holds checkpoints without the ``config.json`` needed to read them.
  """
  if not os.path.isdir(run):
    raise ValueError(f"--run={run!r}: no such directory; name a meta-training run's --output_dir.")
  opened = Run(run)
  steps = opened.steps() if with_checkpoints else []
  if not steps and not opened.has_best():
    what = (
      f"no checkpoints found at {opened.checkpoint_dir} (no step_* directories) and "
      if with_checkpoints
      else ""
    )
    raise ValueError(
      f"--run={run!r}: {what}no saved optimizer ({learned_opt.serialization.RECORD_FILE}) at "
      f"{run}. Name a meta-training run's --output_dir (it has checkpoints/step_*)."
    )
  if steps and not opened.has_config():
    raise ValueError(
      f"--run={run!r} has checkpoints but no config.json, which is needed to read them; rank "
      f"its saved optimizer alone with --checkpoint={run}."
    )
  label = os.path.basename(os.path.normpath(run))
  found = []
  for step in steps:
    try:
      snapshot = opened.meta_params(step)
    except RunDirError:
      raise
    except ValueError as e:
      log(f"Skipping unusable checkpoint {opened.checkpoint_path(step)}: {e}")
      continue
    found.append(Candidate(f"{label}/step_{step}", snapshot.source, step, snapshot.saved))
  if opened.has_best():
    best = opened.meta_params("best")
    found.append(Candidate(f"{label}/best", run, best.step, best.saved))
  return found


def saved_candidates(specs: Sequence[str]) -> list[Candidate]:
  """Candidates of ``--checkpoint`` specs (``DIR``, ``NAME=DIR``, ``pretrained:NAME``)."""
  parsed = parse_checkpoint_specs(specs)
  loaded = load_all(parsed)
  return [
    Candidate(name, path, learned_opt.load_metadata(path).get("step"), saved)
    for (name, saved), (_, path) in zip(loaded.items(), parsed, strict=True)
  ]


def unique_names(candidates: list[Candidate]) -> list[Candidate]:
  """The candidates with ``_2``, ``_3``, ... appended to repeated names."""
  seen, out = set(), []
  for c in candidates:
    name, n = c.name, 2
    while name in seen:
      name, n = f"{c.name}_{n}", n + 1
    seen.add(name)
    out.append(c._replace(name=name))
  return out


def task_of(runs, specs, task=None, task_kwargs: str | dict | None = None) -> tuple[str, dict]:
  """``(task name, kwargs)``: as given, else the first run's ``config.json``, else as recorded
  with the first saved optimizer (``task_settings``)."""
  for run in runs:
    if Run(run).has_config():
      config = Run(run).saved_config()
      kwargs = given_kwargs(task_kwargs)
      kwargs = config["task_kwargs"] if kwargs is None else kwargs
      return one_family(task or config["task"], kwargs)
  paths = list(runs) + [path for _, path in parse_checkpoint_specs(specs)]
  return task_settings(paths, task, task_kwargs)
