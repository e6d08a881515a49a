"""Meta-training jobs: truncated-BPTT unrolls, the training loop, checkpoints.

The public face, what ``eval/`` and ``experiments/`` may import (``tests/test_layering.py``):

- ``inner``: the one inner loop (gradient, ``stop_gradient``, update, apply) and problem sampling;
- ``distributed``: meshes, multi-process start-up, gathering to the host;
- ``config``: ``MetaTrainConfig``, a run's settings, and its task-setting checks;
- ``command_line``, ``config_flags``: a command's start-up (one-line usage errors) and its
  flags, one per field of its config dataclass;
- ``run`` / ``Run``: the one reader and writer of a run directory (config, checkpoints, phi
  without the task, the best optimizer, metrics, budget);
- ``progress``: progress lines of long jobs (rate, ETA) and their duration format.

``experiments/`` may also meta-train: ``trainer`` (``trainer.train``, ``trainer.build``). Every
other module is the package's own.

Example:
  >>> from train import Run
  >>> snapshot = Run("runs/mnist").meta_params("best")
"""

FACE = ("inner", "distributed", "config", "command_line", "config_flags", "run", "Run", "progress")
__all__ = list(FACE)


def __getattr__(name: str):
  # ``Run`` is imported when first asked for, so ``from train import inner`` loads only that.
  if name == "Run":
    from train.run import Run

    return Run
  raise AttributeError(f"module 'train' has no attribute {name!r}")
