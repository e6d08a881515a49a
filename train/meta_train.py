r"""Meta-trains a learned optimizer (Andrychowicz et al., 2016, section 3).

Example:
  python -m train.meta_train --task=quadratic --output_dir=runs/quadratic

Running it again with the same --output_dir resumes from the newest checkpoint there.
"""

import json

from absl import app, flags, logging

import jax

from train import config as config_lib
from train import trainer

_DEFAULTS = config_lib.MetaTrainConfig.__dataclass_fields__

flags.DEFINE_string("output_dir", None, "Where checkpoints, metrics and the trained optimizer go.")
flags.DEFINE_string("task", "quadratic", "Task family to meta-train on.")
flags.DEFINE_string("task_kwargs", "{}", 'JSON settings of the task family, e.g. \'{"dim": 10}\'.')
flags.DEFINE_string("optimizer", "lstm", f"Learned optimizer: {config_lib.OPTIMIZERS}.")
flags.DEFINE_integer("hidden_size", 20, "LSTM units per layer.")
flags.DEFINE_integer("num_layers", 2, "LSTM layers.")
flags.DEFINE_string("preprocess", "none", "Gradient preprocessing: none, scale or log_sign.")
flags.DEFINE_float("preprocess_p", 10.0, "p of the log_sign preprocessing (Appendix A).")
flags.DEFINE_float("input_scale", 1.0, "Input factor for --preprocess=scale.")
flags.DEFINE_float("output_scale", 1.0, "Factor on the proposed updates (0.1 for MNIST).")
flags.DEFINE_integer("global_cells", 5, "Global averaging cells per layer (lstm_gac, ntm_*).")
flags.DEFINE_integer("read_heads", 1, "NTM read heads; the first one's result is the update.")
flags.DEFINE_integer("write_heads", 3, "NTM write heads (rank-one memory writes per step).")
flags.DEFINE_integer("memory_window", 10, "Steps of writes ntm_lbfgs keeps (its L-BFGS history).")
flags.DEFINE_integer("unroll", 20, "Optimizee steps per truncation (BPTT length).")
flags.DEFINE_integer("horizon", 100, "Optimizee steps per problem before it is resampled.")
flags.DEFINE_integer("num_problems", 128, "Problems per meta-step (vmapped).")
flags.DEFINE_float("meta_lr", 1e-3, "Adam learning rate for the optimizer's weights.")
flags.DEFINE_float("meta_grad_clip", 0.0, "Global-norm clip of the meta-gradient; 0: off.")
flags.DEFINE_integer("num_epochs", 20, "Epochs; phi is validated after each.")
flags.DEFINE_integer("steps_per_epoch", 100, "Meta-steps per epoch.")
flags.DEFINE_integer("patience", 0, "Early stopping after this many epochs without gain; 0: off.")
flags.DEFINE_integer("valid_problems", 128, "Fixed held-out problems for validation.")
flags.DEFINE_bool("second_order", False, "Backpropagate through optimizee gradients too.")
flags.DEFINE_integer("seed", 0, "Seed of phi's init, training problems and validation problems.")
flags.DEFINE_integer("log_every", 50, "Meta-steps between progress lines.")
flags.DEFINE_integer("checkpoint_every", 100, "Meta-steps between checkpoints.")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
flags.DEFINE_integer("max_consecutive_skips", 10, "Stop after this many non-finite steps in a row.")

FLAGS = flags.FLAGS


def config_from_flags() -> config_lib.MetaTrainConfig:
  """Validates the flags into a frozen config; raises ValueError naming a bad flag."""
  try:
    task_kwargs = json.loads(FLAGS.task_kwargs)
  except json.JSONDecodeError as e:
    raise ValueError(f"--task_kwargs is not valid JSON ({e}); e.g. --task_kwargs='{{\"dim\": 10}}'.") from e
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
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  logging.info("Config:\n%s", config.to_json())
  _, host = trainer.train(config, log=lambda s: print(s, flush=True))
  print(f"Best validation final loss {host['best_valid']:.4g}; optimizer saved in {config.output_dir}")


if __name__ == "__main__":
  jax.config.parse_flags_with_absl()
  app.run(main)
