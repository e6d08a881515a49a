"""A run's ``metrics.jsonl``: one JSON record a line, appended as the run goes, rewound on resume.

Records are progress lines (``step``, ``meta_loss``, ``final_loss``, ``grad_norm``,
``steps_per_sec``), skipped meta-steps (``skipped``) and epochs' validation (``epoch``,
``valid_final_loss``, ``valid_diverged``). Reached through ``train.run.Run.metrics``.
"""

import json
import os

from learned_opt import tree_files


class MetricsLog:
  """The ``metrics.jsonl`` at ``path`` (it need not exist yet)."""

  def __init__(self, path: str):
    self.path = path

  def append(self, record: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def lines(self) -> int:
    """Lines written (0 if missing); a FIFO at ``path`` raises rather than blocks."""
    if not os.path.exists(self.path):
      return 0
    return tree_files.read_regular(self.path).count(b"\n")

  def records(self) -> list[dict]:
    """Every record, oldest first; a torn or foreign line is left out."""
    if not os.path.exists(self.path):
      return []
    return [r for r in map(_parse, tree_files.read_regular(self.path).splitlines()) if r]

  def rewind(self, host: dict | None, step: int) -> None:
    """Drops the records a resumed run will write again (and a torn last line).

    Keeps the lines that existed when the restored checkpoint was written (its host record's
    ``metrics_lines``; older checkpoints: records up to its ``step``; none without a checkpoint,
    ``host`` None), so a replayed step is recorded once.
    """
    if not os.path.exists(self.path):
      return
    lines = tree_files.read_regular(self.path).splitlines(keepends=True)
    complete = [line for line in lines if line.endswith(b"\n")]
    if host is None:
      kept = []
    elif "metrics_lines" in host:
      kept = complete[: host["metrics_lines"]]
    else:
      records = [(line, _parse(line)) for line in complete]
      kept = [line for line, r in records if r is not None and r.get("step", 0) <= step]
    if kept != lines:
      tree_files.atomic_write(self.path, b"".join(kept))


def _parse(line: bytes) -> dict | None:
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record if isinstance(record, dict) else None
