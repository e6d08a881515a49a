"""Learned optimizers in JAX (Andrychowicz et al., 2016), usable as optax transformations.

Example:
  >>> import learned_opt, optax
  >>> tx = learned_opt.as_optax(learned_opt.pretrained("quadratic"))  # or learned_opt.load(dir)
  >>> opt_state = tx.init(params)
  >>> updates, opt_state = tx.update(grads, opt_state, params)
  >>> params = optax.apply_updates(params, updates)
"""

import importlib.metadata

from learned_opt.backend import BACKENDS, KernelUnavailable
from learned_opt.base import LearnedOptimizer, SavedOptimizer, check_float_params
from learned_opt.lstm import lstm_optimizer
from learned_opt.ntm import ntm_bfgs_optimizer, ntm_lbfgs_optimizer
from learned_opt.optax_face import LearnedOptaxState, as_optax
from learned_opt.parameter_groups import partition
from learned_opt.per_param_mlp import per_param_mlp_optimizer
from learned_opt.registry import build, kinds, register, settings, with_backend
from learned_opt.serialization import load, load_metadata, save
from learned_opt.shipped import names as pretrained_names
from learned_opt.shipped import pretrained

try:
  __version__ = importlib.metadata.version("learned-opt")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
  __version__ = "unknown"

__all__ = [
  "__version__",
  "BACKENDS",
  "KernelUnavailable",
  "LearnedOptaxState",
  "LearnedOptimizer",
  "SavedOptimizer",
  "as_optax",
  "build",
  "check_float_params",
  "kinds",
  "load",
  "load_metadata",
  "lstm_optimizer",
  "ntm_bfgs_optimizer",
  "ntm_lbfgs_optimizer",
  "partition",
  "per_param_mlp_optimizer",
  "pretrained",
  "pretrained_names",
  "register",
  "save",
  "settings",
  "with_backend",
]
