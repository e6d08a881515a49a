"""The meta-training job's settings: one frozen, validated config (built from flags or by hand)."""

import collections.abc
import contextlib
import dataclasses
import inspect
import json
import math
import os
import types
import typing
from typing import Any

from train import config_flags, unroll

META_LR_SCHEDULES = ("constant", "cosine")


_setting = config_flags.setting  # a field that is also a flag of ``train.meta_train``


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
  """Everything a meta-training run depends on; saved as ``config.json`` in the output dir.

  Each field is one command-line flag of ``train.meta_train`` (its help is the field's). The
  optimizer's own settings are one JSON mapping, ``optimizer_kwargs``, validated by
  ``learned_opt.build``: a new optimizer setting is an argument of its factory and nothing else.
  Defaults follow section 3: a 2-layer, 20-unit LSTM, unrolled for 20 steps of a 100-step
  horizon, meta-trained with Adam.
  """

  output_dir: str = _setting(
    "",
    "Required. Where checkpoints, metrics and the trained optimizer go; a run there resumes.",
  )
  task: str = _setting(
    "quadratic",
    "Task family to meta-train on (the families and their settings: --task_kwargs); it picks "
    "the preset of its name (see --preset).",
  )
  task_kwargs: dict = _setting(
    {}, "JSON settings of the task family, e.g. '{\"dim\": 10}'; the families and defaults:"
  )
  optimizer: str = _setting(
    "lstm",
    "Learned optimizer kind: lstm, lstm_gac, ntm_bfgs, ntm_lbfgs or partition (one per "
    "parameter group; learned_opt.kinds()).",
  )
  optimizer_kwargs: dict = _setting(
    {},
    "JSON settings of the optimizer (arguments of its factory), e.g. "
    '\'{"preprocess": "log_sign", "output_scale": 0.1}\'.',
  )
  backend: str = _setting(
    "auto",
    "How the learned optimizer's steps execute: auto (the CPU kernels on a one-device CPU where "
    "a C++ compiler builds them, else XLA), xla (any device, nothing compiled) or cpu_kernels "
    "(insists; an error where they cannot be built). Results agree to ~1e-6.",
  )
  unroll: int = _setting(20, "Optimizee steps per truncation (BPTT length).")
  horizon: int = _setting(100, "Optimizee steps per problem before it is resampled.")
  num_problems: int = _setting(128, "Problems per meta-step (vmapped).")
  meta_lr: float = _setting(3e-3, "Adam learning rate for the optimizer's weights.")
  meta_lr_schedule: str = _setting(
    "constant",
    "Meta learning rate over the run: constant, or cosine decay to meta_lr * meta_lr_final_ratio.",
  )
  meta_lr_final_ratio: float = _setting(
    0.1, "With --meta_lr_schedule=cosine: the last meta-step's learning rate over --meta_lr."
  )
  meta_grad_clip: float = _setting(0.0, "Global-norm clip of the meta-gradient; 0: off.")
  num_epochs: int = _setting(30, "Epochs; phi is validated after each.")
  steps_per_epoch: int = _setting(100, "Meta-steps per epoch.")
  patience: int = _setting(0, "Early stopping after this many epochs without gain; 0: off.")
  valid_problems: int = _setting(128, "Fixed held-out problems for validation.")
  valid_task_kwargs: dict = _setting(
    {},
    'JSON task settings validation changes on top of --task_kwargs, e.g. \'{"split": "valid"}\' '
    "to validate on held-out images; empty: fresh draws from the training task.",
  )
  second_order: bool = _setting(False, "Backpropagate through optimizee gradients too.")
  meta_objective: str = _setting(
    "sum",
    "What a truncation minimizes: sum (sum_t f, the paper's eq. 3), log_sum (sum_t log f) or "
    "ramp (sum_t (t / horizon) f, weighted toward the end of a run).",
  )
  seed: int = _setting(0, "Seed of phi's init, training problems and validation problems.")
  valid_seed: int = _setting(
    -1,
    "Seed of the validation problems alone; -1: --seed's. Give runs of different --seed the "
    "same --valid_seed and their validation losses are on the same problems.",
  )
  init_from: str = _setting(
    "",
    "Start phi from a saved optimizer instead of the seed's random init: a directory written by "
    "learned_opt.save or train.meta_train, or pretrained:NAME; it must have this run's optimizer "
    "config. Empty: random init.",
  )
  log_every: int = _setting(50, "Meta-steps between progress lines.")
  checkpoint_every: int = _setting(100, "Meta-steps between checkpoints (and at every epoch end).")
  keep_checkpoints: int = _setting(3, "Checkpoints kept.")
  max_consecutive_skips: int = _setting(10, "Stop after this many non-finite steps in a row.")

  def __post_init__(self):
    validate(self)

  @property
  def total_steps(self) -> int:
    return self.num_epochs * self.steps_per_epoch

  def optimizer_config(self) -> dict[str, Any]:
    """The ``learned_opt.build`` config of the optimizer this run trains, as given."""
    return {"kind": self.optimizer, **self.optimizer_kwargs}

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _fits(annotation: Any, value: Any) -> bool:
  """Whether a JSON value fits a task factory's annotation (loosely: unknown kinds pass)."""
  if annotation in (inspect.Parameter.empty, Any):
    return True
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    return any(_fits(a, value) for a in typing.get_args(annotation))
  if annotation is type(None):
    return value is None
  if annotation is bool or isinstance(value, bool):
    return annotation is bool and isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int)
  if annotation is float:
    return isinstance(value, int | float) and _finite(value)
  if annotation is str:
    return isinstance(value, str)
  if origin in (collections.abc.Sequence, list, tuple):
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    items = args[0] if len(args) == 1 else Any
    return isinstance(value, list | tuple) and all(_fits(items, v) for v in value)
  return True


def _finite(value) -> bool:
  try:
    return math.isfinite(value)
  except (OverflowError, TypeError):
    return False


def check_task_kwargs(task: str, kwargs: dict, flag: str = "--task_kwargs") -> None:
  """Unknown or wrongly typed settings of task ``task`` fail here, before anything is built."""
  from tasks import registry as task_registry

  factory = task_registry._FAMILIES[task]  # noqa: SLF001 (the registry has no getter)
  parameters = inspect.signature(factory, eval_str=True).parameters
  if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
    return
  known = ", ".join(f"{n}={p.default!r}" for n, p in parameters.items())
  for name, value in kwargs.items():
    if name not in parameters:
      raise ValueError(
        f"{flag}: task {task!r} has no setting {name!r}; its settings (with defaults) are: {known}."
      )
    annotation = parameters[name].annotation
    if not _fits(annotation, value):
      shown = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
      raise ValueError(
        f"{flag}: setting {name!r} of task {task!r} must be {shown}, got {value!r} "
        f"({type(value).__name__}); e.g. {name}={parameters[name].default!r}."
      )


def _positive(config, *names):
  """Refuses a setting <= 0, suggesting the flag's own default (one example fits no two flags)."""
  defaults = {field.name: field.default for field in dataclasses.fields(config)}
  for name in names:
    value = getattr(config, name)
    if not value > 0:
      raise ValueError(
        f"--{name} must be positive, got {value!r} (e.g. --{name}={defaults[name]!r}, the default)."
      )


def validate(config: MetaTrainConfig) -> None:
  """Raises a ``ValueError`` naming the flag and a valid example for every bad setting."""
  import learned_opt  # Deferred: importing the optimizers is not needed to read a config.
  from tasks import registry as task_registry  # Deferred: tasks may register more families.

  if config.task not in task_registry.names():
    raise ValueError(
      f"--task={config.task!r} is unknown; choose one of {', '.join(task_registry.names())} "
      "(e.g. --task=quadratic)."
    )
  config_flags.check_types(config)  # each field's type; JSON fields are objects
  check_task_kwargs(config.task, config.task_kwargs)
  check_task_kwargs(config.task, config.valid_task_kwargs, "--valid_task_kwargs")
  if config.optimizer not in learned_opt.kinds():
    raise ValueError(
      f"--optimizer={config.optimizer!r} is unknown; choose one of "
      f"{', '.join(learned_opt.kinds())} (e.g. --optimizer=lstm)."
    )
  try:
    learned_opt.build(config.optimizer_config())
  except ValueError as e:
    raise ValueError(
      f"--optimizer={config.optimizer} --optimizer_kwargs='{json.dumps(config.optimizer_kwargs)}'"
      f" is not a valid optimizer: {e}"
    ) from e
  _positive(
    config,
    "unroll",
    "horizon",
    "num_problems",
    "meta_lr",
    "num_epochs",
    "steps_per_epoch",
    "valid_problems",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "max_consecutive_skips",
  )
  if config.valid_seed < -1:
    raise ValueError(
      f"--valid_seed={config.valid_seed} is not a seed; give one >= 0, or -1 to validate on "
      "--seed's problems."
    )
  if config.unroll > config.horizon:
    raise ValueError(
      f"--unroll={config.unroll} is longer than --horizon={config.horizon}; an unroll must fit "
      "in a problem's horizon (e.g. --unroll=20 --horizon=100)."
    )
  if config.horizon % config.unroll:
    raise ValueError(
      f"--horizon={config.horizon} is not a multiple of --unroll={config.unroll}; use e.g. "
      "--unroll=20 --horizon=100."
    )
  if config.backend not in learned_opt.BACKENDS:
    raise ValueError(
      f"--backend={config.backend!r} is unknown; choose one of {', '.join(learned_opt.BACKENDS)} "
      "(e.g. --backend=auto)."
    )
  if config.meta_objective not in unroll.OBJECTIVES:
    raise ValueError(
      f"--meta_objective={config.meta_objective!r} is unknown; choose one of "
      f"{', '.join(unroll.OBJECTIVES)} (e.g. --meta_objective=sum, the paper's)."
    )
  if config.meta_lr_schedule not in META_LR_SCHEDULES:
    raise ValueError(
      f"--meta_lr_schedule={config.meta_lr_schedule!r} is unknown; choose one of "
      f"{', '.join(META_LR_SCHEDULES)} (e.g. --meta_lr_schedule=cosine)."
    )
  if not 0 <= config.meta_lr_final_ratio <= 1:
    raise ValueError(
      f"--meta_lr_final_ratio={config.meta_lr_final_ratio} must lie in [0, 1]: the last "
      "meta-step's learning rate as a fraction of --meta_lr (e.g. 0.1)."
    )
  for name in ("meta_grad_clip", "patience"):
    if getattr(config, name) < 0:
      raise ValueError(f"--{name} must be >= 0, got {getattr(config, name)} (0 turns it off).")
  if not config.output_dir:
    raise ValueError("--output_dir is required (e.g. --output_dir=runs/quadratic).")


def describe_tasks() -> str:
  """Each task family's settings with their defaults, and where its data comes from."""
  from tasks import registry as task_registry

  lines = []
  for name in task_registry.names():
    parameters = inspect.signature(task_registry._FAMILIES[name]).parameters  # noqa: SLF001
    settings = ", ".join(f"{n}={_json_default(p.default)}" for n, p in parameters.items())
    lines.append(f"{name}: {settings}.")
  lines.append(
    "mixture without a bucket setting meta-trains over every bucket of its preset (one bucket "
    "a meta-step); with one, on that bucket alone."
  )
  lines.append(
    "MNIST is read from $MNIST_DIR (or mnist_dir), CIFAR-10 from $CIFAR10_DIR (or cifar10_dir); "
    "nothing is downloaded."
  )
  return " ".join(lines)


def _json_default(value) -> str:
  if value is inspect.Parameter.empty:
    return "(required)"
  return json.dumps(list(value) if isinstance(value, tuple) else value)


@contextlib.contextmanager
def removed_if_start_fails(path: str):
  """Removes the folders made for ``path`` (if still empty) when the block raises.

  A run refused before it starts (a bad flag, no data, too little memory) leaves no empty output
  folder behind; folders that existed before are never touched.
  """
  made, probe = [], os.path.abspath(path) if path else ""
  while probe and not os.path.exists(probe):
    made.append(probe)
    probe = os.path.dirname(probe)
  try:
    yield
  except BaseException:
    for folder in made:  # deepest first
      try:
        os.rmdir(folder)
      except OSError:
        break
    raise


def check_output_dir(path: str) -> None:
  """Creates ``path`` if needed and checks that it is a writable directory."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--output_dir={path!r} exists and is not a directory; name a directory.")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--output_dir={path!r} cannot be created ({e}); name a writable path.") from e
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f"--output_dir={path!r} is not writable; name a writable directory.")
