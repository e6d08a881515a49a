"""The meta-training job's settings: one frozen, validated config (built from flags or by hand)."""

import dataclasses
import json
import os
from typing import Any

from learned_opt import preprocess as preprocess_lib
from train import unroll

OPTIMIZERS = ("lstm", "lstm_gac", "ntm_bfgs", "ntm_lbfgs")
META_LR_SCHEDULES = ("constant", "cosine")
NTM_OPTIMIZERS = ("ntm_bfgs", "ntm_lbfgs")


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
  """Everything a meta-training run depends on; saved as ``config.json`` in the output dir.

  Optimizer settings follow section 3: a 2-layer, 20-unit LSTM, unrolled for 20 steps of a
  100-step horizon, meta-trained with Adam.
  """

  output_dir: str
  task: str = "quadratic"
  task_kwargs: dict = dataclasses.field(default_factory=dict)
  optimizer: str = "lstm"
  hidden_size: int = 20
  num_layers: int = 2
  preprocess: str = "none"
  preprocess_p: float = 10.0
  input_scale: float = 1.0
  output_scale: float = 1.0
  global_cells: int = 5  # used by lstm_gac, ntm_bfgs and ntm_lbfgs
  read_heads: int = 1  # ntm_* only (section 3.1: one read head)
  write_heads: int = 3  # ntm_* only (section 3.1: three write heads)
  memory_window: int = 10  # ntm_lbfgs only: steps of writes kept
  unroll: int = 20
  horizon: int = 100
  num_problems: int = 128
  meta_lr: float = 3e-3
  meta_lr_schedule: str = "constant"  # or "cosine": decay to meta_lr * meta_lr_final_ratio
  meta_lr_final_ratio: float = 0.1  # cosine only: the last meta-step's rate over meta_lr
  meta_grad_clip: float = 0.0  # global-norm clip on the meta-gradient; 0 turns it off
  num_epochs: int = 30
  steps_per_epoch: int = 100
  patience: int = 0  # stop after this many epochs without a better validation loss; 0: never
  valid_problems: int = 128
  second_order: bool = False
  meta_objective: str = "sum"  # eq. (3) with w_t = 1; "log_sum": sum_t log f; "ramp": w_t = t/T
  seed: int = 0
  log_every: int = 50
  checkpoint_every: int = 100  # meta-steps between checkpoints (and at every epoch end)
  keep_checkpoints: int = 3
  max_consecutive_skips: int = 10  # stop after this many non-finite meta-steps in a row

  def __post_init__(self):
    validate(self)

  @property
  def total_steps(self) -> int:
    return self.num_epochs * self.steps_per_epoch

  def optimizer_config(self) -> dict[str, Any]:
    """The ``learned_opt.build`` config of the optimizer this run trains."""
    config = {
      "kind": "lstm",
      "hidden_size": self.hidden_size,
      "num_layers": self.num_layers,
      "preprocess": self.preprocess,
      "preprocess_p": self.preprocess_p,
      "input_scale": self.input_scale,
      "output_scale": self.output_scale,
      "global_cells": self.global_cells if self.optimizer != "lstm" else 0,
    }
    if self.optimizer in NTM_OPTIMIZERS:
      config.update(kind=self.optimizer, read_heads=self.read_heads, write_heads=self.write_heads)
    if self.optimizer == "ntm_lbfgs":
      config["memory_window"] = self.memory_window
    return config

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved ``config.json`` with fields added since it was written set to their defaults."""
  defaults = {
    name: field.default
    for name, field in MetaTrainConfig.__dataclass_fields__.items()
    if field.default is not dataclasses.MISSING
  }
  return {**defaults, **saved}


def _positive(config, *names):
  for name in names:
    value = getattr(config, name)
    if not value > 0:
      raise ValueError(f"--{name} must be positive, got {value!r} (e.g. --{name}=20).")


def validate(config: MetaTrainConfig) -> None:
  """Raises a ``ValueError`` naming the flag and a valid example for every bad setting."""
  from tasks import registry as task_registry  # Deferred: tasks may register more families.

  if config.task not in task_registry.names():
    raise ValueError(
      f"--task={config.task!r} is unknown; choose one of {', '.join(task_registry.names())} "
      "(e.g. --task=quadratic)."
    )
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(
      f"--optimizer={config.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)} "
      "(e.g. --optimizer=lstm)."
    )
  if config.preprocess not in preprocess_lib.PREPROCESSORS:
    raise ValueError(
      f"--preprocess={config.preprocess!r} is unknown; choose one of "
      f"{', '.join(preprocess_lib.PREPROCESSORS)} (e.g. --preprocess=log_sign)."
    )
  _positive(
    config,
    "hidden_size",
    "num_layers",
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
    "preprocess_p",
    "output_scale",
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
  if config.optimizer == "lstm_gac" and not 0 < config.global_cells <= config.hidden_size:
    raise ValueError(
      f"--global_cells={config.global_cells} must lie in (0, --hidden_size="
      f"{config.hidden_size}] for lstm_gac (e.g. --global_cells=5)."
    )
  if config.optimizer in NTM_OPTIMIZERS and not 0 <= config.global_cells <= config.hidden_size:
    raise ValueError(
      f"--global_cells={config.global_cells} must lie in [0, --hidden_size="
      f"{config.hidden_size}] for {config.optimizer} (e.g. --global_cells=5)."
    )
  if config.optimizer in NTM_OPTIMIZERS:
    _positive(config, "read_heads", "write_heads")
  if config.optimizer == "ntm_lbfgs":
    _positive(config, "memory_window")
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
