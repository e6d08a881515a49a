"""One process of a command-line job, for ``tests/test_multihost.py``.

Usage: ``python tests/multihost_worker.py MODULE FLAGS...`` runs ``MODULE``'s command line
(``train.meta_train`` or ``eval.evaluate``) with ``FLAGS``, as ``python -m MODULE FLAGS`` does,
with JAX's CPU collectives set to gloo (what joins CPU processes). With the environment variable
``DIE_AFTER_CHECKPOINT=N``, process 0 kills itself with SIGKILL right after writing the
checkpoint of meta-step ``N``: a preemption at a known point.
"""

import importlib
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def die_after_checkpoint(step: int) -> None:
  """Makes ``train.checkpoint.save`` SIGKILL this process once it has written ``step``."""
  from train import checkpoint  # noqa: PLC0415

  save = checkpoint.save

  def save_then_die(directory, at, *args, **kwargs):
    path = save(directory, at, *args, **kwargs)
    if at == step:
      os.kill(os.getpid(), signal.SIGKILL)
    return path

  checkpoint.save = save_then_die


def main() -> None:
  module, flags = sys.argv[1], sys.argv[2:]
  if os.environ.get("DIE_AFTER_CHECKPOINT"):
    die_after_checkpoint(int(os.environ["DIE_AFTER_CHECKPOINT"]))
  sys.argv = [module, *flags]
  importlib.import_module(module).run()


if __name__ == "__main__":
  main()
