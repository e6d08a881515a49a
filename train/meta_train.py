r"""Meta-trains a learned optimizer (Andrychowicz et al., 2016, section 3).

Example:
  python -m train.meta_train --task=quadratic --output_dir=runs/quadratic

Running it again with the same --output_dir resumes from the newest checkpoint there.
"""

import json

import jax
from absl import app, flags, logging

from train import config as config_lib
from train import trainer

_DEFAULTS = config_lib.MetaTrainConfig.__dataclass_fields__


def _default(name):
  """Flag defaults are the config's, so the two cannot drift apart."""
  return _DEFAULTS[name].default


flags.DEFINE_string("output_dir", None, "Where checkpoints, metrics and the trained optimizer go.")
flags.DEFINE_string("task", _default("task"), "Task family to meta-train on.")
flags.DEFINE_string("task_kwargs", "{}", "JSON settings of the task family, e.g. '{\"dim\": 10}'.")
flags.DEFINE_string(
  "optimizer", _default("optimizer"), f"Learned optimizer: {config_lib.OPTIMIZERS}."
)
flags.DEFINE_integer("hidden_size", _default("hidden_size"), "LSTM units per layer.")
flags.DEFINE_integer("num_layers", _default("num_layers"), "LSTM layers.")
flags.DEFINE_string(
  "preprocess", _default("preprocess"), "Gradient preprocessing: none, scale or log_sign."
)
flags.DEFINE_float(
  "preprocess_p", _default("preprocess_p"), "p of the log_sign preprocessing (Appendix A)."
)
flags.DEFINE_float("input_scale", _default("input_scale"), "Input factor for --preprocess=scale.")
flags.DEFINE_float(
  "output_scale", _default("output_scale"), "Factor on the proposed updates (0.1 for MNIST)."
)
flags.DEFINE_integer(
  "global_cells", _default("global_cells"), "Global averaging cells per layer (lstm_gac)."
)
flags.DEFINE_integer("unroll", _default("unroll"), "Optimizee steps per truncation (BPTT length).")
flags.DEFINE_integer(
  "horizon", _default("horizon"), "Optimizee steps per problem before it is resampled."
)
flags.DEFINE_integer("num_problems", _default("num_problems"), "Problems per meta-step (vmapped).")
flags.DEFINE_float(
  "meta_lr", _default("meta_lr"), "Adam learning rate for the optimizer's weights."
)
flags.DEFINE_string(
  "meta_lr_schedule",
  _default("meta_lr_schedule"),
  "Meta learning rate over the run: constant, or cosine decay to meta_lr * meta_lr_final_ratio.",
)
flags.DEFINE_float(
  "meta_lr_final_ratio",
  _default("meta_lr_final_ratio"),
  "With --meta_lr_schedule=cosine: the last meta-step's learning rate over --meta_lr.",
)
flags.DEFINE_float(
  "meta_grad_clip", _default("meta_grad_clip"), "Global-norm clip of the meta-gradient; 0: off."
)
flags.DEFINE_integer("num_epochs", _default("num_epochs"), "Epochs; phi is validated after each.")
flags.DEFINE_integer("steps_per_epoch", _default("steps_per_epoch"), "Meta-steps per epoch.")
flags.DEFINE_integer(
  "patience", _default("patience"), "Early stopping after this many epochs without gain; 0: off."
)
flags.DEFINE_integer(
  "valid_problems", _default("valid_problems"), "Fixed held-out problems for validation."
)
flags.DEFINE_bool(
  "second_order", _default("second_order"), "Backpropagate through optimizee gradients too."
)
flags.DEFINE_string(
  "meta_objective",
  _default("meta_objective"),
  "What a truncation minimizes: sum (sum_t f, the paper's eq. 3), log_sum (sum_t log f) or "
  "ramp (sum_t (t / horizon) f, weighted toward the end of a run).",
)
flags.DEFINE_integer(
  "seed", _default("seed"), "Seed of phi's init, training problems and validation problems."
)
flags.DEFINE_integer("log_every", _default("log_every"), "Meta-steps between progress lines.")
flags.DEFINE_integer(
  "checkpoint_every", _default("checkpoint_every"), "Meta-steps between checkpoints."
)
flags.DEFINE_integer("keep_checkpoints", _default("keep_checkpoints"), "Checkpoints kept.")
flags.DEFINE_integer(
  "max_consecutive_skips",
  _default("max_consecutive_skips"),
  "Stop after this many non-finite steps in a row.",
)
flags.DEFINE_integer(
  "read_heads", _default("read_heads"), "NTM read heads; the first one's result is the update."
)
flags.DEFINE_integer(
  "write_heads", _default("write_heads"), "NTM write heads (rank-one memory writes per step)."
)
flags.DEFINE_integer(
  "memory_window",
  _default("memory_window"),
  "Steps of writes ntm_lbfgs keeps (its L-BFGS history).",
)

FLAGS = flags.FLAGS


def config_from_flags() -> config_lib.MetaTrainConfig:
  """Validates the flags into a frozen config; raises ValueError naming a bad flag."""
  try:
    task_kwargs = json.loads(FLAGS.task_kwargs)
  except json.JSONDecodeError as e:
    raise ValueError(
      f"--task_kwargs is not valid JSON ({e}); e.g. --task_kwargs='{{\"dim\": 10}}'."
    ) from e
  if not isinstance(task_kwargs, dict):
    raise ValueError("--task_kwargs must be a JSON object, e.g. --task_kwargs='{\"dim\": 10}'.")
  values = {name: FLAGS[name].value for name in _DEFAULTS if name != "task_kwargs"}
  values["output_dir"] = values["output_dir"] or ""
  return config_lib.MetaTrainConfig(task_kwargs=task_kwargs, **values)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    config = config_from_flags()
    config_lib.check_output_dir(config.output_dir)
    trainer.build(config)  # Task and optimizer settings (e.g. a data directory) fail here, early.
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  logging.info("Config:\n%s", config.to_json())
  _, host = trainer.train(config, log=lambda s: print(s, flush=True))
  print(
    f"Best validation final loss {host['best_valid']:.4g}; optimizer saved in {config.output_dir}"
  )


if __name__ == "__main__":
  jax.config.parse_flags_with_absl()
  app.run(main)
